"""The rbd protocol driver against a real (throwaway, single-node) Ceph cluster.

thinblkd serves an RBD image over NBD; QEMU's own rbd driver (qemu-img, qemu-io with
"rbd:POOL/IMAGE:conf=...") and the rbd tool are the references. A pool's quota running out is
a full volume: the write is parked, BLOCK_IO_ERROR (nospace) and STOP go out, and cont after the
quota is lifted retries it. A cluster that stops answering gives an error within the op
timeout, never a daemon that hangs.
"""
import json
import random
import re
import select
import shutil
import socket
import subprocess
import threading
import time

import nbd
import pytest

from ceph import ceph  # noqa: F401  (the session's cluster fixture)
from conftest import QEMU, THINBLKD, assert_event

MiB = 1 << 20


def built_with_rbd():
    try:
        out = subprocess.run([THINBLKD, "--help"], capture_output=True, text=True).stdout
    except OSError:
        return True  # no daemon: the daemons fixture says so
    return re.search(r"drivers: .*\brbd\b", out) is not None


pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io"),
    pytest.mark.skipif(not built_with_rbd(), reason="thinblkd was built without the rbd "
                       "driver (it needs librbd-dev and librados-dev)"),
]


class RbdDaemon:
    """thinblkd serving POOL/IMAGE as NBD export "disk" (device disk0 on node r0)."""

    def __init__(self, daemons, ceph, tmp_path, pool, image, werror=None, extra=""):
        self.nbd_path = str(tmp_path / "nbd.sock")
        export = "type=nbd,id=disk0,node-name=r0,name=disk,writable=on"
        if werror:
            export += f",werror={werror}"
        self.daemon = daemons.start(args=[
            "--blockdev", f"driver=rbd,node-name=r0,pool={pool},image={image},"
                          f"conf={ceph.conf},discard=unmap{extra}",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}",
            "--export", export])
        self.qmp = self.daemon.negotiated()
        self.uri = f"nbd+unix:///disk?socket={self.nbd_path}"

    def nbd(self, meta=False):
        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(self.uri)
        return h


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SilentMonitor:
    """A TCP listener that accepts and never speaks: a Ceph monitor that is not answering.
    connected() returns once the daemon's connection attempt has reached it, so a test knows
    the attempt is under way without sleeping."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []

    def connected(self, timeout=30):
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        self.conns.append(conn)

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def silent_monitor():
    m = SilentMonitor()
    yield m
    m.close()


def no_reply_yet(client):
    """Nothing has come on the client's connection (its pending command is unanswered)."""
    return not client.buf and not select.select([client.sock], [], [], 0)[0]


def qemu_io(uri, *cmds, fmt="raw", read_only=False):
    args = ["qemu-io", "-f", fmt] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "failed" not in r.stdout and "Pattern verification" not in \
        r.stdout, r.stdout + r.stderr
    return r.stdout


def allocated_by_nbd(h, size):
    """The data extents of the export (base:allocation without the hole bit), merged."""
    extents = []
    off = 0
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(zip(entries[0::2], entries[1::2]))
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        for length, flags in got:
            if not flags & nbd.STATE_HOLE:
                extents.append([off, length])
            off += length
    return merge(extents)


def merge(extents):
    out = []
    for off, length in sorted(extents):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += length
        else:
            out.append([off, length])
    return out


def allocated_by_rbd(ceph, pool, image):
    diff = json.loads(ceph.rbd("diff", "--format", "json", f"{pool}/{image}"))
    return merge([[e["offset"], e["length"]] for e in diff if e["exists"] == "true"])


def qemu_node(ceph, pool, image):
    """QEMU's query-named-block-nodes entry for -blockdev driver=rbd on the image."""
    cmds = [{"execute": "qmp_capabilities"}, {"execute": "query-named-block-nodes"},
            {"execute": "quit"}]
    r = subprocess.run([QEMU, "-M", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
                        "-blockdev", f"driver=rbd,node-name=r0,pool={pool},image={image},"
                                     f"conf={ceph.conf}"],
                       input="".join(json.dumps(c) + "\n" for c in cmds), capture_output=True,
                       text=True, timeout=60)
    replies = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return [m for m in replies if isinstance(m.get("return"), list)][0]["return"]


