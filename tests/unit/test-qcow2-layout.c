/* Unit tests of block/qcow2-layout.h: the header fields, the refcount structures covering
 * every metadata cluster (each with refcount 1, nothing else), the L1 size, the limits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "block/qcow2-layout.h"
#include "common/util.h"

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* The refcount of cluster c in the image img, read as a reader of the format would. */
static uint64_t refcount(const struct qcow2_layout *l, const uint8_t *img, uint64_t c)
{
    uint64_t cs = l->cluster_size, per_block = cs * 8 >> l->refcount_order;
    uint64_t rb = be(img + l->rt_offset + c / per_block * 8, 8);
    uint64_t idx = c % per_block;
    if (rb == 0)
        return 0;
    if (l->refcount_order < 3) {
        uint64_t bit = idx << l->refcount_order;
        return (img[rb + bit / 8] >> (bit % 8)) & ((1u << (1u << l->refcount_order)) - 1);
    }
    int bytes = 1 << (l->refcount_order - 3);
    return be(img + rb + idx * bytes, bytes);
}

static uint8_t *image(struct qcow2_layout *l)
{
    assert_int_equal(qcow2_layout_compute(l, NULL), 0);
    /* Past the end too: fill must give zeroes there. */
    uint8_t *img = malloc(l->meta_end + l->cluster_size);
    qcow2_layout_fill(l, 0, img, l->meta_end + l->cluster_size);
    return img;
}

static void check_refcounts(struct qcow2_layout *l, const uint8_t *img)
{
    for (uint64_t c = 0; c < l->nclusters; c++)
        assert_int_equal(refcount(l, img, c), 1);
    /* Every entry the blocks hold past the image: 0. */
    uint64_t per_block = l->cluster_size * 8 >> l->refcount_order;
    for (uint64_t c = l->nclusters; c < l->rb_count * per_block; c += 7)
        assert_int_equal(refcount(l, img, c), 0);
    for (uint64_t i = l->meta_end; i < l->meta_end + l->cluster_size; i++)
        assert_int_equal(img[i], 0);
}

static void test_defaults_header(void **state)
{
    struct qcow2_layout l = { .size = 1ULL << 30, .version = 3, .cluster_bits = 16,
                              .refcount_order = 4 };
    uint8_t *img = image(&l);

    assert_int_equal(be(img, 4), 0x514649fb);
    assert_int_equal(be(img + 4, 4), 3);
    assert_int_equal(be(img + 8, 8), 0);          /* no backing file */
    assert_int_equal(be(img + 20, 4), 16);
    assert_int_equal(be(img + 24, 8), 1ULL << 30);
    assert_int_equal(be(img + 36, 4), 2);         /* 1 GiB / 512 MiB per L2 table */
    assert_int_equal(be(img + 40, 8), l.l1_offset);
    assert_int_equal(be(img + 48, 8), 65536);
    assert_int_equal(be(img + 56, 4), 1);
    assert_int_equal(be(img + 80, 8), 0);         /* no lazy refcounts */
    assert_int_equal(be(img + 96, 4), 4);
    assert_int_equal(be(img + 100, 4), 112);
    /* QEMU's layout: header, refcount table, one refcount block, L1. */
    assert_int_equal(l.nclusters, 4);
    assert_int_equal(l.l1_offset, 3 * 65536);
    check_refcounts(&l, img);
    free(img);
}

static void test_backing_and_lazy(void **state)
{
    struct qcow2_layout l = { .size = 1ULL << 20, .version = 3, .cluster_bits = 12,
                              .refcount_order = 0, .lazy_refcounts = true,
                              .backing_file = "/tmp/base.img", .backing_fmt = "raw" };
    uint8_t *img = image(&l);

    assert_int_equal(be(img + 80, 8), 1);
    /* Backing format extension right after the header, then the end marker, then the name
     * (as QEMU writes them: the name at 0x88). */
    assert_int_equal(be(img + 112, 4), 0xe2792aca);
    assert_int_equal(be(img + 116, 4), 3);
    assert_memory_equal(img + 120, "raw", 3);
    assert_int_equal(be(img + 128, 8), 0);
    assert_int_equal(be(img + 8, 8), 0x88);
    assert_int_equal(be(img + 16, 4), strlen("/tmp/base.img"));
    assert_memory_equal(img + 0x88, "/tmp/base.img", strlen("/tmp/base.img"));
    assert_int_equal(img[3 * 4096], 0);  /* L1 at cluster 3: empty */
    check_refcounts(&l, img);
    free(img);
}

