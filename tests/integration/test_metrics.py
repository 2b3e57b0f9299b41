"""thinblkctl metrics against a real daemon: the output parsed strictly as Prometheus' text
exposition format (0.0.4), and its values checked after real NBD writes and an ENOSPC stop.
"""
import os
import subprocess

from conftest import BUILD_DIR
from prometheus import exposition, value
from test_error_policy import Disk

CTL = os.path.join(str(BUILD_DIR), "src", "ctl", "thinblkctl")
MiB = 1 << 20


def metrics(sock):
    r = subprocess.run([CTL, "-s", sock, "metrics"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stderr == "", r
    return exposition(r.stdout)


def test_parser_refuses_what_the_format_does_not_allow():
    ok = "# HELP a_total x\n# TYPE a_total counter\na_total{d=\"q\\\"\"} 1\n"
    assert exposition(ok) == {("a_total", frozenset({("d", 'q"')})): 1.0}
    for bad in ["# HELP a x\n# TYPE a counter\na 1\n",            # counter without _total
                "a 1\n",                                           # no TYPE
                "# HELP a x\n# TYPE a gauge\na{d=\"x} 1\n",        # bad quoting
                "# HELP a x\n# TYPE a gauge\na one\n",             # not a float
                "# HELP a x\n# TYPE a gauge\na 1\n# HELP b x\n# TYPE b gauge\nb 1\na 2\n",
                "# HELP a x\n# TYPE a gauge\n# TYPE a gauge\na 1\n"]:
        try:
            exposition(bad)
        except (AssertionError, ValueError):
            continue
        raise AssertionError(f"accepted: {bad!r}")


def test_metrics_after_writes_and_a_stop(daemons, tmp_path):
    disk = Disk(daemons, tmp_path, werror="enospc")
    h = disk.nbd()
    sock = disk.daemon.sockets[0]
    h.pwrite(b"\xab" * MiB, 3 * MiB)
    h.pwrite(b"\xcd" * (64 * 1024), 0)
    h.flush()
    m = metrics(sock)
    dev = {"device": "disk0", "node": "flt"}
    assert value(m, "thinblk_device_written_bytes_total", **dev) == MiB + 64 * 1024
    assert value(m, "thinblk_device_operations_total", op="write", **dev) == 2
    assert value(m, "thinblk_device_operations_total", op="flush", **dev) == 1
    assert value(m, "thinblk_device_failed_operations_total", op="write", **dev) == 0
    assert value(m, "thinblk_node_highest_written_offset_bytes", device="disk0",
                 node="f0") == 4 * MiB
    assert value(m, "thinblk_node_size_bytes", device="disk0", node="f0") == 16 * MiB
    assert value(m, "thinblk_node_allocated_bytes", device="disk0", node="f0") >= MiB
    assert value(m, "thinblk_device_io_status", status="ok", **dev) == 1
    assert value(m, "thinblk_running") == 1
    assert value(m, "thinblk_device_stops_total", **dev) == 0
    assert value(m, "thinblk_device_parked_requests_total", **dev) == 0
    assert value(m, "thinblk_device_longest_stall_seconds", **dev) == 0

    disk.fail("write", "ENOSPC")
    cookie = h.aio_pwrite(b"\x01" * 4096, 8 * MiB)
    disk.event("STOP")
    m = metrics(sock)
    assert value(m, "thinblk_device_io_status", status="nospace", **dev) == 1
    assert value(m, "thinblk_device_io_status", status="ok", **dev) == 0
    assert value(m, "thinblk_running") == 0
    assert value(m, "thinblk_run_state", status="io-error") == 1
    assert value(m, "thinblk_device_stops_total", **dev) == 1
    assert value(m, "thinblk_device_parked_requests_total", **dev) == 1
    assert value(m, "thinblk_device_held_requests_total", **dev) == 0
    stall = value(m, "thinblk_device_longest_stall_seconds", **dev)
    assert stall > 0

    assert disk.qmp.cmd("cont") == {"return": {}}
    while not h.aio_command_completed(cookie):
        h.poll(-1)
    m = metrics(sock)
    assert value(m, "thinblk_device_written_bytes_total", **dev) == MiB + 64 * 1024 + 4096
    assert value(m, "thinblk_device_stopped_seconds_total", **dev) > 0
    assert value(m, "thinblk_device_longest_stall_seconds", **dev) > stall
    assert value(m, "thinblk_run_state", status="running") == 1
    h.shutdown()
