"""Thin provisioning end to end, with a real guest: a QEMU TCG guest (tests/guest) writes far more
than the initial allocation to a qcow2 image that thinblkd serves over NBD (one test also over
vhost-user-blk) from a loop device.

The storage: a sparse backing file of INITIAL bytes, attached as a loop device; a 4 GiB qcow2
image made on the loop device with qemu-img. The qcow2 driver allocates clusters past the
device's end as the guest writes; the kernel fails those writes with ENOSPC and thinblkd stops
(BLOCK_IO_ERROR nospace, STOP). Extending is what management does: grow the backing file
(truncate) and tell the loop driver (losetup -c), then `cont`.

The guest's stream job writes MB MiB of random data one segment at a time, reads it back and
prints the digests; the test compares them with what the export holds, read through thinblkd
over NBD (libnbd), or for vhost-user-blk from the image itself (qemu-img convert -U). QEMU's own
stop-on-error is off (werror=report; a vhost-user-blk disk has no werror in QEMU, the guest
sees the device's status as is): an error that got through thinblkd would reach the guest, and
the tests check that none did.

- test_guest_test_extends: no agent; the test itself extends on every STOP (the qcow2-on-a-loop-
  device flow of issue 4 under a real guest).
- test_guest_agent_keeps_up: the agent runs from the start; no stop at all.
- test_guest_agent_started_late: the disk stops with nobody watching; the agent, started
  afterwards, finds it stopped, extends and resumes it, and keeps ahead from then on. Over NBD
  and over vhost-user-blk.
- test_guest_agent_restarted: the agent is stopped mid-run, the disk stops, a new agent resumes it.
- test_guest_daemon_restarted: thinblkd is restarted mid-run; QEMU's NBD client reconnects
  (reconnect-delay) and resends what was in flight, the agent reconnects and carries on.
- test_guest_daemon_restarted_while_stopped: thinblkd is restarted while stopped on ENOSPC (its
  parked write dropped, never answered); QEMU sends it again to the new daemon, which stops on
  it in turn; an agent started then resumes it.

Every test ends with `qemu-img check` of the image.

Needs root (loop devices), thinblk-agent (built with thinblkd; the agent tests fail without it), qemu-system-x86_64, qemu-img, python3-libnbd and the guest kit's
cache ($THINBLK_GUEST_CACHE, default ~/.cache/thinblk-guest; built on first use).
"""

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AGAINST_QEMU, BUILD_DIR, QMPClient, _die_with_parent, without_timestamp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402
import thin  # noqa: E402

try:
    import nbd  # noqa: F401
    HAVE_LIBNBD = True
except ImportError:
    HAVE_LIBNBD = False

