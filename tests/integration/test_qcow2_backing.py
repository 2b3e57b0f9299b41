"""qcow2 backing files, with qemu-img, qemu-io and qemu-storage-daemon as the oracle.

Chains are made by `qemu-img create -f qcow2 -b BASE -F FMT`, filled by qemu-io; thinblkd
serves the top over NBD. Reads must match what qemu-img reads through the same chain; writes
(copy-on-write of partial clusters) must leave the top image, read with its chain by
qemu-img, equal to a raw reference, the backing files unchanged and `qemu-img check` clean.
Query output and error texts are compared with qemu-storage-daemon's for the same chain.
"""
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import time

import nbd
import pytest

from conftest import QMPClient, thinblk_only
from test_qcow2 import Served, qemu_img, random_workload, ref_write

KiB = 1 << 10
MiB = 1 << 20

pytestmark = thinblk_only


def qemu_io(fmt, img, *cmds):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def qemu_io_ro(srv, *cmds):
    """qemu-io reading a read-only export."""
    argv = ["qemu-io", "-r", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [srv.uri], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make_chain(d, cluster_size=64 * KiB, size=8 * MiB, base_size=5 * MiB + 512):
    """base.raw (shorter than the disk) <- mid.qcow2 <- top.qcow2, relative names, each
    level written by qemu-io: patterns, zero clusters (kept and freed) in mid."""
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
    size = max(size, 16 * cluster_size)
    with open(base, "wb") as f:
        f.write(random.Random(1).randbytes(base_size))
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
             "-b", "base.raw", "-F", "raw", mid, size)
    cs = cluster_size
    qemu_io("qcow2", mid, f"write -P 0x22 {cs} {2 * cs}", f"write -P 0x23 {3 * MiB + 512} 7k",
            f"write -z {6 * cs} {2 * cs}", f"write -z -u {10 * cs} {cs}",
            f"write -P 0x24 {5 * MiB} 100k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
             "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io("qcow2", top, f"write -P 0x33 {cs // 2} {cs}", f"write -P 0x34 {4 * MiB} 1k",
            f"write -z -u {12 * cs} {cs}")
    return base, mid, top


def chain_as_raw(top, out):
    qemu_img("convert", "-f", "qcow2", "-O", "raw", top, out)
    return out


def assert_same(a, fmt_a, b, fmt_b):
    r = qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def assert_check_clean(img):
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0 and "No errors were found on the image" in r.stdout, \
        r.stdout + r.stderr
    assert "leaked" not in r.stdout + r.stderr, r.stdout


# ---- reads ------------------------------------------------------------------------------

@pytest.mark.parametrize("cluster_size", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_reads_fall_through_the_chain(daemons, tmp_path, cluster_size):
    base, mid, top = make_chain(tmp_path, cluster_size)
    ref = chain_as_raw(top, tmp_path / "ref.raw")
    srv = Served(daemons, top, writable=False)
    assert_same(srv.uri, "raw", ref, "raw")
    data = ref.read_bytes()
    h = srv.nbd()
    rnd = random.Random(cluster_size)
    for _ in range(40):   # unaligned pieces across cluster and backing-size boundaries
        off = rnd.randrange(len(data))
        n = rnd.randrange(1, min(len(data) - off, 3 * cluster_size + 777) + 1)
        assert h.pread(n, off) == data[off:off + n], (off, n)
    # Zero clusters in mid read zeroes, not the base's bytes.
    assert h.pread(2 * cluster_size, 6 * cluster_size) == bytes(2 * cluster_size)
    # Past the base's end: zeroes.
    assert h.pread(MiB, 6 * MiB) == bytes(MiB)
    h.shutdown()
    srv.stop()


def test_qemu_io_pattern_checks(daemons, tmp_path):
    base, mid, top = make_chain(tmp_path)
    srv = Served(daemons, top, writable=False)
    qemu_io_ro(srv, "read -P 0x22 96k 96k", "read -P 0x33 32k 64k", "read -P 0x24 5M 100k",
                "read -P 0 384k 128k", "read -P 0 7M 1M", "read -P 0x34 4M 1k")
    srv.stop()


# ---- writes: copy on write ----------------------------------------------------------------

@pytest.mark.parametrize("cluster_size", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_partial_writes_copy_from_the_backing(daemons, tmp_path, cluster_size):
    size = 64 * MiB
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.write(random.Random(7).randbytes(40 * MiB + 512))   # shorter than the disk
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
             "-b", base, "-F", "raw", top, size)
    base_sum = sha(base)
    ref = chain_as_raw(top, tmp_path / "ref.raw")
    srv = Served(daemons, top)
    random_workload(srv, ref, size, cluster_size, seed=cluster_size + 3)
    # The cluster holding the base's last byte, and one write-zeroes over the backing.
    h = srv.nbd()
    h.pwrite(b"\x5a" * 100, 40 * MiB + 300)
    ref_write(ref, 40 * MiB + 300, b"\x5a" * 100)
    h.zero(3 * cluster_size + 1000, 20 * MiB + 512)
    ref_write(ref, 20 * MiB + 512, bytes(3 * cluster_size + 1000))
    h.flush()
    h.shutdown()
    srv.stop()
    assert_same(top, "qcow2", ref, "raw")
    assert sha(base) == base_sum
    assert_check_clean(top)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_zeroes_and_discard_hide_the_backing(daemons, tmp_path, compat):
    """Write-zeroes (whole and partial clusters, with and without unmap) and, on v3, discard
    must read as zeroes afterwards: the backing's bytes must not show through."""
    cs = 64 * KiB
    size = 4 * MiB
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(11).randbytes(size))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},compat={compat}",
             "-b", base, "-F", "raw", top, size)
    ref = chain_as_raw(top, tmp_path / "ref.raw")
    srv = Served(daemons, top, qcow2_opts=",discard=unmap")
    h = srv.nbd()
    if compat == "1.1":   # first, while the image has no L2 table yet
        h.trim(2 * cs, 12 * cs)
        ref_write(ref, 12 * cs, bytes(2 * cs))
    h.pwrite(b"\x11" * cs, 8 * cs)                 # allocated, then zeroed below
    ref_write(ref, 8 * cs, b"\x11" * cs)
    zeroes = [(1 * cs, cs, 0), (2 * cs, cs, nbd.CMD_FLAG_NO_HOLE), (3 * cs + 100, 5000, 0),
              (5 * cs - 512, cs + 1024, nbd.CMD_FLAG_NO_HOLE), (8 * cs, cs, 0)]
    for off, n, flags in zeroes:
        h.zero(n, off, flags)
        ref_write(ref, off, bytes(n))
    if compat == "1.1":
        h.trim(cs, 8 * cs)                         # allocated: freed, flagged zero
        ref_write(ref, 8 * cs, bytes(cs))
    data = ref.read_bytes()
    assert h.pread(16 * cs, 0) == data[:16 * cs]
    h.flush()
    h.shutdown()
    srv.stop()
    assert_same(top, "qcow2", ref, "raw")
    assert_check_clean(top)


