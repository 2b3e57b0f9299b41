"""vhost-user-blk frontends told of a new size: with BACKEND_REQ negotiated and a channel given
(SET_BACKEND_REQ_FD, a socketpair end), block_resize of the export's node sends
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (id 2, no payload, no reply asked), after which GET_CONFIG
shows the new capacity and the guest's requests reach the new region."""

import socket
import struct
import sys
from pathlib import Path

import pytest

from conftest import AGAINST_QEMU, image, ok
from test_vhost_user_blk import (DATA, GET_CONFIG, GET_PROTOCOL_FEATURES, GUEST_TIMEOUT,
                                 FakeGuest, Frontend, needs_qemu, start_export)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402

pytestmark = pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd's vhost-user-blk export")

MIB = kit.MIB
SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD = 16, 21
F_REPLY_ACK, F_BACKEND_REQ, F_CONFIG = 3, 5, 9
NEED_REPLY = 1 << 3
CONFIG_CHANGE_MSG = 2


def give_channel(f, protocol_features):
    """Negotiate protocol_features (bits) and hand thinblkd one end of a socketpair as the
    back-end channel, REPLY_ACK asked; returns our end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.settimeout(10)
    f.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", sum(1 << b for b in protocol_features)))
    f.s.sendmsg([struct.pack("<III", SET_BACKEND_REQ_FD, 1 | NEED_REPLY, 0)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<i", theirs.fileno()))])
    theirs.close()
    req, flags, size = struct.unpack("<III", f.recv_exact(12))
    assert (req, flags, size) == (SET_BACKEND_REQ_FD, 0x5, 8)
    assert f.recv_exact(8) == struct.pack("<Q", 0)  # REPLY_ACK: done
    return ours


def capacity(f):
    cfg = f.call(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
    return struct.unpack("<Q", cfg[12:20])[0]


def test_backend_req_offered(daemons, tmp_path):
    _, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    proto, = struct.unpack("<Q", Frontend(vsock).call(GET_PROTOCOL_FEATURES))
    assert proto & (1 << F_BACKEND_REQ)


def test_resize_sends_config_change_and_new_capacity(daemons, tmp_path):
    d, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    chan = []
    g = FakeGuest(vsock, before_start=lambda f: chan.append(
        give_channel(f, (F_REPLY_ACK, F_BACKEND_REQ, F_CONFIG))))
    assert capacity(g.f) == MIB // 512

    ok(d.negotiated().cmd("block_resize", {"node-name": "fmt0", "size": 4 * MIB}))
    assert chan[0].recv(12) == struct.pack("<III", CONFIG_CHANGE_MSG, 1, 0)
    assert capacity(g.f) == 4 * MIB // 512

    # A read in the grown region succeeds (VIRTIO_BLK_S_OK); before, it was past the end.
    g.lay_out_read(3 * MIB // 512)
    g.submit(0)
    kit.wait_until(lambda: g.used_idx() == 1, 10, "the request's completion")
    assert g.mem[DATA + 0x200] == 0


def test_nothing_sent_without_backend_req(daemons, tmp_path):
    d, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    f = Frontend(vsock)
    chan = give_channel(f, (F_REPLY_ACK, F_CONFIG))
    ok(d.negotiated().cmd("block_resize", {"node-name": "fmt0", "size": 2 * MIB}))
    assert capacity(f) == 2 * MIB // 512  # the resize was handled before this answer
    chan.setblocking(False)
    with pytest.raises(BlockingIOError):
        chan.recv(12)


def test_closed_channel_is_not_fatal(daemons, tmp_path):
    d, vsock = start_export(daemons, image(tmp_path / "d.raw", MIB))
    f = Frontend(vsock)
    give_channel(f, (F_REPLY_ACK, F_BACKEND_REQ, F_CONFIG)).close()
    qmp = d.negotiated()
    ok(qmp.cmd("block_resize", {"node-name": "fmt0", "size": 2 * MIB}))
    ok(qmp.cmd("block_resize", {"node-name": "fmt0", "size": 3 * MIB}))
    assert capacity(f) == 3 * MIB // 512
    assert "CONFIG_CHANGE_MSG not sent" in d.stderr()


@pytest.fixture(scope="module")
def guest_image():
    return kit.build_guest()


@needs_qemu
def test_running_guest_sees_the_new_size(guest_image, daemons, tmp_path):
    """QEMU 7.2 as the frontend: it negotiates BACKEND_REQ, and on CONFIG_CHANGE_MSG reads the
    configuration again and tells the guest, whose kernel logs the new size."""
    d, vsock = start_export(daemons, image(tmp_path / "disk.raw", 64 * MIB))
    with kit.Guest(guest_image, kit.VhostUserBlkDisk(str(vsock)), job="write", mb=32,
                   seed=3, workdir=tmp_path / "guest") as g:
        g.wait_for_line("THINBLK-START", timeout=GUEST_TIMEOUT)
        ok(d.negotiated().cmd("block_resize", {"node-name": "fmt0", "size": 96 * MIB}))
        console, rc = g.wait(timeout=GUEST_TIMEOUT)
    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console}"
    assert any("new size: 196608 512-byte logical blocks" in line for line in g.dmesg), g.dmesg
