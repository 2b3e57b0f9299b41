/* Unit tests of the QMP client: the framer, the message parser, the state machine (fed by
 * qmpc_feed()), and the synchronous calls over a socketpair whose other end the test plays. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>
#include <sys/socket.h>

#include "client/qmp-client.h"
#include "client/qmp-framer.h"
#include "common/qjson.h"

#define GREETING "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, " \
                 "\"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n"

/* ---- framer --------------------------------------------------------------------------- */

/* Expect the next framed message to be exactly want, and take it. */
static void expect_frame(struct qmpc_framer *f, const char *want)
{
    const char *msg;
    size_t len;
    assert_int_equal(qmpc_framer_next(f, &msg, &len, NULL), 1);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(msg, want, len);
    qmpc_framer_consume(f);
}

static void expect_no_frame(struct qmpc_framer *f)
{
    const char *msg;
    size_t len;
    assert_int_equal(qmpc_framer_next(f, &msg, &len, NULL), 0);
}

static void test_framer_split_bytewise(void **state)
{
    const char *text = "{\"return\": {}, \"id\": 1}\r\n";
    struct qmpc_framer f;
    qmpc_framer_init(&f);
    for (size_t i = 0; i < strlen(text) - 2; i++) {
        expect_no_frame(&f);
        qmpc_framer_feed(&f, text + i, 1);
    }
    expect_frame(&f, "{\"return\": {}, \"id\": 1}");
    qmpc_framer_feed(&f, "\r\n", 2);
    expect_no_frame(&f);
    assert_false(qmpc_framer_partial(&f));
    qmpc_framer_free(&f);
}

static void test_framer_two_in_one_read(void **state)
{
    struct qmpc_framer f;
    qmpc_framer_init(&f);
    const char *text = "{\"a\": 1}\r\n{\"b\": [2, {\"c\": 3}]}\r\n{\"d\"";
    qmpc_framer_feed(&f, text, strlen(text));
    expect_frame(&f, "{\"a\": 1}");
    expect_frame(&f, "{\"b\": [2, {\"c\": 3}]}");
    expect_no_frame(&f);
    assert_true(qmpc_framer_partial(&f));
    qmpc_framer_feed(&f, ": 4}", 4);
    expect_frame(&f, "{\"d\": 4}");
    qmpc_framer_free(&f);
}

static void test_framer_not_consumed_is_found_again(void **state)
{
    struct qmpc_framer f;
    qmpc_framer_init(&f);
    qmpc_framer_feed(&f, "{}{\"x\":1}", 9);
    const char *msg;
    size_t len;
    assert_int_equal(qmpc_framer_next(&f, &msg, &len, NULL), 1);
    assert_int_equal(len, 2);
    expect_frame(&f, "{}");
    expect_frame(&f, "{\"x\":1}");
    qmpc_framer_free(&f);
}

static void test_framer_strings_with_braces_and_escapes(void **state)
{
    /* Braces, brackets and escaped quotes inside strings, and an escaped backslash right
     * before a closing quote: none of them may end or open an object. */
    const char *m1 = "{\"desc\": \"}{][ \\\"}\\\" \\\\\", \"k\\\"}\": \"\\u007b\"}";
    const char *m2 = "{\"e\": \"\\\\\"}";
    struct qmpc_framer f;
    qmpc_framer_init(&f);
    qmpc_framer_feed(&f, m1, strlen(m1));
    qmpc_framer_feed(&f, "\r\n", 2);
    qmpc_framer_feed(&f, m2, strlen(m2));
    expect_frame(&f, m1);
    expect_frame(&f, m2);
    expect_no_frame(&f);
    qmpc_framer_free(&f);
}

static void test_framer_pretty_multiline(void **state)
{
    const char *pretty = "{\n    \"return\": {\n        \"status\": \"running\",\n"
                         "        \"running\": true\n    },\n    \"id\": 2\n}";
    struct qmpc_framer f;
    qmpc_framer_init(&f);
    /* Line by line, as a pretty monitor's output may arrive. */
    for (const char *p = pretty; *p;) {
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p + 1) : strlen(p);
        expect_no_frame(&f);
        qmpc_framer_feed(&f, p, n);
        p += n;
    }
    qmpc_framer_feed(&f, "\r\n", 2);
    expect_frame(&f, pretty);
    qmpc_framer_free(&f);
}

