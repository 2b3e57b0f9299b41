"""thinblk-agent and stop groups (docs/qmp.md, "Stop groups"; thinblk-agent(8), STOP GROUPS).

One thinblkd, three qcow2 disks, each on its own storage (a loop device over a sparse file, the
volume the agent's built-in method extends, as in test_agent.py): "a" in group vm1, "b" in
group vm2, "c" in no group. A writer past the end of a volume gets a real ENOSPC, which stops
the disk's group (or, for "c", the run state); the agent extends that volume and resumes that
group alone (__org.thinblk_group-cont), or the run state (cont).

The last test has no thinblkd: the agent manages a QEMU VM directly (QEMU's QMP, no groups,
QEMU's own stop on ENOSPC), as it would for libvirt's VMs.

Results are checked by queries (query-groups, the devices' stopped counts), by the agent's log
and by reading the data back; waits are for a condition up to a deadline, never a sleep.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TIMEOUT, QMPClient, _die_with_parent, _sanitizer_reports, without_timestamp
from test_agent import MiB, agents, finish, loopdisks, wait_for  # noqa: F401 (fixtures)
from test_stop_groups import LoopWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
import guest as kit  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
    pytest.mark.skipif(os.environ.get("THINBLK_TEST_AGAINST_QEMU", "") == "1",
                       reason="stop groups are thinblkd's"),
]

GROUP_OF = {"a": "vm1", "b": "vm2", "c": None}
# The QEMU guest's job, and its deadline: TCG on a busy 2-CPU machine. Every wait ends as soon
# as its condition holds.
WRITE_MB = 40
GUEST_TIMEOUT = 300
VBLK0_QDEV = "/machine/peripheral/vblk0/virtio-backend"


class GroupedDaemon:
    """thinblkd serving the LoopDisks disks[id] as NBD exports id, in GROUP_OF[id]."""

    def __init__(self, daemons, disks):
        self.daemons, self.disks = daemons, disks
        self.rundir = daemons.rundir()
        self.mon = self.rundir / "mon0.sock"
        self.nbd_sock = self.rundir / "nbd.sock"
        args = ["--chardev", f"socket,id=m0,path={self.mon},server=on,wait=off",
                "--monitor", "chardev=m0",
                "--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}"]
        for id, disk in disks.items():
            args += ["--blockdev", f"driver=host_device,node-name=proto-{id},filename={disk.dev}",
                     "--blockdev", f"driver=qcow2,node-name=fmt-{id},file=proto-{id}"]
        for group in sorted({g for g in GROUP_OF.values() if g}):
            args += ["--group", group]
        for id in disks:
            opts = f",__org.thinblk_group={GROUP_OF[id]}" if GROUP_OF[id] else ""
            args += ["--export", f"type=nbd,id={id},node-name=fmt-{id},name={id},writable=on"
                     + opts]
        self.d = daemons.start_raw(args, [self.mon], rundir=self.rundir)
        self.qmp = self.d.negotiated()

    def stop(self):
        """SIGTERM, exit 0, no sanitizer report; then qemu-img check each image (the daemon's
        qcow2 state is on disk only after it has gone)."""
        self.qmp.close()
        self.d.signal(signal.SIGTERM)
        assert self.d.wait() == 0
        assert not _sanitizer_reports(self.d.stderr()), self.d.stderr()
        self.daemons.daemons.remove(self.d)
        for disk in self.disks.values():
            disk.check()

    def uri(self, id):
        return f"nbd+unix:///{id}?socket={self.nbd_sock}"

    def nbd(self, id):
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri(id))
        return h

    def groups(self):
        return {g["name"]: g["status"]
                for g in self.qmp.cmd("__org.thinblk_query-groups")["return"]}

    def status(self):
        return self.qmp.cmd("query-status")["return"]["status"]

    def stopped_count(self, id):
        stats = self.qmp.cmd("query-blockstats")["return"]
        return next(s for s in stats if s["device"] == id)["stats"]["__org.thinblk_stopped-count"]

    def write(self, id, pattern, offset, length, step=4 * MiB):
        """qemu-io writing [offset, offset+length) of export id with byte pattern; returns the
        process (finish() it)."""
        cmds = []
        for off in range(offset, offset + length, step):
            cmds += ["-c", f"write -P {pattern} {off} {min(step, offset + length - off)}"]
        return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, self.uri(id)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_die_with_parent)

    def read_back(self, id, pattern, offset, length):
        h = self.nbd(id)
        try:
            for off in range(offset, offset + length, 8 * MiB):
                n = min(8 * MiB, offset + length - off)
                assert h.pread(n, off) == bytes([pattern]) * n, f"{id}: mismatch at {off}"
        finally:
            h.shutdown()


@pytest.fixture
def served(daemons, loopdisks):
    def make(sizes):
        disks = {id: loopdisks(f"disk-{id}", size=size) for id, size in sizes.items()}
        return GroupedDaemon(daemons, disks)
    return make


def wait_group(s, group, status):
    wait_for(lambda: s.groups()[group] == status, f"group {group} {status}")


def check_readback_loop(s, id, written):
    h = s.nbd(id)
    try:
        for off, data in written:
            assert h.pread(len(data), off) == data, f"{id}: mismatch at {off}"
    finally:
        h.shutdown()


def test_stopped_group_extended_and_resumed_alone(served, agents, tmp_path):
    """vm1 runs out and stops while vm2's writer goes on; the agent, started after the stop,
    extends vm1's volume once and resumes vm1 alone; vm2 never stopped, the run state never
    left running, and every write reads back."""
    s = served({"a": 16 * MiB, "b": 64 * MiB})
    b = LoopWriter(s.nbd("b"), 7)
    b.start()
    w = s.write("a", 0x3a, 0, 48 * MiB)
    wait_group(s, "vm1", "io-error")
    assert w.poll() is None                 # the writer waits, it got no error
    b.wait_for(b.count() + 32)              # vm2 goes on while vm1 is stopped
    assert s.groups() == {"vm1": "io-error", "vm2": "running"}
    assert s.status() == "running"

    metrics = tmp_path / "agent.prom"
    a = agents("-s", s.mon, "--chunk", "64M", "--watermark", "8M", "--metrics-file", metrics)
    a.wait_log(r"daemon default: group vm1: resuming \(__org.thinblk_group-cont\) after "
               r"[0-9.]+ s stopped on ENOSPC")
    finish(w)
    ext = a.lines(r"a: extended")
    assert len(ext) == 1, a.log()           # several parked writes and events, one extension
    assert "stopped on ENOSPC" in ext[0], ext[0]
    assert s.disks["a"].size() == 80 * MiB
    assert s.groups() == {"vm1": "running", "vm2": "running"}
    assert s.status() == "running"
    assert not a.lines(r"resuming \(cont\)"), a.log()   # the run state was never stopped
    b.wait_for(b.count() + 32)
    written = b.finish()
    assert s.stopped_count("b") == 0 and s.stopped_count("a") >= 1
    s.read_back("a", 0x3a, 0, 48 * MiB)
    check_readback_loop(s, "b", written)
    wait_for(lambda: 'thinblk_agent_resumes_total{daemon="default",group="vm1"} 1'
             in metrics.read_text(), "the group's resume in the metrics file")
    assert 'thinblk_agent_resumes_total{daemon="default"} 0' in metrics.read_text()
    a.stop()
    s.stop()


def test_group_at_cap_stays_stopped_other_group_resumed(served, agents, tmp_path):
    """Both groups stop on ENOSPC; a's volume may grow to 24 MiB only: vm1 stays io-error,
    said once, while vm2 is extended and resumed and its writes complete."""
    s = served({"a": 16 * MiB, "b": 16 * MiB})
    conf = tmp_path / "agent.conf"
    conf.write_text(f"""[agent]
