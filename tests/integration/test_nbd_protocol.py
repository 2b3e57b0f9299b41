"""The NBD server of thinblkd, against doc/proto.md of NetworkBlockDevice/nbd.

Every input is hostile: the negative tests speak NBD by hand over raw sockets (and through
python3-libnbd with its client-side checks off) and check the exact error the spec asks for,
that the offending connection goes on where the spec lets it (or is closed where it cannot),
and that the daemon and its other connections are unaffected. The positive tests use real
clients: python3-libnbd, nbdinfo, qemu-io, qemu-img, nbdcopy.
"""

import errno
import os
import random
import shutil
import socket
import struct
import subprocess
import time

import pytest

from conftest import AGAINST_QEMU, TIMEOUT

pytestmark = pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd's NBD server")

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
SIZE = 64 * MiB
MAX_BLOCK = 32 * MiB

# doc/proto.md constants
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
FLAG_HAS_FLAGS, FLAG_READ_ONLY = 1 << 0, 1 << 1

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF = 1, 2, 4
CMD_FLAG_REQ_ONE, CMD_FLAG_FAST_ZERO = 8, 16

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA = 0, 1
REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR = 5, (1 << 15) + 1

EPERM, EIO, EINVAL, ENOSPC, ENOTSUP = 1, 5, 22, 28, 95
STATE_HOLE, STATE_ZERO = 1, 2


def libnbd_errno(e):
    """The errno of an nbd.Error (python3-libnbd gives its name)."""
    return getattr(errno, e.value.errno) if isinstance(e.value.errno, str) else e.value.errno


# ---- a client speaking NBD by hand --------------------------------------------------------

class Closed(Exception):
    pass


