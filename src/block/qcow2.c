/* The "qcow2" format driver: QEMU's image format (docs/interop/qcow2.txt), versions 2 and 3.
 *
 * Options (QEMU's BlockdevOptionsQcow2, the part we have): file (the child: a node name or
 * inline options), backing (a node name, inline options, or null: the image is read without
 * its backing file; absent: the file the image names, see qcow2-backing.c),
 * l2-cache-size and refcount-cache-size (bytes), lazy-refcounts (accepted, checked as QEMU
 * does, and otherwise without effect: refcounts are always written before the entries that
 * use them, so this driver never sets the dirty bit).
 *
 * What this version does (see issue 4 for the rest):
 *  - opens images qemu-img writes: cluster sizes 512 B to 2 MiB, refcounts 1 to 64 bits wide;
 *    refuses, with a clear error, external data files, encryption, extended L2
 *    entries, compression other than zlib and unknown incompatible features; opens corrupt
 *    and snapshotted images read-only only; repairs dirty images (lazy refcounts) at a
 *    writable open, as QEMU does (qcow2-repair.c), and reads them as they are read-only;
 *  - reads: unallocated clusters read from the backing node (zeroes without one), zero
 *    clusters as zeroes; compressed clusters (zlib) are
 *    inflated when built with zlib (THINBLK_HAVE_ZLIB), fail ENOTSUP otherwise and on writes;
 *  - writes: in place to allocated clusters, through qcow2-alloc.c to new ones;
 *  - write-zeroes: nothing to do where a cluster already reads as zeroes (zero flag, or
 *    unallocated without a backing node), zeroes written in place elsewhere and allocated
 *    over a backing node; no cluster is freed;
 *  - discard: advisory, does nothing (freeing clusters is still to do);
 *  - flush: the child's. Metadata is written through before a request completes, so a flush
 *    only has to reach the storage. FUA: one flush of the child after the request's writes.
 *
 * Open reads the header and the L1 and refcount tables synchronously (sync-io.h): open() is
 * synchronous in the driver API, as bdrv_open() is in QEMU; it runs at startup or within a QMP
 * command, and reads a bounded amount (L1 at most 32 MiB, refcount table at most 8 MiB, as
 * QEMU's limits). Everything after open goes through node_submit().
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "block/qcow2.h"
#include "block/sync-io.h"
#include "common/log.h"
#include "common/util.h"
#include "io/uring.h"

#ifdef THINBLK_HAVE_ZLIB
#include <zlib.h>
#endif

#define MAX_L1_BYTES (32u << 20)
#define MAX_RT_BYTES (8u << 20)
#define EXT_FEATURE_NAMES 0x6803f857u
#define DEFAULT_L2_CACHE_BYTES (32u << 20)
#define DEFAULT_RB_CACHE_BYTES (4u << 20)

void *qcow2_alloc_buf(size_t len)
{
    void *p;

    if (posix_memalign(&p, 4096, MAX(len, 1)) != 0)
        abort();
    memset(p, 0, len);
    return p;
}

static uint32_t be32_at(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64_at(const uint8_t *p)
{
    return (uint64_t)be32_at(p) << 32 | be32_at(p + 4);
}

/* ---- open ---------------------------------------------------------------------------- */

/* The name of incompatible feature bit in the image's feature name table: true if found. */
static bool feature_name(const uint8_t *c0, uint32_t ext_start, uint32_t cs, unsigned bit,
                         char *out, size_t outlen)
{
    uint32_t off = ext_start;

    while (off + 8 <= cs) {
        uint32_t type = be32_at(c0 + off), len = be32_at(c0 + off + 4);
        if (type == 0 || len > cs - off - 8)
            return false;
        if (type == EXT_FEATURE_NAMES) {
            for (uint32_t i = 0; i + 48 <= len; i += 48) {
                const uint8_t *f = c0 + off + 8 + i;
                if (f[0] == 0 && f[1] == bit) {
                    snprintf(out, outlen, "%.46s", (const char *)f + 2);
                    return true;
                }
            }
        }
        off += 8 + ((len + 7) & ~7u);
    }
    return false;
}

/* QEMU's wording: "Unsupported qcow2 feature(s): NAME, NAME, Unknown incompatible feature:
 * HEXMASK", names from the image's feature name table. */
