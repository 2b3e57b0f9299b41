"""thinblk-agent with real storage: qcow2 images on loop devices whose backing files start
small, thinblkd serving them over NBD, qemu-io and libnbd writing, the agent extending the
loop devices (built-in method or a hook) and resuming the daemon after ENOSPC.

Every test checks the bytes read back and qemu-img check on the image. Waits are for a
condition (a line in the agent's log, a run state, a process exit) up to a deadline.
"""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BUILD_DIR, TIMEOUT, _die_with_parent, _sanitizer_reports
from prometheus import exposition, value

AGENT = BUILD_DIR / "src" / "agent" / "thinblk-agent"
MiB = 1024 * 1024

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
    pytest.mark.skipif(os.environ.get("THINBLK_TEST_AGAINST_QEMU", "") == "1",
                       reason="thinblk-agent against thinblkd"),
]


def wait_for(cond, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)   # polling interval of the condition


def dev_size(dev):
    return int(subprocess.run(["blockdev", "--getsize64", dev], check=True,
                              capture_output=True, text=True).stdout)


class LoopDisk:
    """A qcow2 image of `virtual` bytes in a backing file of `size` bytes on a loop device."""

    def __init__(self, directory, name, virtual, size):
        self.backing = Path(directory) / f"{name}.img"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.backing),
                        str(virtual)], check=True)
        os.truncate(self.backing, size)
        self.dev = subprocess.run(["losetup", "--find", "--show", str(self.backing)],
                                  check=True, capture_output=True, text=True).stdout.strip()
        self.virtual = virtual

    def size(self):
        return dev_size(self.dev)

    def check(self):
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", self.dev], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "No errors were found on the image." in r.stdout

    def detach(self):
        subprocess.run(["losetup", "-d", self.dev], check=False)


@pytest.fixture
def loopdisks(tmp_path):
    made = []

    def make(name="disk0", virtual=256 * MiB, size=16 * MiB):
        d = LoopDisk(tmp_path, name, virtual, size)
        made.append(d)
        return d
    yield make
    for d in made:
        d.detach()


class Served:
    """thinblkd serving one LoopDisk as the NBD export (and device) `name`."""

    def __init__(self, daemons, disk, name="disk0", extra=(), rundir=None, fmt="qcow2",
                 export_opts=""):
        self.daemons, self.disk, self.name, self.extra, self.fmt = daemons, disk, name, extra, fmt
        self.export_opts = export_opts
        self.rundir = rundir or daemons.rundir()
        self.mon = self.rundir / "mon0.sock"
        self.nbd = self.rundir / "nbd.sock"
        self.start()

    def start(self):
        args = ["--chardev", f"socket,id=m0,path={self.mon},server=on,wait=off",
                "--monitor", "chardev=m0",
                "--blockdev", f"driver=host_device,node-name=proto0,filename={self.disk.dev}",
                *self.extra,
                "--blockdev", f"driver={self.fmt},node-name=fmt0,file="
                + ("flt0" if self.extra else "proto0"),
                "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                "--export", f"type=nbd,id={self.name},node-name=fmt0,name={self.name},"
                "writable=on" + self.export_opts]
        self.d = self.daemons.start_raw(args, [self.mon], rundir=self.rundir)
        self.qmp = self.d.negotiated()

    def stop(self):
        """SIGTERM, exit 0, no sanitizer report; then the factory forgets it, so that a
        daemon started again on the same socket is not taken for its leftover."""
        for c in self.d.clients:
            c.close()
        self.d.signal(signal.SIGTERM)
        assert self.d.wait() == 0
        assert not _sanitizer_reports(self.d.stderr()), self.d.stderr()
        assert not self.d.leftover_sockets()
        self.daemons.daemons.remove(self.d)

    def uri(self):
        return f"nbd+unix:///{self.name}?socket={self.nbd}"

    def status(self):
        return self.qmp.cmd("query-status")["return"]["status"]

    def stats(self):
        return self.qmp.cmd("query-blockstats")["return"][0]

    def node(self, name):
        nodes = self.qmp.cmd("query-named-block-nodes")["return"]
        return next(n for n in nodes if n["node-name"] == name)

    def write(self, pattern, offset, length, step=MiB, wait=True):
        """qemu-io writing [offset, offset+length) with byte `pattern`, `step` bytes a
        request. Returns the process if not wait."""
        cmds = []
        for off in range(offset, offset + length, step):
            cmds += ["-c", f"write -P {pattern} {off} {min(step, offset + length - off)}"]
        p = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, self.uri()],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=_die_with_parent)
        if not wait:
            return p
        out, _ = p.communicate(timeout=TIMEOUT * 3)
        assert p.returncode == 0 and "error" not in out.lower(), out
        return None

    def read_back(self, pattern, offset, length):
        """Read with libnbd and compare every byte."""
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri())
        try:
            for off in range(offset, offset + length, 8 * MiB):
                n = min(8 * MiB, offset + length - off)
                assert h.pread(n, off) == bytes([pattern]) * n, f"mismatch at {off}"
        finally:
            h.shutdown()


