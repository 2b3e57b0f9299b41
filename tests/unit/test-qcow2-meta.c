/* Unit tests of the qcow2 metadata layer: the on-disk decoders (block/qcow2-format.h) and the
 * checks every piece of metadata passes before it is acted on (block/qcow2-meta.h), each with
 * the corruption it signals (the BLOCK_IMAGE_CORRUPTED event's exact data, the corrupt bit
 * written on a writable image).
 *
 * The image is made up in memory: a qcow2_state with its tables, over a file node whose
 * driver records the requests the code under test submits (and serves table loads from an
 * in-memory image), so that each check is reached directly, without a daemon.
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
#include "common/util.h"

#define CS 65536u
#define KiB 1024u

/* ---- decoders ------------------------------------------------------------------------------- */

static void test_l2e_types(void **state)
{
    enum qcow2_bad why;

    (void)state;
    assert_int_equal(qcow2_l2e_type(0, 16, 3, &why), QCOW2_UNALLOCATED);
    assert_int_equal(why, QCOW2_BAD_NONE);
    assert_int_equal(qcow2_l2e_type(1, 16, 3, NULL), QCOW2_ZERO_PLAIN);
    assert_int_equal(qcow2_l2e_type(0x50000 | 1 | QCOW2_OFLAG_COPIED, 16, 3, NULL),
                     QCOW2_ZERO_ALLOC);
    assert_int_equal(qcow2_l2e_type(0x50000 | QCOW2_OFLAG_COPIED, 16, 3, NULL), QCOW2_NORMAL);
    assert_int_equal(qcow2_l2e_type(0x50200, 16, 3, &why), QCOW2_BAD);
    assert_int_equal(why, QCOW2_BAD_UNALIGNED);
    assert_int_equal(qcow2_l2e_type(0x50200, 9, 3, NULL), QCOW2_NORMAL);  /* 512 B clusters */
    assert_int_equal(qcow2_l2e_type(0x50000 | 2, 16, 3, &why), QCOW2_BAD);
    assert_int_equal(why, QCOW2_BAD_RESERVED);
    assert_int_equal(qcow2_l2e_type(0x50000 | (1ULL << 56), 16, 3, &why), QCOW2_BAD);
    assert_int_equal(why, QCOW2_BAD_RESERVED);
    assert_int_equal(qcow2_l2e_type(1, 16, 2, &why), QCOW2_BAD);
    assert_int_equal(why, QCOW2_BAD_ZERO_V2);
    /* Compressed: the descriptor bits are not an offset, whatever they hold. */
    assert_int_equal(qcow2_l2e_type(QCOW2_OFLAG_COMPRESSED | 0x3ffffffffffffffULL, 16, 3,
                                    NULL), QCOW2_COMPRESSED);
}

static void test_compressed_descriptor(void **state)
{
    struct qcow2_cdesc d;

    (void)state;
    /* 64 KiB clusters: 54 bits of offset, 8 bits of sector count. */
    qcow2_cdesc_decode(QCOW2_OFLAG_COMPRESSED | 3ULL << 54 | 0x123456, 16, &d);
    assert_int_equal(d.off, 0x123456);
    assert_int_equal(d.len, 4 * 512 - 0x56);
    assert_int_equal(d.first, 0x12);
    assert_int_equal(d.n, 1);
    /* The largest count the field holds: 256 sectors, reaching into two more clusters. */
    qcow2_cdesc_decode(QCOW2_OFLAG_COMPRESSED | 0xffULL << 54 | 0x12fe00, 16, &d);
    assert_int_equal(d.len, 256 * 512);
    assert_int_equal(d.first, 0x12);
    assert_int_equal(d.n, 3);
    /* The crafted image of issue 10: a cluster-aligned stream claiming all 256 sectors
     * covers the cluster after its own. */
    qcow2_cdesc_decode(QCOW2_OFLAG_COMPRESSED | 0xffULL << 54 | 0x50000, 16, &d);
    assert_int_equal(d.first, 5);
    assert_int_equal(d.n, 2);
    /* 512-byte clusters: one bit of count, at most two sectors. */
    qcow2_cdesc_decode(QCOW2_OFLAG_COMPRESSED | 1ULL << 61 | 0x1000, 9, &d);
    assert_int_equal(d.off, 0x1000);
    assert_int_equal(d.len, 1024);
    assert_int_equal(d.first, 8);
    assert_int_equal(d.n, 2);
    /* 2 MiB clusters: 49 bits of offset. */
    qcow2_cdesc_decode(QCOW2_OFLAG_COMPRESSED | (1ULL << 49) | 0x200000, 21, &d);
    assert_int_equal(d.off, 0x200000);
    assert_int_equal(d.len, 1024);
}

