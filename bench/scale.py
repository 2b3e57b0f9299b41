#!/usr/bin/python3
"""bench/scale.py: one thinblkd with many exports, groups and QMP clients (issue 15).

  bench/scale.py [--build DIR] [--exports N] [--per-group N] [--clients N] [--monitors N]
                 [--repeat N] [--export-size SIZE] [--write-size SIZE] [--no-qsd]

One thinblkd with EXPORTS (default 200) NBD exports of raw images (EXPORT_SIZE, default 8 MiB,
sparse) in groups of PER_GROUP (default 2: 100 groups, `--group` and `__org.thinblk_group`),
and CLIENTS (default 100) QMP clients connected and negotiated, spread round-robin over
MONITORS monitor sockets (default 1: a thinblkd monitor takes any number of clients).

memory: Rss and Pss from /proc/PID/smaps_rollup of thinblkd with no exports (A), with the
  exports and groups (B), and B with the clients connected (C): per export (B-A)/EXPORTS, per
  client (C-B)/CLIENTS. qemu-storage-daemon with the same exports (the same file+raw nodes and
  NBD exports, no groups: it has none), with none and with all, gives its per export cost.
  No NBD client is connected while memory is read.
stop: group g0's two images sit on a tmpfs of their own; before each round it is shrunk to
  exactly what it holds (mount -o remount,size=USED), so an NBD write (libnbd, WRITE_SIZE,
  default 64 KiB, at an offset never written) to g0's first export fails with a real ENOSPC.
  Measured from just before the write is sent to the moment each client has read
  __org.thinblk_GROUP_STOP: the first client, the median and the last, per round.
cont: the tmpfs is grown by 1 MiB, then `__org.thinblk_group-cont g0` is sent on a separate
  control client; measured from just before sending it to the NBD reply to the parked write
  (the write's call returning), and to the median client's __org.thinblk_GROUP_RESUME.
Both also against the event's own timestamp (the daemon's wall clock as it sends the event,
compared with this process's time.time() when it sent the write or the command): that part
leaves out the fan-out to the clients and this script's reading of them.

Every round waits for every client's GROUP_RESUME before the next. Times are
time.monotonic() in this one Python process: its reading of 100 sockets (one selector loop)
is part of the per-client spread. Needs root (mounts two tmpfs), python3-libnbd
(Debian's /usr/bin/python3) and, unless --no-qsd, qemu-storage-daemon. Prints the machine
and a table; exits 1 if something could not run.
"""
import argparse
import json
import os
import platform
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

HERE = Path(__file__).resolve().parent
KiB, MiB = 1 << 10, 1 << 20


def die(msg):
    print(f"scale.py: {msg}", file=sys.stderr)
    sys.exit(1)


def size_arg(text):
    units = {"K": KiB, "M": MiB, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1:].upper()]
    return int(text)


# ---- QMP, just enough --------------------------------------------------------------------------

