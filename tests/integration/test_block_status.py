"""NBD block status of thinblkd against qemu-storage-daemon 7.2, on the same images.

Images are made by qemu-img and qemu-io (data, zero clusters, unallocated, compressed,
backing chains, preallocation) or are sparse files; both daemons serve the same --blockdev
options over NBD with allocation-depth=on, and the maps of base:allocation and
qemu:allocation-depth, read with python3-libnbd over the whole export and with adjacent equal
extents merged (the daemons may split differently), must be equal extent by extent. Copies
through thinblkd by nbdcopy and qemu-img convert must allocate no more than the source holds.
"""
import json
import os
import subprocess
import time

import pytest

from conftest import AGAINST_QEMU, TIMEOUT

pytestmark = pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd's NBD server")
nbd = pytest.importorskip("nbd")

MiB = 1 << 20
CONTEXTS = ("base:allocation", "qemu:allocation-depth")


def run(*argv):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          timeout=TIMEOUT * 3).stdout


def qemu_io(img, *cmds, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    run(*argv, img)


def qcow2(path, size, *cmds, backing=None, opts=()):
    argv = ["qemu-img", "create", "-f", "qcow2", *opts]
    if backing:
        argv += ["-b", str(backing), "-F", "qcow2" if str(backing).endswith("qcow2") else "raw"]
    run(*argv, path, size)
    if cmds:
        qemu_io(path, *cmds)
    return path


def file_node(path, name="f0"):
    return {"driver": "file", "node-name": name, "filename": str(path)}


def qcow2_nodes(path):
    return [file_node(path), {"driver": "qcow2", "node-name": "n0", "file": "f0"}]


def wait_for(path, proc):
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} not created"
        time.sleep(0.01)


