"""Block nodes and exports over QMP: blockdev-add/-del, the raw window, discard and actual-size,
detect-zeroes, host block devices, query-block-exports and block-export-del, an NBD server on
TCP."""
import json
import os
import random
import socket
import subprocess

import nbd
import pytest

from conftest import error, image, ok, without_timestamp

MiB = 1 << 20
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts or loop devices: needs root")


def nbd_unix(sock, name):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
    return h


def serve(daemons, tmp_path, blockdev, node="f0"):
    """thinblkd with the node of --blockdev `blockdev` exported writable as "disk" over NBD
    on a Unix socket: the daemon and the socket."""
    sock = tmp_path / "nbd.sock"
    d = daemons.start(args=[
        "--blockdev", blockdev,
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=nbd,id=e0,node-name={node},name=disk,writable=on"])
    # The monitor listens before the command line's nodes and exports exist; its greeting
    # comes from the loop, once they all do.
    d.negotiated()
    return d, sock


def test_blockdev_add_query_and_del(daemons, tmp_path):
    img = image(tmp_path / "disk.raw", MiB)
    qmp = daemons.start().negotiated()
    ok(qmp.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)}))
    ok(qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0",
                                "offset": 4096, "size": 65536}))
    nodes = qmp.cmd("query-named-block-nodes")["return"]
    assert [n["node-name"] for n in nodes] == ["r0", "f0"]  # newest first, as QEMU
    r0, f0 = nodes
    assert (r0["drv"], r0["ro"], r0["file"]) == ("raw", False, str(img))
    assert r0["image"]["virtual-size"] == 65536 and r0["image"]["format"] == "raw"
    assert (f0["drv"], f0["image"]["virtual-size"], f0["write_threshold"]) == ("file", MiB, 0)

    assert qmp.cmd("blockdev-del", {"node-name": "f0"}) == error(
        "Node 'f0' is busy: node is used as root of a block device or as a child of another node")
    ok(qmp.cmd("blockdev-del", {"node-name": "r0"}))
    ok(qmp.cmd("blockdev-del", {"node-name": "f0"}))
    assert qmp.cmd("query-named-block-nodes") == {"return": []}
    assert qmp.cmd("blockdev-del", {"node-name": "f0"}) == error(
        "Failed to find node with node-name='f0'")


@pytest.mark.parametrize("threshold, shown", [(1 << 40, 1 << 40), ((1 << 64) - 1, -1)],
                         ids=["2^40", "uint64-max-shown-as-int-like-qemu"])
def test_write_threshold_set_and_queried(daemons, tmp_path, threshold, shown):
    """QEMU 7.2 takes any uint64, and its BlockDeviceInfo.write_threshold is an int: 2^64-1 is
    shown as -1."""
    img = image(tmp_path / "disk.raw", MiB)
    qmp = daemons.start().negotiated()
    ok(qmp.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)}))
    ok(qmp.cmd("block-set-write-threshold", {"node-name": "f0", "write-threshold": threshold}))
    [f0] = qmp.cmd("query-named-block-nodes")["return"]
    assert f0["write_threshold"] == shown


def test_blockdev_add_errors(daemons, tmp_path):
    qmp = daemons.start().negotiated()
    assert qmp.cmd("blockdev-add", {"driver": "file", "filename": "/x"}) == error(
        "'node-name' must be specified for the root node")
    assert qmp.cmd("blockdev-add", {"driver": "nope", "node-name": "a"}) == error(
        "Parameter 'driver' does not accept value 'nope'")
    # -drive's discard=on|off are not BlockdevDiscardOptions (QEMU 7.2 refuses them too).
    for value in ("on", "off"):
        assert qmp.cmd("blockdev-add", {"driver": "file", "node-name": "a", "filename": "/x",
                                        "discard": value}) == error(
            f"Parameter 'discard' does not accept value '{value}'")
    assert qmp.cmd("blockdev-add", {"driver": "file", "node-name": "1a", "filename": "/x"}) == \
        error("Invalid node-name: '1a'")
    assert qmp.cmd("blockdev-add", {"driver": "file", "node-name": "a",
                                    "filename": str(tmp_path / "missing")}) == error(
        f"Could not open '{tmp_path / 'missing'}': No such file or directory")
    # A FIFO nobody writes to: refused at once, not waited on (the open would block).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for driver, ro in (("file", True), ("host_device", False)):
        assert qmp.cmd("blockdev-add", {"driver": driver, "node-name": "a", "read-only": ro,
                                        "filename": str(fifo)}) == error(f"'{fifo}' is not a file")
    assert qmp.cmd("query-named-block-nodes") == {"return": []}


