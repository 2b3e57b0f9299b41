"""qcow2 images written by fio through thinblkd's NBD export, with qemu-img as the oracle.

fio's nbd engine writes seeded random data at seeded random offsets (randrepeat, one seed per
job, a random map so that no block is written twice within a job, jobs one after another), so
the same job file run with the psync engine on a raw file writes exactly the same bytes: that
file is the reference. The image must then compare equal to it and `qemu-img check` clean.
"""
import subprocess

import pytest

from conftest import thinblk_only
from test_qcow2 import Served, assert_clean, create, make_ref

KiB = 1 << 10
MiB = 1 << 20

pytestmark = thinblk_only

SIZE = 64 * MiB

# Jobs run in order (stonewall); later ones overwrite parts of earlier ones. Within a job no
# two writes overlap (the random map works in blocks of bs from the job's offset), so the
# order in which the server completes them cannot change the result; an offset that is not a
# multiple of the cluster size puts every write across or inside clusters unaligned.
JOBS = [
    # small writes, unaligned to clusters: partial clusters, copy-on-write around them
    "rw=randwrite bs=4k offset=1536 io_size=6M iodepth=32 randseed=11",
    # large writes over many clusters, some allocating, some in place
    "rw=randwrite bs=192k offset=4096 io_size=24M iodepth=8 randseed=12",
    # sequential, cluster-sized and unaligned to clusters
    "rw=write bs=64k offset=1536 io_size=8M iodepth=16 randseed=13",
]


def fio_args(engine, target):
    args = ["fio", "--output=/dev/null", "--randrepeat=1", "--refill_buffers=1",
            "--thread", f"--size={SIZE - 4 * MiB}"]
    if engine == "nbd":
        args += ["--ioengine=nbd", f"--uri={target}"]
    else:
        args += ["--ioengine=psync", f"--filename={target}"]
    for i, job in enumerate(JOBS):
        args += [f"--name=j{i}", "--stonewall"]
        args += ["--" + kv for kv in job.split()]
    return args


def run_fio(engine, target):
    r = subprocess.run(fio_args(engine, target), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("cluster_size,compat", [(512, "1.1"), (4 * KiB, "0.10"),
                                                 (64 * KiB, "1.1"), (2 * MiB, "1.1")])
def test_fio_random_writes_match_raw_reference(daemons, tmp_path, cluster_size, compat):
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, SIZE, cluster_size, compat=compat)
    make_ref(ref, SIZE)
    srv = Served(daemons, img)
    run_fio("nbd", srv.uri)
    # Every byte of every job went through the export (6 + 24 + 8 MiB).
    stats = srv.qmp.cmd("query-blockstats")["return"][0]["stats"]
    assert (stats["wr_bytes"], stats["failed_wr_operations"]) == (38 * MiB, 0), stats
    srv.stop()
    run_fio("psync", ref)
    assert_clean(img, ref)
