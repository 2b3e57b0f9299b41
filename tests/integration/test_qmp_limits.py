"""Resource limits of the QMP monitor: nesting depth, message size, token count, and a client
that does not read its output.

QEMU 7.2's JSON streamer (measured): nesting up to 1024 is accepted, 1025 rejected; a message
whose tokens (whitespace excluded) total 64 MiB - 1 bytes is accepted, 64 MiB rejected; up to
2^21 tokens accepted, 2^21 + 1 rejected. QEMU then reports one more "expecting value" error per
closing bracket left of the offending message; thinblk (its documented choice) skips the rest
of that message and reports exactly one error. Against QEMU the extra errors are tolerated.
"""

import json
import os
import select

import pytest

from conftest import (AGAINST_QEMU, RUNNING, TIMEOUT, generic_error, recursion_limit,
                      sanitized_build, thinblk_only, without_timestamp)

MiB = 1 << 20
EXPECTING_VALUE = generic_error("JSON parse error, expecting value")

# QEMU takes about four minutes to lex a 64 MiB message; opt in to run those against it.
slow_on_qemu = pytest.mark.skipif(
    AGAINST_QEMU and os.environ.get("THINBLK_TEST_QEMU_SLOW") != "1",
    reason="QEMU needs ~4 min per 64 MiB message; set THINBLK_TEST_QEMU_SLOW=1")


# Waiting for the answer to a message of many megabytes: QEMU lexes ~250 KB/s, thinblk under
# the sanitizers is slow too.
BIG_TIMEOUT = 6 * TIMEOUT


def expect_limit_error(client, desc, next_id):
    """The one error for an over-limit message, then the reply to the command sent after it
    (id next_id). QEMU's extra errors for the leftover closing brackets are skipped."""
    assert client.read_message(BIG_TIMEOUT) == generic_error(desc)
    msg = client.read_message()
    if AGAINST_QEMU:
        while msg == EXPECTING_VALUE:
            msg = client.read_message()
    assert msg == {"return": RUNNING, "id": next_id}


def nested(kind, depth):
    """(JSON text, value) of `depth` nested empty arrays or objects."""
    if kind == "array":
        text, value = "[]", []
        for _ in range(depth - 1):
            value = [value]
        return "[" * (depth - 1) + text + "]" * (depth - 1), value
    value = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1), value


# ---- nesting depth ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["array", "object"])
def test_nesting_depth_1024_accepted(qmp, kind):
    text, value = nested(kind, 1023)          # inside the message object: depth 1024
    with recursion_limit(10000):
        qmp.send(b'{"execute":"query-status","id":' + text.encode() + b"}\n")
        assert qmp.read_message() == {"return": RUNNING, "id": value}


@pytest.mark.parametrize("kind", ["array", "object"])
def test_nesting_depth_1025_rejected_once(qmp, kind):
    text, _ = nested(kind, 1024)              # depth 1025
    qmp.send(b'{"execute":"query-status","id":' + text.encode() + b"}\n")
    qmp.execute("query-status", id="next")
    expect_limit_error(qmp, "JSON nesting depth limit exceeded", "next")


def test_nesting_depth_limit_applies_to_arguments(qmp):
    text, _ = nested("object", 1024)
    qmp.send(b'{"execute":"query-status","arguments":' + text.encode() + b"}\n")
    qmp.execute("query-status", id="next")
    expect_limit_error(qmp, "JSON nesting depth limit exceeded", "next")


@thinblk_only   # QEMU answers with a flood of errors
def test_deep_nesting_far_past_the_limit(qmp):
    """A million open brackets: one error, no stack overflow, no memory blow-up."""
    qmp.send(b'{"execute":"query-status","id":' + b"[" * MiB + b"]" * MiB + b"}\n")
    qmp.execute("query-status", id="next")
    expect_limit_error(qmp, "JSON nesting depth limit exceeded", "next")


# ---- message size -------------------------------------------------------------------------

def message_of_size(total):
    """A message of exactly `total` bytes, no whitespace, answered with a short error."""
    head = b'{"execute":"query-status","arguments":{"bogus":"'
    tail = b'"}}'
    return head + b"a" * (total - len(head) - len(tail)) + tail


@slow_on_qemu
def test_message_just_under_64_mib_accepted(qmp):
    qmp.send(message_of_size(64 * MiB - 1))
    assert qmp.read_message(BIG_TIMEOUT) == generic_error("Parameter 'bogus' is unexpected")
    assert qmp.cmd("query-status", id="next") == {"return": RUNNING, "id": "next"}


