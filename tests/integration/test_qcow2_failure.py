"""qcow2 under failure: real ENOSPC on a loop device, injected ENOSPC aimed at metadata
writes, and kill -9 in the middle of allocations.

What is checked is behaviour, never the driver's internals: the events and the run state
(exact JSON), that an NBD client never sees an error and reads back what it wrote, that
`qemu-img compare` finds the image equal to a raw reference that got the same writes, and
that `qemu-img check` finds no corruption (and no leak where nothing crashed). Where a test
aims a fault at a metadata structure it finds the structure's place by reading the image's
header and tables the way any qcow2 reader would; it assumes only what every qcow2 writer
must do (link a new cluster through its L2 table, count it in a refcount block, record a new
refcount block in the refcount table, point the header at a moved refcount table).

Every writer is deterministic (seeded offsets and bytes); seeds and kill points are printed,
and pytest shows them with a failure.
"""
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time

import nbd
import pytest

from conftest import TIMEOUT, thinblk_only, without_timestamp

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

pytestmark = [thinblk_only,
              pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")]

IO_ERROR_STATUS = {"return": {"status": "io-error", "singlestep": False, "running": False}}
RUNNING_STATUS = {"return": {"status": "running", "singlestep": False, "running": True}}
ENOSPC_TEXT = "No space left on device"


def run(*argv, check=True):
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))}: exit {r.returncode}\n"
                             f"{r.stdout}{r.stderr}")
    return r


def create(path, size, cluster_size, refcount_bits=16):
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"cluster_size={cluster_size},refcount_bits={refcount_bits}", path, size)


def qemu_io(img, *cmds):
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    r = run(*argv, img)
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def assert_check_clean(img):
    r = run("qemu-img", "check", img, check=False)
    assert r.returncode == 0, f"qemu-img check: exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert "No errors were found on the image" in r.stdout, r.stdout
    assert "leaked" not in r.stdout + r.stderr, r.stdout


def assert_same(img, ref):
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Images are identical" in r.stdout, r.stdout


def ref_apply(ref, writes):
    with open(ref, "r+b") as f:
        for off, data in writes:
            f.seek(off)
            f.write(data)


def make_ref(ref, size):
    with open(ref, "wb") as f:
        f.truncate(size)


# ---- reading the image's layout (as any qcow2 reader must) ----------------------------------

