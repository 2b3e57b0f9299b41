#!/usr/bin/python3
"""nbd-report.py RESULTS.TSV: the tables of bench/nbd.sh (see README.md).

Each line of RESULTS.TSV is: job, server, status (ok|skipped|failed), fio JSON file, server
CPU seconds and wall seconds of the sampling window, VmHWM in KiB ("-" where there is none).
A job and server may appear several times (REPEAT rounds): the row shown is the round with
the median throughput (the lower middle one for an even count), and "spread" is
(max - min) / median of the throughput over the rounds that ran. Prints one table per job,
in the order the jobs first appear. Standard library only.
"""
import sys

from fiojson import bs_bytes, fio_job

PEERS = ("nbdkit", "qsd", "qemu-nbd")  # "best peer" is the best of these
BASE = "nbdkit"                        # the CPU/op reference
BIG_BS = 64 * 1024                     # at or above this, throughput is in MB/s


def fio_numbers(path):
    """(ops per second, bytes per second, block size, iodepth, numjobs) from fio's JSON."""
    job, opts = fio_job(path)
    iops = job["read"]["iops"] + job["write"]["iops"]
    bw = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
    return iops, bw, bs_bytes(opts["bs"]), opts.get("iodepth", "1"), opts.get("numjobs", "1")


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def pick(runs):
    """The run with the median throughput among the ok ones, with the spread; else the first."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["tput"])
    if not ok:
        return dict(runs[0], spread=None)
    mid = ok[(len(ok) - 1) // 2]
    spread = (ok[-1]["tput"] - ok[0]["tput"]) / mid["tput"] if mid["tput"] else None
    return dict(mid, spread=spread, rounds=len(ok), tries=len(runs))


def main():
    runs = {}
    for line in open(sys.argv[1]):
        job, server, status, path, cpu, wall, hwm = line.rstrip("\n").split("\t")
        row = {"server": server, "status": status, "ops": None, "tput": None,
               "cpu_us": None, "hwm": hwm}
        if status == "ok":
            iops, bw, bs, depth, numjobs = fio_numbers(path)
            row.update(ops=iops, big=bs >= BIG_BS, depth=depth, numjobs=numjobs)
            row["tput"] = bw / 1e6 if bs >= BIG_BS else iops
            if cpu != "-" and float(wall) > 0 and iops > 0:
                row["cpu_us"] = float(cpu) / float(wall) / iops * 1e6
        runs.setdefault(job, {}).setdefault(server, []).append(row)

    head = (f"{'server':<12} | {'throughput':>13} | {'/best peer':>10} | {'CPU us/op':>9} | "
            f"{'/nbdkit':>7} | {'peak RSS KiB':>12} | {'spread':>6}")
    for job, by_server in runs.items():
        jrows = [pick(r) for r in by_server.values()]
        ok = [r for r in jrows if r["status"] == "ok"]
        best = max((r["tput"] for r in ok if r["server"] in PEERS), default=None)
        base = next((r["cpu_us"] for r in ok if r["server"] == BASE), None)
        desc = ""
        if ok:
            desc = f" (iodepth {ok[0]['depth']}, {ok[0]['numjobs']} fio job(s)/connection(s))"
        print(f"{job}{desc}")
        print(head)
        print("-" * len(head))
        for r in jrows:
            if r["status"] != "ok":
                print(f"{r['server']:<12} | {r['status']:>13} |")
                continue
            tput = (f"{r['tput']:.0f} MB/s" if r["big"] else f"{r['tput'] / 1000:.1f}k IOPS")
            cpu = f"{r['cpu_us']:.2f}" if r["cpu_us"] is not None else "-"
            spread = f"{r['spread'] * 100:.0f}%" if r["rounds"] > 1 else "-"
            if r["rounds"] < r["tries"]:
                spread += f" ({r['tries'] - r['rounds']} failed)"
            print(f"{r['server']:<12} | {tput:>13} | {ratio(r['tput'], best):>10} | {cpu:>9} | "
                  f"{ratio(r['cpu_us'], base):>7} | {r['hwm']:>12} | {spread:>6}")
        print()


if __name__ == "__main__":
    main()
