"""QMP monitor behaviour of thinblkd beyond the transcript: sockets, clients, framing, errors,
events, run state. Expected replies were checked against QEMU 7.2
(THINBLK_TEST_AGAINST_QEMU=1 runs this file against qemu-system-x86_64 -M none)."""

import json
import os
import stat
import time

import pytest

from conftest import (AGAINST_QEMU, COMMANDS, PAUSED, PRELAUNCH, RUNNING,
                      assert_event, command_not_found, generic_error, thinblk_only,
                      without_timestamp)


# ---- sockets and clients ------------------------------------------------------------------

@thinblk_only
def test_socket_mode_is_0600(daemon):
    mode = os.stat(daemon.sockets[0]).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_greeting_exact(daemon):
    c = daemon.client()
    assert c.greeting["QMP"]["capabilities"] == ["oob"]
    assert set(c.greeting) == {"QMP"} and set(c.greeting["QMP"]) == {"version", "capabilities"}
    version = c.greeting["QMP"]["version"]
    assert set(version) == {"qemu", "package"} and set(version["qemu"]) == {"major", "minor",
                                                                             "micro"}
    assert all(type(v) is int for v in version["qemu"].values())
    assert isinstance(version["package"], str)


@thinblk_only
def test_greeting_names_thinblk(daemon):
    assert daemon.client().greeting["QMP"]["version"]["package"].startswith("thinblk ")


def test_two_monitor_sockets_both_serve(daemons):
    d = daemons.start(monitors=2)
    a, b = d.negotiated(0), d.negotiated(1)
    assert a.cmd("query-status", id="a") == {"return": RUNNING, "id": "a"}
    assert b.cmd("query-status", id="b") == {"return": RUNNING, "id": "b"}


def test_event_reaches_the_other_monitor_socket(daemons):
    d = daemons.start(monitors=2)
    a, b = d.negotiated(0), d.negotiated(1)
    assert a.cmd("stop") == {"return": {}}
    assert_event(b.read_message(), "STOP")


@thinblk_only
@pytest.mark.parametrize("form", ["plain", "unix:"])
def test_qmp_short_option(daemons, form):
    rundir = daemons.rundir()
    sock = rundir / "qmp.sock"
    d = daemons.start_raw(["--qmp", ("unix:" if form == "unix:" else "") + str(sock)],
                          [sock], rundir=rundir)
    assert d.negotiated().cmd("query-status") == {"return": RUNNING}


@thinblk_only
def test_twenty_concurrent_clients_on_one_socket(daemon):
    clients = [daemon.client() for _ in range(20)]     # all connected and greeted at once
    for c in clients:
        c.execute("qmp_capabilities")
    for c in clients:
        assert c.read_message() == {"return": {}}
    for i, c in enumerate(clients):
        c.execute("query-status", id=i)
    for i, c in enumerate(clients):
        assert c.read_message() == {"return": RUNNING, "id": i}


def test_events_go_to_every_negotiated_client(daemons):
    d, clients = daemons.start_with_clients(3)
    assert clients[0].cmd("stop") == {"return": {}}
    assert [without_timestamp(e) for e in clients[0].take_events()] == [{"event": "STOP"}]
    for c in clients[1:]:
        assert_event(c.read_message(), "STOP")


def test_no_events_before_negotiation(daemons):
    d, (a, b) = daemons.start_with_clients(2, negotiate=False)
    a.negotiate()                       # b stays in capabilities negotiation
    assert a.cmd("stop") == {"return": {}}
    b.execute("qmp_capabilities")
    assert b.read_message() == {"return": {}}, "STOP was sent before negotiation"
    assert a.cmd("cont") == {"return": {}}
    assert_event(b.read_message(), "RESUME")


def test_events_carry_wall_clock_timestamp(qmp):
    before = time.time()
    assert qmp.cmd("stop") == {"return": {}}
    after = time.time()
    (event,) = qmp.take_events()
    assert_event(event, "STOP")
    ts = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
    assert before - 1 <= ts <= after + 1


def test_client_closing_mid_message_does_not_disturb_others(daemons):
    d, (a, b) = daemons.start_with_clients(2)
    a.send(b'{"execute":"query-st')
    a.close()
    assert b.cmd("query-status") == {"return": RUNNING}


def test_client_closing_without_reading_replies(daemons):
    """Replies to a peer that has gone must not kill the daemon (SIGPIPE, EPIPE)."""
    d, (a, b) = daemons.start_with_clients(2)
    a.send(b'{"execute":"query-version"}\n' * 1000)
    a.close()
    assert b.cmd("query-status") == {"return": RUNNING}
    assert d.running()


