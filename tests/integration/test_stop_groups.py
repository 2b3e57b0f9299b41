"""Stop groups (docs/qmp.md, "Stop groups"): an ENOSPC stops only its group.

Two groups ("vm1", "vm2") of two NBD exports each, every image on its group's own small tmpfs
(real ENOSPC, as in test_enospc.py). vm1's storage runs out: vm1 stops, vm2's writers go on,
the run state never leaves running, and vm1's cont retries its parked writes exactly once.
"""
import os
import random
import subprocess
import threading
import time

import nbd
import pytest

from conftest import RUNNING, error, image, ok
from test_enospc import MiB, Writer, check_readback, grow, random_chunks

EXPORTS = {"vm1": ["a1", "a2"], "vm2": ["b1", "b2"]}


def mount_tmpfs(path, size):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "thinblk-test", str(path)],
                   check=True)
    return path


class Groups:
    """thinblkd with groups vm1 and vm2, each of two exports on images in its own store."""

    def __init__(self, daemons, tmp_path, stores):
        self.nbd_path = str(tmp_path / "nbd.sock")
        self.images = {}
        args = ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}"]
        for group, ids in EXPORTS.items():
            for id in ids:
                self.images[id] = image(stores[group] / f"{id}.raw", 64 * MiB)
                args += ["--blockdev", f"driver=file,node-name=p-{id},filename={self.images[id]}",
                         "--blockdev", f"driver=raw,node-name=n-{id},file=p-{id}"]
        self.daemon = daemons.start(args=args)
        self.qmp = self.daemon.negotiated()
        for group, ids in EXPORTS.items():
            ok(self.qmp.cmd("__org.thinblk_group-add", {"name": group}))
            for id in ids:
                ok(self.qmp.cmd("block-export-add", {
                    "type": "nbd", "id": id, "node-name": f"n-{id}", "name": id,
                    "writable": True, "__org.thinblk_group": group}))

    def nbd(self, id):
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{id}?socket={self.nbd_path}")
        return h

    def stats(self):
        return {s["device"]: s["stats"] for s in self.qmp.cmd("query-blockstats")["return"]}

    def group_status(self):
        return {g["name"]: g["status"]
                for g in self.qmp.cmd("__org.thinblk_query-groups")["return"]}


