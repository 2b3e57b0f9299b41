"""The vhost-user-blk export (issue 12): QEMU as the frontend of a TCG guest, the QMP side
(block-export-add/-del, query-block-exports, qemu-storage-daemon 7.2's error texts), and the
vhost-user socket spoken to directly for what a guest cannot show (a second frontend, a bad
message, GET_VRING_BASE while stopped).

The guest tests need qemu-system-x86_64 and the guest kit's cache (tests/guest), the qcow2
ones qemu-img; the ENOSPC one needs root (it mounts a tmpfs).
"""

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AGAINST_QEMU, BUILD_DIR, error, image, ok, without_timestamp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402

pytestmark = pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd's vhost-user-blk export")

MIB = kit.MIB
GUEST_TIMEOUT = 300
needs_qemu = pytest.mark.skipif(kit.qemu_path() is None,
                                reason="qemu-system-x86_64 is not installed")


def wait_for_file_socket(path, daemon):
    """Waits for the socket file without connecting: the export takes one frontend at a time."""
    def ready():
        if not daemon.running():
            pytest.fail(f"thinblkd exited before creating {path}:\n{daemon.stderr()}")
        try:
            return stat.S_ISSOCK(os.stat(path).st_mode)
        except FileNotFoundError:
            return False
    kit.wait_until(ready, 30, f"socket {path}")


def start_export(daemons, img, extra="", num_queues=None, fmt="raw", discard=False):
    """thinblkd with a file node proto0 on img, a format node fmt0 (FMT) over it and a writable
    vhost-user-blk export disk0. DISCARD: discard=unmap on both nodes (deallocate)."""
    sockdir = daemons.rundir()
    vsock = sockdir / "vub.sock"
    export = (f"type=vhost-user-blk,id=disk0,node-name=fmt0,addr.type=unix,"
              f"addr.path={vsock},writable=on{extra}")
    if num_queues:
        export += f",num-queues={num_queues}"
    unmap = ",discard=unmap" if discard else ""
    d = daemons.start(args=["--blockdev", f"driver=file,node-name=proto0,filename={img}{unmap}",
                            "--blockdev", f"driver={fmt},node-name=fmt0,file=proto0{unmap}",
                            "--export", export])
    wait_for_file_socket(vsock, d)
    return d, vsock