def test_detect_zeroes_option(daemons, tmp_path):
    """QEMU's values and texts; unmap needs discard=unmap on the same node; the value is
    the node's own (an implicit child does not inherit it) and queries report it."""
    img = image(tmp_path / "disk.raw", MiB)
    qmp = daemons.start().negotiated()
    base = {"driver": "file", "node-name": "f0", "filename": str(img)}
    assert qmp.cmd("blockdev-add", {**base, "detect-zeroes": "bogus"}) == error(
        "Parameter 'detect-zeroes' does not accept value 'bogus'")
    assert qmp.cmd("blockdev-add", {**base, "detect-zeroes": 5}) == error(
        "Invalid parameter type for 'detect-zeroes', expected: string")
    for discard in ({}, {"discard": "ignore"}):
        assert qmp.cmd("blockdev-add", {**base, "detect-zeroes": "unmap", **discard}) == error(
            "setting detect-zeroes to unmap is not allowed without setting discard operation "
            "to unmap")
    ok(qmp.cmd("blockdev-add", {**base, "detect-zeroes": "off"}))
    ok(qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "r0", "detect-zeroes": "on",
                                "file": "f0"}))
    ok(qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "r1", "detect-zeroes": "unmap",
                                "discard": "unmap", "file": {"driver": "file",
                                                             "filename": str(img)}}))
    nodes = qmp.cmd("query-named-block-nodes")["return"]
    assert [(n["drv"], n["detect_zeroes"]) for n in nodes] == [
        ("raw", "unmap"), ("file", "off"), ("raw", "on"), ("file", "off")]


def qemu_io(uri, *cmds):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [uri], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stdout.lower() + r.stderr.lower(), \
        r.stdout + r.stderr


def data_extents(img):
    """[start, end) of the extents the file system holds data for (qemu-img map on raw:
    SEEK_DATA; zeroed-in-place ranges, unwritten extents, read as holes)."""
    m = json.loads(subprocess.run(["qemu-img", "map", "-f", "raw", "--output=json", str(img)],
                                  check=True, capture_output=True, text=True).stdout)
    return [(e["start"], e["start"] + e["length"]) for e in m if e["data"]]


@pytest.mark.parametrize("mode", ["off", "on", "unmap"])
def test_detect_zeroes_on_a_file(daemons, tmp_path, mode):
    """A guest's zero buffers (qemu-io write -P 0, NBD writes) over data written before and
    over a hole: off writes them as data; on as write-zeroes (zeroed in place: no data extent,
    the blocks stay); unmap deallocates them (discard=unmap). Other data is written as is."""
    img = image(tmp_path / "disk.raw", 16 * MiB)
    d, sock = serve(daemons, tmp_path, f"driver=file,node-name=f0,filename={img},discard=unmap,"
                                       f"detect-zeroes={mode}")
    qmp = d.negotiated()
    [dev] = qmp.cmd("query-block")["return"]
    assert dev["inserted"]["detect_zeroes"] == mode
    uri = f"nbd+unix:///disk?socket={sock}"
    qemu_io(uri, "write -P 0x5a 0 4M", "flush")
    assert os.stat(img).st_blocks * 512 == 4 * MiB
    qemu_io(uri, "write -P 0 0 4M", "write -P 0 8M 4M", "write -P 0x33 14M 64k", "flush")
    blocks = os.stat(img).st_blocks * 512
    if mode == "off":
        assert data_extents(img) == [(0, 4 * MiB), (8 * MiB, 12 * MiB),
                                     (14 * MiB, 14 * MiB + 65536)]
        assert blocks == 8 * MiB + 65536
    else:
        assert data_extents(img) == [(14 * MiB, 14 * MiB + 65536)]
    if mode == "on":
        assert blocks >= 4 * MiB + 65536   # zeroed in place: the blocks written before stay
    if mode == "unmap":
        assert blocks == 65536
    with open(img, "rb") as f:
        assert f.read(14 * MiB) == bytes(14 * MiB)
        assert f.read(65536) == b"\x33" * 65536