class Qmp:
    """One QMP connection: negotiate(), cmd() (events read meanwhile are kept in self.events),
    and feed() for a selector loop that reads many connections at once."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)   # polling interval while the server starts
        self.buf = b""
        self.events = []

    def _read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("monitor closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def negotiate(self):
        assert "QMP" in self._read()
        self.cmd("qmp_capabilities")
        return self

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            m = self._read()
            if "event" in m:
                self.events.append(m)
            elif "error" in m:
                raise RuntimeError(f"{name}: {m['error']}")
            else:
                return m["return"]

    def feed(self, data, now):
        """Adds DATA read at NOW; returns the events it completed as (event, now)."""
        self.buf += data
        out = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            m = json.loads(line)
            if "event" in m:
                out.append((m, now))
        return out

    def close(self):
        self.sock.close()


class Listeners:
    """CLIENTS negotiated QMP connections, read together by one selector loop."""

    def __init__(self, sockets, n):
        self.clients = [Qmp(sockets[i % len(sockets)]).negotiate() for i in range(n)]
        self.sel = selectors.DefaultSelector()
        for c in self.clients:
            c.sock.setblocking(False)
            self.sel.register(c.sock, selectors.EVENT_READ, c)

    def wait_all(self, name, group, timeout=30):
        """Reads until every client has the event NAME for GROUP; returns their times (sorted)
        and the event's own timestamp (the daemon's wall clock when it sent it, seconds)."""
        got = {}
        stamp = None
        deadline = time.monotonic() + timeout
        while len(got) < len(self.clients):
            if time.monotonic() > deadline:
                die(f"{len(got)} of {len(self.clients)} clients got {name} within {timeout} s")
            for key, _ in self.sel.select(1):
                c = key.data
                data = c.sock.recv(65536)
                now = time.monotonic()
                if not data:
                    die("the daemon closed a monitor connection")
                for ev, t in c.feed(data, now):
                    if ev["event"] == name and ev["data"].get("group") == group:
                        got.setdefault(id(c), t)
                        ts = ev["timestamp"]
                        stamp = ts["seconds"] + ts["microseconds"] / 1e6
        return sorted(got.values()), stamp

    def close(self):
        for c in self.clients:
            c.close()


# ---- servers -----------------------------------------------------------------------------------

MEM_KEYS = ("Rss", "Pss", "Private")


def mem_kib(pid):
    """Rss, Pss and Private (Private_Clean + Private_Dirty) of PID in KiB (smaps_rollup).
    Pss and Rss count shared library pages, whose share depends on what else runs;
    Private is the process's own."""
    r = {"Private": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("Rss", "Pss"):
                r[k] = int(rest.split()[0])
            elif k in ("Private_Clean", "Private_Dirty"):
                r["Private"] += int(rest.split()[0])
    return r


def server_argv(kind, binary, run, images, groups, monitors):
    """The command line: MONITORS monitor sockets in RUN, an NBD server, and one file+raw node
    and NBD export per image, each export in its group (thinblkd only; groups[i] is None for
    no group)."""
    argv = [binary]
    socks = [run / f"m{i}.sock" for i in range(monitors)]
    for i, s in enumerate(socks):
        argv += ["--chardev", f"socket,id=m{i},path={s},server=on,wait=off",
                 "--monitor", f"chardev=m{i}"]
    argv += ["--nbd-server", f"addr.type=unix,addr.path={run / 'nbd.sock'}"]
    made = set()
    for i, img in enumerate(images):
        g = groups[i] if kind == "thinblkd" else None
        if g is not None and g not in made:
            argv += ["--group", g]
            made.add(g)
        export = f"type=nbd,id=e{i},node-name=n{i},name=e{i},writable=on"
        if g is not None:
            export += f",__org.thinblk_group={g}"
        argv += ["--blockdev", f"driver=file,node-name=p{i},filename={img}",
                 "--blockdev", f"driver=raw,node-name=n{i},file=p{i}",
                 "--export", export]
    return argv, socks


class Server:
    def __init__(self, kind, binary, run, images, groups, monitors, log):
        for p in run.glob("*.sock"):
            p.unlink()
        argv, self.socks = server_argv(kind, binary, run, images, groups, monitors)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while not all(s.exists() for s in self.socks):
            if self.proc.poll() is not None:
                die(f"{kind} exited with status {self.proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                die(f"{kind}: no monitor socket after 60 s")
            time.sleep(0.01)   # polling interval while the server starts
        self.ctl = Qmp(self.socks[0]).negotiate()
        n = len(self.ctl.cmd("query-block-exports"))
        if n != len(images):
            die(f"{kind} has {n} exports, expected {len(images)}")

    def mem(self):
        time.sleep(0.2)   # let the last replies go out before reading
        return mem_kib(self.proc.pid)

    def stop(self):
        self.ctl.close()
        self.proc.terminate()
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            die("the server ignored SIGTERM for 10 s")
        if rc != 0:
            die(f"the server exited with status {rc} on SIGTERM")


# ---- tmpfs -------------------------------------------------------------------------------------

def mount_tmpfs(path, size):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "thinblk-scale", str(path)],
                   check=True)


