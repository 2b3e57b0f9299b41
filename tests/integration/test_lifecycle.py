"""Start and end of thinblkd: quit, signals, bad command lines, --pidfile, --version, --help.

The pidfile follows qemu-storage-daemon(1): written as "PID\\n" once the monitor sockets
exist, locked so a second daemon with the same path fails, unlinked at exit. Unlike
qemu-storage-daemon, which leaves the socket files of a failed start behind, thinblkd must
remove them.
"""

import os
import re
import signal
import time

import pytest

from conftest import SOURCE_DIR, TIMEOUT, RUNNING, assert_event, thinblk_only

HOST_SIGNAL = {"guest": False, "reason": "host-signal"}
HOST_QMP_QUIT = {"guest": False, "reason": "host-qmp-quit"}


def test_quit(qmp, daemon):
    qmp.execute("quit")
    assert_event(qmp.read_message(), "SHUTDOWN", HOST_QMP_QUIT)
    assert qmp.read_message() == {"return": {}}
    qmp.expect_eof()
    assert daemon.wait() == 0
    assert daemon.leftover_sockets() == []


def test_quit_shutdown_event_reaches_every_negotiated_client(daemons):
    d, (a, b, c) = daemons.start_with_clients(3)
    assert a.cmd("quit") == {"return": {}}
    (event,) = a.take_events()
    assert_event(event, "SHUTDOWN", HOST_QMP_QUIT)
    for other in (b, c):
        assert_event(other.read_message(), "SHUTDOWN", HOST_QMP_QUIT)
        other.expect_eof()
    assert d.wait() == 0


def test_quit_with_id(qmp, daemon):
    assert qmp.cmd("quit", id="bye") == {"return": {}, "id": "bye"}
    assert daemon.wait() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_shuts_down(daemons, signum):
    """Every negotiated client, on every socket, gets SHUTDOWN host-signal; a client still
    negotiating gets nothing; then exit 0 with the sockets removed. (QEMU and
    qemu-storage-daemon treat SIGHUP like SIGTERM.)"""
    d, clients = daemons.start_with_clients(4, negotiate=False)
    negotiated, pending = clients[:3], clients[3]
    for c in negotiated:
        c.negotiate()
    d.signal(signum)
    for c in negotiated:
        assert_event(c.read_message(), "SHUTDOWN", HOST_SIGNAL)
        c.expect_eof()
    pending.expect_eof()
    assert d.wait() == 0
    assert d.leftover_sockets() == []


def test_signal_in_prelaunch(daemons):
    d = daemons.start(args=["-S"])
    c = d.negotiated()
    d.signal(signal.SIGTERM)
    assert_event(c.read_message(), "SHUTDOWN", HOST_SIGNAL)
    c.expect_eof()
    assert d.wait() == 0


@thinblk_only
def test_signal_reaches_clients_of_every_socket(daemons):
    d = daemons.start(monitors=2)
    a, b = d.negotiated(0), d.negotiated(1)
    d.signal(signal.SIGTERM)
    for c in (a, b):
        assert_event(c.read_message(), "SHUTDOWN", HOST_SIGNAL)
        c.expect_eof()
    assert d.wait() == 0
    assert d.leftover_sockets() == []


# ---- command line -------------------------------------------------------------------------

def run_thinblkd(daemons, *args):
    """Run thinblkd to completion; returns (status, stdout, stderr)."""
    d = daemons.start_raw(list(args), wait=False)
    status = d.wait()
    return status, d.stdout_path.read_text(), d.stderr()


@thinblk_only
@pytest.mark.parametrize("case", ["unknown-chardev", "unknown-option", "missing-argument",
                                  "monitor-without-chardev"])
