"""Stop groups with two real guests on one daemon (docs/qmp.md, "Stop groups"; issue 15).

One thinblkd serves two NBD exports, disk1 in group g1 and disk2 in group g2, each image on its
own tmpfs: g1's (4 MiB) is far too small for what its guest writes, g2's is big enough. Two QEMU
TCG guests (tests/guest, the write job, werror=report so an error would reach them) start
together and each write WRITE_MB. g1's storage runs out: BLOCK_IO_ERROR and GROUP_STOP g1, no
STOP, query-status stays running; guest 2 then writes all its data and finishes while g1 is
stopped. Then g1's tmpfs grows, __org.thinblk_group-cont g1 retries its parked write, and
guest 1 finishes. Both guests saw no error and their checksums match the images.

Which guest gets ahead is up to the scheduler (one run on a busy 2-CPU machine had guest 2
done before guest 1 had written 4 MiB), so g2 is held (__org.thinblk_group-stop) from before
the guests start until g1 has stopped: guest 2 boots, and its requests wait, as a guest on a
paused disk does. Its whole write then happens while g1 is stopped, on every run.

Needs root (mounts the tmpfs), qemu-system-x86_64 and the guest kit's cache (see
test_guest_enospc.py).
"""

import os
import sys
import time
from pathlib import Path

import pytest

from conftest import AGAINST_QEMU, QMPClient, without_timestamp
from test_guest_enospc import GUEST_TIMEOUT, RUNNING, Watch, wait_for_unix_socket

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402

