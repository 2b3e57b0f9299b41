"""The qcow2 format driver, with qemu-img and qemu-io as the oracle.

Images are created by qemu-img, served by thinblkd (file node + qcow2 node, NBD export),
written by qemu-io and python3-libnbd while the same bytes go to a raw reference file; then
the daemon stops and `qemu-img compare` must find the image identical to the reference and
`qemu-img check` must find no error and no leak.
"""
import json
import os
import random
import re
import struct
import subprocess
import threading

import nbd
import pytest

from conftest import thinblk_only

KiB = 1 << 10
MiB = 1 << 20

pytestmark = thinblk_only


def qemu_img(*args, check=True):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          check=check)


def create(path, size, cluster_size=64 * KiB, compat="1.1", refcount_bits=16, extra=""):
    opts = f"cluster_size={cluster_size},compat={compat}"
    if compat != "0.10":
        opts += f",refcount_bits={refcount_bits}"
    if extra:
        opts += "," + extra
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, size)


def assert_clean(img, ref):
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, ref, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Images are identical" in r.stdout
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found on the image" in r.stdout, r.stdout
    assert "leaked" not in r.stdout + r.stderr, r.stdout


class Served:
    """thinblkd serving one qcow2 image over NBD, with a monitor."""

    def __init__(self, daemons, img, writable=True, qcow2_opts="", fault=False, file_opts=""):
        self.daemons = daemons
        rundir = daemons.rundir()
        self.sock = rundir / "nbd.sock"
        child = "f0"
        args = ["--blockdev", f"driver=file,node-name=f0,filename={img}{file_opts}"]
        if fault:
            args += ["--blockdev", "driver=fault,node-name=flt,file=f0"]
            child = "flt"
        args += ["--blockdev", f"driver=qcow2,node-name=q0,file={child}{qcow2_opts}",
                "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                "--export", "type=nbd,id=d0,node-name=q0,name=disk,writable="
                + ("on" if writable else "off")]
        self.d = daemons.start(args=args)
        self.qmp = self.d.negotiated()
        self.uri = f"nbd+unix:///disk?socket={self.sock}"

    def nbd(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        return h

    def qemu_io(self, *cmds):
        argv = ["qemu-io", "-f", "raw"]
        for c in cmds:
            argv += ["-c", c]
        r = subprocess.run(argv + [self.uri], capture_output=True, text=True)
        assert r.returncode == 0 and "error" not in r.stdout.lower() + r.stderr.lower(), \
            r.stdout + r.stderr
        return r.stdout

    def stop(self):
        problems = self.d.shutdown()
        assert problems == [], problems
        assert "ERROR" not in self.d.stderr(), self.d.stderr()


def ref_write(ref, off, data):
    with open(ref, "r+b") as f:
        f.seek(off)
        f.write(data)


def make_ref(ref, size):
    with open(ref, "wb") as f:
        f.truncate(size)


def random_workload(srv, ref, size, cluster_size, seed):
    """qemu-io patterns and libnbd random bytes, aligned and not, spanning clusters."""
    rnd = random.Random(seed)
    # qemu-io: whole and partial clusters.
    for i in range(6):
        pattern = rnd.randrange(1, 256)
        length = rnd.choice([cluster_size, 2 * cluster_size, 4 * KiB, 512, 3 * 512])
        off = rnd.randrange(0, (size - length) // 512) * 512
        srv.qemu_io(f"write -P {pattern} {off} {length}")
        ref_write(ref, off, bytes([pattern]) * length)
    # libnbd: unaligned offsets and lengths, many in flight.
    h = srv.nbd()
    cookies = []
    writes = []
    for i in range(40):
        length = rnd.choice([1, 7, 511, 513, 4095, cluster_size + 3, 3 * cluster_size // 2,
                             rnd.randrange(1, 300 * KiB)])
        off = rnd.randrange(0, size - length)
        data = rnd.randbytes(length)
        writes.append((off, data))
    # Overlapping writes in flight at once have no defined order: send them one by one
    # where they overlap, and many at once where they do not.
    busy = []
    for off, data in writes:
        if any(off < o + l and o < off + len(data) for o, l in busy):
            for c in cookies:
                while not h.aio_command_completed(c):
                    h.poll(-1)
            cookies, busy = [], []
        cookies.append(h.aio_pwrite(bytearray(data), off))
        busy.append((off, len(data)))
        ref_write(ref, off, data)
    for c in cookies:
        while not h.aio_command_completed(c):
            h.poll(-1)
    # A sequential run across many clusters (and L2 tables for small clusters).
    seq = rnd.randbytes(min(4 * MiB, size // 4))
    h.pwrite(seq, size // 2)
    ref_write(ref, size // 2, seq)
    h.flush()
    # Read back through the daemon.
    with open(ref, "rb") as f:
        for off, data in writes + [(size // 2, seq)]:
            f.seek(off)
            assert h.pread(len(data), off) == f.read(len(data)), f"differs at {off}"
    h.shutdown()


GEOMETRIES = [
    # cluster size, compat, refcount bits
    (512, "1.1", 1),
    (512, "1.1", 64),
    (512, "0.10", 16),
    (4 * KiB, "1.1", 16),
    (4 * KiB, "1.1", 64),
    (64 * KiB, "0.10", 16),
    (64 * KiB, "1.1", 1),
    (2 * MiB, "1.1", 16),
    (2 * MiB, "1.1", 64),
]


@pytest.mark.parametrize("cluster_size,compat,refcount_bits", GEOMETRIES)
def test_random_writes_match_raw_reference(daemons, tmp_path, cluster_size, compat,
                                           refcount_bits):
    size = 64 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, cluster_size, compat, refcount_bits)
    make_ref(ref, size)
    srv = Served(daemons, img)
    random_workload(srv, ref, size, cluster_size, seed=cluster_size * 7 + refcount_bits)
    srv.stop()
    assert_clean(img, ref)


def test_refcount_table_grows(daemons, tmp_path):
    """512-byte clusters, 64-bit refcounts: a refcount block covers 32 KiB and the first
    table 2 MiB, so writing 8 MiB needs new blocks and a larger table, several times."""
    size = 16 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, 512, "1.1", 64)
    before = qemu_img("info", "--output=json", img).stdout
    make_ref(ref, size)
    srv = Served(daemons, img)
    h = srv.nbd()
    data = random.Random(9).randbytes(8 * MiB)
    for off in range(0, len(data), MiB):
        h.pwrite(data[off:off + MiB], 4 * MiB + off)
    ref_write(ref, 4 * MiB, data)
    assert h.pread(len(data), 4 * MiB) == data
    h.shutdown()
    srv.stop()
    assert_clean(img, ref)
    with open(img, "rb") as f:
        hdr = f.read(64)
    rt_clusters = struct.unpack(">I", hdr[56:60])[0]
    assert rt_clusters > 1, before


def test_reads_images_written_by_qemu(daemons, tmp_path):
    """qemu-io writes the image (data, zero clusters with and without their cluster,
    discarded clusters); thinblkd reads what qemu reads, then writes into a zeroed
    cluster, and the image stays clean."""
    size = 32 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, 64 * KiB, "1.1", 16)
    cmds = ["write -P 0x11 0 1M", "write -P 0x22 3M 200k", "write -P 0x33 20M 64k",
            "write -z 256k 128k",            # zero flag, cluster kept
            "write -z -u 512k 128k",         # zero flag, cluster freed
            "discard 3M 64k",
            "write -P 0x44 31M 1M"]
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(img)], check=True, capture_output=True)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, ref)
    srv = Served(daemons, img)
    r = qemu_img("compare", "-f", "raw", "-F", "raw", srv.uri, ref, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # Partial writes into a zero cluster that keeps its host cluster, and a freed one.
    srv.qemu_io("write -P 0x55 300k 4k", "write -P 0x66 600k 1k", "write -P 0x77 3M 512")
    ref_write(ref, 300 * KiB, b"\x55" * 4 * KiB)
    ref_write(ref, 600 * KiB, b"\x66" * KiB)
    ref_write(ref, 3 * MiB, b"\x77" * 512)
    srv.stop()
    assert_clean(img, ref)


def test_write_zeroes_and_discard(daemons, tmp_path):
    size = 8 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size)
    make_ref(ref, size)
    srv = Served(daemons, img)
    h = srv.nbd()
    h.pwrite(b"\xaa" * MiB, 0)
    h.zero(10 * KiB, 100 * KiB)           # (count, offset): inside an allocated cluster
    h.zero(2 * MiB, 2 * MiB)              # unallocated: nothing to do
    h.trim(64 * KiB, 512 * KiB)           # advisory: data stays
    ref_write(ref, 0, b"\xaa" * MiB)
    ref_write(ref, 100 * KiB, bytes(10 * KiB))
    with open(ref, "rb") as f:
        assert h.pread(MiB, 0) == f.read(MiB)
    assert h.pread(2 * MiB, 2 * MiB) == bytes(2 * MiB)
    h.shutdown()
    srv.stop()
    assert_clean(img, ref)


def test_fua_and_flush(daemons, tmp_path):
    size = 4 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size)
    make_ref(ref, size)
    srv = Served(daemons, img)
    h = srv.nbd()
    h.pwrite(b"\x01" * 70000, 12345, nbd.CMD_FLAG_FUA)
    ref_write(ref, 12345, b"\x01" * 70000)
    h.flush()
    h.shutdown()
    srv.stop()
    assert_clean(img, ref)


def test_query_named_block_nodes(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create(img, 10 * MiB)
    srv = Served(daemons, img)
    nodes = {n["node-name"]: n for n in srv.qmp.cmd("query-named-block-nodes")["return"]}
    q0 = nodes["q0"]
    assert q0["drv"] == "qcow2"
    assert q0["image"]["format"] == "qcow2"
    assert q0["image"]["virtual-size"] == 10 * MiB
    assert q0["file"] == str(img)
    srv.stop()


def test_read_only_image(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create(img, 4 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 64k", str(img)],
                   check=True, capture_output=True)
    srv = Served(daemons, img, writable=False)
    h = srv.nbd()
    assert h.is_read_only()
    assert h.pread(64 * KiB, 0) == b"\x42" * 64 * KiB
    h.shutdown()
    srv.stop()


def built_with_zlib():
    from conftest import BUILD_DIR
    try:
        with open(BUILD_DIR / "meson-info" / "intro-dependencies.json") as f:
            return any(d["name"] == "zlib" for d in json.load(f))
    except OSError:
        return False


@pytest.mark.parametrize("cluster_size", [512, 64 * KiB, 2 * MiB])
def test_reads_compressed_image(daemons, tmp_path, cluster_size):
    """qemu-img convert -c writes compressed clusters (text, random bytes that do not
    compress and stay uncompressed, zeroes, a partial last cluster); thinblkd reads back the
    raw image, in whole and in pieces that start and end inside compressed clusters."""
    if not built_with_zlib():
        pytest.skip("thinblkd built without zlib: compressed clusters are not supported")
    size = 6 * MiB + 3 * KiB
    raw, img = tmp_path / "raw.img", tmp_path / "comp.qcow2"
    rng = random.Random(cluster_size)
    with open(raw, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"".join(b"line %08d of some compressible text\n" % i
                         for i in range(40000))[:2 * MiB + 777])
        f.seek(3 * MiB)
        f.write(rng.randbytes(300 * KiB))
        f.seek(5 * MiB)
        f.write(bytes(range(256)) * (4 * KiB))
        f.seek(size - 1000)
        f.write(b"\x5a" * 1000)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size={cluster_size}", raw, img)
    r = qemu_img("check", "--output=json", img)
    assert json.loads(r.stdout).get("compressed-clusters", 0) > 0, r.stdout
    srv = Served(daemons, img, writable=False)
    h = srv.nbd()
    data = raw.read_bytes()
    assert h.pread(size, 0) == data
    for _ in range(50):
        off = rng.randrange(size)
        n = rng.randrange(1, min(size - off, 300 * KiB) + 1)
        assert h.pread(n, off) == data[off:off + n], (off, n)
    h.shutdown()
    r = qemu_img("compare", "-f", "raw", "-F", "raw", srv.uri, raw, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    srv.stop()


def test_corrupt_compressed_cluster_fails_read(daemons, tmp_path):
    """Garbage in a compressed cluster's deflate stream: reading it fails (EIO), its
    neighbours still read; a partial write over it fails too (nothing to copy), and one
    over a good compressed cluster works."""
    if not built_with_zlib():
        pytest.skip("thinblkd built without zlib: compressed clusters are not supported")
    cs = 64 * KiB
    raw, img = tmp_path / "raw.img", tmp_path / "comp.qcow2"
    data = b"".join(b"record %06d\n" % i for i in range(20000))[:4 * cs]
    raw.write_bytes(data)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs}", raw, img)
    with open(img, "r+b") as f:
        hdr = f.read(72)
        l1_off = struct.unpack(">Q", hdr[40:48])[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
        f.seek(l2_off + 8)                  # the L2 entry of cluster 1
        e = struct.unpack(">Q", f.read(8))[0]
        assert e & (1 << 62), hex(e)
        f.seek(e & ((1 << (62 - (16 - 8))) - 1))
        f.write(b"\xff" * 64)
    srv = Served(daemons, img)
    h = srv.nbd()
    assert h.pread(cs, 0) == data[:cs]
    with pytest.raises(nbd.Error):
        h.pread(4 * KiB, cs + 4 * KiB)
    assert h.pread(2 * cs, 2 * cs) == data[2 * cs:]
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, cs + 512)
    h.pwrite(b"x" * 512, 512)
    assert h.pread(cs, 0) == data[:512] + b"x" * 512 + data[1024:cs]
    h.shutdown()
    assert srv.d.shutdown() == []
    assert "cannot decompress" in srv.d.stderr(), srv.d.stderr()
    assert "copy-on-write for offset %d failed: Input/output error" % (cs + 512) \
        in srv.d.stderr(), srv.d.stderr()


@pytest.mark.parametrize("cluster_size", [512, 64 * KiB])
def test_writes_over_compressed_clusters(daemons, tmp_path, cluster_size):
    """Writes over compressed clusters (partial, whole, spanning several; write-zeroes and
    discard over them): a new cluster gets the decompressed data around the written bytes,
    and the compressed cluster's refcounts drop; qemu-img finds the image identical to the
    reference with no leak, and fewer compressed clusters."""
    if not built_with_zlib():
        pytest.skip("thinblkd built without zlib: compressed clusters are not supported")
    cs = cluster_size
    raw, img = tmp_path / "ref.raw", tmp_path / "comp.qcow2"
    size = 2 * MiB
    text = b"".join(b"line %08d of some compressible text\n" % i for i in range(60000))
    raw.write_bytes(text[:size])
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs}", raw, img)
    before = json.loads(qemu_img("check", "--output=json", img).stdout)["compressed-clusters"]
    srv = Served(daemons, img, qcow2_opts=",discard=unmap")
    h = srv.nbd()
    rnd = random.Random(cs)
    writes = [(cs + 100, 7), (3 * cs, cs), (5 * cs - 300, 2 * cs + 600), (size - 1, 1)]
    for off, n in writes:
        d = rnd.randbytes(n)
        h.pwrite(d, off)
        ref_write(raw, off, d)
    h.zero(cs, 9 * cs)                       # whole cluster, unmap allowed
    ref_write(raw, 9 * cs, bytes(cs))
    h.zero(100, 11 * cs + 50)                # partial: copy-on-write of zeroes
    ref_write(raw, 11 * cs + 50, bytes(100))
    h.trim(2 * cs, 13 * cs)                  # discard: reads as zeroes after
    ref_write(raw, 13 * cs, bytes(2 * cs))
    assert h.pread(size, 0) == raw.read_bytes()
    h.shutdown()
    srv.stop()
    assert_clean(img, raw)
    after = json.loads(qemu_img("check", "--output=json", img).stdout)["compressed-clusters"]
    assert after < before


# ---- refused images -------------------------------------------------------------------

def open_error(daemons, img, extra=""):
    """The error blockdev-add gives for a qcow2 node on img."""
    d = daemons.start()
    qmp = d.negotiated()
    r = qmp.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)})
    assert r == {"return": {}}
    opts = {"driver": "qcow2", "node-name": "q0", "file": "f0"}
    opts.update(extra or {})
    r = qmp.cmd("blockdev-add", opts)
    assert "error" in r, r
    assert r["error"]["class"] == "GenericError"
    # The daemon keeps running and the file node is unused again.
    assert qmp.cmd("blockdev-del", {"node-name": "f0"}) == {"return": {}}
    return r["error"]["desc"]