def test_writes_through_two_levels_leave_backings_unchanged(daemons, tmp_path):
    base, mid, top = make_chain(tmp_path, 4 * KiB)
    sums = (sha(base), sha(mid))
    ref = chain_as_raw(top, tmp_path / "ref.raw")
    srv = Served(daemons, top)
    # Partial clusters over mid's data, mid's zero clusters, base-only, and past the base.
    for off, n, p in [(4 * KiB + 100, 50, 0x61), (24 * KiB + 5, 3000, 0x62),
                      (40 * KiB + 4000, 200, 0x63), (2 * MiB + 1, 1, 0x64),
                      (5 * MiB + 400, 5000, 0x65), (7 * MiB + 7, 9000, 0x66)]:
        h = srv.nbd()
        h.pwrite(bytes([p]) * n, off)
        h.shutdown()
        ref_write(ref, off, bytes([p]) * n)
    assert_same(srv.uri, "raw", ref, "raw")
    srv.stop()
    assert_same(top, "qcow2", ref, "raw")
    assert (sha(base), sha(mid)) == sums
    assert_check_clean(top)
    assert_check_clean(mid)


def test_partial_write_into_zero_cluster_keeps_zeroes(daemons, tmp_path):
    """A zero cluster (freed or kept) reads zeroes: a partial write fills its rest with
    zeroes, never with the backing's bytes."""
    cs = 64 * KiB
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xee" * 2 * MiB)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, 2 * MiB)
    qemu_io("qcow2", top, f"write -z -u 0 {cs}", f"write -z {cs} {cs}")
    srv = Served(daemons, top)
    h = srv.nbd()
    h.pwrite(b"\x01" * 10, 100)
    h.pwrite(b"\x02" * 10, cs + 100)
    h.pwrite(b"\x03" * 10, 2 * cs + 100)        # unallocated: the rest from the base
    assert h.pread(cs, 0) == bytes(100) + b"\x01" * 10 + bytes(cs - 110)
    assert h.pread(cs, cs) == bytes(100) + b"\x02" * 10 + bytes(cs - 110)
    assert h.pread(cs, 2 * cs) == b"\xee" * 100 + b"\x03" * 10 + b"\xee" * (cs - 110)
    h.shutdown()
    srv.stop()
    qemu_io("qcow2", top, "read -P 0 0 100", "read -P 1 100 10", "read -P 0 110 65426",
            f"read -P 0xee {2 * cs} 100", f"read -P 3 {2 * cs + 100} 10")
    assert_check_clean(top)


