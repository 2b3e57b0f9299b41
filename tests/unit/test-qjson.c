/* Unit tests of common/qjson.h: QEMU's member order, escapes, numbers, pretty form.
 *
 * Every expected text was checked against QEMU 7.2's monitor output (-qmp, and -mon
 * mode=control,pretty=on), which echoes an "id" of any JSON value.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/util.h"
#include "common/qjson.h"

/* Write v (stolen) and compare with expected. */
static void check(json_t *v, bool pretty, const char *expected)
{
    struct buf out = { 0 };

    assert_non_null(v);
    qjson_write(&out, v, pretty);
    buf_append(&out, "", 1);
    assert_string_equal(out.data, expected);
    assert_int_equal(out.len - 1, strlen(expected));
    buf_free(&out);
    json_decref(v);
}

/* ---- member order ---- */

static void test_return_before_id(void **state)
{
    check(json_pack("{s:o,s:s}", "return", json_object(), "id", "x"), false,
          "{\"return\": {}, \"id\": \"x\"}");
}

static void test_return_before_id_inserted_last(void **state)
{
    check(json_pack("{s:s,s:o}", "id", "x", "return", json_object()), false,
          "{\"return\": {}, \"id\": \"x\"}");
}

static void test_id_before_error(void **state)
{
    check(json_pack("{s:{s:s,s:s},s:i}", "error", "class", "GenericError", "desc", "d", "id", 1),
          false, "{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"d\"}}");
}

static void test_error_class_before_desc(void **state)
{
    check(json_pack("{s:s,s:s}", "desc", "d", "class", "CommandNotFound"), false,
          "{\"class\": \"CommandNotFound\", \"desc\": \"d\"}");
}

static void test_event_order(void **state)
{
    check(json_pack("{s:s,s:{s:b,s:s},s:{s:i,s:i}}", "event", "SHUTDOWN", "data", "guest", 0,
                    "reason", "host-qmp-quit", "timestamp", "seconds", 1, "microseconds", 2),
          false,
          "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"SHUTDOWN\", "
          "\"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}");
}

static void test_query_status_order(void **state)
{
    /* "status" and "singlestep" share a bucket: the one inserted last comes first. */
    check(json_pack("{s:b,s:b,s:s}", "running", 1, "singlestep", 0, "status", "running"), false,
          "{\"status\": \"running\", \"singlestep\": false, \"running\": true}");
}

static void test_version_order(void **state)
{
    check(json_pack("{s:{s:i,s:i,s:i},s:s}", "qemu", "major", 7, "minor", 2, "micro", 22,
                    "package", "p"),
          false, "{\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"p\"}");
}

static void test_greeting_order(void **state)
{
    check(json_pack("{s:{s:{s:{s:i,s:i,s:i},s:s},s:[s]}}", "QMP", "version", "qemu", "major", 7,
                    "minor", 2, "micro", 22, "package", "Debian 1:7.2+dfsg-7+deb12u18+b3",
                    "capabilities", "oob"),
          false,
          "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, "
          "\"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}");
}

static void test_order_by_bucket_not_insertion(void **state)
{
    check(json_pack("{s:i,s:i,s:i,s:i,s:i}", "b", 1, "a", 2, "return", 3, "id", 4, "error", 5),
          false, "{\"a\": 2, \"b\": 1, \"return\": 3, \"id\": 4, \"error\": 5}");
}

static void test_same_bucket_last_inserted_first(void **state)
{
    check(json_pack("{s:i,s:i}", "cc", 1, "cs", 2), false, "{\"cs\": 2, \"cc\": 1}");
}

static void test_same_bucket_last_inserted_first_reversed(void **state)
{
    check(json_pack("{s:i,s:i}", "cs", 1, "cc", 2), false, "{\"cc\": 2, \"cs\": 1}");
}

static void test_same_bucket_among_others(void **state)
{
    check(json_pack("{s:i,s:i,s:i,s:i,s:i}", "minor", 1, "micro", 2, "x", 3, "y", 4, "z", 5),
          false, "{\"x\": 3, \"micro\": 2, \"minor\": 1, \"y\": 4, \"z\": 5}");
}