def test_query_named_block_nodes_as_qemu(ceph, daemons, tmp_path):
    if shutil.which(QEMU) is None:
        pytest.skip(f"needs {QEMU}")
    pool = ceph.new_pool()
    ceph.create_image(pool, "q", 16 * MiB)
    expected = qemu_node(ceph, pool, "q")
    d = daemons.start(args=["--blockdev", f"driver=rbd,node-name=r0,pool={pool},image=q,"
                                          f"conf={ceph.conf}"])
    qmp = d.negotiated()
    got = qmp.cmd("query-named-block-nodes")["return"]
    assert got == expected
    assert got[0]["drv"] == "rbd" and got[0]["image"]["virtual-size"] == 16 * MiB


def test_blockdev_add_rbd_and_errors(ceph, daemons):
    pool = ceph.new_pool()
    ceph.create_image(pool, "a", 8 * MiB)
    qmp = daemons.start().negotiated()
    base = {"driver": "rbd", "pool": pool, "conf": ceph.conf}
    assert qmp.cmd("blockdev-add", {**base, "node-name": "r1", "image": "a"}) == {"return": {}}
    assert qmp.cmd("query-named-block-nodes")["return"][0]["image"]["virtual-size"] == 8 * MiB
    reply = qmp.cmd("blockdev-add", {**base, "node-name": "r2", "image": "missing"})
    assert reply == {"error": {"class": "GenericError", "desc":
                               "error reading header from missing: No such file or directory"}}
    # The monitors given as server instead of by a conf file.
    host, port = re.search(r"mon_host = v2:([0-9.]+):([0-9]+)",
                           open(ceph.conf).read()).groups()
    assert qmp.cmd("blockdev-add", {
        "driver": "rbd", "node-name": "r4", "pool": pool, "image": "a",
        "server": [{"host": host, "port": port}], "auth-client-required": ["none"],
        "__org.thinblk_op-timeout": 10}) == {"return": {}}
    assert qmp.cmd("blockdev-del", {"node-name": "r4"}) == {"return": {}}
    # No monitor there: the op timeout bounds the connection attempt.
    start = time.monotonic()
    reply = qmp.cmd("blockdev-add", {
        "driver": "rbd", "node-name": "r5", "pool": pool, "image": "a",
        "server": [{"host": "127.0.0.1", "port": str(free_port())}],
        "auth-client-required": ["none"], "__org.thinblk_op-timeout": 2})
    assert reply == {"error": {"class": "GenericError",
                               "desc": "error connecting: Connection timed out"}}
    assert time.monotonic() - start < 15
    # key-secret names a secret object (test_rbd_secret.py has a cluster with cephx).
    reply = qmp.cmd("blockdev-add", {**base, "node-name": "r3", "image": "a",
                                     "key-secret": "sec0"})
    assert reply == {"error": {"class": "GenericError", "desc": "No secret with id 'sec0'"}}
    assert qmp.cmd("object-add", {"qom-type": "authz-simple", "id": "sec0",
                                  "identity": "x"}) == {"return": {}}
    reply = qmp.cmd("blockdev-add", {**base, "node-name": "r3", "image": "a",
                                     "key-secret": "sec0"})
    assert reply == {"error": {"class": "GenericError",
                               "desc": "Object with id 'sec0' is not a secret"}}
    assert [n["node-name"] for n in qmp.cmd("query-named-block-nodes")["return"]] == ["r1"]
    assert qmp.cmd("blockdev-del", {"node-name": "r1"}) == {"return": {}}


def add_while_others_are_served(d, h, silent_monitor, opts, offset, data):
    """blockdev-add opts (whose rbd node connects to silent_monitor) from a new client, with a
    query-status behind it. While the connect waits: another monitor answers, the export h
    reads data at offset, the graph still holds only r0, and the add is unanswered. Then its
    error (QEMU's words for a monitor that never answers), and the query-status after it."""
    waiting = d.daemon.negotiated()
    waiting.execute("blockdev-add", opts, id="add")
    waiting.execute("query-status", id="after")  # answered after the blockdev-add
    silent_monitor.connected()  # the connect is under way
    assert d.qmp.cmd("query-status")["return"]["status"] == "running"
    assert h.pread(len(data), offset) == data
    # Not in the graph yet, nor its name taken for good.
    names = [n["node-name"] for n in d.qmp.cmd("query-named-block-nodes")["return"]]
    assert names == ["r0"]
    assert no_reply_yet(waiting)  # all of this while the add was pending
    reply = waiting.read_message(timeout=60)
    assert reply == {"id": "add", "error": {"class": "GenericError",
                                            "desc": "error connecting: Connection timed out"}}
    assert waiting.read_message()["id"] == "after"


