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
import itertools
import json
import os
import random
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
    assert counted_past_end(img) == 0


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
        except Exception as e:       # a bug in the test: make it fail, not hang
            self.errors.append(f"writer crashed: {e!r}")
            raise
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
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(sock):      # the NBD socket may come after the monitor's
        assert time.monotonic() < deadline, f"{sock} not created"
        time.sleep(0.005)   # polling interval while waiting for the socket file
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


# ---- 2. ENOSPC injected into metadata writes -------------------------------------------------

def slot_writes(rnd, base, slot, indices, whole=False):
    """One write in each slot [base + i*slot, base + (i+1)*slot) for i in indices: the whole
    slot, or a random piece of it (unaligned or 512-aligned). Slots never overlap, so the
    writes may run in any order and on any connection."""
    out = []
    for i in indices:
        start = base + i * slot
        if whole:
            out.append((start, rnd.randbytes(slot)))
            continue
        a = rnd.randrange(slot)
        b = rnd.randrange(a + 1, slot + 1)
        if rnd.random() < 0.5 and slot >= 1024:
            a, b = a - a % 512, max(b - b % 512, a - a % 512 + 512)
        out.append((start + a, rnd.randbytes(b - a)))
    return out


def pick(rnd, population, k):
    return rnd.sample(list(population), k)


def fail_writes(offset=None, length=None):
    """ENOSPC rules for write and write-zeroes requests overlapping [offset, offset+length)
    (the whole node without offset, the rest of it without length)."""
    rules = []
    for op in ("write", "write-zeroes"):
        r = {"op": op, "errno": "ENOSPC"}
        if offset is not None:
            r["offset"] = offset
        if length is not None:
            r["length"] = length
        rules.append(r)
    return rules


# Each scenario: cluster size, refcount bits, virtual size, qemu-io commands preparing the
# image (so that the structure aimed at exists at a known place), the rules (from the
# prepared image's layout), and the writes per NBD connection (from a seeded Random and
# the layout). Every write of every connection is sent at once (up to qd 16 each).

def _l2_shared_64k(rnd, L):
    # One L2 table maps the whole disk: every new cluster is linked through it.
    fresh = pick(rnd, range(1, 4096), 40)
    inplace = slot_writes(rnd, 0, 4 * KiB, range(16))[:6]          # cluster 0, allocated
    return [slot_writes(rnd, 0, 64 * KiB, fresh[:24]),
            inplace + slot_writes(rnd, 0, 64 * KiB, fresh[24:])]


def _l2_shared_512(rnd, L):
    # 512-byte clusters: an L2 table maps 32 KiB. 40 clusters under the L2 table aimed at,
    # and, on another connection, allocations under other (new) L2 tables in flight at the
    # same time.
    base = MiB
    mine = slot_writes(rnd, base, 512, pick(rnd, range(1, 64), 40))
    others = slot_writes(rnd, 4 * MiB, 8 * KiB, pick(rnd, range(0, 1000), 16), whole=True)
    return [mine, others]


def _refblock_64k(rnd, L):
    # Every allocation counts its cluster in refcount block 0; three connections, writes
    # under four different L2 tables (one of them new).
    return [slot_writes(rnd, 0, 64 * KiB, pick(rnd, range(1, 8192), 16)),
            slot_writes(rnd, GiB, 64 * KiB, pick(rnd, range(0, 8192), 16)),
            slot_writes(rnd, GiB + 512 * MiB, 128 * KiB, pick(rnd, range(0, 4096), 8))]


def _rt_entry_512(rnd, L):
    # Refcount block 0 covers the first 128 KiB of the file, nearly used up: these writes
    # need refcount block 1, which the refcount table must record.
    assert L.end < 120 * KiB and L.rb[1] == 0, (L.end, L.rb[:2])
    return [slot_writes(rnd, 8 * MiB, 2 * KiB, pick(rnd, range(0, 2048), 32), whole=True),
            slot_writes(rnd, 2 * MiB, 1 * KiB, pick(rnd, range(0, 2048), 32))]