# ---- framing ------------------------------------------------------------------------------

def test_message_split_byte_by_byte(qmp):
    for byte in b'{"execute": "query-status", "id": "split"}':
        qmp.send(bytes([byte]))
    assert qmp.read_message() == {"return": RUNNING, "id": "split"}


def test_several_messages_in_one_send(qmp):
    qmp.send(b'{"execute":"query-status","id":1}\n{"execute":"stop","id":2}'
             b'{"execute":"query-status","id":3}\r\n')
    assert qmp.read_message() == {"return": RUNNING, "id": 1}
    assert_event(qmp.read_message(), "STOP")
    assert qmp.read_message() == {"return": {}, "id": 2}
    assert qmp.read_message() == {"return": PAUSED, "id": 3}


def test_whitespace_between_tokens(qmp):
    qmp.send(b' \t\r\n{ "execute" :\t"query-status" ,\r\n "id" : 7 }\n')
    assert qmp.read_message() == {"return": RUNNING, "id": 7}


# ---- malformed input ----------------------------------------------------------------------

@pytest.mark.parametrize("data,desc", [
    (b'{"execute": "query-status",, }', "JSON parse error, expecting value"),
    (b'{"a":tru}', "JSON parse error, invalid keyword 'tru'"),
    (b']', "JSON parse error, expecting value"),
    (b'}', "JSON parse error, expecting value"),
    (b'@', "JSON parse error, stray '@'"),
    (b'\xff', "JSON parse error, stray '\ufffd'"),
], ids=["double-comma", "bad-keyword", "lone-bracket", "lone-brace", "stray-char",
        "invalid-utf8-byte"])
def test_malformed_json_then_valid_command(qmp, data, desc):
    qmp.send(data + b"\n")
    assert qmp.read_message() == generic_error(desc)
    assert qmp.cmd("query-status", id="next") == {"return": RUNNING, "id": "next"}


@pytest.mark.parametrize("data", [b'"abc"', b'42', b'null', b'true', b'[1,2]', b'[]'])
def test_non_object_input(qmp, data):
    qmp.send(data + b"\n")
    assert qmp.read_message() == generic_error("QMP input must be a JSON object")
    assert qmp.cmd("query-status") == {"return": RUNNING}


def test_malformed_json_before_negotiation(daemon):
    c = daemon.client()
    c.send(b'{"execute":,}\n')
    assert c.read_message() == generic_error("JSON parse error, expecting value")
    c.negotiate()


def test_unexpected_top_level_member(qmp):
    qmp.send_json({"execute": "query-status", "control": {}})
    assert qmp.read_message() == generic_error("QMP input member 'control' is unexpected")


def test_arguments_not_an_object(qmp):
    qmp.send_json({"execute": "query-status", "arguments": [1]})
    assert qmp.read_message() == generic_error("QMP input member 'arguments' must be an object")


def test_input_lacking_execute_echoes_id(qmp):
    qmp.send_json({"id": 1})
    assert qmp.read_message() == {"id": 1, **generic_error("QMP input lacks member 'execute'")}


def test_empty_object(qmp):
    qmp.send(b"{}\n")
    assert qmp.read_message() == generic_error("QMP input lacks member 'execute'")


def test_command_before_negotiation_echoes_id(daemon):
    c = daemon.client()
    c.execute("query-status", id=5)
    assert c.read_message() == {"id": 5, **command_not_found(
        "Expecting capabilities negotiation with 'qmp_capabilities'")}


def test_unknown_command_echoes_id(qmp):
    assert qmp.cmd("no-such-command", id="x") == {"id": "x", **command_not_found(
        "The command no-such-command has not been found")}


# ---- qmp_capabilities and out-of-band -----------------------------------------------------

def test_capabilities_enable_oob(daemon):
    c = daemon.client()
    assert c.cmd("qmp_capabilities", {"enable": ["oob"]}, id=1) == {"return": {}, "id": 1}
    assert c.cmd("query-status") == {"return": RUNNING}


def test_capabilities_enable_empty_list(daemon):
    c = daemon.client()
    assert c.cmd("qmp_capabilities", {"enable": []}) == {"return": {}}


def test_capabilities_unknown_capability(daemon):
    c = daemon.client()
    # QEMU 7.2's wording, 'null' included.
    assert c.cmd("qmp_capabilities", {"enable": ["foo"]}) == generic_error(
        "Parameter 'null' does not accept value 'foo'")
    assert c.cmd("query-status") == command_not_found(
        "Expecting capabilities negotiation with 'qmp_capabilities'")