static void test_order_many_keys(void **state)
{
    /* More members than the writer sorts on its stack. */
    json_t *o = json_object();
    char key[8];

    for (int i = 0; i < 20; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        json_object_set_new(o, key, json_integer(i));
    }
    check(o, false,
          "{\"k5\": 5, \"k8\": 8, \"k1\": 1, \"k4\": 4, \"k19\": 19, \"k18\": 18, \"k17\": 17, "
          "\"k16\": 16, \"k15\": 15, \"k14\": 14, \"k13\": 13, \"k12\": 12, \"k11\": 11, "
          "\"k10\": 10, \"k7\": 7, \"k0\": 0, \"k3\": 3, \"k6\": 6, \"k9\": 9, \"k2\": 2}");
}

/* ---- strings ---- */

static void test_escape_quote_and_backslash(void **state)
{
    check(json_string("a\"b\\c"), false, "\"a\\\"b\\\\c\"");
}

static void test_escape_short_forms(void **state)
{
    check(json_string("\b\f\n\r\t"), false, "\"\\b\\f\\n\\r\\t\"");
}

static void test_escape_control_chars_uppercase_hex(void **state)
{
    check(json_string("\x01\x1f"), false, "\"\\u0001\\u001F\"");
}

static void test_escape_del(void **state)
{
    check(json_string("\x7f"), false, "\"\\u007F\"");
}

static void test_escape_non_ascii(void **state)
{
    check(json_string("\xc3\xa9\xe2\x82\xac"), false, "\"\\u00E9\\u20AC\"");
}

static void test_escape_astral_as_surrogates(void **state)
{
    check(json_string("\xf0\x9f\x98\x80"), false, "\"\\uD83D\\uDE00\"");
}

static void test_escape_u10ffff(void **state)
{
    check(json_string("\xf4\x8f\xbf\xbf"), false, "\"\\uDBFF\\uDFFF\"");
}

static void test_slash_not_escaped(void **state)
{
    check(json_string("a/b"), false, "\"a/b\"");
}

static void test_nul_in_string(void **state)
{
    check(json_stringn("a\0b", 3), false, "\"a\\u0000b\"");
}

static void test_empty_string(void **state)
{
    check(json_string(""), false, "\"\"");
}

static void test_key_escaped(void **state)
{
    check(json_pack("{s:i}", "\xc3\xa9\"", 1), false, "{\"\\u00E9\\\"\": 1}");
}

/* ---- numbers and keywords ---- */

static void test_int64_extremes(void **state)
{
    check(json_pack("[I,I,i]", (json_int_t)INT64_MAX, (json_int_t)INT64_MIN, 0), false,
          "[9223372036854775807, -9223372036854775808, 0]");
}

static void test_reals_as_qemu(void **state)
{
    check(json_pack("[f,f,f,f,f,f,f]", 1.5, 0.1, 1e20, 1.0, -0.0, 1e-7, 1.2345678901234568e22),
          false,
          "[1.5, 0.10000000000000001, 1e+20, 1, -0, 9.9999999999999995e-08, "
          "1.2345678901234568e+22]");
}

static void test_keywords(void **state)
{
    check(json_pack("[b,b,n]", 1, 0), false, "[true, false, null]");
}

static void test_top_level_scalar(void **state)
{
    check(json_integer(42), false, "42");
}

static void test_empty_containers_compact(void **state)
{
    check(json_pack("{s:o,s:o}", "a", json_object(), "b", json_array()), false,
          "{\"a\": {}, \"b\": []}");
}

static void test_nested_array_compact(void **state)
{
    check(json_pack("[i,[i,i],{}]", 1, 2, 3), false, "[1, [2, 3], {}]");
}

/* ---- pretty ---- */

static void test_pretty_empty_return(void **state)
{
    check(json_pack("{s:o}", "return", json_object()), true,
          "{\r\n    \"return\": {\r\n    }\r\n}");
}

static void test_pretty_top_level_empty_object(void **state)
{
    check(json_object(), true, "{\r\n}");
}

static void test_pretty_top_level_empty_array(void **state)
{
    check(json_array(), true, "[\r\n]");
}

static void test_pretty_nested(void **state)
{
    check(json_pack("{s:{s:b,s:b,s:s},s:[i,{},[],{s:[]}]}", "return", "running", 1, "singlestep",
                    0, "status", "running", "id", 1, "a"),
          true,
          "{\r\n"
          "    \"return\": {\r\n"
          "        \"status\": \"running\",\r\n"
          "        \"singlestep\": false,\r\n"
          "        \"running\": true\r\n"
          "    },\r\n"
          "    \"id\": [\r\n"
          "        1,\r\n"
          "        {\r\n"
          "        },\r\n"
          "        [\r\n"
          "        ],\r\n"
          "        {\r\n"
          "            \"a\": [\r\n"
          "            ]\r\n"
          "        }\r\n"
          "    ]\r\n"
          "}");
}