def start_fault_export(daemons, img, vsock, rules=None):
    """thinblkd serving img through a fault filter "flt" (with rules, if any) on vsock."""
    d = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=proto0,filename={img}",
        "--blockdev", "driver=fault,node-name=flt,file=proto0",
        "--blockdev", "driver=raw,node-name=fmt0,file=flt",
        "--export", f"type=vhost-user-blk,id=disk0,node-name=fmt0,addr.type=unix,"
                    f"addr.path={vsock},writable=on"])
    wait_for_file_socket(vsock, d)
    if rules:
        ok(d.negotiated().cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": rules}))
    return d


# ---- a minimal vhost-user frontend, for the socket's own behaviour ----------------------------

GET_FEATURES, GET_VRING_BASE, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG = 1, 11, 15, 17, 24


class Frontend:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(str(path))

    def send(self, request, payload=b"", flags=1):
        self.s.sendall(struct.pack("<III", request, flags, len(payload)) + payload)

    def recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def call(self, request, payload=b""):
        self.send(request, payload)
        req, flags, size = struct.unpack("<III", self.recv_exact(12))
        assert (req, flags) == (request, 0x5), (req, flags)
        return self.recv_exact(size)

    def closed(self):
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.s.close()


def test_frontend_queries(daemons, tmp_path):
    _, vsock = start_export(daemons, image(tmp_path / "d.raw", 8 * MIB), num_queues=3)
    f = Frontend(vsock)
    features, = struct.unpack("<Q", f.call(GET_FEATURES))
    for bit in (32, 28, 29, 30, 9, 12, 13, 14):  # VERSION_1 INDIRECT EVENT_IDX PROTOCOL FLUSH MQ ..
        assert features & (1 << bit), hex(features)
    assert not features & (1 << 5)  # writable: no VIRTIO_BLK_F_RO
    proto, = struct.unpack("<Q", f.call(GET_PROTOCOL_FEATURES))
    assert proto & 0b1000001001 == 0b1000001001, hex(proto)  # MQ, REPLY_ACK, CONFIG
    assert struct.unpack("<Q", f.call(GET_QUEUE_NUM)) == (3,)
    cfg = f.call(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
    offset, size, _ = struct.unpack("<III", cfg[:12])
    assert (offset, size) == (0, 60)
    capacity, = struct.unpack("<Q", cfg[12:20])
    blk_size, = struct.unpack("<I", cfg[32:36])
    num_queues, = struct.unpack("<H", cfg[46:48])
    assert (capacity, blk_size, num_queues) == (8 * MIB // 512, 512, 3)
    f.close()


def test_second_frontend_refused(daemons, tmp_path):
    _, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    first = Frontend(vsock)
    assert len(first.call(GET_FEATURES)) == 8
    second = Frontend(vsock)
    assert second.closed()
    # The first one goes on; once it is gone, another may come.
    assert len(first.call(GET_FEATURES)) == 8
    first.close()

    def third_served():
        f = Frontend(vsock)
        try:
            return len(f.call(GET_FEATURES)) == 8
        except (EOFError, ConnectionResetError):
            return False
        finally:
            f.close()
    kit.wait_until(third_served, 10, "a new frontend after the first left")


@pytest.mark.parametrize("request_, payload", [
    (99, b""),                                   # unknown request
    (GET_QUEUE_NUM, b"\0" * 8),                  # payload of the wrong size
    (GET_VRING_BASE, struct.pack("<II", 7, 0)),  # no queue 7
    (GET_CONFIG, struct.pack("<III", 250, 60, 0) + bytes(60)),  # past the config space
], ids=["unknown", "wrong-size", "bad-queue", "config-range"])
def test_bad_message_closes_only_that_connection(daemons, tmp_path, request_, payload):
    d, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    f = Frontend(vsock)
    f.send(request_, payload)
    assert f.closed()
    f.close()
    assert d.running()
    kit.wait_until(lambda: Frontend(vsock).call(GET_QUEUE_NUM) == struct.pack("<Q", 1), 10,
                   "a new frontend")
    assert d.negotiated().cmd("query-status")["return"]["status"] == "running"


def test_get_vring_base_answered_while_stopped(daemons, tmp_path):
    d, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    qmp = d.negotiated()
    ok(qmp.cmd("stop"))
    f = Frontend(vsock)
    assert f.call(GET_VRING_BASE, struct.pack("<II", 0, 0)) == struct.pack("<II", 0, 0)
    f.close()


# ---- QMP ----------------------------------------------------------------------------------------

def test_block_export_add_query_del(daemons, tmp_path):
    img = image(tmp_path / "d.raw", 4 * MIB)
    qmp = daemons.start().negotiated()
    ok(qmp.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)}))
    vsock = daemons.rundir() / "v.sock"
    ok(qmp.cmd("block-export-add", {"type": "vhost-user-blk", "id": "vub0", "node-name": "f0",
                                    "addr": {"type": "unix", "path": str(vsock)},
                                    "writable": True, "num-queues": 2,
                                    "logical-block-size": 4096, "werror": "stop"}))
    assert stat.S_ISSOCK(os.stat(vsock).st_mode)
    assert qmp.cmd("query-block-exports") == {"return": [
        {"type": "vhost-user-blk", "id": "vub0", "node-name": "f0", "shutting-down": False}]}
    devices = [b["device"] for b in qmp.cmd("query-block")["return"]]
    assert "vub0" in devices
    assert qmp.cmd("block-export-add", {
        "type": "vhost-user-blk", "id": "vub0", "node-name": "f0",
        "addr": {"type": "unix", "path": str(vsock)}}) == error(
        "Block export id 'vub0' is already in use")
    ok(qmp.cmd("block-export-del", {"id": "vub0"}))
    ev = without_timestamp(qmp.wait_event("BLOCK_EXPORT_DELETED"))
    assert ev == {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "vub0"}}
    assert not vsock.exists()
    assert qmp.cmd("query-block-exports") == {"return": []}
    assert qmp.cmd("block-export-del", {"id": "vub0"}) == error("Export 'vub0' is not found")


def test_nbd_server_stop_keeps_vhost_user_exports(daemons, tmp_path):
    img = image(tmp_path / "d.raw", MIB)
    rundir = daemons.rundir()
    qmp = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={rundir}/nbd.sock",
        "--export", "type=nbd,id=n0,node-name=f0",
        "--export", f"type=vhost-user-blk,id=v0,node-name=f0,addr.type=unix,"
                    f"addr.path={rundir}/v.sock"]).negotiated()
    ok(qmp.cmd("nbd-server-stop"))
    assert [e["id"] for e in qmp.cmd("query-block-exports")["return"]] == ["v0"]