# ---- the backing option -------------------------------------------------------------------

def test_backing_null_reads_zeroes(daemons, tmp_path):
    base, mid, top = make_chain(tmp_path)
    alone = tmp_path / "alone.raw"   # qemu-img's reading of the top alone
    qemu_img("convert", "-O", "raw", "json:" + json.dumps(
        {"driver": "qcow2", "backing": None, "file": {"driver": "file",
                                                      "filename": str(top)}}), alone)
    srv = Served(daemons, top, qcow2_opts=",backing=")   # QEMU's deprecated spelling of null
    assert_same(srv.uri, "raw", alone, "raw")
    h = srv.nbd()
    assert h.pread(MiB, 2 * MiB) == bytes(MiB)
    h.pwrite(b"\x44" * 100, 3 * MiB + 5)            # no copy from the backing either
    assert h.pread(64 * KiB, 3 * MiB) == bytes(5) + b"\x44" * 100 + bytes(64 * KiB - 105)
    h.shutdown()
    node = {n["node-name"]: n for n in srv.qmp.cmd("query-named-block-nodes")["return"]}["q0"]
    assert "backing_file" not in node and node["backing_file_depth"] == 0
    assert node["file"] == ('json:{"backing": null, "driver": "qcow2", "file": {"driver": '
                            f'"file", "filename": "{top}"}}}}')
    srv.stop()
    assert_check_clean(top)


def blockdev(qmp, **opts):
    return qmp.cmd("blockdev-add", opts)


def test_backing_given_as_node_name(daemons, tmp_path):
    base, mid, top = make_chain(tmp_path)
    ref = chain_as_raw(top, tmp_path / "ref.raw")
    sums = (sha(base), sha(mid))
    sock = daemons.rundir() / "nbd.sock"
    d = daemons.start(args=["--nbd-server", f"addr.type=unix,addr.path={sock}"])
    qmp = d.negotiated()
    assert blockdev(qmp, driver="file", **{"node-name": "mf"}, filename=str(mid),
                    **{"read-only": True}) == {"return": {}}
    assert blockdev(qmp, driver="qcow2", **{"node-name": "m", "read-only": True},
                    file="mf") == {"return": {}}
    assert blockdev(qmp, driver="qcow2", **{"node-name": "t"}, backing="m",
                    file={"driver": "file", "filename": str(top)}) == {"return": {}}
    assert qmp.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "t",
                                        "name": "disk", "writable": True}) == {"return": {}}
    uri = f"nbd+unix:///disk?socket={sock}"
    assert_same(uri, "raw", ref, "raw")
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x77" * 3, 64 * KiB + 1)               # copy on write from m's chain
    ref_write(ref, 64 * KiB + 1, b"\x77" * 3)
    h.shutdown()
    assert_same(uri, "raw", ref, "raw")
    assert qmp.cmd("blockdev-del", {"node-name": "m"}) == {"error": {
        "class": "GenericError", "desc": "Node 'm' is busy: node is used as backing hd of 't'"}}
    assert qmp.cmd("block-export-del", {"id": "e"}) == {"return": {}}
    deadline = time.monotonic() + 20
    while True:   # the export goes once its clients have
        r = qmp.cmd("blockdev-del", {"node-name": "t"})
        if r == {"return": {}} or time.monotonic() > deadline:
            break
    assert r == {"return": {}}
    # m keeps its own reference: still there, with its implicit backing, until deleted.
    names = [n["node-name"] for n in qmp.cmd("query-named-block-nodes")["return"]]
    assert "m" in names and "mf" in names and len(names) == 4, names
    assert qmp.cmd("blockdev-del", {"node-name": "m"}) == {"return": {}}
    assert qmp.cmd("blockdev-del", {"node-name": "mf"}) == {"return": {}}
    assert qmp.cmd("query-named-block-nodes") == {"return": []}
    assert (sha(base), sha(mid)) == sums
    assert_same(top, "qcow2", ref, "raw")