def patch_header(img, offset, fmt, value):
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def test_unknown_incompatible_feature_refused(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create(img, MiB)
    patch_header(img, 72, ">Q", 1 << 40)
    assert open_error(daemons, img) == \
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"


def test_extended_l2_refused_by_name(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create(img, MiB, extra="extended_l2=on")
    assert open_error(daemons, img) == "Unsupported qcow2 feature(s): extended L2 entries"


def test_not_qcow2_refused(daemons, tmp_path):
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    assert open_error(daemons, img) == "Image is not in qcow2 format"


def test_corrupt_image_refused_read_write(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create(img, MiB)
    patch_header(img, 72, ">Q", 2)
    assert open_error(daemons, img) == "qcow2: Image is corrupt; cannot be opened read/write"
    d = daemons.start()
    qmp = d.negotiated()
    assert qmp.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "read-only": True,
                                    "filename": str(img)}) == {"return": {}}
    assert qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0",
                                    "read-only": True}) == {"return": {}}


def test_refused_on_command_line(daemons, tmp_path):
    img = tmp_path / "disk.qcow2"
    create(img, MiB)
    patch_header(img, 72, ">Q", 1 << 20)
    r = subprocess.run([daemons.binary(), "--blockdev",
                        f"driver=file,node-name=f0,filename={img}",
                        "--blockdev", "driver=qcow2,node-name=q0,file=f0"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000" in r.stderr


def test_small_caches_from_the_command_line(daemons, tmp_path):
    """l2-cache-size and refcount-cache-size as key=value options (integers, as QEMU's),
    small enough that tables are evicted and loaded again all the time."""
    size, cs = 64 * MiB, 4 * KiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, cs)
    make_ref(ref, size)
    srv = Served(daemons, img, qcow2_opts=",l2-cache-size=8192,refcount-cache-size=8192")
    random_workload(srv, ref, size, cs, seed=99)
    srv.stop()
    assert_clean(img, ref)
    r = subprocess.run([daemons.binary(), "--blockdev", f"driver=file,node-name=f0,filename={img}",
                        "--blockdev", "driver=qcow2,node-name=q0,file=f0,l2-cache-size=1M"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert "Parameter 'l2-cache-size' expects integer" in r.stderr, r.stderr


# ---- running out of space -------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    mnt = tmp_path / "store"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "thinblk-qcow2", str(mnt)],
                   check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def grow(mnt, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


class Writer(threading.Thread):
    def __init__(self, h, chunks):
        super().__init__(daemon=True)
        self.h, self.chunks, self.errors = h, chunks, []

    def run(self):
        try:
            cookies = [self.h.aio_pwrite(bytearray(d), off) for off, d in self.chunks]
            cookies.append(self.h.aio_flush())
            for c in cookies:
                while not self.h.aio_command_completed(c):
                    self.h.poll(-1)
        except nbd.Error as e:
            self.errors.append(str(e))


@pytest.mark.parametrize("cluster_size", [64 * KiB, 4 * KiB])
def test_enospc_stops_and_cont_completes(daemons, tmpfs, tmp_path, cluster_size):
    size = 64 * MiB
    img, ref = tmpfs / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, cluster_size)
    make_ref(ref, size)
    srv = Served(daemons, img)
    rnd = random.Random(cluster_size)
    # 16 MiB in 1 MiB writes, some shifted off cluster boundaries.
    chunks = [(off + rnd.choice([0, 0, 512, 3000]), rnd.randbytes(MiB))
              for off in range(0, 16 * MiB, 2 * MiB)]
    chunks += [(off, rnd.randbytes(MiB)) for off in range(33 * MiB, 41 * MiB, MiB)]
    h = srv.nbd()
    w = Writer(h, chunks)
    w.start()
    rounds = 0
    limit = 8
    saw_error = False
    while w.is_alive():
        try:
            ev = srv.qmp.events.pop(0) if srv.qmp.events else srv.qmp.read_event(timeout=1)
        except TimeoutError:
            continue
        if ev["event"] == "BLOCK_IO_ERROR":
            assert ev["data"]["nospace"] is True and ev["data"]["action"] == "stop", ev
            saw_error = True
        elif ev["event"] == "STOP":
            assert saw_error, "STOP without BLOCK_IO_ERROR"
            assert srv.qmp.cmd("query-status")["return"]["status"] == "io-error"
            rounds += 1
            limit = min(limit + 6, 80)
            grow(tmpfs, f"{limit}M")
            assert srv.qmp.cmd("cont") == {"return": {}}
    w.join(60)
    assert not w.is_alive() and w.errors == []
    assert rounds >= 1
    for off, data in chunks:
        ref_write(ref, off, data)
        assert h.pread(len(data), off) == data
    h.shutdown()
    srv.stop()
    assert_clean(img, ref)


def run_until_done(srv, w):
    """Let the writer finish, sending cont whenever the disk stops. Returns the stops."""
    stops = 0
    while w.is_alive():
        try:
            ev = srv.qmp.events.pop(0) if srv.qmp.events else srv.qmp.read_event(timeout=0.05)
        except TimeoutError:
            continue
        if ev["event"] == "BLOCK_IO_ERROR":
            assert ev["data"]["nospace"] is True, ev
        if ev["event"] == "STOP":
            stops += 1
            assert srv.qmp.cmd("cont") == {"return": {}}
    w.join()
    return stops


# What the driver logs when a write of each kind of metadata (or data) fails.
WRITE_KINDS = ["refcount block write", "new refcount blocks write",
               "refcount table link write", "new L2 table write", "L1 table write",
               "L2 table write at", "data write"]


@pytest.mark.parametrize("cluster_size,refcount_bits", [(512, 64), (4 * KiB, 16)])
def test_enospc_at_every_metadata_step(daemons, tmp_path, cluster_size, refcount_bits):
    """ENOSPC injected on the Nth write of an allocating request (or its Nth flush), for
    N = 0, 1, 2...: refcount blocks, refcount structure growth (new blocks, table, header
    and table links), new L2 tables, L1 and L2 entries, data. Each time the disk stops, cont
    retries the request, and in the end the image is what was written, with no corruption
    and no leak; every kind of write has failed at least once."""
    size = 128 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, cluster_size, "1.1", refcount_bits)
    make_ref(ref, size)
    srv = Served(daemons, img, fault=True)
    h = srv.nbd()
    rnd = random.Random(cluster_size)
    total_stops = 0
    # Requests apart, a new L2 table for every other one or more.
    stride = max(cluster_size * cluster_size // 16, 48 * cluster_size)
    for n in range(60):
        off = n * stride + 777
        data = rnd.randbytes(40 * cluster_size + 5)
        op = "flush" if n % 10 == 9 else "write"
        assert srv.qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": [
            {"op": op, "errno": "ENOSPC", "once": True, "after": (n // 2) % 8}]}) == {"return": {}}
        w = Writer(h, [(off, data)])
        w.start()
        total_stops += run_until_done(srv, w)
        assert w.errors == []
        ref_write(ref, off, data)
        assert h.pread(len(data), off) == data
    assert total_stops >= 20
    h.shutdown()
    srv.stop()
    log = srv.d.stderr()
    missing = [k for k in WRITE_KINDS
               if not re.search(re.escape(k) + r".*No space left on device", log)]
    if cluster_size > 512:  # one refcount block covers the whole run
        missing = [k for k in missing if "link" not in k and "new refcount" not in k]
    assert missing == [], log
    assert "flush failed: No space left on device" in log
    assert_clean(img, ref)


@pytest.mark.parametrize("where", ["header", "refcount-table"])
def test_enospc_linking_refcount_structures(daemons, tmp_path, where):
    """512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and the first
    refcount table 2 MiB. ENOSPC on the write that links new refcount blocks (a refcount
    table entry, or the header pointing at a new, larger table): the disk stops, cont
    retries, and the image ends clean with what was written."""
    size = 16 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, 512, "1.1", 64)
    make_ref(ref, size)
    with open(img, "rb") as f:
        rt_offset = struct.unpack(">Q", f.read(56)[48:56])[0]
    srv = Served(daemons, img, fault=True)
    h = srv.nbd()
    rule = {"op": "write", "errno": "ENOSPC", "once": True}
    rule.update({"offset": 0, "length": 512} if where == "header" else
                {"offset": rt_offset, "length": 512})
    # The rule fires once; set it again after each stop until the data is written.
    data = random.Random(3).randbytes(6 * MiB)
    stops = 0
    for i in range(0, len(data), 256 * KiB):
        assert srv.qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt",
                                                       "rules": [rule]}) == {"return": {}}
        w = Writer(h, [(i, data[i:i + 256 * KiB])])
        w.start()
        stops += run_until_done(srv, w)
        assert w.errors == []
    ref_write(ref, 0, data)
    assert h.pread(len(data), 0) == data
    assert stops >= 2
    h.shutdown()
    srv.stop()
    kind = "header link write" if where == "header" else "refcount table link write"
    assert re.search(kind + r" failed: No space left on device", srv.d.stderr())
    assert_clean(img, ref)


def qemu_map(img):
    return json.loads(qemu_img("map", "--output=json", "-f", "qcow2", img).stdout)


def extent_at(m, off):
    return next(e for e in m if e["start"] <= off < e["start"] + e["length"])


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_discard_and_write_zeroes_free_clusters(daemons, tmp_path, compat):
    """discard=unmap: discard clears whole clusters' entries and frees them (the file shrinks
    in use: qemu-img check counts fewer allocated clusters, no leak); write-zeroes with
    unmap sets the zero flag and frees the cluster, without unmap keeps it flagged zero
    (v3); v2 writes zeroes. Partial clusters get zeroes in place (discard: untouched).
    Freed clusters are used again by later writes."""
    cs = 64 * KiB
    size = 8 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, cs, compat)
    make_ref(ref, size)
    srv = Served(daemons, img, qcow2_opts=",discard=unmap")
    h = srv.nbd()
    h.pwrite(b"\xaa" * (2 * MiB), 0)
    ref_write(ref, 0, b"\xaa" * (2 * MiB))
    h.trim(2 * cs, 2 * cs)                    # clusters 2, 3
    ref_write(ref, 2 * cs, bytes(2 * cs))
    h.trim(100, 6 * cs + 10)                  # partial: data stays
    h.zero(2 * cs, 8 * cs)                    # clusters 8, 9: may unmap
    ref_write(ref, 8 * cs, bytes(2 * cs))
    h.zero(cs, 12 * cs, nbd.CMD_FLAG_NO_HOLE)  # cluster 12: keep it allocated
    ref_write(ref, 12 * cs, bytes(cs))
    h.zero(1000, 14 * cs + 24)                # partial: zeroes in place
    ref_write(ref, 14 * cs + 24, bytes(1000))
    h.zero(2 * cs + 1000, 16 * cs + 1000)     # the tail of 16, all of 17, the head of 18
    ref_write(ref, 16 * cs + 1000, bytes(2 * cs + 1000))
    freed = [2, 3, 8, 9, 17] if compat == "1.1" else [2, 3]
    # Freed clusters are used again.
    h.pwrite(b"\x55" * (len(freed) * cs), 4 * MiB)
    ref_write(ref, 4 * MiB, b"\x55" * (len(freed) * cs))
    with open(ref, "rb") as f:
        assert h.pread(size, 0) == f.read(size)
    h.shutdown()
    srv.stop()
    assert_clean(img, ref)
    m = qemu_map(img)
    for c in freed:
        e = extent_at(m, c * cs)
        assert e["zero"] is True and "offset" not in e, (c, e)
    if compat == "0.10":
        e = extent_at(m, 8 * cs)
        assert e["data"] is True, e             # v2: zeroes written
    else:
        e = extent_at(m, 17 * cs)
        assert e["zero"] is True and e["data"] is False and "offset" not in e, e
    e = extent_at(m, 12 * cs)
    if compat == "1.1":
        assert e["zero"] is True and e["data"] is False and "offset" in e, e  # flag, kept
    else:
        assert e["data"] is True, e
    for c in (6, 14):
        e = extent_at(m, c * cs)
        assert e["data"] is True and e["zero"] is False, (c, e)
    last = extent_at(m, 31 * cs)["offset"] + (31 * cs - extent_at(m, 31 * cs)["start"])
    for c in range(len(freed)):
        e = extent_at(m, 4 * MiB + c * cs)
        assert e["offset"] + (4 * MiB + c * cs - e["start"]) < last, e
    allocated = json.loads(qemu_img("check", "--output=json", img).stdout)["allocated-clusters"]
    assert allocated == 32


@pytest.mark.parametrize("mode", ["off", "on", "unmap"])
def test_detect_zeroes(daemons, tmp_path, mode):
    """A guest's zero buffers (qemu-io write -P 0 through NBD) on a qcow2 node with
    detect-zeroes: over unallocated clusters nothing is allocated (on, unmap), over data whole
    clusters become zero clusters, kept (on) or freed and deallocated in the file (unmap),
    partial ones get zeroes in place. off writes them as data."""
    cs = 64 * KiB
    size = 16 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, cs)
    make_ref(ref, size)
    srv = Served(daemons, img, qcow2_opts=f",discard=unmap,detect-zeroes={mode}",
                 file_opts=",discard=unmap")
    srv.qemu_io("write -P 0x5a 0 2M", "flush")
    ref_write(ref, 0, b"\x5a" * (2 * MiB))
    written = os.stat(img).st_blocks * 512
    srv.qemu_io("write -P 0 0 1M", "write -P 0 8M 4M", "write -P 0 1536k 4k", "flush")
    ref_write(ref, 0, bytes(MiB))
    ref_write(ref, 1536 * KiB, bytes(4 * KiB))
    blocks = os.stat(img).st_blocks * 512
    srv.stop()
    assert_clean(img, ref)
    m = qemu_map(img)
    over_data, over_hole, partial = extent_at(m, 0), extent_at(m, 8 * MiB), \
        extent_at(m, 1536 * KiB)
    assert partial["data"] is True, partial
    if mode == "off":
        assert over_data["data"] is True and over_hole["data"] is True, m
        assert blocks >= written + 4 * MiB
        return
    assert over_hole["zero"] is True and over_hole["data"] is False, over_hole
    assert "offset" not in over_hole and over_hole["length"] >= 4 * MiB, over_hole
    assert over_data["zero"] is True and over_data["data"] is False, over_data
    assert over_data["length"] == MiB, over_data
    if mode == "on":
        assert "offset" in over_data, over_data       # zero flag, cluster kept
        assert blocks <= written + cs                 # (the file system's extent blocks vary)
    else:
        assert "offset" not in over_data, over_data   # freed, the file's range punched
        assert blocks <= written - MiB + cs           # (the file system's extent blocks vary)


