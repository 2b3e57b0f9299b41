"""The event journal (docs/qmp.md, "Event journal"): every event numbered with
__org.thinblk_seq, the last N kept for __org.thinblk_query-event-journal, and a coalesced
BLOCK_IO_ERROR counting the events it replaced with __org.thinblk_suppressed.

Real daemons, real peers: ENOSPC from a small tmpfs, failing writes from python3-libnbd through
a fault node.
"""
import errno
import os
import re
import subprocess
import threading
import time

import nbd
import pytest

from conftest import THINBLKD, TIMEOUT, error, ok
from test_enospc import MiB
from test_error_policy import Disk

SEQ = "__org.thinblk_seq"
SUPPRESSED = "__org.thinblk_suppressed"
QUERY = "__org.thinblk_query-event-journal"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def journal(client, **args):
    r = client.cmd(QUERY, args)
    assert "return" in r, r
    return r["return"]


def events(client, n):
    """The first n events client has (set aside by cmd(), or read now), in order."""
    got = client.take_events()
    while len(got) < n:
        got.append(client.read_event())
    assert len(got) == n, got
    return got


def stop_cont(client, rounds):
    for _ in range(rounds):
        ok(client.cmd("stop"))
        ok(client.cmd("cont"))


def assert_consecutive(evs, first=None):
    seqs = [e[SEQ] for e in evs]
    assert all(type(s) is int for s in seqs), evs
    start = seqs[0] if first is None else first
    assert seqs == list(range(start, start + len(seqs))), seqs


# ---- numbering --------------------------------------------------------------------------------

def test_seq_consecutive_and_the_same_on_two_monitors(daemons):
    d = daemons.start(monitors=2)
    a, b = d.negotiated(0), d.negotiated(1)
    stop_cont(a, 3)
    on_a, on_b = events(a, 6), events(b, 6)
    assert [e["event"] for e in on_a] == ["STOP", "RESUME"] * 3
    assert_consecutive(on_a, first=1)
    # The same events, number and timestamp included, on both monitors.
    assert on_a == on_b
    j = journal(b)
    assert j["last-seq"] == 6 and j["dropped"] == 0 and j["suppressed"] == 0
    assert j["events"] == on_a


def test_instance_is_a_uuid_of_this_daemon(daemons):
    one, two = daemons.start().negotiated(), daemons.start().negotiated()
    i1, i2 = journal(one)["instance"], journal(two)["instance"]
    assert UUID.match(i1) and UUID.match(i2)
    assert i1 != i2
    assert journal(one)["instance"] == i1


def test_events_journalled_with_no_client(daemons):
    d = daemons.start()
    c = d.negotiated()
    ok(c.cmd("stop"))
    assert c.wait_event("STOP")[SEQ] == 1
    # The client hangs up right after asking for cont: its RESUME goes to nobody (the daemon
    # reads the request before the end of the stream, and runs it).
    c.execute("cont")
    c.close()
    late = d.negotiated()
    j = journal(late)
    assert j["last-seq"] == 2
    assert [(e["event"], e[SEQ]) for e in j["events"]] == [("STOP", 1), ("RESUME", 2)]


# ---- a client that reconnects -----------------------------------------------------------------

