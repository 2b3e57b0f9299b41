/* Unit tests of common/schema.h: each rule, each text, nesting, unions, enums, ranges, and
 * the key=value typing by the same tables. Texts are QEMU 7.2's (its QAPI input visitor). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/json-stream.h"
#include "common/qjson.h"
#include "common/schema.h"
#include "common/util.h"

/* Test JSON, read as the monitor reads it (common/json-stream.h). */
static json_t *parse(const char *text)
{
    struct error *err = NULL;
    json_t *v = json_stream_parse(text, strlen(text), &err);

    if (!v)
        fail_msg("bad test JSON %s: %s", text, err->desc);
    return v;
}

/* Check obj (stolen) against members: desc is the expected error, or NULL for none. */
static void check_obj(const struct schema_member *members, json_t *obj, const char *text,
                      const char *desc)
{
    struct error *err = NULL;
    int r = schema_check(members, obj, &err);

    json_decref(obj);
    if (!desc) {
        if (r != 0)
            fail_msg("%s: unexpected error: %s", text, err ? err->desc : "(none)");
        assert_null(err);
        return;
    }
    if (r != -1 || !err)
        fail_msg("%s: no error, expected: %s", text, desc);
    assert_int_equal(err->cls, ERROR_CLASS_GENERIC);
    assert_string_equal(err->desc, desc);
    error_free(err);
}

/* ---- scalars --------------------------------------------------------------------------- */

static const char *const colors[] = { "red", "green", NULL };

static const struct schema_member scalars[] = {
    { "s", SCHEMA_STR, .optional = true },
    { "i", SCHEMA_INT, .optional = true },
    { "u", SCHEMA_UINT64, .optional = true },
    { "b", SCHEMA_BOOL, .optional = true },
    { "o", SCHEMA_OBJECT, .optional = true },
    { "a", SCHEMA_ARRAY, .optional = true,
      .element = &(const struct schema_member){ NULL, SCHEMA_ANY } },
    { "e", SCHEMA_ENUM, .optional = true, .values = colors },
    { "n", SCHEMA_INT, .optional = true, .min = 0, .max = UINT32_MAX, .range_name = "uint32" },
    { "any", SCHEMA_ANY, .optional = true },
    { NULL },
};

static void check(const struct schema_member *members, const char *text, const char *desc)
{
    check_obj(members, parse(text), text, desc);
}

static void test_types_accepted(void **state)
{
    check(scalars, "{}", NULL);
    check(scalars, "{\"s\": \"x\", \"i\": -5, \"u\": 7, \"b\": false, \"o\": {\"k\": 1},"
          " \"a\": [1, \"x\"], \"e\": \"green\", \"n\": 4294967295, \"any\": null}", NULL);
}

static void test_type_errors(void **state)
{
    check(scalars, "{\"s\": 1}", "Invalid parameter type for 's', expected: string");
    check(scalars, "{\"s\": null}", "Invalid parameter type for 's', expected: string");
    check(scalars, "{\"i\": \"1\"}", "Invalid parameter type for 'i', expected: integer");
    check(scalars, "{\"i\": 1.5}", "Invalid parameter type for 'i', expected: integer");
    check(scalars, "{\"b\": 1}", "Invalid parameter type for 'b', expected: boolean");
    check(scalars, "{\"o\": []}", "Invalid parameter type for 'o', expected: object");
    check(scalars, "{\"a\": {}}", "Invalid parameter type for 'a', expected: array");
    check(scalars, "{\"e\": 3}", "Invalid parameter type for 'e', expected: string");
}

