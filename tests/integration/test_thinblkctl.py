"""Integration tests of thinblkctl against real QMP servers.

Each test runs thinblkctl as a program and checks its exact output and exit status. The
servers are QEMU (qemu-system-x86_64 -M none, the reference) and thinblkd, when it has been
built; a few tests use a scripted fake server to produce failures real servers do not.

Environment: THINBLK_BUILD, the build directory (default: the tree's build), holding
src/ctl/thinblkctl and src/daemon/thinblkd.
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from conftest import BUILD_DIR

BUILD = str(BUILD_DIR)
CTL = os.path.join(BUILD, "src", "ctl", "thinblkctl")
THINBLKD = os.path.join(BUILD, "src", "daemon", "thinblkd")
QEMU = shutil.which("qemu-system-x86_64")

START_TIMEOUT = 20  # seconds for a server to start listening
RUN_TIMEOUT = 30    # seconds any thinblkctl run may take before the test fails

QUERY_STATUS_READABLE = '{\n  "status": "running",\n  "singlestep": false,\n  "running": true\n}\n'
EVENT_LINE = re.compile(r"^\d+\.\d{6} (\S+)( .*)?$")

pytestmark = pytest.mark.skipif(not os.access(CTL, os.X_OK), reason=f"{CTL} not built")


# ---- servers ------------------------------------------------------------------------------


def listening(path, kind):
    """Whether the server listens on the Unix socket path, checked without connecting: QEMU
    takes a probe connection for its monitor's one client, and a client that connects while
    QEMU is still dropping the probe can wait behind it (CI once saw 30 s). thinblkd binds a
    temporary name and renames it to path once it listens; QEMU binds path itself, so its
    listening state is read from /proc/net/unix."""
    if kind == "thinblkd":
        try:
            return stat.S_ISSOCK(os.stat(path).st_mode)
        except FileNotFoundError:
            return False
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split(None, 7)
            # Num RefCount Protocol Flags Type St Inode Path; Flags has __SO_ACCEPTCON.
            if len(fields) == 8 and fields[7].rstrip("\n") == path \
                    and int(fields[3], 16) & 0x10000:
                return True
    return False


def wait_for_socket(path, kind, proc):
    """Wait until the server listens on path, or fail at the deadline."""
    deadline = time.monotonic() + START_TIMEOUT
    while not listening(path, kind):
        if proc.poll() is not None:
            pytest.fail(f"server exited with status {proc.returncode} before listening")
        if time.monotonic() > deadline:
            pytest.fail(f"server did not listen on {path} within {START_TIMEOUT}s")
        time.sleep(0.01)   # polling interval while the server starts


class Server:
    """A QMP server with two monitors: sock for commands, events_sock for a client that
    follows events meanwhile (QEMU serves one client per monitor at a time)."""

    def __init__(self, kind, tmp_path, pretty=False):
        self.kind = kind
        self.sock = str(tmp_path / "qmp.sock")
        self.events_sock = str(tmp_path / "qmp-events.sock")
        if kind == "qemu":
            mode = "mode=control,pretty=on" if pretty else "mode=control"
            argv = [QEMU, "-M", "none", "-nographic", "-display", "none",
                    "-chardev", f"socket,id=m0,path={self.sock},server=on,wait=off",
                    "-mon", f"chardev=m0,{mode}",
                    "-qmp", f"unix:{self.events_sock},server=on,wait=off"]
        else:
            argv = [THINBLKD,
                    "--chardev", f"socket,id=m0,path={self.sock},server=on,wait=off",
                    "--monitor", "chardev=m0",
                    "--chardev", f"socket,id=m1,path={self.events_sock},server=on,wait=off",
                    "--monitor", "chardev=m1"]
        self.log = open(tmp_path / f"{kind}.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        try:
            wait_for_socket(self.sock, kind, self.proc)
            wait_for_socket(self.events_sock, kind, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(params=["qemu", "thinblkd"])
def server(request, tmp_path):
    if request.param == "qemu" and not QEMU:
        pytest.skip("qemu-system-x86_64 not installed")
    if request.param == "thinblkd" and not os.access(THINBLKD, os.X_OK):
        pytest.skip(f"{THINBLKD} not built")
    srv = Server(request.param, tmp_path)
    yield srv
    srv.stop()


@pytest.fixture
def pretty_qemu(tmp_path):
    if not QEMU:
        pytest.skip("qemu-system-x86_64 not installed")
    srv = Server("qemu", tmp_path, pretty=True)
    yield srv
    srv.stop()


class FakeServer:
    """Serves one connection on a Unix socket with script(conn), in a thread."""

    def __init__(self, tmp_path, script):
        self.path = str(tmp_path / "fake.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.script = script
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            self.script(conn)

    def close(self):
        self.listener.close()
        self.thread.join(timeout=10)


GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
            b'"package": ""}, "capabilities": []}}\r\n')


def read_command(conn):
    """One command from the client (it sends one per line)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


