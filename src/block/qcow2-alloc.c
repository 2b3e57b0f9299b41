/* qcow2 metadata changes: cluster allocation, copy-on-write, discard and write-zeroes.
 *
 * The only code that changes the image's metadata. Parts that need a change wait in a FIFO
 * queue; the allocator takes every queued part into one batch (at most BATCH_MAX, one part
 * per guest cluster, the first to arrive: a second part for the same cluster waits for the
 * next batch and then finds the cluster allocated, so overlapping writes land in order) and
 * runs the batch in phases, each waiting for the one before, so that a process killed or a
 * power failure at any point leaves at worst leaked clusters, never an entry pointing at a
 * cluster with refcount 0 or at unwritten data:
 *
 *   prepare  L2 lookups; host clusters reserved: spares (refcount 1 already), then free
 *            clusters, then the run reserved ahead (refcount 1, flushed), then a contiguous
 *            run at next_free, and with it up to AHEAD_BYTES more for the next batches (the
 *            same refcount writes count them), after growing the refcount
 *            structures if the run has no refcount block (struct cover: new blocks and table
 *            written, increments, flush, link, flush, old table freed);
 *   A        in parallel: the refcount increments (one write per run of dirty refcount block
 *            chunks), the data clusters (guest bytes plus qcow2_cow_fill(); runs of clusters
 *            contiguous in host merged into one write: in place when contiguous in guest and
 *            buffer too, else whole clusters copied into a bounce buffer), new L2 tables
 *            whole (with their entries);
 *   flush    one child flush, if A wrote refcounts or L2 tables or the batch uses spares
 *            (skipped with cache.no-flush): data need only be written before its entry,
 *            so a batch served from the run reserved ahead needs no flush at all;
 *   B        in parallel: the L2 entries (one write per run of dirty L2 chunks) and the L1
 *            entries of new L2 tables: the changes become reachable here. The chunks are
 *            copied from memory at B, not before (see pipelining);
 *   flush    only if clusters are to be freed (C must never reach the disk before B);
 *   C        refcount decrements of the clusters B unlinked (discard, write-zeroes with
 *            unmap, compressed clusters rewritten), then discards of the freed clusters down
 *            to the file.
 *
 * Pipelining: two batches at most, s->batch and s->batch2. Once s->batch has submitted B
 * and nothing after B writes refcounts (no new L2 tables, nothing to free: b->pipe), or
 * already once it has submitted A if A writes data only and no flush follows (b->early), the
 * next batch (s->batch2) may run its prepare, A and flush meanwhile (each its own bounce
 * buffer); it takes no part of a guest
 * cluster s->batch has, and needs refcount structure growth or B only once it is s->batch
 * (b->gated until batch_end() of the one before hands over). So only one batch ever writes
 * L2 or L1 chunks or refcount blocks at a time, and as B copies its chunks from memory after
 * the batch before finished, the entries of both batches in one chunk are merged. Clusters
 * reserved ahead are handed over at the start of B (their refcounts are durable then).
 *
 * Memory follows the disk (qcow2.h): a chunk is copied from the table in memory when the
 * batch first touches it, patched there, and copied back once its write succeeded.
 * Failures: a part whose link (its L2 chunk, or the L1 chunk of its new table) was not
 * written fails, and is retryable: clusters reserved for it whose refcount reached the disk
 * go to the spare list, the others to the free list (their refcount is still 0), so a retry
 * uses the same clusters and nothing leaks. A failed decrement leaks its clusters.
 *
 * Clusters reserved ahead and spares have refcount 1 and nothing linking them: a crash
 * leaks them (at most AHEAD_MAX clusters ahead), a close gives them back (qcow2_alloc_close).
 *
 * Dirty bit and lazy refcounts: refcounts are written before anything links a cluster, so
 * the image is never dirty and this driver never sets the dirty bit.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2.h"
#include "block/sync-io.h"
#include "common/log.h"
#include "common/util.h"

#define BATCH_MAX 512
#define MERGE_MAX (4u << 20)  /* bytes: larger runs are written in several requests */
#define AHEAD_BYTES (8u << 20) /* reserved ahead when a batch takes clusters at next_free */
#define BOUNCE_KEEP (8u << 20) /* bytes: a larger bounce buffer is freed after its batch */
#define AHEAD_MAX 512          /* clusters: the most reserved ahead at once */

enum { K_L1, K_L2, K_RB };

/* A meta_align piece of a table (L1, an L2 table, a refcount block) as it will be on disk. */
struct qcow2_chunk {
    uint64_t disk;       /* where it goes */
    uint64_t table;      /* L2, RB: the table's offset (the cache key) */
    uint32_t pos, len;   /* in the table */
    uint8_t kind;
    int ret;             /* 1 until written, then the write's result */
    char *buf;
};

struct chunkset {
    struct qcow2_chunk **v;
    size_t n, cap;
    struct qcow2_chunk **h;  /* open addressing on disk offset */
    size_t hcap;
};

/* A metadata write: a run of chunks contiguous on disk. */
struct mwrite {
    struct block_req req;
    struct qcow2_state *s;
    struct qcow2_batch *b;
    struct qcow2_chunk **c;
    size_t n;
    char *merged;
};

/* A host cluster reserved by the batch. */
struct resv {
    uint64_t cluster;
    bool inc;                /* needs an increment (not a spare, whose refcount is 1) */
    struct qcow2_chunk *rb;  /* the increment's chunk */
    bool linked;
    bool ahead;              /* reserved ahead for later batches, no part of this one */
    bool handed;             /* ahead: handed on to s->ahead_next..ahead_end */
};

struct newl2 {
    uint64_t l1_idx;
    uint64_t host;
    int32_t ri;
    uint64_t *table;
    struct qcow2_chunk *l1;
};

enum {
    B_LOOKUP, B_ASSIGN, B_INCS, B_BUILD, B_A, B_FLUSH1, B_GATE, B_LINKS, B_B, B_FLUSH2, B_DECS, B_C,
    B_DISCARD, B_END,
};

struct qcow2_batch {
    struct qcow2_state *s;
    struct qcow2_part **p;
    size_t n;
    size_t i;                /* progress of the step that may wait for a table */
    int step;
    unsigned pending;        /* I/O in flight */
    int err;                 /* the first failure of the phase */
    struct qcow2_waiter w;
    struct chunkset links;   /* L1 and L2 chunks: B */
    struct chunkset incs;    /* refcount increments: A */
    struct chunkset decs;    /* refcount decrements: C */
    struct newl2 *nl2;
    size_t nnl2;
    struct resv *resv;
    size_t nresv;
    struct qcow2_u64v dec;   /* clusters to decrement, repeated as many times */
    struct qcow2_u64v freed; /* clusters whose refcount reached 0 in C */
    struct block_req flush;
    struct block_req *discards;
    struct qcow2_cover *cover;
    bool wrote;              /* A wrote refcounts or L2 tables, or uses spares: flush before B */
    bool durable;            /* A's refcounts are on disk (flushed): ahead clusters usable */
    char *bounce;            /* merged data writes of parts from different buffers */
    int slot;                /* which of s->bounce: the other batch's is the other one */
    bool gated;              /* waits to become s->batch (B_GATE, or growth in B_ASSIGN) */
    bool early;              /* A writes data only, nothing after it but B: the next batch may
                              * run its prepare and A from now on (no refcount write) */
    bool pipe;               /* from B on, the next batch may run its prepare and A */
};

/* Refcount structure growth, one write at a time (rare: once per refcount block's worth). */
enum { C_WRITE, C_INCS, C_FLUSH1, C_LINK, C_FLUSH2, C_FREE, C_END };

struct qcow2_cover {
    int step;
    struct block_req req;
    void *iobuf;
    int patch_kind;          /* K_L1 unused; K_RB; or -1 header, -2 refcount table */
    uint64_t patch_table;
    uint32_t patch_pos, patch_len;
    uint64_t c, k, m;        /* new blocks (and a new table) at clusters [c, c+k+m) */
    uint64_t *new_blocks;    /* their block indices, m of them */
    void *cover_buf;         /* (k+m) clusters: table then blocks */
    uint64_t old_rt_offset, old_rt_clusters;
    struct qcow2_u64v ops;   /* increments (C_INCS) or decrements (C_FREE) */
    size_t iop, link_i;
    bool committed;          /* something reached the disk: skip the clusters on failure */
};

static void batch_run(struct qcow2_batch *b);
static void kick(struct qcow2_state *s);
static void cover_run(struct qcow2_state *s);
static void cover_end(struct qcow2_state *s, int ret);

/* ---- small helpers ----------------------------------------------------------------------- */

static void vpush(struct qcow2_u64v *v, uint64_t x)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? 2 * v->cap : 16;
        v->v = xrealloc(v->v, v->cap * sizeof(*v->v));
    }
    v->v[v->n++] = x;
}

static uint64_t l1_len(const struct qcow2_state *s)
{
    return ((uint64_t)s->l1_size * 8 + s->meta_align - 1) & ~(uint64_t)(s->meta_align - 1);
}