def test_raw_window_writes_at_its_offset(daemons, tmp_path):
    img = image(tmp_path / "disk.raw", MiB)
    sock = tmp_path / "nbd.sock"
    daemons.start(args=[
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=raw,node-name=r0,file=f0,offset=65536,size=131072",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=r0,name=win,writable=on"])
    h = nbd_unix(sock, "win")
    assert h.get_size() == 131072
    data = random.randbytes(4096)
    h.pwrite(data, 8192)
    h.flush()
    with open(img, "rb") as f:
        f.seek(65536 + 8192)
        assert f.read(4096) == data
    h.shutdown()


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32M", "thinblk-test", str(mnt)],
                   check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@root_only
@pytest.mark.parametrize("discard", ["unmap", "ignore"])
def test_discard_and_actual_size(daemons, tmp_path, tmpfs, discard):
    img = image(tmpfs / "disk.raw", 16 * MiB)
    d, sock = serve(daemons, tmp_path, f"driver=file,node-name=f0,filename={img},"
                                       f"discard={discard}")
    qmp = d.negotiated()

    def actual_size():
        return qmp.cmd("query-named-block-nodes")["return"][0]["image"]["actual-size"]

    assert actual_size() == 0
    h = nbd_unix(sock, "disk")
    data = random.randbytes(4 * MiB)
    h.pwrite(data, 0)
    h.flush()
    assert actual_size() == 4 * MiB
    h.trim(4 * MiB, 0)
    h.flush()
    if discard == "unmap":
        assert actual_size() == 0
        assert h.pread(4 * MiB, 0) == bytes(4 * MiB)
    else:
        assert actual_size() == 4 * MiB
        assert h.pread(4 * MiB, 0) == data
    h.shutdown()


@root_only
def test_write_zeroes_without_zero_range(daemons, tmp_path, tmpfs):
    """tmpfs has no FALLOC_FL_ZERO_RANGE: a write-zeroes that may not unmap punches a hole
    and allocates it again (QEMU's fallback), so the range reads zeroes and stays allocated;
    one that may unmap (discard=unmap) deallocates it."""
    img = image(tmpfs / "disk.raw", 16 * MiB)
    d, sock = serve(daemons, tmp_path, f"driver=file,node-name=f0,filename={img},discard=unmap")
    qmp = d.negotiated()
    h = nbd_unix(sock, "disk")
    h.pwrite(random.randbytes(4 * MiB), 0)
    h.zero(4 * MiB, 0, nbd.CMD_FLAG_NO_HOLE)
    h.zero(MiB, 8 * MiB, nbd.CMD_FLAG_NO_HOLE)   # over a hole: allocated
    h.flush()
    assert h.pread(4 * MiB, 0) == bytes(4 * MiB)
    [node] = qmp.cmd("query-named-block-nodes")["return"]
    assert node["image"]["actual-size"] == 5 * MiB
    h.zero(2 * MiB, 0)
    h.flush()
    [node] = qmp.cmd("query-named-block-nodes")["return"]
    assert node["image"]["actual-size"] == 3 * MiB
    assert h.pread(4 * MiB, 0) == bytes(4 * MiB)
    h.shutdown()