def test_blockdev_add_waiting_for_the_cluster_blocks_nothing_else(ceph, daemons, tmp_path,
                                                                 silent_monitor):
    """blockdev-add connects on the offload thread: while one waits on a monitor that does not
    answer, the other monitors answer and the exports serve; its answer comes within the op
    timeout bound, and that client's next command only after it."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "disk", 8 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "disk")
    h = d.nbd()
    h.pwrite(b"\xa5" * 4096, 4096)
    start = time.monotonic()
    add_while_others_are_served(d, h, silent_monitor, {
        "driver": "rbd", "node-name": "r5", "pool": pool, "image": "disk",
        "server": [{"host": "127.0.0.1", "port": str(silent_monitor.port)}],
        "auth-client-required": ["none"], "__org.thinblk_op-timeout": 3},
        4096, b"\xa5" * 4096)
    assert time.monotonic() - start < 20  # the op timeout bounds it (librados: about twice)
    h.shutdown()


def test_client_leaves_while_blockdev_add_pending(ceph, daemons, tmp_path):
    """The client goes before its answer: the answer is dropped, the node is added all the same
    (as QEMU keeps a node whose blockdev-add's client left)."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "a", 8 * MiB)
    d = daemons.start()
    qmp = d.negotiated()
    leaving = d.negotiated()
    leaving.execute("blockdev-add", {"driver": "rbd", "node-name": "r1", "pool": pool,
                                     "image": "a", "conf": ceph.conf})
    leaving.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        nodes = qmp.cmd("query-named-block-nodes")["return"]
        if nodes:
            break
        time.sleep(0.1)
    assert [n["node-name"] for n in nodes] == ["r1"]
    assert qmp.cmd("blockdev-del", {"node-name": "r1"}) == {"return": {}}
    assert qmp.cmd("query-status")["return"]["status"] == "running"


def test_shutdown_while_blockdev_add_pending(ceph, daemons, silent_monitor):
    """SIGTERM while a blockdev-add waits on a monitor that does not answer: the daemon exits
    at once and cleanly (it does not wait for the connect beyond its few seconds of drain)."""
    d = daemons.start()
    qmp = d.negotiated()
    qmp.execute("blockdev-add", {
        "driver": "rbd", "node-name": "r5", "pool": "p", "image": "disk",
        "server": [{"host": "127.0.0.1", "port": str(silent_monitor.port)}],
        "auth-client-required": ["none"], "__org.thinblk_op-timeout": 60})
    silent_monitor.connected()
    start = time.monotonic()
    assert d.shutdown() == []
    assert time.monotonic() - start < 30  # not the two minutes the connect may take


def test_snapshot_read_only(ceph, daemons, tmp_path):
    pool = ceph.new_pool()
    ceph.create_image(pool, "a", 8 * MiB)
    spec = ceph.qemu_spec(pool, "a")
    qemu_io(spec, "write -P 0x77 0 1M")
    ceph.rbd("snap", "create", f"{pool}/a@s1")
    qemu_io(spec, "write -P 0x88 0 1M")
    sock = tmp_path / "nbd.sock"
    qmp = daemons.start(args=["--nbd-server", f"addr.type=unix,addr.path={sock}"]).negotiated()
    base = {"driver": "rbd", "pool": pool, "image": "a", "conf": ceph.conf,
            "snapshot": "s1", "auth-client-required": ["none"]}
    assert qmp.cmd("blockdev-add", {**base, "node-name": "s"}) == {"error": {
        "class": "GenericError", "desc": "rbd snapshots are read-only"}}
    assert qmp.cmd("blockdev-add", {**base, "node-name": "s", "read-only": True}) == \
        {"return": {}}
    assert qmp.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "s",
                                        "name": "snap"}) == {"return": {}}
    qemu_io(f"nbd+unix:///snap?socket={sock}", "read -P 0x77 0 1M", read_only=True)
    qemu_io(spec, "read -P 0x88 0 1M")