def test_backing_inline_options(daemons, tmp_path):
    base, mid, top = make_chain(tmp_path)
    qmp = daemons.start().negotiated()
    assert blockdev(qmp, driver="qcow2", **{"node-name": "t", "read-only": True},
                    file={"driver": "file", "filename": str(top)},
                    backing={"driver": "qcow2", "backing": None,
                             "file": {"driver": "file", "filename": str(mid)}}) == {"return": {}}
    nodes = qmp.cmd("query-named-block-nodes")["return"]
    t = [n for n in nodes if n["node-name"] == "t"][0]
    assert t["backing_file_depth"] == 1
    inner = ('{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": '
             f'"{mid}"}}}}')
    assert t["backing_file"] == "json:" + inner
    assert t["file"] == ('json:{"backing": ' + inner + ', "driver": "qcow2", "file": '
                         f'{{"driver": "file", "filename": "{top}"}}}}')
    assert qmp.cmd("blockdev-del", {"node-name": "t"}) == {"return": {}}
    assert qmp.cmd("query-named-block-nodes") == {"return": []}


def test_cycle_through_own_name_refused(daemons, tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, MiB)
    qmp = daemons.start().negotiated()
    r = blockdev(qmp, driver="qcow2", **{"node-name": "t", "read-only": True},
                 file={"driver": "file", "filename": str(img)},
                 backing={"driver": "raw", "file": "t"})
    assert r["error"]["desc"].startswith("Making '#block") and \
        r["error"]["desc"].endswith("a backing child of 't' would create a cycle"), r
    assert qmp.cmd("query-named-block-nodes") == {"return": []}


# ---- errors -------------------------------------------------------------------------------

def qsd_error(tmp_path, blockdevs):
    """The error qemu-storage-daemon prints for these --blockdev options (JSON)."""
    argv = ["qemu-storage-daemon"]
    for b in blockdevs:
        argv += ["--blockdev", json.dumps(b)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r.stderr
    m = re.match(r"qemu-storage-daemon: --blockdev \{.*\}: (.*)$", r.stderr.strip())
    assert m, r.stderr
    return m.group(1)


def add_error(daemons, top, extra=None):
    qmp = daemons.start().negotiated()
    opts = {"driver": "qcow2", "node-name": "t",
            "file": {"driver": "file", "filename": str(top)}}
    opts.update(extra or {})
    r = qmp.cmd("blockdev-add", opts)
    assert "error" in r and r["error"]["class"] == "GenericError", r
    assert qmp.cmd("query-named-block-nodes") == {"return": []}   # nothing left behind
    assert qmp.cmd("query-status")["return"]["status"] == "running"
    return r["error"]["desc"], opts


@pytest.mark.parametrize("name", ["missing.qcow2", "/nonexistent/dir/base.raw",
                                  "../elsewhere/base.qcow2"])
def test_missing_backing_file_error_as_qemu(daemons, tmp_path, name):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", name, "-F", "qcow2", top, MiB)
    desc, opts = add_error(daemons, top)
    assert desc == qsd_error(tmp_path, [opts])
    assert desc.startswith("Could not open backing file: Could not open '"), desc


def test_missing_backing_deeper_in_chain(daemons, tmp_path):
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", "gone.raw", "-F", "raw", mid, MiB)
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, MiB)
    desc, opts = add_error(daemons, top)
    assert desc == qsd_error(tmp_path, [opts])
    assert desc == ("Could not open backing file: Could not open backing file: Could not "
                    f"open '{tmp_path}/gone.raw': No such file or directory")