def _rt_growth_512(rnd, L):
    # The refcount table (one cluster: 64 blocks of 256 clusters) covers the first 8 MiB of
    # the file, nearly used up: 512 KiB more must move the table to a bigger one, which
    # only the header can point to.
    assert L.rt_clusters == 1 and 7 * MiB < L.end < 8 * MiB, (L.rt_clusters, L.end)
    return [slot_writes(rnd, 16 * MiB, 8 * KiB, pick(rnd, range(0, 1024), 32), whole=True),
            slot_writes(rnd, 8 * MiB, 8 * KiB, pick(rnd, range(0, 1024), 32), whole=True)]


def _data_new_4k(rnd, L):
    # L2 tables for 0-8 MiB exist (2 MiB each); the writes need only new data clusters past
    # the end of the file (which fail) and in-place overwrites (which do not).
    fresh = [i for i in pick(rnd, range(0, 2048), 60) if i % 512][:40]
    inplace = [(k * 2 * MiB + 100 * j, rnd.randbytes(50)) for k in range(4) for j in range(2)]
    return [slot_writes(rnd, 0, 4 * KiB, fresh[:28]),
            inplace + slot_writes(rnd, 0, 4 * KiB, fresh[28:])]


def _all_fail_64k(rnd, L):
    # Every write fails: 48 requests on three connections fail together, allocating ones
    # and in-place overwrites of the first MiB.
    fresh = pick(rnd, range(16, 4096), 36)
    inplace = slot_writes(rnd, 0, 64 * KiB, range(16))
    return [inplace[:4] + slot_writes(rnd, 0, 64 * KiB, fresh[:12]),
            inplace[4:10] + slot_writes(rnd, 0, 64 * KiB, fresh[12:22]),
            inplace[10:] + slot_writes(rnd, 0, 64 * KiB, fresh[22:])]


METADATA_SCENARIOS = {
    # name: (cluster size, virtual size, prepare, rules(layout), writes(rnd, layout))
    "l2-shared-64k": (64 * KiB, 256 * MiB, ["write -P 0x11 0 64k"],
                      lambda L: fail_writes(L.l2_of(0), L.cluster_size), _l2_shared_64k),
    "l2-shared-512": (512, 16 * MiB, ["write -P 0x22 1M 512"],
                      lambda L: fail_writes(L.l2_of(MiB), 512), _l2_shared_512),
    "refblock-64k": (64 * KiB, 2 * GiB, ["write -P 0x33 600M 64k"],
                     lambda L: fail_writes(L.rb[0], L.cluster_size), _refblock_64k),
    "rt-entry-512": (512, 16 * MiB, ["write -P 0x44 0 100k"],
                     lambda L: fail_writes(0, 512)
                     + fail_writes(L.rt_offset, L.rt_clusters * 512), _rt_entry_512),
    "rt-growth-512": (512, 32 * MiB, ["write -P 0x55 0 7800k"],
                      lambda L: fail_writes(0, 512), _rt_growth_512),
    "data-new-4k": (4 * KiB, 64 * MiB,
                    ["write -P 0x66 0 4k", "write -P 0x67 2M 4k", "write -P 0x68 4M 4k",
                     "write -P 0x69 6M 4k"],
                    lambda L: fail_writes(L.end), _data_new_4k),
    "all-fail-64k": (64 * KiB, 256 * MiB, ["write -P 0x77 0 1M"],
                     lambda L: fail_writes(), _all_fail_64k),
}


