#!/usr/bin/python3
"""vhost-report.py RESULTS.TSV: the tables of bench/vhost.sh (see README.md).

Each line of RESULTS.TSV is: job, server, status (ok|skipped|failed), the client's JSON file
(thinblk-vhost-io's summary line for the vhost-user rows, fio's report for the others), server
CPU seconds and wall seconds of the sampling window, VmHWM in KiB ("-" where there is none).
Rounds are picked as in nbd-report.py (the median throughput, with the spread). Prints one
table per job, then the goals. Standard library only.
"""
import importlib
import json
import sys

nbd_report = importlib.import_module("nbd-report")   # its round picking and ratios
fio_numbers, pick, ratio = nbd_report.fio_numbers, nbd_report.pick, nbd_report.ratio

BASE = "qsd"            # the reference of every ratio
NBD = "thinblkd-nbd"    # thinblkd's own NBD export, on the 4k random reads
GOAL_TPUT, GOAL_CPU, GOAL_NBD = 1.5, 0.5, 2.0


def numbers(path):
    """(ops per second, throughput, is MB/s) from either client's JSON."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith('{"rw"'):
        v = json.loads(text)
        big = v["bs"] >= nbd_report.BIG_BS
        return v["iops"], (v["mbps"] if big else v["iops"]), big
    iops, bw, bs, _, _ = fio_numbers(path)
    big = bs >= nbd_report.BIG_BS
    return iops, (bw / 1e6 if big else iops), big


def main():
    runs = {}
    for line in open(sys.argv[1]):
        job, server, status, path, cpu, wall, hwm = line.rstrip("\n").split("\t")
        row = {"server": server, "status": status, "tput": None, "cpu_us": None,
               "hwm": None if hwm == "-" else int(hwm)}
        if status == "ok":
            ops, tput, big = numbers(path)
            row.update(tput=tput, big=big)
            if cpu != "-" and float(wall) > 0 and ops > 0:
                row["cpu_us"] = float(cpu) / float(wall) / ops * 1e6
        runs.setdefault(job, {}).setdefault(server, []).append(row)

    head = (f"{'server':<12} | {'throughput':>13} | {'/qsd':>5} | {'CPU us/op':>9} | "
            f"{'/qsd':>5} | {'peak RSS KiB':>12} | {'/qsd':>5} | {'spread':>6}")
    goals = []
    for job, by_server in runs.items():
        rows = {s: pick(r) for s, r in by_server.items()}
        ok = {s: r for s, r in rows.items() if r["status"] == "ok"}
        base = ok.get(BASE, {})
        print(job)
        print(head)
        print("-" * len(head))
        for s, r in rows.items():
            if r["status"] != "ok":
                print(f"{s:<12} | {r['status']:>13} |")
                continue
            tput = f"{r['tput']:.0f} MB/s" if r["big"] else f"{r['tput'] / 1000:.1f}k IOPS"
            cpu = f"{r['cpu_us']:.2f}" if r["cpu_us"] is not None else "-"
            hwm = r["hwm"] if r["hwm"] is not None else "-"
            spread = f"{r['spread'] * 100:.0f}%" if r["rounds"] > 1 else "-"
            print(f"{s:<12} | {tput:>13} | {ratio(r['tput'], base.get('tput')):>5} | "
                  f"{cpu:>9} | {ratio(r['cpu_us'], base.get('cpu_us')):>5} | {hwm:>12} | "
                  f"{ratio(r['hwm'], base.get('hwm')):>5} | {spread:>6}")
        print()
        t = ok.get("thinblkd")
        if t and base:
            goals.append((job, f"thinblkd/qsd throughput >= {GOAL_TPUT}",
                          ratio(t["tput"], base["tput"]),
                          base["tput"] and t["tput"] / base["tput"] >= GOAL_TPUT))
            c = ratio(t["cpu_us"], base.get("cpu_us"))
            goals.append((job, f"thinblkd/qsd CPU per request <= {GOAL_CPU}", c,
                          c != "-" and float(c) <= GOAL_CPU))
        if t and NBD in ok:
            n = ok[NBD]
            goals.append((job, f"thinblkd vhost-user/NBD throughput >= {GOAL_NBD}",
                          ratio(t["tput"], n["tput"]),
                          n["tput"] and t["tput"] / n["tput"] >= GOAL_NBD))
    if goals:
        print("Goals (informational):")
        width = max(len(g[0]) for g in goals)
        for job, what, value, met in goals:
            print(f"  {job:<{width}}  {what:<40} {value:>6}  {'PASS' if met else 'MISS'}")


if __name__ == "__main__":
    main()
