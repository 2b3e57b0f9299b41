"""qcow2 images that lie: every kind of metadata that decides where data goes or which
clusters are freed, made wrong, served writable and read-only.

Images are made by qemu-img and qemu-io, then one field is changed the way any qcow2 reader
would find it (header, L1, L2, refcount table and block entries, compressed descriptors).
What is checked:
  - a request that would act on the bad metadata fails with EIO, and BLOCK_IMAGE_CORRUPTED
    says what is wrong (the exact event data): "fatal": true on a writable image, which gets
    the corrupt bit and fails every later write; "fatal": false read-only, which changes
    nothing on disk;
  - nothing is written: the image's bytes after are its bytes before (but the corrupt bit),
    and the data other requests wrote and read is intact;
  - metadata only read at open (header, extensions, names, snapshot table) refuses the open,
    with qemu-storage-daemon's error text where it has the check.
"""
import json
import re
import struct
import subprocess

import nbd
import pytest

from conftest import thinblk_only, without_timestamp
from test_qcow2 import Served, qemu_img

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB

pytestmark = thinblk_only

MASK = 0x00fffffffffffe00
COPIED = 1 << 63
COMPRESSED = 1 << 62


# ---- reading and changing the image ------------------------------------------------------------

def be64(img, off):
    with open(img, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def put64(img, off, value):
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", value))


def put(img, off, fmt, value):
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


class Layout:
    def __init__(self, img):
        self.img = img
        self.l1_offset = be64(img, 40)
        self.rt_offset = be64(img, 48)

    def l1_entry_at(self, i):
        return self.l1_offset + 8 * i

    def l2_table(self, i=0):
        return be64(self.img, self.l1_entry_at(i)) & MASK

    def l2_entry_at(self, guest):
        return self.l2_table(guest // (CS * CS // 8)) + 8 * (guest // CS % (CS // 8))

    def l2_entry(self, guest):
        return be64(self.img, self.l2_entry_at(guest))

    def refblock(self, i=0):
        return be64(self.img, self.rt_offset + 8 * i) & MASK

    def refcount_at(self, cluster):  # 16-bit refcounts
        return self.refblock(cluster // (CS * 8 // 16)) + 2 * (cluster % (CS * 8 // 16))


def qemu_io(img, *cmds):
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def image(tmp_path, size=16 * MiB, name="disk.qcow2"):
    """A 64 KiB cluster image with data: 0x11 in the first 256 KiB, a compressed cluster of
    0x22 at 1 MiB, 0x33 at 8 MiB (allocated after the compressed one)."""
    img = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", img, size)
    qemu_io(img, "write -P 0x11 0 256k", "write -c -P 0x22 1M 64k", "write -P 0x33 8M 64k")
    return img


def check(img):
    r = qemu_img("check", "--output=json", img, check=False)
    return json.loads(r.stdout)


def serve(daemons, img, writable):
    opts = "" if writable else ",read-only=on"
    return Served(daemons, img, writable=writable, qcow2_opts=opts)


def corrupted(srv):
    return without_timestamp(srv.qmp.wait_event("BLOCK_IMAGE_CORRUPTED"))["data"]


def expect_event(srv, msg, writable):
    assert corrupted(srv) == {"device": "", "node-name": "q0", "msg": msg, "fatal": writable}


def incompat(img):
    with open(img, "rb") as f:
        f.seek(72)
        return struct.unpack(">Q", f.read(8))[0]


def finish(srv, img, before, writable):
    """Stop the daemon; the image is what it was, but for the corrupt bit on a writable one.
    Returns its log."""
    assert srv.d.shutdown() == []
    after = img.read_bytes()
    log = srv.d.stderr()
    if writable:
        assert incompat(img) & 2, "the corrupt bit was not set"
        assert "qcow2: Marking image as corrupt: " in log
        assert after[:79] == before[:79] and after[80:] == before[80:]
    else:
        assert after == before
        assert "qcow2: Image is corrupt: " in log
    return log


# ---- the image of issue 10: a compressed descriptor claiming a data cluster --------------------

def compressed_over_data(tmp_path):
    """The compressed cluster at guest 1 MiB claims every sector its descriptor can hold: the
    claim covers the host cluster after it, which guest 8 MiB maps."""
    img = image(tmp_path)
    lay = Layout(img)
    e = lay.l2_entry(1 * MiB)
    assert e & COMPRESSED
    x = 62 - (16 - 8)
    put64(img, lay.l2_entry_at(1 * MiB), e | (0xff << x))
    comp = e & ((1 << x) - 1)
    data = lay.l2_entry(8 * MiB) & MASK
    assert data == (comp & ~(CS - 1)) + CS, (hex(comp), hex(data))
    return img, lay, comp, data


def test_compressed_claim_over_a_data_cluster_writable(daemons, tmp_path):
    """Overwriting the compressed cluster would free its claimed range, the data cluster of
    guest 8 MiB included, and the next allocation would reuse that cluster: an acknowledged
    write lost. Now the overwrite fails before anything is written, the image is marked
    corrupt, and every byte the guest wrote reads back."""
    img, lay, comp, data = compressed_over_data(tmp_path)
    found = check(img)
    assert found["corruptions"] == 1, found
    before = img.read_bytes()
    srv = serve(daemons, img, True)
    h = srv.nbd()
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.pwrite(b"\x41" * CS, 1 * MiB)
    expect_event(srv, f"Compressed cluster at {comp:#x} (131072 bytes) covers cluster "
                 f"{data:#x}, which is referenced elsewhere too; refusing to free it (L2 "
                 f"offset: {lay.l2_table():#x}, L2 index: 0x10)", True)
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.pwrite(b"\x42" * CS, 8 * MiB + 4 * KiB)           # every write fails now
    assert h.pread(CS, 8 * MiB) == b"\x33" * CS              # nothing lost
    assert h.pread(CS, 1 * MiB) == b"\x22" * CS
    assert h.pread(256 * KiB, 0) == b"\x11" * (256 * KiB)
    h.shutdown()
    finish(srv, img, before, True)
    assert check(img)["corruptions"] == 1                    # nothing made worse


def test_compressed_claim_over_a_data_cluster_read_only(daemons, tmp_path):
    """Read-only, the claim is harmless: nothing is freed, everything reads, no event."""
    img, _, _, _ = compressed_over_data(tmp_path)
    before = img.read_bytes()
    srv = serve(daemons, img, False)
    h = srv.nbd()
    assert h.pread(CS, 1 * MiB) == b"\x22" * CS
    assert h.pread(CS, 8 * MiB) == b"\x33" * CS
    h.shutdown()
    assert srv.d.shutdown() == []
    assert img.read_bytes() == before
    assert "corrupt" not in srv.d.stderr()


# ---- each kind of bad entry, writable and read-only ------------------------------------------------

def bad_l1(kind):
    def make(img, lay):
        e = be64(img, lay.l1_entry_at(0))
        off = e & MASK
        new, msg = {
            "unaligned": (e | 0x200, f"L2 table offset {off | 0x200:#x} unaligned (L1 index: 0)"),
            "reserved": (e | 2, f"L1 entry {e | 2:#x} has reserved bits set (L1 index: 0)"),
            "outside": (COPIED | (1 << 40), "L2 table offset 0x10000000000 lies outside the "
                        "image file (L1 index: 0)"),
            "overlap": (COPIED | lay.rt_offset, f"L2 table offset {lay.rt_offset:#x} overlaps "
                        "with refcount table (L1 index: 0)"),
        }[kind]
        put64(img, lay.l1_entry_at(0), new)
        return msg
    return make


def bad_l2(kind):
    def make(img, lay):
        at = lay.l2_entry_at(64 * KiB)
        e = be64(img, at)
        new, msg = {
            "unaligned": (e | 0x200, f"Cluster allocation offset {(e & MASK) | 0x200:#x} "
                          f"unaligned (L2 offset: {lay.l2_table():#x}, L2 index: 0x1)"),
            "reserved": (e | 2, f"L2 entry {e | 2:#x} has reserved bits set (L2 offset: "
                         f"{lay.l2_table():#x}, L2 index: 0x1)"),
            "outside": (COPIED | (1 << 40), "Cluster allocation offset 0x10000000000 lies "
                        f"outside the image file (L2 offset: {lay.l2_table():#x}, L2 index: "
                        "0x1)"),
        }[kind]
        put64(img, at, new)
        return msg
    return make


def compressed_outside(img, lay):
    at = lay.l2_entry_at(64 * KiB)
    x = 62 - (16 - 8)
    put64(img, at, COMPRESSED | (1 << 40))
    return (f"Compressed cluster at 0x10000000000 (512 bytes) lies outside the image file (L2 "
            f"offset: {lay.l2_table():#x}, L2 index: 0x1)")


# (what to break, the guest offset whose read finds it)
ENTRY_CASES = {
    "l1-unaligned": (bad_l1("unaligned"), 0),
    "l1-reserved": (bad_l1("reserved"), 0),
    "l1-outside": (bad_l1("outside"), 0),
    "l1-overlaps-refcount-table": (bad_l1("overlap"), 0),
    "l2-unaligned": (bad_l2("unaligned"), 64 * KiB),
    "l2-reserved": (bad_l2("reserved"), 64 * KiB),
    "l2-outside": (bad_l2("outside"), 64 * KiB),
    "compressed-outside": (compressed_outside, 64 * KiB),
}


@pytest.mark.parametrize("writable", [True, False], ids=["writable", "read-only"])
@pytest.mark.parametrize("case", sorted(ENTRY_CASES))
def test_bad_entry_fails_the_request(daemons, tmp_path, case, writable):
    """A read through the bad entry fails with EIO and signals the corruption; reads
    elsewhere go on; writable, every write fails from then on and the corrupt bit is set;
    nothing else on disk changes."""
    img = image(tmp_path)
    lay = Layout(img)
    make, guest = ENTRY_CASES[case]
    msg = make(img, lay)
    before = img.read_bytes()
    srv = serve(daemons, img, writable)
    h = srv.nbd()
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.pread(512, guest)
    expect_event(srv, msg, writable)
    if guest:  # the L1 entry is fine: other clusters of the table read
        assert h.pread(512, 0) == b"\x11" * 512
    if writable:
        with pytest.raises(nbd.Error, match="Input/output error"):
            h.pwrite(b"\x44" * 512, 12 * MiB)
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.pread(512, guest)                  # still wrong; no second event
    h.shutdown()
    log = finish(srv, img, before, writable)
    assert len(re.findall("Marking image as corrupt|Image is corrupt", log)) == 1, log


def shared_data_cluster(img, lay):
    """Guest 64 KiB maps guest 0's host cluster too (both COPIED, refcount 1)."""
    put64(img, lay.l2_entry_at(64 * KiB), lay.l2_entry(0))
    return lay.l2_entry(0) & MASK


def uncounted_data_cluster(img, lay):
    """Guest 64 KiB's cluster has refcount 0: the allocator could hand it out again."""
    host = lay.l2_entry(64 * KiB) & MASK
    put(img, lay.refcount_at(host // CS), ">H", 0)
    return host


@pytest.mark.parametrize("case,phrase", [(shared_data_cluster, "is referenced elsewhere too"),
                                         (uncounted_data_cluster,
                                          "has more references than its refcount")],
                         ids=["shared", "uncounted"])
def test_cluster_in_conflict_writable(daemons, tmp_path, case, phrase):
    """The open-time check finds the conflict; reads of the cluster go on (QEMU reads it
    too), a write in place or a discard of it fails and marks the image corrupt, and no
    leak is reclaimed on such an image."""
    img = image(tmp_path)
    lay = Layout(img)
    host = case(img, lay)
    before = img.read_bytes()
    srv = serve(daemons, img, True)
    h = srv.nbd()
    assert h.pread(512, 64 * KiB) == b"\x11" * 512
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.pwrite(b"\x55" * 512, 64 * KiB)
    expect_event(srv, f"Cluster allocation offset {host:#x} {phrase}; refusing to write to it "
                 f"(L2 offset: {lay.l2_table():#x}, L2 index: 0x1)", True)
    assert h.pread(CS, 8 * MiB) == b"\x33" * CS
    h.shutdown()
    log = finish(srv, img, before, True)
    assert f"cluster {host // CS} (offset {host:#x}) is in use more than once or more than its " \
        "refcount says" in log


@pytest.mark.parametrize("case", [shared_data_cluster, uncounted_data_cluster],
                         ids=["shared", "uncounted"])
def test_cluster_in_conflict_freed_writable(daemons, tmp_path, case):
    """With discard=unmap, a discard would free the cluster: refused the same way."""
    img = image(tmp_path)
    lay = Layout(img)
    host = case(img, lay)
    srv = Served(daemons, img, qcow2_opts=",discard=unmap")
    h = srv.nbd()
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.trim(CS, 64 * KiB)
    ev = corrupted(srv)
    assert ev["fatal"] is True
    assert ev["msg"].startswith(f"Cluster allocation offset {host:#x} ")
    assert ev["msg"].endswith(f"; refusing to free it (L2 offset: {lay.l2_table():#x}, L2 "
                              "index: 0x1)")
    assert h.pread(512, 64 * KiB) == b"\x11" * 512
    h.shutdown()
    assert srv.d.shutdown() == []


@pytest.mark.parametrize("case", [shared_data_cluster, uncounted_data_cluster],
                         ids=["shared", "uncounted"])
def test_cluster_in_conflict_read_only(daemons, tmp_path, case):
    img = image(tmp_path)
    case(img, Layout(img))
    before = img.read_bytes()
    srv = serve(daemons, img, False)
    h = srv.nbd()
    assert h.pread(128 * KiB, 0) == b"\x11" * (128 * KiB)
    h.shutdown()
    assert srv.d.shutdown() == []
    assert img.read_bytes() == before


def refcount_table_entry(kind):
    def make(img, lay):
        at = lay.rt_offset
        e = be64(img, at)
        new, msg = {
            "unaligned": (e | 0x200, f"Refblock offset {e | 0x200:#x} unaligned (reftable index: "
                          "0)"),
            "reserved": (e | 1, f"Refcount table entry {e | 1:#x} has reserved bits set "
                         "(reftable index: 0)"),
            "outside": (1 << 40, "Refblock offset 0x10000000000 lies outside the image file "
                        "(reftable index: 0)"),
            # The L2 table is claimed twice: the allocator, about to change it, finds it first.
            "overlap": (lay.l2_table(), f"L2 table offset {lay.l2_table():#x} overlaps with "
                        "refcount block (L1 index: 0)"),
        }[kind]
        put64(img, at, new)
        return msg
    return make


@pytest.mark.parametrize("kind", ["unaligned", "reserved", "outside", "overlap"])
def test_bad_refcount_table_entry(daemons, tmp_path, kind):
    """Reads and writes in place need no refcount and go on; the first write that needs one
    (an allocation) fails and marks the image corrupt, having written nothing. Read-only, it
    all reads."""
    img = image(tmp_path)
    lay = Layout(img)
    host = lay.l2_entry(0) & MASK
    msg = refcount_table_entry(kind)(img, lay)
    expected = bytearray(img.read_bytes())
    expected[host:host + 512] = b"\x66" * 512
    expected[79] |= 2
    srv = serve(daemons, img, True)
    h = srv.nbd()
    h.pwrite(b"\x66" * 512, 0)               # in place
    assert h.pread(512, 0) == b"\x66" * 512
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.pwrite(b"\x77" * 512, 12 * MiB)     # allocates
    expect_event(srv, msg, True)
    h.shutdown()
    assert srv.d.shutdown() == []
    assert img.read_bytes() == bytes(expected)
    # Read-only: nothing needs the refcounts.
    srv = serve(daemons, img, False)
    h = srv.nbd()
    assert h.pread(512, 0) == b"\x66" * 512
    assert h.pread(CS, 8 * MiB) == b"\x33" * CS
    h.shutdown()
    assert srv.d.shutdown() == []


# ---- metadata read at open ----------------------------------------------------------------------

def qsd_error(img, read_only):
    opts = {"driver": "qcow2", "node-name": "q0", "read-only": read_only,
            "file": {"driver": "file", "filename": str(img), "read-only": read_only}}
    r = subprocess.run(["qemu-storage-daemon", "--blockdev", json.dumps(opts)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r.stderr
    m = re.match(r"qemu-storage-daemon: --blockdev \{.*\}: (.*)$", r.stderr.strip())
    assert m, r.stderr
    return m.group(1)


def open_error(daemons, img, read_only):
    qmp = daemons.start().negotiated()
    r = qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "read-only": read_only,
                                 "file": {"driver": "file", "filename": str(img),
                                          "read-only": read_only}})
    assert "error" in r and r["error"]["class"] == "GenericError", r
    assert qmp.cmd("query-named-block-nodes") == {"return": []}
    return r["error"]["desc"]


def header_length(img):
    with open(img, "rb") as f:
        f.seek(100)
        return struct.unpack(">I", f.read(4))[0]


def extension(typ, data, autoclear=None):
    def make(img):
        hl = header_length(img)
        pad = (len(data) + 7) & ~7
        with open(img, "r+b") as f:
            f.seek(hl)
            f.write(struct.pack(">II", typ, len(data)) + data + bytes(pad - len(data)) + bytes(8))
        if autoclear is not None:
            put(img, 88, ">Q", autoclear)
    return make


def extension_too_large(img):
    with open(img, "r+b") as f:
        f.seek(header_length(img))
        f.write(struct.pack(">II", 0x12345678, 70000))


def snapshot_table(count, offset):
    def make(img):
        put(img, 60, ">I", count)
        put(img, 64, ">Q", offset)
    return make


def backing_name(offset, length):
    def make(img):
        put(img, 8, ">Q", offset)
        put(img, 16, ">I", length)
    return make


OPEN_CASES = {
    # case: (change, the error, whether qemu-storage-daemon 7.2 says the same)
    "extension-too-large": (extension_too_large, "Header extension too large", True),
    "backing-format-too-long": (extension(0xe2792aca, b"x" * 20),
                                "ERROR: ext_backing_format: len=20 too large (>=16)", True),
    "bitmaps-extension-length": (extension(0x23852875, bytes(16), autoclear=1),
                                 "bitmaps_ext: Invalid extension length", True),
    "bitmaps-directory-unaligned": (extension(0x23852875, struct.pack(">IIQQ", 1, 0, 100,
                                                                      65537), autoclear=1),
                                    "bitmaps_ext: invalid bitmap directory offset", True),
    "crypto-extension-without-encryption": (
        extension(0x0537be77, bytes(16)),
        "CRYPTO header extension only expected with LUKS encryption method", True),
    "data-file-raw-without-data-file": (extension(0x44415441, b"/nonexistent", autoclear=2),
                                        "data-file-raw requires a data file", True),
    "snapshot-table-unaligned": (snapshot_table(1, 1000), "Snapshot table offset invalid",
                                 True),
    "snapshot-table-too-large": (snapshot_table(70000, 10 * CS), "Snapshot table too large",
                                 True),
    "snapshot-table-over-header": (snapshot_table(1, 0), "Snapshot table offset invalid",
                                   False),
    "backing-name-in-header": (backing_name(16, 4), "Invalid backing file offset", False),
    "backing-name-past-cluster": (backing_name(CS + 8, 4), "Invalid backing file offset", True),
    "l1-table-over-refcount-table": (lambda img: put(img, 40, ">Q", CS),
                                     "Active L1 table offset invalid: the table overlaps the "
                                     "reference count table", False),
    "refcount-table-unaligned": (lambda img: put(img, 48, ">Q", CS + 512),
                                 "Reference count table offset invalid", True),
}


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
@pytest.mark.parametrize("case", sorted(OPEN_CASES))
def test_bad_header_metadata_refuses_the_open(daemons, tmp_path, case, read_only):
    img = image(tmp_path)
    change, error, as_qsd = OPEN_CASES[case]
    change(img)
    before = img.read_bytes()
    assert open_error(daemons, img, read_only) == error
    if as_qsd:
        assert qsd_error(img, read_only) == error
    assert img.read_bytes() == before


def test_data_file_name_without_the_feature_is_ignored(daemons, tmp_path):
    """As QEMU: a data file name without the external data file bit is not used."""
    img = image(tmp_path)
    extension(0x44415441, b"/etc/passwd")(img)
    srv = serve(daemons, img, True)
    h = srv.nbd()
    assert h.pread(512, 0) == b"\x11" * 512
    h.pwrite(b"\x12" * 512, 0)
    h.shutdown()
    srv.stop()
