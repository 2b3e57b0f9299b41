#!/usr/bin/python3
"""bench/qcow2-crash.py: what a crash costs a qcow2 image, and what opening a large one costs.

  bench/qcow2-crash.py [--build DIR] leaks [--kills N] [--cluster-size BYTES] [--servers ...]
  bench/qcow2-crash.py [--build DIR] open [--size SIZE] [--repeat N] [--servers ...]

leaks: for each server, an empty 1 GiB qcow2 image on /dev/shm; N rounds of: start the
  server on it, write 4 KiB at random clusters (libnbd, 16 in flight, a flush every 32),
  SIGKILL it once a seeded random amount (64 KiB .. 2 MiB) has been acknowledged, then
  `qemu-img check` (leaked clusters left by the kill; plus those with a refcount past the end
  of the file, which qemu-img check does not count); then start the server again, wait until
  it serves, and count again (`qemu-img check -U`: leaked clusters still there once it has
  reopened the image, before it writes anything). The same seeds for every server.
open: an image of SIZE (default 1T) with every L2 table and data cluster allocated
  (qemu-img create -o preallocation=metadata: a sparse file of ~SIZE/400 of metadata on
  /dev/shm), then grown by 1 GiB left unallocated; for each server, the time from its start until an NBD client can connect,
  median of N. thinblkd once more after it was killed with clusters reserved ahead (a reopen
  that reclaims them).

Servers: thinblkd (BUILD/src/daemon/thinblkd, default: the tree's build), qsd
(qemu-storage-daemon). Needs qemu-img, nbdinfo and python3-libnbd (Debian's /usr/bin/python3).
Prints one table per mode; exits 1 if something could not run, 3 if an image was corrupt.
"""
import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

HERE = Path(__file__).resolve().parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def die(msg):
    print(f"qcow2-crash: {msg}", file=sys.stderr)
    sys.exit(1)