def test_discarded_clusters_reused_after_restart(daemons, tmp_path):
    """Clusters discarded before a restart, below the image's last cluster in use, are found
    again by the open-time check and used by the next writes: the file neither grows nor
    takes more blocks than before the discard."""
    cs = 64 * KiB
    size = 64 * MiB
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, size, cs)
    make_ref(ref, size)
    opts = dict(qcow2_opts=",discard=unmap", file_opts=",discard=unmap")
    srv = Served(daemons, img, **opts)
    h = srv.nbd()
    h.pwrite(b"\x11" * (8 * MiB), 0)
    h.pwrite(b"\x33" * cs, 48 * MiB)        # after them in the file: the end stays
    ref_write(ref, 48 * MiB, b"\x33" * cs)
    h.flush()
    written = os.stat(img)
    h.trim(8 * MiB, 0)
    h.shutdown()
    srv.stop()
    assert os.stat(img).st_blocks < written.st_blocks - 8 * MiB // 512 // 2
    srv = Served(daemons, img, **opts)
    h = srv.nbd()
    h.pwrite(b"\x22" * (8 * MiB), 32 * MiB)
    ref_write(ref, 32 * MiB, b"\x22" * (8 * MiB))
    h.shutdown()
    srv.stop()
    again = os.stat(img)
    assert again.st_size == written.st_size
    # Within a cluster: the file system's own extent blocks (counted in st_blocks) vary.
    assert again.st_blocks <= written.st_blocks + cs // 512
    assert_clean(img, ref)