/* A refcount entry as the spec defines it, read independently of the code under test. */
static uint64_t spec_refcount(uint32_t order, const uint8_t *b, uint64_t idx)
{
    if (order < 3) {
        uint64_t bit = idx << order;
        return (b[bit / 8] >> (bit % 8)) & ((1u << (1u << order)) - 1);
    }
    uint64_t v = 0;
    for (uint32_t i = 0; i < (1u << (order - 3)); i++)
        v = v << 8 | b[idx * (1u << (order - 3)) + i];
    return v;
}

static void test_refcount_entries(void **state)
{
    (void)state;
    for (uint32_t order = 0; order <= 6; order++) {
        uint8_t block[512] = {0}, copy[512];
        uint64_t entries = 512 * 8 >> order, max = qcow2_refcount_max(order);
        assert_true(max == (order == 6 ? UINT64_MAX : (1ULL << (1u << order)) - 1));
        for (uint64_t i = 0; i < entries; i++)
            qcow2_refcount_set(order, block, i, (i * 0x9e3779b97f4a7c15ULL) & max);
        for (uint64_t i = 0; i < entries; i++) {
            assert_true(qcow2_refcount_get(order, block, i) ==
                        ((i * 0x9e3779b97f4a7c15ULL) & max));
            assert_true(spec_refcount(order, block, i) == qcow2_refcount_get(order, block, i));
        }
        /* encode() says which bytes change, and changes nothing itself. */
        uint8_t out[8];
        uint32_t pos, len;
        memcpy(copy, block, sizeof(block));
        qcow2_refcount_encode(order, block, 5, 1, &pos, &len, out);
        assert_memory_equal(copy, block, sizeof(block));
        memcpy(copy + pos, out, len);
        assert_int_equal(spec_refcount(order, copy, 5), 1);
        for (uint64_t i = 0; i < entries; i++) {
            if (i != 5)
                assert_true(spec_refcount(order, copy, i) == spec_refcount(order, block, i));
        }
        assert_int_equal(pos, qcow2_refcount_byte(order, 5));
    }
}

/* ---- a made-up image ------------------------------------------------------------------------- */

/* Clusters: 0 header, 1 refcount table, 2 refcount block, 3 L1 table, 4 and 5 L2 tables,
 * from 6 data; the file has 64 clusters. */
struct img {
    struct block_graph g;
    struct block_node node, file;
    struct qcow2_state s;
    uint8_t *disk;                  /* what the file holds, for table loads */
    struct block_req *reqs[16];     /* submitted to the file, not completed */
    int nreqs;
    json_t *events;                 /* [[name, data], ...] */
};

static struct img *current;

static void fake_submit(struct block_node *n, struct block_req *req)
{
    (void)n;
    assert_true(current->nreqs < 16);
    current->reqs[current->nreqs++] = req;
}

static const struct block_driver fake_file = {.name = "file", .submit = fake_submit};

static void record_event(void *opaque, const char *name, json_t *data)
{
    struct img *im = opaque;

    json_array_append_new(im->events, json_pack("[s,o]", name, data));
}

/* Complete the requests submitted so far: reads from im->disk, writes into it. */
static void complete_all(struct img *im)
{
    while (im->nreqs) {
        struct block_req *r = im->reqs[0];
        memmove(im->reqs, im->reqs + 1, --im->nreqs * sizeof(*im->reqs));
        if (r->op == BLOCK_OP_READ)
            memcpy(r->buf, im->disk + r->offset, r->len);
        else if (r->op == BLOCK_OP_WRITE)
            memcpy(im->disk + r->offset, r->buf, r->len);
        r->done(r, 0);
    }
}

