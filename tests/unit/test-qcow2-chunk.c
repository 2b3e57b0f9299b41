/* Unit tests of block/qcow2-chunk.h: a batch's staged metadata writes. Chunks copied from the
 * table at their first touch (later changes to the table do not show), found by disk offset,
 * grouped into runs contiguous on disk; refcount changes staged in chunks, with the
 * corruption a refcount that cannot change signals.
 */
#include <endian.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "block/qcow2.h"
#include "block/qcow2-cache.h"
#include "block/qcow2-chunk.h"
#include "common/util.h"

static void test_touch_copies_once(void **state)
{
    (void)state;
    struct qcow2_chunkset cs = {0};
    uint8_t table[4096];

    for (size_t i = 0; i < sizeof(table); i++)
        table[i] = (uint8_t)i;
    struct qcow2_chunk *c = qcow2_chunk_touch(&cs, 512, QCOW2_CHUNK_L2, 0x40000, table,
                                              sizeof(table), 0x40000, 1000);
    assert_int_equal(c->disk, 0x40000 + 512);
    assert_int_equal(c->table, 0x40000);
    assert_int_equal(c->pos, 512);
    assert_int_equal(c->len, 512);
    assert_int_equal(c->kind, QCOW2_CHUNK_L2);
    assert_int_equal(c->ret, 1);
    assert_memory_equal(c->buf, table + 512, 512);
    /* The batch's copy: patched there, the table in memory untouched; touching the chunk
     * again gives the same copy, not a new one from the table. */
    c->buf[8] = 0xee;
    table[520] = 0x11;
    assert_ptr_equal(qcow2_chunk_touch(&cs, 512, QCOW2_CHUNK_L2, 0x40000, table, sizeof(table),
                                       0x40000, 1023), c);
    assert_int_equal((uint8_t)c->buf[8], 0xee);
    assert_int_equal(cs.v.len, 1);
    assert_ptr_equal(qcow2_chunk_find(&cs, 0x40000 + 512), c);
    assert_null(qcow2_chunk_find(&cs, 0x40000));
    qcow2_chunkset_free(&cs);
    assert_int_equal(cs.v.len, 0);
}

static void test_chunk_at_table_end(void **state)
{
    (void)state;
    struct qcow2_chunkset cs = {0};
    uint64_t l1[3] = {1, 2, 3};  /* an L1 table of 24 bytes: its only chunk is short */

    struct qcow2_chunk *c = qcow2_chunk_touch(&cs, 512, QCOW2_CHUNK_L1, 0, l1, sizeof(l1),
                                              0x30000, 16);
    assert_int_equal(c->disk, 0x30000);
    assert_int_equal(c->len, 24);
    assert_memory_equal(c->buf, l1, 24);
    qcow2_chunkset_free(&cs);
}

static void test_many_chunks_found(void **state)
{
    (void)state;
    struct qcow2_chunkset cs = {0};
    static uint8_t table[1 << 20];

    /* Enough to grow the hash several times; every one found again. */
    for (uint64_t i = 0; i < 2048; i += 2)
        qcow2_chunk_touch(&cs, 512, QCOW2_CHUNK_RB, 0x100000, table, sizeof(table), 0x100000,
                          i * 512);
    assert_int_equal(cs.v.len, 1024);
    for (uint64_t i = 0; i < 2048; i++) {
        struct qcow2_chunk *c = qcow2_chunk_find(&cs, 0x100000 + i * 512);
        if (i % 2)
            assert_null(c);
        else
            assert_true(c && c->pos == i * 512);
    }
    qcow2_chunkset_free(&cs);
}