static void test_framer_garbage_between_messages(void **state)
{
    struct qmpc_framer f;
    qmpc_framer_init(&f);
    qmpc_framer_feed(&f, "{\"a\":1}\r\nxyz{\"b\":2}", 18);
    expect_frame(&f, "{\"a\":1}");
    const char *msg;
    size_t len;
    struct error *err = NULL;
    assert_int_equal(qmpc_framer_next(&f, &msg, &len, &err), -1);
    assert_string_equal(err->desc, "Unexpected byte 0x78 between QMP messages");
    error_free(err);
    qmpc_framer_reset(&f);
    qmpc_framer_feed(&f, "[1]", 3);
    assert_int_equal(qmpc_framer_next(&f, &msg, &len, NULL), -1);
    qmpc_framer_free(&f);
}

static void test_framer_many_messages(void **state)
{
    /* Enough to make the buffer compact several times while messages are taken. */
    struct qmpc_framer f;
    qmpc_framer_init(&f);
    for (int i = 0; i < 2000; i++) {
        char m[64];
        int n = snprintf(m, sizeof(m), "{\"i\": %d}\r\n", i);
        qmpc_framer_feed(&f, m, (size_t)n);
        if (i % 3 == 0) {
            char want[64];
            snprintf(want, sizeof(want), "{\"i\": %d}", i / 3);
            expect_frame(&f, want);
        }
    }
    for (int i = 667; i < 2000; i++) {
        char want[64];
        snprintf(want, sizeof(want), "{\"i\": %d}", i);
        expect_frame(&f, want);
    }
    expect_no_frame(&f);
    assert_false(qmpc_framer_partial(&f));
    qmpc_framer_free(&f);
}

/* ---- message parsing ------------------------------------------------------------------ */

static struct qmpc_message *parse(const char *text)
{
    return qmpc_message_parse(text, strlen(text), NULL);
}

static void expect_parse_error(const char *text, const char *want)
{
    struct error *err = NULL;
    assert_null(qmpc_message_parse(text, strlen(text), &err));
    assert_non_null(err);
    assert_string_equal(err->desc, want);
    error_free(err);
}

static void test_parse_greeting(void **state)
{
    struct qmpc_message *m = parse("{\"QMP\": {\"version\": {}, \"capabilities\": []}}");
    assert_non_null(m);
    assert_int_equal(m->kind, QMPC_MSG_GREETING);
    assert_null(m->id);
    qmpc_message_free(m);
}

static void test_parse_return(void **state)
{
    const char *text = "{\"return\": {\"status\": \"running\"}, \"id\": {\"any\": [1]}}";
    struct qmpc_message *m = parse(text);
    assert_non_null(m);
    assert_int_equal(m->kind, QMPC_MSG_RETURN);
    assert_string_equal(json_string_value(json_object_get(m->ret, "status")), "running");
    assert_true(json_is_object(m->id));
    assert_string_equal(m->text, text);
    assert_int_equal(m->text_len, strlen(text));
    qmpc_message_free(m);
}

static void test_parse_uint64_exact(void **state)
{
    /* The server's integers above INT64_MAX (QEMU's uint64 members) stay exact. */
    struct qmpc_message *m = parse("{\"return\": {\"x\": 18446744073709551615}, "
                                   "\"id\": 9223372036854775808}");
    assert_non_null(m);
    assert_int_equal(m->kind, QMPC_MSG_RETURN);
    assert_true(qjson_uint64(json_object_get(m->ret, "x")) == UINT64_MAX);
    assert_true(qjson_uint64(m->id) == 9223372036854775808ull);
    qmpc_message_free(m);
}

static void test_parse_error(void **state)
{
    struct qmpc_message *m = parse("{\"error\": {\"class\": \"GenericError\", "
                                   "\"desc\": \"Device 'nope' not found\"}}");
    assert_non_null(m);
    assert_int_equal(m->kind, QMPC_MSG_ERROR);
    assert_string_equal(m->error_class, "GenericError");
    assert_string_equal(m->error_desc, "Device 'nope' not found");
    assert_null(m->id);
    qmpc_message_free(m);
}

