"""Dirty qcow2 images (lazy refcounts): repaired at a writable open, read as they are
read-only, refused writable when the repair cannot be safe.

Dirty images are made the real way: qemu-img creates the image with lazy_refcounts=on,
qemu-io writes to it and then `abort`s (a crash: the dirty bit stays set, the refcounts of the
new clusters never reach the disk). What the crashed image holds is taken from QEMU itself
(qemu-img convert to raw, a read-only open), so the reference does not guess what the crash
kept. Then thinblkd serves the image writable over NBD, more writes go to both, and after
shutdown `qemu-img check` must find nothing (no error, no leak), the dirty bit must be clear
and `qemu-img compare` must find the image identical to the reference.
"""
import hashlib
import json
import random
import struct
import subprocess

import pytest

from conftest import thinblk_only
from test_qcow2 import Served, open_error, qemu_img, ref_write

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB

pytestmark = thinblk_only


def create_lazy(img, cluster_size, refcount_bits, size=SIZE):
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"lazy_refcounts=on,cluster_size={cluster_size},refcount_bits={refcount_bits}",
             img, size)


def crash_writes(img, cmds):
    """qemu-io runs cmds, then aborts as a crash would: the image is left dirty."""
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + ["-c", "abort", str(img)], capture_output=True, text=True)
    assert r.returncode != 0, "qemu-io abort should kill qemu-io"
    assert "error" not in r.stdout.lower(), r.stdout


def header(img):
    with open(img, "rb") as f:
        return f.read(104)


def incompat(img):
    return struct.unpack(">Q", header(img)[72:80])[0]


def is_dirty(img):
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    return info["dirty-flag"]


def check_errors(img):
    """qemu-img check's output and whether it found errors or leaks."""
    r = qemu_img("check", "--output=json", img, check=False)
    out = json.loads(r.stdout)
    return out, out.get("corruptions", 0) + out.get("leaks", 0) + out.get("check-errors", 0)


def to_raw(img, ref):
    """What QEMU reads from img (read-only: no repair), as the raw reference."""
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, ref)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_repaired(img, ref):
    assert incompat(img) & 1 == 0
    assert is_dirty(img) is False
    out, bad = check_errors(img)
    assert bad == 0, out
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0 and "No errors were found on the image" in r.stdout, \
        r.stdout + r.stderr
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, ref, check=False)
    assert r.returncode == 0 and "Images are identical" in r.stdout, r.stdout + r.stderr


def more_writes(srv, ref, cluster_size, seed):
    """Writes that allocate (the allocator then trusts the repaired refcounts) and rewrite."""
    rnd = random.Random(seed)
    h = srv.nbd()
    for _ in range(30):
        length = rnd.choice([1, 511, cluster_size, 3 * cluster_size + 7, rnd.randrange(1, 200 * KiB)])
        off = rnd.randrange(0, SIZE - length)
        data = rnd.randbytes(length)
        h.pwrite(data, off)
        ref_write(ref, off, data)
    seq = rnd.randbytes(2 * MiB)
    h.pwrite(seq, 40 * MiB)
    ref_write(ref, 40 * MiB, seq)
    h.flush()
    h.shutdown()


@pytest.mark.parametrize("cluster_size,refcount_bits", [
    (512, 1), (4 * KiB, 16), (64 * KiB, 64), (512, 64), (2 * MiB, 16)])
def test_crashed_lazy_image_repaired_on_writable_open(daemons, tmp_path, cluster_size,
                                                      refcount_bits):
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create_lazy(img, cluster_size, refcount_bits)
    crash_writes(img, ["write -P 0xab 0 1M", "write -P 0xcd 8M 300k",
                       f"write -P 0x11 {SIZE - 3 * cluster_size} {2 * cluster_size}",
                       "write -P 0x22 20M 3M"])
    assert is_dirty(img) is True
    out, bad = check_errors(img)
    assert bad > 0, out  # the crash really left refcounts behind
    to_raw(img, ref)
    # The crash kept at least the first write: the refcounts repaired cover data.
    assert open(ref, "rb").read(1 * MiB) == b"\xab" * MiB

    srv = Served(daemons, img)
    assert incompat(img) & 1 == 0  # repaired at open, before any write
    more_writes(srv, ref, cluster_size, seed=cluster_size + refcount_bits)
    srv.stop()
    assert "the image was dirty" in srv.d.stderr()
    assert_repaired(img, ref)