@slow_on_qemu
def test_message_of_exactly_64_mib_rejected(qmp):
    qmp.send(message_of_size(64 * MiB))
    qmp.execute("query-status", id="next")
    expect_limit_error(qmp, "JSON token size limit exceeded", "next")


@thinblk_only   # QEMU: its lexer cuts the 65 MiB string and lexes the rest as new input
def test_message_over_64_mib_rejected_once(qmp):
    qmp.send(message_of_size(65 * MiB))
    qmp.execute("query-status", id="next")
    expect_limit_error(qmp, "JSON token size limit exceeded", "next")


# ---- token count --------------------------------------------------------------------------

def message_of_tokens(count):
    """A message of exactly `count` JSON tokens, answered with a short error."""
    # {"execute":"query-status","arguments":{"bogus":[ ... ]}} is 14 tokens around the list;
    # n zeros take 2n - 1 tokens with their commas, n - 1 zeros and one [] take 2n.
    inner = count - 14
    if inner % 2:
        elements = [b"0"] * ((inner + 1) // 2)
    else:
        elements = [b"0"] * (inner // 2 - 1) + [b"[]"]
    return (b'{"execute":"query-status","arguments":{"bogus":[' + b",".join(elements)
            + b"]}}\n")


def test_message_of_2_pow_21_tokens_accepted(qmp):
    qmp.send(message_of_tokens(1 << 21))
    assert qmp.read_message(BIG_TIMEOUT) == generic_error("Parameter 'bogus' is unexpected")


def test_message_of_2_pow_21_plus_1_tokens_rejected(qmp):
    qmp.send(message_of_tokens((1 << 21) + 1))
    qmp.execute("query-status", id="next")
    expect_limit_error(qmp, "JSON token count limit exceeded", "next")


@thinblk_only   # QEMU answers with an error per leftover token
def test_message_far_past_the_token_limit_rejected_once(qmp):
    qmp.send(message_of_tokens(3 << 21))
    qmp.execute("query-status", id="next")
    expect_limit_error(qmp, "JSON token count limit exceeded", "next")


# ---- a client that does not read ----------------------------------------------------------

OUTPUT_LIMIT = 256 * 1024


def peer_closed(client):
    """Whether the daemon has closed this connection, without reading from it."""
    poller = select.poll()
    poller.register(client.sock, select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP) for _, ev in poller.poll(0))


@thinblk_only
def test_client_not_reading_is_disconnected(daemons):
    d = daemons.start(monitor_options=f",x-output-limit={OUTPUT_LIMIT}")
    idle = d.negotiated()          # never reads until the end
    driver = d.negotiated()        # runs stop/cont
    watcher = d.negotiated()       # reads every event as it comes
    with open("/proc/sys/net/core/wmem_max") as f:
        kernel_buffering = 2 * int(f.read())      # the socket's send buffer, at most
    # Bounded, not growing with what the idle client fails to read. Under AddressSanitizer the
    # RSS also holds its quarantine of freed memory (up to 256 MiB by default), which fills
    # with the churn of thousands of events.
    rss_limit_kib = (64 + (256 if sanitized_build() else 0)) * 1024

    batch = 50
    watched = []                   # (raw bytes, event) seen by the watcher
    produced = 0                   # bytes of events sent to each client
    while not (peer_closed(idle) and produced >= 3 * OUTPUT_LIMIT):
        assert produced < 4 * (OUTPUT_LIMIT + kernel_buffering), \
            "the idle client was never disconnected"
        driver.send(b'{"execute":"stop"}{"execute":"cont"}' * batch)
        for _ in range(batch):
            assert driver.reply() == {"return": {}}
            assert driver.reply() == {"return": {}}
        events = driver.take_events()
        assert [without_timestamp(e) for e in events] == \
            [{"event": "STOP"}, {"event": "RESUME"}] * batch
        for _ in range(2 * batch):
            raw = watcher.read_raw()
            watched.append((raw, without_timestamp(json.loads(raw))))
            produced += len(raw)
        assert [e for _, e in watched[-2 * batch:]] == [without_timestamp(e) for e in events]
        assert d.vm_rss_kib() < rss_limit_kib

    # The idle client got a prefix of the event stream (perhaps cut in a message), then EOF.
    messages, rest = idle.read_until_eof()
    assert 0 < len(messages) < len(watched)
    assert [without_timestamp(json.loads(m)) for m in messages] == \
        [e for _, e in watched[:len(messages)]]
    assert watched[len(messages)][0].startswith(rest)
    assert len(b"".join(messages)) <= OUTPUT_LIMIT + kernel_buffering + 1024

    assert driver.cmd("query-status") == {"return": RUNNING}
    assert d.vm_rss_kib() < rss_limit_kib


