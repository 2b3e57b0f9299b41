"""block_resize: raw and qcow2 nodes grown as QEMU 7.2 grows them, seen by qemu-img and by NBD
clients that connect again; the errors with QEMU 7.2's texts (qemu-storage-daemon 7.2.22)."""
import json
import os
import subprocess

import nbd
import pytest

from conftest import error, image, ok, thinblk_only

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

pytestmark = thinblk_only
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices: needs root")


def qemu_img(*args, check=True):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          check=check)


def virtual_size(img, fmt):
    info = json.loads(qemu_img("info", "-U", "--output=json", "-f", fmt, img).stdout)
    return info["virtual-size"]


def assert_check_clean(img):
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found on the image" in r.stdout, r.stdout
    assert "leaked" not in r.stdout + r.stderr, r.stdout


class Served:
    """thinblkd serving node n0 (over file f0) as NBD export 'disk'."""

    def __init__(self, daemons, img, fmt):
        rundir = daemons.rundir()
        self.sock = rundir / "nbd.sock"
        self.d = daemons.start(args=[
            "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", f"driver={fmt},node-name=n0,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", "type=nbd,id=d0,node-name=n0,name=disk,writable=on"])
        self.qmp = self.d.negotiated()

    def nbd(self):
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///disk?socket={self.sock}")
        return h

    def resize(self, size, node="n0"):
        return self.qmp.cmd("block_resize", {"node-name": node, "size": size})

    def node_size(self, node="n0"):
        nodes = self.qmp.cmd("query-named-block-nodes")["return"]
        return next(n["image"]["virtual-size"] for n in nodes if n["node-name"] == node)

    def stop(self):
        problems = self.d.shutdown()
        assert problems == [], problems


def pattern(tag, n=4096):
    return (tag * n)[:n]


def test_raw_grows_its_file(daemons, tmp_path):
    img = image(tmp_path / "disk.raw", MiB)
    srv = Served(daemons, img, "raw")
    h = srv.nbd()
    h.pwrite(pattern(b"before"), MiB - 4096)

    ok(srv.resize(4 * MiB))
    assert os.path.getsize(img) == 4 * MiB
    assert srv.node_size() == srv.node_size("f0") == 4 * MiB
    [dev] = srv.qmp.cmd("query-block")["return"]
    assert dev["inserted"]["image"]["virtual-size"] == 4 * MiB

    # A client connected before keeps the size it was told: past it the server refuses, as
    # before (libnbd's own bounds check off, so that the request is sent).
    assert h.get_size() == MiB
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, MiB)
    assert e.value.errno == "EINVAL"
    with pytest.raises(nbd.Error) as e:
        h.pwrite(pattern(b"late"), MiB)
    assert e.value.errno == "ENOSPC"
    # One that connects now sees the new size and the new region.
    h2 = srv.nbd()
    assert h2.get_size() == 4 * MiB
    assert h2.pread(4096, MiB - 4096) == pattern(b"before")
    h2.pwrite(pattern(b"grown"), 3 * MiB)
    h2.flush()
    assert h2.pread(4096, 3 * MiB) == pattern(b"grown")
    h.shutdown()
    h2.shutdown()
    srv.stop()
    assert virtual_size(img, "raw") == 4 * MiB
    with open(img, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(4096) == pattern(b"grown")


def test_raw_shrinks_as_qemu(daemons, tmp_path):
    """QEMU 7.2's block_resize cuts a raw image's file (it has no shrink flag)."""
    img = image(tmp_path / "disk.raw", 4 * MiB)
    srv = Served(daemons, img, "raw")
    ok(srv.resize(MiB + 1))  # any size: only qcow2 wants multiples of 512
    assert os.path.getsize(img) == MiB + 1
    ok(srv.resize(MiB))
    h = srv.nbd()
    assert h.get_size() == MiB
    h.shutdown()
    srv.stop()


@pytest.mark.parametrize("cluster_size, old, new", [
    (64 * KiB, MiB, 2 * MiB),            # the L1 table's one entry still maps it all
    (64 * KiB, MiB, 2 * TiB),            # L1: 1 entry -> 4096 (8 clusters)
    (4 * KiB, MiB, 64 * GiB),            # cluster 4 KiB: L1 1 -> 32768 entries (64 clusters)
], ids=["same-l1", "l1-grows", "l1-grows-small-clusters"])
def test_qcow2_grows(daemons, tmp_path, cluster_size, old, new):
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", img, old)
    srv = Served(daemons, img, "qcow2")
    h = srv.nbd()
    h.pwrite(pattern(b"before"), old - 4096)
    h.shutdown()

    ok(srv.resize(new))
    assert srv.node_size() == new
    assert virtual_size(img, "qcow2") == new
    h = srv.nbd()
    assert h.get_size() == new
    assert h.pread(4096, old - 4096) == pattern(b"before")
    h.pwrite(pattern(b"grown"), new - 4096)
    h.pwrite(pattern(b"middle"), old + (new - old) // 2)
    assert h.pread(4096, new - 4096) == pattern(b"grown")
    h.shutdown()
    srv.stop()

    assert_check_clean(img)
    r = qemu_img("info", "--output=json", img)
    assert json.loads(r.stdout)["virtual-size"] == new
    io = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0 {old} 4096",
                         "-c", f"read -v {new - 4096} 16", str(img)],
                        capture_output=True, text=True, check=True)
    assert "grown" in io.stdout