@root_only
@pytest.mark.parametrize("driver,direct", [("host_device", False), ("file", True)])
def test_host_block_device(daemons, tmp_path, driver, direct):
    backing = image(tmp_path / "backing.img", 16 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        d, sock = serve(daemons, tmp_path, f"driver={driver},node-name=d0,filename={dev},"
                                           f"cache.direct={'on' if direct else 'off'}",
                        node="d0")
        node = d.negotiated().cmd("query-named-block-nodes")["return"][0]
        assert node["image"]["virtual-size"] == 16 * MiB
        assert node["image"]["actual-size"] == 0  # as QEMU reports for a device
        assert node["cache"]["direct"] is direct
        h = nbd_unix(sock, "disk")
        data = random.randbytes(MiB)
        h.pwrite(data, 3 * MiB)
        h.flush()
        assert h.pread(MiB, 3 * MiB) == data
        h.shutdown()
        d.shutdown()
        with open(backing, "rb") as f:
            f.seek(3 * MiB)
            assert f.read(MiB) == data
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@root_only
@pytest.mark.parametrize("discard", ["unmap", "ignore"])
def test_host_device_write_zeroes_and_discard(daemons, tmp_path, discard):
    """On a loop device over a file: write-zeroes reads back zeroes; with discard=unmap, one
    that may unmap and a discard deallocate the backing file's range, one with NBD's
    NO_HOLE keeps it; with discard=ignore nothing is deallocated."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(random.randbytes(16 * MiB))
    os.sync()
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        d, sock = serve(daemons, tmp_path, f"driver=host_device,node-name=d0,filename={dev},"
                                           f"discard={discard}", node="d0")
        h = nbd_unix(sock, "disk")
        h.zero(4 * MiB, 0)
        h.zero(2 * MiB, 8 * MiB, nbd.CMD_FLAG_NO_HOLE)
        h.trim(2 * MiB, 12 * MiB)
        h.flush()
        assert h.pread(4 * MiB, 0) == bytes(4 * MiB)
        assert h.pread(2 * MiB, 8 * MiB) == bytes(2 * MiB)
        h.shutdown()
        d.shutdown()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    freed = 6 * MiB if discard == "unmap" else 0
    assert os.stat(backing).st_blocks * 512 == 16 * MiB - freed
    with open(backing, "rb") as f:
        assert f.read(4 * MiB) == bytes(4 * MiB)
        f.seek(8 * MiB)
        assert f.read(2 * MiB) == bytes(2 * MiB)


def test_query_block_exports_and_del(daemons, tmp_path):
    img = image(tmp_path / "disk.raw", MiB)
    sock = tmp_path / "nbd.sock"
    qmp = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=f0,name=disk"]).negotiated()
    assert qmp.cmd("query-block-exports") == {"return": [
        {"type": "nbd", "id": "e0", "node-name": "f0", "shutting-down": False}]}
    assert [b["device"] for b in qmp.cmd("query-block")["return"]] == ["e0"]
    assert qmp.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0"}) == \
        error("Block export id 'e0' is already in use")
    ok(qmp.cmd("block-export-del", {"id": "e0"}))
    assert [without_timestamp(e) for e in qmp.take_events()] == [
        {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}]
    assert qmp.cmd("query-block-exports") == {"return": []}
    assert qmp.cmd("query-block") == {"return": []}
    assert qmp.cmd("block-export-del", {"id": "e0"}) == error("Export 'e0' is not found")


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port):
    """Local addresses with a TCP socket listening on port (from /proc/net/tcp)."""
    found = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                found.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


def test_nbd_server_on_tcp_binds_only_where_asked(daemons, tmp_path):
    img = image(tmp_path / "disk.raw", MiB)
    qmp = daemons.start(args=["--blockdev", f"driver=file,node-name=f0,filename={img}"]) \
        .negotiated()
    port = free_tcp_port()
    ok(qmp.cmd("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": str(port)}}}))
    assert listening_addresses(port) == ["127.0.0.1"]
    ok(qmp.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0",
                                    "name": "disk", "writable": True}))
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{port}/disk")
    h.pwrite(b"\x42" * 512, 0)
    assert h.pread(512, 0) == b"\x42" * 512
    h.shutdown()
    assert qmp.cmd("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": str(port)}}}) == error("NBD server already running")
    ok(qmp.cmd("nbd-server-stop"))
    assert listening_addresses(port) == []
    assert qmp.cmd("query-block-exports") == {"return": []}
