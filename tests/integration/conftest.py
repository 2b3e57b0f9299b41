"""Shared helpers of the QMP integration tests: finding thinblkd, running it, talking QMP.

Environment:
  THINBLK_BUILD              build directory holding src/daemon/thinblkd (default: the
                             source tree's build/)
  THINBLK_TEST_AGAINST_QEMU  "1": run the protocol tests against qemu-system-x86_64 -M none
                             (the reference) instead of thinblkd; thinblk-only tests skip
  THINBLK_TEST_TIMEOUT       seconds any single wait may take (default 20)

Nothing here sleeps to synchronise: a wait is for a condition (a socket file, a connect that
succeeds, a message, EOF, a process exit) up to a deadline.
"""

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SOURCE_DIR = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("THINBLK_BUILD", str(SOURCE_DIR / "build")))


def sanitized_build():
    """Whether BUILD_DIR is a sanitizer build (test.sh's second pass)."""
    options = json.loads((BUILD_DIR / "meson-info" / "intro-buildoptions.json").read_text())
    return any(o["name"] == "b_sanitize" and o["value"] != "none" for o in options)
THINBLKD = BUILD_DIR / "src" / "daemon" / "thinblkd"
AGAINST_QEMU = os.environ.get("THINBLK_TEST_AGAINST_QEMU", "") == "1"
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
TIMEOUT = float(os.environ.get("THINBLK_TEST_TIMEOUT", "20"))

# The commands thinblkd has (and QEMU too).
COMMANDS = ["qmp_capabilities", "query-status", "stop", "cont", "quit", "query-version",
            "query-commands", "block-set-write-threshold"]

RUNNING = {"status": "running", "singlestep": False, "running": True}
PAUSED = {"status": "paused", "singlestep": False, "running": False}
PRELAUNCH = {"status": "prelaunch", "singlestep": False, "running": False}

thinblk_only = pytest.mark.skipif(AGAINST_QEMU, reason="thinblk-specific behaviour, "
                                  "not something QEMU has")


