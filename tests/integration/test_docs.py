"""The documentation checked against the daemon and the source, so that it cannot drift:

- `thinblkd --help`'s list of drivers is exactly the drivers blockdev-add accepts;
- docs/qmp.md's query-commands example lists the daemon's commands, in its order;
- every error text docs/qmp.md quotes is one the source can produce.

The error texts are found this way: an "Errors" paragraph of docs/qmp.md starts at a line that
begins with "Errors" and runs to the end of the list that follows it; every `"..."` in it (a
double-quoted string in backticks, which may run over a line break, read as one space) is an
error text, as is the first cell of each row of a table whose first column is `desc` (the
JSON errors); some string literal of src/*.c (adjacent literals joined, as the compiler
does) must be able to print it whole: its printf conversions standing for anything, such as
the placeholders of the docs (NAME, NODE, FILE...).
"""
import json
import re
import subprocess
from pathlib import Path

from conftest import THINBLKD

ROOT = Path(__file__).resolve().parents[2]
QMP_MD = ROOT / "docs" / "qmp.md"

# Names a blockdev-add might be given: QEMU's drivers and thinblk's.
CANDIDATE_DRIVERS = ["file", "host_device", "raw", "qcow2", "fault", "qcow", "vmdk", "vdi",
                     "vhdx", "vpc", "luks", "nbd", "null-co", "null-aio", "blkdebug",
                     "throttle", "copy-on-read", "host_cdrom", "nfs", "iscsi", "rbd", "ssh"]


def help_drivers():
    out = subprocess.run([THINBLKD, "--help"], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"drivers: ([a-z0-9_, -]+)\n", out)
    assert m, out
    return m.group(1).split(", ")


def test_help_lists_the_drivers_blockdev_add_accepts(qmp):
    accepted = []
    for i, driver in enumerate(CANDIDATE_DRIVERS):
        r = qmp.cmd("blockdev-add", {"driver": driver, "node-name": f"n{i}"})
        desc = r.get("error", {}).get("desc", "")
        if desc != f"Parameter 'driver' does not accept value '{driver}'":
            accepted.append(driver)
    assert sorted(help_drivers()) == sorted(accepted)


def doc_commands():
    text = QMP_MD.read_text()
    section = text[text.index("### query-commands"):]
    m = re.search(r'^<- (\{"return": \[.*\]\})$', section, re.M)
    return [c["name"] for c in json.loads(m.group(1))["return"]]


def test_query_commands_example_lists_every_command(qmp):
    got = [c["name"] for c in qmp.cmd("query-commands")["return"]]
    assert doc_commands() == got


def doc_error_texts():
    texts, block = [], None
    lines = QMP_MD.read_text().split("\n")
    for i, line in enumerate(lines):
        if re.match(r"Errors\b", line):
            block = [line]
        elif block is not None:
            in_list = line.startswith(("- ", "  ")) or (not line and i + 1 < len(lines)
                                                          and lines[i + 1].startswith("- ")
                                                          and len(block) == 1)
            if in_list:
                block.append(line)
                continue
            texts += re.findall(r'`"((?:[^"`\\]|\\.)+)"`', " ".join(l.strip() for l in block))
            block = None
    return texts + desc_table_texts(lines)


def desc_table_texts(lines):
    """The first cells of a table whose first column is `desc` (the JSON errors)."""
    texts, inside = [], False
    for line in lines:
        if line.startswith("| `desc`"):
            inside = True
        elif inside and line.startswith("|"):
            m = re.match(r"\| `([^`]+)`", line)
            if m:
                texts.append(m.group(1))
        else:
            inside = False
    return texts


def source_literals():
    """Every string literal of src/*.c, adjacent ones joined and PRI macros made %d, as
    printed: error_setg_errno()'s with the ": strerror" it appends, the JSON reader's
    parse_error()'s after the "JSON parse error, " it puts first."""
    literals = []
    for path in sorted((ROOT / "src").rglob("*.c")):
        code = path.read_text()
        code = re.sub(r'"\s*\n\s*"', "", code)              # adjacent literals
        code = re.sub(r'%"\s*PRI\w+\s*"', "%d", code)       # "%" PRIu64 " bytes"
        code = re.sub(r'%"\s*PRI\w+', '%d"', code)           # "... %" PRIu32)
        literals += re.findall(r'"((?:[^"\\\n]|\\.)*)"', code)
        literals += [l + ": %s" for l in
                     re.findall(r'error_setg_errno\([^;]*?"((?:[^"\\\n]|\\.)*)"', code)]
        literals += ["JSON parse error, " + l for l in
                     re.findall(r'parse_error\([^;]*?"((?:[^"\\\n]|\\.)*)"', code)]
    return literals


def literal_pattern(literal):
    """What the literal can print: each printf conversion (or PRI macro) any text."""
    pattern = ""
    for piece in re.split(r'(%%|%[-+ #0-9.*]*(?:hh|h|ll|l|z|j|t)?[a-zA-Z])', literal):
        if piece == "%%":
            pattern += "%"
        elif piece.startswith("%"):
            pattern += ".*"
        else:
            pattern += re.escape(re.sub(r'\\(["\\\'])', r"\1", piece))
    return re.compile(pattern, re.S)


def fixed_length(literal):
    """How many characters the literal prints for certain (its text without conversions)."""
    return len(re.sub(r'%[-+ #0-9.*]*(?:hh|h|ll|l|z|j|t)?[a-zA-Z]', "", literal))


def produced_by(text, literals):
    """Whether a literal prints text, with at least half of text's own words (placeholders,
    upper case, left out) written in it: "%s: %s" does not count for every text."""
    text = text.replace('\\"', '"')
    own = len(re.sub(r"\b[A-Z][A-Z0-9_]*\b", "", text))
    return any(2 * n >= own and p.fullmatch(text) for p, n in literals)


def test_every_error_text_in_qmp_md_is_in_the_source():
    texts = doc_error_texts()
    assert len(texts) > 50
    literals = [(literal_pattern(l), fixed_length(l)) for l in source_literals()]
    assert [t for t in texts if not produced_by(t, literals)] == []


def test_files_qmp_md_cites_exist():
    """Every path of the repository that docs/qmp.md names in backticks is in it."""
    cited = re.findall(r"`((?:src|docs|tests|scripts|shared|bench|fuzz)/[^`\s]+)`",
                       QMP_MD.read_text())
    assert cited
    assert [p for p in cited if not (ROOT / p).exists()] == []