def test_data_path_against_qemu_and_rbd(ceph, daemons, tmp_path):
    pool = ceph.new_pool()
    ceph.create_image(pool, "disk", 32 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "disk")
    qemu_io(d.uri, "write -P 0x5a 0 1M", "write -P 0xa5 5M 3M", "write -P 0x11 20M 64k",
            "writev -P 0x22 12M 4k 60k 1M")
    qemu_io(d.uri, "read -P 0x5a 0 1M", "read -P 0xa5 5M 3M", "read -P 0x11 20M 64k",
            "read -P 0x22 12M 1088k", "read -P 0 1M 4M")
    # QEMU's own view of the image agrees, byte for byte.
    spec = ceph.qemu_spec(pool, "disk")
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, spec],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    qemu_io(spec, "read -P 0xa5 5M 3M")

    # Discard a whole object and zero another: the allocation the export reports is rbd's.
    qemu_io(d.uri, "discard 4M 4M", "write -z -u 20M 4M", "write -z 24M 4M")
    qemu_io(d.uri, "read -P 0 4M 4M", "read -P 0xa5 8M 0", "read -P 0 20M 8M",
            "read -P 0x5a 0 1M")
    h = d.nbd(meta=True)
    size = h.get_size()
    assert size == 32 * MiB
    allocated = allocated_by_nbd(h, size)
    assert allocated == allocated_by_rbd(ceph, pool, "disk")
    # Whole objects: the discarded one and the one zeroed with unmap are gone; zeroes written
    # without unmap stay allocated (as QEMU: librbd's thick-provision flag).
    assert [24 * MiB, 4 * MiB] in allocated
    assert not [e for e in allocated if e[0] < 8 * MiB and e[0] + e[1] > 4 * MiB]
    assert not [e for e in allocated if e[0] < 24 * MiB and e[0] + e[1] > 20 * MiB]
    h.shutdown()
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, spec],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fio_verify(ceph, daemons, tmp_path):
    """fio's nbd engine writes random 4 KiB..256 KiB blocks at iodepth 16 with a checksum in
    each, then reads every one back and checks it (verify_fatal): concurrent requests through
    librbd's callbacks and the eventfd, in any completion order."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "disk", 32 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "disk")
    r = subprocess.run(["fio", "--name", "verify", "--ioengine", "nbd", "--uri", d.uri,
                        "--rw", "randwrite", "--bsrange", "4k-256k", "--iodepth", "16",
                        "--size", str(16 * MiB), "--verify", "crc32c", "--do_verify", "1",
                        "--verify_fatal", "1", "--verify_state_save", "0",
                        "--output-format", "json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] >= 16 * MiB and job["read"]["io_bytes"] > 0, job
    # QEMU's own view of what fio wrote agrees.
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri,
                        ceph.qemu_spec(pool, "disk")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_block_resize_grows_the_image(ceph, daemons, tmp_path):
    pool = ceph.new_pool()
    ceph.create_image(pool, "g", 8 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "g")
    assert d.qmp.cmd("block_resize", {"node-name": "r0", "size": 12 * MiB}) == {"return": {}}
    info = json.loads(ceph.rbd("info", "--format", "json", f"{pool}/g"))
    assert info["size"] == 12 * MiB
    assert d.qmp.cmd("query-block")["return"][0]["inserted"]["image"]["virtual-size"] == \
        12 * MiB
    qemu_io(d.uri, "write -P 0x33 11M 1M", "read -P 0x33 11M 1M")


def test_block_resize_waiting_for_the_cluster_blocks_nothing_else(ceph, daemons, tmp_path):
    """rbd_resize runs on the offload thread: with the OSD gone, the monitors answer while it
    waits, and its error comes within the op timeout, the size unchanged."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "g", 8 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "g", extra=",__org.thinblk_op-timeout=3")
    waiting = d.daemon.negotiated()
    ceph.kill_osd()
    try:
        start = time.monotonic()
        waiting.execute("block_resize", {"node-name": "r0", "size": 12 * MiB}, id="resize")
        assert d.qmp.cmd("query-status")["return"]["status"] == "running"
        assert no_reply_yet(waiting)
        reply = waiting.read_message(timeout=60)
        elapsed = time.monotonic() - start
        if "return" in reply:
            pytest.skip("rbd_resize did not need the OSD")  # not seen; says so if it happens
        assert reply["id"] == "resize"
        assert reply["error"]["desc"].startswith("failed to resize rbd image: "), reply
        assert elapsed < 30, elapsed
        assert d.qmp.cmd("query-block")["return"][0]["inserted"]["image"]["virtual-size"] == \
            8 * MiB
    finally:
        ceph.start_osd()


