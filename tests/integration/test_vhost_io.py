"""thinblk-vhost-io, our vhost-user-blk frontend, against two real backends.

Every test runs against thinblkd's vhost-user-blk export and against qemu-storage-daemon's
(the peer), each over a raw file: what is checked is what any correct backend must do, and
qemu-storage-daemon's known quirks are marked as such (xfail on its rows only).

Every wait is for a condition (the socket file, a process exit), up to conftest's TIMEOUT.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BUILD_DIR, THINBLKD, TIMEOUT, _die_with_parent

VHOST_IO = BUILD_DIR / "src" / "vhost-io" / "thinblk-vhost-io"
QSD = shutil.which("qemu-storage-daemon")
MiB = 1 << 20



class Backend:
    """thinblkd or qemu-storage-daemon exporting one raw image over vhost-user-blk."""

    def __init__(self, server, rundir, image, num_queues=1, writable=True, discard=True):
        self.server = server
        self.image = image
        self.sock = str(rundir / "vhost.sock")
        blockdev = f"driver=file,node-name=f0,filename={image}"
        if discard:
            blockdev += ",discard=unmap"
        export = (f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                  f"addr.path={self.sock},writable={'on' if writable else 'off'},"
                  f"num-queues={num_queues}")
        self.stderr_path = rundir / f"{server}.stderr"
        binary = QSD if server == "qsd" else str(THINBLKD)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([binary, "--blockdev", blockdev, "--export", export],
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         preexec_fn=_die_with_parent)
        self._wait_for_socket()

    def _wait_for_socket(self):
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.server} exited with {self.proc.returncode}: "
                            f"{self.stderr_path.read_text(errors='replace')}")
            try:
                if stat.S_ISSOCK(os.stat(self.sock).st_mode):
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{self.sock} not created within {TIMEOUT}s")
            time.sleep(0.01)   # polling interval while waiting for the socket file

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def rundir():
    # Unix socket paths are limited to 108 bytes: a short directory of our own under /tmp.
    path = Path(tempfile.mkdtemp(prefix="thinblk-vio-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["thinblkd", "qsd"])
def server(request):
    if request.param == "qsd" and QSD is None:
        pytest.skip("qemu-storage-daemon is not installed")
    return request.param


@pytest.fixture
def backend(rundir, server):
    """A factory: backend(size=..., num_queues=...) starts the server on a new sparse image;
    all are stopped at the end."""
    started = []

    def start(size=64 * MiB, num_queues=1, writable=True, data=None):
        image = rundir / f"disk{len(started)}.raw"
        with open(image, "wb") as f:
            if data is not None:
                f.write(data)
            f.truncate(size)
        b = Backend(server, rundir, image, num_queues=num_queues, writable=writable)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


def vio(backend, *args, check=True, timeout=TIMEOUT * 3):
    if not VHOST_IO.exists():
        pytest.fail(f"{VHOST_IO} not found: build it first or set THINBLK_BUILD")
    argv = [str(VHOST_IO), "-s", backend.sock, "-T", str(TIMEOUT), *map(str, args)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    for line in r.stderr.splitlines():
        assert "runtime error:" not in line and "Sanitizer" not in line, r.stderr
    if check and r.returncode != 0:
        pytest.fail(f"{argv} exited {r.returncode}: {r.stderr}")
    return r


def info(backend):
    out = vio(backend, "info").stdout
    return dict(line.split(": ", 1) for line in out.splitlines())


def image_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def allocated(path, offset, length):
    """Whether any byte of the range is data (not a hole), by SEEK_DATA."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = os.lseek(fd, offset, os.SEEK_DATA)
        return pos < offset + length
    except OSError:   # ENXIO: no data after offset
        return False
    finally:
        os.close(fd)


# ---- negotiation and config ---------------------------------------------------------------

def test_info_reports_config(backend):
    b = backend(size=32 * MiB, num_queues=2)
    i = info(b)
    assert i["capacity"] == f"{32 * MiB // 512} sectors ({32 * MiB} bytes)"
    assert i["num-queues"] == "2"
    assert i["max-queues"] == "2"
    assert "VERSION_1" in i["features"].split()
    assert i["read-only"] == "no"


def test_info_read_only_export(backend):
    b = backend(writable=False)
    assert info(b)["read-only"] == "yes"
    r = vio(b, "-l", "4k", "write", check=False)
    assert r.returncode == 1
    assert "write of 4096 bytes at 0 failed: IOERR" in r.stderr


def test_no_event_idx_is_not_negotiated(backend):
    b = backend()
    out = vio(b, "--no-event-idx", "--no-indirect", "info").stdout
    features = next(l for l in out.splitlines() if l.startswith("features:")).split()
    assert "RING_EVENT_IDX" not in features and "RING_INDIRECT_DESC" not in features


