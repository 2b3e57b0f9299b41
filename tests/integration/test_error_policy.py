"""The device's error policy (werror, rerror) with errors made on purpose, and real ENOSPC on a
loop device.

The fault driver fails chosen requests with a chosen errno before they reach the file; each
policy must then do what QEMU's does: report (the client gets the error), ignore (the client
is told it worked), stop (park, BLOCK_IO_ERROR, STOP, retry on cont), enospc (stop on ENOSPC,
report otherwise).
"""
import os
import shutil
import subprocess
import threading
import time

import nbd
import pytest

from conftest import without_timestamp
from test_enospc import MiB, Writer, check_readback, random_chunks

# EDQUOT (an RBD pool's quota) is "no space" as ENOSPC, with ENOSPC's text; QEMU knows only
# ENOSPC.
ERRNO_TEXT = {"ENOSPC": "No space left on device", "EIO": "Input/output error",
              "EDQUOT": "No space left on device"}
NOSPACE = ("ENOSPC", "EDQUOT")


class Disk:
    """thinblkd with file -> fault -> export "disk" (device "disk0"), and a QMP client."""

    def __init__(self, daemons, tmp_path, werror=None, rerror=None, image=None, direct=False):
        self.image = image or tmp_path / "disk.raw"
        if image is None:
            with open(self.image, "wb") as f:
                f.truncate(16 * MiB)
        self.nbd_sock = tmp_path / "nbd.sock"
        export = "type=nbd,id=disk0,node-name=flt,name=disk,writable=on"
        if werror:
            export += f",werror={werror}"
        if rerror:
            export += f",rerror={rerror}"
        file_opts = f"driver=file,node-name=f0,filename={self.image}"
        if direct:
            file_opts += ",cache.direct=on"
        self.daemon = daemons.start(args=[
            "--blockdev", file_opts,
            "--blockdev", "driver=fault,node-name=flt,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
            "--export", export])
        self.qmp = self.daemon.negotiated()

    def nbd(self):
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///disk?socket={self.nbd_sock}")
        return h

    def fail(self, op, errno, once=True, **extra):
        rule = {"op": op, "errno": errno, "once": once, **extra}
        assert self.qmp.cmd("__org.thinblk_fault-set",
                            {"node-name": "flt", "rules": [rule]}) == {"return": {}}

    def event(self, name):
        return self.qmp.wait_event(name)

    def status(self):
        return self.qmp.cmd("query-status")["return"]["status"]

    def io_status(self):
        return self.qmp.cmd("query-block")["return"][0]["io-status"]


def io_error(op, action, errno):
    return {"event": "BLOCK_IO_ERROR",
            "data": {"device": "disk0", "node-name": "flt", "operation": op, "action": action,
                     "nospace": errno in NOSPACE, "reason": ERRNO_TEXT[errno]}}


def in_thread(fn):
    """Run fn in a thread; return (thread, result list: [value] or [exception])."""
    out = []

    def run():
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - handed to the test
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# ---- writes -------------------------------------------------------------------------------

@pytest.mark.parametrize("werror,errno", [("report", "ENOSPC"), ("report", "EIO"),
                                          ("enospc", "EIO"), (None, "EIO"),
                                          ("report", "EDQUOT")])
def test_write_error_reported(daemons, tmp_path, werror, errno):
    disk = Disk(daemons, tmp_path, werror=werror)
    disk.fail("write", errno)
    h = disk.nbd()
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"\xab" * 4096, 0)
    assert e.value.errno == ("ENOSPC" if errno == "EDQUOT" else errno)  # NBD has no EDQUOT
    assert without_timestamp(disk.event("BLOCK_IO_ERROR")) == io_error("write", "report", errno)
    assert disk.status() == "running" and disk.io_status() == "ok"
    # The rule was spent: the next write goes through.
    h.pwrite(b"\xcd" * 4096, 0)
    assert h.pread(4096, 0) == b"\xcd" * 4096


def test_write_error_ignored(daemons, tmp_path):
    disk = Disk(daemons, tmp_path, werror="ignore")
    disk.fail("write", "EIO")
    h = disk.nbd()
    h.pwrite(b"\xab" * 4096, 0)  # told it worked: that is what ignore means
    assert without_timestamp(disk.event("BLOCK_IO_ERROR")) == io_error("write", "ignore", "EIO")
    assert h.pread(4096, 0) == bytes(4096)  # and nothing was written
    assert disk.status() == "running"


@pytest.mark.parametrize("werror,errno,io_status", [
    ("stop", "EIO", "failed"), ("stop", "ENOSPC", "nospace"), ("enospc", "ENOSPC", "nospace"),
    (None, "ENOSPC", "nospace"), ("stop", "EDQUOT", "nospace"), (None, "EDQUOT", "nospace")])
