"""thinblk-agent's rbd method against a real (throwaway, single-node) Ceph cluster: thinblkd
serves an RBD image over NBD, qemu-io writes more than the pool's quota, the agent raises the
quota ahead of the writes and, if the daemon stopped on EDQUOT all the same (the quota is soft:
the monitor flags the pool full seconds after its usage passed it), resumes it once the
monitor no longer flags the pool full. At its cap, the daemon stays stopped.

Waits are for a condition (a line in the agent's log, a run state, the monitor's flag) up to a
deadline.
"""
import json
import os
import shutil

import pytest

from ceph import ceph  # noqa: F401  (the session's cluster fixture)
from test_agent import AGENT, agents, finish, wait_for  # noqa: F401  (agents: a fixture)

# What waits on the cluster (a write through the quota, the monitor clearing a pool's full
# flag, ~4.5 s each time here) is bounded generously: a sanitizer build on a loaded machine
# runs far slower, and these bounds only say when to give up.
CLUSTER_TIMEOUT = 180

MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io"),
    pytest.mark.skipif(os.environ.get("THINBLK_TEST_AGAINST_QEMU", "") == "1",
                       reason="thinblk-agent against thinblkd"),
]


class RbdServed:
    """thinblkd serving POOL/IMAGE as the NBD export (and device) disk0, node r0."""

    def __init__(self, daemons, ceph, pool, image, group=None):
        rundir = daemons.rundir()
        self.group = group
        self.mon = rundir / "mon0.sock"
        self.nbd = rundir / "nbd.sock"
        self.d = daemons.start_raw([
            "--chardev", f"socket,id=m0,path={self.mon},server=on,wait=off",
            "--monitor", "chardev=m0",
            "--blockdev", f"driver=rbd,node-name=r0,pool={pool},image={image},conf={ceph.conf}",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
            *(["--group", group] if group else []),
            "--export", "type=nbd,id=disk0,node-name=r0,name=disk0,writable=on"
            + (f",__org.thinblk_group={group}" if group else "")],
            [self.mon], rundir=rundir)
        self.qmp = self.d.negotiated()
        self.uri = f"nbd+unix:///disk0?socket={self.nbd}"

    def status(self):
        """The run state, or the state of the device's stop group if it is in one."""
        if self.group:
            groups = self.qmp.cmd("__org.thinblk_query-groups")["return"]
            return next(g["status"] for g in groups if g["name"] == self.group)
        return self.qmp.cmd("query-status")["return"]["status"]

    def write(self, pattern, offset, length, step=4 * MiB):
        import subprocess
        from conftest import _die_with_parent
        cmds = []
        for off in range(offset, offset + length, step):
            cmds += ["-c", f"write -P {pattern} {off} {min(step, offset + length - off)}"]
        return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, self.uri],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_die_with_parent)

    def read_back(self, pattern, offset, length):
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            for off in range(offset, offset + length, 8 * MiB):
                n = min(8 * MiB, offset + length - off)
                assert h.pread(n, off) == bytes([pattern]) * n, f"mismatch at {off}"
        finally:
            h.shutdown()


def quota(ceph, pool):
    return json.loads(ceph.cli("osd", "pool", "get-quota", pool, "--format",
                               "json"))["quota_max_bytes"]