@pytest.mark.parametrize("extra, desc", [
    ({}, "Parameter 'addr' is missing"),
    ({"addr": {"type": "unix"}}, "Parameter 'addr.path' is missing"),
    ({"addr": {"type": "inet", "host": "127.0.0.1", "port": "1234"}},
     "Only socket address types 'unix' and 'fd' are supported"),
    ({"num-queues": 0}, "num-queues must be greater than 0"),
    ({"num-queues": 70000}, "Parameter 'num-queues' expects uint16_t"),
    ({"num-queues": -1}, "Parameter 'num-queues' expects uint16_t"),
    ({"logical-block-size": 1000},
     "Property e0.logical-block-size doesn't take value '1000', it's not a power of 2"),
    ({"logical-block-size": 256},
     "Property e0.logical-block-size doesn't take value 256 (minimum: 512, maximum: 2097152)"),
    ({"logical-block-size": 1 << 30}, "Property e0.logical-block-size doesn't take value "
                                      "1073741824 (minimum: 512, maximum: 2097152)"),
    ({"logical-block-size": -1},
     "Property e0.logical-block-size doesn't take value -1 (minimum: 512, maximum: 2097152)"),
    ({"name": "x"}, "Parameter 'name' is unexpected"),
    ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({"node-name": "nope"}, "Cannot find device='' nor node-name='nope'"),
    ({"addr": {"type": "unix", "path": "/nonexistent/v.sock"}},
     "Failed to bind socket to /nonexistent/v.sock: No such file or directory"),
], ids=["no-addr", "no-path", "inet", "zero-queues", "queues-range", "queues-negative",
        "lbs-not-power-of-2", "lbs-small", "lbs-large", "lbs-negative", "nbd-member", "unknown",
        "no-node", "bind"])
def test_block_export_add_errors(daemons, tmp_path, extra, desc):
    img = image(tmp_path / "d.raw", MIB)
    qmp = daemons.start(args=["--blockdev",
                              f"driver=file,node-name=f0,filename={img}"]).negotiated()
    args = {"type": "vhost-user-blk", "id": "e0", "node-name": "f0",
            "addr": {"type": "unix", "path": str(daemons.rundir() / "v.sock")}}
    if extra == {}:
        del args["addr"]
    args.update(extra)
    assert qmp.cmd("block-export-add", args) == error(desc)
    assert qmp.cmd("query-block-exports") == {"return": []}


def test_logical_block_size_zero_is_the_default(daemons, tmp_path):
    img = image(tmp_path / "d.raw", MIB)
    qmp = daemons.start(args=["--blockdev",
                              f"driver=file,node-name=f0,filename={img}"]).negotiated()
    vsock = daemons.rundir() / "v.sock"
    ok(qmp.cmd("block-export-add", {"type": "vhost-user-blk", "id": "e0", "node-name": "f0",
                                    "addr": {"type": "unix", "path": str(vsock)},
                                    "logical-block-size": 0}))
    cfg = Frontend(vsock).call(GET_CONFIG, struct.pack("<III", 20, 4, 0) + bytes(4))
    assert struct.unpack("<I", cfg[12:16]) == (512,)


# ---- a guest -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guest_image():
    return kit.build_guest()


needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="qemu-img is not installed")


def make_image(path, fmt, size):
    """An empty image of SIZE virtual bytes: a sparse raw file, or a thin qcow2 (qemu-img)."""
    if fmt == "raw":
        return image(path, size)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


def disk0_stats(qmp):
    stats = [s["stats"] for s in qmp.cmd("query-blockstats")["return"]
             if s.get("device") == "disk0"]
    assert len(stats) == 1, stats
    return stats[0]


def check_queues(g, queues):
    """The guest took interrupts on each of the QUEUES virtqueues: all of them carried I/O."""
    counts = g.queue_interrupts()
    assert sorted(counts) == [f"virtio0-req.{q}" for q in range(queues)], counts
    assert all(n > 0 for n in counts.values()), counts


def check_guest_wrote(g, console, rc, host_sha256):
    """The guest's write job ended well: QEMU exited 0, no I/O error in the guest, and three
    checksums agree (what it wrote, what it read back, the host's)."""
    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console}"
    assert "I/O error" not in console and not g.io_error, g.dmesg
    r = g.result()
    assert (r["dd-status"], r["read-status"]) == (0, 0), r
    assert r["write-sha256"] == r["readback-sha256"], r
    assert host_sha256 == r["write-sha256"]


@needs_qemu
def test_guest_writes_and_reads_back(guest_image, daemons, tmp_path):
    img = image(tmp_path / "disk.raw", 64 * MIB)
    d, vsock = start_export(daemons, img, num_queues=2)
    with kit.Guest(guest_image, kit.VhostUserBlkDisk(str(vsock), num_queues=2), job="write",
                   mb=8, off=4, seed=12, workdir=tmp_path / "guest") as g:
        console, rc = g.wait(timeout=GUEST_TIMEOUT)
    check_guest_wrote(g, console, rc, kit.file_sha256(img, 4 * MIB, 8 * MIB))
    with open(img, "rb") as f:
        f.seek(4 * MIB)
        assert f.read(MIB) == kit.pattern(1, 12, off=4)
    stats = d.negotiated().cmd("query-blockstats")["return"]
    disk0 = [s for s in stats if s.get("device") == "disk0"]
    assert disk0 and disk0[0]["stats"]["wr_bytes"] >= 8 * MIB, stats


@pytest.fixture
def store():
    """An 8 MiB tmpfs, unmounted after the test."""
    with kit.small_tmpfs("8M", "thinblk-vub") as mnt:
        yield mnt