static void test_uint64(void **state)
{
    check(scalars, "{\"u\": -1}", NULL);  /* wraps, as QEMU's */
    /* Past INT64_MAX the JSON reader keeps integers exact, boxed (common/qjson.h). */
    check(scalars, "{\"u\": 18446744073709551615}", NULL);
    check_obj(scalars, json_pack("{s:o}", "u", qjson_uint64_new(UINT64_MAX)), "2^64-1", NULL);
    check(scalars, "{\"u\": 18446744073709551616}", "Parameter 'u' expects uint64");
    check(scalars, "{\"u\": 9223372036854775808.0}", "Parameter 'u' expects uint64");
    /* A box is a number everywhere else. */
    check(scalars, "{\"i\": 18446744073709551615}",
          "Invalid parameter type for 'i', expected: integer");
    check(scalars, "{\"o\": 18446744073709551615}",
          "Invalid parameter type for 'o', expected: object");
    check(scalars, "{\"u\": 1.5}", "Parameter 'u' expects uint64");
    check(scalars, "{\"u\": \"1\"}", "Parameter 'u' expects uint64");
}

static void test_int_range(void **state)
{
    check(scalars, "{\"n\": 0}", NULL);
    check(scalars, "{\"n\": -1}", "Parameter 'n' expects uint32");
    check(scalars, "{\"n\": 4294967296}", "Parameter 'n' expects uint32");
    check(scalars, "{\"n\": \"1\"}", "Invalid parameter type for 'n', expected: integer");
}

static void test_enum(void **state)
{
    check(scalars, "{\"e\": \"blue\"}", "Parameter 'e' does not accept value 'blue'");
}

static void test_missing_and_unexpected(void **state)
{
    static const struct schema_member need[] = {
        { "name", SCHEMA_STR },
        { "count", SCHEMA_INT, .optional = true },
        { NULL },
    };
    check(need, "{}", "Parameter 'name' is missing");
    check(need, "{\"name\": \"x\", \"bogus\": 1}", "Parameter 'bogus' is unexpected");
    /* Members first, in schema order; unexpected ones after. */
    check(need, "{\"bogus\": 1}", "Parameter 'name' is missing");
    check(need, "{\"count\": true, \"bogus\": 1}", "Parameter 'name' is missing");
    check(need, "{\"name\": \"x\", \"count\": true, \"bogus\": 1}",
          "Invalid parameter type for 'count', expected: integer");
    check(NULL, "{}", NULL);
    check(NULL, "{\"x\": 1}", "Parameter 'x' is unexpected");
}

/* ---- nesting ---------------------------------------------------------------------------- */

static const struct schema_member cache[] = {
    { "direct", SCHEMA_BOOL, .optional = true },
    { "mode", SCHEMA_ENUM, .optional = true, .values = colors },
    { NULL },
};

static const struct schema_member rule[] = {
    { "op", SCHEMA_ENUM, .optional = true, .full_name = true, .values = colors },
    { "errno", SCHEMA_ANY },
    { NULL },
};

static const struct schema_member nested[] = {
    { "cache", SCHEMA_OBJECT, .optional = true, .members = cache },
    { "rules", SCHEMA_ARRAY, .optional = true,
      .element = &(const struct schema_member){ NULL, SCHEMA_OBJECT, .members = rule } },
    { "caps", SCHEMA_ARRAY, .optional = true,
      .element = &(const struct schema_member){ NULL, SCHEMA_ENUM, .values = colors } },
    { NULL },
};

static void test_nested_object(void **state)
{
    check(nested, "{\"cache\": {\"direct\": true}}", NULL);
    check(nested, "{\"cache\": {\"direct\": 1}}",
          "Invalid parameter type for 'cache.direct', expected: boolean");
    check(nested, "{\"cache\": {\"x\": 1}}", "Parameter 'cache.x' is unexpected");
    /* QEMU's enum error names the member alone. */
    check(nested, "{\"cache\": {\"mode\": \"blue\"}}",
          "Parameter 'mode' does not accept value 'blue'");
}