pytestmark = [
    pytest.mark.skipif(kit.qemu_path() is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="makes loop devices: needs root"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
    pytest.mark.skipif(not HAVE_LIBNBD, reason="python3-libnbd is not installed"),
    pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd serving a guest over NBD"),
]

MIB = kit.MIB
VIRTUAL_SIZE = 4 << 30
INITIAL = 32 * MIB          # the backing file's size at the start
WRITE_MB = 192              # six times the initial allocation
SEG_MB = 16
CHUNK = 32 * MIB            # what one extension adds
# The agent's policy in these tests: small, so that it extends many times during one run.
AGENT_CHUNK, AGENT_WATERMARK = "32M", "32M"
AGENT = BUILD_DIR / "src" / "agent" / "thinblk-agent"
# TCG on a busy 2-CPU machine: generous. Every wait ends as soon as its condition holds.
GUEST_TIMEOUT = 600

RUNNING = {"status": "running", "singlestep": False, "running": True}


@pytest.fixture(scope="module")
def image():
    return kit.build_guest()


@pytest.fixture
def store(tmp_path):
    s = thin.LoopStore(tmp_path / "backing.img", INITIAL, VIRTUAL_SIZE)
    try:
        yield s
    finally:
        s.close()


class Disk:
    """thinblkd serving STORE's qcow2 image as the export "disk0" (device "disk0"), NBD or, with
    EXPORT "vhost-user-blk", vhost-user-blk; with a QMP monitor; restartable on the same
    sockets."""

    def __init__(self, daemons, store, export="nbd"):
        self.daemons, self.store, self.export = daemons, store, export
        self.rundir = daemons.rundir()
        self.qmp_sock = self.rundir / "qmp.sock"
        self.nbd_sock = self.rundir / "nbd.sock"
        self.vhost_sock = self.rundir / "vub.sock" if export == "vhost-user-blk" else None
        self.uri = f"nbd+unix:///disk0?socket={self.nbd_sock}"
        self.daemon = None

    def start(self):
        argv = thin.thinblkd_argv("thinblkd", self.store.dev, self.qmp_sock, self.nbd_sock,
                                  vhost_sock=self.vhost_sock)
        d = self.daemons.start_raw(argv[1:], sockets=[self.qmp_sock], rundir=self.rundir)
        # The socket file, not a connection: the vhost-user-blk export takes one frontend.
        sock = self.vhost_sock or self.nbd_sock
        kit.wait_until(lambda: self._export_ready(d, sock), 30, f"socket {sock}")
        self.daemon = d
        return d

    def _export_ready(self, d, sock):
        if not d.running():
            pytest.fail(f"thinblkd exited with {d.proc.returncode}:\n{d.stderr()}")
        try:
            return stat.S_ISSOCK(os.stat(sock).st_mode)
        except FileNotFoundError:
            return False

    def guest_disk(self):
        if self.vhost_sock:
            return kit.VhostUserBlkDisk(str(self.vhost_sock))
        # reconnect-delay: QEMU's NBD client waits for a restarted server instead of failing.
        return kit.NbdDisk(str(self.nbd_sock), "disk0", reconnect_delay=60)

    def stream_digest(self, mb, workdir):
        """The stream job's digest of what the export holds: read through thinblkd over NBD, or
        with no NBD export, from the image on the device by qemu-img beside the daemon."""
        if not self.vhost_sock:
            return kit.nbd_stream_digest(self.uri, mb, SEG_MB)
        read, close = kit.file_reader(kit.raw_copy(self.store.dev, "qcow2",
                                                   Path(workdir) / "export.raw"))
        try:
            return kit.digest_list(kit.stream_segment_digests(read, mb, SEG_MB))
        finally:
            close()

    def qmp(self):
        c = QMPClient(self.qmp_sock, timeout=60).negotiate()
        self.daemon.clients.append(c)
        return c

    def stop_daemon(self):
        """SIGTERM, as a service manager would; thinblkd must exit 0."""
        d = self.daemon
        for c in d.clients:
            c.close()
        d.clients = []
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.stderr()[-3000:]
        # Checked now (sockets removed, no sanitizer report), not at teardown, where a new
        # daemon on the same paths would be taken for its leftovers.
        assert d.shutdown() == []
        self.daemons.daemons.remove(d)


def qemu_img_check(dev, live):
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2"] + (["-U"] if live else []) + [dev],
                       capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture
def disk(daemons, store, request):
    """The Disk; NBD unless the test is parametrized (indirectly) with the export type."""
    d = Disk(daemons, store, getattr(request, "param", "nbd"))
    yield d
    # After a clean shutdown the image is exactly consistent: no error, no leak (clusters
    # the daemon reserved ahead or kept for a retry are given back at close).
    if d.daemon and d.daemon in daemons.daemons and d.daemon.running():
        d.stop_daemon()
    if d.daemon:
        rc, out = qemu_img_check(store.dev, live=False)
        assert rc == 0 and "leaked" not in out, out


def check_guest(g, disk, rc, mb=WRITE_MB):
    """The guest finished, saw no error, and the export holds what it wrote."""
    console = g.console
    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console[-3000:]}"
    assert "I/O error" not in console, g.dmesg
    assert not g.io_error, g.dmesg
    r = g.result()
    assert (r["job"], r["mb"], r["seg"], r["dd-status"], r["read-status"]) == \
        ("stream", mb, SEG_MB, 0, 0), r
    assert r["write-sha256"] == r["readback-sha256"], r
    written = [s["write-sha256"] for s in g.segments("SEG")]
    assert len(written) == mb // SEG_MB and kit.digest_list(written) == r["write-sha256"]
    assert disk.stream_digest(mb, g.workdir) == r["write-sha256"]
    assert g.status == 0
    # The image's metadata is sound (refcounts, L1/L2 tables), read beside the idle daemon.
    # A running daemon holds clusters reserved ahead (counted, not linked yet): they show as
    # leaked here and nothing else may (exit 3 is "leaked clusters", 2 would be corruption).
    # The fixture checks again after the daemon has shut down: no leak then.
    rc, out = qemu_img_check(disk.store.dev, live=True)
    assert rc == 0 or (rc == 3 and "ERROR" not in out and "corrupt" not in out.lower()), out
    return r