static bool flush_needed(const struct qcow2_state *s)
{
    return !s->file->no_flush;
}

static struct qcow2_chunk *chunk_find(struct chunkset *cs, uint64_t disk)
{
    if (!cs->hcap)
        return NULL;
    for (size_t i = (size_t)((disk >> 9) * 0x9e3779b97f4a7c15ULL) & (cs->hcap - 1);;
         i = (i + 1) & (cs->hcap - 1)) {
        if (!cs->h[i] || cs->h[i]->disk == disk)
            return cs->h[i];
    }
}

static void chunk_hash_add(struct chunkset *cs, struct qcow2_chunk *c)
{
    size_t i = (size_t)((c->disk >> 9) * 0x9e3779b97f4a7c15ULL) & (cs->hcap - 1);

    while (cs->h[i])
        i = (i + 1) & (cs->hcap - 1);
    cs->h[i] = c;
}

/* The chunk of the table image (image_len bytes in memory, at disk offset base) holding byte
 * off: the batch's copy, made now if this is the first touch. */
static struct qcow2_chunk *chunk_touch(struct qcow2_state *s, struct chunkset *cs, int kind,
                                       uint64_t table, const void *image, uint64_t image_len,
                                       uint64_t base, uint64_t off)
{
    uint32_t g = s->meta_align;
    uint64_t pos = off & ~(uint64_t)(g - 1);
    struct qcow2_chunk *c = chunk_find(cs, base + pos);

    if (c)
        return c;
    if (2 * (cs->n + 1) > cs->hcap) {
        free(cs->h);
        cs->hcap = cs->hcap ? 2 * cs->hcap : 64;
        cs->h = xzalloc(cs->hcap * sizeof(*cs->h));
        for (size_t i = 0; i < cs->n; i++)
            chunk_hash_add(cs, cs->v[i]);
    }
    if (cs->n == cs->cap) {
        cs->cap = cs->cap ? 2 * cs->cap : 16;
        cs->v = xrealloc(cs->v, cs->cap * sizeof(*cs->v));
    }
    c = xzalloc(sizeof(*c));
    c->disk = base + pos;
    c->table = table;
    c->pos = (uint32_t)pos;
    c->len = (uint32_t)MIN((uint64_t)g, image_len - pos);
    c->kind = (uint8_t)kind;
    c->ret = 1;
    c->buf = qcow2_alloc_buf(g);
    memcpy(c->buf, (const char *)image + pos, c->len);
    cs->v[cs->n++] = c;
    chunk_hash_add(cs, c);
    return c;
}

static void chunkset_free(struct chunkset *cs)
{
    for (size_t i = 0; i < cs->n; i++) {
        free(cs->v[i]->buf);
        free(cs->v[i]);
    }
    free(cs->v);
    free(cs->h);
    *cs = (struct chunkset){0};
}

static void chunk_commit(struct qcow2_state *s, struct qcow2_chunk *c)
{
    switch (c->kind) {
    case K_L1:
        memcpy((char *)s->l1 + c->pos, c->buf, c->len);
        break;
    case K_L2:
        qcow2_cache_patch(s->l2_cache, c->table, c->pos, c->buf, c->len);
        break;
    case K_RB:
        qcow2_cache_patch(s->rb_cache, c->table, c->pos, c->buf, c->len);
        break;
    }
}

static void batch_io_done(struct qcow2_batch *b, int ret)
{
    if (ret < 0 && !b->err)
        b->err = ret;
    if (--b->pending == 0)
        batch_run(b);
}

static void mwrite_done(struct block_req *req, int ret)
{
    struct mwrite *w = container_of(req, struct mwrite, req);
    struct qcow2_state *s = w->s;
    struct qcow2_batch *b = w->b;

    for (size_t i = 0; i < w->n; i++) {
        w->c[i]->ret = ret;
        if (ret == 0)
            chunk_commit(s, w->c[i]);
    }
    if (ret < 0) {
        static const char *const names[] = {[K_L1] = "L1 table", [K_L2] = "L2 table",
                                            [K_RB] = "refcount block"};
        log_warn("qcow2 %s: %s write at %" PRIu64 " failed: %s", s->node->node_name,
                 names[w->c[0]->kind], req->offset, strerror(-ret));
    }
    free(w->merged);
    free(w->c);
    free(w);
    batch_io_done(b, ret);
}

static int chunk_cmp(const void *a, const void *b)
{
    const struct qcow2_chunk *x = *(struct qcow2_chunk *const *)a;
    const struct qcow2_chunk *y = *(struct qcow2_chunk *const *)b;

    return x->disk < y->disk ? -1 : x->disk > y->disk;
}

/* Write every chunk of cs, runs contiguous on disk merged; b->pending counts the writes. */
static void chunks_write(struct qcow2_state *s, struct qcow2_batch *b, struct chunkset *cs)
{
    if (!cs->n)
        return;
    qsort(cs->v, cs->n, sizeof(*cs->v), chunk_cmp);
    for (size_t i = 0; i < cs->n;) {
        size_t j = i + 1;
        uint64_t len = cs->v[i]->len;
        while (j < cs->n && cs->v[j - 1]->disk + cs->v[j - 1]->len == cs->v[j]->disk &&
               cs->v[j - 1]->len == s->meta_align && len + cs->v[j]->len <= MERGE_MAX)
            len += cs->v[j++]->len;
        struct mwrite *w = xzalloc(sizeof(*w));
        w->s = s;
        w->b = b;
        w->n = j - i;
        w->c = xmalloc(w->n * sizeof(*w->c));
        memcpy(w->c, cs->v + i, w->n * sizeof(*w->c));
        void *buf = cs->v[i]->buf;
        if (w->n > 1) {
            w->merged = qcow2_alloc_buf(len);
            for (size_t k = 0, at = 0; k < w->n; at += w->c[k]->len, k++)
                memcpy(w->merged + at, w->c[k]->buf, w->c[k]->len);
            buf = w->merged;
        }
        w->req = (struct block_req){.op = BLOCK_OP_WRITE, .offset = cs->v[i]->disk,
                                    .len = len, .buf = buf, .done = mwrite_done};
        b->pending++;
        qcow2_pre_write(s, w->req.offset, len, true);
        node_submit(s->file, &w->req);
        i = j;
    }
}

/* Touch the refcount entry of cluster cl in cs and add delta to it there. Returns the chunk,
 * NULL if the block is loading (b->w waits), or an error in *err. */
static struct qcow2_chunk *refcount_touch(struct qcow2_state *s, struct qcow2_batch *b,
                                          struct chunkset *cs, uint64_t cl, int delta,
                                          int *err)
{    uint64_t block = qcow2_rt_block(s, cl >> s->rb_bits);
    uint64_t idx = cl & ((1ULL << s->rb_bits) - 1);
    uint32_t o = s->refcount_order;

    *err = 0;
    if (!block) {
        log_error("qcow2 %s: no refcount block for cluster %" PRIu64, s->node->node_name, cl);
        *err = -EIO;
        return NULL;
    }
    uint64_t byte = (idx << o) >> 3;
    struct qcow2_chunk *c = chunk_find(cs, block + (byte & ~(uint64_t)(s->meta_align - 1)));
    if (!c) {
        const void *table = qcow2_cache_get(s->rb_cache, block, &b->w);
        if (!table)
            return NULL;
        c = chunk_touch(s, cs, K_RB, block, table, s->cluster_size, block, byte);
    }
    uint64_t ci = idx - (c->pos * 8ULL >> o);
    uint64_t old = qcow2_refcount_get(s, c->buf, ci);
    if ((delta > 0 && old == qcow2_refcount_max(s)) || (delta < 0 && old == 0)) {
        log_error("qcow2 %s: refcount of cluster %" PRIu64 " is %" PRIu64 ": cannot change "
                  "it by %d", s->node->node_name, cl, old, delta);
        *err = -EIO;
        return NULL;
    }
    qcow2_refcount_set(s, c->buf, ci, delta > 0 ? old + 1 : old - 1);
    return c;
}

/* ---- planning ------------------------------------------------------------------------- */

/* The entry a discarded cluster gets: unallocated, or with a backing file on v3 the zero flag,
 * so that the backing's old data does not show through (QEMU does the same; on v2 it may). */
static uint64_t discarded_entry(const struct qcow2_state *s)
{
    return s->node->backing && s->version >= 3 ? QCOW2_OFLAG_ZERO : 0;
}