def shrink_refcount_table(img):
    """Cut the refcount table down to its first cluster, as if its growth never happened:
    clusters past what the first cluster's blocks cover lose their refcount blocks."""
    h = header(img)
    cs = 1 << struct.unpack(">I", h[20:24])[0]
    rt_off, rt_clusters = struct.unpack(">QI", h[48:60])
    assert rt_clusters > 1
    with open(img, "r+b") as f:
        f.seek(56)
        f.write(struct.pack(">I", 1))
    return rt_off, cs


def drop_refcount_block(img, index):
    """Zero refcount table entry index: the block is lost (its cluster leaks)."""
    h = header(img)
    rt_off = struct.unpack(">Q", h[48:56])[0]
    with open(img, "r+b") as f:
        f.seek(rt_off + 8 * index)
        assert struct.unpack(">Q", f.read(8))[0] != 0
        f.seek(rt_off + 8 * index)
        f.write(bytes(8))


def test_repair_grows_the_refcount_table(daemons, tmp_path):
    # 512-byte clusters, 64-bit refcounts: a block covers 64 clusters (32 KiB), one table
    # cluster 64 blocks (2 MiB); QEMU grew the table for 6 MiB of data, we cut it back.
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create_lazy(img, 512, 64)
    crash_writes(img, ["write -P 0x5a 0 6M"])
    to_raw(img, ref)
    old_rt, cs = shrink_refcount_table(img)
    out, bad = check_errors(img)
    assert bad > 0, out

    srv = Served(daemons, img)
    rt_off, rt_clusters = struct.unpack(">QI", header(img)[48:60])
    assert rt_off != old_rt and rt_clusters * cs // 8 * 64 * cs >= 6 * MiB
    assert "the refcount table moved" in srv.d.stderr()
    more_writes(srv, ref, cs, seed=7)
    srv.stop()
    assert_repaired(img, ref)


def test_repair_adds_a_lost_refcount_block(daemons, tmp_path):
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create_lazy(img, 4 * KiB, 16)  # a block covers 2048 clusters (8 MiB of file)
    crash_writes(img, ["write -P 0x77 0 12M"])
    to_raw(img, ref)
    old_rt = header(img)[48:60]
    drop_refcount_block(img, 1)

    srv = Served(daemons, img)
    assert header(img)[48:60] == old_rt  # the table had room: it stays
    assert "1 refcount blocks added" in srv.d.stderr()
    more_writes(srv, ref, 4 * KiB, seed=11)
    srv.stop()
    assert_repaired(img, ref)