def server_argv(name, binary, img, sock):
    if name == "thinblkd":
        return [binary, "--blockdev", f"driver=file,node-name=f0,filename={img}",
                "--blockdev", "driver=qcow2,node-name=q0,file=f0",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e0,node-name=q0,name=disk,writable=on"]
    return [binary, "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", "driver=qcow2,node-name=q0,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=q0,name=disk,writable=on"]


def start(name, binary, img, sock, log):
    """The server, and the seconds from its start until an NBD client connects."""
    if os.path.lexists(sock):
        os.unlink(sock)
    t0 = time.monotonic()
    proc = subprocess.Popen(server_argv(name, binary, img, sock), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log)
    uri = f"nbd+unix:///disk?socket={sock}"
    while True:
        if proc.poll() is not None:
            die(f"{name} exited with status {proc.returncode}; see {log.name}")
        if os.path.exists(sock) and subprocess.run(
                ["nbdinfo", "--can", "connect", uri], capture_output=True).returncode == 0:
            return proc, time.monotonic() - t0
        if time.monotonic() - t0 > 120:
            proc.kill()
            die(f"{name} not serving after 120 s")
        time.sleep(0.002)   # polling interval while the server opens the image


def counted_past_end(img):
    """Clusters with a refcount at or past the end of the file. Leaks too, but qemu-img check
    compares refcounts up to the end of the file only: clusters reserved and never written
    (thinblkd's reservation ahead) are not in its count."""
    with open(img, "rb") as f:
        hdr = f.read(104)
        cs = 1 << int.from_bytes(hdr[20:24], "big")
        order = int.from_bytes(hdr[96:100], "big") if int.from_bytes(hdr[4:8], "big") >= 3 else 4
        rt_off, rt_clusters = int.from_bytes(hdr[48:56], "big"), int.from_bytes(hdr[56:60], "big")
        end = (f.seek(0, os.SEEK_END) + cs - 1) // cs
        f.seek(rt_off)
        rt = f.read(rt_clusters * cs)
        per_block, past = cs * 8 >> order, 0
        for b in range(len(rt) // 8):
            rb = int.from_bytes(rt[8 * b:8 * b + 8], "big") & ~0x1ff
            if not rb or (b + 1) * per_block <= end:
                continue
            f.seek(rb)
            block = f.read(cs)
            for i in range(max(0, end - b * per_block), per_block):
                bit = i << order
                if order < 3:
                    past += (block[bit // 8] >> (bit % 8)) & ((1 << (1 << order)) - 1) != 0
                else:
                    w = 1 << (order - 3)
                    past += any(block[i * w:(i + 1) * w])
    return past


def check(img, live=False):
    """qemu-img check: (leaked clusters, those past the end of the file included;
    corruptions)."""
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json"]
                       + (["-U"] if live else []) + [str(img)], capture_output=True, text=True)
    if r.returncode not in (0, 2, 3):
        die(f"qemu-img check failed: {r.stderr}")
    j = json.loads(r.stdout)
    return (j.get("leaks", 0) + counted_past_end(img),
            j.get("corruptions", 0) + j.get("check-errors", 0))


def write_until_killed(proc, sock, seed, vsize, cs):
    rnd = random.Random(seed)
    kill_at = rnd.randrange(64 * KiB, 2 * MiB)
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk?socket={sock}")
    done, inflight, n = 0, set(), 0
    try:
        while done < kill_at:
            while len(inflight) < 16:
                off = rnd.randrange(vsize // cs) * cs + rnd.randrange(max(cs // (4 * KiB), 1)) * 4 * KiB
                inflight.add(h.aio_pwrite(bytearray(rnd.randbytes(4 * KiB)), off))
                n += 1
                if n % 32 == 0:
                    inflight.add(h.aio_flush())
            h.poll(-1)
            for c in list(inflight):
                if h.aio_command_completed(c):
                    inflight.discard(c)
                    done += 4 * KiB
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        try:
            h.close()
        except Exception:
            pass


def mode_leaks(args, servers, work, logs):
    cs, vsize = args.cluster_size, GiB
    rows, corrupt = [], 0
    for name, binary in servers:
        img, sock = work / f"{name}.qcow2", work / f"{name}.sock"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"cluster_size={cs}", str(img), str(vsize)], check=True)
        after_kill, after_reopen = [], []
        before = 0   # leaked clusters in the image before the round
        with open(logs / f"{name}.log", "ab") as log:
            for k in range(args.kills):
                proc, _ = start(name, binary, img, sock, log)
                write_until_killed(proc, sock, 1000 + k, vsize, cs)
                leaks, bad = check(img)
                after_kill.append(leaks - before)
                corrupt += bad
                proc, _ = start(name, binary, img, sock, log)
                before, bad = check(img, live=True)
                after_reopen.append(before)
                corrupt += bad
                proc.send_signal(signal.SIGTERM)
                proc.wait()
        leaks, bad = check(img)
        corrupt += bad
        rows.append((name, after_kill, after_reopen, leaks, img.stat().st_size))
    print(f"leaked clusters per kill: {args.kills} kills, {cs // KiB} KiB clusters, "
          f"1 GiB image, 4 KiB random writes (16 in flight)")
    print("new leaks per kill: leaked clusters a kill added; after reopen: leaked clusters in "
          "the image once the server has opened it again")
    print(f"{'server':10} {'new leaks/kill: median':>22} {'max':>5} {'sum':>6} "
          f"{'after reopen: max':>18} {'last':>5} {'end: leaks':>10} {'file MiB':>9}")
    for name, ak, ar, end, size in rows:
        print(f"{name:10} {statistics.median(ak):>22.0f} {max(ak):>5} {sum(ak):>6} "
              f"{max(ar):>18} {ar[-1]:>5} {end:>10} {size / MiB:>9.1f}")
    return corrupt


def mode_open(args, servers, work, logs):
    img, sock = work / "big.qcow2", work / "open.sock"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=65536,preallocation=metadata", str(img), args.size], check=True)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(img)], capture_output=True,
                          text=True, check=True)
    vsize = json.loads(info.stdout)["virtual-size"]
    subprocess.run(["qemu-img", "resize", "-q", str(img), "+1G"], check=True)
    made = time.monotonic() - t0
    st = img.stat()
    print(f"open time: {args.size} qcow2, 64 KiB clusters, preallocation=metadata "
          f"({st.st_blocks * 512 / MiB:.0f} MiB of metadata, made in {made:.1f} s), "
          f"start until an NBD client connects, median of {args.repeat}")
    print(f"{'server':22} {'median s':>9} {'min s':>7} {'max s':>7}")
    corrupt = 0
    for name, binary in servers:
        times = []
        with open(logs / f"{name}.log", "ab") as log:
            for _ in range(args.repeat):
                proc, t = start(name, binary, img, sock, log)
                times.append(t)
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            print(f"{name:22} {statistics.median(times):>9.3f} {min(times):>7.3f} "
                  f"{max(times):>7.3f}")
            if name == "thinblkd":
                # Killed while clusters are reserved ahead (4 MiB written into the
                # unallocated gigabyte after SIZE): the next open reclaims them.
                times = []
                for k in range(args.repeat):
                    proc, _ = start(name, binary, img, sock, log)
                    h = nbd.NBD()
                    h.connect_uri(f"nbd+unix:///disk?socket={sock}")
                    h.pwrite(random.Random(k).randbytes(4 * MiB), vsize + k * 4 * MiB)
                    h.flush()
                    h.shutdown()
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    leaks, bad = check(img)
                    corrupt += bad
                    proc, t = start(name, binary, img, sock, log)
                    times.append(t)
                    left, bad = check(img, live=True)
                    corrupt += bad
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
                print(f"{'thinblkd after kill -9':22} {statistics.median(times):>9.3f} "
                      f"{min(times):>7.3f} {max(times):>7.3f}  ({leaks} leaked clusters "
                      f"before the last open, {left} after)")
    return corrupt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=str(HERE.parent / "build"))
    ap.add_argument("--servers", default="thinblkd,qsd")
    sub = ap.add_subparsers(dest="mode", required=True)
    lk = sub.add_parser("leaks")
    lk.add_argument("--kills", type=int, default=10)
    lk.add_argument("--cluster-size", type=int, default=64 * KiB)
    op = sub.add_parser("open")
    op.add_argument("--size", default="1T")
    op.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    servers = []
    for s in args.servers.split(","):
        if s == "thinblkd":
            b = Path(args.build) / "src" / "daemon" / "thinblkd"
            if not os.access(b, os.X_OK):
                die(f"missing {b} (build it: ninja -C {args.build})")
            servers.append((s, str(b)))
        elif s == "qsd":
            b = shutil.which("qemu-storage-daemon")
            if not b:
                die("missing qemu-storage-daemon (package qemu-system-x86)")
            servers.append((s, b))
        else:
            die(f"unknown server {s}")
    for tool in ("qemu-img", "nbdinfo"):
        if not shutil.which(tool):
            die(f"missing {tool}")
    work = Path(tempfile.mkdtemp(prefix="thinblk-crash.", dir="/dev/shm"))
    logs = Path(tempfile.mkdtemp(prefix="thinblk-crash-logs."))
    try:
        print(f"build: {args.build}; logs in {logs}")
        corrupt = (mode_leaks if args.mode == "leaks" else mode_open)(args, servers, work, logs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if corrupt:
        print(f"CORRUPT: qemu-img check found {corrupt} errors", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