static void put64(uint8_t *p, uint64_t v)
{
    qcow2_put_be64(p, v);
}

static struct img *img_new(bool writable, uint32_t version)
{
    struct img *im = xzalloc(sizeof(*im));
    struct qcow2_state *s = &im->s;

    current = im;
    im->events = json_array();
    im->g.emit = record_event;
    im->g.emit_opaque = im;
    im->file = (struct block_node){.graph = &im->g, .node_name = "f0", .drv = &fake_file};
    im->node = (struct block_node){.graph = &im->g, .node_name = "q0"};
    im->disk = xzalloc(64 * CS);
    s->node = &im->node;
    s->file = &im->file;
    s->writable = writable;
    s->version = version;
    s->cluster_bits = 16;
    s->cluster_size = CS;
    s->refcount_order = 4;
    s->rb_bits = 16 + 3 - 4;
    s->meta_align = 512;
    s->rt_offset = 1 * CS;
    s->rt_clusters = 1;
    s->rt_entries = CS / 8;
    s->l1_offset = 3 * CS;
    s->l1_size = 4;
    s->header = xzalloc(512);
    s->l1 = xzalloc(qcow2_l1_bytes(s));
    s->rt = xzalloc(CS);
    s->rt[0] = htobe64(2 * CS);
    s->l1[0] = htobe64(4 * CS | QCOW2_OFLAG_COPIED);
    s->l1[1] = htobe64(5 * CS | QCOW2_OFLAG_COPIED);
    s->meta.hwm = 64 * CS;
    s->l2_cache = qcow2_cache_new(&im->file, CS, 4);
    s->rb_cache = qcow2_cache_new(&im->file, CS, 4);
    return im;
}

static void img_free(struct img *im)
{
    complete_all(im);
    qcow2_cache_free(im->s.l2_cache);
    qcow2_cache_free(im->s.rb_cache);
    qcow2_meta_cleanup(&im->s);
    free(im->s.header);
    free(im->s.l1);
    free(im->s.rt);
    free(im->disk);
    json_decref(im->events);
    free(im);
}

/* The one event recorded since the last call: BLOCK_IMAGE_CORRUPTED with this message and
 * fatal flag (and no offset or size unless given: >= 0). */
static void expect_corrupted(struct img *im, const char *msg, bool fatal, int64_t off,
                             int64_t size)
{
    json_t *want = json_pack("{s:s,s:s,s:s}", "device", "", "node-name", "q0", "msg", msg);

    if (off >= 0)
        json_object_set_new(want, "offset", json_integer(off));
    if (size >= 0)
        json_object_set_new(want, "size", json_integer(size));
    json_object_set_new(want, "fatal", json_boolean(fatal));
    assert_int_equal(json_array_size(im->events), 1);
    json_t *ev = json_array_get(im->events, 0);
    assert_string_equal(json_string_value(json_array_get(ev, 0)), "BLOCK_IMAGE_CORRUPTED");
    char *got = json_dumps(json_array_get(ev, 1), JSON_SORT_KEYS);
    char *exp = json_dumps(want, JSON_SORT_KEYS);
    assert_string_equal(got, exp);
    free(got);
    free(exp);
    json_decref(want);
    json_array_clear(im->events);
}

static void expect_no_event(struct img *im)
{
    assert_int_equal(json_array_size(im->events), 0);
}

/* ---- checks of table entries ------------------------------------------------------------------ */