class RawNBD:
    """One connection, every byte explicit. recv_exact() raises Closed at end of stream."""

    def __init__(self, path, timeout=TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.handle = 0
        self.structured = False

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                data = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                data = b""
            if not data:
                raise Closed(f"closed after {len(buf)} of {n} bytes")
            buf += data
        return bytes(buf)

    def assert_closed(self):
        """The server closes without sending anything more."""
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        assert data == b"", f"expected the connection closed, got {data[:64]!r}"

    # -- handshake

    def greeting(self, client_flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        magic, opts, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opts) == (NBDMAGIC, IHAVEOPT)
        assert flags == FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        if client_flags is not None:
            self.send(struct.pack(">I", client_flags))
        return self

    def send_option(self, option, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self):
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REPLY_MAGIC
        return option, rtype, self.recv_exact(length)

    def option(self, option, data=b""):
        """Send an option; return its replies up to the final one, as (type, data)."""
        self.send_option(option, data)
        replies = []
        while True:
            opt, rtype, payload = self.option_reply()
            assert opt == option
            replies.append((rtype, payload))
            if rtype not in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
                return replies

    @staticmethod
    def info_data(name, requests=()):
        name = name.encode() if isinstance(name, str) else name
        return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
                + b"".join(struct.pack(">H", r) for r in requests))

    @staticmethod
    def meta_data(name, queries):
        name = name.encode()
        return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
                + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries))

    def go(self, name="disk", structured=False, meta=False):
        """Negotiate and enter transmission; return (size, transmission flags)."""
        if structured:
            assert self.option(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        if meta:
            replies = self.option(OPT_SET_META_CONTEXT,
                                  self.meta_data(name, ["base:allocation"]))
            assert replies[-1] == (REP_ACK, b"")
            assert len(replies) == 2 and replies[0][0] == REP_META_CONTEXT
            self.context_id = struct.unpack(">I", replies[0][1][:4])[0]
        self.structured = structured
        replies = self.option(OPT_GO, self.info_data(name, [INFO_BLOCK_SIZE]))
        assert replies[-1] == (REP_ACK, b""), replies
        infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in replies[:-1]}
        size, flags = struct.unpack(">QH", infos[INFO_EXPORT])
        return size, flags

    # -- transmission

    def request(self, cmd, offset=0, count=0, flags=0, payload=b"", magic=REQUEST_MAGIC):
        self.handle += 1
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, self.handle, offset, count)
                  + payload)
        return self.handle

    def reply(self, data_len=0):
        """The next reply, simple or a structured chunk: (error, handle, flags, type, data).
        A simple reply carries data_len bytes of data when its error is 0; flags and type
        are None for it."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(data_len) if error == 0 and data_len else b""
            return error, handle, None, None, data
        assert magic == STRUCTURED_MAGIC, hex(magic)
        flags, rtype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
        payload = self.recv_exact(length)
        error = 0
        if rtype & (1 << 15):
            error, msglen = struct.unpack(">IH", payload[:6])
            assert error != 0 and msglen <= len(payload) - 6
        return error, handle, flags, rtype, payload

    def simple_reply(self, data_len=0):
        """(error, handle, data) of a reply that must be simple."""
        error, handle, flags, _, data = self.reply(data_len)
        assert flags is None, "expected a simple reply"
        return error, handle, data

    def chunk(self):
        """(flags, type, handle, payload) of a reply that must be a structured chunk."""
        _, handle, flags, rtype, payload = self.reply()
        assert flags is not None, "expected a structured reply"
        return flags, rtype, handle, payload

    def error_of(self, handle):
        """The NBD error of the reply to handle (0 on success): a simple reply or one final
        structured chunk (which any reply to a read must be, once negotiated)."""
        error, h, flags, rtype, _ = self.reply()
        assert h == handle
        if flags is not None:
            assert flags & REPLY_FLAG_DONE
        elif self.structured:
            assert error == 0, "an error must come as a structured reply"
        return error

    def read(self, offset, count):
        h = self.request(CMD_READ, offset, count)
        error, rh, flags, rtype, data = self.reply(count)
        assert (error, rh) == (0, h)
        if flags is not None:
            assert (flags, rtype) == (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)
            assert struct.unpack(">Q", data[:8])[0] == offset
            data = data[8:]
        return data

    def write(self, offset, data):
        h = self.request(CMD_WRITE, offset, len(data), payload=data)
        assert self.simple_reply() == (0, h, b"")

    def check_alive(self):
        """A valid request still gets a correct answer on this connection."""
        self.write(4096, b"\x5a" * 4096)
        assert self.read(4096, 4096) == b"\x5a" * 4096


# ---- the daemon ---------------------------------------------------------------------------

class NBDServer:
    def __init__(self, daemon, sock, image):
        self.daemon = daemon
        self.sock = sock
        self.image = image

    def uri(self, name="disk"):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def raw(self):
        return RawNBD(self.sock)

    def libnbd(self, name="disk", strict=True):
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        h.set_export_name(name)
        h.add_meta_context("base:allocation")
        h.connect_unix(str(self.sock))
        return h

    def qmp(self):
        return self.daemon.negotiated()


def start_server(daemons, tmp_path, nbd_args="", extra=(), blockdev_args="", node="f0"):
    rundir = daemons.rundir()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    sock = rundir / "nbd.sock"
    mon = rundir / "mon.sock"
    args = ["--chardev", f"socket,id=m0,path={mon},server=on,wait=off",
            "--monitor", "chardev=m0",
            "--blockdev", f"driver=file,node-name=f0,filename={image}{blockdev_args}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}{nbd_args}",
            *extra,
            "--export", f"type=nbd,id=e0,node-name={node},name=disk,writable=on,"
                        "description=the test disk",
            "--export", "type=nbd,id=e1,node-name=f0,name=ro"]
    d = daemons.start_raw(args, sockets=[mon, sock], rundir=rundir)
    return NBDServer(d, sock, image)


@pytest.fixture
def server(daemons, tmp_path):
    return start_server(daemons, tmp_path)


def assert_daemon_serves(server):
    """The daemon is alive and a new client is served."""
    assert server.daemon.running()
    c = server.raw().greeting()
    c.go()
    c.check_alive()
    c.close()


# ---- handshake ----------------------------------------------------------------------------

def test_greeting_and_go(server):
    c = server.raw().greeting()
    size, flags = c.go()
    assert size == SIZE
    assert flags & FLAG_HAS_FLAGS and not flags & FLAG_READ_ONLY
    c.check_alive()


def test_go_read_only_export_flags(server):
    c = server.raw().greeting()
    size, flags = c.go("ro")
    assert flags & FLAG_READ_ONLY


def test_opt_list_lists_exports(server):
    c = server.raw().greeting()
    replies = c.option(OPT_LIST)
    assert replies[-1] == (REP_ACK, b"")
    names = []
    for rtype, data in replies[:-1]:
        assert rtype == REP_SERVER
        (n,) = struct.unpack(">I", data[:4])
        assert n <= len(data) - 4
        names.append(data[4:4 + n].decode())
    assert names == ["disk", "ro"]


def test_opt_list_with_data_is_invalid(server):
    c = server.raw().greeting()
    (rtype, _), = c.option(OPT_LIST, b"x")
    assert rtype == REP_ERR_INVALID
    c.go()


@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
def test_info_and_go_of_unknown_export(server, option):
    c = server.raw().greeting()
    replies = c.option(option, RawNBD.info_data("nosuch"))
    assert [t for t, _ in replies] == [REP_ERR_UNKNOWN]
    size, _ = c.go()  # the connection goes on
    assert size == SIZE


def test_info_gives_name_description_block_size(server):
    c = server.raw().greeting()
    replies = c.option(OPT_INFO, RawNBD.info_data("disk", [INFO_NAME, INFO_DESCRIPTION,
                                                            INFO_BLOCK_SIZE, 0x7777]))
    assert replies[-1] == (REP_ACK, b"")
    infos = {}
    for rtype, data in replies[:-1]:
        assert rtype == REP_INFO
        infos[struct.unpack(">H", data[:2])[0]] = data[2:]
    assert struct.unpack(">QH", infos[INFO_EXPORT])[0] == SIZE
    assert infos[INFO_NAME] == b"disk"
    assert infos[INFO_DESCRIPTION] == b"the test disk"
    minimum, preferred, maximum = struct.unpack(">III", infos[INFO_BLOCK_SIZE])
    assert minimum == 1 and preferred == 4096 and maximum == MAX_BLOCK
    c.go()  # INFO does not end the handshake


@pytest.mark.parametrize("data", [b"", b"\0\0\0\x09disk", b"\0\0\0\x04disk\0\x01",
                                  b"\0\0\0\x04disk\0\x01\0\x03\0\x00", b"\xff\xff\xff\xff\0\0"],
                         ids=["empty", "short-name", "missing-request", "extra-request",
                              "huge-name-length"])
def test_malformed_go_is_invalid(server, data):
    c = server.raw().greeting()
    (rtype, _), = c.option(OPT_GO, data)
    assert rtype == REP_ERR_INVALID
    c.go()


def test_export_name_too_long_in_go(server):
    c = server.raw().greeting()
    (rtype, _), = c.option(OPT_GO, RawNBD.info_data("x" * 4097))
    assert rtype == REP_ERR_INVALID
    c.go()


def test_unknown_option_is_unsupported(server):
    c = server.raw().greeting()
    (rtype, _), = c.option(0x4242, b"some data")
    assert rtype == REP_ERR_UNSUP
    c.go()


def test_starttls_is_refused_by_policy(server):
    c = server.raw().greeting()
    (rtype, _), = c.option(OPT_STARTTLS)
    assert rtype == REP_ERR_POLICY
    c.go()


def test_structured_reply_with_data_is_invalid(server):
    c = server.raw().greeting()
    (rtype, _), = c.option(OPT_STRUCTURED_REPLY, b"x")
    assert rtype == REP_ERR_INVALID
    c.go(structured=True)


def test_meta_context_needs_structured_replies(server):
    c = server.raw().greeting()
    (rtype, _), = c.option(OPT_SET_META_CONTEXT,
                           RawNBD.meta_data("disk", ["base:allocation"]))
    assert rtype == REP_ERR_INVALID


def test_list_meta_context(server):
    c = server.raw().greeting()
    c.option(OPT_STRUCTURED_REPLY)
    for queries in ([], ["base:"], ["base:allocation", "x-other:thing", "base:nosuch"]):
        replies = c.option(OPT_LIST_META_CONTEXT, RawNBD.meta_data("disk", queries))
        assert replies[-1] == (REP_ACK, b"")
        assert [(t, d[4:]) for t, d in replies[:-1]] == [(REP_META_CONTEXT,
                                                          b"base:allocation")]
    replies = c.option(OPT_LIST_META_CONTEXT, RawNBD.meta_data("disk", ["x-other:"]))
    assert replies == [(REP_ACK, b"")]
    (rtype, _), = c.option(OPT_LIST_META_CONTEXT, RawNBD.meta_data("nosuch", []))
    assert rtype == REP_ERR_UNKNOWN
    (rtype, _), = c.option(OPT_LIST_META_CONTEXT,
                           RawNBD.meta_data("disk", ["base:allocation"])[:-3])
    assert rtype == REP_ERR_INVALID


def test_opt_abort_is_acked_then_closed(server):
    c = server.raw().greeting()
    assert c.option(OPT_ABORT) == [(REP_ACK, b"")]
    c.assert_closed()


def test_export_name_of_unknown_export_closes(server):
    c = server.raw().greeting()
    c.send_option(OPT_EXPORT_NAME, b"nosuch")
    c.assert_closed()
    assert_daemon_serves(server)


def test_export_name_enters_transmission(server):
    c = server.raw().greeting(client_flags=FLAG_FIXED_NEWSTYLE)  # zeroes wanted
    c.send_option(OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", c.recv_exact(10))
    assert size == SIZE and flags & FLAG_HAS_FLAGS
    assert c.recv_exact(124) == bytes(124)
    c.check_alive()


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff",                                    # unknown client flags
    struct.pack(">I", 3) + b"GARBAGE!" + bytes(8),          # bad option magic
    struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_LIST, 1 << 30),  # huge option
    bytes(random.Random(7).randrange(256) for _ in range(4096)),
], ids=["client-flags", "option-magic", "option-length", "random"])
def test_garbage_in_handshake_closes_that_connection(server, garbage):
    other = server.raw().greeting()
    other.go()
    c = server.raw().greeting(client_flags=None)
    try:
        c.send(garbage)
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.assert_closed()
    other.check_alive()
    assert_daemon_serves(server)


def test_too_many_options_closes(server):
    c = server.raw().greeting()
    for i in range(128):
        (rtype, _), = c.option(OPT_INFO, RawNBD.info_data("disk", []))[-1:]
        assert rtype == REP_ACK
    c.send_option(OPT_INFO, RawNBD.info_data("disk", []))
    c.assert_closed()
    assert_daemon_serves(server)


def test_option_split_into_single_bytes(server):
    """Messages cut anywhere are reassembled."""
    c = server.raw().greeting(client_flags=None)
    data = (struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, 10)
            + RawNBD.info_data("disk"))
    for b in data:
        c.send(bytes([b]))
    replies = []
    while not replies or replies[-1][1] != REP_ACK:
        replies.append(c.option_reply())
    c.check_alive()


# ---- transmission: invalid requests -------------------------------------------------------

@pytest.fixture(params=[False, True], ids=["simple", "structured"])
def conn(server, request):
    c = server.raw().greeting()
    c.go(structured=request.param, meta=request.param)
    yield c
    c.close()


def test_read_past_end_is_einval_and_connection_goes_on(conn):
    h = conn.request(CMD_READ, SIZE - 4096, 8192)
    assert conn.error_of(h) == EINVAL
    h = conn.request(CMD_READ, 1 << 63, 512)
    assert conn.error_of(h) == EINVAL
    h = conn.request(CMD_READ, (1 << 64) - 512, 1024)  # offset + length overflows
    assert conn.error_of(h) == EINVAL
    conn.check_alive()


def test_write_past_end_is_enospc_after_its_payload(conn):
    """The spec: ENOSPC for a write past the end; its payload is read and dropped, so the
    next request is understood."""
    h = conn.request(CMD_WRITE, SIZE - 512, 4096, payload=b"\x11" * 4096)
    assert conn.error_of(h) == ENOSPC
    h = conn.request(CMD_WRITE_ZEROES, SIZE, 512)
    assert conn.error_of(h) == ENOSPC
    h = conn.request(CMD_TRIM, SIZE - 512, 1024)
    assert conn.error_of(h) == EINVAL
    conn.check_alive()


def test_read_over_maximum_block_size_is_einval(conn):
    h = conn.request(CMD_READ, 0, MAX_BLOCK + 1)
    assert conn.error_of(h) == EINVAL
    conn.check_alive()


def test_write_of_maximum_block_size_works(server):
    c = server.raw().greeting()
    c.go()
    data = os.urandom(1024) * (MAX_BLOCK // 1024)
    c.write(0, data)
    assert c.read(0, MAX_BLOCK) == data


def test_write_over_maximum_block_size_closes_only_that_connection(server):
    other = server.raw().greeting()
    other.go()
    c = server.raw().greeting()
    c.go()
    c.request(CMD_WRITE, 0, MAX_BLOCK + 1)
    c.assert_closed()
    other.check_alive()
    assert_daemon_serves(server)


@pytest.mark.parametrize("cmd,flags", [
    (42, 0),                                    # unknown command
    (5, 0),                                     # NBD_CMD_CACHE: not advertised
    (CMD_READ, 1 << 7),                         # unknown flag
    (CMD_READ, CMD_FLAG_NO_HOLE),               # flag of another command
    (CMD_READ, CMD_FLAG_REQ_ONE),
    (CMD_FLUSH, CMD_FLAG_FAST_ZERO),
], ids=["unknown-command", "cache", "unknown-flag", "no-hole-on-read", "req-one-on-read",
        "fast-zero-on-flush"])
def test_unknown_command_or_flag_is_einval(conn, cmd, flags):
    h = conn.request(cmd, 0, 512 if cmd != CMD_FLUSH else 0, flags=flags)
    assert conn.error_of(h) == EINVAL
    conn.check_alive()


def test_df_without_structured_replies_is_einval(server):
    c = server.raw().greeting()
    c.go()
    h = c.request(CMD_READ, 0, 512, flags=CMD_FLAG_DF)
    assert c.error_of(h) == EINVAL
    c.check_alive()


def test_flush_with_offset_is_einval(conn):
    h = conn.request(CMD_FLUSH, 512, 0)
    assert conn.error_of(h) == EINVAL


def test_writes_to_read_only_export_are_eperm(server):
    c = server.raw().greeting()
    c.go("ro")
    h = c.request(CMD_WRITE, 0, 4096, payload=b"\x22" * 4096)
    assert c.error_of(h) == EPERM
    h = c.request(CMD_TRIM, 0, 4096)
    assert c.error_of(h) == EPERM
    h = c.request(CMD_WRITE_ZEROES, 0, 4096)
    assert c.error_of(h) == EPERM
    assert c.read(0, 4096) == bytes(4096)  # nothing was written, reads work


def test_block_status_without_meta_context_is_einval(server):
    c = server.raw().greeting()
    c.go(structured=True)
    h = c.request(CMD_BLOCK_STATUS, 0, 4096)
    assert c.error_of(h) == EINVAL


def test_fast_zero_is_enotsup(conn):
    h = conn.request(CMD_WRITE_ZEROES, 0, 4096, flags=CMD_FLAG_FAST_ZERO)
    assert conn.error_of(h) == ENOTSUP


def test_bad_request_magic_closes_only_that_connection(server):
    other = server.raw().greeting()
    other.go()
    c = server.raw().greeting()
    c.go()
    c.request(CMD_READ, 0, 512, magic=0x12345678)
    c.assert_closed()
    other.check_alive()
    assert_daemon_serves(server)


def test_garbage_in_transmission_closes(server):
    c = server.raw().greeting()
    c.go()
    c.send(os.urandom(1000))
    c.assert_closed()
    assert_daemon_serves(server)


# ---- transmission: valid requests ---------------------------------------------------------

def test_structured_read_is_one_data_chunk(server):
    c = server.raw().greeting()
    c.go(structured=True)
    c.write(8192, b"\x33" * 8192)
    h = c.request(CMD_READ, 8192, 8192, flags=CMD_FLAG_DF)
    flags, rtype, rh, payload = c.chunk()
    assert (flags, rtype, rh) == (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h)
    assert struct.unpack(">Q", payload[:8])[0] == 8192 and payload[8:] == b"\x33" * 8192
    h = c.request(CMD_READ, 0, 0)
    assert c.chunk() == (REPLY_FLAG_DONE, REPLY_TYPE_NONE, h, b"")


def block_status(c, offset, count, flags=0):
    """The (length, flags) descriptors of one block status reply with one chunk."""
    h = c.request(CMD_BLOCK_STATUS, offset, count, flags=flags)
    rflags, rtype, rh, payload = c.chunk()
    assert (rflags, rtype, rh) == (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h)
    words = struct.unpack(f">{len(payload) // 4}I", payload)
    assert words[0] == c.context_id
    return list(zip(words[1::2], words[2::2]))


def test_block_status_data_then_hole(server):
    """The image is a sparse file: what was written is data, the rest a hole of zeroes."""
    c = server.raw().greeting()
    c.go(structured=True, meta=True)
    c.write(0, b"\x11" * 65536)
    assert block_status(c, 4096, 131072) == [(61440, 0), (69632, STATE_HOLE | STATE_ZERO)]


def test_block_status_req_one_is_one_descriptor(server):
    c = server.raw().greeting()
    c.go(structured=True, meta=True)
    c.write(0, b"\x11" * 65536)
    assert block_status(c, 4096, 131072, CMD_FLAG_REQ_ONE) == [(61440, 0)]
    assert block_status(c, 65536, 131072, CMD_FLAG_REQ_ONE) == [(131072, STATE_HOLE | STATE_ZERO)]


def test_zero_length_requests_succeed(conn):
    for cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
        h = conn.request(cmd, 0, 0)
        assert conn.error_of(h) == 0


def test_pipelined_requests_all_answered(server):
    """Many requests sent at once, past the in-flight limit: every one answered once."""
    c = server.raw().greeting()
    c.go()
    handles = set()
    data = b""
    for i in range(300):
        c.handle += 1
        handles.add(c.handle)
        data += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, c.handle, i * 4096, 4096)
        data += bytes([i % 256]) * 4096
    c.send(data)
    seen = set()
    for _ in handles:
        error, h, _ = c.simple_reply()
        assert error == 0 and h in handles and h not in seen
        seen.add(h)
    for i in range(300):
        assert c.read(i * 4096, 4096) == bytes([i % 256]) * 4096


def test_disc_finishes_requests_in_flight(server):
    c = server.raw().greeting()
    c.go()
    h1 = c.request(CMD_WRITE, 0, 4096, payload=b"\x44" * 4096)
    h2 = c.request(CMD_FLUSH)
    c.request(CMD_DISC)
    replies = {c.simple_reply()[:2], c.simple_reply()[:2]}
    assert replies == {(0, h1), (0, h2)}
    c.assert_closed()
    with open(server.image, "rb") as f:
        assert f.read(4096) == b"\x44" * 4096


def test_client_half_close_gets_its_replies(server):
    c = server.raw().greeting()
    c.go()
    h = c.request(CMD_WRITE, 0, 4096, payload=b"\x55" * 4096)
    c.sock.shutdown(socket.SHUT_WR)
    assert c.simple_reply() == (0, h, b"")
    c.assert_closed()


def test_requests_wait_while_stopped(server):
    """While the daemon is stopped the server stops reading; cont lets the request run."""
    qmp = server.qmp()
    h = server.libnbd()
    h.pwrite(b"\x66" * 4096, 0)
    assert qmp.cmd("stop") == {"return": {}}
    buf = nbd.Buffer(4096)
    cookie = h.aio_pread(buf, 0)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        h.poll(0)
        assert not h.aio_command_completed(cookie)
    assert qmp.cmd("cont") == {"return": {}}
    while not h.aio_command_completed(cookie):
        h.poll(-1)
    assert buf.to_bytearray() == b"\x66" * 4096
    h.shutdown()


def test_client_gone_while_its_requests_are_held(server):
    """A client that leaves while its requests wait in the stopped device: they finish after
    cont with nobody to answer, and the daemon goes on."""
    qmp = server.qmp()
    assert qmp.cmd("stop") == {"return": {}}
    c = server.raw().greeting()
    c.go()
    c.request(CMD_WRITE, 0, 4096, payload=b"\x99" * 4096)
    c.request(CMD_READ, 0, 4096)
    c.request(CMD_FLUSH)
    c.close()
    other = server.raw().greeting()  # the handshake goes on while stopped
    other.go()
    assert qmp.cmd("cont") == {"return": {}}
    other.check_alive()
    assert_daemon_serves(server)


def wait_for_status(qmp, status):
    deadline = time.monotonic() + TIMEOUT
    while qmp.cmd("query-status")["return"]["status"] != status:
        assert time.monotonic() < deadline, f"status never became {status}"
        time.sleep(0.01)   # polling interval


FAULT_ONCE = ('{"driver": "fault", "node-name": "flt", "file": "f0", '
              '"rules": [{"op": "write", "errno": "ENOSPC", "once": true}]}')


@pytest.mark.parametrize("how", ["client-leaves", "export-removed"])
def test_parked_request_outlives_its_connection(daemons, tmp_path, how):
    """A write parked on ENOSPC (werror=enospc) whose connection then goes away: cont
    retries it with nobody to answer (or removal drops it), and the daemon goes on."""
    server = start_server(daemons, tmp_path, extra=["--blockdev", FAULT_ONCE], node="flt")
    qmp = server.qmp()
    c = server.raw().greeting()
    c.go()
    c.request(CMD_WRITE, 0, 4096, payload=b"\x97" * 4096)
    wait_for_status(qmp, "io-error")
    if how == "client-leaves":
        c.close()
    else:
        assert qmp.cmd("block-export-del", {"id": "e0", "mode": "hard"}) == {"return": {}}
        c.assert_closed()
    assert qmp.cmd("cont") == {"return": {}}
    wait_for_status(qmp, "running")
    other = server.raw().greeting()
    other.go("ro")
    expected = b"\x97" * 4096 if how == "client-leaves" else bytes(4096)
    deadline = time.monotonic() + TIMEOUT
    while other.read(0, 4096) != expected:   # the retried write lands after cont
        assert time.monotonic() < deadline
        time.sleep(0.01)   # polling interval


def test_hard_export_removal_with_requests_held(server):
    qmp = server.qmp()
    c = server.raw().greeting()
    c.go()
    assert qmp.cmd("block-export-del", {"id": "e0"}) == {
        "error": {"class": "GenericError", "desc": "export 'e0' still in use"}}
    assert qmp.cmd("stop") == {"return": {}}
    c.request(CMD_WRITE, 0, 4096, payload=b"\x98" * 4096)
    c.request(CMD_FLUSH)
    assert qmp.cmd("block-export-del", {"id": "e0", "mode": "hard"}) == {"return": {}}
    c.assert_closed()
    assert qmp.cmd("cont") == {"return": {}}
    other = server.raw().greeting()
    (rtype, _), = other.option(OPT_GO, RawNBD.info_data("disk"))
    assert rtype == REP_ERR_UNKNOWN
    other.go("ro")
    assert other.read(0, 512) is not None


def test_nbd_server_stop_closes_clients(server):
    qmp = server.qmp()
    c = server.raw().greeting()
    c.go()
    pending = server.raw()  # still in the handshake
    assert qmp.cmd("nbd-server-stop") == {"return": {}}
    c.assert_closed()
    pending.greeting(client_flags=None)
    pending.assert_closed()
    assert not os.path.exists(server.sock)
    server.daemon.sockets.remove(str(server.sock))


def test_max_connections(daemons, tmp_path):
    server = start_server(daemons, tmp_path, nbd_args=",max-connections=1")
    first = server.raw().greeting()
    first.go()
    second = server.raw()  # connects into the backlog, not served yet
    second.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        second.recv_exact(1)
    first.close()
    second.sock.settimeout(TIMEOUT)
    second.greeting().go()
    second.check_alive()


def test_minimum_block_size_enforced(daemons, tmp_path):
    """With O_DIRECT the node's alignment is the minimum block size; unaligned reads and
    writes are EINVAL (the spec's "Block size constraints"), trims are rounded in."""
    server = start_server(daemons, tmp_path, blockdev_args=",cache.direct=on")
    c = server.raw().greeting()
    replies = c.option(OPT_INFO, RawNBD.info_data("disk", [INFO_BLOCK_SIZE]))
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in replies[:-1]}
    minimum, _, _ = struct.unpack(">III", infos[INFO_BLOCK_SIZE])
    if minimum == 1:
        pytest.skip("O_DIRECT not supported where the test image is")
    c.go()
    h = c.request(CMD_READ, 1, 512)
    assert c.error_of(h) == EINVAL
    h = c.request(CMD_WRITE, 0, 100, payload=b"x" * 100)
    assert c.error_of(h) == EINVAL
    h = c.request(CMD_WRITE_ZEROES, 100, minimum)
    assert c.error_of(h) == EINVAL
    h = c.request(CMD_TRIM, 1, minimum * 3)
    assert c.error_of(h) == 0
    c.check_alive()