poll-interval = 200ms

[daemon vm]
socket = {s.mon}

[disk a]
device = a
method = loop
chunk = 4M
watermark = 2M
cap = 24M

[disk b]
device = b
method = loop
chunk = 32M
watermark = 4M
""")
    wa = s.write("a", 0x4a, 0, 32 * MiB, step=MiB)
    wb = s.write("b", 0x4b, 0, 40 * MiB, step=4 * MiB)
    wait_group(s, "vm1", "io-error")
    wait_group(s, "vm2", "io-error")
    a = agents("-c", conf)
    a.wait_log(r"a: stopped on ENOSPC at its cap: volume %s is 24 MiB, cap 24 MiB "
               r"\(virtual size 256 MiB\); left stopped" % s.disks["a"].dev)
    finish(wb)                               # vm2 resumed, its writes done
    assert a.lines(r"daemon vm: group vm2: resuming \(__org.thinblk_group-cont\)"), a.log()
    s.read_back("b", 0x4b, 0, 40 * MiB)
    a.wait_reconciles(3)
    assert s.groups() == {"vm1": "io-error", "vm2": "running"}
    assert s.status() == "running"
    assert wa.poll() is None
    assert s.disks["a"].size() == 24 * MiB
    # Said once each, not at every poll; and vm1 not resumed since it reached its cap.
    assert len(a.lines(r"a: stopped on ENOSPC at its cap")) == 1, a.log()
    assert len(a.lines(r"daemon vm: group vm1: stopped on an I/O error; not resuming yet: "
                       r"a: at its cap")) == 1, a.log()
    log = a.log()
    assert "group vm1: resuming" not in log[log.index("at its cap"):], log
    wa.kill()
    wa.wait()
    a.stop()
    s.stop()


FAILING_HOOK = """#!/bin/sh
# Extends a file-backed loop device (VOLUME CURRENT NEW), but not disk a's while {flag} is
# absent.
[ "$THINBLK_DEVICE" != a ] || [ -e {flag} ] || {{ echo "hook: not a, not today" >&2; exit 3; }}
truncate -s "$3" "$(cat /sys/block/$(basename "$1")/loop/backing_file)"
losetup -c "$1"
"""


def test_failing_extension_holds_only_its_group(served, agents, tmp_path):
    """Both groups stop on ENOSPC; a's extension fails (and is retried) while vm2 is extended
    and resumed; once a's hook works, vm1 is resumed too."""
    s = served({"a": 16 * MiB, "b": 16 * MiB})
    flag, hook = tmp_path / "a-may-grow", tmp_path / "extend.sh"
    hook.write_text(FAILING_HOOK.format(flag=flag))
    hook.chmod(0o755)
    wa = s.write("a", 0x7a, 0, 24 * MiB)
    wb = s.write("b", 0x7b, 0, 24 * MiB)
    wait_group(s, "vm1", "io-error")
    wait_group(s, "vm2", "io-error")
    a = agents("-s", s.mon, "--hook", hook, "--chunk", "32M", "--watermark", "4M",
               "--retry-min", "100ms", "--retry-max", "200ms")
    finish(wb)
    s.read_back("b", 0x7b, 0, 24 * MiB)
    a.wait_log(r"a: extending %s from 16 MiB to 48 MiB failed .*: exit status 3"
               % s.disks["a"].dev, count=2)
    assert s.groups() == {"vm1": "io-error", "vm2": "running"}
    assert wa.poll() is None
    assert a.lines(r"group vm2: resuming \(__org.thinblk_group-cont\)"), a.log()
    assert not a.lines(r"group vm1: resuming"), a.log()
    flag.touch()
    a.wait_log(r"daemon default: group vm1: resuming \(__org.thinblk_group-cont\)")
    finish(wa)
    s.read_back("a", 0x7a, 0, 24 * MiB)
    assert s.groups() == {"vm1": "running", "vm2": "running"}
    a.stop()
    s.stop()