static void test_list(void **state)
{
    check(nested, "{\"rules\": [{\"errno\": 1}, {\"op\": \"red\", \"errno\": \"E\"}]}", NULL);
    check(nested, "{\"rules\": [{\"errno\": 1}, {}]}", "Parameter 'rules[1].errno' is missing");
    check(nested, "{\"rules\": [{\"errno\": 1, \"zz\": 1}]}",
          "Parameter 'rules[0].zz' is unexpected");
    check(nested, "{\"rules\": [5]}", "Invalid parameter type for 'rules[0]', expected: object");
    check(nested, "{\"rules\": [{\"op\": 1, \"errno\": 1}]}",
          "Invalid parameter type for 'rules[0].op', expected: string");
    /* full_name: the place in the list is named. */
    check(nested, "{\"rules\": [{\"op\": \"blue\", \"errno\": 1}]}",
          "Parameter 'rules[0].op' does not accept value 'blue'");
    /* A list element has no name in QEMU's enum error. */
    check(nested, "{\"caps\": [\"red\", \"blue\"]}", "Parameter 'null' does not accept value 'blue'");
    check(nested, "{\"caps\": [\"red\", 1]}", "Invalid parameter type for 'caps[1]', expected: string");
}

/* ---- unions and alternates -------------------------------------------------------------- */

static const struct schema_member file_members[] = {
    { "filename", SCHEMA_STR },
    { NULL },
};

static const struct schema_member raw_members[] = {
    { "size", SCHEMA_UINT64, .optional = true },
    { NULL },
};

static const struct schema_variant variants[] = {
    { "file", file_members },
    { "raw", raw_members },
    { "other", .open = true },
    { NULL },
};

static const char *const drivers[] = { "file", "raw", "other", "plain", NULL };

static const struct schema_member node[] = {
    { "driver", SCHEMA_ENUM, .values = drivers, .variants = variants },
    { "read-only", SCHEMA_BOOL, .optional = true },
    { "child", SCHEMA_ALT, .optional = true, .alt = SCHEMA_ALT_STR | SCHEMA_ALT_OBJECT,
      .alt_name = "BlockdevRef", .members = node },
    { "backing", SCHEMA_ALT, .optional = true,
      .alt = SCHEMA_ALT_STR | SCHEMA_ALT_OBJECT | SCHEMA_ALT_NULL,
      .alt_name = "BlockdevRefOrNull" },
    { "port", SCHEMA_ALT, .optional = true, .full_name = true,
      .alt = SCHEMA_ALT_STR | SCHEMA_ALT_INT, .alt_name = "string" },
    { NULL },
};

/* Without a values list, the variants are the values. */
static const struct schema_member implied[] = {
    { "driver", SCHEMA_ENUM, .variants = variants },
    { NULL },
};

static void test_union(void **state)
{
    check(node, "{\"driver\": \"file\", \"filename\": \"x\"}", NULL);
    check(node, "{\"driver\": \"file\"}", "Parameter 'filename' is missing");
    check(node, "{}", "Parameter 'driver' is missing");
    check(node, "{\"driver\": 1}", "Invalid parameter type for 'driver', expected: string");
    check(node, "{\"driver\": \"nope\"}", "Parameter 'driver' does not accept value 'nope'");
    /* The base first, then the variant. */
    check(node, "{\"driver\": \"file\", \"read-only\": 1}",
          "Invalid parameter type for 'read-only', expected: boolean");
    /* Another variant's member is unexpected. */
    check(node, "{\"driver\": \"raw\", \"filename\": \"x\"}", "Parameter 'filename' is unexpected");
    check(node, "{\"driver\": \"raw\", \"size\": \"x\"}", "Parameter 'size' expects uint64");
    /* A value without a variant adds nothing; an open variant takes anything. */
    check(node, "{\"driver\": \"plain\", \"size\": 1}", "Parameter 'size' is unexpected");
    check(node, "{\"driver\": \"other\", \"whatever\": [1]}", NULL);
    check(implied, "{\"driver\": \"raw\"}", NULL);
    check(implied, "{\"driver\": \"plain\"}", "Parameter 'driver' does not accept value 'plain'");
}