def run_metadata_scenario(daemons, tmp_path, scenario):
    """Returns the number of STOPs after the first cont (see test_one_cont_is_enough)."""
    cs, vsize, prepare, rules_of, writes_of = METADATA_SCENARIOS[scenario]
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, vsize, cs)
    qemu_io(img, *prepare)
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, ref)
    L = Layout(img)
    seed = sum(map(ord, scenario))
    rnd = random.Random(seed)
    conns = writes_of(rnd, L)
    rules = rules_of(L)
    print(f"{scenario}: seed {seed}, rules {rules}, "
          f"{[len(c) for c in conns]} writes per connection")

    sock = daemons.rundir() / "nbd.sock"
    d = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=fault,node-name=flt,file=f0",
        "--blockdev", "driver=qcow2,node-name=q0,file=flt",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=disk,node-name=q0,name=disk,writable=on"])
    qmp = d.negotiated()
    assert qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": rules}) == \
        {"return": {}}
    handles = [connect(sock) for _ in conns]
    writers = [Writer(h, ws, qd=16, name=f"w{i}") for i, (h, ws) in
               enumerate(zip(handles, conns))]
    for w in writers:
        w.start()

    # The stop.
    before_stop = []
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert time.monotonic() < deadline, f"no STOP; events {before_stop}; writers " \
            f"{[(w.is_alive(), len(w.acked), w.flushed, w.errors) for w in writers]}"
        ev = next_event(qmp, 0.1)
        if ev is None:
            continue
        e = without_timestamp(ev)
        if e == {"event": "STOP"}:
            break
        assert e == expected_io_error("disk", "q0"), ev
        before_stop.append(e)
    assert before_stop, "STOP without a BLOCK_IO_ERROR before it"
    check_stopped_on_enospc(qmp, "disk", "q0")
    assert [w.flushed for w in writers] == [False] * len(writers), \
        "a flush completed while writes were parked"
    assert all(w.errors == [] for w in writers), [w.errors for w in writers]

    # Clear the rules, continue: everything completes. The daemon stops only once the
    # requests in flight have finished (QEMU drains before its monitor can see a cont), so
    # every failed request is parked before the STOP and no stop may follow this cont; a
    # late one is counted, continued (so the data checks still run) and then fails the test.
    assert qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": []}) == \
        {"return": {}}
    cont(qmp)
    late_stops = resumes = 0
    deadline = time.monotonic() + TIMEOUT
    while any(w.is_alive() for w in writers):
        assert time.monotonic() < deadline, "writers not done: " + str(
            [(w.name, len(w.acked), w.flushed) for w in writers])
        ev = next_event(qmp, 0.05)
        if ev is None:
            continue
        e = without_timestamp(ev)
        if e["event"] == "STOP":
            assert e == {"event": "STOP"}
            late_stops += 1
            assert late_stops <= sum(map(len, conns)), "stops without end"
            check_stopped_on_enospc(qmp, "disk", "q0")
            cont(qmp)
        elif e["event"] == "RESUME":
            assert e == {"event": "RESUME"}
            resumes += 1
        else:
            assert e == expected_io_error("disk", "q0"), ev
    while (ev := next_event(qmp, 1.5)) is not None:   # a held BLOCK_IO_ERROR: up to 1 s
        e = without_timestamp(ev)
        if e["event"] == "RESUME":
            resumes += 1
        else:
            assert e == expected_io_error("disk", "q0"), ev
    assert resumes == 1 + late_stops
    for w, ws in zip(writers, conns):
        assert w.errors == [], w.errors
        assert w.flushed and sorted(w.acked) == list(range(len(ws)))
    assert qmp.cmd("query-status") == RUNNING_STATUS
    stats = qmp.cmd("query-blockstats")["return"][0]["stats"]
    nwrites = sum(map(len, conns))
    assert (stats["__org.thinblk_stopped-count"], stats["wr_operations"],
            stats["failed_wr_operations"]) == (1 + late_stops, nwrites, 0), stats

    everything = [x for ws in conns for x in ws]
    ref_apply(ref, everything)
    with open(ref, "rb") as f:
        for off, data in everything:
            f.seek(off)
            assert handles[0].pread(len(data), off) == f.read(len(data)), f"differs at {off}"
    for h in handles:
        h.shutdown()
    qmp.close()
    assert d.shutdown() == []
    assert_check_clean(img)
    assert_same(img, ref)
    if scenario == "rt-growth-512":
        assert Layout(img).rt_clusters > 1, "the refcount table did not grow"
    assert late_stops == 0, f"{late_stops} more STOP(s) after the first cont"


