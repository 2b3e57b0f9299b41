/* The "qcow2" format driver: QEMU's image format (docs/interop/qcow2.txt), versions 2 and 3.
 * The front door: options, open, close, and what runs each part of a request. The rest is in
 * the files qcow2.h lists.
 *
 * Options (QEMU's BlockdevOptionsQcow2, the part we have): file (the child: a node name or
 * inline options), backing (a node name, inline options, or null: the image is read without
 * its backing file; absent: the file the image names, see qcow2-backing.c),
 * l2-cache-size and refcount-cache-size (bytes), lazy-refcounts (accepted, checked as QEMU
 * does, and otherwise without effect: refcounts are always written before the entries that
 * use them, so this driver never sets the dirty bit).
 *
 * What it does:
 *  - opens images qemu-img writes: cluster sizes 512 B to 2 MiB, refcounts 1 to 64 bits wide;
 *    refuses, with a clear error, external data files, encryption, extended L2
 *    entries, compression other than zlib and unknown incompatible features; opens corrupt
 *    and snapshotted images read-only only; checks every reference against the refcounts at
 *    a writable open (qcow2-check.c: leaks reclaimed, a dirty image repaired, conflicts kept
 *    from being acted on);
 *  - checks every piece of metadata where a request uses it (qcow2-meta.c): what fails marks
 *    the image corrupt and fails the request with EIO, nothing is written;
 *  - reads: unallocated clusters read from the backing node (zeroes without one), zero
 *    clusters as zeroes; compressed clusters (zlib) are inflated when built with zlib
 *    (THINBLK_HAVE_ZLIB), fail ENOTSUP otherwise and on writes;
 *  - writes: in place to allocated clusters, through qcow2-alloc.c to new ones;
 *  - write-zeroes and discard (with discard=unmap): zero flags and freed clusters
 *    (qcow2-alloc.c);
 *  - block status (qcow2-status.c): unallocated clusters are the backing chain's, zero clusters
 *    read as zeroes, others are data;
 *  - flush: the child's. Metadata is written through before a request completes, so a flush
 *    only has to reach the storage. FUA: one flush of the child after the request's writes.
 *
 * Open reads the header and the tables synchronously (sync-io.h): open() is synchronous in
 * the driver API, as bdrv_open() is in QEMU; it runs at startup or within a QMP command.
 * Everything after open goes through node_submit().
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "block/qcow2.h"
#include "block/qcow2-alloc.h"
#include "block/qcow2-cache.h"
#include "block/qcow2-check.h"
#include "block/qcow2-header.h"
#include "block/qcow2-resize.h"
#include "block/qcow2-status.h"
#include "block/sync-io.h"
#include "common/assert.h"
#include "common/iov.h"
#include "common/log.h"
#include "common/util.h"

#define DEFAULT_L2_CACHE_BYTES (32u << 20)
#define DEFAULT_RB_CACHE_BYTES (4u << 20)

/* ---- running a part ------------------------------------------------------------------------ */

static void part_run(struct qcow2_part *p);

static void part_wait_done(struct qcow2_waiter *w, int ret)
{
    struct qcow2_part *p = container_of(w, struct qcow2_part, w);

    if (ret < 0)
        qcow2_part_done(p, ret);
    else
        part_run(p);
}

static void part_read(struct qcow2_state *s, struct qcow2_part *p, uint64_t l2e)
{
    switch (qcow2_l2e_type(l2e, s->cluster_bits, s->version, NULL)) {
    case QCOW2_COMPRESSED:
        qcow2_part_read_compressed(p, l2e);
        return;
    case QCOW2_NORMAL:
        qcow2_part_read_host(p, l2e & QCOW2_OFFSET_MASK);
        return;
    case QCOW2_UNALLOCATED:
        if (s->node->backing) {
            qcow2_backing_read(s, p);
            return;
        }
        /* fall through */
    default:  /* reads as zeroes (QCOW2_BAD never comes out of a lookup) */
        iov_memset(p->iov, p->niov, 0, 0, p->len);
        qcow2_part_done(p, 0);
        return;
    }
}

/* A part's turn (qcow2_reqs.run): its L2 entry, then a read, a write in place, or the
 * allocator. Runs again once a table it waits for is loaded. */