static void test_l1_entries(void **state)
{
    (void)state;
    struct img *im = img_new(false, 3);
    struct qcow2_state *s = &im->s;
    uint64_t off;

    qcow2_meta_init(s);
    assert_int_equal(qcow2_l2_table(s, 0, true, &off), 0);
    assert_int_equal(off, 4 * CS);
    assert_int_equal(qcow2_l2_table(s, 2, true, &off), 0);  /* no table */
    assert_int_equal(off, 0);
    expect_no_event(im);

    s->l1[2] = htobe64(6 * CS | 0x200);  /* unaligned: QEMU's message */
    assert_int_equal(qcow2_l2_table(s, 2, true, &off), -EIO);
    expect_corrupted(im, "L2 table offset 0x60200 unaligned (L1 index: 0x2)", false, -1, -1);
    im->s.meta.signalled = false;

    s->l1[2] = htobe64(6 * CS | 0x100);  /* bits 0-8 are reserved */
    assert_int_equal(qcow2_l2_table(s, 2, true, &off), -EIO);
    expect_corrupted(im, "L1 entry 0x60100 has reserved bits set (L1 index: 0x2)", false, -1,
                     -1);
    im->s.meta.signalled = false;

    s->l1[2] = htobe64(6 * CS | 1);  /* reserved bit 0 */
    assert_int_equal(qcow2_l2_table(s, 2, true, &off), -EIO);
    expect_corrupted(im, "L1 entry 0x60001 has reserved bits set (L1 index: 0x2)", false, -1,
                     -1);
    im->s.meta.signalled = false;

    s->l1[2] = htobe64(64 * CS);  /* at the end of the file */
    assert_int_equal(qcow2_l2_table(s, 2, true, &off), -EIO);
    expect_corrupted(im, "L2 table offset 0x400000 lies outside the image file (L1 index: 0x2)",
                     false, -1, -1);
    im->s.meta.signalled = false;

    s->l1[2] = htobe64(3 * CS);  /* the L1 table itself */
    assert_int_equal(qcow2_l2_table(s, 2, true, &off), -EIO);
    expect_corrupted(im, "L2 table offset 0x30000 overlaps with active L1 table (L1 index: "
                     "0x2)", false, -1, -1);
    im->s.meta.signalled = false;

    /* The refcount block: read through, it is only garbage entries, each checked; changed
     * through, it would change the refcounts. (The map knows it from the tables at open.) */
    s->l1[2] = htobe64(2 * CS);
    assert_int_equal(qcow2_l2_table(s, 2, true, &off), 0);
    assert_int_equal(off, 2 * CS);
    expect_no_event(im);
    assert_int_equal(qcow2_l2_table(s, 2, false, &off), -EIO);
    expect_corrupted(im, "L2 table offset 0x20000 overlaps with refcount block (L1 index: 0x2)",
                     false, -1, -1);
    img_free(im);
}

static void test_l2_table_claimed_twice(void **state)
{
    (void)state;
    struct img *im = img_new(true, 3);
    struct qcow2_state *s = &im->s;
    uint64_t off;

    s->l1[1] = htobe64(4 * CS | QCOW2_OFLAG_COPIED);  /* the same table as L1[0] */
    qcow2_meta_init(s);
    /* Read through: harmless. Changed through: the other mapping would change too. */
    assert_int_equal(qcow2_l2_table(s, 1, true, &off), 0);
    assert_int_equal(off, 4 * CS);
    expect_no_event(im);
    assert_int_equal(qcow2_l2_table(s, 1, false, &off), -EIO);
    expect_corrupted(im, "L2 table offset 0x40000 overlaps with another mapping (L1 index: "
                     "0x1)", true, -1, -1);
    /* Fatal: the corrupt bit goes to the header, and every write fails from now on. */
    assert_int_equal(im->nreqs, 1);
    assert_int_equal(im->reqs[0]->op, BLOCK_OP_WRITE);
    assert_int_equal(im->reqs[0]->offset, 0);
    assert_int_equal(im->reqs[0]->len, 512);
    assert_int_equal(((uint8_t *)im->reqs[0]->buf)[79] & QCOW2_INCOMPAT_CORRUPT,
                     QCOW2_INCOMPAT_CORRUPT);
    complete_all(im);
    assert_true(s->meta.corrupt);
    assert_int_equal(qcow2_pre_write(s, 10 * CS, 512, false), -EIO);
    /* Further corruption is not signalled again. */
    assert_int_equal(qcow2_l2_table(s, 1, false, &off), -EIO);
    expect_no_event(im);
    assert_int_equal(im->nreqs, 0);
    img_free(im);
}