class Writer(threading.Thread):
    """Writes chunks with up to 16 requests in flight, then flushes; records errors."""

    def __init__(self, h, chunks):
        super().__init__(daemon=True)
        self.h, self.chunks = h, list(chunks)
        self.errors = []

    def run(self):
        pending = {}
        todo = list(self.chunks)
        try:
            while todo or pending:
                while todo and len(pending) < 16:
                    off, data = todo.pop(0)
                    buf = nbd.Buffer.from_bytearray(bytearray(data))
                    pending[self.h.aio_pwrite(buf, off)] = (off, buf)
                if not todo and not pending:
                    break
                self.h.poll(-1)
                for c in list(pending):
                    try:
                        if self.h.aio_command_completed(c):
                            pending.pop(c)
                    except nbd.Error as e:
                        self.errors.append((pending.pop(c)[0], str(e)))
            self.h.flush()
        except nbd.Error as e:
            self.errors.append(("writer", str(e)))


def chunks_of(seed, start, total, size=4 * MiB):
    rnd = random.Random(seed)
    return [(off, rnd.randbytes(size)) for off in range(start, start + total, size)]


def check_readback(h, chunks):
    for off, data in chunks:
        assert h.pread(len(data), off) == data, f"data differs at {off}"


def test_full_pool_stops_and_cont_retries(ceph, daemons, tmp_path):
    pool = ceph.new_pool(quota_bytes=64 * MiB)
    ceph.create_image(pool, "disk", 192 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "disk")
    h = d.nbd()
    # 160 MiB in all: the first 96 MiB go through before the monitor (told by the manager every
    # second) flags the pool full; the rest is written once it is, and fails with EDQUOT.
    first, rest = chunks_of(1, 0, 96 * MiB), chunks_of(2, 96 * MiB, 64 * MiB)
    w = Writer(h, first)
    w.run()
    assert w.errors == []
    ceph.wait_full(pool)

    w = Writer(h, rest)
    w.start()
    ev = d.qmp.wait_event("BLOCK_IO_ERROR", timeout=30)
    assert_event(ev, "BLOCK_IO_ERROR", {
        "device": "disk0", "node-name": "r0", "operation": "write", "action": "stop",
        "nospace": True, "reason": "No space left on device"})
    assert_event(d.qmp.wait_event("STOP", timeout=30), "STOP")
    assert d.qmp.cmd("query-status") == {
        "return": {"status": "io-error", "singlestep": False, "running": False}}
    block = d.qmp.cmd("query-block")["return"]
    assert [(b["device"], b["io-status"]) for b in block] == [("disk0", "nospace")]
    cause = d.qmp.cmd("__org.thinblk_query-stop-reason")["return"]["io-error"]
    assert (cause["errno"], cause["nospace"], cause["reason"]) == \
        ("EDQUOT", True, "No space left on device")
    assert w.is_alive(), "the writes completed while the pool was full"

    ceph.set_quota(pool, 0)
    ceph.wait_full(pool, full=False)
    assert d.qmp.cmd("cont") == {"return": {}}
    w.join(120)
    assert not w.is_alive() and w.errors == []
    assert d.qmp.cmd("query-block")["return"][0]["io-status"] == "ok"
    check_readback(h, first + rest)
    h.shutdown()