def tmpfs_used(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def tmpfs_resize(path, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


# ---- the measurements --------------------------------------------------------------------------

def measure_memory(kind, binary, run, images, groups, monitors, clients, log):
    """{(point): {Rss, Pss}} for no exports, all exports, and all exports with the clients."""
    r = {}
    s = Server(kind, binary, run, [], [], monitors, log)
    r["none"] = s.mem()
    s.stop()
    s = Server(kind, binary, run, images, groups, monitors, log)
    r["exports"] = s.mem()
    if clients:
        lis = Listeners(s.socks, clients)
        r["clients"] = s.mem()
        lis.close()
    s.stop()
    return r


class Writer(threading.Thread):
    """One NBD write in a thread of its own: sent_at just before the call, done_at when the
    reply has been read."""

    def __init__(self, h, data, offset):
        super().__init__(daemon=True)
        self.h, self.data, self.offset = h, data, offset
        self.sent_at = self.done_at = self.sent_wall = None
        self.error = None

    def run(self):
        self.sent_wall = time.time()
        self.sent_at = time.monotonic()
        try:
            self.h.pwrite(self.data, self.offset)
        except nbd.Error as e:
            self.error = str(e)
        self.done_at = time.monotonic()


def measure_stop_cont(s, lis, store, h, repeat, write_size, export_size):
    rounds = []
    data = os.urandom(write_size)
    h.pwrite(data, 0)           # something on the store, so that its used size is not 0
    for i in range(1, repeat + 1):
        offset = (i * write_size) % export_size
        tmpfs_resize(store, tmpfs_used(store))     # full: the next new page fails
        w = Writer(h, data, offset)
        w.start()
        stops, stop_stamp = lis.wait_all("__org.thinblk_GROUP_STOP", "g0")
        if w.done_at is not None:
            die(f"round {i}: the write completed ({w.error or 'ok'}) instead of being parked")
        tmpfs_resize(store, tmpfs_used(store) + MiB)
        t_cont_wall = time.time()
        t_cont = time.monotonic()
        s.ctl.cmd("__org.thinblk_group-cont", {"name": "g0"})
        w.join(30)
        if w.done_at is None or w.error:
            die(f"round {i}: the parked write did not complete after group-cont: {w.error}")
        resumes, resume_stamp = lis.wait_all("__org.thinblk_GROUP_RESUME", "g0")
        s.ctl.events.clear()
        rounds.append({
            "stop_stamp": stop_stamp - w.sent_wall,
            "stop_first": stops[0] - w.sent_at,
            "stop_p50": statistics.median(stops) - w.sent_at,
            "stop_last": stops[-1] - w.sent_at,
            "cont_write": w.done_at - t_cont,
            "cont_stamp": resume_stamp - t_cont_wall,
            "cont_resume_p50": statistics.median(resumes) - t_cont,
        })
    return rounds


def ms(v):
    return f"{v * 1000:.2f}"


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
            f"kernel {platform.release()}, load {open('/proc/loadavg').read().split()[:3]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--build", default=str(HERE.parent / "build"))
    ap.add_argument("--exports", type=int, default=200)
    ap.add_argument("--per-group", type=int, default=2)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--monitors", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--export-size", type=size_arg, default=8 * MiB)
    ap.add_argument("--write-size", type=size_arg, default=64 * KiB)
    ap.add_argument("--no-qsd", action="store_true")
    a = ap.parse_args()
    thinblkd = Path(a.build) / "src/daemon/thinblkd"
    qsd = shutil.which("qemu-storage-daemon")
    if os.geteuid() != 0:
        die("needs root (mounts tmpfs)")
    if not os.access(thinblkd, os.X_OK):
        die(f"missing {thinblkd} (ninja -C {a.build})")
    if not a.no_qsd and qsd is None:
        die("missing qemu-storage-daemon in PATH (or --no-qsd)")
    if a.exports < a.per_group or a.clients < 1:
        die("need at least one group and one client")

    run = Path(tempfile.mkdtemp(prefix="thinblk-scale-", dir="/tmp"))
    bulk, store = run / "bulk", run / "g0"
    mounts = []
    try:
        mount_tmpfs(bulk, "64M")
        mounts.append(bulk)
        mount_tmpfs(store, "64M")
        mounts.append(store)
        images, groups = [], []
        for i in range(a.exports):
            g = i // a.per_group
            img = (store if g == 0 else bulk) / f"e{i}.raw"
            with open(img, "wb") as f:
                f.truncate(a.export_size)
            images.append(img)
            groups.append(f"g{g}")
        log = open(run / "servers.log", "w")
        t_start = time.monotonic()

        mem = {"thinblkd": measure_memory("thinblkd", str(thinblkd), run, images, groups,
                                          a.monitors, a.clients, log)}
        if not a.no_qsd:
            mem["qsd"] = measure_memory("qsd", qsd, run, images, groups, 1, 0, log)

        s = Server("thinblkd", str(thinblkd), run, images, groups, a.monitors, log)
        lis = Listeners(s.socks, a.clients)
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///e0?socket={run / 'nbd.sock'}")
        rounds = measure_stop_cont(s, lis, store, h, a.repeat, a.write_size, a.export_size)
        after = s.mem()
        h.shutdown()
        lis.close()
        s.stop()
        wall = time.monotonic() - t_start
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], check=False)
        shutil.rmtree(run, ignore_errors=True)

    n_groups = -(-a.exports // a.per_group)
    print(f"# scale: {a.exports} exports in {n_groups} groups, {a.clients} QMP clients on "
          f"{a.monitors} monitor(s), {a.repeat} rounds, {wall:.0f} s")
    print(f"# {machine()}")
    print()
    print("| memory (KiB) | Rss | Pss | Private |")
    print("| --- | ---: | ---: | ---: |")
    t = mem["thinblkd"]
    rows = [("thinblkd, no exports", t["none"]),
            (f"thinblkd, {a.exports} exports + {n_groups} groups", t["exports"]),
            (f"thinblkd, + {a.clients} clients", t["clients"]),
            (f"thinblkd, after {a.repeat} stop/cont rounds", after)]
    if "qsd" in mem:
        rows += [("qsd, no exports", mem["qsd"]["none"]),
                 (f"qsd, {a.exports} exports", mem["qsd"]["exports"])]
    for name, m in rows:
        print(f"| {name} | {m['Rss']} | {m['Pss']} | {m['Private']} |")
    print()

    def per(m, a_, b_, n, k):
        return (m[b_][k] - m[a_][k]) / n
    print("| per unit (KiB) | Rss | Pss | Private |")
    print("| --- | ---: | ---: | ---: |")
    units = [("thinblkd per export", t, "none", "exports", a.exports),
             ("thinblkd per client", t, "exports", "clients", a.clients)]
    if "qsd" in mem:
        units.append(("qsd per export", mem["qsd"], "none", "exports", a.exports))
    for name, m, a_, b_, n in units:
        print(f"| {name} | " + " | ".join(f"{per(m, a_, b_, n, k):.1f}" for k in MEM_KEYS)
              + " |")
    if "qsd" in mem:
        ratios = []
        for k in MEM_KEYS:
            qe = per(mem["qsd"], "none", "exports", a.exports, k)
            te = per(t, "none", "exports", a.exports, k)
            ratios.append(f"{te / qe:.2f}" if qe > 0 else "-")
        print("| thinblkd/qsd per export | " + " | ".join(ratios) + " |")
    print()
    print(f"| ms over {a.repeat} rounds | median | min | max |")
    print("| --- | ---: | ---: | ---: |")
    labels = {
        "stop_stamp": "write sent -> GROUP_STOP's timestamp (sent by the daemon)",
        "stop_first": "write sent -> GROUP_STOP, first client",
        "stop_p50": "write sent -> GROUP_STOP, median client",
        "stop_last": f"write sent -> GROUP_STOP, last of {a.clients} clients",
        "cont_write": "group-cont sent -> parked write's NBD reply",
        "cont_stamp": "group-cont sent -> GROUP_RESUME's timestamp",
        "cont_resume_p50": "group-cont sent -> GROUP_RESUME, median client",
    }
    for key, label in labels.items():
        v = [r[key] for r in rounds]
        print(f"| {label} | {ms(statistics.median(v))} | {ms(min(v))} | {ms(max(v))} |")


if __name__ == "__main__":
    main()
