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
- extensions: successful extensions while fio ran, from the agent's log ("extended ... in N ms":
  N is the extension's own time, the child process from fork to exit, as the agent measured it);
- space -> I/O (method hook): for each pause, RESUME minus the moment the space was there, the
  stamp thin-hook.sh takes after losetup -c returned (or the STOP, if later). It includes the
  hook's own exit (bash) and the agent noticing it: an upper bound of the agent's part;
- agent -> I/O: RESUME minus the time the agent's "extended" line was read (or the STOP, if
  later): a lower bound of the agent's part (the line is written after the agent saw the child
  exit, and read by a pipe a little after that); 0 when the RESUME came first;
- pause - extension: each pause minus the own time of the extension that ended it. The goal,
  "a stop resolved within the hook's own time plus 1 ms", is a maximum of at most 1 ms (an
  extension that started before the STOP makes it smaller, even negative); "within extension +
  1 ms" counts the pauses that met it.
"""

import json
import re
import statistics
import sys
from pathlib import Path

# The agent's log line when an extension succeeded / started (thinblk-agent(8), LOG).
EXTENDED_RE = re.compile(r": extended \S+ from .* in ([0-9.]+) ms")
EXTENDING_RE = re.compile(r": extending \S+ from \d+ to \d+ \(pid \d+\)")
FAILED_RE = re.compile(r": extending \S+ from .* failed in ")


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
    ended = sum(1 for _, text in lines if EXTENDED_RE.search(text) or FAILED_RE.search(text))
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


def extensions(lines):
    """(time the agent's line was read, the extension's own duration in seconds as the agent
    measured it, fork to exit) of every successful extension."""
    out = []
    for t, text in lines:
        m = EXTENDED_RE.search(text)
        if m:
            out.append((t, float(m.group(1)) / 1e3))
    return out


def med_max(values):
    return f"{ms(statistics.median(values))} / {ms(max(values))}" if values else "-"


def row(d):
    meta = read_meta(d)
    t0 = float((d / "fio-start").read_text())
    t1 = float((d / "fio-end").read_text())
    ps = pauses(events(d), t0, t1)
    stalls = [(r - s) for s, r in ps if r is not None]
    exts = extensions(agent_lines(d))
    hook_ends = sorted(h["end"] for h in hooks(d) if h["ok"])
    to_io, agent_to_io, over = [], [], []
    for s, r in ps:
        if r is None:
            continue
        # The extension that ended this pause: the last one that started before the RESUME
        # (its line is written before the agent sends cont, but may be read after the RESUME).
        done = [e for e in exts if e[0] - e[1] <= r]
        if done:
            t, dur = done[-1]
            agent_to_io.append(max(0.0, r - max(t, s)))
            over.append((r - s) - dur)
        there = [t for t in hook_ends if t <= r]
        if there:
            to_io.append(r - max(there[-1], s))
    unresolved = sum(1 for _, r in ps if r is None)
    size = int((d / "final-size").read_text()) if (d / "final-size").exists() else 0
    return [
        meta["job"], meta["method"], meta["chunk"], meta["watermark"],
        fio_rate(d, meta["job"]),
        str(sum(1 for t, _ in exts if t >= t0)),
        med_max([dur for t, dur in exts if t >= t0]),
        str(len(ps)) + (f" ({unresolved} unresolved)" if unresolved else ""),
        ms(sum(stalls)) if stalls else "0",
        ms(max(stalls)) if stalls else "-",
        med_max(to_io),
        med_max(agent_to_io),
        med_max(over),
        f"{sum(1 for v in over if v <= 0.001)}/{len(over)}" if over else "-",
        f"{size >> 20}",
    ]


HEADER = ["job", "method", "chunk", "watermark", "write rate", "extensions",
          "extension ms (median / max)", "pauses", "stall ms", "max pause ms",
          "space->I/O ms (median / max)", "agent->I/O ms (median / max)",
          "pause - extension ms (median / max)", "within extension + 1 ms", "final MiB"]


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
