"""thinblk-agent and stop groups (docs/qmp.md, "Stop groups"; thinblk-agent(8), STOP GROUPS).

One thinblkd, three qcow2 disks, each on its own storage (a loop device over a sparse file, the
volume the agent's built-in method extends, as in test_agent.py): "a" in group vm1, "b" in
group vm2, "c" in no group. A writer past the end of a volume gets a real ENOSPC, which stops
the disk's group (or, for "c", the run state); the agent extends that volume and resumes that
group alone (__org.thinblk_group-cont), or the run state (cont).

Results are checked by queries (query-groups, the devices' stopped counts), by the agent's log
and by reading the data back; waits are for a condition up to a deadline, never a sleep.
"""

import json
import os
import signal
import socket
import subprocess
import threading

import pytest

from conftest import _die_with_parent, _sanitizer_reports
from test_agent import MiB, agents, finish, loopdisks, wait_for  # noqa: F401 (fixtures)
from test_stop_groups import LoopWriter

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
    pytest.mark.skipif(os.environ.get("THINBLK_TEST_AGAINST_QEMU", "") == "1",
                       reason="stop groups are thinblkd's"),
]

GROUP_OF = {"a": "vm1", "b": "vm2", "c": None}


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


class ScriptedQmp(threading.Thread):
    """A QMP peer that answers from a table as QEMU 7.2 would: thinblk's commands (the groups,
    query-stop-reason) are CommandNotFound. Records the commands it is sent."""

    def __init__(self, path, answers):
        super().__init__(daemon=True)
        self.answers, self.commands = answers, []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)

    def names(self):
        with self.lock:
            return [c for c, _ in self.commands]

    def run(self):
        conn, _ = self.sock.accept()
        self.sock.close()
        with conn:
            self.serve(conn)

    def serve(self, conn):
        conn.sendall(json.dumps({"QMP": {"version": {"qemu": {"major": 7, "minor": 2,
                     "micro": 0}, "package": ""}, "capabilities": []}}).encode() + b"\r\n")
        buf, dec = "", json.JSONDecoder()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                name = msg["execute"]
                with self.lock:
                    self.commands.append((name, msg.get("arguments")))
                    answer = self.answers(name) if name != "qmp_capabilities" else {}
                if answer is None:
                    reply = {"error": {"class": "CommandNotFound",
                                       "desc": f"The command {name} has not been found"}}
                else:
                    reply = {"return": answer}
                if "id" in msg:
                    reply["id"] = msg["id"]
                conn.sendall(json.dumps(reply).encode() + b"\r\n")


def test_daemon_without_groups_resumed_with_cont(loopdisks, agents, tmp_path):
    """Against a QMP peer without stop groups (QEMU's commands only), the agent takes
    __org.thinblk_query-groups' CommandNotFound as no groups, without a warning, and resumes a
    stop on ENOSPC with cont, as before groups."""
    disk = loopdisks(size=16 * MiB)
    state = {"status": "io-error", "io": "nospace"}

    def answers(name):
        if name == "cont":
            state.update(status="running", io="ok")
            return {}
        return {
            "query-status": {"status": state["status"], "running": state["status"] == "running",
                             "singlestep": False},
            "query-block": [{"device": "disk0", "io-status": state["io"], "locked": False,
                             "removable": False, "type": "unknown"}],
            "query-blockstats": [{"device": "disk0", "node-name": "fmt0", "stats": {},
                                  "parent": {"node-name": "proto0",
                                             "stats": {"wr_highest_offset": 16 * MiB}}}],
            "query-named-block-nodes": [
                {"node-name": "proto0", "drv": "host_device", "file": disk.dev,
                 "write_threshold": 0, "image": {"filename": disk.dev,
                                                 "virtual-size": disk.size()}},
                {"node-name": "fmt0", "drv": "qcow2", "file": disk.dev, "write_threshold": 0,
                 "image": {"filename": disk.dev, "virtual-size": 256 * MiB}}],
            "block-set-write-threshold": {},
        }.get(name)

    mon = tmp_path / "qemu.sock"
    peer = ScriptedQmp(mon, answers)
    peer.start()
    a = agents("-s", mon, "--chunk", "64M", "--watermark", "8M")
    a.wait_log(r"daemon default: resuming \(cont\) after [0-9.]+ s stopped on ENOSPC")
    assert a.lines(r"disk0: extended %s from 16 MiB to 80 MiB" % disk.dev), a.log()
    a.wait_log(r"disk0: write threshold at 72 MiB")
    a.wait_log(r"daemon default: reconciling: status running")   # the peer had the cont
    names = peer.names()
    assert "__org.thinblk_query-groups" in names and names.count("cont") == 1, names
    assert not [n for n in names if n.startswith("__org.thinblk_group")], names
    assert not a.lines(r"warning"), a.log()
    a.stop()