def event_names(events):
    return [e["event"] for e in events]


def test_guest_test_extends(image, store, disk, tmp_path, record_property):
    """No agent: the test is management. Every STOP is for ENOSPC on disk0; the test grows the
    loop device by CHUNK and sends cont; the guest never notices."""
    disk.start()
    qmp = disk.qmp()
    assert qmp.cmd("query-status") == {"return": RUNNING}
    stops = 0
    with kit.Guest(image, disk.guest_disk(), job="stream", mb=WRITE_MB, seg=SEG_MB,
                   workdir=tmp_path / "guest") as g:
        while g.running():
            try:
                ev = qmp.read_event(timeout=1)
            except TimeoutError:
                assert disk.daemon.running(), disk.daemon.stderr()[-3000:]
                continue
            ev = without_timestamp(ev)
            if ev["event"] == "BLOCK_IO_ERROR":
                assert ev["data"] == {"device": "disk0", "node-name": "disk0",
                                      "operation": "write", "action": "stop", "nospace": True,
                                      "reason": "No space left on device"}, ev
            elif ev["event"] == "STOP":
                stops += 1
                reason = qmp.cmd("__org.thinblk_query-stop-reason")["return"]
                assert reason["status"] == "io-error" and reason["io-error"]["nospace"], reason
                store.grow(CHUNK)
                assert qmp.cmd("cont") == {"return": {}}
            elif ev["event"] != "RESUME":
                pytest.fail(f"unexpected event {ev}")
        console, rc = g.wait(GUEST_TIMEOUT)
    print(f"guest ran {g.elapsed:.1f} s; {stops} stops; backing file {store.size() >> 20} MiB")
    record_property("stops", stops)
    check_guest(g, disk, rc)
    # Far more than the initial allocation was written, so it had to stop and be extended.
    assert stops >= (WRITE_MB * MIB - INITIAL) // CHUNK // 2, stops
    assert store.size() > WRITE_MB * MIB
    assert qmp.cmd("query-status") == {"return": RUNNING}


# ---- with thinblk-agent ---------------------------------------------------------------------