static void report_unsupported(const uint8_t *c0, uint32_t ext_start, uint32_t cs,
                               uint64_t mask, struct error **errp)
{
    char list[1024] = "", name[64];
    size_t used = 0;
    uint64_t unknown = 0;

    for (unsigned bit = 0; bit < 64; bit++) {
        if (!(mask & (1ULL << bit)))
            continue;
        if (!feature_name(c0, ext_start, cs, bit, name, sizeof(name))) {
            unknown |= 1ULL << bit;
            continue;
        }
        int w = snprintf(list + used, sizeof(list) - used, "%s%s", used ? ", " : "", name);
        if (w < 0 || (size_t)w >= sizeof(list) - used)
            break;
        used += (size_t)w;
    }
    if (unknown)
        snprintf(list + used, sizeof(list) - used, "%sUnknown incompatible feature: %" PRIx64,
                 used ? ", " : "", unknown);
    error_setg(errp, "Unsupported qcow2 feature(s): %s", list);
}

/* Parse and check the header in cluster 0 (c0, cs bytes). */
static int parse_header(struct qcow2_state *s, const uint8_t *c0, uint32_t cs,
                        uint64_t *size, struct error **errp)
{
    uint32_t header_length = 72, ext_start;

    s->version = be32_at(c0 + 4);
    s->refcount_order = 4;
    *size = be64_at(c0 + 24);
    if (be32_at(c0 + 32) != 0) {
        error_setg(errp, "Encrypted qcow2 images are not supported");
        return -1;
    }
    s->l1_size = be32_at(c0 + 36);
    s->l1_offset = be64_at(c0 + 40);
    s->rt_offset = be64_at(c0 + 48);
    s->rt_clusters = be32_at(c0 + 56);
    uint32_t nb_snapshots = be32_at(c0 + 60);
    if (s->version >= 3) {
        s->incompat = be64_at(c0 + 72);
        s->compat = be64_at(c0 + 80);
        s->autoclear = be64_at(c0 + 88);
        s->refcount_order = be32_at(c0 + 96);
        header_length = be32_at(c0 + 100);
        if (header_length < 104) {
            error_setg(errp, "qcow2 header too short");
            return -1;
        }
        if (header_length > cs) {
            error_setg(errp, "qcow2 header exceeds cluster size");
            return -1;
        }
    }
    ext_start = header_length;
    if (s->refcount_order > 6) {
        error_setg(errp, "Reference count entry width too large; may not exceed 64 bits");
        return -1;
    }
    uint64_t unsupported = s->incompat &
        ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_COMPRESSION);
    if (unsupported) {
        report_unsupported(c0, ext_start, cs, unsupported, errp);
        return -1;
    }
    if ((s->incompat & QCOW2_INCOMPAT_COMPRESSION) && header_length > 104 && c0[104] != 0) {
        error_setg(errp, "Unsupported qcow2 compression type %u: only zlib (0) is supported",
                   c0[104]);
        return -1;
    }
    if (qcow2_backing_header(s, c0, cs, ext_start, errp) < 0)  /* qcow2-backing.c */
        return -1;
    if (s->writable && (s->incompat & QCOW2_INCOMPAT_CORRUPT)) {
        error_setg(errp, "qcow2: Image is corrupt; cannot be opened read/write");
        return -1;
    }
    if ((s->incompat & QCOW2_INCOMPAT_DIRTY) && !s->writable) {
        /* Reads do not need the refcounts; a writable open repairs them (qcow2_repair()). */
        log_warn("qcow2 %s: the image is dirty; its refcounts need 'qemu-img check -r all'",
                 s->node->node_name);
    }
    if (s->writable && nb_snapshots) {
        error_setg(errp, "qcow2: images with internal snapshots are not supported read/write "
                   "yet");
        return -1;
    }
    return 0;
}