@pytest.fixture
def full_tmpfs(tmp_path):
    """A 16 MiB tmpfs holding a sparse 64 MiB image and a ballast file that fills it."""
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    mnt = tmp_path / "store"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "thinblk-test", str(mnt)],
                   check=True)
    try:
        with open(mnt / "disk.raw", "wb") as f:
            f.truncate(64 * MiB)
        ballast = mnt / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_reconnect_gets_exactly_the_missed_events(daemons, tmp_path, full_tmpfs):
    nbd_sock = tmp_path / "nbd.sock"
    d = daemons.start(monitors=2, args=[
        "--blockdev", f"driver=file,node-name=proto0,filename={full_tmpfs / 'disk.raw'}",
        "--blockdev", "driver=raw,node-name=fmt0,file=proto0",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=disk0,node-name=fmt0,name=disk,writable=on"])
    watcher, leaver = d.negotiated(1), d.negotiated(0)
    stop_cont(watcher, 1)
    seen = events(leaver, 2)
    assert events(watcher, 2) == seen
    cursor = {"after": seen[-1][SEQ], "instance": journal(leaver)["instance"]}
    leaver.close()

    # While it is away: a write fails with ENOSPC (BLOCK_IO_ERROR, STOP), space is freed,
    # cont retries it (RESUME).
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk?socket={nbd_sock}")
    result = []
    t = threading.Thread(target=lambda: result.append(h.pwrite(b"\x5a" * MiB, 0)))
    t.start()
    seen_by_watcher = [watcher.read_event(), watcher.read_event()]
    assert t.is_alive(), "the write completed on a full file system"
    (full_tmpfs / "ballast").unlink()
    ok(watcher.cmd("cont"))
    seen_by_watcher += events(watcher, 1)  # RESUME, before cont's response
    t.join(TIMEOUT)
    assert not t.is_alive() and result == [None]
    assert [e["event"] for e in seen_by_watcher] == ["BLOCK_IO_ERROR", "STOP", "RESUME"]
    assert seen_by_watcher[0]["data"]["nospace"] is True

    back = d.negotiated(0)
    missed = journal(back, **cursor)
    assert missed["events"] == seen_by_watcher
    assert missed["dropped"] == 0 and missed["suppressed"] == 0
    assert missed["last-seq"] == seen_by_watcher[-1][SEQ]
    assert_consecutive([seen[-1]] + missed["events"])
    # Nothing new since: an empty answer, not an error.
    assert journal(back, after=missed["last-seq"])["events"] == []
    h.shutdown()


# ---- a small journal --------------------------------------------------------------------------

def test_small_journal_drops_the_oldest(daemons):
    d = daemons.start(monitors=2, args=["--event-journal", "size=4"])
    a, b = d.negotiated(0), d.negotiated(1)
    ok(a.cmd("stop"))
    first = events(b, 1)
    cursor = first[-1][SEQ]
    ok(a.cmd("cont"))
    stop_cont(a, 4)
    on_b = events(b, 9)[1:]
    assert len(on_b) == 8
    j = journal(a, after=cursor)
    # 9 events after the cursor's 1; the last 4 kept, so 4 of them are lost for good.
    assert j["last-seq"] == 10
    assert j["dropped"] == 5
    assert j["events"] == on_b[-4:]
    assert [e[SEQ] for e in j["events"]] == [7, 8, 9, 10]
    j = journal(a, after=8)
    assert j["dropped"] == 0 and [e[SEQ] for e in j["events"]] == [9, 10]
    j = journal(a)
    assert j["dropped"] == 6 and len(j["events"]) == 4


def test_journal_of_size_0_keeps_none_but_numbers(daemons):
    d = daemons.start(args=["--event-journal", "size=0"])
    c = d.negotiated()
    stop_cont(c, 1)
    assert [e[SEQ] for e in events(c, 2)] == [1, 2]
    j = journal(c, after=1)
    assert (j["last-seq"], j["dropped"], j["events"]) == (2, 1, [])


@pytest.mark.parametrize("value, message", [
    ("size=1048577", "--event-journal: Parameter 'size' must be at most 1048576 events"),
    ("size=-1", "--event-journal: Parameter 'size' expects a number of events"),
    ("size=4k", "--event-journal: Parameter 'size' expects a number of events"),
    ("count=4", "--event-journal: Invalid parameter 'count'"),
    ("", "--event-journal: Parameter 'size' is missing"),
])
def test_event_journal_option_refused(value, message):
    r = subprocess.run([str(THINBLKD), "--event-journal", value], capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 1
    assert r.stderr.startswith(f"thinblkd: {message}\n"), r.stderr


def test_event_journal_in_help():
    out = subprocess.run([str(THINBLKD), "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--event-journal size=N" in out


# ---- the query's arguments --------------------------------------------------------------------

def test_another_instance_reads_from_the_start(daemons):
    c = daemons.start().negotiated()
    stop_cont(c, 2)
    all_events = events(c, 4)
    j = journal(c, after=3, instance="00000000-0000-4000-8000-000000000000")
    assert j["events"] == all_events and j["dropped"] == 0
    # And a cursor ahead of this daemon's journal is no error when it is another daemon's.
    j = journal(c, after=99, instance="another daemon")
    assert j["events"] == all_events
    # With this daemon's instance, after counts.
    j = journal(c, after=3, instance=j["instance"])
    assert j["events"] == all_events[3:]


def test_after_ahead_of_the_journal(daemons):
    c = daemons.start().negotiated()
    assert c.cmd(QUERY, {"after": 1}) == error(
        "Parameter 'after' is ahead of the journal: the last event is 0")
    stop_cont(c, 1)
    instance = journal(c)["instance"]
    assert c.cmd(QUERY, {"after": 3, "instance": instance}) == error(
        "Parameter 'after' is ahead of the journal: the last event is 2")
    assert journal(c, after=2)["events"] == []


@pytest.mark.parametrize("args, desc", [
    ({"after": "1"}, "Invalid parameter type for 'after', expected: integer"),
    ({"after": 1.5}, "Invalid parameter type for 'after', expected: integer"),
    ({"after": None}, "Invalid parameter type for 'after', expected: integer"),
    ({"after": -1}, "Parameter 'after' expects uint64"),
    ({"instance": 5}, "Invalid parameter type for 'instance', expected: string"),
    ({"before": 5}, "Parameter 'before' is unexpected"),
])
def test_bad_arguments(qmp, args, desc):
    assert qmp.cmd(QUERY, args) == error(desc)


# ---- a storm of errors ------------------------------------------------------------------------

# At full speed the 1000 fit in a second or so; paced, they span several periods of one second,
# so events go out at once, are held, and are replaced across period ends. The pause only
# spreads the load; events are waited for by reading them.
@pytest.mark.parametrize("pause", [0, 0.003], ids=["burst", "paced"])
def test_storm_of_errors_counted_exactly(daemons, tmp_path, pause):
    disk = Disk(daemons, tmp_path, werror="report")
    disk.fail("write", "EIO", once=False)
    cursor = journal(disk.qmp)["last-seq"]
    h = disk.nbd()
    writes = 1000
    start = time.monotonic()
    for i in range(writes):
        with pytest.raises(nbd.Error):
            h.pwrite(b"\x05" * 512, (i % 64) * 512)
        if pause:
            time.sleep(pause)
    # Every failure is an event or is counted by one; the last of the last second comes at
    # that second's end: read events until all are accounted for.
    got, counted = [], 0
    while counted < writes:
        ev = disk.qmp.read_event(timeout=5)
        assert ev["event"] == "BLOCK_IO_ERROR", ev
        assert ev.get(SUPPRESSED, 1) >= 1, ev
        got.append(ev)
        counted += 1 + ev.get(SUPPRESSED, 0)
    elapsed = time.monotonic() - start
    assert counted == writes
    # The first at once, then at most one a second.
    assert SUPPRESSED not in got[0]
    assert len(got) <= elapsed + 2, (len(got), elapsed)
    assert len(got) >= 2  # 999 more failures cannot all fit the first event
    assert_consecutive(got, first=cursor + 1)
    j = journal(disk.qmp, after=cursor)
    assert j["events"] == got
    assert j["dropped"] == 0
    assert len(got) + j["suppressed"] == writes
    # Nothing more comes: a quiet second ends with nothing held.
    with pytest.raises(TimeoutError):
        disk.qmp.read_event(timeout=1.5)
    h.shutdown()


def test_held_error_event_sent_when_its_export_goes(daemons, tmp_path):
    """A BLOCK_IO_ERROR held for the end of its second is not lost with its device: it goes
    out, with its count, before BLOCK_EXPORT_DELETED."""
    disk = Disk(daemons, tmp_path, werror="report")
    disk.fail("write", "EIO", once=False)
    h = disk.nbd()
    for i in range(5):
        with pytest.raises(nbd.Error):
            h.pwrite(b"\x05" * 512, i * 512)
    h.shutdown()
    first = disk.qmp.read_event()
    assert first["event"] == "BLOCK_IO_ERROR" and SUPPRESSED not in first
    ok(disk.qmp.cmd("block-export-del", {"id": "disk0"}))
    held, deleted = events(disk.qmp, 2)
    assert held["event"] == "BLOCK_IO_ERROR" and held[SUPPRESSED] == 3, held
    assert deleted["event"] == "BLOCK_EXPORT_DELETED"
    assert_consecutive([first, held, deleted])