@pytest.mark.parametrize("scenario", list(METADATA_SCENARIOS))
def test_enospc_on_metadata_write(daemons, tmp_path, scenario):
    """ENOSPC from a fault node between qcow2 and its file, aimed at one structure, while
    many writes on several connections are in flight: the daemon stops, with the exact
    events and state; no flush completes while stopped; after the rules are cleared, `cont`
    retries every parked write, each lands exactly once (read back, compared with a raw
    reference, qemu-img check finds no error and no leak) and the clients saw no error."""
    run_metadata_scenario(daemons, tmp_path, scenario)


def test_one_cont_is_enough(daemons, tmp_path):
    """Once the space is back, one `cont` must be enough, as in QEMU, whose stop drains the
    requests in flight, so that every failed request is parked before the STOP and retried
    by the cont. thinblkd's qcow2 splits a request into per-cluster parts; once one part has
    failed, the request's parts not yet started are skipped (the request is retried whole),
    and the STOP waits until the I/O in flight has finished. (Before both, the request
    completed, failed, long after the STOP and stopped the daemon a second time.)

    Here: a 4 MiB write R to a new area of a 512-byte-cluster image (8192 parts), whose first
    new-space write fails once; and a small in-place overwrite S that fails at once, so the
    daemon stops while R's other parts are still allocating."""
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    create(img, 32 * MiB, 512)
    qemu_io(img, "write -P 0x5a 0 4k")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, ref)
    L = Layout(img)
    with open(img, "rb") as f:
        f.seek(L.l2_of(0))
        host0 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    rules = [{"op": "write", "errno": "ENOSPC", "offset": host0, "length": 512},
             {"op": "write", "errno": "ENOSPC", "offset": L.end, "once": True}]
    rnd = random.Random(77)
    big = (8 * MiB, rnd.randbytes(4 * MiB))
    small = (100, rnd.randbytes(300))
    sock = daemons.rundir() / "nbd.sock"
    d = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=fault,node-name=flt,file=f0",
        "--blockdev", "driver=qcow2,node-name=q0,file=flt",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=disk,node-name=q0,name=disk,writable=on"])
    qmp = d.negotiated()
    assert qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": rules}) == \
        {"return": {}}
    h = connect(sock)
    w = Writer(h, [big, small], qd=2)
    w.start()
    qmp.wait_event("STOP")
    check_stopped_on_enospc(qmp, "disk", "q0")
    assert qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": []}) == \
        {"return": {}}
    cont(qmp)
    stops = 0
    deadline = time.monotonic() + TIMEOUT
    while w.is_alive():
        assert time.monotonic() < deadline, "writer not done"
        ev = next_event(qmp, 0.05)
        if ev is not None and ev["event"] == "STOP":
            stops += 1
            check_stopped_on_enospc(qmp, "disk", "q0")
            cont(qmp)
    assert w.errors == [] and w.flushed
    ref_apply(ref, [big, small])
    assert h.pread(len(big[1]), big[0]) == big[1]
    h.shutdown()
    qmp.close()
    assert d.shutdown() == []
    assert_check_clean(img)
    assert_same(img, ref)
    assert stops == 0, (f"{stops} more STOP(s) after cont with the fault cleared: the 4 MiB "
                        f"write whose first part failed before the STOP completed (failed) "
                        f"only after the cont")


# ---- 3. kill -9 during allocations -----------------------------------------------------------

SECTOR = 512