static void test_version2_has_no_corrupt_bit(void **state)
{
    (void)state;
    struct img *im = img_new(true, 2);
    uint64_t off;

    im->s.l1[2] = htobe64(6 * CS | 0x200);
    qcow2_meta_init(&im->s);
    assert_int_equal(qcow2_l2_table(&im->s, 2, true, &off), -EIO);
    expect_corrupted(im, "L2 table offset 0x60200 unaligned (L1 index: 0x2)", true, -1, -1);
    assert_int_equal(im->nreqs, 0);  /* nothing to write in a version 2 header */
    assert_true(im->s.meta.corrupt);
    img_free(im);
}

static void test_refcount_table_entries(void **state)
{
    (void)state;
    struct img *im = img_new(false, 3);
    struct qcow2_state *s = &im->s;
    uint64_t off;

    s->rt[1] = htobe64(7 * CS | 0x200);
    s->rt[2] = htobe64(8 * CS | (1ULL << 63));
    s->rt[3] = htobe64(100 * CS);
    s->rt[4] = htobe64(4 * CS);  /* an L2 table */
    s->rt[5] = htobe64(0);       /* cluster 0: no block */
    qcow2_meta_init(s);
    assert_int_equal(qcow2_refblock(s, 0, &off), 0);
    assert_int_equal(off, 2 * CS);
    assert_int_equal(qcow2_refblock(s, 5, &off), 0);
    assert_int_equal(off, 0);
    assert_int_equal(qcow2_refblock(s, CS, &off), 0);  /* past the table: none */
    assert_int_equal(off, 0);
    expect_no_event(im);
    assert_int_equal(qcow2_refblock(s, 1, &off), -EIO);
    expect_corrupted(im, "Refblock offset 0x70200 unaligned (reftable index: 0x1)", false, -1,
                     -1);
    s->meta.signalled = false;
    assert_int_equal(qcow2_refblock(s, 2, &off), -EIO);
    expect_corrupted(im, "Refcount table entry 0x8000000000080000 has reserved bits set "
                     "(reftable index: 0x2)", false, -1, -1);
    s->meta.signalled = false;
    assert_int_equal(qcow2_refblock(s, 3, &off), -EIO);
    expect_corrupted(im, "Refblock offset 0x640000 lies outside the image file (reftable "
                     "index: 0x3)", false, -1, -1);
    s->meta.signalled = false;
    assert_int_equal(qcow2_refblock(s, 4, &off), -EIO);
    expect_corrupted(im, "Refblock offset 0x40000 overlaps with active L2 table (reftable "
                     "index: 0x4)", false, -1, -1);
    img_free(im);
}

/* ---- checks of L2 entries -------------------------------------------------------------------- */

struct waited {
    struct qcow2_waiter w;
    int calls, ret;
};

static void waited_cb(struct qcow2_waiter *w, int ret)
{
    struct waited *x = container_of(w, struct waited, w);

    x->calls++;
    x->ret = ret;
}

/* The L2 entry of guest cluster gc through qcow2_lookup(), its table loaded from the disk. */
static int lookup(struct img *im, uint64_t gc, uint64_t *l2e)
{
    struct waited x = {.w.cb = waited_cb};
    int ret = qcow2_lookup(&im->s, gc * CS, true, &x.w, l2e);

    if (ret == 1) {
        complete_all(im);
        assert_int_equal(x.calls, 1);
        assert_int_equal(x.ret, 0);
        ret = qcow2_lookup(&im->s, gc * CS, true, &x.w, l2e);
    }
    return ret;
}

static void set_l2(struct img *im, uint32_t idx, uint64_t e)
{
    put64(im->disk + 4 * CS + 8 * idx, e);
}