def test_capabilities_enable_not_a_list(daemon):
    c = daemon.client()
    assert c.cmd("qmp_capabilities", {"enable": "oob"}) == generic_error(
        "Invalid parameter type for 'enable', expected: array")


def test_exec_oob_without_oob_negotiated(qmp):
    qmp.send_json({"exec-oob": "query-status"})
    assert qmp.read_message() == generic_error("QMP input member 'exec-oob' is unexpected")


def test_exec_oob_before_negotiation(daemon):
    c = daemon.client()
    c.send_json({"exec-oob": "qmp_capabilities"})
    assert c.read_message() == generic_error("QMP input member 'exec-oob' is unexpected")


@pytest.fixture
def oob(daemon):
    return daemon.client().negotiate(enable=["oob"])


def test_exec_oob_of_an_in_band_command(oob):
    oob.execute("query-status", id=1, oob=True)
    assert oob.read_message() == {"id": 1, **generic_error(
        "The command query-status does not support OOB")}


def test_exec_oob_unknown_command(oob):
    oob.execute("no-such", oob=True)
    assert oob.read_message() == command_not_found("The command no-such has not been found")


def test_exec_oob_clashes_with_execute(oob):
    oob.send_json({"execute": "query-status", "exec-oob": "query-status"})
    assert oob.read_message() == generic_error(
        "QMP input member 'execute' clashes with 'exec-oob'")


def test_exec_oob_not_a_string(oob):
    oob.send_json({"exec-oob": 1})
    assert oob.read_message() == generic_error("QMP input member 'exec-oob' must be a string")


# ---- id -----------------------------------------------------------------------------------

# QEMU keeps integers up to 2^64-1 exact (docs/qmp.md, "Limits"; src/common/qjson.h).
UINT64_MAX = 18446744073709551615


@pytest.mark.parametrize("value", [
    "a string", "é\n\t\"\\/ \u2603", "", 0, 42, -5, 3.5, UINT64_MAX,
    -9223372036854775808, True, False, None, [], [1, "two", [3.0]], {}, {"a": {"b": [None]}},
], ids=["string", "escapes", "empty-string", "zero", "int", "negative", "float", "uint64-max",
        "int64-min", "true", "false", "null", "empty-array", "array", "empty-object", "object"])
def test_id_echoed(qmp, value):
    assert qmp.cmd("query-status", id=value) == {"return": RUNNING, "id": value}


@pytest.mark.parametrize("sent, echoed", [
    (b"18446744073709551615", b"18446744073709551615"),
    (b"9223372036854775808", b"9223372036854775808"),
    (b"18446744073709551616", b"1.8446744073709552e+19"),
    (b"-9223372036854775809", b"-9.2233720368547758e+18"),
], ids=["uint64-max", "2^63", "2^64-is-a-double", "below-int64-min-is-a-double"])
def test_id_number_bytes_as_qemu(qmp, sent, echoed):
    """QEMU 7.2's bytes: integers up to 2^64-1 exact, others as doubles with 17 digits."""
    qmp.send(b'{"execute": "query-status", "id": ' + sent + b"}\n")
    assert qmp.read_raw() == (b'{"return": {"status": "running", "singlestep": false, '
                              b'"running": true}, "id": ' + echoed + b"}\r\n")


@pytest.mark.parametrize("text, desc", [
    (b"18446744073709551615", "QMP input must be a JSON object"),
    (b'{"execute": "query-status", "arguments": 18446744073709551615}',
     "QMP input member 'arguments' must be an object"),
    (b'{"execute": "block-set-write-threshold", "arguments": {"node-name": "x", '
     b'"write-threshold": 9223372036854775808.0}}',
     "Parameter 'write-threshold' expects uint64"),
], ids=["message", "arguments", "real-is-not-uint64"])
def test_big_integers_are_numbers(qmp, text, desc):
    qmp.send(text + b"\n")
    assert qmp.read_message() == generic_error(desc)


# ---- pretty=on ----------------------------------------------------------------------------