int qcow2_plan(struct qcow2_state *s, struct qcow2_part *p, uint64_t l2e, uint64_t *host)
{
    struct block_req *parent = p->r->parent;
    enum qcow2_ctype t = qcow2_classify(s, l2e);
    uint64_t h = l2e & QCOW2_OFFSET_MASK;
    bool whole = p->len == s->cluster_size;
    bool copied = (l2e & QCOW2_OFLAG_COPIED) != 0;

    *host = h;
    p->old_l2e = l2e;
    if (t == QCOW2_BAD) {
        log_error("qcow2 %s: corrupt L2 entry 0x%" PRIx64 " for offset %" PRIu64
                  "; the image needs 'qemu-img check -r all'", s->node->node_name, l2e,
                  p->voff);
        return -EIO;
    }
    if ((t == QCOW2_NORMAL || t == QCOW2_ZERO_ALLOC) && !copied) {
        /* Shared with a snapshot (or a refcount that check must repair): COW needed. */
        log_error("qcow2 %s: cluster at %" PRIu64 " is shared; cannot change it in place",
                  s->node->node_name, h);
        return -EIO;
    }
    switch (parent->op) {
    case BLOCK_OP_WRITE:
        if (t == QCOW2_NORMAL)
            return QCOW2_PLAN_HOST;
        p->act = t == QCOW2_ZERO_ALLOC ? QCOW2_ACT_REWRITE : QCOW2_ACT_ALLOC;
        return QCOW2_PLAN_META;
    case BLOCK_OP_WRITE_ZEROES:
        if (t == QCOW2_COMPRESSED && (!whole || s->version < 3)) {
            /* Copy-on-write of the rest of the cluster, zeroes written in the new one. */
            if (!p->zbuf)
                p->zbuf = qcow2_alloc_buf(p->len);
            p->buf = p->zbuf;
            p->act = QCOW2_ACT_ALLOC;
            return QCOW2_PLAN_META;
        }
        if (t == QCOW2_NORMAL && (!whole || s->version < 3))
            return QCOW2_PLAN_HOST;  /* zeroes in place */
        if (t == QCOW2_UNALLOCATED && s->node->backing && (!whole || s->version < 3)) {
            /* The backing's bytes must not show through: a new cluster, zeroes written
             * over what copy-on-write brings from the backing. */
            if (!p->zbuf)
                p->zbuf = qcow2_alloc_buf(p->len);
            p->buf = p->zbuf;
            p->act = QCOW2_ACT_ALLOC;
            return QCOW2_PLAN_META;
        }
        if ((t == QCOW2_UNALLOCATED && !s->node->backing) || t == QCOW2_ZERO_PLAIN || !whole)
            return QCOW2_PLAN_DONE;  /* reads as zeroes already */
        if (parent->flags & BLOCK_REQ_MAY_UNMAP) {
            p->new_l2e = QCOW2_OFLAG_ZERO;
        } else {
            if (t == QCOW2_ZERO_ALLOC)
                return QCOW2_PLAN_DONE;
            /* Keep the cluster (preallocated stays preallocated), flag it zero. */
            p->new_l2e = t == QCOW2_NORMAL ? h | QCOW2_OFLAG_COPIED | QCOW2_OFLAG_ZERO
                                           : QCOW2_OFLAG_ZERO;
        }
        p->act = QCOW2_ACT_SET;
        return QCOW2_PLAN_META;
    case BLOCK_OP_DISCARD:
        /* As QEMU: partial clusters are not discarded; an unallocated one only needs the zero
         * flag when a backing file would show through (v3). */
        if (!whole || t == QCOW2_ZERO_PLAIN ||
            (t == QCOW2_UNALLOCATED && discarded_entry(s) == 0))
            return QCOW2_PLAN_DONE;
        p->new_l2e = discarded_entry(s);
        p->act = QCOW2_ACT_SET;
        return QCOW2_PLAN_META;
    default:
        return -EINVAL;
    }
}

/* ---- copy-on-write ---------------------------------------------------------------------- */

static void cow_zread_done(struct qcow2_zread *z, int ret)
{
    struct qcow2_part *p = z->opaque;
    struct qcow2_state *s = z->s;

    if (ret == 0)
        memcpy((char *)p->cow_buf + (p->voff & (s->cluster_size - 1)), p->buf, p->len);
    p->fill_done(p, ret);
}

/* Whether p's new cluster takes the bytes it does not write from the backing file: an
 * unallocated entry (zero-flagged ones read as zeroes) under a node with a backing. */
static bool cow_from_backing(const struct qcow2_state *s, const struct qcow2_part *p)
{
    return p->act == QCOW2_ACT_ALLOC && p->len != s->cluster_size && s->node->backing &&
           qcow2_classify(s, p->old_l2e) == QCOW2_UNALLOCATED;
}

static void cow_backing_done(struct qcow2_waiter *w, int ret)
{
    struct qcow2_part *p = container_of(w, struct qcow2_part, w);
    struct qcow2_state *s = p->r->s;

    if (ret == 0)
        memcpy((char *)p->cow_buf + (p->voff & (s->cluster_size - 1)), p->buf, p->len);
    p->fill_done(p, ret);
}

/* THE copy-on-write fill: the bytes of a newly allocated data cluster that the write does not
 * cover come from here, and only from here. Sources, in order: the cluster's old compressed
 * data (a write over a compressed cluster); the backing node's bytes of the guest cluster
 * where the entry was unallocated (qcow2_backing_fill(), zeroes past the backing's end);
 * else zeroes, as the cluster read before.
 *
 * p->cow_buf becomes the whole cluster with the guest's bytes in place, or stays NULL when
 * the write covers the cluster or nothing needs filling: zeroes over a host cluster that
 * reads as zeroes already (p->fill_skip: never written, past the file's end at open). */
void qcow2_cow_fill(struct qcow2_state *s, struct qcow2_part *p,
                    void (*done)(struct qcow2_part *p, int ret))
{
    uint32_t cs = s->cluster_size;
    bool compressed = p->act == QCOW2_ACT_ALLOC &&
                      qcow2_classify(s, p->old_l2e) == QCOW2_COMPRESSED;

    bool backing = !compressed && cow_from_backing(s, p);

    if (p->len == cs || (p->fill_skip && !compressed && !backing)) {
        done(p, 0);
        return;
    }
    p->cow_buf = qcow2_alloc_buf(cs);  /* zeroed */
    if (backing) {
        int ret;

        p->fill_done = done;
        p->w.cb = cow_backing_done;
        ret = qcow2_backing_fill(s, p->voff, p->cow_buf, &p->w);
        if (ret != 1)
            cow_backing_done(&p->w, ret < 0 ? ret : 0);
        return;
    }
    if (compressed) {
        p->fill_done = done;
        p->zr = xzalloc(sizeof(*p->zr));
        p->zr->out = p->cow_buf;
        p->zr->done = cow_zread_done;
        p->zr->opaque = p;
        qcow2_zread_start(s, p->zr, p->old_l2e);
        return;
    }
    memcpy((char *)p->cow_buf + (p->voff & (cs - 1)), p->buf, p->len);
    done(p, 0);
}

/* ---- phase A: data ---------------------------------------------------------------------- */

static void data_done(struct block_req *req, int ret)
{
    struct qcow2_part *p = container_of(req, struct qcow2_part, child);
    struct qcow2_state *s = p->r->s;

    for (struct qcow2_part *q = p; q; q = q->run_next)
        q->ret = ret;
    if (ret < 0)
        log_warn("qcow2 %s: data write at %" PRIu64 " failed: %s", s->node->node_name,
                 req->offset, strerror(-ret));
    batch_io_done(p->batch, ret);
}

static void data_submit(struct qcow2_state *s, struct qcow2_part *p)
{
    uint32_t cs = s->cluster_size;
    uint64_t off, len = 0;
    void *buf;

    if (p->cow_buf) {
        off = p->host;
        len = cs;
        buf = p->cow_buf;
    } else if (p->run_buf) {
        off = p->host;
        buf = p->run_buf;
        for (struct qcow2_part *q = p; q; q = q->run_next) {
            memcpy(p->run_buf + len, q->buf, q->len);
            len += q->len;
        }
    } else {
        off = p->host + (p->voff & (cs - 1));
        buf = p->buf;
        for (struct qcow2_part *q = p; q; q = q->run_next)
            len += q->len;
    }
    int ret = qcow2_pre_write(s, off, len, false);
    if (ret < 0) {
        data_done(&p->child, ret);
        return;
    }
    p->child = (struct block_req){.op = BLOCK_OP_WRITE, .offset = off, .len = len, .buf = buf,
                                  .done = data_done};
    node_submit(s->file, &p->child);
}

static void fill_done(struct qcow2_part *p, int ret)
{
    struct qcow2_state *s = p->r->s;

    if (ret < 0) {
        log_warn("qcow2 %s: copy-on-write for offset %" PRIu64 " failed: %s",
                 s->node->node_name, p->voff, strerror(-ret));
        p->ret = ret;
        batch_io_done(p->batch, ret);
        return;
    }
    data_submit(s, p);
}

static bool from_compressed(const struct qcow2_state *s, const struct qcow2_part *p)
{
    return qcow2_classify(s, p->old_l2e) == QCOW2_COMPRESSED;
}

static bool whole_fresh(const struct qcow2_state *s, const struct qcow2_part *q)
{
    return q->act == QCOW2_ACT_ALLOC && q->len == s->cluster_size && !from_compressed(s, q);
}

/* Merge p's followers into its data write where host clusters are contiguous and nothing
 * needs filling: in place where guest and buffer are contiguous too, else whole clusters
 * copied into the batch's bounce buffer at *bounce_at. Returns the index after the run. */
