"""blockdev-create and the jobs it makes (query-jobs, job-dismiss, job-finalize, job-cancel,
job-complete), checked against what QEMU 7.2's qemu-storage-daemon does: the event sequences,
query-jobs entries and error texts below were taken from it. Images are then checked with
qemu-img (check, info) and served by thinblkd itself over NBD.

Where QEMU checks an option inside the job, its error fails the job (aborting, concluded, the
text in query-jobs "error"); schema errors fail the command. Events may come before or after
the command's return (QEMU sends a job's early failure before it), so they are collected in
order whatever side of the return they fall on.
"""
import json
import os
import subprocess

import nbd
import pytest

from conftest import thinblk_only, without_timestamp

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

pytestmark = thinblk_only

SUCCESS = ["created", "running", "waiting", "pending", "concluded"]
FAILURE = ["created", "running", "aborting", "concluded"]


def ok(reply):
    assert reply == {"return": {}}, reply


def error(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


def job_events(qmp, job_id):
    """The JOB_STATUS_CHANGE statuses of job_id up to "concluded", each event's exact shape
    checked."""
    statuses = []
    while not statuses or statuses[-1] != "concluded":
        e = without_timestamp(qmp.wait_event("JOB_STATUS_CHANGE"))
        assert set(e) == {"event", "data"} and set(e["data"]) == {"status", "id"}, e
        assert e["data"]["id"] == job_id, e
        statuses.append(e["data"]["status"])
    return statuses


def create(qmp, job_id, options):
    ok(qmp.cmd("blockdev-create", {"job-id": job_id, "options": options}))
    return job_events(qmp, job_id)


def job_info(job_id, error=None):
    info = {"current-progress": 1, "status": "concluded", "total-progress": 1,
            "type": "create", "id": job_id}
    if error is not None:
        info["error"] = error
    return info


def dismiss(qmp, job_id):
    ok(qmp.cmd("job-dismiss", {"id": job_id}))
    e = without_timestamp(qmp.wait_event("JOB_STATUS_CHANGE"))
    assert e == {"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": job_id}}


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def img_info(path):
    return json.loads(qemu_img("info", "-U", "--output=json", path))


def assert_check_clean(path):
    out = qemu_img("check", path)
    assert "No errors were found on the image." in out, out


def create_file(qmp, path, size, job_id="jf"):
    assert create(qmp, job_id, {"driver": "file", "filename": str(path), "size": size}) == \
        SUCCESS
    dismiss(qmp, job_id)


def add_file_node(qmp, path, name="f0"):
    ok(qmp.cmd("blockdev-add", {"driver": "file", "node-name": name, "filename": str(path)}))


@pytest.fixture
def qmp(daemons):
    return daemons.start().negotiated()


# ---- the job ------------------------------------------------------------------------------

def test_file_job_events_query_and_dismiss(qmp, tmp_path):
    path = tmp_path / "a.raw"
    assert create(qmp, "j1", {"driver": "file", "filename": str(path), "size": 3 * MiB}) == \
        SUCCESS
    assert os.path.getsize(path) == 3 * MiB
    assert os.stat(path).st_blocks == 0  # preallocation off: nothing allocated
    assert qmp.cmd("query-jobs") == {"return": [job_info("j1")]}
    # A concluded job takes dismiss only; QEMU's texts.
    assert qmp.cmd("job-finalize", {"id": "j1"}) == error(
        "Job 'j1' in state 'concluded' cannot accept command verb 'finalize'")
    assert qmp.cmd("job-cancel", {"id": "j1"}) == error(
        "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'")
    assert qmp.cmd("job-complete", {"id": "j1"}) == error(
        "Job 'j1' in state 'concluded' cannot accept command verb 'complete'")
    dismiss(qmp, "j1")
    assert qmp.cmd("query-jobs") == {"return": []}
    for verb in ("job-dismiss", "job-finalize", "job-cancel", "job-complete"):
        assert qmp.cmd(verb, {"id": "j1"}) == error("Job not found")
    assert qmp.take_events() == []


def test_file_create_empties_an_existing_file(qmp, tmp_path):
    path = tmp_path / "old.raw"
    path.write_bytes(b"\xab" * (2 * MiB))
    create_file(qmp, path, MiB)
    assert path.read_bytes() == bytes(MiB)


def test_query_jobs_newest_first_with_errors(qmp, tmp_path):
    create(qmp, "ok1", {"driver": "file", "filename": str(tmp_path / "x"), "size": 0})
    missing = tmp_path / "nodir" / "y"
    assert create(qmp, "bad1", {"driver": "file", "filename": str(missing), "size": 0}) == \
        FAILURE
    assert qmp.cmd("query-jobs") == {"return": [
        job_info("bad1", f"Could not create '{missing}': No such file or directory"),
        job_info("ok1")]}