static void test_pretty_greeting(void **state)
{
    check(json_pack("{s:{s:{s:{s:i,s:i,s:i},s:s},s:[s]}}", "QMP", "version", "qemu", "major", 7,
                    "minor", 2, "micro", 22, "package", "Debian 1:7.2+dfsg-7+deb12u18+b3",
                    "capabilities", "oob"),
          true,
          "{\r\n"
          "    \"QMP\": {\r\n"
          "        \"version\": {\r\n"
          "            \"qemu\": {\r\n"
          "                \"micro\": 22,\r\n"
          "                \"minor\": 2,\r\n"
          "                \"major\": 7\r\n"
          "            },\r\n"
          "            \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"\r\n"
          "        },\r\n"
          "        \"capabilities\": [\r\n"
          "            \"oob\"\r\n"
          "        ]\r\n"
          "    }\r\n"
          "}");
}

static void test_pretty_event(void **state)
{
    check(json_pack("{s:s,s:{s:i,s:i}}", "event", "STOP", "timestamp", "seconds", 1795641439,
                    "microseconds", 562855),
          true,
          "{\r\n"
          "    \"timestamp\": {\r\n"
          "        \"seconds\": 1795641439,\r\n"
          "        \"microseconds\": 562855\r\n"
          "    },\r\n"
          "    \"event\": \"STOP\"\r\n"
          "}");
}

static void test_pretty_scalar(void **state)
{
    check(json_string("x"), true, "\"x\"");
}

static void test_appends_without_line_end(void **state)
{
    struct buf out = { 0 };
    json_t *v = json_pack("{s:i}", "a", 1);

    buf_append(&out, "x", 1);
    qjson_write(&out, v, false);
    assert_int_equal(out.len, 9);
    assert_memory_equal(out.data, "x{\"a\": 1}", 9);
    buf_free(&out);
    json_decref(v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_return_before_id),
        cmocka_unit_test(test_return_before_id_inserted_last),
        cmocka_unit_test(test_id_before_error),
        cmocka_unit_test(test_error_class_before_desc),
        cmocka_unit_test(test_event_order),
        cmocka_unit_test(test_query_status_order),
        cmocka_unit_test(test_version_order),
        cmocka_unit_test(test_greeting_order),
        cmocka_unit_test(test_order_by_bucket_not_insertion),
        cmocka_unit_test(test_same_bucket_last_inserted_first),
        cmocka_unit_test(test_same_bucket_last_inserted_first_reversed),
        cmocka_unit_test(test_same_bucket_among_others),
        cmocka_unit_test(test_order_many_keys),
        cmocka_unit_test(test_escape_quote_and_backslash),
        cmocka_unit_test(test_escape_short_forms),
        cmocka_unit_test(test_escape_control_chars_uppercase_hex),
        cmocka_unit_test(test_escape_del),
        cmocka_unit_test(test_escape_non_ascii),
        cmocka_unit_test(test_escape_astral_as_surrogates),
        cmocka_unit_test(test_escape_u10ffff),
        cmocka_unit_test(test_slash_not_escaped),
        cmocka_unit_test(test_nul_in_string),
        cmocka_unit_test(test_empty_string),
        cmocka_unit_test(test_key_escaped),
        cmocka_unit_test(test_int64_extremes),
        cmocka_unit_test(test_reals_as_qemu),
        cmocka_unit_test(test_keywords),
        cmocka_unit_test(test_top_level_scalar),
        cmocka_unit_test(test_empty_containers_compact),
        cmocka_unit_test(test_nested_array_compact),
        cmocka_unit_test(test_pretty_empty_return),
        cmocka_unit_test(test_pretty_top_level_empty_object),
        cmocka_unit_test(test_pretty_top_level_empty_array),
        cmocka_unit_test(test_pretty_nested),
        cmocka_unit_test(test_pretty_greeting),
        cmocka_unit_test(test_pretty_event),
        cmocka_unit_test(test_pretty_scalar),
        cmocka_unit_test(test_appends_without_line_end),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