static size_t data_run(struct qcow2_state *s, struct qcow2_batch *b, size_t i,
                       uint64_t *bounce_at)
{
    struct qcow2_part *p = b->p[i];
    uint32_t cs = s->cluster_size;
    uint64_t total = p->len;
    size_t j = i + 1;
    bool copy = false;

    p->run_next = NULL;
    p->run_buf = NULL;
    if (p->act != QCOW2_ACT_ALLOC || from_compressed(s, p) || cow_from_backing(s, p) ||
        (p->len != cs && !p->fill_skip))
        return j;
    struct qcow2_part *last = p;
    while (j < b->n && total < MERGE_MAX) {
        struct qcow2_part *q = b->p[j];
        if (q->act != QCOW2_ACT_ALLOC || q->host != last->host + cs)
            break;
        bool inplace = !copy && q->r == p->r && !from_compressed(s, q) &&
                       (last->voff + last->len) % cs == 0 && q->voff == last->voff + last->len &&
                       q->buf == last->buf + last->len && !cow_from_backing(s, q) &&
                       (q->len == cs || q->fill_skip);
        if (!inplace) {
            /* Whole clusters from other buffers: copied together. */
            bool all = whole_fresh(s, q);
            for (struct qcow2_part *x = p; all && x; x = x->run_next)
                all = whole_fresh(s, x);
            if (!all)
                break;
            copy = true;
        }
        last->run_next = q;
        q->run_next = NULL;
        last = q;
        total += q->len;
        j++;
    }
    if (copy) {
        p->run_buf = b->bounce + *bounce_at;
        *bounce_at += total;
    }
    return j;
}

/* ---- the batch ------------------------------------------------------------------------ */

/* By guest cluster (one part per cluster goes in a batch: then by guest offset too), parts
 * of one cluster in arrival order (p->ri until step_lookup()). */
static int part_cmp(const void *a, const void *b)
{
    const struct qcow2_part *x = *(struct qcow2_part *const *)a;
    const struct qcow2_part *y = *(struct qcow2_part *const *)b;
    uint64_t cs = x->r->s->cluster_size;

    if (x->voff / cs != y->voff / cs)
        return x->voff / cs < y->voff / cs ? -1 : 1;
    return x->ri < y->ri ? -1 : x->ri > y->ri;
}

static int32_t reserve(struct qcow2_batch *b, uint64_t cluster, bool spare)
{
    if ((b->nresv & (b->nresv - 1)) == 0)  /* 0, 1, 2, 4...: grow to the next power of 2 */
        b->resv = xrealloc(b->resv, (b->nresv ? 2 * b->nresv : 1) * sizeof(*b->resv));
    b->resv[b->nresv] = (struct resv){.cluster = cluster, .inc = !spare};
    return (int32_t)b->nresv++;
}

/* Whether batch b (parts sorted by guest offset) has a part in guest cluster gc. */
static bool batch_has(const struct qcow2_state *s, const struct qcow2_batch *b, uint64_t gc)
{
    size_t lo = 0, hi = b->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint64_t c = b->p[mid]->voff >> s->cluster_bits;
        if (c == gc)
            return true;
        if (c < gc)
            lo = mid + 1;
        else
            hi = mid;
    }
    return false;
}

/* Take the batch's parts: the queue, up to BATCH_MAX, one part per guest cluster, none in a
 * cluster of the batch still running (s->batch, linking): those wait for the next batch and
 * then find their cluster allocated. */
static struct qcow2_batch *batch_new(struct qcow2_state *s)
{
    const struct qcow2_batch *prev = s->batch;
    struct qcow2_batch *b = xzalloc(sizeof(*b));
    struct qcow2_part *keep = NULL, **keep_tail = &keep;
    uint64_t cs = s->cluster_size;

    struct qcow2_part *failed = NULL;

    b->p = xmalloc(BATCH_MAX * sizeof(*b->p));
    while (s->queue_head && b->n < BATCH_MAX) {
        struct qcow2_part *p = s->queue_head;
        s->queue_head = p->next;
        if (p->r->err) {
            /* Its request failed already and will be retried whole (after a stop, by cont):
             * finish it now, so that the request fails before the stop, not after. */
            p->next = failed;
            failed = p;
            continue;
        }
        p->next = NULL;
        p->ri = (int32_t)b->n;  /* until step_lookup(): the queue's order, for part_cmp() */
        b->p[b->n++] = p;
    }
    /* Parts of one cluster in arrival order: the first goes in this batch, the others later,
     * so that overlapping writes land in the order they came. */
    qsort(b->p, b->n, sizeof(*b->p), part_cmp);
    size_t n = 0;
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        if ((n && b->p[n - 1]->voff / cs == p->voff / cs) ||
            (prev && batch_has(s, prev, p->voff / cs))) {
            *keep_tail = p;       /* the same cluster: next batch */
            keep_tail = &p->next;
            continue;
        }
        b->p[n++] = p;
    }
    b->n = n;
    *keep_tail = s->queue_head;
    s->queue_head = keep;
    s->queue_tail = &s->queue_head;
    while (*s->queue_tail)
        s->queue_tail = &(*s->queue_tail)->next;
    while (failed) {
        struct qcow2_part *p = failed;
        failed = p->next;
        qcow2_part_done(p, 0);
    }
    return b;
}

/* Drop part i from the batch (handed on or finished). */
static void batch_drop(struct qcow2_batch *b, size_t i)
{
    memmove(b->p + i, b->p + i + 1, (b->n - i - 1) * sizeof(*b->p));
    b->n--;
}

/* Lookups and plans from part b->i on. Returns 1 to go on, 0 if waiting, -errno. */
static int step_lookup(struct qcow2_state *s, struct qcow2_batch *b)
{
    uint32_t l2_bits = s->cluster_bits - 3;

    while (b->i < b->n) {
        struct qcow2_part *p = b->p[b->i];
        uint64_t l2e, host;
        int ret = qcow2_lookup(s, p->voff, &b->w, &l2e);
        if (ret == 1)
            return 0;
        if (ret == 0) {
            p->act = QCOW2_ACT_NONE;
            ret = qcow2_plan(s, p, l2e, &host);
        }
        if (ret != QCOW2_PLAN_META) {
            batch_drop(b, b->i);
            if (ret == QCOW2_PLAN_HOST)
                qcow2_part_write_host(p, host);
            else
                qcow2_part_done(p, ret < 0 ? ret : 0);
            continue;
        }
        uint64_t l1_idx = p->voff >> (s->cluster_bits + l2_bits);
        uint64_t l1e = be64toh(s->l1[l1_idx]);
        uint64_t l2_off = l1e & QCOW2_OFFSET_MASK;
        p->ri = p->li = -1;
        p->cow_buf = NULL;
        p->run_next = NULL;
        p->ret = 0;
        p->link = NULL;
        p->batch = b;
        p->fill_skip = false;
        if (l2_off && !(l1e & QCOW2_OFLAG_COPIED)) {
            log_error("qcow2 %s: L2 table %" PRIu64 " is shared; cannot update it in place",
                      s->node->node_name, l1_idx);
            batch_drop(b, b->i);
            qcow2_part_done(p, -EIO);
            continue;
        }
        if (p->act == QCOW2_ACT_REWRITE)
            p->host = l2e & QCOW2_OFFSET_MASK;
        if (!l2_off) {
            size_t j;
            for (j = 0; j < b->nnl2 && b->nl2[j].l1_idx != l1_idx; j++)
                ;
            if (j == b->nnl2) {
                b->nl2 = xrealloc(b->nl2, (b->nnl2 + 1) * sizeof(*b->nl2));
                b->nl2[j] = (struct newl2){.l1_idx = l1_idx, .ri = -1};
                b->nnl2++;
            }
            p->li = (int32_t)j;
        }
        b->i++;
    }
    return 1;
}

/* Take n clusters: spares, free clusters, then a run at next_free. Returns 1, or 0 if the
 * run has no refcount blocks yet (nothing taken). */
static int take_clusters(struct qcow2_state *s, size_t n, uint64_t *out, bool *fresh,
                         bool *spare)
{
    size_t got = 0;
    uint64_t na = s->ahead_end - s->ahead_next;
    uint64_t nf = n - MIN(n, s->spare.n + s->free.n + na);

    for (uint64_t cl = s->next_free; cl < s->next_free + nf; cl++) {
        if (!qcow2_rt_block(s, cl >> s->rb_bits))
            return 0;
    }
    while (got < n && s->spare.n) {
        spare[got] = true;
        fresh[got] = false;
        out[got++] = s->spare.v[--s->spare.n];
    }
    while (got < n && s->free.n) {
        spare[got] = false;
        fresh[got] = false;
        out[got++] = s->free.v[--s->free.n];
    }
    while (got < n && s->ahead_next < s->ahead_end) {
        spare[got] = true;   /* refcount 1 already, and flushed */
        fresh[got] = true;
        out[got++] = s->ahead_next++;
    }
    while (got < n) {
        spare[got] = false;
        fresh[got] = true;
        out[got++] = s->next_free++;
    }
    return 1;
}