EXPECTED_IO_ERROR = {"device": "disk0", "node-name": "fmt0", "operation": "write",
                     "action": "stop", "nospace": True, "reason": "No space left on device"}


def next_event(qmp, g, d, timeout=GUEST_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        if qmp.events:
            return without_timestamp(qmp.events.pop(0))
        try:
            msg = qmp.read_message(timeout=1)
        except TimeoutError:
            assert d.running(), d.stderr()
            assert g.running(), f"the guest finished while an event was awaited:\n{g.console}"
            assert time.monotonic() < deadline, "no event in time"
            continue
        assert "event" in msg, msg
        return without_timestamp(msg)


@needs_qemu
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
@pytest.mark.parametrize("fmt, queues", [
    ("raw", 1),
    # Two CPUs and two writers, one on each: requests of both queues are parked and retried.
    pytest.param("qcow2", 2, marks=needs_qemu_img),
], ids=["raw-1q", "qcow2-2q"])
def test_guest_write_survives_enospc(guest_image, store, daemons, tmp_path, fmt, queues):
    img = make_image(store / f"disk.{fmt}", fmt, 32 * MIB)
    d, vsock = start_export(daemons, img, fmt=fmt, num_queues=queues)
    qmp = d.negotiated()
    with kit.Guest(guest_image, kit.VhostUserBlkDisk(str(vsock), num_queues=queues),
                   job="write", mb=16, seed=3, par=queues, cpus=queues,
                   workdir=tmp_path / "guest") as g:
        # BLOCK_IO_ERROR (one or more), then one STOP; the guest is held, not failed.
        errors = 0
        while True:
            ev = next_event(qmp, g, d)
            if ev["event"] == "STOP":
                break
            assert ev == {"event": "BLOCK_IO_ERROR", "data": EXPECTED_IO_ERROR}, ev
            errors += 1
        assert errors >= 1
        assert qmp.cmd("query-status")["return"]["status"] == "io-error"
        block = [b for b in qmp.cmd("query-block")["return"] if b.get("device") == "disk0"]
        assert block[0]["io-status"] == "nospace", block
        assert g.running() and not g.markers("RESULT"), g.console

        kit.grow_tmpfs(store, "64M")
        ok(qmp.cmd("cont"))
        while True:
            ev = next_event(qmp, g, d)
            if ev["event"] == "RESUME":
                break
            assert ev == {"event": "BLOCK_IO_ERROR", "data": EXPECTED_IO_ERROR}, ev
        console, rc = g.wait(GUEST_TIMEOUT)
    check_guest_wrote(g, console, rc, kit.image_sha256(img, fmt, 0, 16 * MIB, tmp_path))
    check_queues(g, queues)
    assert qmp.cmd("query-status")["return"]["status"] == "running"
    # No new stop. BLOCK_IO_ERRORs of one device are coalesced per second (device.h): one
    # for failures before the stop may still go out at the end of its second, after RESUME.
    late = [without_timestamp(e) for e in qmp.take_events()]
    assert not [e for e in late if e["event"] == "STOP"], late
    assert [e for e in late if e["event"] == "BLOCK_IO_ERROR"] in (
        [], [{"event": "BLOCK_IO_ERROR", "data": EXPECTED_IO_ERROR}]), late


def has_data(fd, start, end):
    """True if [start, end) of the file holds data (SEEK_DATA), False if it is all hole."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < end
    except OSError as e:
        if e.errno == errno.ENXIO:      # no data from start to the end of the file
            return False
        raise


def qemu_img_map(img, fmt):
    out = subprocess.run(["qemu-img", "map", "-U", "-f", fmt, "--output=json", str(img)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@needs_qemu
@pytest.mark.parametrize("fmt", ["raw", pytest.param("qcow2", marks=needs_qemu_img)])
def test_guest_discard_and_write_zeroes_reach_the_image(guest_image, daemons, tmp_path, fmt):
    """The discard job (tests/guest/init): 8 MiB of pattern at 4 MiB, then of its four 2 MiB
    parts: 0 kept, 1 discarded (DISCARD), 2 zeroed (WRITE_ZEROES), 3 zeroed with unmap allowed
    (WRITE_ZEROES, UNMAP flag). With discard=unmap the image deallocates parts 1 and 3 and
    reads zeroes in 1 to 3; part 0 and the rest of the disk are untouched."""
    off, mb = 4 * MIB, 8
    part = mb * MIB // 4
    img = make_image(tmp_path / f"disk.{fmt}", fmt, 64 * MIB)
    d, vsock = start_export(daemons, img, fmt=fmt, discard=True)
    with kit.Guest(guest_image, kit.VhostUserBlkDisk(str(vsock)), job="discard", mb=mb,
                   off=off // MIB, seed=5, workdir=tmp_path / "guest") as g:
        console, rc = g.wait(timeout=GUEST_TIMEOUT)
    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console}"
    assert not g.io_error, g.dmesg
    r = g.result()
    assert (r["job"], r["dd-status"], r["discard-status"], r["zero-status"], r["punch-status"],
            r["read-status"]) == ("discard", 0, 0, 0, 0, 0), r
    # The guest's kernel sent DISCARD and WRITE_ZEROES (not zeroes it wrote itself).
    limits, = g.fields("LIMITS")
    assert limits["discard-max"] > 0 and limits["write-zeroes-max"] > 0, limits
    written = kit.pattern(mb, 5, off=off // MIB)
    expected = written[:part] + bytes(3 * part)
    assert r["write-sha256"] == hashlib.sha256(written).hexdigest(), r
    assert r["readback-sha256"] == hashlib.sha256(expected).hexdigest(), r

    raw = img if fmt == "raw" else kit.raw_copy(img, fmt, tmp_path / "copy.raw")
    with open(raw, "rb") as f:
        f.seek(off)
        assert f.read(4 * part) == expected
    assert kit.file_sha256(raw, 0, off) == hashlib.sha256(bytes(off)).hexdigest()
    assert kit.file_sha256(raw, off + 4 * part) == \
        hashlib.sha256(bytes(64 * MIB - off - 4 * part)).hexdigest()

    if fmt == "raw":
        # Deallocated: holes in the file where the guest discarded or allowed unmapping.
        with open(img, "rb") as f:
            fd = f.fileno()
            assert has_data(fd, off, off + part)
            for i in (1, 3):
                assert not has_data(fd, off + i * part, off + (i + 1) * part), i
        # Parts 0 and 2 at most (2 may be allocated, unwritten): the 8 MiB written were 4.
        assert os.stat(img).st_blocks * 512 < 3 * part, os.stat(img)
    else:
        m = qemu_img_map(img, fmt)
        start, end = off + part, off + 4 * part
        overlap = [e for e in m if e["start"] < end and e["start"] + e["length"] > start]
        assert overlap and all(e["zero"] and not e["data"] for e in overlap), m
        kept = [e for e in m if e["start"] < off + part and e["start"] + e["length"] > off]
        assert kept and all(e["data"] for e in kept), m

    stats = disk0_stats(d.negotiated())
    # Discards count as unmap; write-zeroes as writes (docs/qmp.md).
    assert stats["unmap_operations"] >= 1 and stats["unmap_bytes"] == part, stats
    assert stats["failed_unmap_operations"] == stats["failed_wr_operations"] == 0, stats
    assert stats["wr_bytes"] == mb * MIB + 2 * part, stats


# ---- a guest that breaks the ring, played by the test ------------------------------------------

SET_FEATURES, SET_OWNER, SET_MEM_TABLE, SET_VRING_NUM, SET_VRING_ADDR = 2, 3, 5, 8, 9
SET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 10, 12, 13, 14
QVA = 0x7f0000000000       # the "frontend's" address of guest physical 0
DESC, AVAIL, USED, DATA = 0x0, 0x1000, 0x2000, 0x3000
RING = 8


class FakeGuest:
    """One queue of RING entries in a 64 KiB memfd shared with thinblkd. `memory` is another
    FakeGuest whose memory (and so rings) this one takes over, as a frontend reconnecting;
    `before_start(frontend)` runs before the ring starts (SET_INFLIGHT_FD goes there)."""

    def __init__(self, path, event_idx=False, memory=None, before_start=None, base=0):
        import mmap
        if memory:
            self.fd, self.mem = memory.fd, memory.mem
        else:
            self.fd = os.memfd_create("vub-test")
            os.ftruncate(self.fd, 65536)
            self.mem = mmap.mmap(self.fd, 65536)
        self.f = Frontend(path)
        self.call, self.err, self.kick = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
        f = self.f
        if before_start:
            before_start(f)
        f.send(SET_OWNER)
        f.send(SET_FEATURES, struct.pack("<Q", 1 << 32 | 1 << 28 | (1 << 29 if event_idx else 0)))
        f.s.sendmsg([struct.pack("<III", SET_MEM_TABLE, 1, 40) +
                     struct.pack("<IIQQQQ", 1, 0, 0, 65536, QVA, 0)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<i", self.fd))])
        f.send(SET_VRING_NUM, struct.pack("<II", 0, RING))
        f.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, QVA + DESC, QVA + USED,
                                           QVA + AVAIL, 0))
        f.send(SET_VRING_BASE, struct.pack("<II", 0, base))
        for req, efd in ((SET_VRING_CALL, self.call), (SET_VRING_ERR, self.err),
                         (SET_VRING_KICK, self.kick)):
            f.s.sendmsg([struct.pack("<III", req, 1, 8) + struct.pack("<Q", 0)],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<i", efd))])
        self.avail_idx = memory.avail_idx if memory else 0

    def desc(self, i, addr, length, flags, nxt=0):
        struct.pack_into("<QIHH", self.mem, DESC + 16 * i, addr, length, flags, nxt)

    def lay_out_read(self, sector, header_len=16):
        """Descriptors 0-2: a VIRTIO_BLK_T_IN of one sector, header at DATA, data at
        DATA + 0x1000, the status byte (0xff until written) at DATA + 0x200."""
        struct.pack_into("<IIQ", self.mem, DATA, 0, 0, sector)
        self.mem[DATA + 0x200] = 0xff
        self.desc(0, DATA, header_len, 1, 1)
        self.desc(1, DATA + 0x1000, 512, 1 | 2, 2)
        self.desc(2, DATA + 0x200, 1, 2)

    def submit(self, head):
        struct.pack_into("<H", self.mem, AVAIL + 4 + 2 * (self.avail_idx % RING), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.mem, AVAIL + 2, self.avail_idx)
        os.eventfd_write(self.kick, 1)

    def used_idx(self):
        return struct.unpack_from("<H", self.mem, USED + 2)[0]

    def avail_event(self):
        """With EVENT_IDX: the avail index the device wants a kick for (past what it took)."""
        return struct.unpack_from("<H", self.mem, USED + 4 + 8 * RING)[0]

    def signalled(self, efd):
        try:
            return os.eventfd_read(efd) > 0
        except BlockingIOError:
            return False


@pytest.mark.parametrize("case", ["loop", "outside-memory", "head-past-ring"])
def test_broken_ring_is_stopped_not_followed(daemons, tmp_path, case):
    d, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    g = FakeGuest(vsock)
    if case == "loop":
        g.desc(0, DATA, 16, 1, 1)
        g.desc(1, DATA + 16, 16, 1, 0)
        g.submit(0)
    elif case == "outside-memory":
        g.desc(0, 1 << 40, 16, 0)
        g.submit(0)
    else:
        g.submit(RING + 3)
    kit.wait_until(lambda: g.signalled(g.err), 10, "the error eventfd")
    assert g.used_idx() == 0
    assert d.running()
    assert d.negotiated().cmd("query-status")["return"]["status"] == "running"


@pytest.mark.parametrize("cut", ["all", "request"])
def test_guest_memory_truncated_by_the_frontend(daemons, tmp_path, cut):
    """A frontend cuts its guest memory file short after SET_MEM_TABLE: touching the part gone
    raises SIGBUS, which must not kill the daemon and every export with it. Cut "all" takes
    the rings too (the daemon's first read of the avail ring faults); cut "request" keeps the
    rings and takes the request's pages (its header faults; the data buffer, which the kernel
    reads into, gives EFAULT). The daemon closes that frontend's connection and says why,
    and serves the next frontend. With rerror=stop too: the EFAULT is the frontend's memory,
    not the storage, and stopping would stop every export for one frontend's doing."""
    img = image(tmp_path / "d.raw", MIB)
    with open(img, "r+b") as f:
        f.write(b"\x5a" * 512)
    d, vsock = start_export(daemons, img, extra=",rerror=stop,werror=stop")
    qmp = d.negotiated()
    g = FakeGuest(vsock)
    # Messages are handled in order: the answer means the memory table is mapped and the ring
    # started (a file already short at SET_MEM_TABLE is refused there, not mapped), so the
    # request below is taken only at the kick, after the cut.
    assert len(g.f.call(GET_FEATURES)) == 8
    g.lay_out_read(0)
    struct.pack_into("<H", g.mem, AVAIL + 4, 0)
    struct.pack_into("<H", g.mem, AVAIL + 2, 1)
    g.mem.close()   # this process must not touch the part gone either
    os.ftruncate(g.fd, 0 if cut == "all" else DATA)
    os.eventfd_write(g.kick, 1)
    assert g.f.closed()
    assert d.running()
    assert "vhost-user-blk: disk0: guest memory shrank under the daemon (the frontend " \
        "truncated a memory region's file): closing the connection" in d.stderr()
    if cut == "request":
        # The read into the part gone failed with EFAULT, reported, not parked.
        kit.wait_until(lambda: disk0_stats(qmp)["failed_rd_operations"] == 1, 10,
                       "the failed read")
        ev = qmp.wait_event("BLOCK_IO_ERROR")
        assert without_timestamp(ev)["data"] == {
            "device": "disk0", "node-name": "fmt0", "operation": "read", "action": "report",
            "nospace": False, "reason": "Bad address"}, ev
    assert qmp.cmd("query-status")["return"]["status"] == "running"
    # A new frontend, whole memory: served.
    g2 = FakeGuest(vsock)
    g2.lay_out_read(0)
    g2.submit(0)
    kit.wait_until(lambda: g2.used_idx() == 1, 10, "the request's completion")
    assert g2.mem[DATA + 0x200] == 0
    assert g2.mem[DATA + 0x1000:DATA + 0x1200] == b"\x5a" * 512


@pytest.mark.parametrize("sector, header_len, status", [
    (0, 16, 0),               # a good read of one sector
    (MIB // 512, 16, 1),      # past the end: IOERR
    (0, 8, 1),                # short header: IOERR
], ids=["ok", "past-end", "short-header"])
def test_request_status(daemons, tmp_path, sector, header_len, status):
    _, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    g = FakeGuest(vsock)
    g.lay_out_read(sector, header_len)
    g.submit(0)
    kit.wait_until(lambda: g.used_idx() == 1, 10, "the request's completion")
    assert g.mem[DATA + 0x200] == status
    assert g.signalled(g.call)
    assert not g.signalled(g.err)


def test_get_vring_base_waits_for_requests_in_flight(daemons, tmp_path):
    """The frontend restarts the ring at the base answered: a request taken before must be on
    the used ring first, or the guest would never see it complete."""
    img = image(tmp_path / "d.raw", MIB)
    vsock = daemons.rundir() / "vub.sock"
    d = start_fault_export(daemons, img, vsock, rules=[{"op": "write", "delay-ms": 2000}])
    g = FakeGuest(vsock, event_idx=True)
    struct.pack_into("<IIQ", g.mem, DATA, 1, 0, 0)   # VIRTIO_BLK_T_OUT at sector 0
    g.mem[DATA + 0x1000:DATA + 0x1200] = b"\x5a" * 512
    g.mem[DATA + 0x200] = 0xff
    g.desc(0, DATA, 16, 1, 1)
    g.desc(1, DATA + 0x1000, 512, 1, 2)
    g.desc(2, DATA + 0x200, 1, 2)
    g.submit(0)
    kit.wait_until(lambda: g.avail_event() == 1, 10, "thinblkd taking the request")
    assert g.used_idx() == 0                          # held 2 s by the fault rule

    assert g.f.call(GET_VRING_BASE, struct.pack("<II", 0, 0)) == struct.pack("<II", 0, 1)
    assert g.used_idx() == 1                          # completed before the answer
    assert g.mem[DATA + 0x200] == 0                   # VIRTIO_BLK_S_OK
    with open(img, "rb") as f:
        assert f.read(512) == b"\x5a" * 512
    assert d.running()


# ---- requests of many segments, served in place (vectored block requests) -----------------

VHOST_IO = BUILD_DIR / "src" / "vhost-io" / "thinblk-vhost-io"


def start_vectored(daemons, tmp_path, fmt, direct, data):
    """thinblkd exporting data (bytes) as a raw or qcow2 image over a file node, with
    cache.direct on or off. Returns the daemon, the socket and the image."""
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    img = tmp_path / f"d.{fmt}"
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(img)],
                       check=True)
    else:
        img.write_bytes(data)
    vsock = daemons.rundir() / "vub.sock"
    d = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=proto0,filename={img},"
                      f"cache.direct={'on' if direct else 'off'}",
        "--blockdev", f"driver={fmt},node-name=fmt0,file=proto0",
        "--export", f"type=vhost-user-blk,id=disk0,node-name=fmt0,addr.type=unix,"
                    f"addr.path={vsock},writable=on"])
    wait_for_file_socket(vsock, d)
    return d, vsock, img