def test_unknown_backing_node_name_error_as_qemu(daemons, tmp_path):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", top, MiB)
    desc, opts = add_error(daemons, top, {"backing": "nonode"})
    assert desc == qsd_error(tmp_path, [opts]) == \
        "Could not open backing file: Cannot find device='nonode' nor node-name='nonode'"
    desc, opts = add_error(daemons, top, {"backing": 5})
    assert desc == qsd_error(tmp_path, [opts]) == \
        "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"


def test_backing_name_too_long_error_as_qemu(daemons, tmp_path):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", "b.raw", "-F", "raw", top, MiB)
    with open(top, "r+b") as f:
        f.seek(16)
        f.write(struct.pack(">I", 2000))   # name length past QEMU's 1023
    desc, opts = add_error(daemons, top)
    assert desc == qsd_error(tmp_path, [opts]) == "Backing file name too long"


def test_loop_refused(daemons, tmp_path):
    """a -> b -> a. (QEMU 7.2 recurses without end here; qemu-img info reports the loop.)"""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", a, MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    desc, _ = add_error(daemons, a, {"read-only": True})
    assert desc == ("Could not open backing file: Could not open backing file: Backing file "
                    "'a.qcow2' creates an infinite loop"), desc
    # An image naming itself.
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
    desc, _ = add_error(daemons, a, {"read-only": True})
    assert desc == "Could not open backing file: Backing file 'a.qcow2' creates an infinite loop"


def test_deep_chain_limit(daemons, tmp_path):
    """A chain of 130 qcow2 images: refused past 128 with a clear error; 100 open fine."""
    prev = None
    for i in range(131):
        img = tmp_path / f"l{i}.qcow2"
        args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"]
        if prev:
            args += ["-b", prev.name, "-F", "qcow2"]
        qemu_img(*args, img, 64 * KiB)
        prev = img
    qemu_io("qcow2", tmp_path / "l0.qcow2", "write -P 0x42 0 512")
    desc, _ = add_error(daemons, tmp_path / "l130.qcow2", {"read-only": True})
    assert "the backing chain is deeper than 128 images" in desc, desc
    qmp = daemons.start().negotiated()
    assert blockdev(qmp, driver="qcow2", **{"node-name": "t", "read-only": True},
                    file={"driver": "file", "filename": str(tmp_path / "l100.qcow2")}) == \
        {"return": {}}
    t = [n for n in qmp.cmd("query-named-block-nodes")["return"] if n["node-name"] == "t"][0]
    assert t["backing_file_depth"] == 100
    assert qmp.cmd("blockdev-del", {"node-name": "t"}) == {"return": {}}
    assert qmp.cmd("query-named-block-nodes") == {"return": []}


# ---- formats: the header extension, or probing --------------------------------------------

def strip_backing_format(img):
    """Make the backing format extension an unknown one (ignored): the format is probed."""
    with open(img, "r+b") as f:
        hdr = f.read(4096)
        pos = struct.unpack(">I", hdr[100:104])[0]
        while True:
            t, n = struct.unpack(">II", hdr[pos:pos + 8])
            assert t != 0, "no backing format extension"
            if t == 0xe2792aca:
                f.seek(pos)
                f.write(struct.pack(">I", 0x7b7b7b7b))
                return
            pos += 8 + (n + 7) // 8 * 8


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_backing_format_probed(daemons, tmp_path, base_fmt):
    base, top = tmp_path / f"base.{base_fmt}", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", base_fmt, base, 2 * MiB)
    qemu_io(base_fmt, base, "write -P 0x5c 0 2M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", base_fmt, top)
    strip_backing_format(top)
    srv = Served(daemons, top, writable=False)
    qemu_io_ro(srv, "read -P 0x5c 0 2M")
    nodes = srv.qmp.cmd("query-named-block-nodes")["return"]
    q0 = [n for n in nodes if n["node-name"] == "q0"][0]
    assert q0["image"]["backing-image"]["format"] == base_fmt
    assert "backing-filename-format" not in q0["image"]
    srv.stop()


