"""Stop on ENOSPC with a real guest: the flow of shared/reference/enospc-flow-qemu-7.2.txt, with
thinblkd instead of QEMU's block layer.

thinblkd serves a 64 MiB raw image that sits on a 16 MiB tmpfs as an NBD export; a Linux guest
(tests/guest, QEMU TCG) writes 48 MiB to it with dd oflag=direct conv=fsync. QEMU's own
stop-on-ENOSPC is off (werror=report, rerror=report), so an error from thinblkd would reach the
guest. thinblkd must instead fire the write threshold, park the write that hit ENOSPC, send
BLOCK_IO_ERROR and STOP, and on `cont` (after the test grew the tmpfs) retry it: the guest never
sees an error and its data is in the image.

Needs root (mounts a tmpfs), qemu-system-x86_64 and the guest kit's cache
($THINBLK_GUEST_CACHE, default ~/.cache/thinblk-guest; built on first use).
"""

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from conftest import AGAINST_QEMU, QMPClient, without_timestamp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402

pytestmark = [
    pytest.mark.skipif(kit.qemu_path() is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root"),
    pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd serving a guest over NBD"),
]

MIB = kit.MIB
IMAGE_SIZE = 64 * MIB
WRITE_MB = 48
THRESHOLD = 8 * MIB
# TCG on a busy 2-CPU machine: generous. Every wait ends as soon as its condition holds.
GUEST_TIMEOUT = 300

EXPECTED_IO_ERROR = {"device": "disk0", "node-name": "fmt0", "operation": "write",
                     "action": "stop", "nospace": True, "reason": "No space left on device"}
IO_ERROR_STATUS = {"status": "io-error", "singlestep": False, "running": False}
RUNNING = {"status": "running", "singlestep": False, "running": True}


@pytest.fixture(scope="module")
def image():
    return kit.build_guest()


@pytest.fixture
def store():
    """A 16 MiB tmpfs, unmounted after the test."""
    with kit.small_tmpfs("16M", "thinblk-guest") as mnt:
        yield mnt


def grow(mnt, size):
    kit.grow_tmpfs(mnt, size)


def wait_for_unix_socket(path, daemon):
    def ready():
        if not daemon.running():
            pytest.fail(f"thinblkd exited with {daemon.proc.returncode} before creating {path}:"
                        f"\n{daemon.stderr()}")
        try:
            return stat.S_ISSOCK(os.stat(path).st_mode)
        except FileNotFoundError:
            return False
    kit.wait_until(ready, 30, f"socket {path}")


def nbd_export_size(sock):
    """Size of export 'disk' through a real NBD handshake (python3-libnbd), or None without
    libnbd. Also proves the server accepts clients before QEMU connects."""
    try:
        import nbd
    except ImportError:
        return None
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk?socket={sock}")
    try:
        return h.get_size()
    finally:
        h.shutdown()


class Watch:
    """Reads QMP events while the guest runs; fails early with both sides' output if QEMU or
    thinblkd exits instead. Every event read is kept in self.log, in order."""

    def __init__(self, qmp, guest, daemon):
        self.qmp, self.guest, self.daemon = qmp, guest, daemon
        self.log = []

    def _fail(self, why):
        pytest.fail(f"{why}\nevents so far: {self.log}\n--- thinblkd stderr ---\n"
                    f"{self.daemon.stderr()[-3000:]}\n--- qemu stderr ---\n{self.guest.stderr()}"
                    f"\n--- guest console (tail) ---\n"
                    + "\n".join(self.guest.console.splitlines()[-30:]), pytrace=False)

    def take(self):
        """Events cmd() put aside while it waited for a reply."""
        events = self.qmp.take_events()
        self.log += events
        return events

    def next_event(self, timeout=GUEST_TIMEOUT, guest_may_exit=False):
        if self.qmp.events:
            ev = self.qmp.events.pop(0)
            self.log.append(ev)
            return ev
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Short reads, so that a dead QEMU or thinblkd ends the wait at once.
                msg = self.qmp.read_message(timeout=1)
            except TimeoutError:
                if not self.daemon.running():
                    self._fail(f"thinblkd exited with {self.daemon.proc.returncode}")
                if not guest_may_exit and not self.guest.running():
                    self._fail("the guest finished while an event was awaited")
                if time.monotonic() >= deadline:
                    self._fail(f"no event within {timeout}s")
                continue
            assert "event" in msg, f"expected an event, got {msg!r}"
            self.log.append(msg)
            return msg


def test_guest_write_survives_enospc(image, store, daemons, tmp_path, record_property):
    img = store / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    rundir = daemons.rundir()
    qmp_sock, nbd_sock = rundir / "qmp.sock", rundir / "nbd.sock"
    d = daemons.start_raw([
        "--qmp", qmp_sock,
        "--blockdev", f"driver=file,node-name=proto0,filename={img}",
        "--blockdev", "driver=raw,node-name=fmt0,file=proto0",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=disk0,node-name=fmt0,name=disk,writable=on",
    ], sockets=[qmp_sock], rundir=rundir)
    wait_for_unix_socket(nbd_sock, d)
    size = nbd_export_size(nbd_sock)
    assert size in (None, IMAGE_SIZE)

    qmp = QMPClient(qmp_sock, timeout=60).negotiate()
    d.clients.append(qmp)
    assert qmp.cmd("block-set-write-threshold",
                   {"node-name": "proto0", "write-threshold": THRESHOLD}) == {"return": {}}
    assert qmp.cmd("query-status") == {"return": RUNNING}

    started = time.monotonic()
    with kit.Guest(image, kit.NbdDisk(str(nbd_sock), "disk"), job="write", mb=WRITE_MB,
                   workdir=tmp_path / "guest") as g:
        w = Watch(qmp, g, d)
        assert w.take() == []

        # 1. The threshold fires first (before the storage runs out at 16 MiB).
        ev = w.next_event()
        assert without_timestamp(ev)["event"] == "BLOCK_WRITE_THRESHOLD", w.log
        data = ev["data"]
        assert (data["node-name"], data["write-threshold"]) == ("proto0", THRESHOLD), ev
        assert set(data) == {"node-name", "write-threshold", "amount-exceeded"}, ev
        assert type(data["amount-exceeded"]) is int and data["amount-exceeded"] > 0, ev

        # 2. One BLOCK_IO_ERROR per failed request (QEMU sent two), then one STOP.
        io_errors = 0
        while True:
            ev = without_timestamp(w.next_event())
            if ev["event"] == "STOP":
                assert ev == {"event": "STOP"}
                break
            assert ev == {"event": "BLOCK_IO_ERROR", "data": EXPECTED_IO_ERROR}, w.log
            io_errors += 1
        assert io_errors >= 1, w.log
        stopped_at = time.monotonic()

        # 3. Management's view after the fact.
        assert qmp.cmd("query-status") == {"return": IO_ERROR_STATUS}
        block = qmp.cmd("query-block")["return"]
        disk0 = [b for b in block if b.get("device") == "disk0"]
        assert len(disk0) == 1, block
        assert disk0[0]["io-status"] == "nospace", block
        # Late BLOCK_IO_ERRORs of requests that were in flight are fine; nothing else is.
        for ev in w.take():
            assert without_timestamp(ev) == {"event": "BLOCK_IO_ERROR",
                                             "data": EXPECTED_IO_ERROR}, w.log
        # The guest is held, not failed: its write has not finished.
        assert g.running() and not g.markers("RESULT"), g.console

        # 4. Grow the storage and resume.
        grow(store, "80M")
        assert qmp.cmd("cont") == {"return": {}}
        while True:
            ev = without_timestamp(w.next_event())
            if ev["event"] == "RESUME":
                assert ev == {"event": "RESUME"}
                break
            assert ev == {"event": "BLOCK_IO_ERROR", "data": EXPECTED_IO_ERROR}, w.log

        console, rc = g.wait(GUEST_TIMEOUT)
    elapsed = time.monotonic() - started
    events = [without_timestamp(e) for e in w.log + qmp.take_events()]
    print(f"guest ran {elapsed:.1f} s (stopped {stopped_at - started:.1f} s in); "
          f"events: {events}")
    record_property("guest_seconds", round(elapsed, 2))
    record_property("events", events)

    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console}"
    # 5. The guest saw no error and wrote what it meant to.
    assert "I/O error" not in console, g.dmesg
    assert not g.io_error, g.dmesg
    r = g.result()
    assert (r["job"], r["mb"], r["dd-status"], r["read-status"]) == ("write", WRITE_MB, 0, 0), r
    assert r["write-sha256"] == r["readback-sha256"], r
    assert kit.file_sha256(img, 0, WRITE_MB * MIB) == r["write-sha256"]
    assert g.status == 0

    # 6. Running again, with nothing more to report.
    assert qmp.cmd("query-status") == {"return": RUNNING}
    block = qmp.cmd("query-block")["return"]
    assert [b["io-status"] for b in block if b.get("device") == "disk0"] == ["ok"], block
    # No new stop. BLOCK_IO_ERRORs of one device are coalesced per second (device.h): the one
    # for failures before the stop may still go out at the end of its second, after RESUME.
    late = [without_timestamp(e) for e in qmp.take_events()]
    assert not [e for e in late if e["event"] == "STOP"], late
    assert [e for e in late if e["event"] == "BLOCK_IO_ERROR"] in (
        [], [{"event": "BLOCK_IO_ERROR", "data": EXPECTED_IO_ERROR}]), late