class Layout:
    """Where the header, L1 table, L2 tables, refcount table and blocks of img are."""

    def __init__(self, img):
        with open(img, "rb") as f:
            hdr = f.read(104)
            assert struct.unpack(">I", hdr[:4])[0] == 0x514649FB
            self.cluster_size = 1 << struct.unpack(">I", hdr[20:24])[0]
            self.l1_size = struct.unpack(">I", hdr[36:40])[0]
            self.l1_offset = struct.unpack(">Q", hdr[40:48])[0]
            self.rt_offset = struct.unpack(">Q", hdr[48:56])[0]
            self.rt_clusters = struct.unpack(">I", hdr[56:60])[0]
            f.seek(self.l1_offset)
            raw = f.read(8 * self.l1_size)
            self.l2 = [struct.unpack(">Q", raw[i:i + 8])[0] & 0x00fffffffffffe00
                       for i in range(0, len(raw), 8)]
            f.seek(self.rt_offset)
            raw = f.read(self.rt_clusters * self.cluster_size)
            self.rb = [struct.unpack(">Q", raw[i:i + 8])[0] & ~0x1ff
                       for i in range(0, len(raw), 8)]
            f.seek(0, os.SEEK_END)
            self.end = f.tell()
        self.l2_span = self.cluster_size * self.cluster_size // 8   # guest bytes per L2

    def l2_of(self, voff):
        off = self.l2[voff // self.l2_span]
        assert off, f"no L2 table for guest offset {voff}"
        return off


# ---- writing ---------------------------------------------------------------------------------

class Writer(threading.Thread):
    """Writes (offset, bytes) pairs over one NBD connection with up to qd requests in flight,
    never two overlapping ones at once (so the order of overlapping writes is the order of
    the list), then flushes. `writes` may be a generator (it is consumed lazily).

    Progress: done_bytes (acknowledged write bytes); `submitted` (the writes sent, in order),
    `acked` (their indices, as acknowledged) and `durable` (indices acknowledged before a flush
    that succeeded was sent). With flush_every=N a flush is sent after every N writes (it
    does not wait: it is one more request in flight). Errors end the thread and are kept in
    `errors`; `flushed` tells whether the final flush succeeded."""

    def __init__(self, h, writes, qd=16, flush_every=0, final_flush=True, name="writer"):
        super().__init__(daemon=True, name=name)
        self.h, self.writes, self.qd = h, iter(writes), qd
        self.flush_every, self.final_flush = flush_every, final_flush
        self.submitted, self.acked, self.durable = [], [], set()
        self.errors = []
        self.flushed = False
        self.done_bytes = 0
        self.progress = threading.Condition()

    def run(self):
        h = self.h
        inflight = {}        # cookie -> ("w", index) or ("f", acked indices before it)
        busy = {}            # cookie -> (offset, end) of writes in flight
        pending = None
        since_flush = 0
        final_sent = False
        try:
            while True:
                # Send what may go now.
                while len(inflight) < self.qd:
                    if pending is None:
                        pending = next(self.writes, None)
                    if pending is None:
                        break
                    off, data = pending
                    end = off + len(data)
                    if any(off < e and o < end for o, e in busy.values()):
                        break
                    i = len(self.submitted)
                    self.submitted.append(pending)
                    c = h.aio_pwrite(bytearray(data), off)
                    inflight[c], busy[c] = ("w", i), (off, end)
                    pending = None
                    since_flush += 1
                    if self.flush_every and since_flush >= self.flush_every:
                        inflight[h.aio_flush()] = ("f", list(self.acked))
                        since_flush = 0
                if pending is None and not final_sent and self.final_flush and \
                        len(inflight) < self.qd:
                    inflight[h.aio_flush()] = ("f", None)
                    final_sent = True
                if not inflight:
                    return
                h.poll(-1)
                for c in list(inflight):
                    if not h.aio_command_completed(c):
                        continue
                    kind, what = inflight.pop(c)
                    busy.pop(c, None)
                    with self.progress:
                        if kind == "w":
                            self.acked.append(what)
                            self.done_bytes += len(self.submitted[what][1])
                        elif what is None:
                            self.flushed = True
                            self.durable.update(self.acked)
                        else:
                            self.durable.update(what)
                        self.progress.notify_all()
        except nbd.Error as e:
            self.errors.append(str(e))
        finally:
            with self.progress:
                self.progress.notify_all()

    def wait_bytes(self, n, timeout=TIMEOUT):
        with self.progress:
            ok = self.progress.wait_for(lambda: self.done_bytes >= n or not self.is_alive()
                                        or self.errors, timeout)
        assert ok, f"writer made no progress to {n} bytes in {timeout}s: {self.done_bytes}"
        return self.done_bytes >= n


def connect(sock):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk?socket={sock}")
    return h


def next_event(qmp, timeout):
    """The next event (set aside by cmd() or still to come), or None past the timeout."""
    if qmp.events:
        return qmp.events.pop(0)
    try:
        return qmp.read_event(timeout=timeout)
    except TimeoutError:
        return None


def expected_io_error(device, node):
    return {"event": "BLOCK_IO_ERROR",
            "data": {"device": device, "node-name": node, "operation": "write",
                     "action": "stop", "nospace": True, "reason": ENOSPC_TEXT}}


def check_stopped_on_enospc(qmp, device, node):
    assert qmp.cmd("query-status") == IO_ERROR_STATUS
    r = qmp.cmd("__org.thinblk_query-stop-reason")["return"]
    io = dict(r.get("io-error", {}))
    io.pop("timestamp", None)
    assert (r["status"], r["running"], io) == ("io-error", False, {
        "device": device, "node-name": node, "operation": "write", "nospace": True,
        "errno": "ENOSPC", "reason": ENOSPC_TEXT}), r


def cont(qmp):
    assert qmp.cmd("cont") == {"return": {}}


# ---- 1. qcow2 on a loop device smaller than the virtual disk --------------------------------

class LoopDevices:
    def __init__(self):
        self.devs = []

    def attach(self, path):
        dev = run("losetup", "--find", "--show", path).stdout.strip()
        assert dev.startswith("/dev/loop"), dev
        self.devs.append(dev)
        return dev

    def detach_all(self):
        problems = []
        for dev in self.devs:
            r = run("losetup", "-d", dev, check=False)
            if r.returncode != 0:
                problems.append(f"losetup -d {dev}: {r.stderr.strip()}")
        self.devs = []
        return problems


@pytest.fixture
def loops(daemons):
    """Loop devices made by the test, detached afterwards whatever happened. It depends on
    `daemons` so that the daemons (which hold the devices open) are shut down first."""
    lo = LoopDevices()
    yield lo
    for d in daemons.daemons:
        if d.running():
            d.proc.kill()
            d.proc.wait()
        for path in d.leftover_sockets():
            os.unlink(path)
    problems = lo.detach_all()
    assert problems == [], problems


def loop_workload(seed, vsize, count):
    """count writes of 1 byte to 512 KiB at random offsets (some in the same clusters as
    others, some overwriting earlier ones), deterministic for the seed."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        length = rnd.choice([4 * KiB, 64 * KiB, 64 * KiB + 512, 200 * KiB, 512 * KiB,
                             rnd.randrange(1, 130 * KiB)])
        off = rnd.randrange(0, vsize - length)
        if rnd.random() < 0.7:
            off -= off % 512
        out.append((off, rnd.randbytes(length)))
    return out


@pytest.mark.parametrize("cluster_size,start_size", [(64 * KiB, 8 * MiB), (4 * KiB, 4 * MiB)])
def test_loop_device_grown_on_every_stop(daemons, loops, tmp_path, cluster_size, start_size):
    """thin provisioning for real: the image sits on a block device far smaller than its
    virtual size; each time the device is full the daemon stops, the test grows the device
    (the backing file, then `losetup -c`) a little and continues; the writer, with 16
    requests in flight, never sees an error, and the image ends up exactly what was
    written."""
    vsize = 256 * MiB
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(start_size)
    dev = loops.attach(backing)
    create(dev, vsize, cluster_size)
    ref = tmp_path / "ref.raw"
    make_ref(ref, vsize)
    seed = cluster_size + start_size
    writes = loop_workload(seed, vsize, 260 if cluster_size == 64 * KiB else 400)
    print(f"seed {seed}: {len(writes)} writes, {sum(len(d) for _, d in writes)} bytes")

    sock = daemons.rundir() / "nbd.sock"
    d = daemons.start(args=[
        "--blockdev", f"driver=host_device,filename={dev},node-name=proto",
        "--blockdev", "driver=qcow2,file=proto,node-name=fmt",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=fmt,name=disk,writable=on"])
    qmp = d.negotiated()
    h = connect(sock)
    w = Writer(h, writes, qd=16)
    w.start()

    grow_rnd = random.Random(seed + 1)
    stops = resumes = 0
    io_errors = []
    deadline = time.monotonic() + 120
    while w.is_alive():
        assert time.monotonic() < deadline, f"writer not done after {stops} stops"
        ev = next_event(qmp, 0.05)
        if ev is None:
            continue
        e = without_timestamp(ev)
        if e["event"] == "BLOCK_IO_ERROR":
            assert e == expected_io_error("e0", "fmt")
            io_errors.append(e)
        elif e["event"] == "RESUME":
            assert e == {"event": "RESUME"}
            resumes += 1
        else:
            assert e == {"event": "STOP"}
            stops += 1
            if stops == 1:
                assert io_errors, "STOP before the first BLOCK_IO_ERROR"
            check_stopped_on_enospc(qmp, "e0", "fmt")
            assert not w.flushed
            with open(backing, "r+b") as f:
                f.truncate(os.fstat(f.fileno()).st_size
                           + grow_rnd.choice([256 * KiB, 512 * KiB, MiB, 2 * MiB]))
            run("losetup", "-c", dev)
            cont(qmp)
    w.join()
    # The last BLOCK_IO_ERROR may be held up to a second by the rate limit.
    while (ev := next_event(qmp, 1.5)) is not None:
        e = without_timestamp(ev)
        if e["event"] == "BLOCK_IO_ERROR":
            assert e == expected_io_error("e0", "fmt")
        elif e["event"] == "RESUME":
            resumes += 1
        else:
            pytest.fail(f"unexpected event after the writer finished: {ev}")
    print(f"{stops} stops, device {os.path.getsize(backing)} bytes")
    assert w.errors == [], w.errors
    assert w.flushed and len(w.acked) == len(writes)
    assert stops >= 20, f"only {stops} stops: the workload no longer fills the device"
    assert resumes == stops
    assert qmp.cmd("query-status") == RUNNING_STATUS
    stats = qmp.cmd("query-blockstats")["return"][0]["stats"]
    assert stats["__org.thinblk_stopped-count"] == stops
    assert stats["wr_operations"] == len(writes)
    assert stats["failed_wr_operations"] == 0

    ref_apply(ref, writes)
    with open(ref, "rb") as f:
        for off, data in writes:
            f.seek(off)
            assert h.pread(len(data), off) == f.read(len(data)), f"differs at {off}"
    h.shutdown()
    qmp.close()
    assert d.shutdown() == []
    assert_check_clean(dev)
    assert_same(dev, ref)