def test_qcow2_grows_twice_and_reopens(daemons, tmp_path):
    """The L1 table moved once and then again: the first new one is freed and reused."""
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, MiB)
    srv = Served(daemons, img, "qcow2")
    ok(srv.resize(TiB))
    ok(srv.resize(4 * TiB))
    h = srv.nbd()
    h.pwrite(pattern(b"x"), 4 * TiB - 4096)
    h.shutdown()
    srv.stop()
    assert_check_clean(img)
    srv = Served(daemons, img, "qcow2")
    assert srv.nbd().pread(4096, 4 * TiB - 4096) == pattern(b"x")
    srv.stop()


def test_errors_as_qemu(daemons, tmp_path):
    raw = image(tmp_path / "r.img", MiB)
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, MiB)
    ro = image(tmp_path / "ro.img", MiB)
    d = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=rf,filename={raw}",
        "--blockdev", "driver=raw,node-name=rr,file=rf",
        "--blockdev", "driver=raw,node-name=rs,file=rf,size=512",
        "--blockdev", f"driver=file,node-name=bf,filename={base}",
        "--blockdev", "driver=qcow2,node-name=bq,file=bf",
        "--blockdev", f"driver=file,node-name=tf,filename={top}",
        "--blockdev", "driver=qcow2,node-name=tq,file=tf,backing=bq",
        "--blockdev", f"driver=file,node-name=rof,filename={ro},read-only=on",
        "--blockdev", "driver=raw,node-name=ror,file=rof,read-only=on"])
    qmp = d.negotiated()

    def resize(args):
        return qmp.cmd("block_resize", args)

    assert resize({"size": MiB}) == error("Cannot find device='' nor node-name=''")
    assert resize({"device": "nope", "size": MiB}) == error(
        "Cannot find device='nope' nor node-name=''")
    assert resize({"node-name": "nope", "size": MiB}) == error(
        "Cannot find device='' nor node-name='nope'")
    assert resize({"node-name": "rr", "size": -1}) == error("Parameter 'size' expects a >0 size")
    assert resize({"node-name": "rr", "size": 2 * MiB}) == error(
        "Permission conflict on node 'rf': permissions 'resize' are both required by node 'rr' "
        "(uses node 'rf' as 'file' child) and unshared by node 'rs' (uses node 'rf' as 'file' "
        "child).")
    assert resize({"node-name": "rs", "size": 1024}) == error(
        "Cannot resize fixed-size raw disks")
    assert resize({"node-name": "bq", "size": 2 * MiB}) == error("Device '(null)' is in use")
    assert resize({"node-name": "tf", "size": 2 * MiB}) == error(
        "Permission conflict on node 'tf': permissions 'resize' are both required by an unnamed "
        "block device (uses node 'tf' as 'root' child) and unshared by node 'tq' (uses node "
        "'tf' as 'file' child).")
    assert resize({"node-name": "tq", "size": 2 * MiB + 1}) == error(
        "The new size must be a multiple of 512")
    assert resize({"node-name": "tq", "size": 1 << 62}) == error(
        "Failed to grow the L1 table: File too large")
    assert resize({"node-name": "tq", "size": (1 << 63) - 1}) == error(
        "offset(9223372036854775807) exceeds maximum(9223372035781033984)")
    assert resize({"node-name": "ror", "size": 2 * MiB}) == error("Image is read-only")
    # With both, a device name that is not one falls back to the node name, as in QEMU.
    ok(resize({"device": "tq", "node-name": "tq", "size": 2 * MiB}))
    # thinblk's own: QEMU 7.2 shrinks a qcow2 image here.
    assert resize({"node-name": "tq", "size": MiB}) == error(
        "qcow2: shrinking an image is not supported")


@root_only
def test_host_device_cannot_grow_but_reports_its_growth(daemons, tmp_path):
    backing = image(tmp_path / "dev.img", 4 * MiB)
    loop = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        d = daemons.start(args=[
            "--blockdev", f"driver=host_device,node-name=hd,filename={loop}",
            "--blockdev", "driver=raw,node-name=hr,file=hd"])
        qmp = d.negotiated()
        assert qmp.cmd("block_resize", {"node-name": "hr", "size": 8 * MiB}) == error(
            "Cannot grow device files")
        ok(qmp.cmd("block_resize", {"node-name": "hr", "size": 2 * MiB}))  # as QEMU: no-op
        os.truncate(backing, 8 * MiB)
        subprocess.run(["losetup", "-c", loop], check=True)
        ok(qmp.cmd("block_resize", {"node-name": "hr", "size": 8 * MiB}))
        sizes = {n["node-name"]: n["image"]["virtual-size"]
                 for n in qmp.cmd("query-named-block-nodes")["return"]}
        assert sizes == {"hd": 8 * MiB, "hr": 8 * MiB}
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