def guest_view(img, fmt, tmp_path):
    """The image's guest bytes, as qemu-img reads them (while thinblkd has it open)."""
    if fmt == "raw":
        return img.read_bytes()
    out = tmp_path / "view.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(img),
                    str(out)], check=True)
    return out.read_bytes()


def vhost_io(vsock, *args):
    r = subprocess.run([str(VHOST_IO), "-s", str(vsock), *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "runtime error:" not in r.stderr and "Sanitizer" not in r.stderr, r.stderr


FORMATS = pytest.mark.parametrize("fmt", ["raw", "qcow2"])
CACHE = pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
# (offset, block size, segments): 4 KiB pages; a request across 64 KiB clusters in 32 pages;
# sector-sized segments.
SHAPES = pytest.mark.parametrize("offset,bs,segs", [
    (0, "16k", 4), (32 * 1024, "128k", 32), (4096, "4k", 8)], ids=["4x4k", "32x4k", "8x512"])


@FORMATS
@CACHE
@SHAPES
def test_multi_segment_reads(daemons, tmp_path, fmt, direct, offset, bs, segs):
    """Each segment gets its own bytes of the image (thinblk-vhost-io lays them out in reverse,
    so bytes read as one buffer would land in the wrong place)."""
    data = os.urandom(2 * MIB)
    _, vsock, _ = start_vectored(daemons, tmp_path, fmt, direct, data)
    out = tmp_path / "out.bin"
    vhost_io(vsock, "-o", offset, "-l", "512k", "-b", bs, "--segments", segs,
             "--output", out, "read")
    assert out.read_bytes() == data[offset:offset + 512 * 1024]


@FORMATS
@CACHE
@SHAPES
def test_multi_segment_writes(daemons, tmp_path, fmt, direct, offset, bs, segs):
    data = os.urandom(2 * MIB)
    _, vsock, img = start_vectored(daemons, tmp_path, fmt, direct, data)
    vhost_io(vsock, "-o", offset, "-l", "512k", "-b", bs, "--segments", segs, "-P", 0x5a,
             "write")
    vhost_io(vsock, "-o", offset, "-l", "512k", "-b", bs, "--segments", segs, "-P", 0x5a,
             "verify")
    want = bytearray(data)
    want[offset:offset + 512 * 1024] = b"\x5a" * (512 * 1024)
    assert guest_view(img, fmt, tmp_path) == bytes(want)


def chain(g, hdr_type, sector, segs, write):
    """Post one request of header, the data segments (address, length) and a status byte;
    returns the status address."""
    struct.pack_into("<IIQ", g.mem, DATA, hdr_type, 0, sector)
    status = DATA + 0x200
    g.mem[status] = 0xff
    g.desc(0, DATA, 16, 1, 1)
    for i, (addr, length) in enumerate(segs):
        g.desc(i + 1, addr, length, 1 | (0 if write else 2), i + 2)
    g.desc(len(segs) + 1, status, 1, 2)
    g.submit(0)
    return status


@FORMATS
@CACHE
def test_odd_segments_written_and_read_in_place_or_bounced(daemons, tmp_path, fmt, direct):
    """Data in page segments in reverse order, read back in segments of odd lengths and
    addresses (an O_DIRECT node takes those through a bounce buffer): every byte in its
    place on the image and back in the guest."""
    _, vsock, img = start_vectored(daemons, tmp_path, fmt, direct, bytes(MIB))
    g = FakeGuest(vsock)
    payload = os.urandom(16384)
    pages = [(DATA + 0x1000 + (3 - i) * 4096, 4096) for i in range(4)]
    for i, (addr, _) in enumerate(pages):
        g.mem[addr:addr + 4096] = payload[i * 4096:(i + 1) * 4096]
    sector = (64 * 1024 - 8192) // 512          # across the first cluster boundary
    status = chain(g, 1, sector, pages, write=True)
    kit.wait_until(lambda: g.used_idx() == 1, 10, "the write's completion")
    assert g.mem[status] == 0
    view = guest_view(img, fmt, tmp_path)
    assert view[sector * 512:sector * 512 + 16384] == payload

    odd, addr = [], DATA + 0x5000 + 8
    for length in (1000, 3096, 512, 4096, 2048, 5632):
        odd.append((addr, length))
        addr += length + 8
    status = chain(g, 0, sector, odd, write=False)
    kit.wait_until(lambda: g.used_idx() == 2, 10, "the read's completion")
    assert g.mem[status] == 0
    assert b"".join(bytes(g.mem[a:a + n]) for a, n in odd) == payload


# ---- the node's alignment ------------------------------------------------------------------------

@pytest.fixture
def loop_4k(tmp_path):
    """A loop device with 4096-byte sectors: an O_DIRECT node on it aligns to 4096."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    backing = image(tmp_path / "backing.raw", 8 * MIB)
    dev = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", str(backing)],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_logical_block_below_the_node_alignment_is_refused(daemons, loop_4k):
    """A guest with 512-byte blocks on a 4096-byte O_DIRECT node would see errors: refused,
    with the way out; with logical-block-size=4096 the config tells the guest the truth."""
    d = daemons.start(args=["--blockdev", f"driver=host_device,node-name=dev0,filename={loop_4k},"
                                          "cache.direct=on"])
    qmp = d.negotiated()
    vsock = daemons.rundir() / "vub.sock"
    args = {"type": "vhost-user-blk", "id": "disk0", "node-name": "dev0", "writable": True,
            "addr": {"type": "unix", "path": str(vsock)}}
    assert qmp.cmd("block-export-add", args) == error(
        "logical-block-size 512 is smaller than the request alignment 4096 of node 'dev0'; "
        "use logical-block-size=4096")
    ok(qmp.cmd("block-export-add", {**args, "logical-block-size": 4096}))
    f = Frontend(vsock)
    cfg = f.call(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))[12:]
    features, = struct.unpack("<Q", f.call(GET_FEATURES))
    assert features & (1 << 10)                                 # VIRTIO_BLK_F_TOPOLOGY
    blk_size, phys_exp, align_off, min_io, opt_io = struct.unpack_from("<IBBHI", cfg, 20)
    assert (blk_size, phys_exp, align_off, min_io, opt_io) == (4096, 0, 0, 1, 1)
    assert struct.unpack_from("<Q", cfg, 0) == (8 * MIB // 512,)
    f.close()