def test_write_error_stops_and_cont_retries(daemons, tmp_path, werror, errno, io_status):
    disk = Disk(daemons, tmp_path, werror=werror)
    disk.fail("write", errno)
    h = disk.nbd()
    t, out = in_thread(lambda: h.pwrite(b"\xab" * 65536, MiB))
    assert without_timestamp(disk.event("BLOCK_IO_ERROR")) == io_error("write", "stop", errno)
    assert disk.event("STOP")["event"] == "STOP"
    assert disk.status() == "io-error" and disk.io_status() == io_status
    cause = disk.qmp.cmd("__org.thinblk_query-stop-reason")["return"]["io-error"]
    assert (cause["errno"], cause["nospace"], cause["reason"]) == \
        (errno, errno in NOSPACE, ERRNO_TEXT[errno])
    t.join(0.2)
    assert t.is_alive(), "the write completed while stopped"
    assert disk.qmp.cmd("cont") == {"return": {}}
    t.join(30)
    assert out == [None]
    assert disk.io_status() == "ok"
    assert h.pread(65536, MiB) == b"\xab" * 65536
    with open(disk.image, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\xab" * 65536


def test_retry_that_fails_again_stops_again(daemons, tmp_path):
    disk = Disk(daemons, tmp_path, werror="stop")
    disk.fail("write", "ENOSPC", once=False)
    h = disk.nbd()
    t, out = in_thread(lambda: h.pwrite(b"\x11" * 4096, 0))
    disk.event("STOP")
    disk.qmp.cmd("cont")
    disk.event("RESUME")
    assert disk.event("STOP")["event"] == "STOP"  # still full: stopped again
    assert disk.status() == "io-error"
    disk.qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": []})
    disk.qmp.cmd("cont")
    t.join(30)
    assert out == [None]
    assert h.pread(4096, 0) == b"\x11" * 4096


def test_flush_error_stops_and_flush_is_retried(daemons, tmp_path):
    disk = Disk(daemons, tmp_path, werror="stop")
    disk.fail("flush", "EIO")
    h = disk.nbd()
    h.pwrite(b"\x22" * 4096, 0)
    t, out = in_thread(h.flush)
    assert without_timestamp(disk.event("BLOCK_IO_ERROR")) == io_error("write", "stop", "EIO")
    disk.event("STOP")
    assert disk.io_status() == "failed"
    disk.qmp.cmd("cont")
    t.join(30)
    assert out == [None]


def test_flush_waits_for_a_parked_write(daemons, tmp_path):
    disk = Disk(daemons, tmp_path)
    disk.fail("write", "ENOSPC")
    h = disk.nbd()
    w = Writer(h, [(0, b"\x33" * 65536)], flush=True)
    w.start()
    disk.event("STOP")
    w.join(0.2)
    assert w.completed == [], "the flush overtook the parked write"
    disk.qmp.cmd("cont")
    w.join(30)
    assert w.errors == []
    assert w.completed == [("write", 0), ("flush", None)]


# ---- reads --------------------------------------------------------------------------------

def test_read_error_reported_by_default(daemons, tmp_path):
    disk = Disk(daemons, tmp_path)
    disk.fail("read", "EIO")
    h = disk.nbd()
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 0)
    assert e.value.errno == "EIO"
    assert without_timestamp(disk.event("BLOCK_IO_ERROR")) == io_error("read", "report", "EIO")
    assert disk.status() == "running"


@pytest.mark.parametrize("rerror,errno", [("stop", "EIO"), ("enospc", "ENOSPC")])
def test_read_error_stops_and_cont_retries(daemons, tmp_path, rerror, errno):
    disk = Disk(daemons, tmp_path, rerror=rerror)
    with open(disk.image, "r+b") as f:
        f.write(b"\x44" * 4096)
    disk.fail("read", errno)
    h = disk.nbd()
    t, out = in_thread(lambda: h.pread(4096, 0))
    assert without_timestamp(disk.event("BLOCK_IO_ERROR")) == io_error("read", "stop", errno)
    disk.event("STOP")
    assert disk.status() == "io-error"
    disk.qmp.cmd("cont")
    t.join(30)
    assert out == [b"\x44" * 4096]


def test_read_error_ignored_returns_success(daemons, tmp_path):
    disk = Disk(daemons, tmp_path, rerror="ignore")
    disk.fail("read", "EIO")
    h = disk.nbd()
    assert len(h.pread(4096, 0)) == 4096
    assert without_timestamp(disk.event("BLOCK_IO_ERROR")) == io_error("read", "ignore", "EIO")