def test_shutdown_while_stopped_on_a_full_pool(ceph, daemons, tmp_path):
    """Closing the image releases its lock with a write to the header object: with the pool
    still full, full-try lets it through, and the daemon exits at once."""
    pool = ceph.new_pool(quota_bytes=8 * MiB)
    ceph.create_image(pool, "disk", 64 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "disk")
    h = d.nbd()
    w = Writer(h, chunks_of(5, 0, 12 * MiB))
    w.run()
    assert w.errors == []
    ceph.wait_full(pool)
    w = Writer(h, chunks_of(6, 32 * MiB, 8 * MiB))
    w.start()
    assert d.qmp.wait_event("STOP", timeout=30)["event"] == "STOP"
    start = time.monotonic()
    assert d.daemon.shutdown() == []
    assert time.monotonic() - start < 10
    ceph.wait_full(pool)  # still full: it was not the quota going that let it exit


def test_unreachable_cluster_stops_within_the_op_timeout(ceph, daemons, tmp_path):
    pool = ceph.new_pool()
    ceph.create_image(pool, "disk", 32 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "disk", werror="stop",
                  extra=",__org.thinblk_op-timeout=5")
    h = d.nbd()
    before = chunks_of(3, 0, 8 * MiB)
    w = Writer(h, before)
    w.run()
    assert w.errors == []

    during = chunks_of(4, 8 * MiB, 8 * MiB)
    ceph.kill_osd()
    try:
        start = time.monotonic()
        w = Writer(h, during)
        w.start()
        # The monitor answers while librados waits for the OSD.
        assert d.qmp.cmd("query-status")["return"]["status"] == "running"
        # librados gives up after about twice the op timeout.
        ev = d.qmp.wait_event("BLOCK_IO_ERROR", timeout=30)
        elapsed = time.monotonic() - start
        assert_event(ev, "BLOCK_IO_ERROR", {
            "device": "disk0", "node-name": "r0", "operation": "write", "action": "stop",
            "nospace": False, "reason": "Connection timed out"})
        assert_event(d.qmp.wait_event("STOP", timeout=30), "STOP")
        assert elapsed < 30, elapsed
        assert d.qmp.cmd("query-status")["return"]["status"] == "io-error"
        assert d.qmp.cmd("query-block")["return"][0]["io-status"] == "failed"
        assert w.is_alive()
    finally:
        ceph.start_osd()
    assert d.qmp.cmd("cont") == {"return": {}}
    w.join(120)
    assert not w.is_alive() and w.errors == []
    check_readback(h, before + during)
    h.shutdown()


def job_statuses(qmp, job_id):
    statuses = []
    while not statuses or statuses[-1] != "concluded":
        e = qmp.wait_event("JOB_STATUS_CHANGE", timeout=60)
        assert e["data"]["id"] == job_id, e
        statuses.append(e["data"]["status"])
    return statuses


def test_blockdev_create_rbd(ceph, daemons):
    pool = ceph.new_pool()
    qmp = daemons.start().negotiated()
    location = {"pool": pool, "image": "new", "conf": ceph.conf}
    assert qmp.cmd("blockdev-create", {"job-id": "c1", "options": {
        "driver": "rbd", "location": location, "size": 24 * MiB,
        "cluster-size": 1 * MiB}}) == {"return": {}}
    assert job_statuses(qmp, "c1") == ["created", "running", "waiting", "pending", "concluded"]
    assert qmp.cmd("query-jobs")["return"] == [{
        "current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create",
        "id": "c1"}]
    info = json.loads(ceph.rbd("info", "--format", "json", f"{pool}/new"))
    assert (info["size"], info["object_size"]) == (24 * MiB, 1 * MiB)
    assert qmp.cmd("blockdev-add", {"driver": "rbd", "node-name": "n", **location}) == \
        {"return": {}}
    image = qmp.cmd("query-named-block-nodes")["return"][0]["image"]
    assert (image["virtual-size"], image["cluster-size"]) == (24 * MiB, 1 * MiB)

    reply = qmp.cmd("blockdev-create", {"job-id": "c0", "options": {
        "driver": "rbd", "location": location, "size": MiB, "encrypt": {"format": "luks"}}})
    assert reply == {"error": {"class": "GenericError",
                               "desc": "Parameter 'options.encrypt' is unexpected"}}

    # Errors fail the job, with QEMU's texts.
    for job_id, options, desc in [
            ("c2", {"location": location, "size": MiB}, "error rbd create: File exists"),
            ("c3", {"location": {**location, "image": "x"}, "size": MiB, "cluster-size": 3000},
             "obj size needs to be power of 2"),
            ("c4", {"location": {**location, "image": "x", "snapshot": "s"}, "size": MiB},
             "Can't use snapshot name for image creation")]:
        assert qmp.cmd("blockdev-create", {"job-id": job_id, "options": {
            "driver": "rbd", **options}}) == {"return": {}}
        assert job_statuses(qmp, job_id) == ["created", "running", "aborting", "concluded"]
        jobs = {j["id"]: j for j in qmp.cmd("query-jobs")["return"]}
        assert jobs[job_id]["error"] == desc