static void test_parse_event(void **state)
{
    struct qmpc_message *m = parse("{\"timestamp\": {\"seconds\": 1795638023, \"microseconds\": "
                                   "810253}, \"event\": \"STOP\"}");
    assert_non_null(m);
    assert_int_equal(m->kind, QMPC_MSG_EVENT);
    assert_string_equal(m->event, "STOP");
    assert_null(m->data);
    assert_int_equal(m->seconds, 1795638023);
    assert_int_equal(m->microseconds, 810253);
    qmpc_message_free(m);

    m = parse("{\"event\": \"BLOCK_WRITE_THRESHOLD\", \"data\": {\"node-name\": \"n\"}, "
              "\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}");
    assert_non_null(m);
    assert_string_equal(json_string_value(json_object_get(m->data, "node-name")), "n");
    qmpc_message_free(m);
}

static void test_parse_rejects(void **state)
{
    expect_parse_error("[1, 2]", "QMP message is not a JSON object");
    expect_parse_error("{\"foo\": 1}", "Unrecognised QMP message: {\"foo\": 1}");
    expect_parse_error("{\"error\": {\"class\": \"GenericError\"}}",
                       "QMP error reply without a string 'class' and 'desc'");
    expect_parse_error("{\"event\": \"STOP\"}", "QMP event STOP without an integer 'timestamp'");
    expect_parse_error("{\"event\": 1, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}",
                       "QMP event whose 'event' is not a string");
    expect_parse_error("{\"QMP\": 1}", "QMP greeting whose 'QMP' is not an object");
    struct error *err = NULL;
    assert_null(qmpc_message_parse("{\"return\": ", 11, &err));
    assert_non_null(strstr(err->desc, "Invalid JSON from the server"));
    error_free(err);
}

/* ---- the state machine, fed by hand --------------------------------------------------- */

static void feed(struct qmpc *c, const char *text)
{
    qmpc_feed(c, text, strlen(text));
}

static struct qmpc_message *pop(struct qmpc *c)
{
    struct qmpc_message *m = NULL;
    assert_int_equal(qmpc_pop(c, &m, NULL), 1);
    return m;
}

static void test_states(void **state)
{
    struct qmpc *c = qmpc_new(-1);
    struct qmpc_message *m;
    assert_int_equal(qmpc_state(c), QMPC_STATE_GREETING);
    assert_false(qmpc_pending(c));
    assert_int_equal(qmpc_server_version(c, NULL, NULL, NULL), -1);

    feed(c, GREETING);
    assert_true(qmpc_pending(c));
    m = pop(c);
    assert_int_equal(m->kind, QMPC_MSG_GREETING);
    qmpc_message_free(m);
    assert_int_equal(qmpc_state(c), QMPC_STATE_CAPABILITIES);
    int major, minor, micro;
    assert_int_equal(qmpc_server_version(c, &major, &minor, &micro), 0);
    assert_int_equal(major * 10000 + minor * 100 + micro, 70222);
    assert_true(qmpc_has_capability(c, "oob"));
    assert_false(qmpc_has_capability(c, "bogus"));

    /* A refusal does not complete negotiation; a return does. */
    feed(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"x\"}}");
    qmpc_message_free(pop(c));
    assert_int_equal(qmpc_state(c), QMPC_STATE_CAPABILITIES);
    feed(c, "{\"return\": {}, \"id\": 1}");
    qmpc_message_free(pop(c));
    assert_int_equal(qmpc_state(c), QMPC_STATE_COMMAND);

    assert_int_equal(qmpc_pop(c, &m, NULL), 0);
    feed(c, GREETING);
    struct error *err = NULL;
    assert_int_equal(qmpc_pop(c, &m, &err), -1);
    assert_string_equal(err->desc, "Unexpected second QMP greeting");
    error_free(err);
    assert_int_equal(qmpc_state(c), QMPC_STATE_CLOSED);
    assert_int_equal(qmpc_pop(c, &m, NULL), -1);
    assert_false(qmpc_eof(c));
    qmpc_free(c);
}

static void test_message_before_greeting(void **state)
{
    struct qmpc *c = qmpc_new(-1);
    struct qmpc_message *m;
    struct error *err = NULL;
    feed(c, "{\"return\": {}}");
    assert_int_equal(qmpc_pop(c, &m, &err), -1);
    assert_string_equal(err->desc, "Expected the QMP greeting, got: {\"return\": {}}");
    error_free(err);
    assert_int_equal(qmpc_state(c), QMPC_STATE_CLOSED);
    qmpc_free(c);
}