static void part_run(struct qcow2_part *p)
{
    struct qcow2_state *s = p->r->s;
    bool reading = p->r->parent->op == BLOCK_OP_READ;
    uint64_t l2e, host;
    int ret;

    if (p->r->err) {
        /* Another part of the request failed: the request fails (and is retried whole, if
         * the error policy parks it), so skip the rest and let it fail now. */
        qcow2_part_done(p, 0);
        return;
    }
    p->w.cb = part_wait_done;
    /* The L2 table is only read here: the allocator looks it up again to change it. */
    ret = qcow2_lookup(s, p->voff, true, &p->w, &l2e);
    if (ret == 1)
        return;  /* p->w resumes us */
    if (ret < 0) {
        qcow2_part_done(p, ret);
        return;
    }
    if (reading) {
        part_read(s, p, l2e);
        return;
    }
    if (s->meta.corrupt) {
        qcow2_part_done(p, -EIO);
        return;
    }
    ret = qcow2_plan(s, p, l2e, &host);
    if (ret == QCOW2_PLAN_HOST)
        qcow2_part_write_host(p, host);
    else if (ret == QCOW2_PLAN_META)
        qcow2_alloc_enqueue(s, p);
    else
        qcow2_part_done(p, ret < 0 ? ret : 0);
}

/* ---- open and close ------------------------------------------------------------------------- */

static void state_free(struct qcow2_state *s)
{
    if (!s)
        return;
    qcow2_reqs_cleanup(s);
    qcow2_alloc_free(s);
    qcow2_reserve_cleanup(s);
    qcow2_cache_free(s->l2_cache);
    qcow2_cache_free(s->rb_cache);
    qcow2_meta_cleanup(s);
    qcow2_backing_cleanup(s);
    free(s->header);
    free(s->l1);
    free(s->rt);
    free(s);
}

/* QEMU's BlockdevOptionsQcow2, the part thinblk takes; the cache sizes are ints there,
 * refused below 0 here. */
const struct schema_member block_qcow2_options[] = {
    BLOCK_REF_MEMBER("file"),
    { "backing", SCHEMA_ALT, .optional = true,
      .alt = SCHEMA_ALT_STR | SCHEMA_ALT_OBJECT | SCHEMA_ALT_NULL,
      .alt_name = "BlockdevRefOrNull", .members = block_options },
    { "lazy-refcounts", SCHEMA_BOOL, .optional = true },
    { "l2-cache-size", SCHEMA_INT, .optional = true, .min = 0, .max = INT64_MAX,
      .range_name = "uint64" },
    { "refcount-cache-size", SCHEMA_INT, .optional = true, .min = 0, .max = INT64_MAX,
      .range_name = "uint64" },
    { NULL },
};

/* The options this driver reads (checked already). */
struct options {
    json_t *backing;            /* borrowed: NULL, null, a node name or options */
    uint64_t l2_bytes, rb_bytes;
    bool lazy;
};

static void read_options(json_t *opts, struct options *o)
{
    json_t *v;

    o->backing = json_object_get(opts, "backing");
    if (o->backing && json_is_string(o->backing) && !*json_string_value(o->backing)) {
        log_warn("Use of \"backing\": \"\" is deprecated; use \"backing\": null instead");
        o->backing = json_null();  /* as QEMU */
    }
    o->l2_bytes = DEFAULT_L2_CACHE_BYTES;
    o->rb_bytes = DEFAULT_RB_CACHE_BYTES;
    if ((v = json_object_get(opts, "l2-cache-size")))
        o->l2_bytes = (uint64_t)json_integer_value(v);
    if ((v = json_object_get(opts, "refcount-cache-size")))
        o->rb_bytes = (uint64_t)json_integer_value(v);
    o->lazy = json_is_true(json_object_get(opts, "lazy-refcounts"));
}

/* The first sector: magic, version and cluster size, before anything is allocated. */
static int probe(struct block_node *child, uint32_t *cluster_bits, struct error **errp)
{
    uint8_t first[512];

    if (node_pread_sync(child, first, sizeof(first), 0, errp) < 0)
        return -1;
    if (qcow2_be32(first) != QCOW2_MAGIC) {
        error_setg(errp, "Image is not in qcow2 format");
        return -1;
    }
    uint32_t version = qcow2_be32(first + 4);
    *cluster_bits = qcow2_be32(first + 20);
    if (version < 2 || version > 3) {
        error_setg(errp, "Unsupported qcow2 version %" PRIu32, version);
        return -1;
    }
    if (*cluster_bits < 9 || *cluster_bits > 21) {
        error_setg(errp, "Unsupported cluster size: 2^%" PRIu32, *cluster_bits);
        return -1;
    }
    return 0;
}

/* A writable open: unknown autoclear features cleared, then every reference checked (and a
 * dirty image repaired), then the allocator. */