# ---- queries compared with QEMU's ---------------------------------------------------------

NAME = re.compile(r"^#block\d+$")


def normalized(nodes):
    """Generated node names replaced by their order of first appearance."""
    names = {}
    for n in nodes:
        if NAME.match(n["node-name"]):
            names.setdefault(n["node-name"], f"#anon{len(names)}")
    # Known difference outside backing files: QEMU gives a file node's size in whole
    # 512-byte sectors (a new qcow2 file is not a multiple of 512), thinblkd in bytes.
    for n in nodes:
        if n["drv"] == "file":
            n["image"]["virtual-size"] = (n["image"]["virtual-size"] + 511) // 512 * 512
    return json.loads(re.sub(r'"(#block\d+)"', lambda m: json.dumps(names.get(m.group(1),
                                                                               m.group(1))),
                             json.dumps(nodes)))


def qsd_query(daemons, blockdevs, commands):
    """Run qemu-storage-daemon with these --blockdev options; the replies to commands."""
    rundir = daemons.rundir()
    sock = rundir / "qsd.sock"
    argv = ["--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"]
    for b in blockdevs:
        argv += ["--blockdev", json.dumps(b)]
    proc = subprocess.Popen(["qemu-storage-daemon", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        c = QMPClient(sock)
        c.negotiate()
        out = [c.cmd(name, args) for name, args in commands]
        c.cmd("quit")
        c.close()
    finally:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def ours_query(daemons, blockdevs, commands):
    argv = []
    for b in blockdevs:
        argv += ["--blockdev", json.dumps(b)]
    d = daemons.start(args=argv)
    qmp = d.negotiated()
    out = [qmp.cmd(name, args) for name, args in commands]
    assert d.shutdown() == []
    return out


QUERIES = [("query-named-block-nodes", None), ("query-named-block-nodes", {"flat": True})]


@pytest.mark.parametrize("variant", ["implicit", "subdir", "null", "by-name", "inline"])
def test_query_named_block_nodes_as_qemu(daemons, tmp_path, variant):
    base, mid, top = make_chain(tmp_path)
    if variant == "subdir":   # relative names resolved against the image's directory
        (tmp_path / "sub").mkdir()
        top = tmp_path / "sub" / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", top)
    blockdevs = [{"driver": "file", "node-name": "f0", "filename": str(top)}]
    q0 = {"driver": "qcow2", "node-name": "q0", "file": "f0"}
    if variant == "null":
        q0["backing"] = None
    elif variant == "by-name":
        blockdevs = [{"driver": "file", "node-name": "mf", "filename": str(mid),
                      "read-only": True},
                     {"driver": "qcow2", "node-name": "m", "file": "mf", "read-only": True},
                     *blockdevs]
        q0["backing"] = "m"
    elif variant == "inline":
        q0["backing"] = {"driver": "qcow2", "backing": None,
                         "file": {"driver": "file", "filename": str(mid)}}
    blockdevs.append(q0)
    theirs = qsd_query(daemons, blockdevs, QUERIES)
    ours = ours_query(daemons, blockdevs, QUERIES)
    for t, o in zip(theirs, ours):
        assert normalized(o["return"]) == normalized(t["return"])


def test_query_block_shows_the_chain(daemons, tmp_path):
    base, mid, top = make_chain(tmp_path)
    srv = Served(daemons, top)
    blocks = srv.qmp.cmd("query-block")["return"]
    assert len(blocks) == 1
    ins = blocks[0]["inserted"]
    named = {n["node-name"]: n for n in srv.qmp.cmd("query-named-block-nodes")["return"]}
    assert ins == named["q0"]
    assert ins["backing_file_depth"] == 2 and ins["backing_file"] == str(mid)
    img = ins["image"]
    assert (img["backing-filename"], img["full-backing-filename"],
            img["backing-filename-format"]) == ("mid.qcow2", str(mid), "qcow2")
    assert img["backing-image"]["filename"] == str(mid)
    assert img["backing-image"]["backing-image"] == {
        "virtual-size": base.stat().st_size, "filename": str(base), "format": "raw",
        "actual-size": base.stat().st_blocks * 512, "dirty-flag": False}
    srv.stop()
