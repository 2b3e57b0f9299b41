#!/usr/bin/python3
"""scripts/demo.py [BUILD_DIR]: thin provisioning with a real guest, in two scenarios (run it
through scripts/demo.sh, which sets up and builds first).

Each scenario: a sparse backing file of 32 MiB attached as a loop device, with a 4 GiB qcow2
image on it; thinblkd serving it over NBD; a Linux guest (QEMU TCG, tests/guest) writing 192 MiB
of random data (six times the allocation) one 16 MiB segment at a time, then reading it back.
With THINBLK_EXPORT=vhost-user-blk in the environment, thinblkd exports the disk as a
vhost-user-blk device instead and the guest gets it as vhost-user-blk-pci (its RAM a shared
memfd); the host then reads the disk back with thinblk-vhost-io once the guest is gone.

1. "agent keeps up": thinblk-agent runs from the start (chunk 32M, watermark 32M): it extends the
   volume as the guest writes, and the disk never stops.
2. "stopped, agent late": nobody watches; the volume runs out, thinblkd stops and holds the
   guest's write. Then thinblk-agent is started: it finds the daemon stopped on ENOSPC, extends
   the volume and resumes it.

It prints what happens as it happens (the agent's log, thinblkd's STOP/RESUME, the guest's
segments), then the pauses, the extensions and the checksums: what the guest wrote, what it read
back, and what the host reads from the export. Exits 0 if both scenarios end with matching
checksums and the expected pauses (none in 1, one in 2). Needs root.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "guest"))
import guest as kit  # noqa: E402
import thin  # noqa: E402

MIB = kit.MIB
INITIAL = 32 * MIB
VIRTUAL_SIZE = 4 << 30
WRITE_MB = 192
SEG_MB = 16
CHUNK = WATERMARK = "32M"
TIMEOUT = 600
HOLD = 2        # seconds scenario 2 leaves the disk stopped before starting the agent
EXPORT = os.environ.get("THINBLK_EXPORT") or "nbd"    # or vhost-user-blk


def say(text=""):
    print(text, flush=True)


class Feed:
    """Prints new lines of the agent's log, thinblkd's run-state events and the guest's
    segment markers as they come, with the seconds since the scenario started."""

    def __init__(self, t0, events_path):
        self.t0 = t0
        self.events_path = events_path
        self.events = []
        self.agent_path = None
        self.done = {"agent": 0, "events": 0, "seg": 0}

    def _lines(self, path, key):
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        new = lines[self.done[key]:]
        # A line still being written has no newline yet: leave it for next time.
        if new and not Path(path).read_text(errors="replace").endswith("\n"):
            new = new[:-1]
        self.done[key] += len(new)
        return new

    def stamp(self):
        return f"{time.monotonic() - self.t0:6.1f}s"

    def poll(self, guest=None):
        if self.agent_path:
            for line in self._lines(self.agent_path, "agent"):
                if ": debug: " not in line:
                    say(f"{self.stamp()}  {line}")
        for line in self._lines(self.events_path, "events"):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if "event" not in e:
                continue
            self.events.append(e)
            if e["event"] in ("STOP", "RESUME"):
                say(f"{self.stamp()}  thinblkd: {e['event']}")
        if guest is not None:
            segs = guest.segments()
            for s in segs[self.done["seg"]:]:
                say(f"{self.stamp()}  guest: wrote segment {s['i']} ({s['off']}-"
                    f"{s['off'] + SEG_MB} MiB), dd status {s['dd-status']}")
            self.done["seg"] = len(segs)

    def stops(self):
        return [e for e in self.events if e["event"] == "STOP"]

    def stall(self):
        total, stop = 0.0, None
        for e in self.events:
            t = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
            if e["event"] == "STOP":
                stop = t
            elif e["event"] == "RESUME" and stop is not None:
                total += t - stop
                stop = None
        return total


class Stack:
    """The store, thinblkd, the event logger and (when started) the agent, in a work dir."""

    def __init__(self, build):
        self.build = Path(build)
        self.dir = Path(tempfile.mkdtemp(prefix="thinblk-demo-", dir="/tmp"))
        self.procs = []
        self.agent = None
        self.store = thin.LoopStore(self.dir / "backing.img", INITIAL, VIRTUAL_SIZE)
        self.qmp_sock = self.dir / "qmp.sock"
        self.nbd_sock = self.dir / "nbd.sock"
        self.vhost_sock = self.dir / "vhost.sock" if EXPORT == "vhost-user-blk" else None
        self.uri = f"nbd+unix:///disk0?socket={self.nbd_sock}"
        self.events_path = self.dir / "events.jsonl"
        argv = thin.thinblkd_argv(self.build / "src/daemon/thinblkd", self.store.dev,
                                  self.qmp_sock, self.nbd_sock, vhost_sock=self.vhost_sock)
        self.thinblkd = self._start(argv, "thinblkd.log")
        sock = self.vhost_sock or self.nbd_sock
        kit.wait_until(lambda: self._alive(self.thinblkd) and sock.exists()
                       and self.qmp_sock.exists(), 30, "thinblkd's sockets")
        self.logger = self._start(["/usr/bin/python3", str(ROOT / "bench/qmp-events.py"),
                                   str(self.qmp_sock), str(self.events_path)], "events.err")
        kit.wait_until(lambda: self.events_path.exists() and
                       '"ready"' in self.events_path.read_text(), 30, "the event logger")

    def _start(self, argv, log):
        with open(self.dir / log, "wb") as out:
            p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def _alive(self, p):
        if p.poll() is not None:
            raise RuntimeError(f"{p.args[0]} exited with {p.returncode}")
        return True

    def start_agent(self):
        config = thin.write_agent_config(
            self.dir / "agent.conf", {"demo": self.qmp_sock},
            [thin.AgentDisk("disk0", "demo", chunk=CHUNK, watermark=WATERMARK)])
        self.agent = self._start(thin.agent_argv(self.build / "src/agent/thinblk-agent", config),
                                 "agent.log")
        return self.dir / "agent.log"

    def disk(self):
        """The guest's disk on this stack's export."""
        if self.vhost_sock:
            return kit.VhostUserBlkDisk(str(self.vhost_sock))
        return kit.NbdDisk(str(self.nbd_sock), "disk0")

    def host_digest(self):
        """The stream job's digest as the host reads the export: over NBD, or, for a
        vhost-user-blk export (one frontend at a time: call it once the guest is gone), with
        thinblk-vhost-io into a file."""
        if not self.vhost_sock:
            return kit.nbd_stream_digest(self.uri, WRITE_MB, SEG_MB)
        out = self.dir / "readback.raw"
        argv = [str(self.build / "src/vhost-io/thinblk-vhost-io"), "-s", str(self.vhost_sock),
                "-l", f"{WRITE_MB}M", "-d", "8", "--output", str(out), "read"]
        # QEMU has exited, but thinblkd may not have seen its connection close yet, and
        # refuses a second frontend meanwhile (exit status 3): try again for a while.
        deadline = time.monotonic() + 10
        while (rc := subprocess.run(argv, stdin=subprocess.DEVNULL).returncode) == 3 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        if rc != 0:
            raise RuntimeError(f"thinblk-vhost-io read exited with {rc}")
        with open(out, "rb") as f:
            def read(offset, length):
                f.seek(offset)
                return f.read(length)
            return kit.digest_list(kit.stream_segment_digests(read, WRITE_MB, SEG_MB))

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def query(build, st, command):
    """COMMAND's result through thinblkctl, on one line."""
    out = subprocess.run([str(Path(build) / "src/ctl/thinblkctl"), "-s", str(st.qmp_sock),
                          command], capture_output=True, text=True).stdout
    try:
        return json.dumps(json.loads(out))
    except ValueError:
        return out.strip()