class Agent:
    """thinblk-agent watching DISK's daemon, its device disk0 with the test policy; its stderr in
    WORKDIR/agent-N.log. Stopped with SIGTERM (it must exit 0)."""

    def __init__(self, disk, workdir, n=0):
        if not os.access(AGENT, os.X_OK):
            pytest.fail(f"thinblk-agent not found at {AGENT}: build it (ninja -C {BUILD_DIR})")
        self.config = thin.write_agent_config(
            Path(workdir) / f"agent-{n}.conf", {"d0": disk.qmp_sock},
            [thin.AgentDisk("disk0", "d0", chunk=AGENT_CHUNK, watermark=AGENT_WATERMARK)],
            {"poll-interval": "1s"})
        self.log_path = Path(workdir) / f"agent-{n}.log"
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(thin.agent_argv(AGENT, self.config),
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         preexec_fn=_die_with_parent)

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def lines(self, pattern):
        return [line for line in self.log.splitlines() if re.search(pattern, line)]

    def wait_for(self, pattern, timeout=60, count=1):
        def seen():
            if self.proc.poll() is not None:
                pytest.fail(f"thinblk-agent exited with {self.proc.returncode}:\n{self.log}")
            return len(self.lines(pattern)) >= count
        kit.wait_until(seen, timeout, f"agent log line {pattern!r}:\n{self.log}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"thinblk-agent did not exit on SIGTERM:\n{self.log}")
            assert rc == 0, f"thinblk-agent exited with {rc}:\n{self.log}"


@pytest.fixture
def agents(tmp_path):
    """Starts agents (agents(disk)); every one still running is stopped after the test."""
    started = []

    def start(disk):
        a = Agent(disk, tmp_path, len(started))
        started.append(a)
        return a
    yield start
    for a in started:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


class EventWatch:
    """Reads thinblkd's events while the guest runs, through QMP (reconnecting after a daemon
    restart with reconnect()). Every event is kept in self.log, without its timestamp."""

    def __init__(self, disk, guest):
        self.disk, self.guest = disk, guest
        self.qmp = disk.qmp()
        self.log = []

    def reconnect(self):
        self.qmp = self.disk.qmp()

    def poll(self, timeout=1.0):
        """The next event, or None after TIMEOUT; fails if thinblkd died."""
        if self.qmp.events:     # set aside by a command while it waited for its reply
            ev = without_timestamp(self.qmp.events.pop(0))
            self.log.append(ev)
            return ev
        try:
            ev = without_timestamp(self.qmp.read_event(timeout=timeout))
        except TimeoutError:
            d = self.disk.daemon
            if not d.running():
                pytest.fail(f"thinblkd exited with {d.proc.returncode}:\n{d.stderr()[-3000:]}")
            return None
        self.log.append(ev)
        return ev

    def until(self, name, timeout=GUEST_TIMEOUT):
        """Reads events until one called NAME; fails if the guest exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.poll()
            if ev and ev["event"] == name:
                return ev
            if not self.guest.running():
                pytest.fail(f"the guest exited before {name}; events {self.log}\n"
                            f"{self.guest.console[-2000:]}")
        pytest.fail(f"no {name} within {timeout}s; events {self.log}")

    def drain_until_exit(self):
        while self.guest.running():
            self.poll()
        while self.poll(timeout=0.2):
            pass

    def names(self):
        return [e["event"] for e in self.log]


def guest_stream(image, disk, tmp_path):
    return kit.Guest(image, disk.guest_disk(), job="stream", mb=WRITE_MB, seg=SEG_MB,
                     workdir=tmp_path / "guest")


def test_guest_agent_keeps_up(image, store, disk, agents, tmp_path, record_property):
    """With the agent running from the start, the guest writes six times the initial
    allocation and the disk never stops: every extension comes before the space runs out."""
    disk.start()
    agent = agents(disk)
    agent.wait_for(r"write threshold at")
    with guest_stream(image, disk, tmp_path) as g:
        w = EventWatch(disk, g)
        w.drain_until_exit()
        console, rc = g.wait(GUEST_TIMEOUT)
    extended = agent.lines(r": extended ")
    print(f"guest ran {g.elapsed:.1f} s; {len(extended)} extensions; backing file "
          f"{store.size() >> 20} MiB; events {w.names()}")
    record_property("extensions", len(extended))
    check_guest(g, disk, rc)
    assert "STOP" not in w.names() and "BLOCK_IO_ERROR" not in w.names(), w.log
    assert w.qmp.cmd("query-status") == {"return": RUNNING}
    # Every byte beyond the initial allocation came from the agent, in several steps.
    assert store.size() > WRITE_MB * MIB, store.size()
    assert len(extended) >= 4, agent.log
    agent.stop()


@pytest.mark.parametrize("disk", ["nbd", "vhost-user-blk"], indirect=True)
def test_guest_agent_started_late(image, store, disk, agents, tmp_path, record_property):
    """Nobody watches: the disk runs out and stops, the guest is held. An agent started then
    finds the daemon stopped on ENOSPC, extends and resumes it, and keeps ahead from then on
    (one stop in all); the guest never notices."""
    disk.start()
    with guest_stream(image, disk, tmp_path) as g:
        w = EventWatch(disk, g)
        w.until("STOP")
        reason = w.qmp.cmd("__org.thinblk_query-stop-reason")["return"]
        assert (reason["status"], reason["io-error"]["device"], reason["io-error"]["nospace"]) \
            == ("io-error", "disk0", True), reason
        assert store.size() == INITIAL
        assert g.running() and not g.markers("RESULT")

        agent = agents(disk)
        w.until("RESUME")
        agent.wait_for(r"resuming \(cont\) after")
        w.drain_until_exit()
        console, rc = g.wait(GUEST_TIMEOUT)
    names = w.names()
    print(f"guest ran {g.elapsed:.1f} s; events {names}; backing file {store.size() >> 20} MiB")
    record_property("events", names)
    check_guest(g, disk, rc)
    # One stop, the one the agent found; it kept up from then on.
    assert names.count("STOP") == 1 and names.count("RESUME") == 1, names
    assert names.index("STOP") < names.index("RESUME")
    assert len(agent.lines(r"stopped on ENOSPC")) >= 1, agent.log
    assert store.size() > WRITE_MB * MIB
    agent.stop()


def test_guest_agent_restarted(image, store, disk, agents, tmp_path, record_property):
    """The agent is stopped while the guest writes; the disk runs out and stops; a second agent
    finds it stopped and resumes it. Nothing is lost on the way."""
    disk.start()
    first = agents(disk)
    first.wait_for(r"write threshold at")
    with guest_stream(image, disk, tmp_path) as g:
        w = EventWatch(disk, g)
        g.wait_for_segments(3, GUEST_TIMEOUT)
        first.stop()
        w.until("STOP")
        assert g.running() and not g.markers("RESULT")
        second = agents(disk)
        w.until("RESUME")
        w.drain_until_exit()
        console, rc = g.wait(GUEST_TIMEOUT)
    names = w.names()
    print(f"guest ran {g.elapsed:.1f} s; events {names}")
    record_property("events", names)
    check_guest(g, disk, rc)
    assert names.count("STOP") == 1 and names.count("RESUME") == 1, names
    assert second.lines(r": extended "), second.log
    second.stop()


def test_guest_daemon_restarted(image, store, disk, agents, tmp_path, record_property):
    """thinblkd is stopped (SIGTERM) and started again on the same image and sockets while the
    guest writes through it. QEMU's NBD client reconnects within its reconnect-delay and sends
    again what had no reply; the agent reconnects and keeps extending."""
    disk.start()
    agent = agents(disk)
    agent.wait_for(r"write threshold at")
    with guest_stream(image, disk, tmp_path) as g:
        w = EventWatch(disk, g)
        g.wait_for_segments(4, GUEST_TIMEOUT)
        disk.stop_daemon()
        disk.start()
        w.reconnect()
        agent.wait_for(r"connected to .* again")
        w.drain_until_exit()
        console, rc = g.wait(GUEST_TIMEOUT)
    print(f"guest ran {g.elapsed:.1f} s; events (both daemons) {w.names()}; "
          f"{len(agent.lines(': extended '))} extensions")
    record_property("events", w.names())
    check_guest(g, disk, rc)
    # A stop is possible (the guest may outrun the agent while it reconnects), but none is left.
    assert w.names().count("STOP") == w.names().count("RESUME"), w.names()
    assert store.size() > WRITE_MB * MIB
    # Extended after the restart too (the guest wrote most of its data after it).
    text = agent.log
    assert ": extended " in text[text.index(" again"):], text
    agent.stop()


def test_guest_daemon_restarted_while_stopped(image, store, disk, agents, tmp_path,
                                              record_property):
    """thinblkd stopped on ENOSPC is restarted: the parked write is dropped unanswered (nothing
    reached the image for it), QEMU's NBD client sends it again to the new daemon, which runs
    out in turn and stops. The agent, started then, finds that stop and resumes it."""
    disk.start()
    with guest_stream(image, disk, tmp_path) as g:
        w = EventWatch(disk, g)
        w.until("STOP")
        held = len(g.segments())
        disk.stop_daemon()
        assert g.running() and not g.markers("RESULT")
        disk.start()
        w.reconnect()

        def stopped_again():
            status = w.qmp.cmd("query-status")["return"]["status"]
            assert status in ("running", "io-error"), status
            return status == "io-error"
        kit.wait_until(stopped_again, GUEST_TIMEOUT, "the restarted thinblkd to stop")
        reason = w.qmp.cmd("__org.thinblk_query-stop-reason")["return"]["io-error"]
        assert (reason["device"], reason["nospace"], reason["operation"]) == \
            ("disk0", True, "write"), reason
        assert len(g.segments()) == held and not g.markers("RESULT")

        agent = agents(disk)
        agent.wait_for(r"resuming \(cont\) after")
        w.drain_until_exit()
        console, rc = g.wait(GUEST_TIMEOUT)
    names = w.names()
    print(f"guest ran {g.elapsed:.1f} s; events (both daemons) {names}")
    record_property("events", names)
    check_guest(g, disk, rc)
    # One stop per daemon; the agent resumed the second.
    assert names.count("STOP") == 2 and names.count("RESUME") == 1, names
    assert names.index("RESUME") > len(names) - 1 - names[::-1].index("STOP"), names
    assert store.size() > WRITE_MB * MIB
    agent.stop()
