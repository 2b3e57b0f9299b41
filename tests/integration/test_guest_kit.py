"""Proves the real-guest kit (tests/guest): a Debian kernel with a busybox initramfs boots under
QEMU TCG, writes to its virtio-blk disk and prints checksums the host can check.

First on a plain local raw file (QEMU alone, no block server), then against QEMU's own
qemu-storage-daemon over NBD and vhost-user-blk, and finally what a guest sees when
qemu-storage-daemon hits ENOSPC: an I/O error, the behaviour thinblkd exists to change.

Environment: THINBLK_GUEST_CACHE, the kit's cache (default ~/.cache/thinblk-guest); the first
run builds it (downloads Debian's cloud kernel package, a few seconds).
"""

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402

pytestmark = pytest.mark.skipif(kit.qemu_path() is None,
                                reason="qemu-system-x86_64 is not installed")

MIB = kit.MIB
GUEST_TIMEOUT = 180     # TCG on a busy 2-CPU machine; a boot + 8 MiB write takes ~4 s idle
DISK_SIZE = 64 * MIB


@pytest.fixture(scope="module")
def image():
    return kit.build_guest()


@pytest.fixture
def sockdir():
    # Unix socket paths are limited to 108 bytes: keep them out of pytest's long tmp_path.
    d = Path(tempfile.mkdtemp(prefix="tbg-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def storage_daemon(logdir, *args):
    """Runs qemu-storage-daemon ARGS until the block ends. Ready once its pid file exists: it
    is written after the exports and servers are created, before any connection is accepted."""
    pidfile = logdir / "qsd.pid"
    log = logdir / "qsd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["qemu-storage-daemon", *args, "--pidfile", str(pidfile)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon exited with {proc.returncode}:\n"
                                     f"{log.read_text()}")
            return pidfile.exists()
        kit.wait_until(ready, 30, "qemu-storage-daemon's pid file")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


needs_qsd = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                               reason="qemu-storage-daemon is not installed")


def raw_image(path, size=DISK_SIZE):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def nbd_args(img, sock):
    return ["--blockdev", f"driver=file,node-name=f,filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=f,name=disk,writable=on"]


def run_guest(image, disk, workdir, record_property=None, **job):
    with kit.Guest(image, disk, workdir=workdir, **job) as g:
        console, rc = g.wait(GUEST_TIMEOUT)
    if record_property:
        record_property("guest_seconds", round(g.elapsed, 2))
    print(f"guest {job} took {g.elapsed:.2f} s")
    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console}"
    return g


def test_local_raw_file_write(image, tmp_path, record_property):
    """The kit itself, with no block server: the guest's checksum is the image's."""
    img = raw_image(tmp_path / "disk.raw")
    g = run_guest(image, kit.FileDisk(str(img)), tmp_path / "guest", record_property,
                  job="write", mb=16)
    assert g.markers("DISK") == [f"dev=vda size={DISK_SIZE}"]
    r = g.result()
    assert (r["job"], r["mb"], r["off"], r["dd-status"], r["read-status"]) == ("write", 16, 0, 0, 0)
    assert r["write-sha256"] == r["readback-sha256"]
    assert kit.file_sha256(img, 0, 16 * MIB) == r["write-sha256"]
    # Random data: not the sha256 of zeroes, and nothing past the written range.
    assert r["write-sha256"] != hashlib.sha256(bytes(16 * MIB)).hexdigest()
    assert kit.file_sha256(img, 16 * MIB) == hashlib.sha256(bytes(DISK_SIZE - 16 * MIB)).hexdigest()
    assert not g.io_error, g.dmesg
    assert "I/O error" not in g.console
    assert g.status == 0


def test_local_raw_file_seeded_pattern_at_offset(image, tmp_path):
    """thinblk.seed writes a pattern the host recomputes (kit.pattern) at thinblk.off."""
    img = raw_image(tmp_path / "disk.raw")
    g = run_guest(image, kit.FileDisk(str(img)), tmp_path / "guest", job="write", mb=2, off=3,
                  seed=11)
    r = g.result()
    expected = hashlib.sha256(kit.pattern(2, seed=11, off=3)).hexdigest()
    assert (r["off"], r["write-sha256"], r["readback-sha256"]) == (3, expected, expected)
    assert kit.file_sha256(img, 3 * MIB, 2 * MIB) == expected
    assert kit.file_sha256(img, 0, 3 * MIB) == hashlib.sha256(bytes(3 * MIB)).hexdigest()