static void test_l2_entries(void **state)
{
    (void)state;
    struct img *im = img_new(false, 3);
    struct qcow2_state *s = &im->s;
    uint64_t e;

    set_l2(im, 0, 6 * CS | QCOW2_OFLAG_COPIED);
    set_l2(im, 1, 6 * CS | 0x400 | QCOW2_OFLAG_COPIED);
    set_l2(im, 2, 70 * CS | QCOW2_OFLAG_COPIED);
    set_l2(im, 3, 7 * CS | 4);
    set_l2(im, 4, QCOW2_OFLAG_COMPRESSED | 0xffULL << 54 | 63 * CS);
    set_l2(im, 5, QCOW2_OFLAG_COMPRESSED | 1ULL << 54 | 8 * CS);
    set_l2(im, 6, 9 * CS | 1 | QCOW2_OFLAG_COPIED);
    qcow2_meta_init(s);
    assert_int_equal(lookup(im, 0, &e), 0);
    assert_true(e == (6 * CS | QCOW2_OFLAG_COPIED));
    assert_int_equal(lookup(im, 5, &e), 0);
    assert_int_equal(lookup(im, 6, &e), 0);
    assert_int_equal(lookup(im, 7, &e), 0);
    assert_true(e == 0);
    expect_no_event(im);
    assert_int_equal(lookup(im, 1, &e), -EIO);
    expect_corrupted(im, "Cluster allocation offset 0x60400 unaligned (L2 offset: 0x40000, L2 "
                     "index: 0x1)", false, -1, -1);
    s->meta.signalled = false;
    assert_int_equal(lookup(im, 2, &e), -EIO);
    expect_corrupted(im, "Cluster allocation offset 0x460000 lies outside the image file (L2 "
                     "offset: 0x40000, L2 index: 0x2)", false, -1, -1);
    s->meta.signalled = false;
    assert_int_equal(lookup(im, 3, &e), -EIO);
    expect_corrupted(im, "L2 entry 0x70004 has reserved bits set (L2 offset: 0x40000, L2 "
                     "index: 0x3)", false, -1, -1);
    s->meta.signalled = false;
    /* The last cluster of the file holds compressed data whose sector count runs past it. */
    assert_int_equal(lookup(im, 4, &e), -EIO);
    expect_corrupted(im, "Compressed cluster at 0x3f0000 (131072 bytes) lies outside the image "
                     "file (L2 offset: 0x40000, L2 index: 0x4)", false, -1, -1);
    img_free(im);

    im = img_new(false, 2);
    set_l2(im, 0, 1);
    qcow2_meta_init(&im->s);
    assert_int_equal(lookup(im, 0, &e), -EIO);
    expect_corrupted(im, "Zero cluster entry found in pre-v3 image (L2 offset: 0x40000, L2 "
                     "index: 0)", false, -1, -1);
    img_free(im);
}