def set_refcount(img, cluster, value):
    """Set the 16-bit refcount of cluster (its block must exist)."""
    h = header(img)
    cs = 1 << struct.unpack(">I", h[20:24])[0]
    assert struct.unpack(">I", h[96:100])[0] == 4
    rt_off = struct.unpack(">Q", h[48:56])[0]
    epb = cs // 2
    with open(img, "r+b") as f:
        f.seek(rt_off + 8 * (cluster // epb))
        block = struct.unpack(">Q", f.read(8))[0]
        assert block
        f.seek(block + 2 * (cluster % epb))
        f.write(struct.pack(">H", value))


def set_dirty(img):
    with open(img, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", incompat(img) | 1))


def test_leaks_freed(daemons, tmp_path):
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create_lazy(img, 64 * KiB, 16)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 1M", str(img)],
                       capture_output=True, text=True, check=True)
    clusters = img.stat().st_size // (64 * KiB)
    with open(img, "r+b") as f:  # free clusters inside the file (QEMU counts only those)
        f.truncate((clusters + 8) * 64 * KiB)
    for c in (clusters + 2, clusters + 5):  # unused: they get refcount 3
        set_refcount(img, c, 3)
    set_dirty(img)
    to_raw(img, ref)
    out, _ = check_errors(img)
    assert out.get("leaks") == 2, out

    srv = Served(daemons, img)
    assert "2 leaked clusters freed" in srv.d.stderr()
    more_writes(srv, ref, 64 * KiB, seed=3)
    srv.stop()
    assert_repaired(img, ref)


def test_read_only_open_of_dirty_image_changes_nothing(daemons, tmp_path):
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create_lazy(img, 64 * KiB, 16)
    crash_writes(img, ["write -P 0x3c 0 2M", "write -P 0x3d 30M 1M"])
    to_raw(img, ref)
    before = sha256(img)

    srv = Served(daemons, img, writable=False, qcow2_opts=",read-only=on")
    h = srv.nbd()
    data = open(ref, "rb").read()
    for off in (0, 2 * MiB - 4 * KiB, 30 * MiB, SIZE - MiB):
        assert h.pread(MiB, off) == data[off:off + MiB]
    h.shutdown()
    srv.stop()
    assert sha256(img) == before
    assert is_dirty(img) is True


def l2_entries(img, first):
    """The first L2 table's offset and its first entries."""
    h = header(img)
    l1_off = struct.unpack(">Q", h[40:48])[0]
    with open(img, "rb") as f:
        f.seek(l1_off)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
        f.seek(l2)
        return l2, struct.unpack(f">{first}Q", f.read(8 * first))


def test_cluster_used_twice_refused(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create_lazy(img, 64 * KiB, 16)
    crash_writes(img, ["write -P 0x61 0 64k", "write -P 0x62 64k 64k"])
    l2, (e0, e1) = l2_entries(img, 2)
    assert e0 and e1 and e0 != e1
    with open(img, "r+b") as f:  # guest cluster 1 now shares guest cluster 0's host cluster
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", e0))
    before = sha256(img)

    desc = open_error(daemons, img)
    host = e0 & 0x00fffffffffffe00
    assert desc == ("qcow2: the image is dirty and cannot be repaired at open: cluster "
                    f"{host // (64 * KiB)} (offset {host:#x}) is used twice, the second time by "
                    "a data cluster; repair it with 'qemu-img check -r all' or open it "
                    "read-only")
    assert sha256(img) == before
    # Read-only, it still opens.
    srv = Served(daemons, img, writable=False, qcow2_opts=",read-only=on")
    h = srv.nbd()
    assert h.pread(64 * KiB, 64 * KiB) == b"\x61" * (64 * KiB)
    h.shutdown()
    srv.stop()


def test_invalid_l2_entry_refused(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create_lazy(img, 64 * KiB, 16)
    crash_writes(img, ["write -P 0x61 0 64k"])
    l2, (e0,) = l2_entries(img, 1)
    with open(img, "r+b") as f:
        f.seek(l2)
        f.write(struct.pack(">Q", e0 | 0x100))  # misaligned host offset
    desc = open_error(daemons, img)
    assert desc.startswith("qcow2: the image is dirty and cannot be repaired at open: L2 "
                           f"table at {l2:#x} has an invalid entry 0 ")
    assert desc.endswith("repair it with 'qemu-img check -r all' or open it read-only")


def test_reference_past_end_of_file_refused(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create_lazy(img, 64 * KiB, 16)
    crash_writes(img, ["write -P 0x61 0 64k"])
    l2, (e0,) = l2_entries(img, 1)
    with open(img, "r+b") as f:
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    assert open_error(daemons, img) == (
        "qcow2: the image is dirty and cannot be repaired at open: a data cluster at offset "
        "0x10000000000 lies past the end of the file; repair it with 'qemu-img check -r all' "
        "or open it read-only")


# ---- lazy-refcounts: accepted, no effect ----------------------------------------------------

@pytest.mark.parametrize("value", ["on", "off"])
def test_lazy_refcounts_option_accepted_and_image_never_dirty(daemons, tmp_path, value):
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create_lazy(img, 64 * KiB, 16)
    to_raw(img, ref)
    srv = Served(daemons, img, qcow2_opts=f",lazy-refcounts={value}")
    h = srv.nbd()
    data = random.Random(5).randbytes(3 * MiB)
    h.pwrite(data, 5 * MiB)
    ref_write(ref, 5 * MiB, data)
    assert incompat(img) & 1 == 0  # no dirty bit while serving, writes done
    out, bad = check_errors(img)  # consistent while it runs: refcounts are written first
    assert bad == 0, out
    h.shutdown()
    srv.stop()
    assert_repaired(img, ref)


def test_lazy_refcounts_on_v2_image_refused(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", img, MiB)
    assert open_error(daemons, img, {"lazy-refcounts": True}) == \
        "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
    assert open_error(daemons, img, {"lazy-refcounts": "yes"}) == \
        "Invalid parameter type for 'lazy-refcounts', expected: boolean"