/* Check the geometry against the limits and the child; read L1 and the refcount table. */
static int load_tables(struct qcow2_state *s, uint64_t size, struct error **errp)
{
    uint64_t cs = s->cluster_size;
    uint64_t per_l1 = cs * (cs / 8);  /* guest bytes one L2 table maps */
    uint64_t l1_needed = size / per_l1 + (size % per_l1 != 0);

    if ((uint64_t)s->l1_size * 8 > MAX_L1_BYTES) {
        error_setg(errp, "Active L1 table too large");
        return -1;
    }
    if (s->l1_size < l1_needed) {
        error_setg(errp, "qcow2: L1 table is too small for the image size");
        return -1;
    }
    if ((s->l1_offset & (cs - 1)) || s->l1_offset > QCOW2_OFFSET_MASK) {
        error_setg(errp, "Invalid L1 table offset");
        return -1;
    }
    if ((uint64_t)s->rt_clusters * cs > MAX_RT_BYTES) {
        error_setg(errp, "Reference count table too large");
        return -1;
    }
    if ((s->rt_offset & (cs - 1)) || s->rt_offset > QCOW2_OFFSET_MASK) {
        error_setg(errp, "Invalid reference count table offset");
        return -1;
    }
    size_t l1_len = ((size_t)s->l1_size * 8 + s->meta_align - 1) & ~(size_t)(s->meta_align - 1);
    s->l1 = qcow2_alloc_buf(l1_len);
    if (l1_len && node_pread_sync(s->file, s->l1, l1_len, s->l1_offset, errp) < 0)
        return -1;
    s->rt_entries = (uint64_t)s->rt_clusters * cs / 8;
    s->rt = qcow2_alloc_buf((size_t)s->rt_clusters * cs);
    if (s->rt_clusters && node_pread_sync(s->file, s->rt, (size_t)s->rt_clusters * cs,
                                          s->rt_offset, errp) < 0)
        return -1;
    return 0;
}

static void resume_nop_done(struct uring_op *uop, int res);

static void state_free(struct qcow2_state *s)
{
    if (!s)
        return;
    qcow2_alloc_cleanup(s);
    qcow2_cache_free(s->l2_cache);
    qcow2_cache_free(s->rb_cache);
    free(s->header);
    free(s->meta_set);
    free(s->l1);
    free(s->rt);
    qcow2_backing_cleanup(s);
    free(s);
}

