"""Inflight I/O tracking (INFLIGHT_SHMFD) and reconnection of the vhost-user-blk export (issue
12): requests taken from a ring and not answered survive a GET_VRING_BASE while the daemon is
stopped, a frontend reconnecting, and `kill -9 thinblkd`; each is written exactly once more.

The region's layout (vhost-user.rst, "Inflight I/O tracking", split virtqueues): per queue a
16-byte header (features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16)
and desc_num 16-byte states (inflight u8, padding, next u16, counter u64), padded to 64 bytes.
"""

import fcntl
import mmap
import os
import socket
import struct
import sys
import time
from pathlib import Path

import pytest

from conftest import AGAINST_QEMU, image, ok, without_timestamp
from test_vhost_user_blk import (DATA, GET_QUEUE_NUM, GET_VRING_BASE, GUEST_TIMEOUT, RING,
                                 FakeGuest, Frontend, check_guest_wrote, needs_qemu,
                                 start_fault_export)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402

pytestmark = pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd's vhost-user-blk export")

MIB = kit.MIB
SET_PROTOCOL_FEATURES, GET_INFLIGHT_FD, SET_INFLIGHT_FD = 16, 31, 32
REPLY_ACK, INFLIGHT_SHMFD = 3, 12
F_GET_SEALS, F_SEAL_SHRINK = 1034, 0x0002
ENOSPC_ONCE = {"op": "write", "errno": "ENOSPC", "once": True}
REGION = 192                      # one queue of RING (8) entries: 16 + 8 * 16, padded to 64


def get_inflight(f, num_queues=1, queue_size=RING):
    """GET_INFLIGHT_FD: (mmap_size, mmap_offset, fd or None)."""
    f.send(GET_INFLIGHT_FD, struct.pack("<QQHHxxxx", 0, 0, num_queues, queue_size))
    msg, anc, _, _ = f.s.recvmsg(12 + 24, socket.CMSG_SPACE(4))
    req, flags, size = struct.unpack("<III", msg[:12])
    assert (req, flags, size) == (GET_INFLIGHT_FD, 0x5, 24), (req, flags, size)
    mmap_size, mmap_offset = struct.unpack("<QQ", msg[12:28])
    fds = [struct.unpack("<i", data[:4])[0] for level, kind, data in anc
           if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)]
    return mmap_size, mmap_offset, fds[0] if fds else None