static void test_runs(void **state)
{
    (void)state;
    struct qcow2_chunkset cs = {0};
    static uint8_t table[65536];
    struct qcow2_chunk_run runs[16];
    /* Touched out of order: chunks 7, 1, 2, 3, 9 of a table at 0x10000, and the short
     * last chunk of a 24-byte table right after chunk 9. */
    uint64_t order[] = {7, 1, 2, 3, 9};

    for (size_t i = 0; i < 5; i++)
        qcow2_chunk_touch(&cs, 512, QCOW2_CHUNK_L2, 0x10000, table, sizeof(table), 0x10000,
                          order[i] * 512 + 8);
    qcow2_chunk_touch(&cs, 512, QCOW2_CHUNK_L1, 0, table, 24, 0x10000 + 10 * 512, 0);
    size_t n = qcow2_chunk_runs(&cs, 512, 4 << 20, runs);
    assert_int_equal(n, 3);
    /* 1, 2, 3 together; 7 alone; 9 and the short chunk after it together. */
    assert_int_equal(runs[0].n, 3);
    assert_int_equal(runs[0].len, 1536);
    assert_int_equal(cs.v.ptr[runs[0].first]->disk, 0x10000 + 512);
    assert_int_equal(runs[1].n, 1);
    assert_int_equal(cs.v.ptr[runs[1].first]->disk, 0x10000 + 7 * 512);
    assert_int_equal(runs[2].n, 2);
    assert_int_equal(runs[2].len, 512 + 24);
    /* A smaller maximum splits the first run. */
    n = qcow2_chunk_runs(&cs, 512, 1024, runs);
    assert_int_equal(n, 4);
    assert_int_equal(runs[0].n, 2);
    assert_int_equal(runs[1].n, 1);
    qcow2_chunkset_free(&cs);
}

/* A short chunk ends its run: what follows it on disk is not part of it. */
static void test_short_chunk_ends_run(void **state)
{
    (void)state;
    struct qcow2_chunkset cs = {0};
    static uint8_t table[4096];
    struct qcow2_chunk_run runs[4];

    qcow2_chunk_touch(&cs, 512, QCOW2_CHUNK_L1, 0, table, 24, 0x20000, 0);
    qcow2_chunk_touch(&cs, 512, QCOW2_CHUNK_L2, 0x20018, table, sizeof(table), 0x20018, 0);
    assert_int_equal(qcow2_chunk_runs(&cs, 512, 4 << 20, runs), 2);
    qcow2_chunkset_free(&cs);
}

/* ---- refcount changes ------------------------------------------------------------------------ */

#define CS 65536u

struct img {
    struct block_graph g;
    struct block_node node, file;
    struct qcow2_state s;
    uint8_t *block;                 /* the refcount block on disk */
    struct block_req *req;          /* a load in flight */
    json_t *events;
};

static struct img *current;

static void fake_submit(struct block_node *n, struct block_req *req)
{
    (void)n;
    assert_null(current->req);
    current->req = req;
}

static const struct block_driver fake_file = {.name = "file", .submit = fake_submit};

static void record_event(void *opaque, const char *name, json_t *data)
{
    struct img *im = opaque;

    json_array_append_new(im->events, json_pack("[s,o]", name, data));
}

/* 64 KiB clusters, 16-bit refcounts; the refcount block at cluster 2. Read-only, so that a
 * corruption writes nothing. */
static struct img *img_new(void)
{
    struct img *im = xzalloc(sizeof(*im));
    struct qcow2_state *s = &im->s;

    current = im;
    im->events = json_array();
    im->g.emit = record_event;
    im->g.emit_opaque = im;
    im->file = (struct block_node){.graph = &im->g, .node_name = "f0", .drv = &fake_file};
    im->node = (struct block_node){.graph = &im->g, .node_name = "q0"};
    im->block = xzalloc(CS);
    s->node = &im->node;
    s->file = &im->file;
    s->version = 3;
    s->cluster_bits = 16;
    s->cluster_size = CS;
    s->refcount_order = 4;
    s->rb_bits = 15;
    s->meta_align = 512;
    s->rt_offset = CS;
    s->rt_clusters = 1;
    s->rt_entries = CS / 8;
    s->l1_offset = 3 * CS;
    s->header = xzalloc(512);
    s->l1 = xzalloc(512);
    s->rt = xzalloc(CS);
    s->rt[0] = htobe64(2 * CS);
    s->meta.hwm = 64 * CS;
    s->rb_cache = qcow2_cache_new(&im->file, CS, 4);
    qcow2_meta_init(s);
    return im;
}