# ---- data path -----------------------------------------------------------------------------

@pytest.mark.parametrize("queues,depth", [(1, 1), (1, 32), (2, 1), (2, 32)])
@pytest.mark.parametrize("ring", ["event-idx", "no-event-idx", "indirect"])
def test_write_then_read_back(backend, queues, depth, ring):
    b = backend(num_queues=2)
    ring_args = {"event-idx": [], "no-event-idx": ["--no-event-idx"],
                 "indirect": ["--indirect"]}[ring]
    common = [*ring_args, "-q", queues, "-d", depth, "-b", "4k", "-o", 3 * MiB, "-l", 2 * MiB]
    vio(b, *common, "-P", 0x5a, "write")
    vio(b, *common, "-P", 0x5a, "verify")
    # The neighbours are untouched.
    vio(b, "-o", 3 * MiB - 4096, "-l", 4096, "-P", 0, "verify")
    vio(b, "-o", 5 * MiB, "-l", 4096, "-P", 0, "verify")
    b.stop()
    assert image_bytes(b.image, 3 * MiB, 2 * MiB) == b"\x5a" * (2 * MiB)
    assert image_bytes(b.image, 3 * MiB - 4096, 4096) == bytes(4096)
    assert image_bytes(b.image, 5 * MiB, 4096) == bytes(4096)


def test_verify_reports_the_first_mismatch(backend):
    b = backend()
    vio(b, "-l", "1M", "-P", 0x11, "write")
    vio(b, "-o", 4096 + 7, "-l", 1, "-P", 0x22, "write", check=False)  # not sector aligned
    vio(b, "-o", 8192, "-l", 512, "-P", 0x22, "write")
    r = vio(b, "-l", "1M", "-P", 0x11, "verify", check=False)
    assert r.returncode == 1
    assert "mismatch at offset 8192: 0x22, expected 0x11" in r.stderr


def test_read_output_matches_image(backend, rundir):
    data = os.urandom(3 * MiB)
    b = backend(size=8 * MiB, data=data)
    out = rundir / "read.bin"
    vio(b, "-q", "1", "-d", "8", "-o", MiB, "-l", 2 * MiB, "--output", out, "read")
    assert out.read_bytes() == data[MiB:3 * MiB]
    b.stop()
    subprocess.run(["cmp", "-n", str(2 * MiB), "-i", f"{MiB}:0", str(b.image), str(out)],
                   check=True)


def test_written_data_seen_by_qemu_img(backend, rundir):
    b = backend(size=16 * MiB)
    vio(b, "-d", "32", "-q", "1", "-b", "64k", "-o", 4 * MiB, "-l", 4 * MiB, "-P", 0xa7,
        "write")
    b.stop()
    expected = rundir / "expected.raw"
    with open(expected, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(b"\xa7" * (4 * MiB))
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(b.image),
                    str(expected)], check=True, capture_output=True)


def test_range_past_the_end_is_refused(backend):
    b = backend(size=8 * MiB)
    r = vio(b, "-o", 8 * MiB - 4096, "-l", 8192, "read", check=False)
    assert r.returncode == 2
    assert "past the end of the disk" in r.stderr


# ---- discard, write-zeroes, flush, get-id --------------------------------------------------

def test_discard_punches_a_hole(backend):
    b = backend(size=16 * MiB)
    vio(b, "-o", 4 * MiB, "-l", 4 * MiB, "-P", 1, "write")
    vio(b, "flush")
    assert allocated(b.image, 4 * MiB, 4 * MiB)
    vio(b, "-o", 4 * MiB, "-l", 4 * MiB, "discard")
    assert not allocated(b.image, 4 * MiB, 4 * MiB)
    vio(b, "-o", 4 * MiB, "-l", 4 * MiB, "-P", 0, "verify")


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(backend, unmap):
    b = backend(size=16 * MiB)
    vio(b, "-l", 8 * MiB, "-P", 0x33, "write")
    vio(b, "-o", 2 * MiB, "-l", 4 * MiB, *(["--unmap"] if unmap else []), "write-zeroes")
    vio(b, "-o", 2 * MiB, "-l", 4 * MiB, "-P", 0, "verify")
    vio(b, "-l", 2 * MiB, "-P", 0x33, "verify")
    vio(b, "-o", 6 * MiB, "-l", 2 * MiB, "-P", 0x33, "verify")
    b.stop()
    assert image_bytes(b.image, 2 * MiB, 4 * MiB) == bytes(4 * MiB)


def test_get_id(backend):
    b = backend()
    ident = vio(b, "get-id").stdout.rstrip("\n")
    assert 0 < len(ident) <= 20
    # thinblkd answers the export id; qemu-storage-daemon a fixed string.
    assert ident == ("e0" if b.server == "thinblkd" else "vhost_user_blk")


