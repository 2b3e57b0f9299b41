/* Unit tests of the rbd method's parsing of an rbd node's file name (QEMU's json: of
 * -blockdev, its legacy rbd: form), which tells the agent the pool and the configuration. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>

#include <cmocka.h>

#include "agent/rbd.h"

static void expect(const char *filename, const char *pool, const char *image, const char *conf)
{
    char *p, *i, *c;

    assert_int_equal(rbd_parse_filename(filename, &p, &i, &c), 0);
    assert_string_equal(p, pool);
    assert_string_equal(i, image);
    if (conf)
        assert_string_equal(c, conf);
    else
        assert_null(c);
    free(p);
    free(i);
    free(c);
}

static void test_json(void **state)
{
    expect("json:{\"driver\": \"rbd\", \"pool\": \"p0\", \"image\": \"disk\", \"conf\": "
           "\"/etc/ceph/ceph.conf\"}", "p0", "disk", "/etc/ceph/ceph.conf");
    expect("json:{\"driver\": \"rbd\", \"pool\": \"p0\", \"image\": \"disk\"}", "p0", "disk",
           NULL);
    /* A format node's json: with the rbd node as its file. */
    expect("json:{\"driver\": \"raw\", \"file\": {\"driver\": \"rbd\", \"pool\": \"p\", "
           "\"image\": \"i\"}}", "p", "i", NULL);
}

static void test_legacy(void **state)
{
    expect("rbd:p0/disk", "p0", "disk", NULL);
    expect("rbd:p0/disk@snap:conf=/c.conf:id=admin", "p0", "disk", "/c.conf");
}

static void test_not_rbd(void **state)
{
    char *p, *i, *c;

    assert_int_equal(rbd_parse_filename("/dev/loop0", &p, &i, &c), -1);
    assert_int_equal(rbd_parse_filename("json:{\"driver\": \"file\", \"pool\": \"p\", "
                                        "\"image\": \"i\"}", &p, &i, &c), -1);
    assert_int_equal(rbd_parse_filename("json:{\"driver\": \"rbd\"}", &p, &i, &c), -1);
    assert_int_equal(rbd_parse_filename("rbd:nopool", &p, &i, &c), -1);
    assert_int_equal(rbd_parse_filename(NULL, &p, &i, &c), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_legacy),
        cmocka_unit_test(test_not_rbd),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