/* ---- the synchronous calls over a socketpair ------------------------------------------ */

struct pair {
    struct qmpc *c;
    int peer; /* the server's end */
};

static int pair_setup(void **state)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    struct pair *p = xzalloc(sizeof(*p));
    p->c = qmpc_new(sv[0]);
    p->peer = sv[1];
    *state = p;
    return 0;
}

static int pair_teardown(void **state)
{
    struct pair *p = *state;
    qmpc_free(p->c);
    if (p->peer >= 0)
        close(p->peer);
    free(p);
    return 0;
}

static void server_says(struct pair *p, const char *text)
{
    assert_int_equal(write(p->peer, text, strlen(text)), (ssize_t)strlen(text));
}

/* What the client sent so far, as one string. */
static void expect_client_sent(struct pair *p, const char *want)
{
    char got[4096];
    ssize_t n = recv(p->peer, got, sizeof(got) - 1, MSG_DONTWAIT);
    assert_true(n >= 0);
    got[n] = '\0';
    assert_string_equal(got, want);
}

static void test_negotiate_and_execute(void **state)
{
    struct pair *p = *state;
    /* The server's answers can be written ahead: ids are predictable. */
    server_says(p, GREETING);
    server_says(p, "{\"return\": {}, \"id\": 1}\r\n");
    server_says(p, "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n");
    server_says(p, "{\"return\": {\"status\": \"paused\"}, \"id\": 2}\r\n");
    assert_int_equal(qmpc_negotiate(p->c, NULL, 1000, NULL), 0);
    assert_int_equal(qmpc_state(p->c), QMPC_STATE_COMMAND);

    json_t *args = json_pack("{s:s}", "node-name", "n");
    struct qmpc_message *reply = qmpc_execute(p->c, "query-status", args, 1000, NULL);
    json_decref(args);
    assert_non_null(reply);
    assert_int_equal(reply->kind, QMPC_MSG_RETURN);
    assert_int_equal(json_integer_value(reply->id), 2);
    qmpc_message_free(reply);
    expect_client_sent(p, "{\"execute\":\"qmp_capabilities\",\"id\":1}\n"
                          "{\"execute\":\"query-status\",\"arguments\":{\"node-name\":\"n\"},"
                          "\"id\":2}\n");

    /* The event that came while waiting was queued. */
    assert_true(qmpc_pending(p->c));
    struct qmpc_message *ev = NULL;
    assert_int_equal(qmpc_next_event(p->c, 0, &ev, NULL), 1);
    assert_string_equal(ev->event, "STOP");
    qmpc_message_free(ev);
    assert_false(qmpc_pending(p->c));
    assert_int_equal(qmpc_next_event(p->c, 0, &ev, NULL), 0);
}

static void test_wait_reply_queues_others(void **state)
{
    struct pair *p = *state;
    server_says(p, GREETING "{\"return\": {}, \"id\": 5}{\"error\": {\"class\": \"GenericError\", "
                            "\"desc\": \"d\"}, \"id\": 3}");
    json_t *id = json_integer(3);
    struct qmpc_message *m = qmpc_wait_reply(p->c, id, 1000, NULL);
    json_decref(id);
    assert_non_null(m);
    assert_int_equal(m->kind, QMPC_MSG_ERROR);
    qmpc_message_free(m);
    m = pop(p->c);
    assert_int_equal(json_integer_value(m->id), 5);
    qmpc_message_free(m);
}

static void test_reply_without_id_matches(void **state)
{
    struct pair *p = *state;
    server_says(p, GREETING "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                            "\"JSON parse error, expecting value\"}}");
    json_t *id = json_integer(7);
    struct qmpc_message *m = qmpc_wait_reply(p->c, id, 1000, NULL);
    json_decref(id);
    assert_non_null(m);
    assert_string_equal(m->error_desc, "JSON parse error, expecting value");
    qmpc_message_free(m);
}

