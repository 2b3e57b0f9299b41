#!/usr/bin/python3
"""bench/rbd.py: an RBD image served over NBD by thinblkd and by qemu-storage-daemon, side by
side in one run, with fio's own rbd engine (librbd in the load generator, no server) as the
limit (issue 16).

  bench/rbd.py [--build DIR] [--runtime S] [--size SIZE] [--repeat N] [--jobs NAME,...]
               [--servers NAME,...]

A throwaway single-node Ceph cluster (tests/integration/ceph.py: one monitor, one manager, one
memstore OSD on 127.0.0.1) holds one image of SIZE (default 256 MiB, written through once with
fio's rbd engine so that reads find data: memstore is not sparse, so keep it small). Each
server in turn serves it as a writable NBD export on a Unix socket, opened the same way
(`--blockdev driver=rbd,pool=...,image=...,conf=...`), and fio's nbd engine runs each job
against it for RUNTIME seconds (default 10):

  randread4k   4 KiB random reads, iodepth 16      seqread1m   1 MiB sequential reads, iodepth 4
  randwrite4k  4 KiB random writes, iodepth 16     seqwrite1m  1 MiB sequential writes, iodepth 4

Servers: thinblkd; qsd (qemu-storage-daemon 7.2 with cache.direct=on: librbd's cache off, as
thinblkd always has it, so both complete a write only once the cluster has it); qsd-cache
(qsd's default, librbd's writeback cache on: writes complete from the cache, and a write's
error surfaces at the next flush, which is why thinblkd never runs that way); fio-rbd (no
server: fio's rbd engine, the limit).

Reported per job and server: IOPS and MB/s (fio's), the server's CPU time per request in
microseconds (utime + stime of the server process over the run, from /proc/PID/stat, over
fio's completed requests), and ratios to qsd. The OSD is on the same 2-core machine and is
the bottleneck: the ratios say how much a server adds to it, not what a real cluster would
do. Needs root (the cluster), fio with the nbd and rbd engines, qemu-storage-daemon and
Ceph (ceph-mon, ceph-mgr, ceph-osd, ceph-common).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
import ceph  # noqa: E402  (the tests' cluster)

MiB = 1 << 20
JOBS = {
    "randread4k": ("randread", "4k", 16),
    "randwrite4k": ("randwrite", "4k", 16),
    "seqread1m": ("read", "1M", 4),
    "seqwrite1m": ("write", "1M", 4),
}
SERVERS = ("thinblkd", "qsd", "qsd-cache", "fio-rbd")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def die(msg):
    print(f"rbd.py: {msg}", file=sys.stderr)
    sys.exit(1)


def cpu_seconds(pid):
    """utime + stime of pid so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_socket(path, proc, log, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            die(f"server exited with {proc.returncode} before listening: see {log}")
        if time.monotonic() > deadline:
            die(f"server not listening on {path} after {timeout} s: see {log}")
        time.sleep(0.05)


def server_cmd(name, build, spec, sock):
    blockdev = (f"driver=rbd,node-name=r0,pool={spec['pool']},image={spec['image']},"
                f"conf={spec['conf']}")
    export = "type=nbd,id=e0,node-name=r0,name=e0,writable=on"
    nbd_server = f"addr.type=unix,addr.path={sock}"
    if name == "thinblkd":
        return [str(build / "src" / "daemon" / "thinblkd"), "--blockdev", blockdev,
                "--nbd-server", nbd_server, "--export", export]
    if name in ("qsd", "qsd-cache"):
        if name == "qsd":
            blockdev += ",cache.direct=on"
        return ["qemu-storage-daemon", "--blockdev", blockdev, "--nbd-server", nbd_server,
                "--export", export]
    raise ValueError(name)


def fio(job, target, runtime, spec, sock, log):
    rw, bs, depth = JOBS[job]
    args = ["fio", "--name", job, "--rw", rw, "--bs", bs, "--iodepth", str(depth),
            "--size", str(spec["size"]), "--time_based", "--runtime", str(runtime),
            "--output-format", "json", "--randrepeat", "0"]
    env = dict(os.environ)
    if target == "fio-rbd":
        args += ["--ioengine", "rbd", "--clientname", "admin", "--pool", spec["pool"],
                 "--rbdname", spec["image"]]
        env["CEPH_CONF"] = spec["conf"]
    else:
        args += ["--ioengine", "nbd", "--uri", f"nbd+unix:///e0?socket={sock}"]
    with open(log, "a") as f:
        f.write("+ " + " ".join(args) + "\n")
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=runtime + 120)
    with open(log, "a") as f:
        f.write(r.stderr)
    if r.returncode != 0:
        die(f"fio {job} on {target} failed ({r.returncode}): see {log}")
    out = json.loads(r.stdout[r.stdout.index("{"):])
    j = out["jobs"][0]
    side = j["read"] if rw.endswith("read") else j["write"]
    return side["iops"], side["bw_bytes"] / 1e6, side["total_ios"]