@needs_qsd
def test_nbd_write_and_read(image, tmp_path, sockdir, record_property):
    img = raw_image(tmp_path / "disk.raw")
    sock = sockdir / "nbd.sock"
    with storage_daemon(tmp_path, *nbd_args(img, sock)):
        disk = kit.NbdDisk(str(sock), "disk")
        g = run_guest(image, disk, tmp_path / "write", record_property,
                      job="write", mb=8, seed=7)
        r = g.result()
        assert (r["job"], r["mb"], r["dd-status"], r["read-status"]) == ("write", 8, 0, 0)
        expected = hashlib.sha256(kit.pattern(8, seed=7)).hexdigest()
        assert r["write-sha256"] == expected
        assert r["readback-sha256"] == expected
        assert kit.file_sha256(img, 0, 8 * MIB) == expected
        assert not g.io_error, g.dmesg
        assert g.status == 0

        # A fresh boot reads the same range back through the read job.
        g = run_guest(image, disk, tmp_path / "read", job="read", mb=8)
        r = g.result()
        assert (r["job"], r["read-status"], r["read-sha256"]) == ("read", 0, expected)
        assert not g.io_error, g.dmesg


@needs_qsd
def test_vhost_user_blk_write(image, tmp_path, sockdir, record_property):
    img = raw_image(tmp_path / "disk.raw")
    sock = sockdir / "vub.sock"
    with storage_daemon(tmp_path,
                        "--blockdev", f"driver=file,node-name=f,filename={img}",
                        "--export", "type=vhost-user-blk,id=e1,node-name=f,addr.type=unix,"
                                    f"addr.path={sock},writable=on"):
        # Random data (no seed), 8 MiB at a 4 MiB offset.
        with kit.Guest(image, kit.VhostUserBlkDisk(str(sock)), job="write", mb=8, off=4,
                       workdir=tmp_path / "guest") as g:
            m = g.wait_for_line(r"THINBLK-DISK dev=vda size=(\d+)", timeout=GUEST_TIMEOUT)
            assert int(m.group(1)) == DISK_SIZE
            console, rc = g.wait(GUEST_TIMEOUT)
        record_property("guest_seconds", round(g.elapsed, 2))
        assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console}"
        r = g.result()
        assert (r["off"], r["dd-status"], r["read-status"]) == (4, 0, 0)
        assert r["write-sha256"] == r["readback-sha256"]
        assert kit.file_sha256(img, 4 * MIB, 8 * MIB) == r["write-sha256"]
        assert kit.file_sha256(img, 0, 4 * MIB) == hashlib.sha256(bytes(4 * MIB)).hexdigest()
        assert not g.io_error, g.dmesg
        assert g.status == 0


@pytest.fixture
def small_tmpfs():
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    d = Path(tempfile.mkdtemp(prefix="tbg-tmpfs-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)]).returncode != 0:
            subprocess.run(["umount", "-l", str(d)])
        d.rmdir()


@needs_qsd
def test_qsd_nbd_enospc_reaches_guest(image, tmp_path, sockdir, small_tmpfs):
    """qemu-storage-daemon has no run state: ENOSPC from a full 4 MiB tmpfs goes to the guest as
    an I/O error. thinblkd must instead hold the request until the storage grows. This also
    proves the kit sees a server's error (werror=report, THINBLK-IOERROR)."""
    img = raw_image(small_tmpfs / "disk.raw")
    sock = sockdir / "nbd.sock"
    with storage_daemon(tmp_path, *nbd_args(img, sock)) as qsd:
        g = run_guest(image, kit.NbdDisk(str(sock), "disk"), tmp_path / "guest",
                      job="write", mb=8)
        r = g.result()
        assert r["dd-status"] != 0
        assert g.io_error
        assert any("I/O error, dev vda" in line for line in g.dmesg), g.dmesg
        assert any("op=write" in d and "error" in d.lower() for d in g.markers("DD"))
        assert g.status == 1
        assert qsd.poll() is None, "qemu-storage-daemon died on ENOSPC"