def test_job_id_errors(qmp, tmp_path):
    opts = {"driver": "file", "filename": str(tmp_path / "x"), "size": 0}
    create(qmp, "j1", opts)
    assert qmp.cmd("blockdev-create", {"job-id": "j1", "options": opts}) == error(
        "Job ID 'j1' already in use")
    assert qmp.cmd("blockdev-create", {"job-id": "1bad", "options": opts}) == error(
        "Invalid job ID '1bad'")
    assert qmp.cmd("query-jobs") == {"return": [job_info("j1")]}
    assert qmp.take_events() == []
    dismiss(qmp, "j1")
    assert create(qmp, "j1", opts) == SUCCESS  # a dismissed id is free again


@pytest.mark.parametrize("options, desc", [
    ({}, "Parameter 'options.driver' is missing"),
    ({"driver": 5}, "Invalid parameter type for 'options.driver', expected: string"),
    ({"driver": "nope"}, "Parameter 'driver' does not accept value 'nope'"),
    ({"driver": "raw"}, "Driver does not support blockdev-create"),
    ({"driver": "nbd", "size": 1}, "Parameter 'options.size' is unexpected"),
    ({"driver": "file", "filename": "/x"}, "Parameter 'options.size' is missing"),
    ({"driver": "file", "filename": 5, "size": 1},
     "Invalid parameter type for 'options.filename', expected: string"),
    ({"driver": "file", "filename": "/x", "size": "x"}, "Parameter 'options.size' expects uint64"),
    ({"driver": "file", "filename": "/x", "size": 1, "extra": 1},
     "Parameter 'options.extra' is unexpected"),
    ({"driver": "file", "filename": "/x", "size": 1, "preallocation": "bogus"},
     "Parameter 'preallocation' does not accept value 'bogus'"),
    ({"driver": "qcow2", "size": MiB}, "Parameter 'options.file' is missing"),
    ({"driver": "qcow2", "file": "f"}, "Parameter 'options.size' is missing"),
    ({"driver": "qcow2", "file": 5, "size": MiB},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ({"driver": "qcow2", "file": "f", "size": 1.5}, "Parameter 'options.size' expects uint64"),
    ({"driver": "qcow2", "file": "f", "size": MiB, "version": "v4"},
     "Parameter 'version' does not accept value 'v4'"),
    ({"driver": "qcow2", "file": "f", "size": MiB, "refcount-bits": "16"},
     "Invalid parameter type for 'options.refcount-bits', expected: integer"),
    ({"driver": "qcow2", "file": "f", "size": MiB, "lazy-refcounts": "yes"},
     "Invalid parameter type for 'options.lazy-refcounts', expected: boolean"),
    ({"driver": "qcow2", "file": "f", "size": MiB, "compression-type": "lz4"},
     "Parameter 'compression-type' does not accept value 'lz4'"),
    ({"driver": "qcow2", "file": "f", "size": MiB, "backing-file": "x", "backing-fmt": "nope"},
     "Parameter 'backing-fmt' does not accept value 'nope'"),
])
def test_schema_errors_fail_the_command(qmp, options, desc):
    assert qmp.cmd("blockdev-create", {"job-id": "j", "options": options}) == error(desc)
    assert qmp.cmd("query-jobs") == {"return": []}
    assert qmp.take_events() == []


def test_command_argument_errors(qmp):
    assert qmp.cmd("blockdev-create", {"job-id": "j"}) == error("Parameter 'options' is missing")
    assert qmp.cmd("blockdev-create", {"options": {"driver": "file"}}) == error(
        "Parameter 'job-id' is missing")
    assert qmp.cmd("blockdev-create", {"job-id": "j", "options": 5}) == error(
        "Invalid parameter type for 'options', expected: object")
    assert qmp.cmd("job-dismiss", {}) == error("Parameter 'id' is missing")


def test_commands_listed_in_qemu_order(qmp):
    names = [c["name"] for c in qmp.cmd("query-commands")["return"]]
    ours = ["query-jobs", "job-finalize", "job-dismiss", "job-complete", "job-cancel",
            "blockdev-create"]
    assert [n for n in names if n in ours] == ours


# ---- option values QEMU checks in the job -------------------------------------------------

@pytest.mark.parametrize("extra, desc", [
    ({"cluster-size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster-size": 256}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster-size": 4 * MiB}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"file": "nonode"}, "Cannot find device='nonode' nor node-name='nonode'"),
    ({"refcount-bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": 128}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": 0}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"version": "v2", "refcount-bits": 8}, "Different refcount widths than 16 bits require "
     "compatibility level 1.1 or above (use version=v3 or greater)"),
    ({"version": "v2", "lazy-refcounts": True}, "Lazy refcounts only supported with "
     "compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"backing-fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"data-file-raw": True}, "data-file-raw requires data-file"),
    ({"backing-file": "/x", "preallocation": "metadata"}, "Backing file and preallocation can "
     "only be used at the same time if extended_l2 is on"),
    ({"extended-l2": True, "cluster-size": 4096},
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ({"version": "v2", "extended-l2": True}, "Extended L2 entries are only supported with "
     "compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"version": "v2", "compression-type": "zstd"}, "Non-zlib compression type is only "
     "supported with compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"version": "v2", "data-file": "f0"}, "External data files are only supported with "
     "compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"size": 1 << 40, "cluster-size": 512},
     "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"size": (1 << 63) - 512}, "Could not resize image: offset(9223372036854775296) exceeds "
     "maximum(9223372035781033984)"),
    # What thinblk does not do, worded as QEMU words its own limits.
    ({"preallocation": "metadata"}, "Unsupported preallocation mode 'metadata'"),
    ({"preallocation": "full"}, "Unsupported preallocation mode 'full'"),
    ({"compression-type": "zstd"}, "Unknown compression type"),
    ({"extended-l2": True}, "Extended L2 entries are not supported"),
    ({"data-file": "f0"}, "External data files are not supported"),
    ({"encrypt": {"format": "luks", "key-secret": "s"}},
     "Encrypted qcow2 images are not supported"),
])
def test_qcow2_value_errors_fail_the_job(qmp, tmp_path, extra, desc):
    path = tmp_path / "q.img"
    path.write_bytes(b"")
    add_file_node(qmp, path)
    assert create(qmp, "j", {"driver": "qcow2", "file": "f0", "size": MiB, **extra}) == FAILURE
    assert qmp.cmd("query-jobs") == {"return": [job_info("j", desc)]}
    assert path.read_bytes() == b""  # nothing written


def test_file_preallocation_other_than_off(qmp, tmp_path):
    path = tmp_path / "p.raw"
    assert create(qmp, "j", {"driver": "file", "filename": str(path), "size": MiB,
                             "preallocation": "full"}) == FAILURE
    assert qmp.cmd("query-jobs") == {"return": [job_info(
        "j", "Unsupported preallocation mode: full")]}
    assert not path.exists()


def test_file_size_past_int64(qmp, tmp_path):
    path = tmp_path / "big.raw"
    assert create(qmp, "j", {"driver": "file", "filename": str(path), "size": -1}) == FAILURE
    assert qmp.cmd("query-jobs") == {"return": [job_info(
        "j", "Could not resize file: Invalid argument")]}


def test_qcow2_on_read_only_node(qmp, tmp_path):
    path = tmp_path / "q.img"
    path.write_bytes(b"")
    ok(qmp.cmd("blockdev-add", {"driver": "file", "node-name": "ro", "filename": str(path),
                                "read-only": True}))
    assert create(qmp, "j", {"driver": "qcow2", "file": "ro", "size": MiB}) == FAILURE
    assert qmp.cmd("query-jobs") == {"return": [job_info("j", "Block node is read-only")]}


def test_qcow2_write_error_fails_the_job(qmp, tmp_path):
    path = tmp_path / "q.img"
    path.write_bytes(b"")
    add_file_node(qmp, path)
    ok(qmp.cmd("blockdev-add", {"driver": "fault", "node-name": "flt", "file": "f0",
                                "rules": [{"op": "write", "errno": "ENOSPC"}]}))
    assert create(qmp, "j", {"driver": "qcow2", "file": "flt", "size": MiB}) == FAILURE
    # QEMU writes the header first, and says so on a full file system (its text).
    assert qmp.cmd("query-jobs") == {"return": [job_info(
        "j", "Could not write qcow2 header: No space left on device")]}
    # The node is not left in use by the job.
    ok(qmp.cmd("blockdev-del", {"node-name": "flt"}))
    ok(qmp.cmd("blockdev-del", {"node-name": "f0"}))


# ---- the images ---------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expect", [
    ({}, {"cluster-size": 64 * KiB, "compat": "1.1", "refcount-bits": 16, "lazy": False}),
    ({"version": "v2", "cluster-size": 512},
     {"cluster-size": 512, "compat": "0.10", "refcount-bits": 16, "lazy": False}),
    ({"version": "v3", "cluster-size": 2 * MiB, "refcount-bits": 1},
     {"cluster-size": 2 * MiB, "compat": "1.1", "refcount-bits": 1, "lazy": False}),
    ({"cluster-size": 4096, "refcount-bits": 64, "lazy-refcounts": True},
     {"cluster-size": 4096, "compat": "1.1", "refcount-bits": 64, "lazy": True}),
    ({"cluster-size": 512, "refcount-bits": 2, "lazy-refcounts": False},
     {"cluster-size": 512, "compat": "1.1", "refcount-bits": 2, "lazy": False}),
], ids=["defaults", "v2-512", "2M-refcount1", "4k-refcount64-lazy", "512-refcount2"])
def test_qcow2_image_as_qemu_img_sees_it(qmp, tmp_path, extra, expect):
    path = tmp_path / "q.qcow2"
    size = 3 * GiB + 512
    create_file(qmp, path, 0)
    add_file_node(qmp, path)
    assert create(qmp, "j", {"driver": "qcow2", "file": "f0", "size": size, **extra}) == SUCCESS
    assert qmp.cmd("query-jobs") == {"return": [job_info("j")]}
    # The file node's size follows what was written, as QEMU refreshes it.
    f0 = qmp.cmd("query-named-block-nodes")["return"][0]
    assert f0["image"]["virtual-size"] == os.path.getsize(path) > 0
    assert_check_clean(path)
    info = img_info(path)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == \
        ("qcow2", size, expect["cluster-size"])
    data = info["format-specific"]["data"]
    assert data["compat"] == expect["compat"]
    if expect["compat"] == "1.1":
        assert (data["refcount-bits"], data["lazy-refcounts"], data["compression-type"],
                data["extended-l2"], data["corrupt"]) == \
            (expect["refcount-bits"], expect["lazy"], "zlib", False, False)
    assert "backing-filename" not in info


