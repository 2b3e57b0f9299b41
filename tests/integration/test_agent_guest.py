"""Thin provisioning end to end, with a real guest: a QEMU TCG guest (tests/guest) writes far more
than the initial allocation to a qcow2 image that thinblkd serves over NBD from a loop device.

The storage: a sparse backing file of INITIAL bytes, attached as a loop device; a 4 GiB qcow2
image made on the loop device with qemu-img. The qcow2 driver allocates clusters past the
device's end as the guest writes; the kernel fails those writes with ENOSPC and thinblkd stops
(BLOCK_IO_ERROR nospace, STOP). Extending is what management does: grow the backing file
(truncate) and tell the loop driver (losetup -c), then `cont`.

The guest's stream job writes MB MiB of random data one segment at a time, reads it back and
prints the digests; the test compares them with what the export holds, read through thinblkd
over NBD (libnbd). QEMU's own stop-on-error is off (werror=report): an error that got through
thinblkd would reach the guest, and the tests check that none did.

- test_guest_test_extends: no agent; the test itself extends on every STOP (the qcow2-on-a-loop-
  device flow of issue 4 under a real guest).
- with thinblk-agent: see the tests below; each says what it shows.

Needs root (loop devices), qemu-system-x86_64, qemu-img, python3-libnbd and the guest kit's
cache ($THINBLK_GUEST_CACHE, default ~/.cache/thinblk-guest; built on first use).
"""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AGAINST_QEMU, QMPClient, without_timestamp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402
import thin  # noqa: E402

try:
    import nbd  # noqa: F401
    HAVE_LIBNBD = True
except ImportError:
    HAVE_LIBNBD = False

pytestmark = [
    pytest.mark.skipif(kit.qemu_path() is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="makes loop devices: needs root"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
    pytest.mark.skipif(not HAVE_LIBNBD, reason="python3-libnbd is not installed"),
    pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd serving a guest over NBD"),
]

MIB = kit.MIB
VIRTUAL_SIZE = 4 << 30
INITIAL = 32 * MIB          # the backing file's size at the start
WRITE_MB = 192              # six times the initial allocation
SEG_MB = 16
CHUNK = 32 * MIB            # what one extension adds
# TCG on a busy 2-CPU machine: generous. Every wait ends as soon as its condition holds.
GUEST_TIMEOUT = 600

RUNNING = {"status": "running", "singlestep": False, "running": True}


@pytest.fixture(scope="module")
def image():
    return kit.build_guest()


@pytest.fixture
def store(tmp_path):
    s = thin.LoopStore(tmp_path / "backing.img", INITIAL, VIRTUAL_SIZE)
    try:
        yield s
    finally:
        s.close()


class Disk:
    """thinblkd serving STORE's qcow2 image as the NBD export "disk0" (device "disk0"), with a
    QMP monitor; restartable on the same sockets."""

    def __init__(self, daemons, store):
        self.daemons, self.store = daemons, store
        self.rundir = daemons.rundir()
        self.qmp_sock = self.rundir / "qmp.sock"
        self.nbd_sock = self.rundir / "nbd.sock"
        self.uri = f"nbd+unix:///disk0?socket={self.nbd_sock}"
        self.daemon = None

    def start(self):
        argv = thin.thinblkd_argv("thinblkd", self.store.dev, self.qmp_sock, self.nbd_sock)
        d = self.daemons.start_raw(argv[1:], sockets=[self.qmp_sock], rundir=self.rundir)
        kit.wait_until(lambda: self._nbd_ready(d), 30, f"socket {self.nbd_sock}")
        self.daemon = d
        return d

    def _nbd_ready(self, d):
        if not d.running():
            pytest.fail(f"thinblkd exited with {d.proc.returncode}:\n{d.stderr()}")
        try:
            return stat.S_ISSOCK(os.stat(self.nbd_sock).st_mode)
        except FileNotFoundError:
            return False

    def qmp(self):
        c = QMPClient(self.qmp_sock, timeout=60).negotiate()
        self.daemon.clients.append(c)
        return c

    def stop_daemon(self):
        """SIGTERM, as a service manager would; thinblkd must exit 0."""
        d = self.daemon
        for c in d.clients:
            c.close()
        d.clients = []
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.stderr()[-3000:]


@pytest.fixture
def disk(daemons, store):
    return Disk(daemons, store)


def nbd_disk(disk):
    # reconnect-delay: QEMU's NBD client waits for a restarted server instead of failing.
    return kit.NbdDisk(str(disk.nbd_sock), "disk0", reconnect_delay=60)


def check_guest(g, disk, rc, mb=WRITE_MB):
    """The guest finished, saw no error, and the export holds what it wrote."""
    console = g.console
    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console[-3000:]}"
    assert "I/O error" not in console, g.dmesg
    assert not g.io_error, g.dmesg
    r = g.result()
    assert (r["job"], r["mb"], r["seg"], r["dd-status"], r["read-status"]) == \
        ("stream", mb, SEG_MB, 0, 0), r
    assert r["write-sha256"] == r["readback-sha256"], r
    written = [s["write-sha256"] for s in g.segments("SEG")]
    assert len(written) == mb // SEG_MB and kit.digest_list(written) == r["write-sha256"]
    assert kit.nbd_stream_digest(disk.uri, mb, SEG_MB) == r["write-sha256"]
    assert g.status == 0
    return r


def event_names(events):
    return [e["event"] for e in events]


def test_guest_test_extends(image, store, disk, tmp_path, record_property):
    """No agent: the test is management. Every STOP is for ENOSPC on disk0; the test grows the
    loop device by CHUNK and sends cont; the guest never notices."""
    disk.start()
    qmp = disk.qmp()
    assert qmp.cmd("query-status") == {"return": RUNNING}
    stops = 0
    with kit.Guest(image, nbd_disk(disk), job="stream", mb=WRITE_MB, seg=SEG_MB,
                   workdir=tmp_path / "guest") as g:
        while g.running():
            try:
                ev = qmp.read_event(timeout=1)
            except TimeoutError:
                assert disk.daemon.running(), disk.daemon.stderr()[-3000:]
                continue
            ev = without_timestamp(ev)
            if ev["event"] == "BLOCK_IO_ERROR":
                assert ev["data"] == {"device": "disk0", "node-name": "disk0",
                                      "operation": "write", "action": "stop", "nospace": True,
                                      "reason": "No space left on device"}, ev
            elif ev["event"] == "STOP":
                stops += 1
                reason = qmp.cmd("__org.thinblk_query-stop-reason")["return"]
                assert reason["status"] == "io-error" and reason["io-error"]["nospace"], reason
                store.grow(CHUNK)
                assert qmp.cmd("cont") == {"return": {}}
            elif ev["event"] != "RESUME":
                pytest.fail(f"unexpected event {ev}")
        console, rc = g.wait(GUEST_TIMEOUT)
    print(f"guest ran {g.elapsed:.1f} s; {stops} stops; backing file {store.size() >> 20} MiB")
    record_property("stops", stops)
    check_guest(g, disk, rc)
    # Far more than the initial allocation was written, so it had to stop and be extended.
    assert stops >= (WRITE_MB * MIB - INITIAL) // CHUNK // 2, stops
    assert store.size() > WRITE_MB * MIB
    assert qmp.cmd("query-status") == {"return": RUNNING}