static int qcow2_open(struct block_node *n, json_t *opts, struct error **errp)
{
    struct block_node *child;
    struct qcow2_state *s;
    uint64_t l2_bytes = DEFAULT_L2_CACHE_BYTES, rb_bytes = DEFAULT_RB_CACHE_BYTES, size;
    uint8_t first[512];
    _cleanup_free_ uint8_t *c0 = NULL;
    json_t *backing = json_object_get(opts, "backing");
    bool backing_null = false;

    if (backing && json_is_string(backing) && !*json_string_value(backing)) {
        log_warn("Use of \"backing\": \"\" is deprecated; use \"backing\": null instead");
        backing = json_null();  /* as QEMU */
    }
    if (backing && !json_is_null(backing) && !json_is_string(backing) &&
        !json_is_object(backing)) {
        error_setg(errp, "Invalid parameter type for 'backing', expected: BlockdevRefOrNull");
        return -1;
    }
    backing_null = backing && json_is_null(backing);
    if (block_opt_take_uint64(opts, "l2-cache-size", &l2_bytes, errp) < 0 ||
        block_opt_take_uint64(opts, "refcount-cache-size", &rb_bytes, errp) < 0)
        return -1;
    json_t *lazy = json_object_get(opts, "lazy-refcounts");
    if (lazy && !json_is_boolean(lazy)) {
        error_setg(errp, "Invalid parameter type for 'lazy-refcounts', expected: boolean");
        return -1;
    }
    bool lazy_on = lazy && json_is_true(lazy);
    json_object_del(opts, "lazy-refcounts");
    child = block_node_open_child(n->graph, json_object_get(opts, "file"), "file", errp);
    if (!child)
        return -1;
    json_object_del(opts, "file");
    n->file = child;  /* from here, a failed open drops it with the node */

    if (node_pread_sync(child, first, sizeof(first), 0, errp) < 0)
        return -1;
    if (be32_at(first) != QCOW2_MAGIC) {
        error_setg(errp, "Image is not in qcow2 format");
        return -1;
    }
    uint32_t version = be32_at(first + 4), cluster_bits = be32_at(first + 20);
    if (version < 2 || version > 3) {
        error_setg(errp, "Unsupported qcow2 version %" PRIu32, version);
        return -1;
    }
    if (cluster_bits < 9 || cluster_bits > 21) {
        error_setg(errp, "Unsupported cluster size: 2^%" PRIu32, cluster_bits);
        return -1;
    }
    s = xzalloc(sizeof(*s));
    s->node = n;
    s->file = child;
    s->backing_null = backing_null;
    if (backing && !backing_null)
        s->backing_opt = json_incref(backing);  /* opened by qcow2_backing_open() */
    json_object_del(opts, "backing");
    s->cluster_bits = cluster_bits;
    s->cluster_size = 1u << cluster_bits;
    s->meta_align = MAX(512u, child->alignment);
    s->writable = !(n->read_only || child->read_only);
    s->queue_tail = &s->queue_head;
    s->wait_tail = &s->wait_head;
    s->resume_uop.done = resume_nop_done;
    if (s->meta_align > s->cluster_size) {
        error_setg(errp, "qcow2: the cluster size (%" PRIu32 ") is smaller than the storage's "
                   "block size (%" PRIu32 ")", s->cluster_size, s->meta_align);
        goto fail;
    }
    c0 = qcow2_alloc_buf(s->cluster_size);
    if (node_pread_sync(child, c0, s->cluster_size, 0, errp) < 0 ||
        parse_header(s, c0, s->cluster_size, &size, errp) < 0)
        goto fail;
    if (lazy_on && s->version < 3) {
        error_setg(errp, "Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                   "compatibility level");
        goto fail;
    }
    s->rb_bits = s->cluster_bits + 3 - s->refcount_order;
    s->header = qcow2_alloc_buf(s->meta_align);
    memcpy(s->header, c0, s->meta_align);
    if (load_tables(s, size, errp) < 0)
        goto fail;
    if (s->writable) {
        if (s->autoclear) {
            /* The spec: a writer that does not know an autoclear feature clears it (we know
             * none, e.g. bitmaps that our writes would leave stale). Before a repair: the
             * clusters of such a feature are then no longer in use. */
            static const uint8_t zero8[8];
            if (node_pwrite_sync(child, zero8, 8, 88, errp) < 0)
                goto fail;
            memset((uint8_t *)s->header + 88, 0, 8);
            s->autoclear = 0;
        }
        if ((s->incompat & QCOW2_INCOMPAT_DIRTY) && qcow2_repair(s, errp) < 0)
            goto fail;
        if (qcow2_refcount_scan(s, errp) < 0)
            goto fail;
    }
    s->l2_cache = qcow2_cache_new(child, s->cluster_size,
                                  (unsigned)MIN(MAX(l2_bytes / s->cluster_size, 4),
                                                MAX(s->l1_size, 4)));
    s->rb_cache = qcow2_cache_new(child, s->cluster_size,
                                  (unsigned)MIN(MAX(rb_bytes / s->cluster_size, 4), 4096));
    s->hwm = (child->size + s->cluster_size - 1) & ~(uint64_t)(s->cluster_size - 1);
    if (s->writable) {
        for (uint32_t i = 0; i < s->l1_size; i++)
            qcow2_meta_add(s, (be64toh(s->l1[i]) & QCOW2_OFFSET_MASK) >> s->cluster_bits);
        for (uint64_t b = 0; b < s->rt_entries; b++)
            qcow2_meta_add(s, qcow2_rt_block(s, b) >> s->cluster_bits);
    }
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

/* ---- lookups --------------------------------------------------------------------------- */

enum qcow2_ctype qcow2_classify(const struct qcow2_state *s, uint64_t l2e)
{
    uint64_t host = l2e & QCOW2_OFFSET_MASK;

    if (l2e & QCOW2_OFLAG_COMPRESSED)
        return QCOW2_COMPRESSED;
    if ((l2e & QCOW2_L2_RESERVED) || (host & (s->cluster_size - 1)))
        return QCOW2_BAD;
    if (l2e & QCOW2_OFLAG_ZERO) {
        if (s->version < 3)
            return QCOW2_BAD;  /* reserved in version 2 */
        return host ? QCOW2_ZERO_ALLOC : QCOW2_ZERO_PLAIN;
    }
    return host ? QCOW2_NORMAL : QCOW2_UNALLOCATED;
}

int qcow2_lookup(struct qcow2_state *s, uint64_t voff, struct qcow2_waiter *w, uint64_t *l2e)
{
    uint32_t l2_bits = s->cluster_bits - 3;
    uint64_t l1_idx = voff >> (s->cluster_bits + l2_bits);
    uint64_t l2_idx = (voff >> s->cluster_bits) & ((1ULL << l2_bits) - 1);
    uint64_t l1e, l2_off;
    const uint64_t *table;

    *l2e = 0;
    if (l1_idx >= s->l1_size)
        return -EIO;  /* open checked that L1 covers the size */
    l1e = be64toh(s->l1[l1_idx]);
    l2_off = l1e & QCOW2_OFFSET_MASK;
    if ((l1e & QCOW2_L1_RESERVED) || (l2_off & (s->cluster_size - 1))) {
        log_error("qcow2 %s: corrupt L1 entry %" PRIu64 ": 0x%" PRIx64, s->node->node_name,
                  l1_idx, l1e);
        return -EIO;
    }
    if (!l2_off)
        return 0;
    table = qcow2_cache_get(s->l2_cache, l2_off, w);
    if (!table)
        return 1;
    *l2e = be64toh(table[l2_idx]);
    return 0;
}

/* ---- requests -------------------------------------------------------------------------- */

static void req_finish(struct qcow2_req *r);

static void flush_done(struct block_req *child, int ret)
{
    struct qcow2_req *r = container_of(child, struct qcow2_req, child);

    if (ret < 0 && !r->err)
        r->err = ret;
    r->fua = false;
    req_finish(r);
}

static void req_finish(struct qcow2_req *r)
{
    struct block_req *parent = r->parent;
    int err = r->err;

    if (!err && r->fua) {
        r->child = (struct block_req){.op = BLOCK_OP_FLUSH, .done = flush_done};
        node_submit(r->s->file, &r->child);
        return;
    }
    free(r);
    parent->done(parent, err);
}

static void req_nop_done(struct uring_op *uop, int res)
{
    req_finish(container_of(uop, struct qcow2_req, uop));
}

static void part_run(struct qcow2_part *p);

/* Start waiting parts while there is room. Called only from completions, never inside
 * node_submit(), so that a part finishing at once cannot complete another request there. */
static void resume_parts(struct qcow2_state *s)
{
    while (s->wait_head && s->active < QCOW2_MAX_ACTIVE) {
        struct qcow2_part *p = s->wait_head;
        s->wait_head = p->next;
        if (!s->wait_head)
            s->wait_tail = &s->wait_head;
        s->active++;
        part_run(p);
    }
}

static void resume_nop_done(struct uring_op *uop, int res)
{
    struct qcow2_state *s = container_of(uop, struct qcow2_state, resume_uop);

    s->resume_scheduled = false;
    resume_parts(s);
}

static void part_start(struct qcow2_state *s, struct qcow2_part *p)
{
    p->next = NULL;
    *s->wait_tail = p;
    s->wait_tail = &p->next;
    if (!s->resume_scheduled) {
        s->resume_scheduled = true;
        uring_nop(s->node->graph->uring, &s->resume_uop);
    }
}

void qcow2_part_done(struct qcow2_part *p, int ret)
{
    struct qcow2_req *r = p->r;
    struct qcow2_state *s = r->s;

    if (p->inplace) {
        s->inplace--;
        qcow2_alloc_inplace_done(s);
    }
    free(p->zbuf);
    free(p);
    s->active--;
    if (s->wait_head && !s->resume_scheduled) {
        s->resume_scheduled = true;
        uring_nop(s->node->graph->uring, &s->resume_uop);
    }
    if (ret < 0 && !r->err)
        r->err = ret;
    if (--r->pending == 0)
        req_finish(r);
}

static void part_child_done(struct block_req *child, int ret)
{
    struct qcow2_part *p = container_of(child, struct qcow2_part, child);

    if (ret < 0 && child->op != BLOCK_OP_READ)
        log_warn("qcow2 %s: write in place at %" PRIu64 " failed: %s", p->r->s->node->node_name,
                 child->offset, strerror(-ret));
    qcow2_part_done(p, ret);
}

static void part_submit_child(struct qcow2_part *p, enum block_op op, uint64_t host)
{
    struct qcow2_state *s = p->r->s;

    p->child = (struct block_req){.op = op, .offset = host + (p->voff & (s->cluster_size - 1)),
                                  .len = p->len, .buf = p->buf, .done = part_child_done};
    node_submit(s->file, &p->child);
}

void qcow2_part_write_host(struct qcow2_part *p, uint64_t host)
{
    struct qcow2_state *s = p->r->s;
    enum block_op op = p->r->parent->op == BLOCK_OP_WRITE_ZEROES ? BLOCK_OP_WRITE_ZEROES
                                                                 : BLOCK_OP_WRITE;
    int ret = qcow2_pre_write(s, host + (p->voff & (s->cluster_size - 1)), p->len, false);

    if (ret < 0) {
        qcow2_part_done(p, ret);
        return;
    }
    p->inplace = true;
    s->inplace++;
    part_submit_child(p, op, host);
}

void qcow2_compressed_span(const struct qcow2_state *s, uint64_t l2e, uint64_t *first,
                           uint64_t *n)
{
    uint32_t x = 62 - (s->cluster_bits - 8);
    uint64_t off = (l2e & ((1ULL << x) - 1)) & ~511ULL;
    uint64_t sectors = ((l2e & ~QCOW2_OFLAG_COMPRESSED & ~QCOW2_OFLAG_COPIED) >> x) + 1;
    uint64_t end = off + sectors * 512;

    *first = off >> s->cluster_bits;
    *n = ((end + s->cluster_size - 1) >> s->cluster_bits) - *first;
}

/* Compressed clusters (the spec's compressed cluster descriptor): with x = 62 - (cluster_bits
 * - 8), bits 0..x-1 are the host byte offset of the data, bits x..61 the number of 512-byte
 * sectors it takes beyond the one holding the offset. The data is a raw deflate stream
 * (no zlib header) of the whole cluster. The sectors are read (widened to the child's
 * alignment; past the end of the file reads as zeroes) and inflated. */
static void zread_done(struct block_req *req, int ret)
{
    struct qcow2_zread *zr = container_of(req, struct qcow2_zread, req);
    struct qcow2_state *s = zr->s;

#ifdef THINBLK_HAVE_ZLIB
    z_stream z = {0};
    int r;

    if (ret == 0 && inflateInit2(&z, -12) != Z_OK)
        ret = -ENOMEM;
    if (ret == 0) {
        z.next_in = (Bytef *)zr->zbuf + zr->zskip;
        z.avail_in = zr->zlen;
        z.next_out = zr->out;
        z.avail_out = s->cluster_size;
        r = inflate(&z, Z_FINISH);
        /* As QEMU: the stream may end early only if the cluster is full (trailing bytes of
         * the last sector are padding). */
        if (!((r == Z_STREAM_END || r == Z_BUF_ERROR) && z.avail_out == 0))
            ret = -EIO;
        inflateEnd(&z);
        if (ret < 0)
            log_error("qcow2 %s: cannot decompress a compressed cluster", s->node->node_name);
    }
#else
    (void)s;
    if (ret == 0)
        ret = -ENOTSUP;
#endif
    free(zr->zbuf);
    zr->zbuf = NULL;
    zr->done(zr, ret);
}

void qcow2_zread_start(struct qcow2_state *s, struct qcow2_zread *z, uint64_t l2e)
{
    uint32_t x = 62 - (s->cluster_bits - 8);
    uint64_t off = l2e & ((1ULL << x) - 1);
    uint64_t sectors = ((l2e & ~QCOW2_OFLAG_COMPRESSED & ~QCOW2_OFLAG_COPIED) >> x) + 1;
    uint64_t len = sectors * 512 - (off & 511);
    uint64_t a = s->meta_align;
    uint64_t start = off & ~(a - 1), end = (off + len + a - 1) & ~(a - 1);

    /* sectors <= 2^(cluster_bits - 8): the data takes at most about 2 clusters. */
    z->s = s;
    z->zbuf = qcow2_alloc_buf(end - start);
    z->zskip = (uint32_t)(off - start);
    z->zlen = (uint32_t)len;
    z->req = (struct block_req){.op = BLOCK_OP_READ, .offset = start, .len = end - start,
                                .buf = z->zbuf, .done = zread_done};
    node_submit(s->file, &z->req);
}

static void part_zread_done(struct qcow2_zread *z, int ret)
{
    struct qcow2_part *p = z->opaque;
    struct qcow2_state *s = p->r->s;

    if (ret == 0)
        memcpy(p->buf, (char *)z->out + (p->voff & (s->cluster_size - 1)), p->len);
    else
        log_error("qcow2 %s: cannot decompress the cluster for offset %" PRIu64,
                  s->node->node_name, p->voff);
    free(z->out);
    free(z);
    qcow2_part_done(p, ret);
}

static size_t meta_slot(const struct qcow2_state *s, uint64_t cl)
{
    size_t i = (size_t)(cl * 0x9e3779b97f4a7c15ULL >> 17) & (s->meta_cap - 1);

    while (s->meta_set[i] && s->meta_set[i] != cl)
        i = (i + 1) & (s->meta_cap - 1);
    return i;
}

void qcow2_meta_add(struct qcow2_state *s, uint64_t cl)
{
    if (cl == 0)
        return;
    if (2 * (s->meta_n + 1) > s->meta_cap) {
        uint64_t *old = s->meta_set;
        size_t old_cap = s->meta_cap;
        s->meta_cap = s->meta_cap ? 2 * s->meta_cap : 256;
        s->meta_set = xzalloc(s->meta_cap * sizeof(*s->meta_set));
        for (size_t i = 0; i < old_cap; i++) {
            if (old[i])
                s->meta_set[meta_slot(s, old[i])] = old[i];
        }
        free(old);
    }
    size_t i = meta_slot(s, cl);
    if (!s->meta_set[i]) {
        s->meta_set[i] = cl;
        s->meta_n++;
    }
}

/* What metadata in use cluster cl holds (QEMU's names), or NULL: QEMU's overlap-check
 * "cached" (inactive L1/L2 tables and snapshots do not exist here). */
static const char *meta_overlap(const struct qcow2_state *s, uint64_t cl)
{
    uint64_t cs = s->cluster_size;

    if (cl == 0)
        return "qcow2_header";
    if (cl >= s->l1_offset / cs && cl * cs < s->l1_offset + (uint64_t)s->l1_size * 8)
        return "active L1 table";
    if (cl >= s->rt_offset / cs && cl < s->rt_offset / cs + s->rt_clusters)
        return "refcount table";
    if (s->meta_cap && s->meta_set[meta_slot(s, cl)] == cl) {
        for (uint64_t b = 0; b < s->rt_entries; b++) {
            if (qcow2_rt_block(s, b) == cl * cs)
                return "refcount block";
        }
        return "active L2 table";
    }
    return NULL;
}

static void corrupt_header_done(struct block_req *req, int ret)
{
    free(req->buf);
    free(req);
}

/* As QEMU's qcow2_signal_corruption(): mark the image corrupt (the header bit, v3), emit
 * BLOCK_IMAGE_CORRUPTED once, refuse writes from now on. */
static void mark_corrupt(struct qcow2_state *s, uint64_t off, uint64_t len, const char *what)
{
    char msg[160];
    struct block_graph *g = s->node->graph;

    if (s->corrupt)
        return;
    s->corrupt = true;
    snprintf(msg, sizeof(msg), "Preventing invalid write on metadata (overlaps with %s)",
             what);
    log_error("qcow2: Marking image as corrupt: %s; further corruption events will be "
              "suppressed", msg);
    if (g->emit)
        g->emit(g->emit_opaque, "BLOCK_IMAGE_CORRUPTED",
                json_pack("{s:s, s:s, s:s, s:I, s:I, s:b}", "device", "",
                          "node-name", s->node->node_name, "msg", msg,
                          "offset", (json_int_t)off, "size", (json_int_t)len, "fatal", 1));
    if (s->version >= 3) {
        uint8_t *h = qcow2_alloc_buf(s->meta_align);
        ((uint8_t *)s->header)[79] |= QCOW2_INCOMPAT_CORRUPT;  /* incompatible: 72..79 */
        memcpy(h, s->header, s->meta_align);
        struct block_req *req = xzalloc(sizeof(*req));
        *req = (struct block_req){.op = BLOCK_OP_WRITE, .offset = 0, .len = s->meta_align,
                                  .buf = h, .done = corrupt_header_done};
        node_submit(s->file, req);
    }
}

int qcow2_pre_write(struct qcow2_state *s, uint64_t off, uint64_t len, bool meta)
{
    uint64_t end = (off + len + s->cluster_size - 1) & ~(uint64_t)(s->cluster_size - 1);

    if (s->corrupt)
        return -EIO;
    if (!meta) {
        for (uint64_t cl = off >> s->cluster_bits; cl < end >> s->cluster_bits; cl++) {
            const char *what = meta_overlap(s, cl);
            if (what) {
                mark_corrupt(s, off, len, what);
                return -EIO;
            }
        }
    }
    s->hwm = MAX(s->hwm, end);
    return 0;
}

static void part_run(struct qcow2_part *p)
{
    struct qcow2_state *s = p->r->s;
    enum block_op op = p->r->parent->op;
    uint64_t l2e, host;
    int ret;

    if (p->r->err) {
        /* Another part of the request failed: the request fails (and is retried whole, if
         * the error policy parks it), so skip the rest and let it fail now. */
        qcow2_part_done(p, 0);
        return;
    }
    ret = qcow2_lookup(s, p->voff, &p->w, &l2e);
    if (ret == 1)
        return;  /* p->w resumes us */
    if (ret < 0) {
        qcow2_part_done(p, ret);
        return;
    }
    enum qcow2_ctype t = qcow2_classify(s, l2e);
    if (op == BLOCK_OP_READ) {
        switch (t) {
        case QCOW2_COMPRESSED: {
            struct qcow2_zread *z = xzalloc(sizeof(*z));
            z->out = xmalloc(s->cluster_size);
            z->done = part_zread_done;
            z->opaque = p;
            qcow2_zread_start(s, z, l2e);
            return;
        }
        case QCOW2_BAD:
            log_error("qcow2 %s: corrupt L2 entry 0x%" PRIx64 " for offset %" PRIu64
                      "; the image needs 'qemu-img check -r all'", s->node->node_name, l2e,
                      p->voff);
            qcow2_part_done(p, -EIO);
            return;
        case QCOW2_NORMAL:
            part_submit_child(p, op, l2e & QCOW2_OFFSET_MASK);
            return;
        case QCOW2_UNALLOCATED:
            if (s->node->backing) {
                qcow2_backing_read(s, p);  /* qcow2-backing.c */
                return;
            }
            /* fall through */
        default:  /* reads as zeroes */
            memset(p->buf, 0, p->len);
            qcow2_part_done(p, 0);
            return;
        }
    }
    if (s->corrupt) {
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

static void part_wait_done(struct qcow2_waiter *w, int ret)
{
    struct qcow2_part *p = container_of(w, struct qcow2_part, w);

    if (ret < 0)
        qcow2_part_done(p, ret);
    else
        part_run(p);
}

static void qcow2_submit(struct block_node *n, struct block_req *req)
{
    struct qcow2_state *s = n->opaque;
    struct qcow2_req *r = xzalloc(sizeof(*r));
    uint64_t cs = s->cluster_size, end = req->offset + req->len;

    r->s = s;
    r->parent = req;
    r->uop.done = req_nop_done;
    if (req->op == BLOCK_OP_FLUSH) {
        r->fua = true;  /* the flush after no writes is the whole request */
        req_finish(r);
        return;
    }
    /* DISCARD frees clusters only with discard=unmap (as QEMU's pass-discard-request). */
    r->pending = 1;  /* held while submitting: nothing completes inside node_submit() */
    if (req->op != BLOCK_OP_DISCARD || n->discard_unmap) {
        r->fua = (req->flags & BLOCK_REQ_FUA) != 0;
        for (uint64_t off = req->offset; off < end;) {
            uint64_t len = MIN(end - off, cs - (off & (cs - 1)));
            struct qcow2_part *p = xzalloc(sizeof(*p));
            p->r = r;
            p->voff = off;
            p->len = (uint32_t)len;
            p->buf = req->buf ? (char *)req->buf + (off - req->offset) : NULL;
            p->w.cb = part_wait_done;
            r->pending++;
            part_start(s, p);
            off += len;
        }
    }
    if (--r->pending == 0) {
        uring_nop(n->graph->uring, &r->uop);
    }
}

const struct block_driver block_driver_qcow2 = {
    .name = "qcow2",
    .open = qcow2_open,
    .close = qcow2_close,
    .submit = qcow2_submit,
    .open_backing = qcow2_backing_open,
    .backing_overridden = qcow2_backing_overridden,
    .query_image = qcow2_query_image,
};