def raw_over_rbd(pool, image, conf=None, **rbd):
    """BlockdevOptions of a raw node r0 over an inline rbd child."""
    child = {"driver": "rbd", "pool": pool, "image": image, **rbd}
    if conf:
        child["conf"] = conf
    return {"driver": "raw", "node-name": "r0", "file": child}


def test_blockdev_add_inline_rbd_child_blocks_nothing_else(ceph, daemons, tmp_path,
                                                          silent_monitor):
    """A raw node over an inline rbd child: the child connects on the offload thread too, so
    while it waits on a monitor that does not answer, the other monitors answer and the
    exports serve; then the child's error is the add's, in QEMU's words."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "disk", 8 * MiB)
    d = RbdDaemon(daemons, ceph, tmp_path, pool, "disk")
    h = d.nbd()
    h.pwrite(b"\x5a" * 4096, 8192)
    opts = raw_over_rbd(pool, "disk", server=[{"host": "127.0.0.1",
                                               "port": str(silent_monitor.port)}],
                        **{"auth-client-required": ["none"], "__org.thinblk_op-timeout": 3})
    opts["node-name"] = "raw5"
    add_while_others_are_served(d, h, silent_monitor, opts, 8192, b"\x5a" * 4096)
    names = [n["node-name"] for n in d.qmp.cmd("query-named-block-nodes")["return"]]
    assert names == ["r0"]
    h.shutdown()


def test_blockdev_add_raw_over_inline_rbd_serves_data(ceph, daemons, tmp_path):
    """A raw node over an inline rbd child, added at run time, exported over NBD: what is
    written is in the image (rbd export), the child listed with a generated name."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "in", 8 * MiB)
    sock = str(tmp_path / "nbd.sock")
    d = daemons.start(args=["--nbd-server", f"addr.type=unix,addr.path={sock}"])
    qmp = d.negotiated()
    assert qmp.cmd("blockdev-add", raw_over_rbd(pool, "in", ceph.conf)) == {"return": {}}
    nodes = qmp.cmd("query-named-block-nodes")["return"]
    assert [(n["node-name"].startswith("#block"), n["drv"]) for n in nodes] == \
        [(False, "raw"), (True, "rbd")]
    assert nodes[0]["image"]["virtual-size"] == 8 * MiB
    assert qmp.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0",
                                        "name": "disk", "writable": True}) == {"return": {}}
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk?socket={sock}")
    data = random.randbytes(1 * MiB)
    h.pwrite(data, 3 * MiB)
    h.flush()
    assert h.pread(1 * MiB, 3 * MiB) == data
    h.shutdown()
    out = tmp_path / "export.img"
    ceph.rbd("export", f"{pool}/in", str(out))
    assert out.read_bytes()[3 * MiB:4 * MiB] == data
    assert qmp.cmd("block-export-del", {"id": "e0"}) == {"return": {}}