def finish(p, timeout=TIMEOUT * 3):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0 and "error" not in out.lower(), out


class Agent:
    """A running thinblk-agent; its log in a file, read as it grows."""

    def __init__(self, logdir, args, name="agent"):
        self.log_path = Path(logdir) / f"{name}.log"
        self.argv = [str(AGENT), "-v", *[str(a) for a in args]]
        with open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=_die_with_parent)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def lines(self, pattern):
        return [l for l in self.log().splitlines() if re.search(pattern, l)]

    def wait_log(self, pattern, count=1, timeout=TIMEOUT):
        def seen():
            if self.proc.poll() is not None:
                pytest.fail(f"thinblk-agent exited ({self.proc.returncode}):\n{self.log()}")
            return len(self.lines(pattern)) >= count
        try:
            wait_for(seen, f"{count} x /{pattern}/ in the agent's log", timeout)
        except BaseException:
            print(self.log())
            raise
        return self.lines(pattern)

    def reconciles(self):
        return len(self.lines(r"reconciling: status"))

    def wait_reconciles(self, n):
        """Wait until the agent has looked at the daemon n more times."""
        start = self.reconciles()
        self.wait_log(r"reconciling: status", start + n)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=TIMEOUT) == 0, self.log()
        assert "terminating on signal 15" in self.log()
        assert not _sanitizer_reports(self.log()), self.log()


@pytest.fixture
def agents(tmp_path):
    started = []

    def start(*args, name="agent"):
        a = Agent(tmp_path, args, name)
        started.append(a)
        return a
    yield start
    for a in started:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


def test_threshold_keeps_writer_running(daemons, loopdisks, agents):
    """Write thresholds alone (no polling within the test's time) keep a writer of 1 MiB
    requests from ever stopping: each extension is done before the writer has written the
    watermark's worth (96 MiB: generous, so a loaded machine does not fail the test)."""
    disk = loopdisks(size=16 * MiB, virtual=512 * MiB)
    s = Served(daemons, disk)
    a = agents("-s", s.mon, "--chunk", "128M", "--watermark", "96M", "--poll-interval", "600s")
    a.wait_log(r"disk0: write threshold at 48 MiB on node proto0")  # 16 + 128 MiB - 96 MiB
    s.write(0x5a, 0, 320 * MiB)
    stats = s.stats()
    assert stats["stats"]["__org.thinblk_stopped-count"] == 0, a.log()
    assert s.status() == "running"
    ext = a.lines(r"disk0: extended %s from .* \(write threshold crossed at" % disk.dev)
    assert len(ext) >= 2, a.log()
    assert disk.size() >= 320 * MiB + 96 * MiB
    # The protocol node shows the new size and the re-armed threshold, and query-blockstats
    # the image's end on it.
    wait_for(lambda: s.node("proto0")["write_threshold"] == disk.size() - 96 * MiB,
             "the threshold re-armed after the last extension")
    assert s.node("proto0")["image"]["virtual-size"] == disk.size()
    assert stats["parent"]["node-name"] == "proto0"
    assert 320 * MiB < stats["parent"]["stats"]["wr_highest_offset"] <= disk.size()
    s.read_back(0x5a, 0, 320 * MiB)
    a.stop()
    s.stop()
    disk.check()