def test_bad_command_line(daemons, case):
    rundir = daemons.rundir()
    sock = rundir / "qmp.sock"
    chardev = ["--chardev", f"socket,id=m0,path={sock},server=on,wait=off"]
    args, mentions = {
        "unknown-chardev": (chardev + ["--monitor", "chardev=m1"], "m1"),
        "unknown-option": (chardev + ["--monitor", "chardev=m0", "--bogus"], "bogus"),
        "missing-argument": (chardev + ["--monitor", "chardev=m0", "--pidfile"], "pidfile"),
        "monitor-without-chardev": (chardev + ["--monitor", "pretty=on"], "chardev"),
    }[case]
    d = daemons.start_raw(args, [sock], wait=False, rundir=rundir)
    assert d.wait() == 1
    stderr = d.stderr()
    assert mentions in stderr, stderr
    assert d.leftover_sockets() == []


@thinblk_only
def test_pidfile_written_when_sockets_exist(daemons):
    rundir = daemons.rundir()
    pidfile = rundir / "thinblkd.pid"
    sock = rundir / "qmp.sock"
    d = daemons.start_raw(["--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
                           "--monitor", "chardev=m0", "--pidfile", str(pidfile)],
                          [sock], wait=False, rundir=rundir)
    deadline = time.monotonic() + TIMEOUT
    while not (pidfile.exists() and pidfile.read_text()):
        assert d.running(), d.stderr()
        assert time.monotonic() < deadline, "pidfile not written"
        time.sleep(0.01)   # polling interval while waiting for the file
    assert os.path.exists(sock), "pidfile written before the monitor socket exists"
    assert pidfile.read_text() == f"{d.pid}\n"
    assert d.negotiated().cmd("query-status") == {"return": RUNNING}


@thinblk_only
def test_pidfile_removed_at_exit(daemons):
    rundir = daemons.rundir()
    pidfile = rundir / "thinblkd.pid"
    d = daemons.start_raw(["--qmp", str(rundir / "qmp.sock"), "--pidfile", str(pidfile)],
                          [rundir / "qmp.sock"], rundir=rundir)
    d.negotiated()
    assert pidfile.read_text() == f"{d.pid}\n"
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert not pidfile.exists()


@thinblk_only
def test_pidfile_locked_against_a_second_daemon(daemons):
    rundir = daemons.rundir()
    pidfile = rundir / "thinblkd.pid"
    first = daemons.start_raw(["--qmp", str(rundir / "a.sock"), "--pidfile", str(pidfile)],
                              [rundir / "a.sock"], rundir=rundir)
    first.negotiated()             # the pidfile is written before the socket accepts
    second = daemons.start_raw(["--qmp", str(rundir / "b.sock"), "--pidfile", str(pidfile)],
                               [rundir / "b.sock"], wait=False, rundir=rundir)
    assert second.wait() == 1
    assert "pid" in second.stderr().lower(), second.stderr()
    assert second.leftover_sockets() == []
    assert pidfile.read_text() == f"{first.pid}\n"
    assert first.clients[0].cmd("query-status") == {"return": RUNNING}


def meson_version():
    text = (SOURCE_DIR / "meson.build").read_text()
    return re.search(r"version\s*:\s*'([^']+)'", text).group(1)


@thinblk_only
@pytest.mark.parametrize("option", ["-V", "--version"])
def test_version_option(daemons, option):
    status, out, err = run_thinblkd(daemons, option)
    assert status == 0, err
    first = out.splitlines()[0] if out else ""
    assert "thinblkd" in first and re.search(rf"\b{re.escape(meson_version())}\b", first), out


@thinblk_only
def test_greeting_version_is_the_project_version(daemon):
    version = daemon.client().greeting["QMP"]["version"]
    major, minor, micro = (int(x) for x in meson_version().split("."))
    assert version == {"qemu": {"major": major, "minor": minor, "micro": micro},
                       "package": f"thinblk {meson_version()}"}


@thinblk_only
@pytest.mark.parametrize("option", ["-h", "--help"])
def test_help_option(daemons, option):
    status, out, err = run_thinblkd(daemons, option)
    assert status == 0, err
    for word in ("--chardev", "--monitor", "--qmp", "--pidfile"):
        assert word in out, out