def test_pool_stat_child(ceph):
    """The probe the agent runs: the monitor's usage, quota and full flag, as JSON."""
    import subprocess
    pool = ceph.new_pool(quota_bytes=64 * MiB)
    r = subprocess.run([str(AGENT), "--rbd-pool-stat", ceph.conf, pool], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["quota"] == 64 * MiB and st["full"] is False and 0 <= st["used"] < 64 * MiB
    r = subprocess.run([str(AGENT), "--rbd-pool-stat", ceph.conf, "nosuchpool"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "nosuchpool" in r.stderr, r.stderr


def test_agent_raises_pool_quota(ceph, daemons, agents):
    """A 160 MiB write into a pool with a 64 MiB quota completes: the agent raised the quota
    ahead of it or, if the daemon stopped on EDQUOT, after it, and resumed the daemon."""
    pool = ceph.new_pool(quota_bytes=64 * MiB)
    ceph.create_image(pool, "disk", 256 * MiB)
    s = RbdServed(daemons, ceph, pool, "disk")
    a = agents("-s", s.mon, "-m", "rbd", "--chunk", "64M", "--watermark", "32M",
               "--cap", "1G", "--poll-interval", "500ms")
    a.wait_log(r"disk0: pool %s: usage .*, quota 64 MiB \(watermark 32 MiB\)" % pool)
    finish(s.write(0x5a, 0, 160 * MiB), CLUSTER_TIMEOUT)
    # The quota is soft and the usage reaches the monitor late: the write may be done before
    # the agent has seen all of it; it raises the quota past usage + watermark soon after.
    wait_for(lambda: quota(ceph, pool) >= 160 * MiB + 32 * MiB, "the quota raised past the "
             "write and the watermark", timeout=CLUSTER_TIMEOUT)
    # At least one raise succeeded. (Not necessarily the first: under load the usage can pass
    # a raise's target before the raise lands; that one fails, "it stays full", and the next
    # one, from a fresh probe, goes past it.)
    assert a.lines(r"disk0: extended the quota of pool %s from \S+ \S+ to" % pool), a.log()
    # Whether it stopped or not depends on timing; that it runs at the end does not.
    wait_for(lambda: s.status() == "running", "the daemon running", CLUSTER_TIMEOUT)
    if a.lines(r"stopped on no space"):
        assert a.lines(r"daemon default: resuming \(cont\)"), a.log()
    s.read_back(0x5a, 0, 160 * MiB)
    a.stop()


def fill_and_stop(ceph, s, pool, pattern, length, more):
    """Write `length` bytes (past the quota: it is soft), wait until the monitor flags the
    pool full, then start a writer of `more` bytes after them, which the daemon parks when it
    stops on EDQUOT. Returns that writer."""
    finish(s.write(pattern, 0, length), CLUSTER_TIMEOUT)
    ceph.wait_full(pool)
    w = s.write(pattern, length, more)
    wait_for(lambda: s.status() == "io-error", "the daemon to stop on EDQUOT",
             timeout=CLUSTER_TIMEOUT)
    assert w.poll() is None   # the writer waits, it got no error
    return w


def test_agent_resumes_after_edquot(ceph, daemons, agents):
    """The daemon stopped on EDQUOT before the agent started: it raises the quota, waits for
    the monitor to clear the pool's full flag, and only then sends cont."""
    pool = ceph.new_pool(quota_bytes=32 * MiB)
    ceph.create_image(pool, "disk", 256 * MiB)
    s = RbdServed(daemons, ceph, pool, "disk")
    w = fill_and_stop(ceph, s, pool, 0x33, 64 * MiB, 32 * MiB)
    a = agents("-s", s.mon, "-m", "rbd", "--chunk", "128M", "--watermark", "16M",
               "--cap", "1G", "--poll-interval", "500ms")
    a.wait_log(r"daemon default: resuming \(cont\) after [0-9.]+ s stopped on ENOSPC",
               timeout=CLUSTER_TIMEOUT)
    finish(w, CLUSTER_TIMEOUT)
    ext = a.lines(r"disk0: extended the quota of pool")
    assert ext and "stopped on no space (EDQUOT)" in ext[0], a.log()
    assert quota(ceph, pool) >= 160 * MiB
    # The cont came after the monitor had cleared the flag: the retried write went through
    # (the writer finished without an error) and the daemon runs.
    assert not ceph.is_full(pool)
    wait_for(lambda: s.status() == "running", "the daemon running", CLUSTER_TIMEOUT)
    s.read_back(0x33, 0, 96 * MiB)
    a.stop()


def test_agent_resumes_a_stop_group(ceph, daemons, agents):
    """In a stop group, EDQUOT stops the group alone; the agent raises the quota and resumes
    the group with __org.thinblk_group-cont once the monitor cleared the pool's flag."""
    pool = ceph.new_pool(quota_bytes=32 * MiB)
    ceph.create_image(pool, "disk", 256 * MiB)
    s = RbdServed(daemons, ceph, pool, "disk", group="vm1")
    w = fill_and_stop(ceph, s, pool, 0x44, 64 * MiB, 32 * MiB)
    assert s.qmp.cmd("query-status")["return"]["status"] == "running"
    a = agents("-s", s.mon, "-m", "rbd", "--chunk", "128M", "--watermark", "16M",
               "--cap", "1G", "--poll-interval", "500ms")
    a.wait_log(r"daemon default: group vm1: resuming \(__org.thinblk_group-cont\) after "
               r"[0-9.]+ s stopped on ENOSPC", timeout=CLUSTER_TIMEOUT)
    finish(w, CLUSTER_TIMEOUT)
    assert not ceph.is_full(pool)
    wait_for(lambda: s.status() == "running", "the group running", CLUSTER_TIMEOUT)
    s.read_back(0x44, 0, 96 * MiB)
    a.stop()


def test_agent_cap_keeps_it_stopped(ceph, daemons, agents):
    """At its cap the quota is not raised further: the daemon stays in io-error and the agent
    says why, once."""
    pool = ceph.new_pool(quota_bytes=32 * MiB)
    ceph.create_image(pool, "disk", 256 * MiB)
    s = RbdServed(daemons, ceph, pool, "disk")
    a = agents("-s", s.mon, "-m", "rbd", "--chunk", "64M", "--watermark", "8M",
               "--cap", "48M", "--poll-interval", "500ms")
    a.wait_log(r"disk0: pool %s: usage" % pool)
    # The agent raises the quota to its cap, 48 MiB; the pool fills past it all the same.
    w = fill_and_stop(ceph, s, pool, 0x77, 96 * MiB, 32 * MiB)
    a.wait_log(r"disk0: stopped on no space \(EDQUOT\) at its cap: the quota of pool %s is "
               r"48 MiB, cap 48 MiB" % pool, timeout=CLUSTER_TIMEOUT)
    assert s.status() == "io-error"
    a.wait_reconciles(4)   # it keeps looking, and does nothing more
    assert s.status() == "io-error"
    assert quota(ceph, pool) == 48 * MiB
    assert len(a.lines(r"stopped on no space \(EDQUOT\) at its cap")) == 1, a.log()
    assert w.poll() is None   # the writer waits, it got no error
    # Let it finish by hand: lift the quota, wait for the monitor, cont.
    ceph.set_quota(pool, 0)
    ceph.wait_full(pool, full=False)
    s.qmp.cmd("cont")
    finish(w, CLUSTER_TIMEOUT)
    s.read_back(0x77, 0, 128 * MiB)
    a.stop()


def test_agent_pool_it_cannot_read(ceph, daemons, agents):
    """A pool the monitor does not know (--volume names it): the probe's failure, with Ceph's
    message, is logged once, and the agent goes on looking."""
    pool = ceph.new_pool(quota_bytes=64 * MiB)
    ceph.create_image(pool, "disk", 64 * MiB)
    s = RbdServed(daemons, ceph, pool, "disk")
    a = agents("-s", s.mon, "-m", "rbd", "--volume", "nosuchpool", "--cap", "1G",
               "--poll-interval", "200ms")
    a.wait_log(r"disk0: cannot read the usage and quota of pool nosuchpool: exit status 1: "
               r"osd pool get-quota: .*unrecognized pool 'nosuchpool'; trying again at the next poll")
    a.wait_reconciles(6)
    assert len(a.lines(r"cannot read the usage")) == 1, a.log()
    assert quota(ceph, pool) == 64 * MiB
    assert s.status() == "running"
    a.stop()