static void img_free(struct img *im)
{
    qcow2_cache_free(im->s.rb_cache);
    qcow2_meta_cleanup(&im->s);
    free(im->s.header);
    free(im->s.l1);
    free(im->s.rt);
    free(im->block);
    json_decref(im->events);
    free(im);
}

static void load_cb(struct qcow2_waiter *w, int ret)
{
    (void)w;
    assert_int_equal(ret, 0);
}

/* qcow2_chunk_refcount(), serving the block's load from im->block. */
static struct qcow2_chunk *change(struct img *im, struct qcow2_chunkset *cs, uint64_t cl,
                                  int delta, bool want_zero, int *err)
{
    struct qcow2_waiter w = {.cb = load_cb};
    struct qcow2_chunk *c = qcow2_chunk_refcount(&im->s, cs, cl, delta, want_zero, &w, err);

    if (!c && !*err) {
        struct block_req *r = im->req;
        im->req = NULL;
        assert_non_null(r);
        assert_int_equal(r->offset, 2 * CS);
        memcpy(r->buf, im->block, r->len);
        r->done(r, 0);
        c = qcow2_chunk_refcount(&im->s, cs, cl, delta, want_zero, &w, err);
    }
    return c;
}

static void test_refcount_changes(void **state)
{
    (void)state;
    struct img *im = img_new();
    struct qcow2_chunkset cs = {0};
    int err;

    qcow2_refcount_set(4, im->block, 7, 1);
    qcow2_refcount_set(4, im->block, 300, 0xffff);
    struct qcow2_chunk *c = change(im, &cs, 8, +1, true, &err);
    assert_int_equal(err, 0);
    assert_int_equal(c->disk, 2 * CS);  /* entries 0..255 in the first 512 bytes */
    assert_int_equal(qcow2_refcount_get(4, c->buf, 8), 1);
    assert_int_equal(qcow2_refcount_get(4, im->block, 8), 0);  /* staged, not on disk */
    assert_ptr_equal(change(im, &cs, 7, -1, false, &err), c);
    assert_int_equal(qcow2_refcount_get(4, c->buf, 7), 0);
    assert_ptr_equal(change(im, &cs, 8, +1, false, &err), c);  /* shared: 2 */
    assert_int_equal(qcow2_refcount_get(4, c->buf, 8), 2);
    assert_int_equal(cs.v.len, 1);
    assert_int_equal(json_array_size(im->events), 0);

    /* A new allocation over a cluster in use, a decrement below 0, an increment past the
     * width: corruption, nothing staged. */
    assert_null(change(im, &cs, 8, +1, true, &err));
    assert_int_equal(err, -EIO);
    assert_int_equal(json_array_size(im->events), 1);
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_array_get(
        im->events, 0), 1), "msg")), "Refcount of cluster 0x80000 is 2: cannot increment it "
        "for a new allocation (refblock offset: 0x20000)");
    assert_int_equal(qcow2_refcount_get(4, c->buf, 8), 2);
    im->s.meta.signalled = false;
    assert_null(change(im, &cs, 9, -1, false, &err));
    assert_int_equal(err, -EIO);
    im->s.meta.signalled = false;
    assert_null(change(im, &cs, 300, +1, false, &err));
    assert_int_equal(err, -EIO);
    assert_int_equal(cs.v.len, 2);  /* the second chunk was touched before the check */
    /* No refcount block for a cluster past what the table covers. */
    im->s.meta.signalled = false;
    assert_null(change(im, &cs, (uint64_t)1 << 15, +1, true, &err));
    assert_int_equal(err, -EIO);
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_array_get(
        im->events, 3), 1), "msg")), "Cluster 0x80000000 has no refcount block (reftable "
        "index: 0x1)");
    qcow2_chunkset_free(&cs);
    img_free(im);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_touch_copies_once),
        cmocka_unit_test(test_chunk_at_table_end),
        cmocka_unit_test(test_many_chunks_found),
        cmocka_unit_test(test_runs),
        cmocka_unit_test(test_short_chunk_ends_run),
        cmocka_unit_test(test_refcount_changes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
