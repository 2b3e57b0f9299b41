#!/usr/bin/python3
"""Make the crafted seeds of fuzz/corpus/qcow2: small images (512-byte clusters, so that they
fit the fuzzer's 4 KiB inputs) made by qemu-img and qemu-io, each with one piece of metadata
made wrong, the kinds tests/integration/test_qcow2_trust.py checks:

  bad-compressed-claim   a compressed descriptor claiming the data cluster after it (issue 10)
  bad-l1-reserved        an L1 entry with a reserved bit set
  bad-l2-outside         an L2 entry past the end of the file
  bad-l2-shared          two L2 entries mapping one data cluster
  bad-refcount-zero      a data cluster whose refcount is 0
  bad-reftable-overlap   a refcount table entry naming the L2 table
  bad-snapshot-table     one snapshot, its table at an unaligned offset
  bad-bitmaps-ext        a bitmaps extension of the wrong length

Usage: fuzz/make-qcow2-seeds.py [DIR] (default: fuzz/corpus/qcow2 next to this script).
"""
import os
import struct
import subprocess
import sys
import tempfile

CS = 512
MASK = 0x00fffffffffffe00


def sh(*argv):
    subprocess.run(argv, check=True, capture_output=True)


def be64(b, off):
    return struct.unpack(">Q", b[off:off + 8])[0]


def put64(b, off, v):
    b[off:off + 8] = struct.pack(">Q", v)


def base(path):
    """0x11 in guest cluster 0, a compressed cluster at guest 1, 0x33 at guest 16: 8 clusters
    (header, refcount table and block, L1, L2, data) in 4096 bytes."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", path, "16K")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512", "-c", "write -c -P 0x22 512 512",
       "-c", "write -P 0x33 8k 512", path)
    b = bytearray(open(path, "rb").read())
    assert len(b) <= 4096, len(b)  # the fuzzer's -max_len
    return b


def l2_entry_at(b, guest):
    l1 = be64(b, 40)
    l2 = be64(b, l1) & MASK
    return l2 + 8 * (guest // CS)


def compressed_claim(b):
    at = l2_entry_at(b, 512)
    put64(b, at, be64(b, at) | 1 << 61)   # 512-byte clusters: one bit of sector count


def l1_reserved(b):
    l1 = be64(b, 40)
    put64(b, l1, be64(b, l1) | 2)   # 512-byte clusters are never unaligned: a reserved bit


def l2_outside(b):
    put64(b, l2_entry_at(b, 8192), 1 << 63 | 1 << 30)


def l2_shared(b):
    put64(b, l2_entry_at(b, 8192), be64(b, l2_entry_at(b, 0)))


def refcount_zero(b):
    host = be64(b, l2_entry_at(b, 8192)) & MASK
    rt = be64(b, 48)
    rb = be64(b, rt) & MASK
    b[rb + 2 * (host // CS):rb + 2 * (host // CS) + 2] = b"\0\0"


def reftable_overlap(b):
    l1 = be64(b, 40)
    put64(b, be64(b, 48), be64(b, l1) & MASK)


def snapshot_table(b):
    b[60:64] = struct.pack(">I", 1)
    put64(b, 64, 1000)


def bitmaps_ext(b):
    hl = struct.unpack(">I", b[100:104])[0]
    b[hl:hl + 32] = struct.pack(">II", 0x23852875, 16) + bytes(16) + bytes(8)
    put64(b, 88, 1)


SEEDS = {
    "bad-compressed-claim": compressed_claim,
    "bad-l1-reserved": l1_reserved,
    "bad-l2-outside": l2_outside,
    "bad-l2-shared": l2_shared,
    "bad-refcount-zero": refcount_zero,
    "bad-reftable-overlap": reftable_overlap,
    "bad-snapshot-table": snapshot_table,
    "bad-bitmaps-ext": bitmaps_ext,
}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "corpus", "qcow2")
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in SEEDS.items():
            b = base(os.path.join(tmp, name))
            change(b)
            with open(os.path.join(out, name + ".qcow2"), "wb") as f:
                f.write(b)
            print(f"{name}.qcow2: {len(b)} bytes")


if __name__ == "__main__":
    main()