def test_pretty_output_equals_compact_output(daemons):
    d = daemons.start(monitors=2, pretty=[1])
    compact, pretty = d.client(0), d.client(1, pretty=True)
    assert pretty.greeting == compact.greeting
    for c in (compact, pretty):
        c.negotiate()
    for name, args, id in [("query-status", None, [1, {"x": {}}]), ("query-version", None, 1),
                           ("no-such-command", None, None), ("stop", None, "s")]:
        compact.execute(name, args, id)
        pretty.execute(name, args, id)
        expected = compact.reply()
        raw = pretty.read_raw()
        while b'"event"' in raw:            # the STOP event before stop's reply
            assert without_timestamp(json.loads(raw)) == without_timestamp(compact.events.pop(0))
            raw = pretty.read_raw()
        assert json.loads(raw) == expected
        lines = raw.decode().split("\r\n")
        assert lines[0] == "{" and lines[-2] == "}" and lines[-1] == "", raw
        assert all(line.startswith("    ") for line in lines[1:-2]), raw


# ---- run state ----------------------------------------------------------------------------

def test_status_running_at_start(qmp):
    assert qmp.cmd("query-status") == {"return": RUNNING}


def test_stop_emits_stop_then_returns(qmp):
    qmp.execute("stop")
    assert_event(qmp.read_message(), "STOP")
    assert qmp.read_message() == {"return": {}}
    assert qmp.cmd("query-status") == {"return": PAUSED}


def test_stop_when_paused_only_returns(qmp):
    assert qmp.cmd("stop") == {"return": {}}
    qmp.take_events()
    assert qmp.cmd("stop") == {"return": {}}
    assert qmp.cmd("query-status") == {"return": PAUSED}
    assert qmp.take_events() == []


def test_cont_when_paused_emits_resume_then_returns(qmp):
    assert qmp.cmd("stop") == {"return": {}}
    qmp.execute("cont")
    assert_event(qmp.read_message(), "RESUME")
    assert qmp.read_message() == {"return": {}}
    assert qmp.cmd("query-status") == {"return": RUNNING}


def test_cont_when_running_only_returns(qmp):
    assert qmp.cmd("cont") == {"return": {}}
    assert qmp.cmd("query-status") == {"return": RUNNING}
    assert qmp.take_events() == []


@pytest.fixture
def prelaunch(daemons):
    return daemons.start(args=["-S"]).negotiated()


def test_prelaunch_status(prelaunch):
    assert prelaunch.cmd("query-status") == {"return": PRELAUNCH}


def test_stop_in_prelaunch_stays_prelaunch(prelaunch):
    assert prelaunch.cmd("stop") == {"return": {}}
    assert prelaunch.cmd("query-status") == {"return": PRELAUNCH}
    assert prelaunch.take_events() == []


def test_cont_from_prelaunch(prelaunch):
    prelaunch.execute("cont")
    assert_event(prelaunch.read_message(), "RESUME")
    assert prelaunch.read_message() == {"return": {}}
    assert prelaunch.cmd("query-status") == {"return": RUNNING}


def test_stop_and_cont_take_no_arguments(qmp):
    assert qmp.cmd("stop", {"now": True}) == generic_error("Parameter 'now' is unexpected")
    assert qmp.cmd("query-status") == {"return": RUNNING}
    assert qmp.take_events() == []


# ---- other commands -----------------------------------------------------------------------

def test_query_commands_lists_every_command_once(qmp):
    reply = qmp.cmd("query-commands")
    assert set(reply) == {"return"}
    assert all(set(entry) == {"name"} and isinstance(entry["name"], str)
               for entry in reply["return"])
    names = [entry["name"] for entry in reply["return"]]
    assert len(names) == len(set(names))
    assert set(COMMANDS) <= set(names)


def test_query_version_equals_greeting_version(daemon):
    c = daemon.client()
    c.negotiate()
    assert c.cmd("query-version") == {"return": c.greeting["QMP"]["version"]}


@pytest.mark.parametrize("threshold", [1.5, "5", 18446744073709551616, True, None],
                         ids=["float", "string", "2^64", "bool", "null"])
def test_write_threshold_not_uint64(qmp, threshold):
    assert qmp.cmd("block-set-write-threshold", {"node-name": "x", "write-threshold":
                                                 threshold}) == \
        generic_error("Parameter 'write-threshold' expects uint64")


@pytest.mark.parametrize("threshold", [0, UINT64_MAX, -1],
                         ids=["zero", "uint64-max", "minus-one-wraps-like-qemu"])
def test_write_threshold_accepted_then_node_looked_up(qmp, threshold):
    assert qmp.cmd("block-set-write-threshold", {"node-name": "x", "write-threshold":
                                                 threshold}) == \
        generic_error("Device 'x' not found")


def test_write_threshold_missing(qmp):
    assert qmp.cmd("block-set-write-threshold", {"node-name": "x"}) == \
        generic_error("Parameter 'write-threshold' is missing")
