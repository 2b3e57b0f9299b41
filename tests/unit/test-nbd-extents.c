/* nbd/extents.c: block status descriptors merged as they come, bounded in count and length. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "nbd/internal.h"

static struct nbd_extent e[3];

static struct nbd_extents empty(unsigned max)
{
    return (struct nbd_extents){ .e = e, .max = max };
}

static void test_equal_flags_merge(void **state)
{
    struct nbd_extents x = empty(3);

    (void)state;
    assert_int_equal(nbd_extents_add(&x, 4096, 0), 4096);
    assert_int_equal(nbd_extents_add(&x, 8192, 0), 8192);
    assert_int_equal(nbd_extents_add(&x, 512, 3), 512);
    assert_int_equal(nbd_extents_add(&x, 512, 3), 512);
    assert_int_equal(x.n, 2);
    assert_int_equal(e[0].length, 12288);
    assert_int_equal(e[0].flags, 0);
    assert_int_equal(e[1].length, 1024);
    assert_int_equal(e[1].flags, 3);
}

/* Full: equal flags still merge into the last one, new ones are not taken. */
static void test_full_takes_only_what_merges(void **state)
{
    struct nbd_extents x = empty(1);

    (void)state;
    assert_int_equal(nbd_extents_add(&x, 4096, 2), 4096);
    assert_int_equal(nbd_extents_add(&x, 4096, 2), 4096);
    assert_int_equal(nbd_extents_add(&x, 4096, 1), 0);
    assert_int_equal(x.n, 1);
    assert_int_equal(e[0].length, 8192);
}

/* A descriptor's length is 32 bits: past it, a new descriptor with the same flags. */
static void test_length_limit(void **state)
{
    struct nbd_extents x = empty(2);

    (void)state;
    assert_int_equal(nbd_extents_add(&x, UINT32_MAX - 10, 0), UINT32_MAX - 10);
    assert_int_equal(nbd_extents_add(&x, 100, 0), 100);
    assert_int_equal(x.n, 2);
    assert_int_equal(e[0].length, UINT32_MAX);
    assert_int_equal(e[1].length, 90);
    /* Both full: only what fits in the second. */
    assert_int_equal(nbd_extents_add(&x, 1ull << 33, 0), UINT32_MAX - 90);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_equal_flags_merge),
        cmocka_unit_test(test_full_takes_only_what_merges),
        cmocka_unit_test(test_length_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