def test_paused_group_left_alone(served, agents):
    """A group stopped by a person (__org.thinblk_group-stop) stays paused, while the agent
    extends and resumes another group stopped on ENOSPC."""
    s = served({"a": 64 * MiB, "b": 16 * MiB})
    assert s.qmp.cmd("__org.thinblk_group-stop", {"name": "vm1"}) == {"return": {}}
    w = s.write("b", 0x5b, 0, 40 * MiB)
    wait_group(s, "vm2", "io-error")
    a = agents("-s", s.mon, "--chunk", "32M", "--watermark", "8M", "--poll-interval", "100ms")
    a.wait_log(r"daemon default: group vm1: paused by __org.thinblk_group-stop, not by an I/O "
               r"error: left alone")
    a.wait_log(r"daemon default: group vm2: resuming \(__org.thinblk_group-cont\)")
    finish(w)
    s.read_back("b", 0x5b, 0, 40 * MiB)
    a.wait_reconciles(5)
    assert s.groups() == {"vm1": "paused", "vm2": "running"}
    assert not a.lines(r"group vm1: resuming"), a.log()
    assert len(a.lines(r"group vm1: paused by")) == 1, a.log()   # once, not at every poll
    # The person's cont: vm1 runs again, under the agent's watch.
    assert s.qmp.cmd("__org.thinblk_group-cont", {"name": "vm1"}) == {"return": {}}
    finish(s.write("a", 0x5a, 0, 4 * MiB))
    s.read_back("a", 0x5a, 0, 4 * MiB)
    a.stop()
    s.stop()