def test_agent_started_after_stop_extends_once_and_resumes(daemons, loopdisks, agents):
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    w = s.write(0x33, 0, 48 * MiB, step=4 * MiB, wait=False)
    wait_for(lambda: s.status() == "io-error", "the daemon to stop on ENOSPC")
    assert w.poll() is None  # the writer waits, it got no error
    size_at_stop = disk.size()
    a = agents("-s", s.mon, "--chunk", "64M", "--watermark", "8M")
    a.wait_log(r"resuming \(cont\) after [0-9.]+ s stopped on ENOSPC")
    finish(w)
    ext = a.lines(r"disk0: extended")
    assert len(ext) == 1, a.log()   # several parked writes and events, one extension
    assert re.search(r"extended %s from 16 MiB to 80 MiB in [0-9.]+ ms \(stopped on ENOSPC, "
                     r"highest write at [0-9.]+ MiB\)" % disk.dev, ext[0]), ext[0]
    assert size_at_stop == 16 * MiB and disk.size() == 80 * MiB
    assert s.status() == "running"
    s.read_back(0x33, 0, 48 * MiB)
    a.stop()
    s.stop()
    disk.check()


def test_agent_restarted_mid_run(daemons, loopdisks, agents):
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    args = ("-s", s.mon, "--chunk", "32M", "--watermark", "8M", "--poll-interval", "200ms")
    a = agents(*args)
    s.write(0x11, 0, 24 * MiB)
    a.wait_log(r"disk0: write threshold at 40 MiB")
    a.stop()
    # Nobody watches: the writer runs into the end of the volume and the daemon stops.
    w = s.write(0x22, 24 * MiB, 40 * MiB, step=4 * MiB, wait=False)
    wait_for(lambda: s.status() == "io-error", "the daemon to stop on ENOSPC")
    b = agents(*args, name="agent2")
    b.wait_log(r"resuming \(cont\)")
    finish(w)
    assert disk.size() >= 64 * MiB
    b.wait_log(r"write threshold at %d MiB" % (disk.size() // MiB - 8))
    wait_for(lambda: s.node("proto0")["write_threshold"] == disk.size() - 8 * MiB,
             "the threshold re-armed by the new agent")
    s.read_back(0x11, 0, 24 * MiB)
    s.read_back(0x22, 24 * MiB, 40 * MiB)
    b.stop()
    s.stop()
    disk.check()


def test_daemon_restarted_mid_run(daemons, loopdisks, agents):
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    a = agents("-s", s.mon, "--chunk", "32M", "--watermark", "8M", "--poll-interval", "200ms")
    a.wait_log(r"connected to")
    s.write(0x44, 0, 20 * MiB)
    a.wait_log(r"disk0: extended")
    s.stop()
    a.wait_log(r"daemon default: connection lost")
    s.start()  # the same socket path, the same loop device
    a.wait_log(r"daemon default: connected to .* again")
    # A new daemon: a new event journal, which the agent reads from its start.
    a.wait_log(r"daemon default: restarted while disconnected; no events since its start")
    # The new daemon's node has no threshold until the agent arms it again.
    wait_for(lambda: s.node("proto0")["write_threshold"] == disk.size() - 8 * MiB,
             "the threshold armed on the restarted daemon")
    before = disk.size()
    s.write(0x55, 20 * MiB, before)   # past the volume's end: the agent must keep up
    assert disk.size() > before
    assert s.status() == "running"
    s.read_back(0x44, 0, 20 * MiB)
    s.read_back(0x55, 20 * MiB, before)
    a.stop()
    s.stop()
    disk.check()


class Proxy:
    """A Unix-socket forwarder between the agent and the daemon's monitor, to cut the agent's
    connection while the daemon runs on (cut), and let it back (restore)."""

    def __init__(self, path, target):
        self.path, self.target = str(path), str(target)
        self.conns, self.lock = [], threading.Lock()
        self.restore()

    def restore(self):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen()
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                a, _ = listener.accept()
            except OSError:
                return
            b = socket.socket(socket.AF_UNIX)
            b.connect(self.target)
            with self.lock:
                self.conns += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.listener.close()
        os.unlink(self.path)
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns = []


def test_agent_reads_missed_events_from_the_journal(daemons, loopdisks, agents, tmp_path):
    """The agent's connection is cut while the daemon runs on and its storage runs out. Back,
    the agent reads exactly the events it missed from the daemon's event journal
    (__org.thinblk_query-event-journal), logs them, then extends and resumes."""
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    proxy = Proxy(tmp_path / "proxy.sock", s.mon)
    a = agents("-s", proxy.path, "--chunk", "64M", "--watermark", "8M", "--poll-interval", "600s")
    a.wait_log(r"disk0: write threshold at 8 MiB")
    seen = s.qmp.cmd("__org.thinblk_query-event-journal")["return"]["last-seq"]
    proxy.cut()
    a.wait_log(r"daemon default: connection lost")
    w = s.write(0x66, 0, 40 * MiB, step=4 * MiB, wait=False)
    wait_for(lambda: s.status() == "io-error", "the daemon to stop on ENOSPC")
    proxy.restore()
    a.wait_log(r"resuming \(cont\)")
    finish(w)
    line = a.lines(r"events while disconnected")
    assert len(line) == 1, a.log()
    m = re.search(r"daemon default: (\d+) events while disconnected \((\d+) to (\d+)\): (.*)$",
                  line[0])
    assert m, line
    count, first, last = int(m[1]), int(m[2]), int(m[3])
    journal = s.qmp.cmd("__org.thinblk_query-event-journal", {"after": seen})["return"]
    missed = [e for e in journal["events"] if e["__org.thinblk_seq"] <= last]
    assert (first, last, count, journal["dropped"]) == (seen + 1, seen + len(missed),
                                                         len(missed), 0), (line, journal)
    assert m[4] == ", ".join(e["event"] for e in missed), (line, missed)
    names = [e["event"] for e in missed]
    # (A coalesced BLOCK_IO_ERROR may come after the STOP: one a second per device.)
    assert names[0] == "BLOCK_WRITE_THRESHOLD" and "STOP" in names, names
    assert names.index("BLOCK_IO_ERROR") < names.index("STOP"), names
    assert set(names) == {"BLOCK_WRITE_THRESHOLD", "BLOCK_IO_ERROR", "STOP"}, names
    assert disk.size() == 80 * MiB and s.status() == "running"
    s.read_back(0x66, 0, 40 * MiB)
    proxy.cut()
    a.stop()
    s.stop()
    disk.check()


HOOK = """#!/bin/sh
# Extends a file-backed loop device, as lvextend would an LV; fails while {flag} is absent.
echo "args=$*" >> {record}
env | grep '^THINBLK_' | sort >> {record}
[ -e {flag} ] || {{ echo "hook: not today" >&2; exit 3; }}
truncate -s "$3" {backing}
losetup -c "$1"
"""


def test_failing_hook_retried_with_backoff(daemons, loopdisks, agents, tmp_path):
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    flag, record = tmp_path / "hook-may-work", tmp_path / "hook.record"
    hook = tmp_path / "extend.sh"
    hook.write_text(HOOK.format(flag=flag, record=record, backing=disk.backing))
    hook.chmod(0o755)
    a = agents("-s", s.mon, "--hook", hook, "--chunk", "32M", "--watermark", "4M",
               "--retry-min", "100ms", "--retry-max", "400ms")
    w = s.write(0x66, 0, 24 * MiB, step=2 * MiB, wait=False)
    a.wait_log(r"disk0: extending %s from 16 MiB to 48 MiB failed in [0-9.]+ ms \(.*\): "
               r"exit status 3" % disk.dev, count=4)
    retries = [float(x) for x in re.findall(r"retrying in ([0-9.]+) s", a.log())]
    assert retries[:4] == [0.1, 0.2, 0.4, 0.4], a.log()   # doubling, up to retry-max
    assert "hook: not today" in a.log()                     # the hook's stderr is logged
    assert s.status() == "io-error" and w.poll() is None    # stays stopped meanwhile
    assert disk.size() == 16 * MiB
    flag.touch()
    a.wait_log(r"disk0: extended %s from 16 MiB to 48 MiB" % disk.dev)
    a.wait_log(r"resuming \(cont\)")
    finish(w)
    s.read_back(0x66, 0, 24 * MiB)
    # The documented interface: VOLUME CURRENT_SIZE NEW_SIZE, and the environment.
    rec = record.read_text()
    assert f"args={disk.dev} {16 * MiB} {48 * MiB}" in rec
    for var in ["THINBLK_DISK=disk0", "THINBLK_DAEMON=default", f"THINBLK_SOCKET={s.mon}",
                "THINBLK_DEVICE=disk0", "THINBLK_NODE=proto0", f"THINBLK_VOLUME={disk.dev}",
                f"THINBLK_CURRENT_SIZE={16 * MiB}", f"THINBLK_NEW_SIZE={48 * MiB}",
                f"THINBLK_VIRTUAL_SIZE={256 * MiB}",
                "THINBLK_REASON=stopped on ENOSPC, highest write at"]:
        assert var in rec, rec
    a.stop()
    s.stop()
    disk.check()


SLOW_HOOK = """#!/bin/sh
# Hangs (as a stuck lvextend would) while {flag} is absent; else extends like HOOK.
[ -e {flag} ] || exec sleep {sleep}
truncate -s "$3" {backing}
losetup -c "$1"
"""


def slow_hook(tmp_path, disk, sleep):
    flag, hook = tmp_path / "hook-may-work", tmp_path / "extend.sh"
    hook.write_text(SLOW_HOOK.format(flag=flag, sleep=sleep, backing=disk.backing))
    hook.chmod(0o755)
    return hook, flag


def test_hook_past_its_timeout_killed_and_retried(daemons, loopdisks, agents, tmp_path):
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    hook, flag = slow_hook(tmp_path, disk, 60)
    a = agents("-s", s.mon, "--hook", hook, "--chunk", "32M", "--watermark", "4M",
               "--hook-timeout", "300ms", "--retry-min", "100ms", "--retry-max", "100ms")
    w = s.write(0x67, 0, 24 * MiB, step=2 * MiB, wait=False)
    a.wait_log(r"disk0: the extension of %s is still running after the hook timeout; "
               r"killing it" % disk.dev)
    a.wait_log(r"disk0: extending %s from 16 MiB to 48 MiB failed in [0-9.]+ ms \(.*\): "
               r"killed after the hook timeout" % disk.dev)
    a.wait_log(r"disk0: retrying in 0.1 s")
    assert s.status() == "io-error" and w.poll() is None
    flag.touch()
    a.wait_log(r"disk0: extended %s from 16 MiB to 48 MiB" % disk.dev)
    a.wait_log(r"resuming \(cont\)")
    finish(w)
    s.read_back(0x67, 0, 24 * MiB)
    a.stop()
    s.stop()
    disk.check()


def test_agent_stopped_during_an_extension_leaves_it(daemons, loopdisks, agents, tmp_path):
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    hook, _ = slow_hook(tmp_path, disk, 3)
    a = agents("-s", s.mon, "--hook", hook, "--chunk", "32M", "--watermark", "4M")
    w = s.write(0x68, 0, 24 * MiB, step=2 * MiB, wait=False)
    a.wait_log(r"disk0: extending %s from 16777216 to 50331648 \(pid \d+\)" % disk.dev)
    a.stop()   # exits 0, no sanitizer report: the job is freed, the child left running
    assert a.lines(r"disk0: leaving the extension of %s \(pid \d+\) to finish on its own"
                   % disk.dev), a.log()
    w.kill()
    w.wait()
    s.stop()


def test_disk_at_cap_stays_stopped_and_is_reported(daemons, loopdisks, agents):
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    a = agents("-s", s.mon, "--chunk", "4M", "--watermark", "2M", "--cap", "24M",
               "--poll-interval", "200ms")
    w = s.write(0x77, 0, 32 * MiB, step=MiB, wait=False)
    a.wait_log(r"disk0: stopped on ENOSPC at its cap: volume %s is 24 MiB, cap 24 MiB "
               r"\(virtual size 256 MiB\); left stopped" % disk.dev)
    a.wait_reconciles(3)
    assert s.status() == "io-error" and w.poll() is None
    assert disk.size() == 24 * MiB
    # Reported once each, not at every poll.
    assert len(a.lines(r"disk0: stopped on ENOSPC at its cap")) == 1, a.log()
    assert len(a.lines(r"daemon default: stopped on an I/O error; not resuming yet: disk0: at "
                       r"its cap")) == 1, a.log()
    # It may have stopped and been resumed below the cap (a slow machine); not since.
    log = a.log()
    assert "resuming (cont)" not in log[log.index("at its cap"):], log
    w.kill()
    w.wait()
    a.stop()
    s.stop()


def test_default_cap_is_110_percent_of_qcow2_virtual_size(daemons, loopdisks, agents):
    disk = loopdisks(virtual=32 * MiB, size=8 * MiB)
    s = Served(daemons, disk)
    a = agents("-s", s.mon, "--chunk", "64M", "--watermark", "4M")
    s.write(0x12, 0, 32 * MiB)
    cap = 32 * MiB * 110 // 100 // 512 * 512
    wait_for(lambda: disk.size() == cap, "the volume at 110% of the virtual size")
    a.wait_log(r"within the watermark of its cap")
    s.read_back(0x12, 0, 32 * MiB)
    a.stop()
    s.stop()
    disk.check()


def test_person_stop_is_left_alone(daemons, loopdisks, agents):
    disk = loopdisks(size=64 * MiB)
    s = Served(daemons, disk)
    a = agents("-s", s.mon, "--chunk", "32M", "--watermark", "8M", "--poll-interval", "100ms")
    a.wait_log(r"write threshold at 56 MiB")
    assert s.qmp.cmd("stop") == {"return": {}}
    a.wait_log(r"daemon default: paused by a stop command \(or -S\), not by an I/O error: "
               r"left alone")
    a.wait_reconciles(5)
    assert s.status() == "paused"
    assert not a.lines(r"resuming")
    assert s.qmp.cmd("cont") == {"return": {}}
    s.write(0x21, 0, 4 * MiB)
    s.read_back(0x21, 0, 4 * MiB)
    a.stop()
    s.stop()
    disk.check()


def test_other_io_error_not_resumed_by_default(daemons, loopdisks, agents):
    disk = loopdisks(size=64 * MiB)
    # werror=stop: an EIO stops the daemon too (with the default, enospc, it is reported).
    s = Served(daemons, disk, extra=["--blockdev", "driver=fault,node-name=flt0,file=proto0"],
               export_opts=",werror=stop")
    a = agents("-s", s.mon, "--watermark", "8M", "--poll-interval", "100ms")
    a.wait_log(r"disk0: write threshold at 56 MiB on node proto0")  # found under the fault node
    assert s.qmp.cmd("__org.thinblk_fault-set", {"node-name": "flt0", "rules": [
        {"op": "write", "errno": "EIO", "once": True}]}) == {"return": {}}
    w = s.write(0x31, 0, MiB, wait=False)
    a.wait_log(r"daemon default: stopped on an I/O error; not resuming yet: device disk0 "
               r"stopped on an I/O error other than ENOSPC \(resume-on-other-errors is off\)")
    a.wait_reconciles(3)
    assert s.status() == "io-error" and w.poll() is None
    a.stop()
    # The option decides: another agent with it resumes the daemon.
    b = agents("-s", s.mon, "--watermark", "8M", "--resume-on-other-errors", name="agent2")
    b.wait_log(r"resuming \(cont\)")
    finish(w)
    s.read_back(0x31, 0, MiB)
    assert not b.lines(r"extended")   # nothing to extend for an EIO
    b.stop()
    s.stop()
    disk.check()


def test_two_daemons_from_a_config_file(daemons, loopdisks, agents, tmp_path):
    d1, d2 = loopdisks("one", size=16 * MiB), loopdisks("two", size=16 * MiB)
    s1, s2 = Served(daemons, d1, name="vda"), Served(daemons, d2, name="vdb")
    conf = tmp_path / "agent.conf"
    conf.write_text(f"""# two daemons, one disk each
[agent]
poll-interval = 300ms

[daemon vm1]
socket = {s1.mon}

[daemon vm2]
socket = {s2.mon}

[disk vm1-root]
daemon = vm1
device = vda
method = loop
chunk = 32M
watermark = 8M

[disk vm2-data]
daemon = vm2
node = proto0
method = loop
volume = {d2.dev}
chunk = 16M
watermark = 4M
cap = 120%
""")
    a = agents("-c", conf)
    a.wait_log(r"vm1-root: write threshold")
    a.wait_log(r"vm2-data: write threshold")
    # Both stop at once; the agent handles both, neither waits for the other.
    w1 = s1.write(0x41, 0, 40 * MiB, step=8 * MiB, wait=False)
    w2 = s2.write(0x42, 0, 40 * MiB, step=8 * MiB, wait=False)
    finish(w1)
    finish(w2)
    assert a.lines(r"vm1-root: extended %s" % d1.dev)
    assert a.lines(r"vm2-data: extended %s" % d2.dev)
    assert d1.size() >= 40 * MiB and d2.size() >= 40 * MiB
    s1.read_back(0x41, 0, 40 * MiB)
    s2.read_back(0x42, 0, 40 * MiB)
    a.stop()
    s1.stop()
    s2.stop()
    d1.check()
    d2.check()


def test_check_option_and_bad_configuration(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[daemon a]\nsocket = /x\n[disk d]\ndaemon = a\ndevice = d\nchunk = 1.5M\n")
    r = subprocess.run([AGENT, "-c", conf], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == f"thinblk-agent: {conf}:6: 'chunk' must be a whole number of MiB, " \
                       "not '1.5M'\n"
    r = subprocess.run([AGENT, "--check", "-s", "/x", "-d", "vda", "--chunk", "256M"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ("disk vda: daemon default, device vda, method loop, chunk 256 MiB, watermark "
            "512 MiB, cap 110% of the virtual size for qcow2") in r.stderr
    r = subprocess.run([AGENT, "--device", "vda"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == "thinblk-agent: --device, --node and the policy options need --socket\n"


def test_no_arguments_is_a_usage_error():
    r = subprocess.run([AGENT], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("thinblk-agent: nothing to watch: give --socket or a "
                               "configuration file (--config)\nUsage: thinblk-agent"), r.stderr


def test_check_reports_every_mistake_at_once(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[daemon a]\nsocket = /x\n[disk d]\nchunk = 1.5M\nmethod = dd\n"
                    "[box b]\nkey = ignored\n[agent]\npoll-interval = soon\n")
    r = subprocess.run([AGENT, "--check", "-c", conf], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (1, (
        f"thinblk-agent: {conf}:4: 'chunk' must be a whole number of MiB, not '1.5M'\n"
        f"thinblk-agent: {conf}:5: 'method' expects 'loop', 'hook' or 'rbd', not 'dd'\n"
        f"thinblk-agent: {conf}:6: unknown section '[box]': expected [agent], [daemon NAME] "
        "or [disk NAME]\n"
        f"thinblk-agent: {conf}:9: 'poll-interval' expects a duration of at least 1ms, such "
        "as '2s' or '500ms', not 'soon'\n"))
    conf.write_text("[daemon a]\n[disk d]\ndaemon = b\n[disk e]\ndevice = e\n")
    r = subprocess.run([AGENT, "--check", "-c", conf], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (1, (
        "thinblk-agent: daemon 'a' has no socket\n"
        "thinblk-agent: disk 'd': no such daemon\n"
        "thinblk-agent: disk 'd': give either device or node\n"
        "thinblk-agent: disk 'd': no method (method = loop, hook or rbd)\n"
        "thinblk-agent: disk 'e': no method (method = loop, hook or rbd)\n"))


def test_check_refuses_a_hook_that_cannot_run(tmp_path):
    not_exec = tmp_path / "hook.sh"
    not_exec.write_text("#!/bin/sh\n")
    r = subprocess.run([AGENT, "--check", "-s", "/x", "--hook", tmp_path / "nope"],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (
        1, f"thinblk-agent: disk '(every device)': hook '{tmp_path}/nope': No such file or "
           "directory\n")
    r = subprocess.run([AGENT, "--check", "-s", "/x", "--hook", not_exec],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (
        1, f"thinblk-agent: disk '(every device)': hook '{not_exec}' is not an executable "
           "file\n")
    r = subprocess.run([AGENT, "--check", "-s", "/x", "--hook", "hook.sh"],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (
        1, "thinblk-agent: disk '(every device)': hook 'hook.sh' is not an absolute path\n")


def test_reconnect_max_option_and_log_timestamps():
    r = subprocess.run([AGENT, "--check", "-s", "/x", "--reconnect-max", "soon"],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (
        1, "thinblk-agent: --reconnect-max: 'reconnect-max' expects a duration of at least "
           "1ms, such as '2s' or '500ms', not 'soon'\n")
    r = subprocess.run([AGENT, "--check", "-s", "/x", "--reconnect-max", "1s",
                        "--log-timestamps"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z thinblk-agent: info: disk ",
                    r.stderr), r.stderr


def test_metrics_file(daemons, loopdisks, agents, tmp_path):
    """--metrics-file: written at start, then after each change; extensions, their durations
    and the cap, in Prometheus' format."""
    path = tmp_path / "agent.prom"
    disk = loopdisks(size=16 * MiB)
    s = Served(daemons, disk)
    a = agents("-s", s.mon, "--chunk", "4M", "--watermark", "2M", "--cap", "24M",
               "--poll-interval", "200ms", "--metrics-file", path)
    wait_for(path.exists, "the metrics file written at start")
    w = s.write(0x77, 0, 32 * MiB, step=MiB, wait=False)
    a.wait_log(r"disk0: stopped on ENOSPC at its cap")
    wait_for(lambda: "thinblk_agent_disk_at_cap{daemon=\"default\",disk=\"disk0\"} 1"
             in path.read_text(), "at its cap in the metrics file")
    m = exposition(path.read_text())
    labels = {"daemon": "default", "disk": "disk0"}
    done = len(a.lines(r"disk0: extended "))
    assert done >= 1
    assert value(m, "thinblk_agent_extensions_total", **labels) == done
    assert value(m, "thinblk_agent_extension_duration_seconds_count", **labels) == done
    assert value(m, "thinblk_agent_extension_duration_seconds_sum", **labels) > 0
    assert value(m, "thinblk_agent_extension_failures_total", **labels) == 0
    assert not (tmp_path / "agent.prom.tmp").exists()
    w.kill()
    w.wait()
    a.stop()
    s.stop()