class Server:
    """thinblkd or qemu-storage-daemon serving node `node` of `blockdevs` as export "disk"."""

    def __init__(self, daemons, program, blockdevs, node="n0", export_opts=""):
        self.sock = daemons.rundir() / "nbd.sock"
        argv = []
        for b in blockdevs:
            argv += ["--blockdev", json.dumps(b)]
        argv += ["--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                 "--export", f"type=nbd,id=e0,node-name={node},name=disk{export_opts}"]
        if program == "thinblkd":
            self.daemon = daemons.start_raw(argv, sockets=[self.sock])
            self.proc = None
        else:
            self.proc = subprocess.Popen([program, *argv], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
            wait_for(self.sock, self.proc)
        self.uri = f"nbd+unix:///disk?socket={self.sock}"

    def connect(self, contexts=CONTEXTS, structured=True):
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        for ctx in contexts:
            h.add_meta_context(ctx)
        h.connect_uri(self.uri)
        return h

    def close(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=TIMEOUT)


def merge(extents):
    out = []
    for length, flags in extents:
        if out and out[-1][1] == flags:
            out[-1][0] += length
        else:
            out.append([length, flags])
    return [tuple(e) for e in out]


def maps(server):
    """Each context's map of the whole export, merged, as {context: [(length, flags)]}."""
    h = server.connect()
    size = h.get_size()
    result = {}
    for ctx in CONTEXTS:
        assert h.can_meta_context(ctx), ctx
        extents, pos = [], 0
        while pos < size:
            got = []

            def cb(metacontext, offset, entries, err):
                if metacontext == ctx:
                    got.extend(zip(entries[0::2], entries[1::2]))
                return 0

            h.block_status(min(size - pos, 1 << 30), pos, cb)
            assert got and all(length > 0 for length, _ in got)
            extents += got
            pos += sum(length for length, _ in got)
        assert pos == size
        result[ctx] = merge(extents)
    h.shutdown()
    return result


def compare(daemons, blockdevs, node="n0"):
    """The maps of both daemons for these nodes; asserts they are equal, returns them."""
    got = {}
    for program in ("thinblkd", "qemu-storage-daemon"):
        s = Server(daemons, program, blockdevs, node, ",allocation-depth=on")
        try:
            got[program] = maps(s)
        finally:
            s.close()
    assert got["thinblkd"] == got["qemu-storage-daemon"]
    return got["thinblkd"]


HOLE_ZERO = 3


# ---- maps, extent by extent ----------------------------------------------------------------

def test_qcow2_data_zero_and_unallocated(daemons, tmp_path):
    img = qcow2(tmp_path / "a.qcow2", "64M", "write -P 1 0 1M", "write -z 4M 1M",
                "write -P 2 8M 64k", "write -z -u 12M 128k", "write -P 3 20M 192k",
                "write -z 20M 64k", "write -P 4 63M 1M")
    m = compare(daemons, qcow2_nodes(img))
    assert m["base:allocation"][:2] == [(MiB, 0), (7 * MiB, HOLE_ZERO)]
    assert m["qemu:allocation-depth"][:3] == [(MiB, 1), (3 * MiB, 0), (MiB, 1)]


def test_qcow2_compressed(daemons, tmp_path):
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
        for off in (0, 5 * MiB, 17 * MiB + 65536):
            f.seek(off)
            f.write(os.urandom(300 * 1024))
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
    m = compare(daemons, qcow2_nodes(img))
    assert (0, 0) != m["base:allocation"][0] and m["base:allocation"][0][1] == 0


def test_backing_chain_of_three_with_depth(daemons, tmp_path):
    base = qcow2(tmp_path / "base.qcow2", "32M", "write -P 1 0 4M", "write -z 8M 1M")
    mid = qcow2(tmp_path / "mid.qcow2", "48M", "write -P 2 2M 1M", "write -z 0 64k",
                "write -P 2 40M 1M", backing=base)
    top = qcow2(tmp_path / "top.qcow2", "64M", "write -P 3 3M 2M", "write -z 1M 512k",
                "write -P 3 60M 64k", backing=mid)
    m = compare(daemons, qcow2_nodes(top))
    depths = {flags for _, flags in m["qemu:allocation-depth"]}
    assert depths == {0, 1, 2, 3}, m


def test_raw_backing(daemons, tmp_path):
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
    top = qcow2(tmp_path / "top.qcow2", "32M", "write -P 3 0 64k", backing=base)
    compare(daemons, qcow2_nodes(top))


def sparse_file(path):
    run("truncate", "-s", "16M", path)
    run("dd", "if=/dev/urandom", f"of={path}", "bs=64k", "count=3", "seek=5", "conv=notrunc")
    run("dd", "if=/dev/urandom", f"of={path}", "bs=4k", "count=1", "seek=3000", "conv=notrunc")
    return path


def test_raw_sparse_file(daemons, tmp_path):
    img = sparse_file(tmp_path / "r.raw")
    m = compare(daemons, [file_node(img)], node="f0")
    assert m["base:allocation"][:2] == [(327680, HOLE_ZERO), (196608, 0)]


def test_raw_format_window(daemons, tmp_path):
    img = sparse_file(tmp_path / "r.raw")
    compare(daemons, [file_node(img), {"driver": "raw", "node-name": "n0", "file": "f0",
                                       "offset": 393216, "size": 8 * MiB}])


@pytest.mark.parametrize("prealloc", ["metadata", "falloc"])
def test_qcow2_preallocated(daemons, tmp_path, prealloc):
    img = qcow2(tmp_path / "p.qcow2", "16M", "write -P 1 1M 64k", "write -z 4M 64k",
                opts=("-o", f"preallocation={prealloc}"))
    m = compare(daemons, qcow2_nodes(img))
    if prealloc == "metadata":
        # Clusters whose host range is a hole in the file read as zeroes, still allocated.
        assert (MiB, 2) == m["base:allocation"][0]


# ---- copies through thinblkd -------------------------------------------------------------

def thin_image(tmp_path):
    """A 1 GiB qcow2 holding a few MiB scattered."""
    cmds = [f"write -P {i + 1} {off}M 1M" for i, off in enumerate((0, 100, 333, 700, 1023))]
    return qcow2(tmp_path / "thin.qcow2", "1G", *cmds)


def allocated(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("tool", ["nbdcopy", "qemu-img"])
def test_copy_of_thin_image_stays_thin(daemons, tmp_path, tool):
    img = thin_image(tmp_path)
    dst = tmp_path / "dst.raw"
    run("truncate", "-s", "1G", dst)
    s = Server(daemons, "thinblkd", qcow2_nodes(img))
    if tool == "nbdcopy":
        run("nbdcopy", s.uri, dst)
    else:
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", s.uri, dst)
    assert allocated(dst) <= 5 * MiB + 64 * 1024, allocated(dst)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, dst)


# ---- the protocol ----------------------------------------------------------------------------

def test_req_one_gives_one_merged_extent_per_context(daemons, tmp_path):
    img = qcow2(tmp_path / "a.qcow2", "16M", "write -P 1 0 1M", "write -P 1 1M 1M",
                "write -z 2M 1M")
    s = Server(daemons, "thinblkd", qcow2_nodes(img), export_opts=",allocation-depth=on")
    h = s.connect()
    got = {}
    h.block_status(16 * MiB, 0, lambda ctx, off, ents, err: got.setdefault(ctx, ents),
                   nbd.CMD_FLAG_REQ_ONE)
    assert got == {"base:allocation": [2 * MiB, 0], "qemu:allocation-depth": [3 * MiB, 1]}


def test_allocation_depth_only_with_the_export_option(daemons, tmp_path):
    img = qcow2(tmp_path / "a.qcow2", "16M")
    s = Server(daemons, "thinblkd", qcow2_nodes(img))
    h = s.connect()
    assert h.can_meta_context("base:allocation")
    assert not h.can_meta_context("qemu:allocation-depth")


def test_without_structured_replies_no_block_status(daemons, tmp_path):
    img = qcow2(tmp_path / "a.qcow2", "16M")
    s = Server(daemons, "thinblkd", qcow2_nodes(img), export_opts=",allocation-depth=on")
    h = s.connect(structured=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_meta_context("base:allocation")
    assert h.pread(4096, 0) == bytes(4096)


def test_fault_in_block_status_is_the_clients_error(daemons, tmp_path):
    img = qcow2(tmp_path / "a.qcow2", "16M", "write -P 1 0 1M")
    nodes = qcow2_nodes(img) + [{"driver": "fault", "node-name": "flt", "file": "n0",
                                 "rules": [{"op": "block-status", "errno": "EIO"}]}]
    s = Server(daemons, "thinblkd", nodes, node="flt", export_opts=",allocation-depth=on")
    h = s.connect()
    with pytest.raises(nbd.Error) as e:
        h.block_status(MiB, 0, lambda *a: 0)
    assert e.value.errno in ("EIO", 5)
    assert h.pread(4096, 0) == b"\x01" * 4096   # the connection goes on


# ---- transmission flags ----------------------------------------------------------------------

@pytest.mark.parametrize("export_opts", [",writable=on", ",writable=off"])
@pytest.mark.parametrize("discard", ["ignore", "unmap"])
def test_transmission_flags_as_qemu_storage_daemon(daemons, tmp_path, export_opts, discard):
    """What the export says it can do, for the same node options (NBD_CMD_CACHE aside: not
    served)."""
    img = qcow2(tmp_path / "a.qcow2", "16M")
    nodes = [dict(file_node(img), discard=discard),
             {"driver": "qcow2", "node-name": "n0", "file": "f0", "discard": discard}]
    flags = {}
    for program in ("thinblkd", "qemu-storage-daemon"):
        s = Server(daemons, program, nodes, export_opts=export_opts)
        try:
            h = s.connect()
            flags[program] = {name: getattr(h, name)() for name in (
                "is_read_only", "can_zero", "can_fast_zero", "can_trim", "can_flush",
                "can_fua", "can_df", "can_multi_conn")}
            h.shutdown()
        finally:
            s.close()
    assert flags["thinblkd"] == flags["qemu-storage-daemon"]


@pytest.mark.parametrize("export_opts", ["", ",allocation-depth=on"])
def test_meta_context_answers_as_qemu_storage_daemon(daemons, tmp_path, export_opts):
    """The context names LIST and SET answer for each query, as qemu-storage-daemon's."""
    from test_nbd_protocol import (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
                                   OPT_STRUCTURED_REPLY, REP_META_CONTEXT, RawNBD)
    img = qcow2(tmp_path / "a.qcow2", "16M")
    queries = ([], ["qemu:"], ["base:"], ["qemu:allocation-depth"], ["base:allocation"],
               ["qemu:allocation-depth", "base:", "qemu:nosuch", "x:y"])
    answers = {}
    for program in ("thinblkd", "qemu-storage-daemon"):
        s = Server(daemons, program, qcow2_nodes(img), export_opts=export_opts)
        try:
            c = RawNBD(s.sock).greeting()
            c.option(OPT_STRUCTURED_REPLY)
            answers[program] = [
                sorted(data[4:] for rtype, data in c.option(opt, RawNBD.meta_data("disk", q))
                       if rtype == REP_META_CONTEXT)
                for opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT) for q in queries]
            c.close()
        finally:
            s.close()
    assert answers["thinblkd"] == answers["qemu-storage-daemon"]
    assert answers["thinblkd"][0] == sorted([b"base:allocation"] + (
        [b"qemu:allocation-depth"] if export_opts else []))