def set_inflight(f, fd, mmap_size, num_queues=1, queue_size=RING, need_reply=False):
    f.s.sendmsg([struct.pack("<III", SET_INFLIGHT_FD, 1 | (8 if need_reply else 0), 24) +
                 struct.pack("<QQHHxxxx", mmap_size, 0, num_queues, queue_size)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<i", fd))])


def queue_state(region):
    """(version, desc_num, last_batch_head, used_idx, {head: counter} of heads in flight)."""
    _, version, desc_num, last, used = struct.unpack_from("<QHHHH", region, 0)
    marked = {}
    for i in range(desc_num):
        flag, counter = struct.unpack_from("<B5xxxQ", region, 16 + 16 * i)
        if flag:
            marked[i] = counter
    return version, desc_num, last, used, marked


def new_region(vsock):
    """A region from GET_INFLIGHT_FD, as QEMU gets it on its first connection: (fd, size,
    its mapping), once the export takes a frontend again."""
    f = Frontend(vsock)
    size, _, fd = get_inflight(f)
    f.close()
    kit.wait_until(lambda: Frontend(vsock).call(GET_QUEUE_NUM), 10, "the export free again")
    return fd, size, mmap.mmap(fd, size)


def tracked_export(daemons, tmp_path, rules):
    """A 1 MiB raw image behind a fault filter with `rules`, exported on a vhost-user socket,
    and a region got from it: (img, vsock, daemon, fd, size, region)."""
    img = image(tmp_path / "d.raw", MIB)
    vsock = daemons.rundir() / "vub.sock"
    d = start_fault_export(daemons, img, vsock, rules=rules)
    return (img, vsock, d, *new_region(vsock))


def write_request(g, head, sector, byte):
    """A one-sector VIRTIO_BLK_T_OUT of `byte`s at descriptors head..head+2 (status 0xff)."""
    base = DATA + 0x400 * head
    struct.pack_into("<IIQ", g.mem, base, 1, 0, sector)
    g.mem[base + 0x200:base + 0x400] = bytes([byte]) * 512
    g.mem[base + 0x10] = 0xff
    g.desc(head, base, 16, 1, head + 1)
    g.desc(head + 1, base + 0x200, 512, 1, head + 2)
    g.desc(head + 2, base + 0x10, 1, 2)
    g.submit(head)
    return base + 0x10


def stop_event(qmp, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        try:
            ev = without_timestamp(qmp.read_message(timeout=1))
        except TimeoutError:
            assert time.monotonic() < deadline, "no STOP in time"
            continue
        if ev.get("event") == "STOP":
            return


def test_inflight_region_is_ours_and_sealed(daemons, tmp_path):
    vsock = daemons.rundir() / "vub.sock"
    start_fault_export(daemons, image(tmp_path / "d.raw", MIB), vsock)
    f = Frontend(vsock)
    proto, = struct.unpack("<Q", f.call(15))
    assert proto & (1 << INFLIGHT_SHMFD), hex(proto)
    size, offset, fd = get_inflight(f, num_queues=1, queue_size=RING)
    assert (size, offset) == (REGION, 0) and fd is not None
    assert fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_SHRINK     # it can never SIGBUS us
    region = mmap.mmap(fd, size)
    assert queue_state(region) == (1, RING, 0, 0, {})
    # More queues than the export has: no region (mmap_size 0, no fd), the connection goes on.
    assert get_inflight(f, num_queues=2)[::2] == (0, None)

    # A region the frontend made itself (not sealed: it could shrink it under us) is refused.
    f.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << REPLY_ACK))
    mine = os.memfd_create("not-sealed")
    os.ftruncate(mine, REGION)
    set_inflight(f, mine, REGION, need_reply=True)
    assert struct.unpack("<IIIQ", f.recv_exact(20)) == (SET_INFLIGHT_FD, 0x5, 8, 1)
    # Ours, of the wrong size for its queues: refused too; of the right one: taken.
    set_inflight(f, fd, REGION + 64, need_reply=True)
    assert struct.unpack("<IIIQ", f.recv_exact(20)) == (SET_INFLIGHT_FD, 0x5, 8, 1)
    set_inflight(f, fd, REGION, need_reply=True)
    assert struct.unpack("<IIIQ", f.recv_exact(20)) == (SET_INFLIGHT_FD, 0x5, 8, 0)
    assert f.call(GET_QUEUE_NUM) == struct.pack("<Q", 1)
    os.close(mine)
    os.close(fd)
    f.close()


def inflight_guest(vsock, fd, size, memory=None, base=0):
    return FakeGuest(vsock, event_idx=True, memory=memory, base=base,
                     before_start=lambda f: set_inflight(f, fd, size))


def test_stopped_ring_gives_back_its_requests(daemons, tmp_path):
    """GET_VRING_BASE while the daemon is stopped on ENOSPC answers at once; the parked write
    stays marked in the region, is handled again when the ring restarts, and is written
    once, after cont."""
    img, vsock, d, fd, size, region = tracked_export(daemons, tmp_path, [ENOSPC_ONCE])
    qmp = d.negotiated()

    g = inflight_guest(vsock, fd, size)
    status = write_request(g, 0, 3, 0xa5)
    stop_event(qmp)
    assert qmp.cmd("query-status")["return"]["status"] == "io-error"
    assert queue_state(region)[4] == {0: 0}            # head 0 taken, first counter
    assert g.f.call(GET_VRING_BASE, struct.pack("<II", 0, 0)) == struct.pack("<II", 0, 1)
    assert g.used_idx() == 0 and g.mem[status] == 0xff  # not answered...
    assert queue_state(region)[4] == {0: 0}            # ...and still in flight

    # The frontend starts the ring again where we said: the head comes back from the region.
    g.f.close()
    kit.wait_until(lambda: Frontend(vsock).call(GET_QUEUE_NUM), 10, "the export free again")
    g2 = inflight_guest(vsock, fd, size, memory=g, base=1)
    assert g2.f.call(GET_QUEUE_NUM) == struct.pack("<Q", 1)   # every message handled
    assert g2.used_idx() == 0                          # held: still stopped
    ok(qmp.cmd("cont"))
    kit.wait_until(lambda: g2.used_idx() == 1, 10, "the write's completion")
    assert g2.mem[status] == 0
    assert queue_state(region)[2:] == (0, 1, {})       # last batch head 0, used 1, none left
    with open(img, "rb") as fimg:
        fimg.seek(3 * 512)
        assert fimg.read(512) == b"\xa5" * 512
    stats = [s for s in qmp.cmd("query-blockstats")["return"] if s.get("device") == "disk0"]
    assert stats[0]["stats"]["wr_operations"] == 1, stats   # once, not twice
    region.close()
    os.close(fd)


def test_request_at_storage_when_the_ring_stops_is_not_parked(daemons, tmp_path):
    """A stop is pending (one write failed) while another write is still at storage; the ring
    stops: the parked write is taken back at once, the one at storage when it fails (it is not
    parked behind the ring's back). Both come back at the restart and are written once."""
    img, vsock, d, fd, size, region = tracked_export(daemons, tmp_path, [
        {"op": "write", "offset": 512, "length": 512, "errno": "ENOSPC", "delay-ms": 1500,
         "once": True},
        {"op": "write", "offset": 0, "length": 512, "errno": "ENOSPC", "once": True}])
    qmp = d.negotiated()
    g = inflight_guest(vsock, fd, size)
    write_request(g, 0, 1, 0x33)        # held 1.5 s at storage, then fails
    kit.wait_until(lambda: g.avail_event() == 1, 10, "thinblkd taking the first write")
    write_request(g, 3, 0, 0x44)        # fails at once: the stop waits for the first
    kit.wait_until(lambda: g.avail_event() == 2, 10, "thinblkd taking the second write")
    assert g.f.call(GET_VRING_BASE, struct.pack("<II", 0, 0)) == struct.pack("<II", 0, 2)
    stop_event(qmp)
    assert queue_state(region)[4] == {0: 0, 3: 1}
    g.f.close()

    kit.wait_until(lambda: Frontend(vsock).call(GET_QUEUE_NUM), 10, "the export free again")
    g2 = inflight_guest(vsock, fd, size, memory=g, base=2)
    ok(qmp.cmd("cont"))
    kit.wait_until(lambda: g2.used_idx() == 2, 10, "both writes' completions")
    with open(img, "rb") as fimg:
        assert fimg.read(1024) == b"\x44" * 512 + b"\x33" * 512
    stats = [s for s in qmp.cmd("query-blockstats")["return"] if s.get("device") == "disk0"]
    assert stats[0]["stats"]["wr_operations"] == 2, stats
    assert queue_state(region)[4] == {}
    region.close()
    os.close(fd)


def test_killed_daemon_requests_are_handled_by_the_next(daemons, tmp_path):
    """kill -9 while a write is parked and another held: a new thinblkd on the same socket,
    given the region back, handles both, in the order they were taken."""
    img, vsock, first, fd, size, region = tracked_export(daemons, tmp_path, [ENOSPC_ONCE])
    qmp = first.negotiated()
    g = inflight_guest(vsock, fd, size)
    write_request(g, 0, 5, 0x11)
    stop_event(qmp)
    # A second write to the same sector, taken while stopped? No: the ring is not read while
    # stopped. It stays in the avail ring, and the next daemon takes it after the first.
    status2 = write_request(g, 3, 5, 0x22)
    assert queue_state(region)[4] == {0: 0}
    first.kill()

    second = start_fault_export(daemons, img, vsock)
    # QEMU restarts a ring whose backend died at its used index (0 here).
    g2 = inflight_guest(vsock, fd, size, memory=g, base=0)
    kit.wait_until(lambda: g2.used_idx() == 2, 10, "both writes' completions")
    assert g2.mem[DATA + 0x10] == 0 and g2.mem[status2] == 0
    used = [struct.unpack_from("<II", g2.mem, 0x2000 + 4 + 8 * i)[0] for i in range(2)]
    assert used == [0, 3]                              # the one taken first, first
    with open(img, "rb") as fimg:
        fimg.seek(5 * 512)
        assert fimg.read(512) == b"\x22" * 512         # so the later write wins
    assert queue_state(region)[4] == {}
    assert "taken before the restart and never answered" in second.stderr()
    region.close()
    os.close(fd)


@pytest.fixture(scope="module")
def guest_image():
    return kit.build_guest()


@needs_qemu
def test_guest_writes_through_kill_9_and_restart(guest_image, daemons, tmp_path):
    """QEMU (reconnect=1) keeps the region across thinblkd's death: the guest's writes that
    were parked when thinblkd was killed are done by the next one; the guest sees no error."""
    img = image(tmp_path / "disk.raw", 64 * MIB)
    vsock = daemons.rundir() / "vub.sock"
    # The 9th write fails: the daemon stops with it parked, and more wait behind it.
    first = start_fault_export(daemons, img, vsock,
                  rules=[{"op": "write", "errno": "ENOSPC", "after": 8, "once": True}])
    qmp = first.negotiated()
    with kit.Guest(guest_image, kit.VhostUserBlkDisk(str(vsock), reconnect=1), job="write",
                   mb=16, seed=21, workdir=tmp_path / "guest") as g:
        stop_event(qmp, GUEST_TIMEOUT)
        assert g.running() and not g.markers("RESULT"), g.console
        first.kill()
        second = start_fault_export(daemons, img, vsock)
        console, rc = g.wait(GUEST_TIMEOUT)
    check_guest_wrote(g, console, rc, kit.file_sha256(img, 0, 16 * MIB))
    assert "taken before the restart and never answered: handled again" in second.stderr()