@pytest.fixture
def stores(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    mounts = {"vm1": mount_tmpfs(tmp_path / "vm1", "16M"),
              "vm2": mount_tmpfs(tmp_path / "vm2", "160M")}
    yield mounts
    for mnt in mounts.values():
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def groups(daemons, tmp_path, stores):
    g = Groups(daemons, tmp_path, stores)
    yield g
    g.qmp.close()
    assert g.daemon.shutdown() == []


class LoopWriter(threading.Thread):
    """Writes 64 KiB chunks round a 4 MiB region until told to stop, counting completions."""

    SIZE, REGION = 64 * 1024, 4 * MiB

    def __init__(self, h, seed):
        super().__init__(daemon=True)
        self.h, self.rnd = h, random.Random(seed)
        self.written = {}  # offset: the data last written there
        self.done, self.errors = 0, []
        self.cond = threading.Condition()
        self.stopping = threading.Event()

    def run(self):
        off = 0
        try:
            while not self.stopping.is_set():
                data = self.rnd.randbytes(self.SIZE)
                self.h.pwrite(data, off)
                self.written[off] = data
                with self.cond:
                    self.done += 1
                    self.cond.notify_all()
                off = (off + self.SIZE) % self.REGION
        except nbd.Error as e:
            self.errors.append(str(e))

    def count(self):
        with self.cond:
            return self.done

    def wait_for(self, n, timeout=20):
        with self.cond:
            assert self.cond.wait_for(lambda: self.done >= n or self.errors, timeout), \
                f"{self.done} writes of {n}"
        assert self.errors == []

    def finish(self):
        self.stopping.set()
        self.join(20)
        assert not self.is_alive() and self.errors == []
        return sorted(self.written.items())


def stall_stats(stats):
    """device: (stopped-count, stopped-time-ns, parked-requests, held-requests, longest-stall-ns)"""
    members = ("stopped-count", "stopped-time-ns", "parked-requests", "held-requests",
               "longest-stall-ns")
    return {dev: tuple(s["__org.thinblk_" + m] for m in members) for dev, s in stats.items()}


def test_enospc_stops_only_its_group(groups, stores):
    handles = {id: groups.nbd(id) for ids in EXPORTS.values() for id in ids}
    # 20 MiB each on vm1's 16 MiB: both its devices park writes, whichever goes first.
    chunks = {id: random_chunks(i, 0, 20 * MiB) for i, id in enumerate(EXPORTS["vm1"])}
    vm1 = [Writer(handles[id], chunks[id]) for id in EXPORTS["vm1"]]
    vm2 = [LoopWriter(handles[id], 10 + i) for i, id in enumerate(EXPORTS["vm2"])]
    for w in vm1 + vm2:
        w.start()

    ev = groups.qmp.wait_event("__org.thinblk_GROUP_STOP")
    stopped_at = time.monotonic()
    assert ev["data"] == {"group": "vm1", "status": "io-error"}
    parked_at = {id: groups.stats()[id]["wr_operations"] for id in EXPORTS["vm1"]}
    # vm2 goes on while vm1 is stopped: each of its writers completes 32 more writes.
    for w in vm2:
        w.wait_for(w.count() + 32)
    assert groups.group_status() == {"vm1": "io-error", "vm2": "running"}
    assert {id: groups.stats()[id]["wr_operations"] for id in EXPORTS["vm1"]} == parked_at
    assert all(w.is_alive() for w in vm1), "vm1 completed its writes on full storage"
    assert groups.qmp.cmd("query-status") == {"return": RUNNING}
    reason = groups.qmp.cmd("__org.thinblk_query-stop-reason", {"group": "vm1"})["return"]
    assert reason["status"] == "io-error" and reason["io-error"]["errno"] == "ENOSPC"
    assert reason["io-error"]["device"] in EXPORTS["vm1"]
    io_status = {b["device"]: b["io-status"] for b in groups.qmp.cmd("query-block")["return"]}
    assert io_status["b1"] == io_status["b2"] == "ok"
    written = {id: w.finish() for id, w in zip(EXPORTS["vm2"], vm2)}
    # Stall accounting: vm1's devices each have a request waiting (parked, or held behind the
    # stop), and the stall grows while they wait; vm2's never stopped.
    stalls = stall_stats(groups.stats())
    for id in EXPORTS["vm1"]:
        count, stopped_ns, parked, held, longest = stalls[id]
        assert (count, parked + held > 0, longest > 0) == (1, True, True), stalls
    for id in EXPORTS["vm2"]:
        assert stalls[id] == (0, 0, 0, 0, 0), stalls
    later = stall_stats(groups.stats())
    assert all(later[id][4] > stalls[id][4] for id in EXPORTS["vm1"]), (stalls, later)

    grow(stores["vm1"], "80M")
    cont_at = time.monotonic()
    ok(groups.qmp.cmd("__org.thinblk_group-cont", {"name": "vm1"}))
    assert groups.qmp.wait_event("__org.thinblk_GROUP_RESUME")["data"] == {"group": "vm1"}
    for w, id in zip(vm1, EXPORTS["vm1"]):
        w.join(60)
        assert not w.is_alive() and w.errors == []
        assert len(w.completed) == len(chunks[id]) + 1 and w.completed[-1] == ("flush", None)
    # Each parked write went to storage once more, and succeeded: one success per write.
    stats = groups.stats()
    for id in EXPORTS["vm1"]:
        assert stats[id]["wr_operations"] == len(chunks[id])
        assert stats[id]["failed_wr_operations"] == 0
    for id, w in zip(EXPORTS["vm2"], vm2):
        assert stats[id]["wr_operations"] == w.done
    assert "STOP" not in [e["event"] for e in groups.qmp.take_events()]
    assert groups.group_status() == {"vm1": "running", "vm2": "running"}
    # The first write parked was parked before GROUP_STOP and went again after the cont.
    stalls = stall_stats(stats)
    assert sum(stalls[id][2] for id in EXPORTS["vm1"]) >= 1, stalls
    assert max(stalls[id][4] for id in EXPORTS["vm1"]) >= (cont_at - stopped_at) * 1e9, stalls
    # (A request is parked before its group stops, so its stall may exceed the stopped time.)
    assert all(stalls[id][1] > 0 and stalls[id][4] > 0 for id in EXPORTS["vm1"]), stalls

    for id in EXPORTS["vm1"]:
        check_readback(handles[id], chunks[id])
    for id in EXPORTS["vm2"]:
        check_readback(handles[id], written[id])
    for id, data in list(chunks.items()) + list(written.items()):
        with open(groups.images[id], "rb") as f:
            for off, chunk in data:
                f.seek(off)
                assert f.read(len(chunk)) == chunk, f"{id} differs on disk at {off}"
    for h in handles.values():
        h.shutdown()


@pytest.fixture
def plain_groups(daemons, tmp_path):
    """Groups on images in plain directories: for what needs no ENOSPC."""
    stores = {}
    for group in EXPORTS:
        stores[group] = tmp_path / f"{group}-store"
        stores[group].mkdir()
    g = Groups(daemons, tmp_path, stores)
    yield g
    g.qmp.close()
    assert g.daemon.shutdown() == []


def wait_done(h, cookie):
    while not h.aio_command_completed(cookie):
        h.poll(-1)


def test_group_stop_and_the_daemons_stop(plain_groups):
    g = plain_groups
    a1, b1 = g.nbd("a1"), g.nbd("b1")
    ok(g.qmp.cmd("__org.thinblk_group-stop", {"name": "vm1"}))
    assert g.qmp.wait_event("__org.thinblk_GROUP_STOP")["data"] == {"group": "vm1",
                                                                      "status": "paused"}
    held = a1.aio_pwrite(b"1" * 4096, 0)
    b1.pwrite(b"2" * 4096, 0)  # vm2 runs while vm1 is paused

    # The daemon's stop holds every device; its cont resumes vm2, never the paused vm1.
    ok(g.qmp.cmd("stop"))
    g.qmp.wait_event("STOP")
    assert g.group_status() == {"vm1": "paused", "vm2": "running"}
    later = b1.aio_pwrite(b"3" * 4096, 4096)
    ok(g.qmp.cmd("cont"))
    g.qmp.wait_event("RESUME")
    wait_done(b1, later)
    assert not a1.aio_command_completed(held)
    assert g.stats()["a1"]["wr_operations"] == 0
    assert g.group_status() == {"vm1": "paused", "vm2": "running"}
    assert [e["event"] for e in g.qmp.take_events()] == []

    ok(g.qmp.cmd("__org.thinblk_group-cont", {"name": "vm1"}))
    assert g.qmp.wait_event("__org.thinblk_GROUP_RESUME")["data"] == {"group": "vm1"}
    wait_done(a1, held)
    assert a1.pread(4096, 0) == b"1" * 4096
    assert b1.pread(8192, 0) == b"2" * 4096 + b"3" * 4096
    assert g.stats()["a1"]["wr_operations"] == 1
    a1.shutdown()
    b1.shutdown()


def test_group_cont_while_the_daemon_is_stopped_waits_for_cont(plain_groups):
    g = plain_groups
    a1 = g.nbd("a1")
    ok(g.qmp.cmd("__org.thinblk_group-stop", {"name": "vm1"}))
    ok(g.qmp.cmd("stop"))
    held = a1.aio_pwrite(b"x" * 4096, 0)
    ok(g.qmp.cmd("__org.thinblk_group-cont", {"name": "vm1"}))
    g.qmp.wait_event("__org.thinblk_GROUP_RESUME")
    assert g.qmp.cmd("query-status")["return"]["status"] == "paused"
    assert not a1.aio_command_completed(held)
    ok(g.qmp.cmd("cont"))
    wait_done(a1, held)
    assert g.stats()["a1"]["wr_operations"] == 1
    a1.shutdown()


def test_membership_in_the_queries(plain_groups, tmp_path):
    g = plain_groups
    ok(g.qmp.cmd("blockdev-add", {"driver": "file", "node-name": "p-c",
                                  "filename": str(tmp_path / "vm1-store" / "a1.raw")}))
    ok(g.qmp.cmd("block-export-add", {"type": "nbd", "id": "c", "node-name": "p-c"}))
    member = "__org.thinblk_group"
    groups = {b["device"]: b.get(member) for b in g.qmp.cmd("query-block")["return"]}
    assert groups == {"a1": "vm1", "a2": "vm1", "b1": "vm2", "b2": "vm2", "c": None}
    exports = {e["id"]: e.get(member) for e in g.qmp.cmd("query-block-exports")["return"]}
    assert exports == groups
    assert g.qmp.cmd("__org.thinblk_query-groups")["return"] == [
        {"name": "vm1", "status": "running", "running": True, "exports": ["a1", "a2"]},
        {"name": "vm2", "status": "running", "running": True, "exports": ["b1", "b2"]}]
    reason = g.qmp.cmd("__org.thinblk_query-stop-reason", {"group": "vm2"})["return"]
    assert reason["status"] == "running" and "io-error" not in reason


def test_group_errors(plain_groups):
    q = plain_groups.qmp
    assert q.cmd("__org.thinblk_group-add", {"name": "vm1"}) == error(
        "Group 'vm1' already exists")
    assert q.cmd("__org.thinblk_group-del", {"name": "vm1"}) == error(
        "Group 'vm1' still has exports")
    for cmd in ["__org.thinblk_group-del", "__org.thinblk_group-stop",
                "__org.thinblk_group-cont"]:
        assert q.cmd(cmd, {"name": "vm9"}) == error("Group 'vm9' not found")
    assert q.cmd("__org.thinblk_query-stop-reason", {"group": "vm9"}) == error(
        "Group 'vm9' not found")
    assert q.cmd("block-export-add", {"type": "nbd", "id": "x", "node-name": "n-a1",
                                      "__org.thinblk_group": "vm9"}) == error(
        "Group 'vm9' not found")
    assert q.cmd("__org.thinblk_group-add", {}) == error("Parameter 'name' is missing")


def test_group_del_after_its_exports(plain_groups):
    q = plain_groups.qmp
    for id in EXPORTS["vm2"]:
        ok(q.cmd("block-export-del", {"id": id}))
    ok(q.cmd("__org.thinblk_group-del", {"name": "vm2"}))
    assert [x["name"] for x in q.cmd("__org.thinblk_query-groups")["return"]] == ["vm1"]


def test_groups_on_the_command_line(daemons, tmp_path):
    img = image(tmp_path / "c.raw", MiB)
    d = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=p0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
        "--group", "vm1",
        "--export", "type=nbd,id=c,node-name=p0,__org.thinblk_group=vm1"])
    assert d.negotiated().cmd("__org.thinblk_query-groups")["return"] == [
        {"name": "vm1", "status": "running", "running": True, "exports": ["c"]}]