static int cover_start(struct qcow2_state *s, uint64_t n);

/* Reserve clusters: new L2 tables first, then data in guest order (contiguous when fresh).
 * Returns 1, 0 if the refcount structures grow first, or -errno. */
static int step_assign(struct qcow2_state *s, struct qcow2_batch *b)
{
    uint64_t cs = s->cluster_size;
    size_t n = b->nnl2;

    for (size_t i = 0; i < b->n; i++)
        n += b->p[i]->act == QCOW2_ACT_ALLOC;
    if (n == 0)
        return 1;
    uint64_t *cl = xmalloc(n * sizeof(*cl));
    bool *fresh = xmalloc(n * sizeof(*fresh)), *spare = xmalloc(n * sizeof(*spare));
    size_t nf = n - MIN(n, s->spare.n + s->free.n + (s->ahead_end - s->ahead_next));
    uint64_t nf_start = s->next_free;
    b->wrote = b->wrote || s->spare.n;  /* a spare's refcount may not be flushed yet */
    int ret = take_clusters(s, n, cl, fresh, spare);
    if (ret == 0) {
        free(cl);
        free(fresh);
        free(spare);
        if (b != s->batch) {
            b->gated = true;  /* the growth runs as s->batch: batch_end() runs it on */
            return 0;
        }
        return cover_start(s, nf);
    }
    size_t k = 0;
    for (size_t j = 0; j < b->nnl2; j++, k++) {
        b->nl2[j].host = cl[k] * cs;
        b->nl2[j].ri = reserve(b, cl[k], spare[k]);
    }
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        if (p->act != QCOW2_ACT_ALLOC)
            continue;
        p->host = cl[k] * cs;
        p->fill_skip = fresh[k] && p->host >= s->hwm;
        p->ri = reserve(b, cl[k], spare[k]);
        k++;
    }
    free(cl);
    free(fresh);
    free(spare);
    if (nf && s->next_free == nf_start + nf) {
        /* Allocating at the end of the image: reserve the clusters after the batch's too
         * (as far as refcount blocks exist), counted by the same refcount writes, so that
         * the next batches find them ready. */
        uint64_t want = MIN(MAX(AHEAD_BYTES / cs, 1), AHEAD_MAX);
        for (uint64_t i = 0; i < want; i++) {
            if (!qcow2_rt_block(s, s->next_free >> s->rb_bits))
                break;
            int32_t r = reserve(b, s->next_free++, false);
            b->resv[r].ahead = true;
        }
    }
    return 1;
}

/* Refcount increments of the reserved clusters from b->i on. */
static int step_incs(struct qcow2_state *s, struct qcow2_batch *b)
{
    while (b->i < b->nresv) {
        struct resv *r = &b->resv[b->i];
        if (r->inc) {
            int err;
            struct qcow2_chunk *c = refcount_touch(s, b, &b->incs, r->cluster, +1, &err);
            if (err)
                return err;
            if (!c)
                return 0;
            r->rb = c;
        }
        b->i++;
    }
    return 1;
}

static uint64_t part_entry(const struct qcow2_part *p)
{
    return htobe64(p->act == QCOW2_ACT_SET ? p->new_l2e : p->host | QCOW2_OFLAG_COPIED);
}

/* The new L2 tables in memory, with their entries (written whole in A). */
static void step_build(struct qcow2_state *s, struct qcow2_batch *b)
{
    uint32_t l2_bits = s->cluster_bits - 3;

    for (size_t j = 0; j < b->nnl2; j++)
        b->nl2[j].table = qcow2_alloc_buf(s->cluster_size);
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        uint64_t l2_idx = (p->voff >> s->cluster_bits) & ((1ULL << l2_bits) - 1);
        if (p->li >= 0)
            b->nl2[p->li].table[l2_idx] = part_entry(p);
    }
}

/* The chunks B writes, copied now (the batch is s->batch: the one before it has finished,
 * so memory holds every entry written before) and patched with the batch's entries: L1
 * entries of the new L2 tables, L2 entries from part b->i on. Returns 1 to go on, 0 if an
 * L2 table is loading, or -errno. */
static int step_links(struct qcow2_state *s, struct qcow2_batch *b)
{
    uint32_t l2_bits = s->cluster_bits - 3;

    if (b->i == 0) {
        b->pipe = b->nnl2 == 0;
        for (size_t j = 0; j < b->nnl2; j++) {
            struct newl2 *t = &b->nl2[j];
            uint64_t e = htobe64(t->host | QCOW2_OFLAG_COPIED);
            t->l1 = chunk_touch(s, &b->links, K_L1, 0, s->l1, l1_len(s), s->l1_offset,
                                t->l1_idx * 8);
            memcpy(t->l1->buf + (t->l1_idx * 8 - t->l1->pos), &e, 8);
        }
    }
    for (; b->i < b->n; b->i++) {
        struct qcow2_part *p = b->p[b->i];
        if (p->act == QCOW2_ACT_SET || from_compressed(s, p))
            b->pipe = false;  /* C frees clusters: refcount writes after B */
        if (p->li >= 0) {
            p->link = b->nl2[p->li].l1;
            continue;
        }
        uint64_t l1_idx = p->voff >> (s->cluster_bits + l2_bits);
        uint64_t l2_off = be64toh(s->l1[l1_idx]) & QCOW2_OFFSET_MASK;
        uint64_t l2_idx = (p->voff >> s->cluster_bits) & ((1ULL << l2_bits) - 1);
        uint64_t e = part_entry(p);
        if (!l2_off)
            return -EIO;  /* the table step_lookup() found went away: cannot happen */
        p->link = chunk_find(&b->links, l2_off + ((l2_idx * 8) & ~(uint64_t)(s->meta_align - 1)));
        if (!p->link) {
            const void *table = qcow2_cache_get(s->l2_cache, l2_off, &b->w);
            if (!table)
                return 0;
            p->link = chunk_touch(s, &b->links, K_L2, l2_off, table, s->cluster_size, l2_off,
                                  l2_idx * 8);
        }
        memcpy(p->link->buf + (l2_idx * 8 - p->link->pos), &e, 8);
    }
    return 1;
}

static void newl2_done(struct block_req *req, int ret)
{
    struct qcow2_batch *b = req->opaque;
    struct qcow2_state *s = b->s;

    if (ret < 0)
        log_warn("qcow2 %s: new L2 table write at %" PRIu64 " failed: %s", s->node->node_name,
                 req->offset, strerror(-ret));
    free(req);
    batch_io_done(b, ret);
}

static void step_a(struct qcow2_state *s, struct qcow2_batch *b)
{
    b->pending = 1;
    /* Refcounts and new L2 tables must be on disk before anything links them; data only
     * written (the entry is written after the data write completed). */
    b->wrote = b->wrote || b->incs.n || b->nnl2;
    chunks_write(s, b, &b->incs);
    for (size_t j = 0; j < b->nnl2; j++) {
        int ret = qcow2_pre_write(s, b->nl2[j].host, s->cluster_size, false);
        if (ret < 0) {
            if (!b->err)
                b->err = ret;
            continue;
        }
        struct block_req *req = xzalloc(sizeof(*req));
        *req = (struct block_req){.op = BLOCK_OP_WRITE, .offset = b->nl2[j].host,
                                  .len = s->cluster_size, .buf = b->nl2[j].table,
                                  .done = newl2_done, .opaque = b};
        b->pending++;
        node_submit(s->file, req);
    }
    size_t whole = 0;
    uint64_t bounce_at = 0;
    for (size_t i = 0; i < b->n; i++)
        whole += whole_fresh(s, b->p[i]);
    if (whole > 1 && s->bounce_len[b->slot] < whole * s->cluster_size) {
        free(s->bounce[b->slot]);
        s->bounce_len[b->slot] = whole * s->cluster_size;
        if (posix_memalign(&s->bounce[b->slot], 4096, s->bounce_len[b->slot]) != 0)
            abort();
    }
    b->bounce = s->bounce[b->slot];
    for (size_t i = 0; i < b->n;) {
        struct qcow2_part *p = b->p[i];
        if (p->act == QCOW2_ACT_SET) {
            i++;
            continue;
        }
        size_t j = data_run(s, b, i, &bounce_at);
        b->pending++;
        qcow2_cow_fill(s, p, fill_done);
        i = j;
    }
    if (b == s->batch && !b->wrote && !b->err) {
        /* Data writes only, no flush and nothing to free after B: the next batch may start
         * (b->pending holds b meanwhile). */
        b->early = true;
        for (size_t i = 0; i < b->n && b->early; i++)
            b->early = b->p[i]->act != QCOW2_ACT_SET && !from_compressed(s, b->p[i]);
        if (b->early)
            kick(s);
    }
    batch_io_done(b, 0);
}

static void flush_done(struct block_req *req, int ret)
{
    struct qcow2_batch *b = req->opaque;

    if (ret < 0)
        log_warn("qcow2 %s: flush failed: %s", b->s->node->node_name, strerror(-ret));
    batch_io_done(b, ret);
}

