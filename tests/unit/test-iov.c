/* common/iov.h: slicing a vector at any byte, copies to and from it, zeroing part of it,
 * testing it for zeroes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/iov.h"
#include "common/util.h"

/* Three segments of 3, 5 and 4 bytes over one array: byte i of the vector is buf[i]. */
static char buf[12];
static const struct iovec vec[] = { {buf, 3}, {buf + 3, 5}, {buf + 8, 4} };

static void test_size_and_alignment(void **state)
{
    char mem[64] __attribute__((aligned(16)));
    struct iovec a[] = { {mem, 16}, {mem + 32, 32} };

    (void)state;
    assert_int_equal(iov_size(vec, 3), 12);
    assert_int_equal(iov_size(vec, 0), 0);
    assert_true(iov_aligned(a, 2, 16));
    assert_false(iov_aligned(a, 2, 32));    /* the first address */
    a[1].iov_len = 24;
    assert_false(iov_aligned(a + 1, 1, 16));  /* a length */
    assert_true(iov_aligned(vec, 3, 1));
}

/* The slice [off, off + len) of vec, checked segment by segment against want (pairs of
 * start in buf and length). */
static void check_slice(uint64_t off, uint64_t len, const size_t *want, unsigned n)
{
    struct iovec out[3];

    assert_int_equal(iov_slice(vec, 3, off, len, NULL), n);
    assert_int_equal(iov_slice(vec, 3, off, len, out), n);
    for (unsigned i = 0; i < n; i++) {
        assert_ptr_equal(out[i].iov_base, buf + want[2 * i]);
        assert_int_equal(out[i].iov_len, want[2 * i + 1]);
    }
}

static void test_slice(void **state)
{
    (void)state;
    check_slice(0, 12, (size_t[]){0, 3, 3, 5, 8, 4}, 3);   /* the whole */
    check_slice(3, 5, (size_t[]){3, 5}, 1);                /* one segment exactly */
    check_slice(4, 2, (size_t[]){4, 2}, 1);                /* inside one */
    check_slice(2, 7, (size_t[]){2, 1, 3, 5, 8, 1}, 3);    /* cut at both ends */
    check_slice(8, 4, (size_t[]){8, 4}, 1);                /* the last */
    check_slice(5, 0, NULL, 0);                            /* nothing */
}

static void test_copies_and_memset(void **state)
{
    char flat[12];

    (void)state;
    memset(buf, 0, sizeof(buf));
    iov_from_buf(vec, 3, 2, "abcdefg", 7);   /* across all three segments */
    assert_memory_equal(buf, "\0\0abcdefg\0\0\0", 12);
    iov_to_buf(vec, 3, 1, flat, 9);
    assert_memory_equal(flat, "\0abcdefg\0", 9);
    iov_memset(vec, 3, 4, 'z', 6);
    assert_memory_equal(buf, "\0\0abzzzzzz\0\0", 12);
}

/* Every start within a word and every length up to past two four-word blocks, with a
 * non-zero byte at each position in turn: found wherever it is (head, words, tail). */
static void test_buf_is_zero(void **state)
{
    unsigned char mem[128] __attribute__((aligned(8)));

    (void)state;
    memset(mem, 0, sizeof(mem));
    for (size_t start = 0; start < 8; start++) {
        for (size_t len = 0; start + len <= 80; len++) {
            assert_true(buf_is_zero(mem + start, len));
            for (size_t i = 0; i < len; i++) {
                mem[start + i] = 0x80;
                assert_false(buf_is_zero(mem + start, len));
                mem[start + i] = 0;
            }
        }
    }
    /* Bytes around the range do not count. */
    mem[3] = mem[40] = 1;
    assert_true(buf_is_zero(mem + 4, 36));
}

/* A vector is zero only if every segment is; empty segments and an empty vector are. */
static void test_iov_is_zero(void **state)
{
    struct iovec v[] = { {buf, 3}, {buf + 3, 0}, {buf + 3, 9} };

    (void)state;
    memset(buf, 0, sizeof(buf));
    assert_true(iov_is_zero(v, 3));
    assert_true(iov_is_zero(v, 0));
    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = 1;
        assert_false(iov_is_zero(v, 3));
        buf[i] = 0;
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_size_and_alignment),
        cmocka_unit_test(test_slice),
        cmocka_unit_test(test_copies_and_memset),
        cmocka_unit_test(test_buf_is_zero),
        cmocka_unit_test(test_iov_is_zero),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