def test_socket_removed_and_clients_closed_at_exit(server):
    c = server.raw().greeting()
    c.go()
    server.daemon.signal(15)
    c.assert_closed()
    assert server.daemon.wait() == 0
    assert not os.path.exists(server.sock)


# ---- python3-libnbd, its client-side checks off -------------------------------------------

def test_libnbd_read_write(server):
    h = server.libnbd()
    assert h.get_size() == SIZE
    assert h.can_multi_conn() and h.can_fua() and h.can_zero() and h.can_trim()
    h.pwrite(b"\x77" * 65536, MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, MiB) == b"\x77" * 65536
    h.zero(65536, MiB, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, MiB) == bytes(65536)
    h.trim(65536, MiB)
    h.flush()
    h.shutdown()


def test_libnbd_block_status(server):
    h = server.libnbd()
    extents = []
    h.block_status(MiB, 0, lambda ctx, off, ents, err: extents.append((ctx, off, ents)))
    assert extents == [("base:allocation", 0, [MiB, nbd.STATE_HOLE | nbd.STATE_ZERO])]


def test_libnbd_errors_and_connection_goes_on(server):
    h = server.libnbd(strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, SIZE)
    assert libnbd_errno(e) == EINVAL
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, SIZE - 1024)
    assert libnbd_errno(e) == ENOSPC
    with pytest.raises(nbd.Error) as e:
        h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert libnbd_errno(e) == ENOTSUP
    h.pwrite(b"\x88" * 4096, 0)
    assert h.pread(4096, 0) == b"\x88" * 4096
    h.shutdown()