def test_device_in_no_group_resumed_with_cont(served, agents):
    """Beside the groups, a device in no group stops the run state and is resumed with cont,
    as without groups; the groups' own states are not touched."""
    s = served({"a": 64 * MiB, "c": 16 * MiB})
    w = s.write("c", 0x6c, 0, 40 * MiB)
    wait_for(lambda: s.status() == "io-error", "the run state stopped on ENOSPC")
    assert s.groups() == {"vm1": "running", "vm2": "running"}
    a = agents("-s", s.mon, "--chunk", "64M", "--watermark", "8M")
    a.wait_log(r"daemon default: resuming \(cont\) after [0-9.]+ s stopped on ENOSPC")
    finish(w)
    s.read_back("c", 0x6c, 0, 40 * MiB)
    assert len(a.lines(r"c: extended")) == 1, a.log()
    assert s.status() == "running"
    assert s.groups() == {"vm1": "running", "vm2": "running"}
    assert not a.lines(r"group-cont"), a.log()
    finish(s.write("a", 0x6a, 0, 4 * MiB))   # held while the run state was stopped, now runs
    s.read_back("a", 0x6a, 0, 4 * MiB)
    a.stop()
    s.stop()


def guest_on_loop_device(image, disk, workdir, agent_mon, mb):
    """A QEMU TCG guest whose virtio-blk disk is DISK's qcow2 image, opened by QEMU itself on
    the loop device (-blockdev host_device, as libvirt gives it: no device name), with QEMU's
    own error policy (werror=enospc, rerror=report: its defaults for virtio-blk); its job writes
    MB MiB. Two QMP monitors: the kit's (the test's) and AGENT_MON (the agent's; a QMP socket
    takes one client at a time)."""
    return kit.Guest(image, [], job="write", mb=mb, workdir=workdir, qmp=True, extra_args=[
        "-blockdev", f"driver=host_device,node-name=proto0,filename={disk.dev}",
        "-blockdev", "driver=qcow2,node-name=fmt0,file=proto0",
        "-device", "virtio-blk-pci,id=vblk0,drive=fmt0",
        "-chardev", f"socket,id=agentmon,path={agent_mon},server=on,wait=off",
        "-mon", "chardev=agentmon,mode=control"])