pytestmark = [
    pytest.mark.skipif(kit.qemu_path() is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root"),
    pytest.mark.skipif(AGAINST_QEMU, reason="stop groups are thinblkd's"),
]

MIB = kit.MIB
IMAGE_SIZE = 64 * MIB
WRITE_MB = 48
IO_ERROR_G1 = {"device": "disk1", "node-name": "fmt1", "operation": "write",
               "action": "stop", "nospace": True, "reason": "No space left on device"}


@pytest.fixture(scope="module")
def image():
    return kit.build_guest()


@pytest.fixture
def stores():
    """g1's storage is too small for WRITE_MB, g2's is not."""
    with kit.small_tmpfs("4M", "thinblk-g1") as s1, kit.small_tmpfs("80M", "thinblk-g2") as s2:
        yield {"g1": s1, "g2": s2}


def group_status(qmp):
    return {g["name"]: g["status"] for g in qmp.cmd("__org.thinblk_query-groups")["return"]}


def io_status(qmp):
    return {b["device"]: b["io-status"] for b in qmp.cmd("query-block")["return"]
            if b.get("device")}


def written(qmp, device):
    """Bytes written to DEVICE so far (query-blockstats)."""
    return {s["device"]: s["stats"]["wr_bytes"]
            for s in qmp.cmd("query-blockstats")["return"]}[device]


def check_wrote(g, rc, img):
    """The guest exited cleanly, saw no I/O error, and the image holds what it wrote."""
    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{g.console}"
    assert "I/O error" not in g.console, g.dmesg
    assert not g.io_error, g.dmesg
    r = g.result()
    assert (r["job"], r["mb"], r["dd-status"], r["read-status"]) == ("write", WRITE_MB, 0, 0), r
    assert r["write-sha256"] == r["readback-sha256"], r
    assert kit.file_sha256(img, 0, WRITE_MB * MIB) == r["write-sha256"]
    assert g.status == 0


def test_two_guests_one_group_stops(image, stores, daemons, tmp_path, record_property):
    imgs = {}
    for n, group in ((1, "g1"), (2, "g2")):
        imgs[n] = stores[group] / f"disk{n}.raw"
        with open(imgs[n], "wb") as f:
            f.truncate(IMAGE_SIZE)
    rundir = daemons.rundir()
    qmp_sock, nbd_sock = rundir / "qmp.sock", rundir / "nbd.sock"
    args = ["--qmp", qmp_sock, "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}"]
    for n in (1, 2):
        args += ["--group", f"g{n}",
                 "--blockdev", f"driver=file,node-name=proto{n},filename={imgs[n]}",
                 "--blockdev", f"driver=raw,node-name=fmt{n},file=proto{n}",
                 "--export", f"type=nbd,id=disk{n},node-name=fmt{n},name=disk{n},writable=on,"
                             f"__org.thinblk_group=g{n}"]
    d = daemons.start_raw(args, sockets=[qmp_sock], rundir=rundir)
    wait_for_unix_socket(nbd_sock, d)
    qmp = QMPClient(qmp_sock, timeout=60).negotiate()
    d.clients.append(qmp)
    assert qmp.cmd("query-status") == {"return": RUNNING}
    assert group_status(qmp) == {"g1": "running", "g2": "running"}
    # Hold g2 until g1 has stopped (see the top of the file).
    assert qmp.cmd("__org.thinblk_group-stop", {"name": "g2"}) == {"return": {}}
    assert [without_timestamp(e) for e in qmp.take_events()] == [
        {"event": "__org.thinblk_GROUP_STOP", "data": {"group": "g2", "status": "paused"}}]

    started = time.monotonic()
    with kit.Guest(image, kit.NbdDisk(str(nbd_sock), "disk1"), job="write", mb=WRITE_MB,
                   workdir=tmp_path / "guest1") as g1, \
         kit.Guest(image, kit.NbdDisk(str(nbd_sock), "disk2"), job="write", mb=WRITE_MB,
                   workdir=tmp_path / "guest2") as g2:
        # Watches guest 1, which must not exit before g1 resumes; guest 2 is waited for below.
        w = Watch(qmp, g1, d)

        # 1. g1 runs out: BLOCK_IO_ERROR(s) on disk1, then its group stops. Nothing else.
        while True:
            ev = without_timestamp(w.next_event())
            if ev["event"] == "__org.thinblk_GROUP_STOP":
                assert ev["data"] == {"group": "g1", "status": "io-error"}, w.log
                break
            assert ev == {"event": "BLOCK_IO_ERROR", "data": IO_ERROR_G1}, w.log
        assert [e for e in w.log if e["event"] == "BLOCK_IO_ERROR"], w.log
        stopped_at = time.monotonic()

        # 2. Only g1 stopped: the daemon runs, disk2 is fine, disk1 is out of space.
        assert qmp.cmd("query-status") == {"return": RUNNING}
        assert group_status(qmp) == {"g1": "io-error", "g2": "paused"}
        assert io_status(qmp) == {"disk1": "nospace", "disk2": "ok"}
        assert written(qmp, "disk2") == 0 and not g2.markers("RESULT"), g2.console

        # 3. Guest 2 writes everything and finishes while g1 stays stopped and guest 1 waits.
        assert qmp.cmd("__org.thinblk_group-cont", {"name": "g2"}) == {"return": {}}
        for ev in w.take():   # GROUP_RESUME g2, maybe a late coalesced BLOCK_IO_ERROR of disk1
            assert without_timestamp(ev) in (
                {"event": "__org.thinblk_GROUP_RESUME", "data": {"group": "g2"}},
                {"event": "BLOCK_IO_ERROR", "data": IO_ERROR_G1}), w.log
        g2_cont_at = time.monotonic()
        _, rc2 = g2.wait(GUEST_TIMEOUT)
        g2_done_at = time.monotonic()
        check_wrote(g2, rc2, imgs[2])
        assert written(qmp, "disk2") >= WRITE_MB * MIB
        assert g1.running() and not g1.markers("RESULT"), g1.console
        assert group_status(qmp) == {"g1": "io-error", "g2": "running"}
        for ev in w.take():   # late coalesced BLOCK_IO_ERRORs of disk1 only
            assert without_timestamp(ev) == {"event": "BLOCK_IO_ERROR",
                                             "data": IO_ERROR_G1}, w.log

        # 4. Extend g1's storage and resume g1 alone.
        kit.grow_tmpfs(stores["g1"], "80M")
        assert qmp.cmd("__org.thinblk_group-cont", {"name": "g1"}) == {"return": {}}
        while True:
            ev = without_timestamp(w.next_event())
            if ev["event"] == "__org.thinblk_GROUP_RESUME":
                assert ev["data"] == {"group": "g1"}, w.log
                break
            assert ev == {"event": "BLOCK_IO_ERROR", "data": IO_ERROR_G1}, w.log
        _, rc1 = g1.wait(GUEST_TIMEOUT)
        check_wrote(g1, rc1, imgs[1])
    elapsed = time.monotonic() - started
    events = [without_timestamp(e) for e in w.log + qmp.take_events()]
    print(f"guests ran {elapsed:.1f} s: g1 stopped {stopped_at - started:.1f} s in, g2 went on "
          f"{g2_cont_at - started:.1f} s in, guest 2 done {g2_done_at - started:.1f} s in; "
          f"events: {events}")
    record_property("guest_seconds", round(elapsed, 2))
    record_property("events", events)

    # 5. Everything running, nothing stopped by the whole episode but g1.
    assert qmp.cmd("query-status") == {"return": RUNNING}
    assert group_status(qmp) == {"g1": "running", "g2": "running"}
    assert io_status(qmp) == {"disk1": "ok", "disk2": "ok"}
    assert not [e for e in events if e["event"] in ("STOP", "RESUME")], events
    assert [e for e in events if e["event"].startswith("__org.thinblk_GROUP")] == [
        {"event": "__org.thinblk_GROUP_STOP", "data": {"group": "g1", "status": "io-error"}},
        {"event": "__org.thinblk_GROUP_RESUME", "data": {"group": "g2"}},
        {"event": "__org.thinblk_GROUP_RESUME", "data": {"group": "g1"}}], events
    # BLOCK_IO_ERROR is coalesced to one a second per device (device.h): a late one for disk1
    # may follow the resume; none for disk2 ever.
    assert all(e["data"] == IO_ERROR_G1 for e in events if e["event"] == "BLOCK_IO_ERROR"), events