def test_qcow2_with_backing_file(qmp, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * MiB)
    path = tmp_path / "over.qcow2"
    create_file(qmp, path, 0)
    add_file_node(qmp, path)
    assert create(qmp, "j", {"driver": "qcow2", "file": "f0", "size": MiB,
                             "backing-file": str(base), "backing-fmt": "raw"}) == SUCCESS
    assert_check_clean(path)
    info = img_info(path)
    assert (info["backing-filename"], info["full-backing-filename"],
            info["backing-filename-format"]) == (str(base), str(base), "raw")
    # The backing file shows through: qemu-io reads its bytes from the new image.
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_qcow2_over_inline_file_node_and_old_contents(qmp, tmp_path):
    """file given as options (a node made for the job only); the file held other bytes."""
    path = tmp_path / "q.qcow2"
    path.write_bytes(os.urandom(3 * MiB))
    assert create(qmp, "j", {"driver": "qcow2", "size": 16 * MiB,
                             "file": {"driver": "file", "filename": str(path)}}) == SUCCESS
    assert qmp.cmd("query-named-block-nodes") == {"return": []}  # gone with the job
    assert_check_clean(path)
    assert img_info(path)["virtual-size"] == 16 * MiB
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 16M", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_create_open_export_write_read(daemons, tmp_path):
    """The whole management flow without qemu-img: create the file, format it, open it,
    export it, write through NBD; qemu-img then finds the data and a clean image."""
    path = tmp_path / "disk.qcow2"
    sock = daemons.rundir() / "nbd.sock"
    d = daemons.start()
    qmp = d.negotiated()
    create_file(qmp, path, 0)
    add_file_node(qmp, path)
    assert create(qmp, "fmt", {"driver": "qcow2", "file": "f0", "size": 64 * MiB,
                               "cluster-size": 65536}) == SUCCESS
    dismiss(qmp, "fmt")
    ok(qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"}))
    ok(qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}))
    ok(qmp.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0",
                                    "name": "disk", "writable": True}))
    uri = f"nbd+unix:///disk?socket={sock}"
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 2M",
                        "-c", "write -P 0xcd 60M 512", uri], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == 64 * MiB
    assert h.pread(2 * MiB, 1 * MiB) == b"\xab" * (2 * MiB)
    assert h.pread(512, 60 * MiB) == b"\xcd" * 512
    assert h.pread(MiB, 0) == bytes(MiB)
    h.shutdown()
    problems = d.shutdown()
    assert problems == [], problems
    assert_check_clean(path)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 1M 2M",
                        "-c", "read -P 0xcd 60M 512", "-c", "read -P 0 0 1M", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