def test_fault_rule_after_n_requests_and_offset(daemons, tmp_path):
    disk = Disk(daemons, tmp_path, werror="report")
    disk.fail("write", "EIO", once=False, offset=8 * MiB, length=MiB, after=1)
    h = disk.nbd()
    h.pwrite(b"\x01" * 4096, 0)            # outside the range
    h.pwrite(b"\x02" * 4096, 8 * MiB)      # inside, but the first one is let through
    with pytest.raises(nbd.Error):
        h.pwrite(b"\x03" * 4096, 8 * MiB)  # inside: fails until the rules change
    with pytest.raises(nbd.Error):
        h.pwrite(b"\x03" * 4096, 8 * MiB + 4096)
    assert h.pread(4096, 8 * MiB) == b"\x02" * 4096


def test_bad_fault_rules_are_refused(daemons, tmp_path):
    disk = Disk(daemons, tmp_path)
    assert disk.qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": [
        {"op": "erase", "errno": "EIO"}]}) == {"error": {
            "class": "GenericError",
            "desc": "Parameter 'rules[0].op' does not accept value 'erase'"}}
    assert disk.qmp.cmd("__org.thinblk_fault-set", {"node-name": "f0", "rules": []}) == {
        "error": {"class": "GenericError",
                  "desc": "Node 'f0' is not a fault injection node"}}
    # errno may be left out only by a delay rule.
    assert disk.qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": [
        {"op": "write", "delay-ms": 10}, {"op": "read"}]}) == {"error": {
            "class": "GenericError", "desc": "Parameter 'rules[1].errno' is missing"}}


def test_delay_rule_passes_the_request_on(daemons, tmp_path):
    disk = Disk(daemons, tmp_path)
    assert disk.qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": [
        {"op": "write", "delay-ms": 50}]}) == {"return": {}}
    h = disk.nbd()
    h.pwrite(b"\x07" * 4096, 4096)
    assert h.pread(4096, 4096) == b"\x07" * 4096


# ---- BLOCK_IO_ERROR throttling ------------------------------------------------------------

def test_block_io_error_throttled_but_first_not_delayed(daemons, tmp_path):
    disk = Disk(daemons, tmp_path, werror="report")
    disk.fail("write", "EIO", once=False)
    h = disk.nbd()
    start = time.monotonic()
    for i in range(20):
        with pytest.raises(nbd.Error):
            h.pwrite(b"\x05" * 512, i * 512)
    elapsed = time.monotonic() - start
    # The first event came at once, counting nothing; the other 19 failures make at most one
    # event a second, each counting the failures it stands for. (On an idle machine the 20
    # writes take milliseconds: two events, the second counting 18.)
    first = disk.qmp.read_event(timeout=1)
    assert without_timestamp(first) == io_error("write", "report", "EIO")
    assert "__org.thinblk_suppressed" not in first, first
    got = [first]
    while True:   # until a quiet 1.5 s: nothing is held back longer than a second
        try:
            got.append(disk.qmp.read_event(timeout=1.5))
        except TimeoutError:
            break
    for ev in got[1:]:
        assert without_timestamp(ev) == io_error("write", "report", "EIO")
    assert 2 <= len(got) <= elapsed + 2, (len(got), elapsed)
    assert sum(1 + ev.get("__org.thinblk_suppressed", 0) for ev in got) == 20, got


# ---- real ENOSPC on a loop device ---------------------------------------------------------

@pytest.fixture
def ext4_on_loop(tmp_path):
    """A 48 MiB ext4 file system on a loop device."""
    if os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root, losetup and mkfs.ext4")
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(48 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)


def test_enospc_on_a_loop_device(daemons, tmp_path, ext4_on_loop):
    """Real ENOSPC from ext4 on a block device, with O_DIRECT, over several stop/cont rounds.

    Space is made by removing ballast files: growing the file system online (resize2fs) is
    what a host would do, but this sandbox refuses EXT4_IOC_RESIZE_FS (EPERM)."""
    mnt = ext4_on_loop
    ballast = []
    for i in range(4):
        path = mnt / f"ballast{i}"
        with open(path, "wb") as f:
            f.write(os.urandom(8 * MiB))
        ballast.append(path)
    image = mnt / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    disk = Disk(daemons, tmp_path, image=image, direct=True)
    chunks = random_chunks(7, 0, 24 * MiB)
    h = disk.nbd()
    w = Writer(h, chunks)
    w.start()
    rounds = 0
    while w.is_alive():
        try:
            disk.event("STOP")
        except TimeoutError:
            continue
        rounds += 1
        assert disk.status() == "io-error" and disk.io_status() == "nospace"
        assert ballast, "stopped with nothing left to free"
        ballast.pop().unlink()
        os.sync()
        disk.qmp.cmd("cont")
    w.join()
    assert rounds >= 1
    assert w.errors == []
    check_readback(h, chunks)
    events = [without_timestamp(e) for e in disk.qmp.take_events()
              if e["event"] == "BLOCK_IO_ERROR"]
    assert all(e == io_error("write", "stop", "ENOSPC") for e in events)
    assert disk.qmp.cmd("query-named-block-nodes")["return"][-1]["cache"]["direct"] is True