def generic_error(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


def command_not_found(desc):
    return {"error": {"class": "CommandNotFound", "desc": desc}}


@contextlib.contextmanager
def recursion_limit(limit):
    """json and == recurse once per nesting level; the depth-limit tests nest past 1000."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


# ---- comparing messages -------------------------------------------------------------------

VERSION_PLACEHOLDER = {"qemu": {"major": "<int>", "minor": "<int>", "micro": "<int>"},
                       "package": "<str>"}


def _is_version(obj):
    return (isinstance(obj, dict) and set(obj) == {"qemu", "package"}
            and isinstance(obj["package"], str) and isinstance(obj["qemu"], dict)
            and set(obj["qemu"]) == {"major", "minor", "micro"}
            and all(type(v) is int and v >= 0 for v in obj["qemu"].values()))


def _is_timestamp(obj):
    return (isinstance(obj, dict) and set(obj) == {"seconds", "microseconds"}
            and all(type(v) is int for v in obj.values())
            and obj["seconds"] >= 0 and 0 <= obj["microseconds"] < 1000000)


# thinblk's downstream members of events (docs/qmp.md, "Event journal"): every event's number,
# and the count of BLOCK_IO_ERRORs a coalesced one replaced; QEMU sends neither. The journal's
# tests (test_event_journal.py) check them; the others compare events without them.
EVENT_SEQ = "__org.thinblk_seq"
EVENT_SUPPRESSED = "__org.thinblk_suppressed"


def _without_downstream(event):
    """The event without thinblk's downstream members (after checking their shape)."""
    if EVENT_SEQ in event:
        seq = event[EVENT_SEQ]
        assert type(seq) is int and seq >= 1, f"bad {EVENT_SEQ} in {event!r}"
    if EVENT_SUPPRESSED in event:
        k = event[EVENT_SUPPRESSED]
        assert type(k) is int and k >= 1 and event.get("event") == "BLOCK_IO_ERROR", \
            f"bad {EVENT_SUPPRESSED} in {event!r}"
    return {k: v for k, v in event.items() if k not in (EVENT_SEQ, EVENT_SUPPRESSED)}


def normalize(obj):
    """The message with what may differ between runs and servers replaced by placeholders:
    an event's timestamp values and a version object's numbers and package (QEMU's
    VersionInfo), and without thinblk's downstream event members. Only well-formed ones are
    replaced, so a malformed one still mismatches."""
    if isinstance(obj, list):
        return [normalize(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _is_version(obj):
        return VERSION_PLACEHOLDER
    out = {k: normalize(v) for k, v in obj.items()}
    if "event" in obj and _is_timestamp(obj.get("timestamp")):
        out["timestamp"] = "<timestamp>"
        out = _without_downstream(out)
    return out


def without_timestamp(event):
    """The event without its timestamp and thinblk's downstream members (its number, a
    coalesced BLOCK_IO_ERROR's count), after checking their exact shape; their values are
    checked by test_event_journal.py."""
    assert isinstance(event, dict) and "event" in event, f"not an event: {event!r}"
    assert _is_timestamp(event.get("timestamp")), f"bad timestamp in {event!r}"
    return _without_downstream({k: v for k, v in event.items() if k != "timestamp"})


def assert_event(msg, name, data=None):
    expected = {"event": name}
    if data is not None:
        expected["data"] = data
    assert without_timestamp(msg) == expected


# ---- the QMP client -----------------------------------------------------------------------

_NO_ID = object()


class QMPClient:
    """One connection to a monitor socket.

    Messages are read one at a time: a compact monitor ends each with "\\r\\n"; a pretty one
    (pretty=True) spreads it over lines and ends it with a line holding only "}".
    read_message() raises EOFError at end of stream and TimeoutError past the timeout.
    """

    def __init__(self, path, timeout=TIMEOUT, pretty=False, greeting=True):
        self.path = str(path)
        self.timeout = timeout
        self.pretty = pretty
        self.buf = bytearray()
        self.events = []          # events seen by cmd() before its reply
        self.eof = False
        self.sock = self._connect()
        self.greeting = self.read_message() if greeting else None

    def _connect(self):
        deadline = time.monotonic() + self.timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nobody listening on {self.path}")
                time.sleep(0.01)   # polling interval while waiting for the listener

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- sending

    def send(self, data):
        """Send raw bytes (str is UTF-8 encoded)."""
        if isinstance(data, str):
            data = data.encode()
        # QEMU lexes 250-350 KB/s when the machine is idle, far less under load: allow big
        # messages their time (a hung peer is still caught, only later).
        self.sock.settimeout(max(self.timeout, len(data) / 25e3))
        self.sock.sendall(data)

    def send_json(self, obj):
        self.send(json.dumps(obj).encode() + b"\n")

    def execute(self, name, arguments=None, id=_NO_ID, oob=False):
        msg = {"exec-oob" if oob else "execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        if id is not _NO_ID:
            msg["id"] = id
        self.send_json(msg)

    # -- receiving

    def _frame_end(self):
        if self.pretty:
            if self.buf.startswith(b"}\r\n"):
                return 3
            i = self.buf.find(b"\r\n}\r\n")
            return -1 if i < 0 else i + 5
        i = self.buf.find(b"\r\n")
        return -1 if i < 0 else i + 2

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete message within {self.timeout}s; "
                               f"buffered: {bytes(self.buf[:200])!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise TimeoutError(f"no complete message within {self.timeout}s; "
                               f"buffered: {bytes(self.buf[:200])!r}") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        self.buf += data

    def read_raw(self, timeout=None):
        """The bytes of the next message, terminator included."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            end = self._frame_end()
            if end >= 0:
                raw = bytes(self.buf[:end])
                del self.buf[:end]
                return raw
            if self.eof:
                raise EOFError(f"connection closed; unterminated bytes: "
                               f"{bytes(self.buf[:200])!r}")
            self._fill(deadline)

    def read_message(self, timeout=None):
        raw = self.read_raw(timeout)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise AssertionError(f"not JSON: {raw[:300]!r}: {e}") from None

    def read_event(self, timeout=None):
        msg = self.read_message(timeout)
        assert "event" in msg, f"expected an event, got {msg!r}"
        return msg

    def read_until_eof(self, timeout=None):
        """Everything left until the peer closes: (complete raw messages, trailing bytes)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        messages = []
        while True:
            end = self._frame_end()
            if end >= 0:
                messages.append(bytes(self.buf[:end]))
                del self.buf[:end]
                continue
            if self.eof:
                rest = bytes(self.buf)
                self.buf.clear()
                return messages, rest
            self._fill(deadline)

    def expect_eof(self, timeout=None):
        """Assert that nothing more comes before the connection is closed."""
        messages, rest = self.read_until_eof(timeout)
        assert messages == [] and rest == b"", f"expected EOF, got {messages!r} {rest!r}"

    # -- commands

    def negotiate(self, enable=None):
        self.execute("qmp_capabilities", None if enable is None else {"enable": enable})
        assert self.read_message() == {"return": {}}
        return self

    def cmd(self, name, arguments=None, id=_NO_ID):
        """Run a command; return its reply. Events that arrive first go to self.events."""
        self.execute(name, arguments, id)
        return self.reply()

    def reply(self):
        while True:
            msg = self.read_message()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def wait_event(self, name, timeout=None):
        """The first event called name: from those cmd() set aside, else the next to come
        (others that come first are set aside too). TimeoutError past the timeout."""
        for i, e in enumerate(self.events):
            if e["event"] == name:
                return self.events.pop(i)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event; saw {self.events}")
            e = self.read_event(left)
            if e["event"] == name:
                return e
            self.events.append(e)

    def take_events(self):
        events, self.events = self.events, []
        return events


# ---- the daemon ---------------------------------------------------------------------------

def _die_with_parent():
    """In the child before exec: get SIGKILL if the test run dies without cleaning up."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _sanitizer_reports(text):
    return [line for line in text.splitlines()
            if "ERROR: AddressSanitizer" in line or "ERROR: LeakSanitizer" in line
            or "runtime error:" in line]


class Daemon:
    """A running thinblkd (or, with THINBLK_TEST_AGAINST_QEMU=1, qemu-system-x86_64 -M none).

    argv is complete; sockets are the monitor socket paths it must create; its stdout and
    stderr go to files in logdir. Sockets live in a short private directory under /tmp since
    a Unix socket path is limited to 108 bytes.
    """

    def __init__(self, argv, sockets, logdir, name, rundir, wait=True):
        self.argv = [str(a) for a in argv]
        self.sockets = [str(s) for s in sockets]
        self.rundir = rundir
        self.clients = []
        self.stdout_path = Path(logdir) / f"{name}.stdout"
        self.stderr_path = Path(logdir) / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        if wait:
            self.wait_for_sockets()

    def __repr__(self):
        return f"Daemon({' '.join(self.argv)})"

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def wait_for_sockets(self):
        deadline = time.monotonic() + TIMEOUT
        for path in self.sockets:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"{self.argv[0]} exited with status {self.proc.returncode} "
                                f"before creating {path}; stderr:\n{self.stderr()}")
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        break
                except FileNotFoundError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{path} not created within {TIMEOUT}s")
                time.sleep(0.01)   # polling interval while waiting for the socket file

    def client(self, index=0, **kwargs):
        """A new connection to monitor socket `index`, greeting read."""
        c = QMPClient(self.sockets[index], **kwargs)
        self.clients.append(c)
        return c

    def negotiated(self, index=0, **kwargs):
        return self.client(index, **kwargs).negotiate()

    def running(self):
        return self.proc.poll() is None

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=TIMEOUT):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.argv[0]} still running after {timeout}s")

    def leftover_sockets(self):
        return [p for p in self.sockets if os.path.lexists(p)]

    def kill(self, also=()):
        """kill -9, then remove the sockets it (necessarily) left behind, and `also`'s."""
        self.signal(signal.SIGKILL)
        self.proc.wait()
        for path in [*self.leftover_sockets(), *also]:
            if os.path.lexists(path):
                os.unlink(path)

    def vm_rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")

    def shutdown(self):
        """Stop it with SIGTERM (if still running) and return what went wrong, if anything."""
        problems = []
        for c in self.clients:
            c.close()
        if self.running():
            self.signal(signal.SIGTERM)
            try:
                status = self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                problems.append(f"did not exit within {TIMEOUT}s of SIGTERM")
            else:
                if AGAINST_QEMU and status == -signal.SIGTERM:
                    # QEMU's monitor thread greets clients before its main thread has
                    # installed the signal handlers: a quick test can kill it outright.
                    return []
                if status != 0:
                    problems.append(f"exit status {status} after SIGTERM")
        left = self.leftover_sockets()
        if left:
            problems.append(f"sockets left behind: {left}")
        reports = _sanitizer_reports(self.stderr())
        if reports:
            problems.append("sanitizer reports:\n" + "\n".join(reports[:20]))
        return problems


class DaemonFactory:
    """Starts daemons for a test and shuts them down after it, failing the test if one does
    not exit 0 on SIGTERM, leaves a socket behind or printed a sanitizer report."""

    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.daemons = []
        self.rundirs = []

    def binary(self):
        if AGAINST_QEMU:
            path = shutil.which(QEMU)
            if path is None:
                pytest.fail(f"THINBLK_TEST_AGAINST_QEMU=1 but {QEMU} is not installed")
            return path
        if not os.access(THINBLKD, os.X_OK):
            pytest.fail(f"thinblkd not found at {THINBLKD}: build it first "
                        f"(meson setup build && ninja -C build) or set THINBLK_BUILD")
        return str(THINBLKD)

    def rundir(self):
        """A new short private directory, removed at cleanup."""
        path = Path(tempfile.mkdtemp(prefix="thinblk-test-", dir="/tmp"))
        self.rundirs.append(path)
        return path

    def start_raw(self, args, sockets=(), wait=True, rundir=None):
        """thinblkd (or QEMU) with exactly these arguments."""
        d = Daemon([self.binary(), *args], sockets, self.logdir, f"daemon{len(self.daemons)}",
                   rundir or self.rundir(), wait=False)
        self.daemons.append(d)
        if wait:
            d.wait_for_sockets()
        return d

    def start(self, monitors=1, args=(), pretty=(), monitor_options=""):
        """A daemon with `monitors` monitor sockets (mon0.sock, mon1.sock, ... in its rundir),
        the monitors whose index is in `pretty` pretty-printing, `monitor_options` appended to
        every --monitor, and extra `args`."""
        rundir = self.rundir()
        sockets = [rundir / f"mon{i}.sock" for i in range(monitors)]
        argv = []
        if AGAINST_QEMU:
            argv += ["-M", "none", "-nodefaults", "-display", "none"]
        for i, path in enumerate(sockets):
            chardev = f"socket,id=m{i},path={path},server=on,wait=off"
            opts = f"chardev=m{i}" + (",pretty=on" if i in pretty else "") + monitor_options
            if AGAINST_QEMU:
                argv += ["-chardev", chardev, "-mon", opts + ",mode=control"]
            else:
                argv += ["--chardev", chardev, "--monitor", opts]
        argv += list(args)
        return self.start_raw(argv, sockets, rundir=rundir)

    def start_with_clients(self, count, args=(), negotiate=True):
        """A daemon and `count` clients connected at the same time. thinblkd serves them on
        one socket; QEMU serves one client per monitor, so it gets one monitor each."""
        d = self.start(monitors=count if AGAINST_QEMU else 1, args=args)
        clients = [d.client(i if AGAINST_QEMU else 0) for i in range(count)]
        if negotiate:
            for c in clients:
                c.negotiate()
        return d, clients

    def cleanup(self):
        problems = []
        for d in self.daemons:
            problems += [f"{d!r}: {p}" for p in d.shutdown()]
        for path in self.rundirs:
            shutil.rmtree(path, ignore_errors=True)
        self.daemons, self.rundirs = [], []
        return problems


@pytest.fixture
def daemons(tmp_path):
    factory = DaemonFactory(tmp_path)
    yield factory
    problems = factory.cleanup()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def daemon(daemons):
    """A daemon with one monitor socket."""
    return daemons.start()


@pytest.fixture
def qmp(daemon):
    """A negotiated client of `daemon`."""
    return daemon.negotiated()


# ---- small helpers of QMP tests ----

def ok(reply):
    assert reply == {"return": {}}, reply


def error(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


def image(path, size):
    """A sparse file of size bytes at path (returned)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path
