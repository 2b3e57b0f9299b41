/* Unit tests of thinblkctl's argument conversion: each case is the command line's arguments
 * and the "arguments" object they must give, compared as compact JSON text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "ctl/args.h"

/* Parse the NULL-terminated argv and compare with want (compact JSON, keys in order). */
static void expect_args(const char *want, ...)
{
    char *argv[16];
    int argc = 0;
    va_list ap;
    va_start(ap, want);
    for (char *a; (a = va_arg(ap, char *));)
        argv[argc++] = a;
    va_end(ap);

    struct error *err = NULL;
    json_t *obj = ctl_args_parse(argc, argv, &err);
    if (!obj)
        fail_msg("unexpected error: %s", err->desc);
    char *got = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
    assert_string_equal(got, want);
    free(got);
    json_decref(obj);
}

static void expect_args_error(const char *want, ...)
{
    char *argv[16];
    int argc = 0;
    va_list ap;
    va_start(ap, want);
    for (char *a; (a = va_arg(ap, char *));)
        argv[argc++] = a;
    va_end(ap);

    struct error *err = NULL;
    assert_null(ctl_args_parse(argc, argv, &err));
    assert_non_null(err);
    assert_string_equal(err->desc, want);
    error_free(err);
}

static void test_none(void **state)
{
    expect_args("{}", NULL);
}

static void test_integers(void **state)
{
    expect_args("{\"a\":1048576,\"b\":-5,\"c\":0,\"d\":9223372036854775807}", "a=1048576", "b=-5",
                "c=0", "d=9223372036854775807", NULL);
}

static void test_not_integers_stay_strings(void **state)
{
    expect_args("{\"a\":\"007\",\"b\":\"1.5\",\"c\":\"12ab\",\"d\":\"-\",\"e\":\"+1\",\"f\":\"\"}",
                "a=007", "b=1.5", "c=12ab", "d=-", "e=+1", "f=", NULL);
}

static void test_integer_out_of_range(void **state)
{
    expect_args_error("Parameter 'a': Integer '9223372036854775808' is out of range",
                      "a=9223372036854775808", NULL);
}

static void test_keywords(void **state)
{
    expect_args("{\"a\":true,\"b\":false,\"c\":null,\"d\":\"True\"}", "a=true", "b=false", "c=null",
                "d=True", NULL);
}

static void test_json_values(void **state)
{
    expect_args("{\"a\":[1,\"x\"],\"b\":{\"c\":{}}}", "a=[1, \"x\"]", "b={\"c\": {}}", NULL);
    expect_args_error("Parameter 'a': Invalid JSON '[1,': ']' expected near end of file",
                      "a=[1,", NULL);
}

static void test_strings(void **state)
{
    expect_args("{\"node-name\":\"disk0\",\"path\":\"/a=b,c\"}", "node-name=disk0",
                "path=/a=b,c", NULL);
}

static void test_raw_json(void **state)
{
    expect_args("{\"a\":\"123\",\"b\":5,\"c\":true,\"d\":[]}", "a:=\"123\"", "b:=5", "c:=true",
                "d:=[]", NULL);
    expect_args_error("Invalid JSON for parameter 'a': invalid token near 'x'", "a:=x",
                      NULL);
}

static void test_dotted_keys_nest(void **state)
{
    expect_args("{\"a\":{\"b\":1,\"c\":{\"d\":\"x\"}},\"e\":2}", "a.b=1", "a.c.d=x", "e=2", NULL);
}

static void test_dotted_key_conflicts(void **state)
{
    expect_args_error("Parameter 'a.b' conflicts with 'a'", "a=1", "a.b=2", NULL);
    expect_args_error("Parameter 'a' is given twice", "a.b=1", "a=2", NULL);
    expect_args_error("Parameter 'a' is given twice", "a=1", "a=2", NULL);
    expect_args_error("Invalid parameter name 'a..b'", "a..b=1", NULL);
    expect_args_error("Invalid parameter name '.a'", ".a=1", NULL);
}

static void test_json_object(void **state)
{
    expect_args("{\"node-name\":\"d\",\"write-threshold\":5}",
                "{\"node-name\":\"d\",\"write-threshold\":5}", NULL);
    expect_args_error("Invalid JSON arguments: '}' expected near end of file", "{\"a\":1", NULL);
}

static void test_bad_pairs(void **state)
{
    expect_args_error("Invalid argument 'disk0': expected KEY=VALUE, KEY:=JSON or one JSON "
                      "object", "disk0", NULL);
    expect_args_error("Invalid argument '=1': expected KEY=VALUE, KEY:=JSON or one JSON object",
                      "=1", NULL);
    /* A JSON object is only taken on its own. */
    expect_args_error("Invalid argument '{\"a\":1}': expected KEY=VALUE, KEY:=JSON or one JSON "
                      "object", "{\"a\":1}", "b=2", NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_none),
        cmocka_unit_test(test_integers),
        cmocka_unit_test(test_not_integers_stay_strings),
        cmocka_unit_test(test_integer_out_of_range),
        cmocka_unit_test(test_keywords),
        cmocka_unit_test(test_json_values),
        cmocka_unit_test(test_strings),
        cmocka_unit_test(test_raw_json),
        cmocka_unit_test(test_dotted_keys_nest),
        cmocka_unit_test(test_dotted_key_conflicts),
        cmocka_unit_test(test_json_object),
        cmocka_unit_test(test_bad_pairs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