static void step_flush(struct qcow2_state *s, struct qcow2_batch *b)
{
    b->pending = 1;
    b->flush = (struct block_req){.op = BLOCK_OP_FLUSH, .done = flush_done, .opaque = b};
    node_submit(s->file, &b->flush);
}

/* After B: which parts are linked, what to decrement. */
static void step_linked(struct qcow2_state *s, struct qcow2_batch *b)
{
    uint64_t cs = s->cluster_size;

    for (size_t j = 0; j < b->nnl2; j++) {
        if (b->nl2[j].l1->ret == 0) {
            b->resv[b->nl2[j].ri].linked = true;
            qcow2_meta_add(s, b->nl2[j].host / cs);
            qcow2_cache_insert(s->l2_cache, b->nl2[j].host, b->nl2[j].table);
        }
    }
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        if (p->link->ret != 0) {
            p->ret = p->link->ret;
            continue;
        }
        if (p->ri >= 0)
            b->resv[p->ri].linked = true;
        enum qcow2_ctype t = qcow2_classify(s, p->old_l2e);
        uint64_t h = p->old_l2e & QCOW2_OFFSET_MASK;
        if (t == QCOW2_COMPRESSED) {
            uint64_t first, n;
            qcow2_compressed_span(s, p->old_l2e, &first, &n);
            for (uint64_t k = 0; k < n; k++)
                vpush(&b->dec, first + k);
        } else if (p->act == QCOW2_ACT_SET && h && !(p->new_l2e & QCOW2_OFFSET_MASK)) {
            vpush(&b->dec, h / cs);
        }
    }
}

/* Refcount decrements from b->i on. */
static int step_decs(struct qcow2_state *s, struct qcow2_batch *b)
{
    while (b->i < b->dec.n) {
        int err;
        struct qcow2_chunk *c = refcount_touch(s, b, &b->decs, b->dec.v[b->i], -1, &err);
        if (err)
            return err;
        if (!c)
            return 0;
        b->i++;
    }
    return 1;
}

static void discard_done(struct block_req *req, int ret)
{
    (void)ret;  /* advisory */
    batch_io_done(req->opaque, 0);
}

/* Which decremented clusters reached 0 (their chunk written); discard them in the file. */
static void step_discard(struct qcow2_state *s, struct qcow2_batch *b)
{
    uint64_t cs = s->cluster_size;

    for (size_t i = 0; i < b->dec.n; i++) {
        uint64_t cl = b->dec.v[i];
        uint64_t block = qcow2_rt_block(s, cl >> s->rb_bits);
        uint64_t idx = cl & ((1ULL << s->rb_bits) - 1);
        uint64_t byte = (idx << s->refcount_order) >> 3;
        struct qcow2_chunk *c = chunk_find(&b->decs,
                                           block + (byte & ~(uint64_t)(s->meta_align - 1)));
        if (!c || c->ret != 0)
            continue;
        if (qcow2_refcount_get(s, c->buf, idx - (c->pos * 8ULL >> s->refcount_order)) != 0)
            continue;
        bool dup = false;
        for (size_t k = 0; k < b->freed.n && !dup; k++)
            dup = b->freed.v[k] == cl;
        if (!dup)
            vpush(&b->freed, cl);
    }
    b->pending = 1;
    b->discards = xzalloc((b->freed.n + 1) * sizeof(*b->discards));
    for (size_t i = 0; i < b->freed.n; i++) {
        b->discards[i] = (struct block_req){.op = BLOCK_OP_DISCARD,
                                            .offset = b->freed.v[i] * cs, .len = cs,
                                            .done = discard_done, .opaque = b};
        b->pending++;
        node_submit(s->file, &b->discards[i]);
    }
    batch_io_done(b, 0);
}

/* The clusters reserved ahead whose refcounts are durable: the next batches may take them. */
static void ahead_handover(struct qcow2_state *s, struct qcow2_batch *b)
{
    for (size_t r = 0; r < b->nresv; r++) {
        struct resv *v = &b->resv[r];
        if (v->ahead && !v->handed && b->durable && v->rb && v->rb->ret == 0 &&
            (s->ahead_next == s->ahead_end || s->ahead_end == v->cluster)) {
            if (s->ahead_next == s->ahead_end)
                s->ahead_next = v->cluster;
            s->ahead_end = v->cluster + 1;
            v->handed = true;
        }
    }
}

/* Finish: clusters back to the lists, parts completed, the next batch. */
static void batch_end(struct qcow2_state *s, struct qcow2_batch *b, int err)
{
    struct qcow2_batch *next = NULL;

    for (size_t r = 0; r < b->nresv; r++) {
        struct resv *v = &b->resv[r];
        if (v->linked || v->handed)
            continue;
        if (!v->inc || (v->rb && v->rb->ret == 0))
            vpush(&s->spare, v->cluster);   /* refcount 1, nothing links it */
        else
            vpush(&s->free, v->cluster);    /* refcount 0 */
    }
    for (size_t i = 0; i < b->freed.n; i++)
        vpush(s->inplace ? &s->freeing : &s->free, b->freed.v[i]);
    for (size_t j = 0; j < b->nnl2; j++)
        free(b->nl2[j].table);
    free(b->nl2);
    free(b->resv);
    chunkset_free(&b->links);
    chunkset_free(&b->incs);
    chunkset_free(&b->decs);
    free(b->dec.v);
    free(b->freed.v);
    free(b->discards);
    if (b == s->batch) {
        s->batch = next = s->batch2;  /* it may link now */
        s->batch2 = NULL;
    } else {
        s->batch2 = NULL;
    }
    if (s->bounce_len[b->slot] > BOUNCE_KEEP) {
        free(s->bounce[b->slot]);
        s->bounce[b->slot] = NULL;
        s->bounce_len[b->slot] = 0;
    }
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        int ret = err ? err : p->ret;
        free(p->cow_buf);
        p->cow_buf = NULL;
        free(p->zr);
        p->zr = NULL;
        qcow2_part_done(p, ret);
    }
    free(b->p);
    free(b);
    if (next && next->gated) {
        next->gated = false;
        batch_run(next);
    }
    kick(s);
}

static void batch_run(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;
    int ret;

    for (;;) {
        switch (b->step) {
        case B_LOOKUP:
            ret = step_lookup(s, b);
            if (ret <= 0)
                goto wait_or_fail;
            if (b->n == 0) {
                batch_end(s, b, 0);
                return;
            }
            b->step = B_ASSIGN;
            break;
        case B_ASSIGN:
            ret = step_assign(s, b);
            if (ret <= 0)
                goto wait_or_fail;  /* 0: the refcount structures grow first */
            b->i = 0;
            b->step = B_INCS;
            break;
        case B_INCS:
            ret = step_incs(s, b);
            if (ret <= 0)
                goto wait_or_fail;
            step_build(s, b);
            b->step = B_A;
            step_a(s, b);
            return;
        case B_A:
            if (b->err) {
                batch_end(s, b, b->err);
                return;
            }
            b->step = B_FLUSH1;
            if (flush_needed(s) && b->wrote) {
                step_flush(s, b);
                return;
            }
            break;
        case B_FLUSH1:
            if (b->err) {
                batch_end(s, b, b->err);
                return;
            }
            b->durable = true;
            ahead_handover(s, b);
            b->step = B_GATE;
            break;
        case B_GATE:
            if (b != s->batch) {
                b->gated = true;  /* batch_end() of the one before runs it on */
                return;
            }
            b->i = 0;
            b->step = B_LINKS;
            break;
        case B_LINKS:
            ret = step_links(s, b);
            if (ret <= 0)
                goto wait_or_fail;
            b->step = B_B;
            b->pending = 1;
            chunks_write(s, b, &b->links);
            if (b->pipe)
                kick(s);  /* the next batch: prepare and A while this one links */
            batch_io_done(b, 0);
            return;
        case B_B:
            b->err = 0;  /* each part goes by its own link's result */
            step_linked(s, b);
            b->step = B_FLUSH2;
            if (b->dec.n && flush_needed(s)) {
                step_flush(s, b);
                return;
            }
            break;
        case B_FLUSH2:
            if (b->err) {
                log_warn("qcow2 %s: clusters leaked", s->node->node_name);
                batch_end(s, b, 0);
                return;
            }
            b->i = 0;
            b->step = B_DECS;
            break;
        case B_DECS:
            ret = step_decs(s, b);
            if (ret < 0) {
                log_warn("qcow2 %s: refcount decrement failed: clusters leaked",
                         s->node->node_name);
                batch_end(s, b, 0);
                return;
            }
            if (ret == 0)
                return;
            b->step = B_C;
            b->pending = 1;
            chunks_write(s, b, &b->decs);
            batch_io_done(b, 0);
            return;
        case B_C:
            b->step = B_DISCARD;
            step_discard(s, b);
            return;
        case B_DISCARD:
            batch_end(s, b, 0);
            return;
        }
    }
wait_or_fail:
    if (ret < 0)
        batch_end(s, b, ret);
}