static void test_uses_of_clusters(void **state)
{
    (void)state;
    struct img *im = img_new(true, 3);
    struct qcow2_state *s = &im->s;
    uint64_t normal = 6 * CS | QCOW2_OFLAG_COPIED;
    uint64_t comp = QCOW2_OFLAG_COMPRESSED | 0xffULL << 54 | 8 * CS;  /* covers 8 and 9 */

    qcow2_meta_init(s);
    assert_int_equal(qcow2_check_use(s, 0, normal, QCOW2_USE_READ), 0);
    assert_int_equal(qcow2_check_use(s, 0, normal, QCOW2_USE_WRITE), 0);
    assert_int_equal(qcow2_check_use(s, 0, normal, QCOW2_USE_FREE), 0);
    assert_int_equal(qcow2_check_use(s, CS, comp, QCOW2_USE_FREE), 0);
    /* An L2 entry naming metadata: a write in place is pre_write()'s to refuse (QEMU's
     * message, the write's offset and size); a free is refused here. */
    uint64_t over_rb = 2 * CS | QCOW2_OFLAG_COPIED;
    assert_int_equal(qcow2_check_use(s, 0, over_rb, QCOW2_USE_WRITE), 0);
    assert_int_equal(qcow2_check_use(s, 0, over_rb, QCOW2_USE_FREE), -EIO);
    expect_corrupted(im, "Cluster allocation offset 0x20000 overlaps with refcount block; "
                     "refusing to free it (L2 offset: 0x40000, L2 index: 0)", true, -1, -1);
    complete_all(im);
    s->meta.corrupt = s->meta.signalled = false;
    /* Clusters the open-time check found in conflict. */
    qcow2_meta_conflict(s, 9, QCOW2_META_SHARED);
    qcow2_meta_conflict(s, 6, QCOW2_META_SHARED);
    qcow2_meta_conflict(s, 7, QCOW2_META_UNCOUNTED);
    assert_int_equal(qcow2_check_use(s, 0, 7 * CS | QCOW2_OFLAG_COPIED, QCOW2_USE_FREE), -EIO);
    expect_corrupted(im, "Cluster allocation offset 0x70000 has more references than its "
                     "refcount; refusing to free it (L2 offset: 0x40000, L2 index: 0)", true, -1,
                     -1);
    complete_all(im);
    s->meta.corrupt = s->meta.signalled = false;
    assert_int_equal(qcow2_check_use(s, 0, normal, QCOW2_USE_READ), 0);
    assert_int_equal(qcow2_check_use(s, 0, normal, QCOW2_USE_WRITE), -EIO);
    expect_corrupted(im, "Cluster allocation offset 0x60000 is referenced elsewhere too; "
                     "refusing to write to it (L2 offset: 0x40000, L2 index: 0)", true, -1, -1);
    complete_all(im);
    s->meta.corrupt = s->meta.signalled = false;
    assert_int_equal(qcow2_check_use(s, CS, comp, QCOW2_USE_READ), 0);
    assert_int_equal(qcow2_check_use(s, CS, comp, QCOW2_USE_FREE), -EIO);
    expect_corrupted(im, "Compressed cluster at 0x80000 (131072 bytes) covers cluster 0x90000, "
                     "which is referenced elsewhere too; refusing to free it (L2 offset: "
                     "0x40000, L2 index: 0x1)", true, -1, -1);
    img_free(im);
}

static void test_pre_write(void **state)
{
    (void)state;
    struct img *im = img_new(true, 3);
    struct qcow2_state *s = &im->s;

    qcow2_meta_init(s);
    assert_int_equal(qcow2_pre_write(s, 6 * CS + 512, 4 * KiB, false), 0);
    assert_int_equal(qcow2_pre_write(s, 2 * CS, 512, true), 0);  /* metadata: allowed */
    expect_no_event(im);
    assert_int_equal(qcow2_pre_write(s, 70 * CS, 512, false), 0);
    assert_int_equal(s->meta.hwm, 71 * CS);  /* the file's extent follows the writes */
    assert_int_equal(qcow2_pre_write(s, 4 * CS - 512, 1024, false), -EIO);
    expect_corrupted(im, "Preventing invalid write on metadata (overlaps with active L1 table)",
                     true, 4 * CS - 512, 1024);
    complete_all(im);
    assert_int_equal(qcow2_pre_write(s, 20 * CS, 512, true), -EIO);  /* corrupt: no writes */
    assert_true(qcow2_meta_overlap(s, 0) && !strcmp(qcow2_meta_overlap(s, 0), "qcow2_header"));
    assert_string_equal(qcow2_meta_overlap(s, 1), "refcount table");
    assert_string_equal(qcow2_meta_overlap(s, 2), "refcount block");
    assert_string_equal(qcow2_meta_overlap(s, 5), "active L2 table");
    assert_null(qcow2_meta_overlap(s, 6));
    img_free(im);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_l2e_types),
        cmocka_unit_test(test_compressed_descriptor),
        cmocka_unit_test(test_refcount_entries),
        cmocka_unit_test(test_l1_entries),
        cmocka_unit_test(test_l2_table_claimed_twice),
        cmocka_unit_test(test_version2_has_no_corrupt_bit),
        cmocka_unit_test(test_refcount_table_entries),
        cmocka_unit_test(test_l2_entries),
        cmocka_unit_test(test_uses_of_clusters),
        cmocka_unit_test(test_pre_write),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