def random_4k_writes(seed, vsize, cs):
    """Endless 4 KiB writes, each to a random cluster (a random 4 KiB of it for big
    clusters): nearly every one allocates while the disk is young."""
    rnd = random.Random(seed)
    while True:
        if cs >= 4 * KiB:
            off = rnd.randrange(vsize // cs) * cs + rnd.randrange(cs // (4 * KiB)) * 4 * KiB
        else:
            off = rnd.randrange(vsize // (4 * KiB)) * 4 * KiB
        yield off, rnd.randbytes(4 * KiB)


def check_after_crash(img):
    """qemu-img check right after a kill: no corruption; leaked clusters (the ones reserved
    ahead, a batch cut short) are allowed. Returns how many, counting those past the end of
    the file that qemu-img check does not see."""
    r = run("qemu-img", "check", "--output=json", img, check=False)
    out = json.loads(r.stdout)
    assert r.returncode in (0, 3) and out.get("corruptions", 0) == 0 and \
        out.get("check-errors", 0) == 0, f"qemu-img check: exit {r.returncode}\n{r.stdout}"
    return out.get("leaks", 0) + counted_past_end(img)


def counted_past_end(img):
    """Clusters with a refcount at or past the end of the file: leaks too, which qemu-img check
    does not see (it compares refcounts up to the end of the file only). A thinblkd killed
    with clusters reserved ahead, never written, leaves these."""
    lay = Layout(img)
    cs = lay.cluster_size
    with open(img, "rb") as f:
        hdr = f.read(104)
        order = struct.unpack(">I", hdr[96:100])[0] if struct.unpack(">I", hdr[4:8])[0] >= 3 \
            else 4
        per_block = cs * 8 >> order
        end = (lay.end + cs - 1) // cs
        past = 0
        for b, rb in enumerate(lay.rb):
            if not rb or (b + 1) * per_block <= end:
                continue
            f.seek(rb)
            block = f.read(cs)
            for i in range(max(0, end - b * per_block), per_block):
                bit = i << order
                if order < 3:
                    v = (block[bit // 8] >> (bit % 8)) & ((1 << (1 << order)) - 1)
                else:
                    w = 1 << (order - 3)
                    v = int.from_bytes(block[i * w:(i + 1) * w], "big")
                past += v != 0
    return past


def check_reopened(img):
    """qemu-img check of the image thinblkd has just opened again (writable, nothing written
    yet): its open reclaimed every leak, so nothing is leaked and nothing wrong."""
    r = run("qemu-img", "check", "-U", img, check=False)
    assert r.returncode == 0 and "No errors were found on the image" in r.stdout, \
        f"qemu-img check after the reopen: exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert "leaked" not in r.stdout + r.stderr, r.stdout
    assert counted_past_end(img) == 0


class Model:
    """What each 512-byte sector of the disk may hold: sectors not in `known` are zero.
    After a kill, a sector written in the round holds the last write to it that a completed
    flush covered (or what it held before the round), or any write sent after that one."""

    def __init__(self, cs):
        self.cs = cs
        self.known = {}
        self.touched = set()     # clusters ever written

    def verify(self, img, raw, writes, durable):
        """Check the image against the writes of a round (in the order sent; `durable`:
        the indices a flush covered) and learn what it holds now."""
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw)
        zero = bytes(SECTOR)
        per_sector = {}
        for i, (off, data) in enumerate(writes):
            for s in range(off, off + len(data), SECTOR):
                per_sector.setdefault(s, []).append((i, data[s - off:s - off + SECTOR]))
        clusters = {c for o, d in writes for c in range(o // self.cs,
                                                         (o + len(d) - 1) // self.cs + 1)}
        self.touched |= clusters
        bad = []
        with open(raw, "rb") as f:
            for c in sorted(clusters):
                f.seek(c * self.cs)
                got = f.read(self.cs)
                for k in range(0, self.cs, SECTOR):
                    s = c * self.cs + k
                    actual = got[k:k + SECTOR]
                    history = per_sector.get(s, [])
                    last = max((j for j, (i, _) in enumerate(history) if i in durable),
                               default=None)
                    if last is None:
                        allowed = [self.known.get(s, zero)] + [d for _, d in history]
                    else:
                        allowed = [d for _, d in history[last:]]
                    if actual not in allowed:
                        bad.append(s)
                    if actual == zero:
                        self.known.pop(s, None)
                    else:
                        self.known[s] = actual
        assert bad == [], f"{len(bad)} sectors hold what was never written there, " \
            f"or lost a flushed write: first at {bad[:8]}"
        # Nothing allocated where nothing was ever written.
        m = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", img).stdout)
        stray = [e for e in m if e["data"] and any(
            c not in self.touched for c in range(e["start"] // self.cs,
                                                 (e["start"] + e["length"] - 1) // self.cs + 1))]
        assert stray == [], f"data where nothing was written: {stray[:4]}"


def serve(daemons, img):
    sock = daemons.rundir() / "nbd.sock"
    d = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=qcow2,node-name=q0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=disk,node-name=q0,name=disk,writable=on"])
    return d, sock


@pytest.mark.parametrize("cluster_size,vsize,rounds", [(512, 64 * MiB, 12),
                                                       (64 * KiB, GiB, 24)])
def test_kill9_during_allocations(daemons, tmp_path, cluster_size, vsize, rounds):
    """Rounds of: thinblkd on the same image, 4 KiB writes to random clusters with 16 in
    flight and a flush every 32, SIGKILL once a seeded random number of bytes has been
    acknowledged; then qemu-img check finds no corruption (leaks are allowed: clusters reserved
    ahead), every flushed write is there, every other sector holds one of the values it may
    hold, and nothing is allocated where nothing was written. The next round's thinblkd opens
    the image again: before it writes, qemu-img check finds no leak and no error (the open
    reclaimed them). At the end a last run writes, flushes and shuts down cleanly, and
    everything it wrote is there, with no leak."""
    img, raw = tmp_path / "disk.qcow2", tmp_path / "now.raw"
    create(img, vsize, cluster_size)
    model = Model(cluster_size)
    krnd = random.Random(cluster_size * 31 + rounds)
    leaks = []
    for rnd_i in range(rounds + 1):
        last = rnd_i == rounds
        d, sock = serve(daemons, img)
        h = connect(sock)
        check_reopened(img)
        seed = krnd.randrange(1 << 30)
        gen = random_4k_writes(seed, vsize, cluster_size)
        if last:
            gen = itertools.islice(gen, 200)
        w = Writer(h, gen, qd=16, flush_every=32, final_flush=last, name=f"round{rnd_i}")
        w.start()
        if last:
            w.join(TIMEOUT)
            assert not w.is_alive() and w.errors == [] and w.flushed
            h.shutdown()
            assert d.shutdown() == []
            durable = set(range(len(w.submitted)))
            print(f"round {rnd_i}: {len(w.submitted)} writes, clean shutdown")
        else:
            kill_at = krnd.randrange(4 * KiB, 768 * KiB)
            assert w.wait_bytes(kill_at), f"writer failed before the kill: {w.errors}"
            d.kill(also=[str(sock)])
            w.join(TIMEOUT)
            assert not w.is_alive()
            durable = set(w.durable)
            print(f"round {rnd_i}: seed {seed}, kill at {kill_at} bytes acknowledged "
                  f"(then {w.done_bytes}), {len(w.submitted)} writes sent, "
                  f"{len(durable)} flushed")
        if last:
            assert_check_clean(img)
        else:
            leaks.append(check_after_crash(img))
        model.verify(img, raw, w.submitted, durable)
    print(f"{rounds} kills; leaked clusters right after each (reclaimed by the next open): "
          f"{leaks}")
    assert any(leaks), "no kill left a leak to reclaim: the test did not test the reclaim"
