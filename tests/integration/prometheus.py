"""A strict parser of Prometheus' text exposition format (0.0.4), for the tests of
thinblkctl metrics and thinblk-agent --metrics-file.

promtool (in Debian's prometheus package) checks the format too, but the package is large for
one check; this parser refuses what the format does not allow instead.
"""
import math
import re

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL},?)*)\}})? (\S+)$")


def unescape(v):
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def exposition(text):
    """{(name, frozenset(labels.items())): value}, or an AssertionError naming the line that
    breaks the format: HELP and TYPE once per family and before its samples, a family's
    samples together (a summary's NAME_sum and NAME_count), counters named _total, label
    syntax and escaping, float values."""
    assert text.endswith("\n")
    samples, types, helps, done = {}, {}, set(), set()
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(NAME, name) and name not in helps, line
            assert name not in done and name not in types, line
            helps.add(name)
            if current:
                done.add(current)
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and name not in types, line
            assert kind in ("counter", "gauge", "summary"), line
            assert kind != "counter" or name.endswith("_total"), line
            types[name] = kind
            continue
        assert not line.startswith("#"), line
        m = SAMPLE.match(line)
        assert m, line
        name, labels, value = m.group(1), m.group(2) or "", m.group(m.lastindex)
        family = name
        if types.get(current) == "summary" and name in (current + "_sum", current + "_count"):
            family = current
        assert family == current and family in types, f"sample outside its family: {line}"
        pairs = re.findall(LABEL, labels)
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels, line
        assert len({k for k, _ in pairs}) == len(pairs), line
        v = float(value)
        assert not math.isnan(v), line
        key = (name, frozenset((k, unescape(v)) for k, v in pairs))
        assert key not in samples, f"duplicate sample: {line}"
        samples[key] = v
    return samples


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]