def scenario(n, title, build, image, agent_late):
    say(f"=== {n}. {title} ({EXPORT}) ===")
    say(f"    a {INITIAL >> 20} MiB volume (loop device, qcow2 of {VIRTUAL_SIZE >> 30} GiB); the "
        f"guest writes {WRITE_MB} MiB; agent policy: chunk {CHUNK}, watermark {WATERMARK}")
    st = Stack(build)
    t0 = time.monotonic()
    feed = Feed(t0, st.events_path)
    try:
        if not agent_late:
            feed.agent_path = st.start_agent()
        with kit.Guest(image, st.disk(), job="stream",
                       mb=WRITE_MB, seg=SEG_MB, workdir=st.dir / "guest") as g:
            agent_started = not agent_late
            deadline = time.monotonic() + TIMEOUT
            while g.running() and time.monotonic() < deadline:
                feed.poll(g)
                if not agent_started and feed.stops():
                    say(f"{feed.stamp()}  the disk has stopped; nobody is watching. "
                        f"query-status: {query(build, st, 'query-status')}")
                    held = len(g.segments())
                    say(f"{feed.stamp()}  the guest is held, not failed: {held} segments "
                        f"written, its write waiting; volume {st.store.size() >> 20} MiB. "
                        f"Leaving it so for {HOLD} s")
                    time.sleep(HOLD)   # to show that nothing moves, not to synchronise
                    say(f"{feed.stamp()}  still stopped: "
                        f"{query(build, st, '__org.thinblk_query-stop-reason')}; "
                        f"{len(g.segments()) - held} more segments written")
                    say(f"{feed.stamp()}  starting thinblk-agent")
                    feed.agent_path = st.start_agent()
                    agent_started = True
                time.sleep(0.1)   # the feed's refresh interval
            _, rc = g.wait(60)
            feed.poll(g)
            feed.poll()
        if not g.markers("RESULT"):
            tail = "\n".join(g.console.splitlines()[-15:])
            say(f"--- {n}. FAILED: QEMU exited with {rc} before the guest's result:\n"
                f"{g.stderr()}\n{tail}\n")
            return False
        r = g.result()
        host = st.host_digest()
        extensions = [line for line in (st.dir / "agent.log").read_text().splitlines()
                      if ": extended " in line]
        ok = (rc == 0 and r["dd-status"] == 0 and r["read-status"] == 0 and not g.io_error
              and r["write-sha256"] == r["readback-sha256"] == host)
        stops = len(feed.stops())
        expected = 1 if agent_late else 0
        say(f"--- {n}. result: guest ran {g.elapsed:.1f} s; pauses: {stops} (total "
            f"{feed.stall() * 1e3:.1f} ms stopped); extensions: {len(extensions)}; volume "
            f"{INITIAL >> 20} MiB -> {st.store.size() >> 20} MiB")
        say(f"    guest wrote      sha256 {r['write-sha256']}")
        say(f"    guest read back  sha256 {r['readback-sha256']}")
        say(f"    host reads       sha256 {host} (over {EXPORT})")
        say(f"    guest I/O errors: {'yes' if g.io_error else 'none'}; checksums "
            f"{'match' if ok else 'DO NOT MATCH'}; pauses {stops} (expected {expected})")
        say()
        return ok and stops == expected
    finally:
        st.close()


def main():
    build = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build").resolve()
    if os.geteuid() != 0:
        sys.exit("demo.py: needs root (loop devices); run scripts/demo.sh")
    if EXPORT not in ("nbd", "vhost-user-blk"):
        sys.exit(f"demo.py: THINBLK_EXPORT must be nbd or vhost-user-blk, not {EXPORT!r}")
    for b in ("src/daemon/thinblkd", "src/agent/thinblk-agent", "src/ctl/thinblkctl",
              "src/vhost-io/thinblk-vhost-io"):
        if not os.access(build / b, os.X_OK):
            sys.exit(f"demo.py: missing {build / b}: build first (ninja -C {build})")
    image = kit.build_guest()
    ok1 = scenario(1, "the agent keeps up", build, image, agent_late=False)
    ok2 = scenario(2, "the disk stops; the agent, started late, resumes it", build, image,
                   agent_late=True)
    say("demo: " + ("both scenarios as expected" if ok1 and ok2 else "FAILED"))
    sys.exit(0 if ok1 and ok2 else 1)


if __name__ == "__main__":
    main()