@pytest.mark.parametrize("target", ["l1", "refcount-block", "l2"])
def test_write_overlapping_metadata_marks_corrupt(daemons, tmp_path, target):
    """An L2 entry pointing at metadata in use (the L1 table, a refcount block, the L2 table
    itself): a write there is refused with EIO before it reaches the file, the image is
    marked corrupt on disk and BLOCK_IMAGE_CORRUPTED goes out with QEMU's fields; later
    writes fail too, and the image no longer opens read/write."""
    cs = 64 * KiB
    img = tmp_path / "disk.qcow2"
    create(img, 4 * MiB, cs)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(img)],
                   check=True, capture_output=True)
    with open(img, "r+b") as f:
        hdr = f.read(72)
        l1_off = struct.unpack(">Q", hdr[40:48])[0]
        rt_off = struct.unpack(">Q", hdr[48:56])[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
        f.seek(rt_off)
        rb_off = struct.unpack(">Q", f.read(8))[0]
        bad = {"l1": l1_off, "refcount-block": rb_off, "l2": l2_off}[target]
        f.seek(l2_off)
        f.write(struct.pack(">Q", bad | (1 << 63)))
        f.seek(0)
        before = f.read()
    srv = Served(daemons, img)
    h = srv.nbd()
    with pytest.raises(nbd.Error):
        h.pwrite(b"\x22" * 512, 4096)
    ev = srv.qmp.wait_event("BLOCK_IMAGE_CORRUPTED")
    what = {"l1": "active L1 table", "refcount-block": "refcount block",
            "l2": "active L2 table"}[target]
    assert ev["data"] == {"device": "", "node-name": "q0",
                          "msg": f"Preventing invalid write on metadata (overlaps with {what})",
                          "offset": bad + 4096, "size": 512, "fatal": True}
    with pytest.raises(nbd.Error):
        h.pwrite(b"\x33" * 512, 2 * MiB)          # an allocating write
    h.shutdown()
    srv.d.shutdown()
    assert "Marking image as corrupt" in srv.d.stderr()
    with open(img, "rb") as f:
        after = f.read()
    incompat = struct.unpack(">Q", after[72:80])[0]
    assert incompat & 2
    # Nothing else changed: the metadata the write aimed at is intact.
    assert after[:72] == before[:72] and after[80:] == before[80:len(after)]
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True
    assert open_error(daemons, img) == "qcow2: Image is corrupt; cannot be opened read/write"


@pytest.mark.parametrize("cluster_size", [64 * KiB, 4 * KiB])
def test_shutdown_while_parked_leaks_nothing(daemons, tmpfs, tmp_path, cluster_size):
    """Writes parked on a real ENOSPC (an 8 MiB tmpfs) are dropped by a clean shutdown: the
    clusters their allocations reserved are given back, so qemu-img check finds no leak."""
    img = tmpfs / "disk.qcow2"
    create(img, 64 * MiB, cluster_size)
    srv = Served(daemons, img)
    rnd = random.Random(cluster_size)
    chunks = [(i * MiB + rnd.choice([0, 512, 3000]), rnd.randbytes(MiB)) for i in range(16)]
    w = Writer(srv.nbd(), chunks)
    w.start()
    srv.qmp.wait_event("STOP")
    assert srv.qmp.cmd("query-status")["return"]["status"] == "io-error"
    assert srv.qmp.cmd("quit") == {"return": {}}
    assert srv.d.wait(30) == 0
    w.join(30)
    assert not w.is_alive()
    # The parked writes are dropped; whatever their allocations reserved is free again.
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0 and "leaked" not in r.stdout, r.stdout + r.stderr


def test_overlapping_writes_in_flight_land_in_arrival_order(daemons, tmp_path):
    """Two writes into the same new cluster sent back to back, the second over the first and
    starting before it: the second must end on top, as it would on a raw file and as QEMU's
    qcow2 orders them, although both wait for one allocation together. (A batch once sorted
    its parts by guest offset and wrote the earlier request last.)"""
    cs = 64 * KiB
    img = tmp_path / "disk.qcow2"
    create(img, 32 * MiB, cs)
    srv = Served(daemons, img)
    h = srv.nbd()
    cookies = []
    for c in range(200):
        cookies.append(h.aio_pwrite(b"\x22" * 4096, c * cs + 8192))
        cookies.append(h.aio_pwrite(b"\x11" * cs, c * cs))
    for ck in cookies:
        while not h.aio_command_completed(ck):
            h.poll(-1)
    wrong = [c for c in range(200) if h.pread(cs, c * cs) != b"\x11" * cs]
    assert wrong == [], f"{len(wrong)} of 200 clusters have the first write on top"
    h.shutdown()
    srv.stop()
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0 and "leaked" not in r.stdout, r.stdout