static void test_timeout(void **state)
{
    struct pair *p = *state;
    struct error *err = NULL;
    assert_int_equal(qmpc_negotiate(p->c, NULL, 50, &err), -1);
    assert_string_equal(err->desc, "Timed out waiting for the QMP greeting");
    error_free(err);
    /* A timeout is not fatal: the greeting may still come. */
    assert_int_equal(qmpc_state(p->c), QMPC_STATE_GREETING);
}

static void test_eof_after_events(void **state)
{
    struct pair *p = *state;
    server_says(p, GREETING "{\"event\": \"SHUTDOWN\", \"timestamp\": {\"seconds\": 1, "
                            "\"microseconds\": 2}}");
    close(p->peer);
    p->peer = -1;
    struct qmpc_message *ev = NULL;
    struct error *err = NULL;
    assert_int_equal(qmpc_next_event(p->c, 1000, &ev, NULL), 1);
    assert_string_equal(ev->event, "SHUTDOWN");
    qmpc_message_free(ev);
    assert_int_equal(qmpc_next_event(p->c, 1000, &ev, &err), -1);
    assert_string_equal(err->desc, "Connection closed by the server");
    error_free(err);
    assert_int_equal(qmpc_state(p->c), QMPC_STATE_CLOSED);
    assert_true(qmpc_eof(p->c));
    assert_null(qmpc_execute(p->c, "query-status", NULL, 1000, NULL));
}

static void test_eof_in_mid_message(void **state)
{
    struct pair *p = *state;
    server_says(p, GREETING "{\"return\": {");
    close(p->peer);
    p->peer = -1;
    struct error *err = NULL;
    assert_null(qmpc_wait_reply(p->c, NULL, 1000, &err));
    assert_string_equal(err->desc, "Connection closed by the server in the middle of a message");
    error_free(err);
    assert_false(qmpc_eof(p->c));
}

static void test_event_driven_read_pop(void **state)
{
    struct pair *p = *state;
    server_says(p, GREETING);
    assert_true(qmpc_read(p->c, NULL) > 0);
    assert_int_equal(qmpc_read(p->c, NULL), 0);
    struct qmpc_message *m = pop(p->c);
    assert_int_equal(m->kind, QMPC_MSG_GREETING);
    qmpc_message_free(m);
    assert_int_equal(qmpc_send_command(p->c, "qmp_capabilities", NULL, NULL), 1);
    assert_int_equal(qmpc_send_command(p->c, "stop", NULL, NULL), 2);
    expect_client_sent(p, "{\"execute\":\"qmp_capabilities\",\"id\":1}\n"
                          "{\"execute\":\"stop\",\"id\":2}\n");
    close(p->peer);
    p->peer = -1;
    assert_int_equal(qmpc_read(p->c, NULL), -1);
    assert_int_equal(qmpc_pop(p->c, &m, NULL), 0);
    assert_true(qmpc_eof(p->c));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_framer_split_bytewise),
        cmocka_unit_test(test_framer_two_in_one_read),
        cmocka_unit_test(test_framer_not_consumed_is_found_again),
        cmocka_unit_test(test_framer_strings_with_braces_and_escapes),
        cmocka_unit_test(test_framer_pretty_multiline),
        cmocka_unit_test(test_framer_garbage_between_messages),
        cmocka_unit_test(test_framer_many_messages),
        cmocka_unit_test(test_parse_greeting),
        cmocka_unit_test(test_parse_return),
        cmocka_unit_test(test_parse_uint64_exact),
        cmocka_unit_test(test_parse_error),
        cmocka_unit_test(test_parse_event),
        cmocka_unit_test(test_parse_rejects),
        cmocka_unit_test(test_states),
        cmocka_unit_test(test_message_before_greeting),
        cmocka_unit_test_setup_teardown(test_negotiate_and_execute, pair_setup, pair_teardown),
        cmocka_unit_test_setup_teardown(test_wait_reply_queues_others, pair_setup, pair_teardown),
        cmocka_unit_test_setup_teardown(test_reply_without_id_matches, pair_setup, pair_teardown),
        cmocka_unit_test_setup_teardown(test_timeout, pair_setup, pair_teardown),
        cmocka_unit_test_setup_teardown(test_eof_after_events, pair_setup, pair_teardown),
        cmocka_unit_test_setup_teardown(test_eof_in_mid_message, pair_setup, pair_teardown),
        cmocka_unit_test_setup_teardown(test_event_driven_read_pop, pair_setup, pair_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