@pytest.mark.skipif(kit.qemu_path() is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_resumed_with_cont(loopdisks, agents, tmp_path):
    """thinblk-agent manages QEMU itself, as for libvirt's VMs: QEMU's virtio-blk disk is a
    qcow2 image on a 16 MiB loop device, and QEMU stops the VM on ENOSPC (BLOCK_IO_ERROR
    nospace, STOP, io-error). The agent, given QEMU's QMP socket, takes
    __org.thinblk_query-groups' CommandNotFound as no groups (no warning), extends the loop
    device and resumes QEMU with cont; the guest's write completes as if nothing happened."""
    image = kit.build_guest()
    disk = loopdisks(size=16 * MiB)
    workdir, agent_mon = tmp_path / "guest", tmp_path / "agent-qmp.sock"
    with guest_on_loop_device(image, disk, workdir, agent_mon, WRITE_MB) as g:
        qmp = QMPClient(g.qmp_socket, timeout=GUEST_TIMEOUT).negotiate()
        try:
            # QEMU's own stop on ENOSPC, nobody watching yet.
            io_error = without_timestamp(qmp.wait_event("BLOCK_IO_ERROR"))
            assert io_error["data"] == {"device": "", "node-name": "fmt0", "operation": "write",
                                        "action": "stop", "nospace": True,
                                        "reason": "No space left on device"}, io_error
            qmp.wait_event("STOP")
            assert qmp.cmd("query-status")["return"]["status"] == "io-error"
            block = qmp.cmd("query-block")["return"]
            vblk0 = [b for b in block if b.get("qdev") == VBLK0_QDEV]
            assert [(b["device"], b["inserted"]["node-name"], b["io-status"]) for b in vblk0] \
                == [("", "fmt0", "nospace")], block
            assert g.running() and not g.markers("RESULT"), g.console
            assert disk.size() == 16 * MiB

            a = agents("-s", agent_mon, "--chunk", "64M", "--watermark", "8M")
            qmp.wait_event("RESUME", timeout=TIMEOUT)
            assert qmp.cmd("query-status")["return"]["status"] == "running"
            a.wait_log(r"daemon default: resuming \(cont\) after [0-9.]+ s stopped on ENOSPC")
            # Running until the guest powers off after its job: no stop after the cont.
            qmp.wait_event("SHUTDOWN")
            after = [e["event"] for e in qmp.take_events()]
            assert "STOP" not in after, after
        finally:
            qmp.close()
        console, rc = g.wait(GUEST_TIMEOUT)

    assert rc == 0, f"QEMU exited with {rc}:\n{g.stderr()}\n{console[-3000:]}"
    assert "I/O error" not in console and not g.io_error, g.dmesg
    r = g.result()
    assert (r["job"], r["mb"], r["dd-status"], r["read-status"]) == ("write", WRITE_MB, 0, 0), r
    assert r["write-sha256"] == r["readback-sha256"], r
    assert kit.image_sha256(disk.dev, "qcow2", 0, WRITE_MB * MiB, tmp_path) == r["write-sha256"]
    assert disk.size() == 80 * MiB
    disk.check()
    ext = a.lines(r"fmt0: extended ")
    assert len(ext) == 1 and re.search(r"extended %s from 16 MiB to 80 MiB in [0-9.]+ ms "
                                       r"\(stopped on ENOSPC" % disk.dev, ext[0]), a.log()
    assert len(a.lines(r"resuming \(cont\)")) == 1, a.log()
    assert not a.lines(r"group"), a.log()
    # No warning while QEMU ran; its exit at the guest's poweroff is one (the agent then waits
    # for the monitor to come back).
    lines = a.log().splitlines()
    lost = [i for i, line in enumerate(lines) if "connection lost" in line]
    assert not [line for line in lines[:lost[0] if lost else None] if "warning" in line], lines
    a.stop()