static void wait_cb(struct qcow2_waiter *w, int ret)
{
    struct qcow2_batch *b = container_of(w, struct qcow2_batch, w);
    struct qcow2_state *s = b->s;

    if (b->cover) {
        if (ret < 0 && b->cover->step == C_FREE) {
            b->cover->iop++;  /* only leaks the old table's cluster */
            ret = 0;
        }
        if (ret < 0)
            cover_end(s, ret);
        else
            cover_run(s);
        return;
    }
    if (ret < 0) {
        if (b->step == B_DECS) {
            log_warn("qcow2 %s: cannot load a refcount block: clusters leaked",
                     s->node->node_name);
            batch_end(s, b, 0);
        } else {
            batch_end(s, b, ret);
        }
        return;
    }
    batch_run(b);
}

/* Where a new batch may go: s->batch if none runs, s->batch2 if s->batch links (B) and
 * nothing after that writes refcounts, else NULL. */
static struct qcow2_batch **batch_slot(struct qcow2_state *s)
{
    if (!s->batch)
        return &s->batch;
    if (!s->batch2 && ((s->batch->pipe && s->batch->step >= B_B) ||
                       (s->batch->early && s->batch->step == B_A)))
        return &s->batch2;
    return NULL;
}

static void kick(struct qcow2_state *s)
{
    struct qcow2_batch **slot;

    if (s->kicking)
        return;
    s->kicking = true;
    while (s->queue_head && (slot = batch_slot(s))) {
        struct qcow2_batch *b = batch_new(s);
        if (b->n == 0) {
            free(b->p);
            free(b);
            if (slot == &s->batch2)
                break;  /* every queued part waits for s->batch's */
            continue;
        }
        b->w.cb = wait_cb;
        b->s = s;
        b->slot = slot == &s->batch2 ? !s->batch->slot : 0;
        *slot = b;
        batch_run(b);
    }
    s->kicking = false;
}

static void kick_nop_done(struct uring_op *uop, int res)
{
    struct qcow2_state *s = container_of(uop, struct qcow2_state, kick_uop);

    (void)res;
    s->kick_scheduled = false;
    kick(s);
}

/* The batch starts from the loop, not at once: the other parts that arrive in this turn of
 * the loop (a request's clusters, other requests) join it. */
void qcow2_alloc_enqueue(struct qcow2_state *s, struct qcow2_part *p)
{
    p->next = NULL;
    *s->queue_tail = p;
    s->queue_tail = &p->next;
    if (!s->kick_scheduled && batch_slot(s)) {
        s->kick_scheduled = true;
        s->kick_uop.done = kick_nop_done;
        uring_nop(s->node->graph->uring, &s->kick_uop);
    }
}

void qcow2_alloc_inplace_done(struct qcow2_state *s)
{
    if (s->inplace == 0 && s->freeing.n) {
        for (size_t i = 0; i < s->freeing.n; i++)
            vpush(&s->free, s->freeing.v[i]);
        s->freeing.n = 0;
    }
}

static int u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

void qcow2_alloc_close(struct qcow2_state *s)
{
    struct qcow2_u64v cl = {0};
    uint64_t cs, mask;
    void *buf;

    if (!s || !s->writable || s->corrupt || s->batch || s->batch2)
        return;
    for (uint64_t c = s->ahead_next; c < s->ahead_end; c++)
        vpush(&cl, c);
    for (size_t i = 0; i < s->spare.n; i++)
        vpush(&cl, s->spare.v[i]);
    s->ahead_next = s->ahead_end = 0;
    s->spare.n = 0;
    if (!cl.n)
        return;
    qsort(cl.v, cl.n, sizeof(*cl.v), u64_cmp);
    cs = s->cluster_size;
    mask = (1ULL << s->rb_bits) - 1;
    buf = qcow2_alloc_buf(cs);
    for (size_t i = 0; i < cl.n;) {
        uint64_t b = cl.v[i] >> s->rb_bits, block = qcow2_rt_block(s, b);
        uint64_t lo = UINT64_MAX, hi = 0;
        struct error *err = NULL;
        size_t j = i;

        while (j < cl.n && cl.v[j] >> s->rb_bits == b)
            j++;
        if (!block || node_pread_sync(s->file, buf, cs, block, &err) < 0)
            goto leak;
        for (size_t k = i; k < j; k++) {
            uint64_t idx = cl.v[k] & mask, v = qcow2_refcount_get(s, buf, idx);
            if (v == 0 || (k > i && cl.v[k] == cl.v[k - 1]))
                continue;
            qcow2_refcount_set(s, buf, idx, v - 1);
            lo = MIN(lo, (idx << s->refcount_order) >> 3);
            hi = MAX(hi, ((idx << s->refcount_order) >> 3) + 1);
        }
        if (hi) {
            uint64_t g = s->meta_align, start = lo & ~(g - 1);
            uint64_t end = MIN((hi + g - 1) & ~(g - 1), cs);
            if (node_pwrite_sync(s->file, (char *)buf + start, end - start, block + start,
                                 &err) < 0)
                goto leak;
            qcow2_cache_patch(s->rb_cache, block, (uint32_t)start, (char *)buf + start,
                              (uint32_t)(end - start));
        }
        i = j;
        continue;
leak:
        log_warn("qcow2 %s: cannot release %zu reserved clusters%s%s: leaked",
                 s->node->node_name, j - i, err ? ": " : "", err ? err->desc : "");
        error_free(err);
        i = j;
    }
    free(buf);
    free(cl.v);
}

void qcow2_alloc_cleanup(struct qcow2_state *s)
{
    free(s->spare.v);
    free(s->free.v);
    free(s->freeing.v);
    s->spare = s->free = s->freeing = (struct qcow2_u64v){0};
    for (int i = 0; i < 2; i++) {
        free(s->bounce[i]);
        s->bounce[i] = NULL;
        s->bounce_len[i] = 0;
    }
}

/* ---- refcount structure growth ------------------------------------------------------------ */

static void cover_end(struct qcow2_state *s, int ret)
{
    struct qcow2_batch *b = s->batch;
    struct qcow2_cover *c = b->cover;

    if (ret < 0 && c->committed) {
        /* Not linked, or linked in part: skip the new clusters. Those an old block counts
         * and whose increment reached the disk are spares, the others free; a new block
         * that a table entry links counts itself and leaks. */
        s->next_free = MAX(s->next_free, c->c + c->k + c->m);
        bool unlinked = c->step == C_INCS || c->step == C_FLUSH1 ||
                        (c->step == C_LINK && c->link_i == 0);
        for (size_t i = 0; unlinked && i < c->ops.n; i++)
            vpush(i < c->iop ? &s->spare : &s->free, c->ops.v[i]);
        if (!unlinked)
            log_warn("qcow2 %s: refcount structure growth failed half-way; up to %" PRIu64
                     " clusters leaked", s->node->node_name, c->k + c->m);
    }
    free(c->iobuf);
    free(c->new_blocks);
    free(c->cover_buf);
    free(c->ops.v);
    free(c);
    b->cover = NULL;
    if (ret < 0)
        batch_end(s, b, ret);
    else
        batch_run(b);  /* B_ASSIGN again */
}

static void cover_io_done(struct block_req *req, int ret)
{
    struct qcow2_state *s = req->opaque;
    struct qcow2_cover *c = s->batch->cover;

    if (ret < 0 && c->step == C_FREE) {
        /* The new table is linked and flushed: the old one's clusters are spares. */
        log_warn("qcow2 %s: freeing the old refcount table failed (%s)", s->node->node_name,
                 strerror(-ret));
        for (size_t i = c->iop; i < c->ops.n; i++)
            vpush(&s->spare, c->ops.v[i]);
        ret = 0;
        c->patch_kind = 0;
        c->iop = c->ops.n;
    }
    if (ret < 0) {
        static const char *const steps[] = {[C_WRITE] = "new refcount blocks write",
            [C_INCS] = "refcount block write", [C_FLUSH1] = "flush",
            [C_LINK] = "refcount table link write", [C_FLUSH2] = "flush"};
        log_warn("qcow2 %s: refcount structure growth: %s failed: %s", s->node->node_name,
                 c->step == C_LINK && c->k ? "header link write" : steps[c->step],
                 strerror(-ret));
        cover_end(s, ret);
        return;
    }
    switch (c->patch_kind) {  /* the disk has it: now memory may */
    case -1:
        memcpy((char *)s->header + c->patch_pos, c->iobuf, c->patch_len);
        break;
    case -2:
        memcpy((char *)s->rt + c->patch_pos, c->iobuf, c->patch_len);
        break;
    case K_RB:
        qcow2_cache_patch(s->rb_cache, c->patch_table, c->patch_pos, c->iobuf, c->patch_len);
        break;
    }
    c->patch_kind = 0;
    free(c->iobuf);
    c->iobuf = NULL;
    switch (c->step) {
    case C_WRITE:
        c->step = C_INCS;
        c->iop = 0;
        break;
    case C_INCS:
        c->committed = true;
        c->iop++;
        break;
    case C_FLUSH1:
        c->step = C_LINK;
        c->link_i = 0;
        break;
    case C_LINK:
        c->committed = true;
        c->link_i++;
        break;
    case C_FLUSH2:
        c->step = C_FREE;
        c->iop = 0;
        c->committed = false;  /* linked and flushed: nothing to undo any more */
        break;
    case C_FREE:
        c->iop++;
        break;
    }
    cover_run(s);
}