def test_flush(backend):
    b = backend()
    vio(b, "-l", "64k", "write")
    assert vio(b, "flush").returncode == 0


# ---- bench ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["-q", "1", "-d", "1"],
    ["-q", "2", "-d", "32", "--random"],
    ["-q", "2", "-d", "32", "--random", "-w", "--no-event-idx"],
    ["-q", "1", "-d", "16", "-w", "--indirect", "-b", "64k"],
])
def test_bench_json_line(backend, args):
    b = backend(size=32 * MiB, num_queues=2)
    out = vio(b, *args, "-t", "0.3", "bench").stdout.splitlines()
    assert len(out) == 2 and "IOPS" in out[0]
    result = json.loads(out[1])
    assert result["requests"] > 0 and result["errors"] == 0
    assert result["queues"] == int(args[1]) and result["depth"] == int(args[3])
    assert result["iops"] > 0 and result["mbps"] > 0


# ---- malformed requests and messages (the raw API) -----------------------------------------

PROBES_OK = ["valid", "indirect-valid"]
# Requests no correct device may complete with VIRTIO_BLK_S_OK.
PROBES_BAD = ["data-outside-memory", "data-straddles-end", "desc-loop", "next-out-of-range",
              "head-out-of-range", "short-header", "readonly-status", "no-status",
              "readonly-data", "zero-length-data", "indirect-too-long", "indirect-nested",
              "indirect-bad-len", "indirect-loop", "sector-past-end", "unknown-type"]
# What qemu-storage-daemon 7.2 (libvhost-user) lets through: it completes these with OK.
QSD_LENIENT = {"readonly-data", "indirect-too-long", "indirect-nested"}


def probe(backend, case):
    r = vio(backend, "-T", "2", "probe", case)
    return json.loads(r.stdout)


def test_probe_list_names_every_case(backend):
    b = backend()
    names = set(vio(b, "probe", "list").stdout.split())
    assert set(PROBES_OK) | set(PROBES_BAD) <= names


@pytest.mark.parametrize("case", PROBES_OK)
def test_probe_valid_requests_complete(backend, case):
    b = backend()
    result = probe(b, case)
    assert result["completed"] and result["status"] == 0 and not result["hung_up"]
    assert result["used_len"] == 513   # 512 bytes of data and the status byte


@pytest.mark.parametrize("case", PROBES_BAD)
def test_probe_malformed_request_is_not_ok(backend, server, case, request):
    if server == "qsd" and case in QSD_LENIENT:
        request.applymarker(pytest.mark.xfail(strict=True,
                                              reason="qemu-storage-daemon 7.2 accepts it"))
    b = backend()
    vio(b, "-l", "4k", "-P", 0x77, "write")
    result = probe(b, case)
    assert result["status"] != 0
    if case == "sector-past-end":
        assert result["completed"] and result["status"] == 1      # IOERR
    if case == "unknown-type":
        assert result["completed"] and result["status"] == 2      # UNSUPP
    # The backend survives and the data is intact, on a new connection.
    vio(b, "-l", "4k", "-P", 0x77, "verify")


@pytest.mark.parametrize("case", ["msg-unknown-request", "msg-bad-version",
                                  "msg-vring-index-out-of-range",
                                  "msg-vring-num-not-power-of-two", "msg-oversized",
                                  "msg-mem-table-no-fd"])
def test_probe_malformed_message_leaves_backend_usable(backend, server, case, request):
    if server == "qsd" and case == "msg-vring-index-out-of-range":
        # Seen: qemu-storage-daemon 7.2 hangs up and then refuses every new connection (once,
        # with num-queues=2, it acked the message instead), so not strict.
        request.applymarker(pytest.mark.xfail(reason="qemu-storage-daemon 7.2 stops "
                                              "accepting connections"))
    b = backend()
    result = json.loads(vio(b, "-T", "1", "probe", case).stdout)
    assert result["case"] == case
    vio(b, "-l", "4k", "-P", 0, "verify")


# ---- the command line ----------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["bogus"], "Unknown mode 'bogus'"),
    (["-P", "256", "write"], "Invalid pattern '256'"),
    (["-q", "0", "read"], "Invalid number of queues '0'"),
    ([], "No mode given"),
    (["probe"], "probe needs one CASE"),
])
def test_usage_errors(args, message):
    r = subprocess.run([str(VHOST_IO), "-s", "/nonexistent", *args], capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 2
    assert message in r.stderr


def test_connection_failure(rundir):
    r = subprocess.run([str(VHOST_IO), "-s", str(rundir / "nope.sock"), "info"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 3
    assert "Failed to connect" in r.stderr


def test_too_many_queues(backend):
    b = backend(num_queues=1)
    r = vio(b, "-q", "2", "-l", "4k", "read", check=False)
    assert r.returncode == 3
    assert "fewer than 2 queues" in r.stderr