def test_an_export_needs_its_group_first(daemons, tmp_path):
    img = image(tmp_path / "c.raw", MiB)
    d = daemons.start_raw([
        "--blockdev", f"driver=file,node-name=p0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
        "--export", "type=nbd,id=c,node-name=p0,__org.thinblk_group=vm1",
        "--group", "vm1"], wait=False)
    assert d.wait() == 1
    assert "--export: Group 'vm1' not found" in d.stderr()


def test_group_cont_drops_a_pending_stop(daemons, tmp_path):
    """A write still in flight (held 3 s by the fault node) keeps the group's error stop
    pending; the group's cont drops it with the pair GROUP_STOP, GROUP_RESUME, as cont does."""
    img = image(tmp_path / "f.raw", MiB)
    sock = tmp_path / "nbd.sock"
    d = daemons.start(args=[
        "--blockdev", f"driver=file,node-name=p0,filename={img}",
        "--blockdev", "driver=fault,node-name=flt,file=p0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--group", "vm1",
        "--export", "type=nbd,id=f,node-name=flt,writable=on,__org.thinblk_group=vm1"])
    q = d.negotiated()
    ok(q.cmd("__org.thinblk_fault-set", {"node-name": "flt", "rules": [
        {"op": "write", "offset": 0, "length": 4096, "delay-ms": 3000},
        {"op": "write", "offset": 65536, "errno": "ENOSPC", "once": True}]}))
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///flt?socket={sock}")
    slow = h.aio_pwrite(b"s" * 4096, 0)
    failed = h.aio_pwrite(b"f" * 4096, 65536)
    q.wait_event("BLOCK_IO_ERROR")
    assert q.cmd("__org.thinblk_query-groups")["return"][0]["status"] == "running"

    ok(q.cmd("__org.thinblk_group-cont", {"name": "vm1"}))
    assert [(e["event"], e["data"]) for e in q.take_events()] == [
        ("__org.thinblk_GROUP_STOP", {"group": "vm1", "status": "io-error"}),
        ("__org.thinblk_GROUP_RESUME", {"group": "vm1"})]
    wait_done(h, slow)
    wait_done(h, failed)
    assert h.pread(4096, 65536) == b"f" * 4096
    assert q.cmd("__org.thinblk_query-groups")["return"][0]["status"] == "running"
    h.shutdown()