def test_libnbd_read_only_export_eperm(server):
    h = server.libnbd("ro", strict=False)
    assert h.is_read_only()
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, 0)
    assert libnbd_errno(e) == EPERM
    assert h.pread(4096, 0) == bytes(4096)


def test_libnbd_unknown_export(server):
    h = nbd.NBD()
    h.set_export_name("nosuch")
    with pytest.raises(nbd.Error):
        h.connect_unix(str(server.sock))
    assert_daemon_serves(server)


def test_libnbd_opt_list(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(str(server.sock))
    names = []
    h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    assert [n for n, _ in names] == ["disk", "ro"]
    h.opt_abort()


# ---- real clients -------------------------------------------------------------------------

def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


def run(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=TIMEOUT * 3).stdout


def test_nbdinfo_list(server):
    need("nbdinfo")
    out = run("nbdinfo", "--list", server.uri(""))
    assert 'export="disk"' in out and 'export="ro"' in out
    assert "the test disk" in out


def test_qemu_io_pattern(server):
    need("qemu-io")
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
              "-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M", "-c", "flush", server.uri())
    assert "Pattern verification failed" not in out


def test_qemu_img_convert_and_compare(server, tmp_path):
    need("qemu-img")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB) + bytes(8 * MiB) + os.urandom(MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), server.uri())
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri())


def test_nbdcopy_roundtrip(server, tmp_path):
    need("nbdcopy")
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    data = os.urandom(SIZE)
    src.write_bytes(data)
    run("nbdcopy", str(src), server.uri())
    run("nbdcopy", server.uri(), str(out))
    assert out.read_bytes() == data