static int open_writable(struct qcow2_state *s, struct error **errp)
{
    if (s->autoclear) {
        /* The spec: a writer that does not know an autoclear feature clears it (we know none,
         * e.g. bitmaps that our writes would leave stale). Before the check: the clusters of
         * such a feature are then no longer in use. */
        static const uint8_t zero8[8];
        if (node_pwrite_sync(s->file, zero8, 8, 88, errp) < 0)
            return -1;
        memset((uint8_t *)s->header + 88, 0, 8);
        s->autoclear = 0;
    }
    if (qcow2_check_open(s, errp) < 0)
        return -1;
    s->alloc = qcow2_alloc_new(s);
    return 0;
}

static int qcow2_open(struct block_node *n, json_t *opts, struct error **errp)
{
    struct block_node *child;
    struct qcow2_state *s;
    struct options o;
    uint64_t size;
    uint32_t cluster_bits;
    _cleanup_free_ uint8_t *c0 = NULL;

    read_options(opts, &o);
    child = block_node_open_child(n->graph, json_object_get(opts, "file"), errp);
    if (!child)
        return -1;
    n->file = child;  /* from here, a failed open drops it with the node */
    if (probe(child, &cluster_bits, errp) < 0)
        return -1;

    s = xzalloc(sizeof(*s));
    s->node = n;
    s->file = child;
    s->bk.null = o.backing && json_is_null(o.backing);
    if (o.backing && !s->bk.null)
        s->bk.opt = json_incref(o.backing);  /* opened by qcow2_backing_open() */
    s->cluster_bits = cluster_bits;
    s->cluster_size = 1u << cluster_bits;
    s->meta_align = MAX(512u, child->alignment);
    s->writable = !(n->read_only || child->read_only);
    qcow2_reqs_init(s, part_run);
    if (s->meta_align > s->cluster_size) {
        error_setg(errp, "qcow2: the cluster size (%" PRIu32 ") is smaller than the storage's "
                   "block size (%" PRIu32 ")", s->cluster_size, s->meta_align);
        goto fail;
    }
    c0 = qcow2_alloc_buf(s->cluster_size);
    if (node_pread_sync(child, c0, s->cluster_size, 0, errp) < 0 ||
        qcow2_header_parse(s, c0, &size, errp) < 0)
        goto fail;
    if (o.lazy && s->version < 3) {
        error_setg(errp, "Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                   "compatibility level");
        goto fail;
    }
    s->rb_bits = s->cluster_bits + 3 - s->refcount_order;
    s->header = qcow2_alloc_buf(s->meta_align);
    memcpy(s->header, c0, s->meta_align);
    s->meta.hwm = (child->size + s->cluster_size - 1) & ~(uint64_t)(s->cluster_size - 1);
    if (qcow2_tables_load(s, size, errp) < 0)
        goto fail;
    qcow2_meta_init(s);
    if ((s->writable && open_writable(s, errp) < 0) || qcow2_detect_prealloc(s, errp) < 0)
        goto fail;
    s->l2_cache = qcow2_cache_new(child, s->cluster_size,
                                  (unsigned)MIN(MAX(o.l2_bytes / s->cluster_size, 4),
                                                MAX(s->l1_size, 4)));
    s->rb_cache = qcow2_cache_new(child, s->cluster_size,
                                  (unsigned)MIN(MAX(o.rb_bytes / s->cluster_size, 4), 4096));
    n->opaque = s;
    n->size = size;
    n->alignment = child->alignment;
    n->read_only = !s->writable;
    return 0;
fail:
    state_free(s);
    return -1;
}

static void qcow2_close(struct block_node *n)
{
    qcow2_alloc_close(n->opaque);
    state_free(n->opaque);
}

static void qcow2_submit(struct block_node *n, struct block_req *req)
{
    uint64_t align = MAX(n->alignment, 1u);

    /* The tables cover the virtual size (its last cluster whole): nothing past it. A backing
     * read of the last bytes comes widened to the alignment (qcow2-backing.c). */
    ASSERT(req->op == BLOCK_OP_FLUSH ||
           req->offset + req->len <= (n->size + align - 1) / align * align);
    qcow2_req_submit(n->opaque, req);
}

/* The virtual size is the image's own; its file grows as clusters are allocated. */
static bool qcow2_keeps_child_size(struct block_node *n)
{
    return true;
}

const struct block_driver block_driver_qcow2 = {
    .name = "qcow2",
    .open = qcow2_open,
    .close = qcow2_close,
    .submit = qcow2_submit,
    .open_backing = qcow2_backing_open,
    .backing_overridden = qcow2_backing_overridden,
    .query_image = qcow2_query_image,
    .truncate = qcow2_truncate,
    .keeps_child_size = qcow2_keeps_child_size,
    .block_status = qcow2_block_status,
};
