"""Stop on ENOSPC with real storage running out: the heart of thinblk.

A raw image sits on a small tmpfs mounted by the test (or on a loop device), exported over NBD;
python3-libnbd writes more than the storage holds. The daemon must park the failed writes, send
BLOCK_IO_ERROR and STOP as QEMU does, hold everything that comes while stopped, and on `cont`
(after the test grew the storage) retry each parked request exactly once, so that the client
never sees an error and every byte reads back as written.
"""
import os
import random
import subprocess
import threading

import nbd
import pytest

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "store"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "thinblk-test", str(mnt)],
                   check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def grow(mnt, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


class Daemon:
    """thinblkd serving image as NBD export "disk" (device disk0 on node fmt0 over proto0)."""

    def __init__(self, daemons, tmp_path, image, werror=None):
        self.nbd_path = str(tmp_path / "nbd.sock")
        export = "type=nbd,id=disk0,node-name=fmt0,name=disk,writable=on"
        if werror:
            export += f",werror={werror}"
        self.daemon = daemons.start(args=[
            "--blockdev", f"driver=file,node-name=proto0,filename={image}",
            "--blockdev", "driver=raw,node-name=fmt0,file=proto0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}",
            "--export", export])
        self.qmp = self.daemon.negotiated()

    def nbd(self):
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///disk?socket={self.nbd_path}")
        return h

    def stop(self):
        """Shut down (the daemons fixture checks the exit status and sanitizers) and check
        that nothing was logged as an error."""
        self.qmp.close()
        assert self.daemon.shutdown() == []
        assert ": error: " not in self.daemon.stderr(), self.daemon.stderr()


@pytest.fixture
def daemon_on_tmpfs(daemons, tmpfs, tmp_path):
    image = tmpfs / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    d = Daemon(daemons, tmp_path, image)
    yield d, tmpfs, image
    d.stop()


class Writer(threading.Thread):
    """Writes chunks with many requests in flight, then flushes; records completion order."""

    def __init__(self, h, chunks, flush=True):
        super().__init__(daemon=True)
        self.h, self.chunks, self.flush = h, chunks, flush
        self.completed = []
        self.errors = []

    def run(self):
        cookies = {}
        try:
            for off, data in self.chunks:
                c = self.h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
                cookies[c] = ("write", off)
            if self.flush:
                cookies[self.h.aio_flush()] = ("flush", None)
            while cookies:
                self.h.poll(-1)
                for c in list(cookies):
                    try:
                        if self.h.aio_command_completed(c):
                            self.completed.append(cookies.pop(c))
                    except nbd.Error as e:
                        self.errors.append((cookies.pop(c), str(e)))
        except nbd.Error as e:
            self.errors.append(("writer", str(e)))


def random_chunks(seed, start, total, size=MiB):
    rnd = random.Random(seed)
    return [(off, rnd.randbytes(size)) for off in range(start, start + total, size)]


def check_readback(h, chunks):
    for off, data in chunks:
        assert h.pread(len(data), off) == data, f"data differs at {off}"


EXPECTED_IO_ERROR = {"device": "disk0", "node-name": "fmt0", "operation": "write",
                     "action": "stop", "nospace": True, "reason": "No space left on device"}


def test_enospc_stops_and_cont_retries_exactly_once(daemon_on_tmpfs):
    d, mnt, image = daemon_on_tmpfs
    chunks = random_chunks(1, 0, 32 * MiB)
    h = d.nbd()
    w = Writer(h, chunks)
    w.start()

    ev = d.qmp.wait_event("BLOCK_IO_ERROR")
    assert ev["data"] == EXPECTED_IO_ERROR
    d.qmp.wait_event("STOP")
    assert d.qmp.cmd("query-status") == {
        "return": {"status": "io-error", "singlestep": False, "running": False}}
    block = d.qmp.cmd("query-block")["return"]
    assert [(b["device"], b["io-status"]) for b in block] == [("disk0", "nospace")]
    assert block[0]["inserted"]["node-name"] == "fmt0"
    assert w.is_alive(), "writes completed while the storage was full"

    grow(mnt, "80M")
    assert d.qmp.cmd("cont") == {"return": {}}
    w.join(60)
    assert not w.is_alive()
    assert w.errors == []
    # The flush came after every write it followed.
    assert w.completed[-1] == ("flush", None)
    assert len(w.completed) == len(chunks) + 1
    assert d.qmp.cmd("query-status")["return"]["status"] == "running"
    assert d.qmp.cmd("query-block")["return"][0]["io-status"] == "ok"
    check_readback(h, chunks)
    # What the daemon wrote is in the file itself.
    with open(image, "rb") as f:
        for off, data in chunks:
            f.seek(off)
            assert f.read(len(data)) == data
    h.shutdown()


def test_requests_arriving_while_stopped_are_held_then_done(daemon_on_tmpfs):
    d, mnt, image = daemon_on_tmpfs
    first = random_chunks(2, 0, 24 * MiB)
    h = d.nbd()
    w1 = Writer(h, first, flush=False)
    w1.start()
    d.qmp.wait_event("STOP")

    # A second client writes while the daemon is stopped: held, never failed.
    h2 = d.nbd()
    later = random_chunks(3, 40 * MiB, 4 * MiB)
    w2 = Writer(h2, later)
    w2.start()
    w2.join(0.5)
    assert w2.is_alive() and w2.completed == [], "a request completed while stopped"

    grow(mnt, "80M")
    d.qmp.cmd("cont")
    w1.join(60)
    w2.join(60)
    assert w1.errors == [] and w2.errors == []
    check_readback(h, first + later)
    h.shutdown()
    h2.shutdown()


def test_several_stop_cont_rounds(daemon_on_tmpfs):
    d, mnt, image = daemon_on_tmpfs
    chunks = random_chunks(4, 0, 48 * MiB)
    h = d.nbd()
    w = Writer(h, chunks)
    w.start()
    rounds = 0
    size = 16
    while w.is_alive():
        try:
            d.qmp.wait_event("STOP", timeout=5)
        except TimeoutError:
            continue
        ev = d.qmp.wait_event("BLOCK_IO_ERROR", timeout=5)
        assert ev["data"] == EXPECTED_IO_ERROR
        rounds += 1
        size += 12
        grow(mnt, f"{size}M")
        d.qmp.cmd("cont")
        d.qmp.wait_event("RESUME")
    w.join()
    assert rounds >= 2, f"expected several stops, got {rounds}"
    assert w.errors == []
    check_readback(h, chunks)
    stats = d.qmp.cmd("query-blockstats")["return"][0]
    assert stats["device"] == "disk0"
    assert stats["stats"]["__org.thinblk_stopped-count"] == rounds
    assert stats["stats"]["wr_operations"] == len(chunks)
    h.shutdown()


def test_werror_report_passes_enospc_to_client(daemons, tmpfs, tmp_path):
    image = tmpfs / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    d = Daemon(daemons, tmp_path, image, werror="report")
    try:
        h = d.nbd()
        data = bytes(MiB)
        with pytest.raises(nbd.Error) as e:
            for off in range(0, 32 * MiB, MiB):
                h.pwrite(random.randbytes(MiB), off)
        assert e.value.errno == "ENOSPC"  # NBD_ENOSPC on the wire
        ev = d.qmp.wait_event("BLOCK_IO_ERROR")
        assert ev["data"] == dict(EXPECTED_IO_ERROR, action="report")
        assert d.qmp.cmd("query-status")["return"]["status"] == "running"
        del data
        h.shutdown()
    finally:
        d.stop()


def test_query_stop_reason_names_the_device_and_errno(daemon_on_tmpfs):
    d, mnt, image = daemon_on_tmpfs
    h = d.nbd()
    w = Writer(h, random_chunks(5, 0, 24 * MiB))
    w.start()
    d.qmp.wait_event("STOP")
    r = d.qmp.cmd("__org.thinblk_query-stop-reason")["return"]
    assert r["status"] == "io-error" and r["running"] is False
    assert set(r["since"]) == {"seconds", "microseconds"}
    io = r["io-error"]
    del io["timestamp"]
    assert io == {"device": "disk0", "node-name": "fmt0", "operation": "write",
                  "nospace": True, "errno": "ENOSPC", "reason": "No space left on device"}
    grow(mnt, "80M")
    d.qmp.cmd("cont")
    w.join(60)
    assert w.errors == []
    h.shutdown()
