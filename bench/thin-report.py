#!/usr/bin/python3
"""thin-report.py RUN_DIR...: the table of bench/thin.sh, one row per run directory.
thin-report.py --idle RUN_DIR: exit 0 if the agent has no extension running (used by thin.sh).

A run directory holds: meta (key=value words), events.jsonl (qmp-events.py: thinblkd's events
with their timestamps), agent.log (the agent's stderr, each line prefixed with the wall-clock time
it was read), hook.log (thin-hook.sh: "<start-ns> <end-ns> <dev> <cur> <new> <status>" per run of
the hook), fio.json, fio-start and fio-end (wall clock, seconds), final-size (bytes).

Per run:
- pauses: STOP events while fio ran; stall: the sum (and max) of STOP -> RESUME, from the events'
  own timestamps (thinblkd's clock, microseconds);
- space -> I/O: for each pause, RESUME minus the moment the space was there: the end of the hook
  run that ended last before the RESUME (method hook: thin-hook.sh's stamp after losetup -c), or
  the time the agent's line saying the extension succeeded was read (method loop: an upper bound
  of when the space was there, so a lower bound of the delay; 0 if the line came after RESUME);
- over hook: for method hook, each pause's stall minus the run time of the hook that ended it:
  the goal is at most 1 ms (a stop resolved within the hook's own time plus 1 ms);
- extensions: successful extensions during the run (hook runs, or the agent's log lines).
"""

import json
import re
import statistics
import sys
from pathlib import Path

# The agent's log line when an extension succeeded / started (thinblk-agent(8), LOG).
EXTENDED_RE = re.compile(r"extended")
EXTENDING_RE = re.compile(r"extending")


def read_meta(d):
    return dict(w.split("=", 1) for w in (d / "meta").read_text().split() if "=" in w)


def events(d):
    out = []
    p = d / "events.jsonl"
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue    # a line cut short when the logger was stopped
        if "event" in e:
            ts = e["timestamp"]
            e["t"] = ts["seconds"] + ts["microseconds"] / 1e6
            out.append(e)
    return out


def agent_lines(d):
    p = d / "agent.log"
    out = []
    if p.exists():
        for line in p.read_text(errors="replace").splitlines():
            t, _, text = line.partition(" ")
            try:
                out.append((float(t), text))
            except ValueError:
                pass
    return out


def hooks(d):
    p = d / "hook.log"
    out = []
    if p.exists():
        for line in p.read_text().splitlines():
            f = line.split()
            if len(f) == 6:
                out.append({"start": int(f[0]) / 1e9, "end": int(f[1]) / 1e9,
                            "new": int(f[4]), "ok": f[5] == "0"})
    return out


def idle(d):
    """No extension running: as many ended as started (hook log or agent log)."""
    lines = agent_lines(d)
    started = sum(1 for _, text in lines if EXTENDING_RE.search(text))
    ended = sum(1 for _, text in lines if EXTENDED_RE.search(text) or "failed" in text)
    return started <= ended


def pauses(evs, t0, t1):
    """(stop_time, resume_time or None) for every STOP between t0 and t1."""
    out = []
    stop = None
    for e in evs:
        if e["event"] == "STOP" and t0 <= e["t"] <= t1 + 60:
            stop = e["t"]
        elif e["event"] == "RESUME" and stop is not None:
            out.append((stop, e["t"]))
            stop = None
    if stop is not None:
        out.append((stop, None))
    return out


def ms(v):
    return "-" if v is None else f"{v * 1e3:.1f}"


def fio_rate(d, job):
    try:
        j = json.loads((d / "fio.json").read_text())
    except (OSError, ValueError):
        return "failed"
    w = j["jobs"][0]["write"]
    if job.startswith("seq"):
        return f"{w['bw_bytes'] / 1e6:.0f} MB/s"
    return f"{w['iops']:.0f} IOPS ({w['bw_bytes'] / 1e6:.0f} MB/s)"


def row(d):
    meta = read_meta(d)
    t0 = float((d / "fio-start").read_text())
    t1 = float((d / "fio-end").read_text())
    evs = events(d)
    ps = pauses(evs, t0, t1)
    stalls = [(r - s) for s, r in ps if r is not None]
    hs = [h for h in hooks(d) if h["ok"]]
    lines = agent_lines(d)
    if meta["method"] == "hook":
        there = sorted(h["end"] for h in hs)
        ext = sum(1 for h in hs if h["end"] >= t0)
    else:
        there = sorted(t for t, text in lines if EXTENDED_RE.search(text))
        ext = sum(1 for t in there if t >= t0)
    to_io, over = [], []
    for s, r in ps:
        if r is None:
            continue
        before = [t for t in there if t <= r]
        if before:
            to_io.append(r - max(before[-1], s))
        if meta["method"] == "hook":
            ended = [h for h in hs if h["end"] <= r]
            if ended:
                h = ended[-1]
                over.append((r - s) - (h["end"] - h["start"]))
    hook_ms = [h["end"] - h["start"] for h in hs if h["end"] >= t0]
    unresolved = sum(1 for _, r in ps if r is None)
    size = int((d / "final-size").read_text()) if (d / "final-size").exists() else 0
    cells = [
        meta["job"], meta["method"], meta["chunk"], meta["watermark"],
        fio_rate(d, meta["job"]),
        str(ext),
        str(len(ps)) + (f" ({unresolved} unresolved)" if unresolved else ""),
        ms(sum(stalls)) if stalls else "0",
        ms(max(stalls)) if stalls else "-",
        (f"{ms(statistics.median(to_io))} / {ms(max(to_io))}" if to_io else "-"),
        (f"{ms(statistics.median(hook_ms))}" if hook_ms else "-"),
        (f"{ms(max(over))}" if over else "-"),
        f"{size >> 20}",
    ]
    return cells


HEADER = ["job", "method", "chunk", "watermark", "write rate", "extensions", "pauses",
          "stall ms", "max pause ms", "space->I/O ms (median / max)", "hook ms (median)",
          "max (pause - hook) ms", "final MiB"]


def main():
    args = sys.argv[1:]
    if args and args[0] == "--idle":
        sys.exit(0 if idle(Path(args[1])) else 1)
    if not args:
        sys.exit(__doc__.strip().splitlines()[0])
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for a in args:
        d = Path(a)
        try:
            print("| " + " | ".join(row(d)) + " |")
        except (OSError, KeyError, ValueError) as e:
            print(f"| {d.name}: incomplete run ({e}) |")


if __name__ == "__main__":
    main()