static void cover_submit(struct qcow2_state *s, enum block_op op, uint64_t off, void *buf,
                         size_t len)
{
    struct qcow2_cover *c = s->batch->cover;

    c->req = (struct block_req){.op = op, .offset = off, .len = len, .buf = buf,
                                .done = cover_io_done, .opaque = s};
    if (op == BLOCK_OP_WRITE)
        qcow2_pre_write(s, off, len, true);
    node_submit(s->file, &c->req);
}

/* Write the meta_align chunk(s) of image (image_len bytes in memory at disk offset base)
 * holding [pos, pos+len) with data there; memory follows once it is done. */
static void cover_patch(struct qcow2_state *s, int kind, uint64_t table, const void *image,
                        size_t image_len, uint64_t base, uint32_t pos, const void *data,
                        uint32_t len)
{
    struct qcow2_cover *c = s->batch->cover;
    uint32_t g = s->meta_align;
    uint32_t start = pos & ~(g - 1);
    uint32_t end = (uint32_t)MIN(((uint64_t)pos + len + g - 1) & ~(uint64_t)(g - 1), image_len);
    char *buf = qcow2_alloc_buf(end - start);

    memcpy(buf, (const char *)image + start, end - start);
    memcpy(buf + (pos - start), data, len);
    c->patch_kind = kind;
    c->patch_table = table;
    c->patch_pos = start;
    c->patch_len = end - start;
    c->iobuf = buf;
    cover_submit(s, BLOCK_OP_WRITE, base + start, buf, end - start);
}

/* One refcount change of the cover (c->ops.v[c->iop] by delta). Returns 0 (a write or a
 * load is under way) or -errno. */
static int cover_refcount(struct qcow2_state *s, int delta)
{
    struct qcow2_batch *b = s->batch;
    struct qcow2_cover *c = b->cover;
    uint64_t cl = c->ops.v[c->iop];
    uint64_t block = qcow2_rt_block(s, cl >> s->rb_bits);
    uint64_t idx = cl & ((1ULL << s->rb_bits) - 1);
    uint8_t bytes[8];
    uint32_t pos, len;

    if (!block)
        return -EIO;
    const void *table = qcow2_cache_get(s->rb_cache, block, &b->w);
    if (!table)
        return 0;
    uint64_t old = qcow2_refcount_get(s, table, idx);
    if ((delta > 0 && old == qcow2_refcount_max(s)) || (delta < 0 && old == 0))
        return -EIO;
    qcow2_refcount_encode(s, table, idx, delta > 0 ? old + 1 : old - 1, &pos, &len, bytes);
    cover_patch(s, K_RB, block, table, s->cluster_size, block, pos, bytes, len);
    return 0;
}

/* Plan new refcount blocks (and a new table) at next_free so that they and the n clusters
 * after them have refcount blocks. */
static int cover_start(struct qcow2_state *s, uint64_t n)
{
    struct qcow2_batch *b = s->batch;
    struct qcow2_cover *cv;
    uint64_t cs = s->cluster_size, c = s->next_free, k = 0, m = 0;
    uint64_t max_k = (8u << 20) / cs;

    for (;;) {
        uint64_t last_b = (c + k + m + n - 1) >> s->rb_bits;
        uint64_t nk = 0, nm = 0;
        if (last_b >= s->rt_entries) {
            uint64_t need = ((last_b + 1) * 8 + cs - 1) / cs;
            if (need > max_k) {
                log_error("qcow2 %s: the refcount table cannot grow further",
                          s->node->node_name);
                return -EFBIG;
            }
            nk = MAX(need, MIN(2 * (uint64_t)s->rt_clusters, max_k));
            nk = MAX(nk, k);
        }
        for (uint64_t bl = c >> s->rb_bits; bl <= last_b; bl++)
            nm += !qcow2_rt_block(s, bl);
        if (nk == k && nm == m)
            break;
        k = nk;
        m = nm;
    }
    cv = xzalloc(sizeof(*cv));
    b->cover = cv;
    cv->c = c;
    cv->k = k;
    cv->m = m;
    cv->new_blocks = xmalloc(MAX(m, 1) * sizeof(*cv->new_blocks));
    uint64_t j = 0, last_b = (c + k + m + n - 1) >> s->rb_bits;
    for (uint64_t bl = c >> s->rb_bits; bl <= last_b; bl++) {
        if (!qcow2_rt_block(s, bl))
            cv->new_blocks[j++] = bl;
    }
    cv->cover_buf = qcow2_alloc_buf((k + m) * cs);
    uint64_t *table = cv->cover_buf;
    if (k) {
        memcpy(table, s->rt, s->rt_entries * 8);
        for (j = 0; j < m; j++)
            table[cv->new_blocks[j]] = htobe64((c + k + j) * cs);
    }
    for (uint64_t cl = c; cl < c + k + m; cl++) {
        uint64_t bl = cl >> s->rb_bits;
        for (j = 0; j < m && cv->new_blocks[j] != bl; j++)
            ;
        if (j < m)
            qcow2_refcount_set(s, (char *)cv->cover_buf + (k + j) * cs,
                               cl & ((1ULL << s->rb_bits) - 1), 1);
        else
            vpush(&cv->ops, cl);
    }
    cv->old_rt_offset = s->rt_offset;
    cv->old_rt_clusters = s->rt_clusters;
    cv->step = C_WRITE;
    cover_submit(s, BLOCK_OP_WRITE, c * cs, cv->cover_buf, (k + m) * cs);
    return 0;
}

/* The new refcount structure is linked: make memory follow. */
static void cover_linked(struct qcow2_state *s)
{
    struct qcow2_cover *c = s->batch->cover;
    uint64_t cs = s->cluster_size;

    if (c->k) {
        free(s->rt);
        s->rt = qcow2_alloc_buf(c->k * cs);
        memcpy(s->rt, c->cover_buf, c->k * cs);
        s->rt_offset = c->c * cs;
        s->rt_clusters = (uint32_t)c->k;
        s->rt_entries = c->k * cs / 8;
    }
    for (uint64_t j = 0; j < c->m; j++)
        qcow2_meta_add(s, c->c + c->k + j);
    for (uint64_t j = 0; j < c->m; j++)
        qcow2_cache_insert(s->rb_cache, (c->c + c->k + j) * cs,
                           (char *)c->cover_buf + (c->k + j) * cs);
    s->next_free = MAX(s->next_free, c->c + c->k + c->m);
    c->ops.n = 0;
    if (c->k) {
        for (uint64_t i = 0; i < c->old_rt_clusters; i++)
            vpush(&c->ops, c->old_rt_offset / cs + i);
    }
    c->iop = 0;
}

static void cover_run(struct qcow2_state *s)
{
    struct qcow2_cover *c = s->batch->cover;
    uint64_t cs = s->cluster_size;
    int ret;

    for (;;) {
        switch (c->step) {
        case C_INCS:
            if (c->iop < c->ops.n) {
                ret = cover_refcount(s, +1);
                if (ret < 0)
                    cover_end(s, ret);
                return;
            }
            c->step = C_FLUSH1;
            if (flush_needed(s)) {
                cover_submit(s, BLOCK_OP_FLUSH, 0, NULL, 0);
                return;
            }
            c->step = C_LINK;
            c->link_i = 0;
            break;
        case C_LINK:
            if (c->k && c->link_i == 0) {
                uint8_t hdr[12];
                uint64_t off = htobe64(c->c * cs);
                uint32_t clusters = htobe32((uint32_t)c->k);
                memcpy(hdr, &off, 8);
                memcpy(hdr + 8, &clusters, 4);
                cover_patch(s, -1, 0, s->header, s->meta_align, 0, 48, hdr, 12);
                return;
            }
            if (!c->k && c->link_i < c->m) {
                uint64_t e = htobe64((c->c + c->link_i) * cs);
                cover_patch(s, -2, 0, s->rt, (size_t)s->rt_clusters * cs, s->rt_offset,
                            (uint32_t)(c->new_blocks[c->link_i] * 8), &e, 8);
                return;
            }
            cover_linked(s);
            c->step = C_FLUSH2;
            if (c->ops.n && flush_needed(s)) {
                cover_submit(s, BLOCK_OP_FLUSH, 0, NULL, 0);
                return;
            }
            c->step = C_FREE;
            break;
        case C_FREE:
            while (c->iop < c->ops.n) {
                if (cover_refcount(s, -1) == 0)
                    return;
                c->iop++;  /* a failure here only leaks the old table */
            }
            cover_end(s, 0);
            return;
        default:
            return;
        }
    }
}