def run(name, job, args, spec, tmp):
    sock, log = str(tmp / f"{name}.sock"), tmp / f"{name}.log"
    if name == "fio-rbd":
        iops, mbs, _ = fio(job, name, args.runtime, spec, None, log)
        return iops, mbs, None
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = server_cmd(name, args.build, spec, sock)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    try:
        wait_socket(sock, proc, log)
        cpu0 = cpu_seconds(proc.pid)
        iops, mbs, ios = fio(job, name, args.runtime, spec, sock, log)
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    if rc != 0:
        die(f"{name} exited with {rc} on SIGTERM: see {log}")
    return iops, mbs, cpu / ios * 1e6 if ios else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, default=HERE.parent / "build")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--servers", default=",".join(SERVERS))
    args = ap.parse_args()
    args.build = args.build.resolve()
    jobs, servers = args.jobs.split(","), args.servers.split(",")
    for j in jobs:
        if j not in JOBS:
            die(f"unknown job {j} (known: {', '.join(JOBS)})")
    for s in servers:
        if s not in SERVERS:
            die(f"unknown server {s} (known: {', '.join(SERVERS)})")
    if "thinblkd" in servers and not (args.build / "src" / "daemon" / "thinblkd").exists():
        die(f"no thinblkd in {args.build} (ninja -C {args.build})")
    size = int(subprocess.run(["numfmt", "--from=iec", args.size], capture_output=True,
                              text=True, check=True).stdout)
    if os.geteuid() != 0:
        die("needs root (the Ceph cluster)")

    tmp = Path(tempfile.mkdtemp(prefix="thinblk-rbd-bench-"))
    cluster = ceph.Cluster(tempfile.mkdtemp(prefix="thinblk-ceph-"))
    try:
        t0 = time.monotonic()
        cluster.start()
        pool = cluster.new_pool()
        cluster.create_image(pool, "bench", size)
        spec = {"pool": pool, "image": "bench", "conf": cluster.conf, "size": size}
        # Written through once, so reads find data everywhere.
        subprocess.run(["fio", "--name", "fill", "--ioengine", "rbd", "--clientname", "admin",
                        "--pool", pool, "--rbdname", "bench", "--rw", "write", "--bs", "4M",
                        "--iodepth", "4", "--size", str(size)], check=True,
                       capture_output=True, env=dict(os.environ, CEPH_CONF=cluster.conf),
                       timeout=300)
        print(f"machine: {os.cpu_count()} CPUs, kernel {platform.release()}, load "
              f"{os.getloadavg()[0]:.1f}; ceph {cluster.cli('--version').split()[2]}, "
              f"cluster up and image written in {time.monotonic() - t0:.0f} s")
        results = {}   # (job, server): [(iops, mbs, cpu_us)]
        for job in jobs:
            for _ in range(args.repeat):
                for s in servers:
                    results.setdefault((job, s), []).append(run(s, job, args, spec, tmp))
    finally:
        cluster.stop()
        import shutil
        shutil.rmtree(cluster.dir, ignore_errors=True)

    def med(job, s, i):
        vals = [r[i] for r in results[(job, s)] if r[i] is not None]
        return statistics.median(vals) if vals else None

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"\nruntime {args.runtime} s per run, {args.repeat} round(s) (median), image "
          f"{args.size}; logs in {tmp}\n")
    print("| job | server | IOPS | MB/s | server CPU µs/req | IOPS / qsd | CPU / qsd |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for job in jobs:
        base_iops = med(job, "qsd", 0) if "qsd" in servers else None
        base_cpu = med(job, "qsd", 2) if "qsd" in servers else None
        for s in servers:
            iops, mbs, cpu = med(job, s, 0), med(job, s, 1), med(job, s, 2)
            r_iops = iops / base_iops if base_iops else None
            r_cpu = cpu / base_cpu if cpu is not None and base_cpu else None
            print(f"| {job} | {s} | {iops:.0f} | {mbs:.1f} | {fmt(cpu, '.1f')} | "
                  f"{fmt(r_iops, '.2f')} | {fmt(r_cpu, '.2f')} |")


if __name__ == "__main__":
    main()