static void test_v2_header(void **state)
{
    struct qcow2_layout l = { .size = 512, .version = 2, .cluster_bits = 9,
                              .refcount_order = 4 };
    uint8_t *img = image(&l);

    assert_int_equal(be(img + 4, 4), 2);
    assert_int_equal(be(img + 72, 8), 0);  /* the end-of-extensions marker at 72 */
    assert_int_equal(be(img + 36, 4), 1);
    check_refcounts(&l, img);
    free(img);
}

/* Many refcount blocks and a multi-cluster table: 512-byte clusters, 64-bit refcounts
 * (64 entries a block) and a large L1. */
static void test_many_refcount_blocks(void **state)
{
    struct qcow2_layout l = { .size = 64ULL << 30, .version = 3, .cluster_bits = 9,
                              .refcount_order = 6 };
    uint8_t *img = image(&l);

    /* 64 GiB / (512 * 64) bytes per L2 table = 2M entries: 16 MiB of L1. */
    assert_int_equal(l.l1_entries, 2ULL << 20);
    assert_int_equal(l.l1_clusters, 32768);
    assert_true(l.rb_count * 64 >= l.nclusters);
    assert_true(l.rt_clusters * 64 >= l.rb_count);
    assert_int_equal(l.nclusters, 1 + l.rt_clusters + l.rb_count + l.l1_clusters);
    check_refcounts(&l, img);
    free(img);
}

static void test_fill_any_window(void **state)
{
    struct qcow2_layout l = { .size = 8ULL << 30, .version = 3, .cluster_bits = 9,
                              .refcount_order = 1 };
    uint8_t *whole = image(&l);
    uint8_t part[1500];

    for (uint64_t off = 0; off + sizeof(part) < l.meta_end; off += 4093) {
        qcow2_layout_fill(&l, off, part, sizeof(part));
        assert_memory_equal(part, whole + off, sizeof(part));
    }
    free(whole);
}

static void test_limits(void **state)
{
    struct error *err = NULL;
    struct qcow2_layout l = { .size = 1ULL << 40, .version = 3, .cluster_bits = 9,
                              .refcount_order = 4 };

    assert_int_equal(qcow2_layout_compute(&l, &err), -1);
    assert_string_equal(err->desc,
                        "Could not resize image: Failed to grow the L1 table: File too large");
    error_free(err);
    err = NULL;
    l = (struct qcow2_layout){ .size = QCOW2_MAX_IMAGE_SIZE + 512, .version = 3,
                               .cluster_bits = 21, .refcount_order = 4 };
    assert_int_equal(qcow2_layout_compute(&l, &err), -1);
    assert_non_null(strstr(err->desc, "exceeds maximum(9223372035781033984)"));
    error_free(err);
    err = NULL;
    char name[1100];
    memset(name, 'a', sizeof(name) - 1);
    name[sizeof(name) - 1] = 0;
    l = (struct qcow2_layout){ .size = 0, .version = 3, .cluster_bits = 16,
                               .refcount_order = 4, .backing_file = name };
    assert_int_equal(qcow2_layout_compute(&l, &err), -1);
    error_free(err);
    /* The largest L1 (32 MiB) with 2 MiB clusters maps 2^61 bytes, and no more. */
    l = (struct qcow2_layout){ .size = 1ULL << 61, .version = 3, .cluster_bits = 21,
                               .refcount_order = 4 };
    assert_int_equal(qcow2_layout_compute(&l, NULL), 0);
    assert_int_equal(l.l1_entries * 8, QCOW2_MAX_L1_BYTES);
    l.size += 512;
    assert_int_equal(qcow2_layout_compute(&l, NULL), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_header),
        cmocka_unit_test(test_backing_and_lazy),
        cmocka_unit_test(test_v2_header),
        cmocka_unit_test(test_many_refcount_blocks),
        cmocka_unit_test(test_fill_any_window),
        cmocka_unit_test(test_limits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
