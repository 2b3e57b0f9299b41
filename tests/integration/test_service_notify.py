"""thinblkd and thinblk-agent under a service manager: sd_notify(3)'s protocol against a socket
the test listens on, as systemd does for a Type=notify unit. thinblkd: READY=1 only once every
socket listens, STATUS= with the run state, WATCHDOG=1 at half of WATCHDOG_USEC (when
WATCHDOG_PID is unset or names thinblkd), STOPPING=1 on shutdown; without NOTIFY_SOCKET, or
with one nobody listens on, it runs as usual. The agent: READY=1 once its configuration is
loaded and every daemon's first connection is under way (connected or not), STOPPING=1 on
SIGTERM.
"""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import BUILD_DIR, THINBLKD, TIMEOUT, Daemon, image, ok, thinblk_only

pytestmark = thinblk_only

# The shell execs thinblkd, so $$ is thinblkd's PID, as systemd's WATCHDOG_PID is.
AS_MAIN_PID = 'WATCHDOG_PID=$$ exec "$@"'
AS_OTHER_PID = 'WATCHDOG_PID=1 exec "$@"'


class Manager:
    """The service manager's end: a datagram socket at a path in rundir, or abstract."""

    def __init__(self, rundir, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"thinblk-test-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(rundir / "notify.sock")
            self.sock.bind(self.address)

    def receive(self, timeout=TIMEOUT):
        """The next message as a list of assignments, or None past the timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode().split("\n")
        except (socket.timeout, BlockingIOError):
            return None

    def wait_for(self, assignment, timeout=TIMEOUT):
        """Messages up to the first holding assignment (included); fails past the timeout."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            msg = self.receive(max(0, deadline - time.monotonic()))
            if msg is None:
                pytest.fail(f"no {assignment} within {timeout}s; got {seen}")
            seen.append(msg)
            if assignment in msg:
                return seen

    def pending(self):
        """The messages already queued."""
        out = []
        while (msg := self.receive(0)) is not None:
            out.append(msg)
        return out


def start(daemons, monkeypatch, notify_socket, rundir, args=(), watchdog_usec=None,
          pid=AS_MAIN_PID):
    """thinblkd with a monitor at rundir/qmp.sock, args, and the manager's environment; not
    waiting for any socket (READY=1 is what says they listen); stopped and checked at the end
    like any daemon of the factory."""
    if notify_socket is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", notify_socket)
    if watchdog_usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", str(watchdog_usec))
    qmp_sock = rundir / "qmp.sock"
    argv = ["/bin/sh", "-c", pid, "sh", THINBLKD,
            "--chardev", f"socket,id=m0,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m0", *args]
    d = Daemon(argv, [qmp_sock], daemons.logdir, f"daemon{len(daemons.daemons)}", rundir,
               wait=False)
    daemons.daemons.append(d)
    return d


def every_kind_of_socket(rundir):
    """Arguments for an NBD server with an export and a vhost-user-blk export in rundir."""
    image(rundir / "disk.img", 1 << 20)
    return ["--blockdev", f"driver=file,node-name=f0,filename={rundir / 'disk.img'}",
            "--nbd-server", f"addr.type=unix,addr.path={rundir / 'nbd.sock'}",
            "--export", "type=nbd,id=e0,node-name=f0,name=disk0",
            "--export", f"type=vhost-user-blk,id=v0,node-name=f0,addr.type=unix,"
                        f"addr.path={rundir / 'vhost.sock'}"]


def connect_now(path):
    """Connect once, without waiting for a listener: refused or missing fails the test."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(path))
    return s


def test_ready_once_every_socket_listens(daemons, monkeypatch):
    rundir = daemons.rundir()
    manager = Manager(rundir)
    start(daemons, monkeypatch, manager.address, rundir, every_kind_of_socket(rundir))
    assert manager.receive() == ["READY=1", "STATUS=running"]
    with connect_now(rundir / "qmp.sock") as qmp:
        assert "QMP" in json.loads(qmp.recv(4096))
    with connect_now(rundir / "nbd.sock") as nbd:
        assert nbd.recv(8) == b"NBDMAGIC"
    connect_now(rundir / "vhost.sock").close()


def test_ready_on_an_abstract_socket(daemons, monkeypatch):
    rundir = daemons.rundir()
    manager = Manager(rundir, abstract=True)
    start(daemons, monkeypatch, manager.address, rundir)
    assert manager.receive() == ["READY=1", "STATUS=running"]
    connect_now(rundir / "qmp.sock").close()


def test_no_ready_when_a_socket_cannot_listen(daemons, monkeypatch):
    """A start that fails exits non-zero without READY=1 (systemd then marks it failed)."""
    rundir = daemons.rundir()
    manager = Manager(rundir)
    (rundir / "taken").write_text("not a socket")
    d = start(daemons, monkeypatch, manager.address, rundir,
              ["--nbd-server", f"addr.type=unix,addr.path={rundir / 'taken'}"])
    assert d.wait() == 1
    assert all("READY=1" not in msg for msg in manager.pending())


def test_status_follows_the_run_state(daemons, monkeypatch):
    rundir = daemons.rundir()
    manager = Manager(rundir)
    d = start(daemons, monkeypatch, manager.address, rundir)
    manager.wait_for("READY=1")
    qmp = d.negotiated()
    ok(qmp.cmd("stop"))
    assert manager.receive() == ["STATUS=paused"]
    ok(qmp.cmd("cont"))
    assert manager.receive() == ["STATUS=running"]


def test_stopping_on_sigterm(daemons, monkeypatch):
    rundir = daemons.rundir()
    manager = Manager(rundir)
    d = start(daemons, monkeypatch, manager.address, rundir)
    manager.wait_for("READY=1")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert ["STOPPING=1", "STATUS=shutdown"] in manager.pending()


def test_watchdog_pings_at_half_the_interval(daemons, monkeypatch):
    rundir = daemons.rundir()
    manager = Manager(rundir)
    start(daemons, monkeypatch, manager.address, rundir, watchdog_usec=200_000)
    manager.wait_for("READY=1")
    times = []
    for _ in range(5):
        assert manager.wait_for("WATCHDOG=1")[-1] == ["WATCHDOG=1"]
        times.append(time.monotonic())
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Every 100 ms: not a flood, and (with room for a loaded machine) well within 200 ms * 5.
    assert times[-1] - times[0] >= 0.3, gaps
    assert max(gaps) < 1.0, gaps


def test_watchdog_pings_when_watchdog_pid_is_unset(daemons, monkeypatch):
    rundir = daemons.rundir()
    manager = Manager(rundir)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    start(daemons, monkeypatch, manager.address, rundir, watchdog_usec=50_000,
          pid='exec "$@"')
    manager.wait_for("READY=1")
    manager.wait_for("WATCHDOG=1")


def test_no_watchdog_pings_for_another_pid(daemons, monkeypatch):
    """WATCHDOG_PID names the process the manager watches; another one must not ping."""
    rundir = daemons.rundir()
    manager = Manager(rundir)
    start(daemons, monkeypatch, manager.address, rundir, watchdog_usec=20_000,
          pid=AS_OTHER_PID)
    manager.wait_for("READY=1")
    assert manager.receive(0.5) is None   # 50 pings' worth, were they sent


def test_no_notify_socket(daemons, monkeypatch):
    """WATCHDOG_USEC without NOTIFY_SOCKET (nobody to ping) changes nothing."""
    rundir = daemons.rundir()
    d = start(daemons, monkeypatch, None, rundir, watchdog_usec=20_000)
    d.wait_for_sockets()
    assert d.negotiated().cmd("query-status")["return"]["status"] == "running"


def test_manager_gone(daemons, monkeypatch):
    """A NOTIFY_SOCKET nobody listens on is logged once and otherwise ignored."""
    rundir = daemons.rundir()
    d = start(daemons, monkeypatch, str(rundir / "nobody.sock"), rundir, watchdog_usec=20_000)
    d.wait_for_sockets()
    qmp = d.negotiated()
    ok(qmp.cmd("stop"))
    ok(qmp.cmd("cont"))
    assert d.stderr().count("cannot notify the service manager") == 1


def test_agent_ready_before_its_daemon_listens_and_stopping(daemons, monkeypatch):
    rundir = daemons.rundir()
    manager = Manager(rundir)
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    agent = subprocess.Popen([BUILD_DIR / "src" / "agent" / "thinblk-agent",
                              "-s", rundir / "nobody.sock"],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert manager.receive() == ["READY=1"]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(TIMEOUT) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        stderr = agent.communicate()[1].decode(errors="replace")
    assert manager.pending() == [["STOPPING=1"]], stderr