@pytest.fixture
def fake_server(tmp_path):
    servers = []

    def start(script):
        srv = FakeServer(tmp_path, script)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


# ---- running thinblkctl -------------------------------------------------------------------


def ctl_env(**extra):
    env = dict(os.environ)
    env.pop("THINBLK_SOCKET", None)
    env.update(extra)
    return env


def ctl(*args, env=None):
    """Run thinblkctl; returns (exit status, stdout, stderr)."""
    p = subprocess.run([CTL, *args], capture_output=True, timeout=RUN_TIMEOUT,
                       env=env or ctl_env(), stdin=subprocess.DEVNULL)
    # Decoded by hand: text=True would turn a pretty monitor's "\r\n" into "\n".
    return p.returncode, p.stdout.decode(), p.stderr.decode()


class Follower:
    """thinblkctl -v events ... running in the background. start() returns once it has
    negotiated (its trace shows the reply), so events from then on reach it."""

    def __init__(self, sock, *args):
        self.proc = subprocess.Popen([CTL, "-s", sock, "-v", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=ctl_env())
        self.stderr = b""

    def wait_negotiated(self):
        deadline = time.monotonic() + RUN_TIMEOUT
        fd = self.proc.stderr.fileno()
        while True:
            for line in self.stderr.decode(errors="replace").splitlines():
                if line.startswith("<- ") and '"return"' in line:
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"thinblkctl events did not negotiate in time: {self.stderr!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    pytest.fail(f"thinblkctl events exited early: {self.stderr!r}")
                self.stderr += chunk

    def finish(self):
        """Wait for exit; returns (exit status, stdout, stderr without the trace)."""
        out, err = self.proc.communicate(timeout=RUN_TIMEOUT)
        err = (self.stderr + err).decode()
        err = "".join(l for l in err.splitlines(True) if not l.startswith(("<- ", "-> ")))
        return self.proc.returncode, out.decode(), err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def follow():
    followers = []

    def start(sock, *args):
        f = Follower(sock, *args)
        followers.append(f)
        f.wait_negotiated()
        return f

    yield start
    for f in followers:
        f.kill()


def raw_exchange(sock, commands):
    """Send commands (JSON texts) over a plain socket after the greeting and return the
    bytes of the last reply exactly as the server sent them (up to its closing brace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(RUN_TIMEOUT)
        s.connect(sock)
        buf = b""
        replies = []
        pending = list(commands)
        while True:
            text, buf = take_object(buf)
            if text is None:
                chunk = s.recv(65536)
                assert chunk, "server closed the connection"
                buf += chunk
                continue
            msg = json.loads(text)
            if "QMP" in msg or "return" in msg or "error" in msg:
                if "QMP" not in msg:
                    replies.append(text)
                if not pending:
                    return replies[-1]
                s.sendall(pending.pop(0).encode() + b"\n")


def take_object(buf):
    """Split the first top-level JSON object off buf: (text, rest), or (None, buf)."""
    depth, in_str, esc, start = 0, False, False, None
    for i, ch in enumerate(buf.decode("latin-1")):
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            start = i if start is None else start
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return buf[start:i + 1].decode(), buf[i + 1:]
    return None, buf


# ---- one command --------------------------------------------------------------------------


def test_query_status_readable(server):
    assert ctl("-s", server.sock, "query-status") == (0, QUERY_STATUS_READABLE, "")


def test_query_status_raw_is_the_reply_as_received(server):
    expected = raw_exchange(server.sock, ['{"execute":"qmp_capabilities","id":1}',
                                          '{"execute":"query-status","id":2}'])
    status, out, err = ctl("-s", server.sock, "--raw", "query-status")
    assert (status, out, err) == (0, expected + "\n", "")
    assert json.loads(out) == {"return": {"status": "running", "singlestep": False,
                                          "running": True}, "id": 2}


def test_query_status_pretty_is_the_whole_reply(server):
    assert ctl("-s", server.sock, "-p", "query-status") == (
        0, '{\n  "return": {\n    "status": "running",\n    "singlestep": false,\n'
           '    "running": true\n  },\n  "id": 2\n}\n', "")


def test_empty_return_prints_nothing(server):
    assert ctl("-s", server.sock, "stop") == (0, "", "")


def test_qmp_capabilities_only_negotiates(server):
    assert ctl("-s", server.sock, "qmp_capabilities") == (0, "", "")


def test_socket_from_environment(server):
    env = ctl_env(THINBLK_SOCKET=server.sock)
    assert ctl("query-status", env=env) == (0, QUERY_STATUS_READABLE, "")


def test_socket_option_overrides_environment(server, tmp_path):
    env = ctl_env(THINBLK_SOCKET=str(tmp_path / "nowhere.sock"))
    assert ctl("-s", server.sock, "query-status", env=env) == (0, QUERY_STATUS_READABLE, "")


# ---- arguments ----------------------------------------------------------------------------


def test_key_value_arguments(server):
    assert ctl("-s", server.sock, "block-set-write-threshold", "node-name=nope",
               "write-threshold=1048576") == (
        1, "", "thinblkctl: GenericError: Device 'nope' not found\n")


def test_key_value_integer_is_sent_as_integer(server):
    assert ctl("-s", server.sock, "block-set-write-threshold", "node-name=1",
               "write-threshold=5") == (
        1, "", "thinblkctl: GenericError: Invalid parameter type for 'node-name', "
               "expected: string\n")


def test_raw_json_forces_a_string(server):
    assert ctl("-s", server.sock, "block-set-write-threshold", 'node-name:="1"',
               "write-threshold:=5") == (
        1, "", "thinblkctl: GenericError: Device '1' not found\n")


def test_json_object_argument(server):
    assert ctl("-s", server.sock, "block-set-write-threshold",
               '{"node-name": "nope", "write-threshold": 5}') == (
        1, "", "thinblkctl: GenericError: Device 'nope' not found\n")


def test_json_object_argument_keeps_types(server):
    assert ctl("-s", server.sock, "block-set-write-threshold",
               '{"node-name": 1, "write-threshold": 5}') == (
        1, "", "thinblkctl: GenericError: Invalid parameter type for 'node-name', "
               "expected: string\n")


def test_missing_argument(server):
    assert ctl("-s", server.sock, "block-set-write-threshold") == (
        1, "", "thinblkctl: GenericError: Parameter 'node-name' is missing\n")


def test_unexpected_argument(server):
    assert ctl("-s", server.sock, "query-status", "bogus=1") == (
        1, "", "thinblkctl: GenericError: Parameter 'bogus' is unexpected\n")


# ---- errors -------------------------------------------------------------------------------


def test_unknown_command(server):
    assert ctl("-s", server.sock, "no-such-command") == (
        1, "", "thinblkctl: CommandNotFound: The command no-such-command has not been found\n")


def test_error_raw_prints_the_reply_too(server):
    expected = raw_exchange(server.sock, ['{"execute":"qmp_capabilities","id":1}',
                                          '{"execute":"no-such-command","id":2}'])
    assert ctl("-s", server.sock, "-r", "no-such-command") == (
        1, expected + "\n",
        "thinblkctl: CommandNotFound: The command no-such-command has not been found\n")


def test_no_socket_is_a_connection_failure(tmp_path):
    path = str(tmp_path / "none.sock")
    assert ctl("-s", path, "query-status") == (
        3, "", f"thinblkctl: Failed to connect to '{path}': No such file or directory\n")


def test_nobody_listening_is_a_connection_failure(tmp_path):
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
    assert ctl("-s", path, "query-status") == (
        3, "", f"thinblkctl: Failed to connect to '{path}': Connection refused\n")


def test_no_greeting_times_out(fake_server):
    done = threading.Event()
    srv = fake_server(lambda conn: done.wait(RUN_TIMEOUT))
    try:
        assert ctl("-s", srv.path, "-t", "0.2", "query-status") == (
            3, "", "thinblkctl: Timed out waiting for the QMP greeting\n")
    finally:
        done.set()


def test_timeout_zero_waits_as_long_as_it_takes(fake_server):
    """-t 0 lifts the default limit: thinblkctl still waits for a greeting that never comes
    when killed well after a short limit would have fired."""
    done = threading.Event()
    srv = fake_server(lambda conn: done.wait(RUN_TIMEOUT))
    p = subprocess.Popen([CTL, "-s", srv.path, "-t", "0", "query-status"], env=ctl_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=1)
    finally:
        p.kill()
        p.wait()
        done.set()


def test_socket_named_like_a_command_is_taken(fake_server, tmp_path):
    """Only a path that does not exist is taken for a misplaced command."""
    srv = fake_server(lambda conn: conn.sendall(b"hello\r\n"))
    os.symlink(srv.path, tmp_path / "query-status")
    p = subprocess.run([CTL, "-s", "query-status", "query-status"], cwd=tmp_path, env=ctl_env(),
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert (p.returncode, p.stderr) == (3, "thinblkctl: Unexpected byte 0x68 between QMP "
                                           "messages\n")


def test_eof_before_reply(fake_server):
    def script(conn):
        conn.sendall(GREETING)
        read_command(conn)
        conn.sendall(b'{"return": {}, "id": 1}\r\n')
        read_command(conn)

    srv = fake_server(script)
    assert ctl("-s", srv.path, "query-status") == (
        3, "", "thinblkctl: Connection closed by the server\n")


def test_eof_in_mid_reply(fake_server):
    def script(conn):
        conn.sendall(GREETING)
        read_command(conn)
        conn.sendall(b'{"return": {}, "id": 1}\r\n')
        read_command(conn)
        conn.sendall(b'{"return": {"status": ')

    srv = fake_server(script)
    assert ctl("-s", srv.path, "query-status") == (
        3, "", "thinblkctl: Connection closed by the server in the middle of a message\n")


def test_malformed_message(fake_server):
    srv = fake_server(lambda conn: conn.sendall(b"hello\r\n"))
    assert ctl("-s", srv.path, "query-status") == (
        3, "", "thinblkctl: Unexpected byte 0x68 between QMP messages\n")


def test_message_that_is_not_qmp(fake_server):
    srv = fake_server(lambda conn: conn.sendall(b'{"hello": 1}\r\n'))
    assert ctl("-s", srv.path, "query-status") == (
        3, "", 'thinblkctl: Unrecognised QMP message: {"hello": 1}\n')


# ---- usage --------------------------------------------------------------------------------

TRY_HELP = "Try 'thinblkctl --help' for more information.\n"


@pytest.mark.parametrize("args, message", [
    ([], "Missing COMMAND"),
    (["-x", "query-status"], "Invalid option '-x'"),
    (["--bogus", "query-status"], "Invalid option '--bogus'"),
    (["-t"], "Option '-t' needs an argument"),
    (["-t", "soon", "query-status"], "Invalid timeout 'soon': expected a number of seconds "
                                     "(0: no limit)"),
    (["-t", "-1", "query-status"], "Invalid timeout '-1': expected a number of seconds "
                                   "(0: no limit)"),
    (["-s", "query-status"], "-s expects a socket path; 'query-status' looks like a command"),
    (["-s", "cont", "query-status"], "-s expects a socket path; 'cont' looks like a command"),
    (["metrics", "x=1"], "metrics takes no arguments"),
    (["-r", "-p", "query-status"], "--raw and --pretty exclude each other"),
    (["--count", "1", "query-status"], "--count is only for events"),
    (["events", "--count", "0"], "Invalid count '0': expected a positive integer"),
    (["query-status", "disk0"], "Invalid argument 'disk0': expected KEY=VALUE, KEY:=JSON or "
                                "one JSON object"),
    (["x", "a=1", "a=2"], "Parameter 'a' is given twice"),
    (["x", "a=[1,"], "Parameter 'a': Invalid JSON '[1,': ']' expected near end of file"),
])
def test_usage_error(tmp_path, args, message):
    # The socket does not exist: usage is checked before connecting.
    sock = str(tmp_path / "none.sock")
    assert ctl("-s", sock, *args) == (2, "", f"thinblkctl: {message}\n{TRY_HELP}")


def test_no_socket_given():
    assert ctl("query-status") == (
        2, "", f"thinblkctl: No monitor socket: use --socket PATH or set THINBLK_SOCKET\n"
               f"{TRY_HELP}")


def test_help():
    status, out, err = ctl("--help")
    assert (status, err) == (0, "")
    assert out.startswith("Usage: thinblkctl [OPTIONS] COMMAND")
    assert "3 connection or protocol failure" in out


def test_version():
    status, out, err = ctl("-V")
    assert (status, err) == (0, "")
    assert re.fullmatch(r"thinblkctl \d+\.\d+\.\d+\n", out)


# ---- events -------------------------------------------------------------------------------


def event_lines(out):
    """The readable event lines as (name, rest); each must have a well-formed timestamp."""
    lines = out.splitlines()
    assert all(EVENT_LINE.match(line) for line in lines), out
    return [EVENT_LINE.match(line).groups() for line in lines]


def test_events_stop_then_cont(server, follow):
    f = follow(server.events_sock, "events", "--count", "2")
    assert ctl("-s", server.sock, "stop") == (0, "", "")
    assert ctl("-s", server.sock, "cont") == (0, "", "")
    status, out, err = f.finish()
    assert (status, err) == (0, "")
    assert event_lines(out) == [("STOP", None), ("RESUME", None)]


def test_events_filtered_by_name(server, follow):
    f = follow(server.events_sock, "events", "--count", "1", "RESUME")
    assert ctl("-s", server.sock, "stop") == (0, "", "")
    assert ctl("-s", server.sock, "cont") == (0, "", "")
    status, out, err = f.finish()
    assert (status, err) == (0, "")
    assert event_lines(out) == [("RESUME", None)]


def test_events_raw(server, follow):
    f = follow(server.events_sock, "--raw", "events", "-c", "1")
    assert ctl("-s", server.sock, "stop") == (0, "", "")
    status, out, err = f.finish()
    assert (status, err) == (0, "")
    assert out.endswith("\n") and out.count("\n") == 1
    event = json.loads(out)
    # thinblkd numbers its events (docs/qmp.md, "Event journal"); --raw passes it on.
    expected = {"event", "timestamp"} | ({"__org.thinblk_seq"} if server.kind == "thinblkd"
                                         else set())
    assert set(event) == expected and event["event"] == "STOP"
    assert set(event["timestamp"]) == {"seconds", "microseconds"}


def test_events_with_data_readable(server, follow):
    f = follow(server.events_sock, "events", "SHUTDOWN")
    assert ctl("-s", server.sock, "quit") == (0, "", "")
    status, out, err = f.finish()
    assert (status, err) == (0, "")
    assert event_lines(out) == [
        ("SHUTDOWN", ' {"guest":false,"reason":"host-qmp-quit"}')]


def test_events_end_when_server_closes(server, follow):
    f = follow(server.events_sock, "events", "NO_SUCH_EVENT")
    assert ctl("-s", server.sock, "quit") == (0, "", "")
    assert f.finish() == (0, "", "")


def test_events_timeout(server):
    assert ctl("-s", server.events_sock, "-t", "0.2", "events") == (
        3, "", "thinblkctl: Timed out waiting for an event\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_events_end_on_signal(server, follow, sig):
    f = follow(server.events_sock, "events")
    f.proc.send_signal(sig)
    assert f.finish() == (0, "", "")


# ---- a pretty-printing monitor ------------------------------------------------------------


def test_pretty_monitor_readable(pretty_qemu):
    assert ctl("-s", pretty_qemu.sock, "query-status") == (0, QUERY_STATUS_READABLE, "")


def test_pretty_monitor_raw_keeps_the_lines(pretty_qemu):
    assert ctl("-s", pretty_qemu.sock, "-r", "query-status") == (
        0, '{\r\n    "return": {\r\n        "status": "running",\r\n'
           '        "singlestep": false,\r\n        "running": true\r\n    },\r\n'
           '    "id": 2\r\n}\n', "")


def test_pretty_monitor_error(pretty_qemu):
    assert ctl("-s", pretty_qemu.sock, "block-set-write-threshold", "node-name=nope",
               "write-threshold=5") == (
        1, "", "thinblkctl: GenericError: Device 'nope' not found\n")