def test_blockdev_add_qcow2_with_inline_backing_over_inline_rbd(ceph, daemons, tmp_path):
    """qcow2 (on a file: rbd cannot hold an image) with an inline backing node, raw over an
    inline rbd child: the rbd child two levels down is prepared on the offload thread and
    handed to its node, opened read-only as a backing node; the data reads through."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "base", 4 * MiB)
    qemu_io(ceph.qemu_spec(pool, "base"), "write -P 0x61 1M 64k")
    img = tmp_path / "top.qcow2"
    r = subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), "4M"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    sock = str(tmp_path / "nbd.sock")
    qmp = daemons.start(args=["--nbd-server", f"addr.type=unix,addr.path={sock}"]).negotiated()
    reply = qmp.cmd("blockdev-add", {
        "driver": "qcow2", "node-name": "q0",
        "file": {"driver": "file", "filename": str(img)},
        "backing": {"driver": "raw", "node-name": "b0", "file": {
            "driver": "rbd", "pool": pool, "image": "base", "conf": ceph.conf}}})
    assert reply == {"return": {}}
    nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes",
                                                 {"flat": True})["return"]}
    assert nodes["q0"]["drv"] == "qcow2" and nodes["q0"]["ro"] is False
    assert nodes["b0"]["drv"] == "raw" and nodes["b0"]["ro"] is True
    assert sorted(n["drv"] for n in nodes.values()) == ["file", "qcow2", "raw", "rbd"]
    assert qmp.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0",
                                        "name": "disk"}) == {"return": {}}
    qemu_io(f"nbd+unix:///disk?socket={sock}", "read -P 0x61 1M 64k", "read -P 0 0 1M",
            read_only=True)
    assert qmp.cmd("block-export-del", {"id": "e0"}) == {"return": {}}


def raw_rbd_daemon(daemons, ceph, tmp_path, pool, image, **rbd):
    """thinblkd serving raw node r0 over an inline rbd child as NBD export "disk" (device
    disk0)."""
    sock = str(tmp_path / "nbd.sock")
    d = daemons.start(args=[
        "--blockdev", json.dumps(raw_over_rbd(pool, image, ceph.conf, **rbd)),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=disk0,node-name=r0,name=disk,writable=on"])
    return d, f"nbd+unix:///disk?socket={sock}"


def test_block_resize_raw_over_rbd(ceph, daemons, tmp_path):
    """block_resize of a raw node over rbd resizes the image (offloaded) and the raw node's
    size follows: query-block and the export see the new size."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "g", 8 * MiB)
    d, uri = raw_rbd_daemon(daemons, ceph, tmp_path, pool, "g")
    qmp = d.negotiated()
    assert qmp.cmd("block_resize", {"device": "disk0", "size": 12 * MiB}) == {"return": {}}
    info = json.loads(ceph.rbd("info", "--format", "json", f"{pool}/g"))
    assert info["size"] == 12 * MiB
    assert qmp.cmd("query-block")["return"][0]["inserted"]["image"]["virtual-size"] == \
        12 * MiB
    qemu_io(uri, "write -P 0x44 11M 1M", "read -P 0x44 11M 1M")
    # QEMU's refusal of a fixed-size raw node, over rbd too.
    assert qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "fx", "size": MiB,
                                    "file": {"driver": "rbd", "pool": pool, "image": "g",
                                             "conf": ceph.conf}}) == {"return": {}}
    assert qmp.cmd("block_resize", {"node-name": "fx", "size": 2 * MiB}) == \
        {"error": {"class": "GenericError", "desc": "Cannot resize fixed-size raw disks"}}


def test_block_resize_raw_over_rbd_blocks_nothing_else(ceph, daemons, tmp_path):
    """With the OSD gone, block_resize of a raw node over rbd waits on the offload thread:
    the other monitors answer meanwhile; its error comes after, the size unchanged."""
    pool = ceph.new_pool()
    ceph.create_image(pool, "g", 8 * MiB)
    d, uri = raw_rbd_daemon(daemons, ceph, tmp_path, pool, "g",
                            **{"__org.thinblk_op-timeout": 3})
    qmp = d.negotiated()
    waiting = d.negotiated()
    ceph.kill_osd()
    try:
        waiting.execute("block_resize", {"node-name": "r0", "size": 12 * MiB}, id="resize")
        assert qmp.cmd("query-status")["return"]["status"] == "running"
        assert no_reply_yet(waiting)
        reply = waiting.read_message(timeout=60)
        if "return" in reply:
            pytest.skip("rbd_resize did not need the OSD")  # as the rbd node's test
        assert reply["id"] == "resize"
        assert reply["error"]["desc"].startswith("failed to resize rbd image: "), reply
        assert qmp.cmd("query-block")["return"][0]["inserted"]["image"]["virtual-size"] == \
            8 * MiB
    finally:
        ceph.start_osd()
