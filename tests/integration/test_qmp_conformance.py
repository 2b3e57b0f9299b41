"""Replays the QEMU 7.2 QMP transcript (tests/data/qmp-protocol-qemu-7.2.txt) against thinblkd.

The transcript was captured on one connection, so it is replayed on one connection, case
after case in file order; each case is its own test item. Replies and events must equal the
transcript's as parsed JSON, except for event timestamp values and the version numbers and
package string of the greeting and of query-version (their shape is still checked).

Format: "<- " a message received, "-> " a message sent (lines without a prefix continue the
message sent before them), "# " starts a case. What precedes the first case is the greeting.
"""

import json
from pathlib import Path

import pytest

from conftest import DaemonFactory, normalize

TRANSCRIPT = Path(__file__).resolve().parents[1] / "data" / "qmp-protocol-qemu-7.2.txt"


class Case:
    def __init__(self, title):
        self.title = title
        self.steps = []   # ("send", str) or ("recv", str), in order

    def __repr__(self):
        return f"Case({self.title!r})"


def parse_transcript(text):
    cases = [Case("greeting")]
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("# "):
            cases.append(Case(line[2:].strip()))
        elif line.startswith("-> "):
            cases[-1].steps.append(["send", line[3:]])
        elif line.startswith("<- "):
            cases[-1].steps.append(["recv", line[3:]])
        elif line.strip() == "":
            continue
        elif cases[-1].steps and cases[-1].steps[-1][0] == "send":
            cases[-1].steps[-1][1] += "\n" + line
        else:
            raise ValueError(f"{TRANSCRIPT}:{number}: cannot parse {line!r}")
    for case in cases:
        if not any(kind == "recv" for kind, _ in case.steps):
            raise ValueError(f"case {case.title!r} expects nothing")
    return cases


CASES = parse_transcript(TRANSCRIPT.read_text())


def test_transcript_parses_into_the_expected_cases():
    """Guards the parser: a format change must not silently drop cases."""
    assert len(CASES) == 21
    assert CASES[0].title == "greeting"
    split = next(c for c in CASES if c.title == "message split across lines")
    assert split.steps[0] == ["send", '{"execute":"query-status"\n}']
    two = next(c for c in CASES if c.title == "two messages without separator")
    assert [kind for kind, _ in two.steps] == ["send", "recv", "recv"]


class Replay:
    """One connection to one daemon, advanced case by case."""

    def __init__(self, daemon):
        self.client = daemon.client(greeting=False)
        self.next_case = 0
        self.dirty = False     # a case failed half-way: messages may be pending
        self.resyncs = 0

    def resync(self):
        """Skip whatever a failed case left unread: send a harmless command with a unique id
        and read up to its reply (an error before negotiation, which still echoes the id)."""
        self.resyncs += 1
        marker = f"resync-{self.resyncs}"
        self.client.execute("query-status", id=marker)
        while self.client.read_message().get("id") != marker:
            pass
        self.dirty = False

    def run(self, case):
        if self.dirty:
            self.resync()
        self.dirty = True
        for kind, text in case.steps:
            if kind == "send":
                self.client.send(text.encode() + b"\n")
            else:
                expected = json.loads(text)
                got = self.client.read_message()
                assert normalize(got) == normalize(expected), \
                    f"case {case.title!r}: expected {text}, got {json.dumps(got)}"
        self.dirty = False

    def advance_to(self, index):
        """Run the cases before `index` not run yet (when a test is selected on its own),
        checking them too: a later case depends on the state they leave."""
        while self.next_case < index:
            self.next_case += 1
            self.run(CASES[self.next_case - 1])


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    factory = DaemonFactory(tmp_path_factory.mktemp("conformance"))
    daemon = factory.start()
    yield Replay(daemon)
    problems = factory.cleanup()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.title for c in CASES])
def test_transcript_case(replay, index):
    replay.advance_to(index)
    assert replay.next_case == index, "cases must run in file order on one connection"
    replay.next_case += 1
    replay.run(CASES[index])
