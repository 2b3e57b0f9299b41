#!/usr/bin/python3
"""qcow2-report.py RESULTS.TSV: the tables of bench/qcow2.sh (see README.md).

Each line of RESULTS.TSV is: job, kind (alloc|steady), server, status (ok|skipped|failed),
fio JSON file, server CPU seconds and wall seconds of the sampling window, VmHWM in KiB,
the qemu-img check verdict (clean|leaks|CORRUPT|check-failed) and its JSON file ("-" where
there is none). For an alloc job the CPU window is the whole fio run and CPU per op is CPU
over fio's op count; for a steady job it is a window inside the measured period and CPU per
op is CPU per second over fio's ops per second.

A job and server may appear several times (REPEAT rounds): the row shown is the round with
the median throughput (the lower middle one for an even count), and "spread" is
(max - min) / median of the throughput over the rounds that ran. The check column counts
every round, not only the one shown; for alloc jobs it adds the image's end offset after the
round shown (qemu-img check's image-end-offset: how much file the allocation used). Prints one markdown table for all jobs, then the goals
against qemu-storage-daemon. Standard library only.
"""
import json
import sys

from fiojson import bs_bytes, fio_job

REFS = ("qsd", "qemu-nbd")  # the ratio columns: thinblkd / each of these
GOAL_TPUT = 1.5             # thinblkd / qsd throughput, at least
GOAL_CPU = 0.5              # thinblkd / qsd CPU per op, at most
BIG_BS = 64 * 1024          # at or above this, throughput is in MB/s


def fio_numbers(path):
    """(ops per second, bytes per second, total ops, block size, iodepth) from fio's JSON."""
    job, opts = fio_job(path)
    iops = job["read"]["iops"] + job["write"]["iops"]
    bw = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
    total = job["read"]["total_ios"] + job["write"]["total_ios"]
    return iops, bw, total, bs_bytes(opts["bs"]), opts.get("iodepth", "1")


def check_detail(verdict, path):
    """(the check column's text for one round: the verdict, with counts when not clean;
    the image's end offset in bytes from the same report, or None)."""
    if verdict == "-":
        return verdict, None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return verdict, None
    n = {"leaks": doc.get("leaks", 0), "CORRUPT": doc.get("corruptions", 0)}.get(verdict)
    return (f"{verdict} {n}" if n else verdict), doc.get("image-end-offset")


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def pick(runs):
    """The run with the median throughput among the ok ones, with the spread; else the first."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["tput"])
    checks = [r["check"] for r in runs if r["check"] != "-"]
    bad = [c for c in checks if c != "clean"]
    check = ", ".join(bad) if bad else ("clean" if checks else "-")
    if not ok:
        return dict(runs[0], spread=None, rounds=0, tries=len(runs), checks=check)
    mid = ok[(len(ok) - 1) // 2]
    spread = (ok[-1]["tput"] - ok[0]["tput"]) / mid["tput"] if mid["tput"] else None
    return dict(mid, spread=spread, rounds=len(ok), tries=len(runs), checks=check)


def main():
    runs = {}
    for line in open(sys.argv[1]):
        (job, kind, server, status, path, cpu, wall, hwm, verdict,
         chk) = line.rstrip("\n").split("\t")
        check, end = check_detail(verdict, chk)
        row = {"server": server, "status": status, "tput": None, "cpu_us": None,
               "hwm": int(hwm) if hwm.isdigit() else None, "check": check,
               "end": end if kind == "alloc" else None}
        if status == "ok":
            iops, bw, total, bs, depth = fio_numbers(path)
            row.update(big=bs >= BIG_BS, depth=depth)
            row["tput"] = bw / 1e6 if bs >= BIG_BS else iops
            if cpu != "-" and float(wall) > 0:
                if kind == "alloc" and total > 0:
                    row["cpu_us"] = float(cpu) / total * 1e6
                elif kind != "alloc" and iops > 0:
                    row["cpu_us"] = float(cpu) / float(wall) / iops * 1e6
        runs.setdefault(job, {}).setdefault(server, []).append(row)

    cols = ["job", "server", "throughput"] + [f"/{r}" for r in REFS] + ["CPU us/op"] + \
        [f"/{r}" for r in REFS] + ["peak RSS KiB"] + [f"/{r}" for r in REFS] + \
        ["spread", "qemu-img check"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " if i < 2 or c == "qemu-img check" else " ---: "
                         for i, c in enumerate(cols)) + "|")
    goals = []
    for job, by_server in runs.items():
        jrows = [pick(r) for r in by_server.values()]
        ref = {r["server"]: r for r in jrows if r["status"] == "ok"}
        for r in jrows:
            cells = [job, r["server"]]
            if r["status"] != "ok":
                cells += [r["status"]] + ["-"] * (len(cols) - 4) + [r["checks"]]
                print("| " + " | ".join(cells) + " |")
                continue
            tput = (f"{r['tput']:.0f} MB/s" if r["big"] else f"{r['tput'] / 1000:.1f}k IOPS")
            cpu = f"{r['cpu_us']:.2f}" if r["cpu_us"] is not None else "-"
            spread = f"{r['spread'] * 100:.0f}%" if r["rounds"] > 1 else "-"
            if r["rounds"] < r["tries"]:
                spread += f" ({r['tries'] - r['rounds']} failed)"
            cells.append(tput)
            cells += [ratio(r["tput"], ref[x]["tput"]) if x in ref else "-" for x in REFS]
            cells.append(cpu)
            cells += [ratio(r["cpu_us"], ref[x]["cpu_us"]) if x in ref else "-" for x in REFS]
            cells.append(str(r["hwm"]) if r["hwm"] is not None else "-")
            cells += [ratio(r["hwm"], ref[x]["hwm"]) if x in ref else "-" for x in REFS]
            if r["end"] is not None:
                cells += [spread, f"{r['checks']}; file {r['end'] / (1 << 20):.0f} MiB"]
            else:
                cells += [spread, r["checks"]]
            print("| " + " | ".join(cells) + " |")
        if "thinblkd" in ref and "qsd" in ref:
            t, q = ref["thinblkd"], ref["qsd"]
            tr = t["tput"] / q["tput"] if q["tput"] else None
            cr = t["cpu_us"] / q["cpu_us"] if t["cpu_us"] is not None and q["cpu_us"] else None
            goals.append((job, tr, cr))

    if goals:
        print()
        print(f"| goal (thinblkd/qsd) | throughput >= {GOAL_TPUT} | | CPU us/op <= {GOAL_CPU} | |")
        print("| --- | ---: | --- | ---: | --- |")
        for job, tr, cr in goals:
            tv = "PASS" if tr is not None and tr >= GOAL_TPUT else "MISS"
            cv = "PASS" if cr is not None and cr <= GOAL_CPU else "MISS"
            ts = f"{tr:.2f}" if tr is not None else "-"
            cs = f"{cr:.2f}" if cr is not None else "-"
            print(f"| {job} | {ts} | {tv} | {cs} | {cv} |")


if __name__ == "__main__":
    main()