static void test_alternate(void **state)
{
    check(node, "{\"driver\": \"plain\", \"child\": \"n0\", \"backing\": null}", NULL);
    check(node, "{\"driver\": \"plain\", \"child\": 5}",
          "Invalid parameter type for 'child', expected: BlockdevRef");
    check(node, "{\"driver\": \"plain\", \"child\": null}",
          "Invalid parameter type for 'child', expected: BlockdevRef");
    check(node, "{\"driver\": \"plain\", \"backing\": 5}",
          "Invalid parameter type for 'backing', expected: BlockdevRefOrNull");
    check(node, "{\"driver\": \"plain\", \"port\": 10809}", NULL);
    check(node, "{\"driver\": \"plain\", \"port\": true}",
          "Invalid parameter type for 'port', expected: string");
    /* The object branch is checked, nested to any depth, with full names. */
    check(node, "{\"driver\": \"raw\", \"child\": {\"driver\": \"file\"}}",
          "Parameter 'child.filename' is missing");
    check(node, "{\"driver\": \"raw\", \"child\": {\"driver\": \"raw\", \"child\": "
          "{\"driver\": \"file\", \"filename\": \"f\", \"x\": 1}}}",
          "Parameter 'child.child.x' is unexpected");
}

/* ---- key=value typing ------------------------------------------------------------------- */

static const struct schema_member cli[] = {
    { "driver", SCHEMA_ENUM, .values = drivers, .variants = variants },
    { "ro", SCHEMA_BOOL, .optional = true },
    { "cache", SCHEMA_OBJECT, .optional = true, .members = cache },
    { "count", SCHEMA_INT, .optional = true },
    { "rules", SCHEMA_ARRAY, .optional = true,
      .element = &(const struct schema_member){ NULL, SCHEMA_OBJECT, .members = rule } },
    { "child", SCHEMA_ALT, .optional = true, .alt = SCHEMA_ALT_STR | SCHEMA_ALT_OBJECT,
      .alt_name = "BlockdevRef", .members = cli },
    { NULL },
};

static void coerce(const char *in, const char *out_or_error, bool ok)
{
    struct error *err = NULL;
    json_t *obj = parse(in);
    int r = schema_coerce(cli, obj, &err);

    if (ok) {
        if (r != 0)
            fail_msg("%s: %s", in, err ? err->desc : "(no error)");
        char *text = json_dumps(obj, JSON_COMPACT | JSON_SORT_KEYS);
        assert_string_equal(text, out_or_error);
        free(text);
    } else {
        assert_int_equal(r, -1);
        assert_non_null(err);
        assert_string_equal(err->desc, out_or_error);
        error_free(err);
    }
    json_decref(obj);
}

static void test_coerce(void **state)
{
    coerce("{\"driver\":\"raw\",\"ro\":\"on\",\"count\":\"0x10\",\"size\":\"7\",\"x\":\"1\"}",
           "{\"count\":16,\"driver\":\"raw\",\"ro\":true,\"size\":7,\"x\":\"1\"}", true);
    coerce("{\"driver\":\"raw\",\"ro\":\"no\",\"cache\":{\"direct\":\"yes\"}}",
           "{\"cache\":{\"direct\":true},\"driver\":\"raw\",\"ro\":false}", true);
    coerce("{\"driver\":\"raw\",\"rules\":{\"0\":{\"errno\":\"28\"},\"1\":{\"errno\":\"E\"}}}",
           "{\"driver\":\"raw\",\"rules\":[{\"errno\":28},{\"errno\":\"E\"}]}", true);
    coerce("{\"driver\":\"raw\",\"child\":{\"driver\":\"raw\",\"size\":\"1\"}}",
           "{\"child\":{\"driver\":\"raw\",\"size\":1},\"driver\":\"raw\"}", true);
    coerce("{\"ro\":\"maybe\"}", "Parameter 'ro' expects 'on' or 'off'", false);
    coerce("{\"count\":\"1M\"}", "Parameter 'count' expects integer", false);
    coerce("{\"cache\":{\"direct\":\"x\"}}", "Parameter 'cache.direct' expects 'on' or 'off'",
           false);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_types_accepted),
        cmocka_unit_test(test_type_errors),
        cmocka_unit_test(test_uint64),
        cmocka_unit_test(test_int_range),
        cmocka_unit_test(test_enum),
        cmocka_unit_test(test_missing_and_unexpected),
        cmocka_unit_test(test_nested_object),
        cmocka_unit_test(test_list),
        cmocka_unit_test(test_union),
        cmocka_unit_test(test_alternate),
        cmocka_unit_test(test_coerce),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
