/* qcow2 metadata changes: the allocation batch. See qcow2-alloc.h.
 *
 * The only code that changes the image's metadata. Parts that need a change wait in a FIFO
 * queue; the allocator takes every queued part into one batch (at most BATCH_MAX, one part
 * per guest cluster, the first to arrive: a second part for the same cluster waits for the
 * next batch and then finds the cluster allocated, so overlapping writes land in order) and
 * runs it through the states below, each phase waiting for the one before, so that a process
 * killed or a power failure at any point leaves at worst leaked clusters (which the next
 * writable open reclaims, qcow2-check.c), never an entry pointing at a cluster with refcount
 * 0 or at unwritten data.
 *
 * The machine: batch_states[] lists the states in order, each with the code that runs in
 * it. A state moves on (sets b->state, returns NEXT) or waits (WAIT): for the I/O it
 * submitted (b->pending; the last completion runs the machine again), for a table to load
 * (b->w), for the batch before it to finish (b->gated), or for the refcount structures to
 * grow (qcow2-grow.c). The state it set before waiting runs next.
 *
 *   LOOKUP      L2 lookups and plans; parts that need no metadata change leave the batch
 *               (written in place, or done)
 *   ASSIGN      host clusters for new L2 tables and data: spares (refcount 1 already),
 *               free clusters, the run reserved ahead (refcount 1, flushed), then a run at
 *               next_free, and with it up to AHEAD_BYTES more for the next batches (the same
 *               refcount writes count them); GROW first if the run has no refcount block
 *   GROW        refcount structure growth (qcow2-grow.c)                  -> ASSIGN
 *   INCS        the refcount increments of the reserved clusters, staged
 *   A           in parallel: the increments (one write per run of refcount block chunks),
 *               the data clusters (qcow2-cow.c: guest bytes and copy-on-write, runs
 *               contiguous on the host merged), new L2 tables whole (with their entries)
 *   A_DONE      one flush if A wrote refcounts or L2 tables or used spares (data need only
 *               be written before its entry: a batch served from the run reserved ahead needs
 *               no flush), skipped with cache.no-flush
 *   FLUSHED     the clusters reserved ahead are durable: handed over
 *   GATE        waits until it is the oldest batch
 *   LINKS       the L2 entries and the L1 entries of new L2 tables, staged: chunks copied
 *               from memory now, not before (see pipelining)
 *   B           the links written: the changes become reachable here
 *   B_DONE      which parts are linked, which clusters they unlinked; a flush if any (C must
 *               never reach the disk before B)
 *   DECS        the refcount decrements of the unlinked clusters (discard, write-zeroes with
 *               unmap, compressed clusters rewritten), staged
 *   C           the decrements written
 *   DISCARD     the clusters whose refcount reached 0, discarded down to the file
 *   END         clusters back to the lists, parts completed, the next batch
 *
 * Pipelining: two batches at most, s->alloc->batch and ->batch2. Once the batch has
 * submitted B and nothing after B writes refcounts (no new L2 tables, nothing to free:
 * b->pipe), or already once it has submitted A if A writes data only and no flush follows
 * (b->early), the next batch (batch2) may run LOOKUP to A_DONE meanwhile (each its own bounce
 * buffer); it takes no part of a guest cluster the first has, and needs GROW or LINKS only
 * once it is the first (GATE, b->gated until batch_end() of the one before hands over). So
 * only one batch ever writes L2 or L1 chunks or refcount blocks at a time, and as LINKS
 * copies its chunks from memory after the batch before finished, the entries of both
 * batches in one chunk are merged.
 *
 * Failures: a part whose link (its L2 chunk, or the L1 chunk of its new table) was not
 * written fails, and is retryable: clusters reserved for it whose refcount reached the disk
 * become spares, the others free clusters (refcount 0), so a retry uses the same clusters
 * and nothing leaks. A failed decrement leaks its clusters until the next writable open.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2-alloc.h"

#include "block/qcow2.h"
#include "block/qcow2-cache.h"
#include "block/qcow2-chunk.h"
#include "block/qcow2-cow.h"
#include "block/qcow2-grow.h"
#include "common/log.h"
#include "common/util.h"
#include "common/vector.h"

#define BATCH_MAX 512
#define AHEAD_BYTES (8u << 20) /* reserved ahead when a batch takes clusters at next_free */
#define AHEAD_MAX 512          /* clusters: the most reserved ahead at once */
#define BOUNCE_KEEP (8u << 20) /* bytes: a larger bounce buffer is freed after its batch */

struct qcow2_batch;

/* The allocator's state (s->alloc). */
struct qcow2_alloc {
    struct qcow2_state *s;
    qcow2_part_queue queue;     /* parts waiting for a batch, in arrival order */
    struct qcow2_batch *batch;  /* the oldest batch in progress */
    struct qcow2_batch *batch2; /* the next one, started while batch links */
    void *bounce[2];            /* the batches' merged data writes (not zeroed), kept */
    size_t bounce_len[2];
    bool kicking;
    struct loop_deferred kick_call;  /* starts a batch once the parts queued meanwhile are in */
};

/* A host cluster reserved by the batch. */
struct resv {
    uint64_t cluster;
    bool inc;                /* needs an increment (not a spare, whose refcount is 1) */
    struct qcow2_chunk *rb;  /* the increment's chunk */
    bool linked;
    bool ahead;              /* reserved ahead for later batches, no part of this one */
    bool handed;             /* ahead: handed on to the reservation */
};

/* A new L2 table. */
struct newl2 {
    uint64_t l1_idx;
    uint64_t host;
    int32_t ri;
    uint64_t *table;
    struct qcow2_chunk *l1;
};

DEFINE_VECTOR_TYPE(resv_vector, struct resv)
DEFINE_VECTOR_TYPE(newl2_vector, struct newl2)

enum bstate {
    B_LOOKUP, B_ASSIGN, B_GROW, B_INCS, B_A, B_A_DONE, B_FLUSHED, B_GATE, B_LINKS, B_B,
    B_B_DONE, B_DECS, B_C, B_DISCARD, B_END,
};
enum { NEXT, WAIT };

struct qcow2_batch {
    struct qcow2_state *s;
    struct qcow2_alloc *a;
    enum bstate state;
    struct qcow2_part **p;
    size_t n;
    size_t i;                /* progress of a state that may wait for a table */
    unsigned pending;        /* I/O in flight, +1 while submitting */
    int err;                 /* the first failure of the phase */
    int load_err;            /* a table load failed */
    struct qcow2_waiter w;
    struct qcow2_chunkset links;   /* L1 and L2 chunks: B */
    struct qcow2_chunkset incs;    /* refcount increments: A */
    struct qcow2_chunkset decs;    /* refcount decrements: C */
    newl2_vector nl2;
    resv_vector resv;
    u64_vector dec;          /* clusters to decrement, repeated as many times */
    u64_vector freed;        /* clusters whose refcount reached 0 in C */
    struct block_req flush;
    struct block_req *discards;
    bool wrote;              /* A wrote refcounts or L2 tables, or uses spares: flush before B */
    char *bounce;            /* merged data writes of parts from different buffers */
    int slot;                /* which of a->bounce: the other batch's is the other one */
    bool gated;              /* waits to become the first batch (GATE, or ASSIGN) */
    bool early;              /* A writes data only, nothing after it but B */
    bool pipe;               /* nothing after B writes refcounts */
    bool open;               /* the next batch may run LOOKUP to A_DONE now */
    int fail;                /* before B: the error every part of the batch fails with */
};

static void batch_run(struct qcow2_batch *b);
static void kick(struct qcow2_alloc *a);

/* Before B: the batch fails, every part with err. */
static int fail(struct qcow2_batch *b, int err)
{
    b->fail = err;
    b->state = B_END;
    return NEXT;
}

static bool from_compressed(const struct qcow2_state *s, const struct qcow2_part *p)
{
    return qcow2_l2e_type(p->old_l2e, s->cluster_bits, s->version, NULL) == QCOW2_COMPRESSED;
}

/* ---- taking parts into a batch -------------------------------------------------------------- */

/* By guest cluster (one part per cluster goes in a batch: then by guest offset too), parts
 * of one cluster in arrival order (p->ri until LOOKUP). */
static int part_cmp(const void *a, const void *b)
{
    const struct qcow2_part *x = *(struct qcow2_part *const *)a;
    const struct qcow2_part *y = *(struct qcow2_part *const *)b;
    uint64_t cs = x->r->s->cluster_size;

    if (x->voff / cs != y->voff / cs)
        return x->voff / cs < y->voff / cs ? -1 : 1;
    return x->ri < y->ri ? -1 : x->ri > y->ri;
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
 * cluster of the batch still running (a->batch, linking): those wait for the next batch and
 * then find their cluster allocated. */
static struct qcow2_batch *batch_new(struct qcow2_alloc *a)
{
    struct qcow2_state *s = a->s;
    const struct qcow2_batch *prev = a->batch;
    struct qcow2_batch *b = xzalloc(sizeof(*b));
    qcow2_part_queue keep = {0}, failed = {0};
    struct qcow2_part *p;
    uint64_t cs = s->cluster_size;

    b->s = s;
    b->a = a;
    b->p = xmalloc(BATCH_MAX * sizeof(*b->p));
    while (!qcow2_part_queue_empty(&a->queue) && b->n < BATCH_MAX) {
        p = qcow2_part_queue_pop(&a->queue);
        if (p->r->err) {
            /* Its request failed already and will be retried whole (after a stop, by cont):
             * finish it now, so that the request fails before the stop, not after. */
            qcow2_part_queue_push_head(&failed, p);
            continue;
        }
        p->ri = (int32_t)b->n;  /* until LOOKUP: the queue's order, for part_cmp() */
        b->p[b->n++] = p;
    }
    /* Parts of one cluster in arrival order: the first goes in this batch, the others later,
     * so that overlapping writes land in the order they came. */
    qsort(b->p, b->n, sizeof(*b->p), part_cmp);
    size_t n = 0;
    for (size_t i = 0; i < b->n; i++) {
        p = b->p[i];
        if ((n && b->p[n - 1]->voff / cs == p->voff / cs) ||
            (prev && batch_has(s, prev, p->voff / cs))) {
            qcow2_part_queue_push(&keep, p);  /* the same cluster: next batch */
            continue;
        }
        b->p[n++] = p;
    }
    b->n = n;
    qcow2_part_queue_concat(&keep, &a->queue);
    a->queue = keep;
    while ((p = qcow2_part_queue_pop(&failed)))
        qcow2_part_done(p, 0);
    return b;
}

/* Drop part i from the batch (handed on or finished). */
static void batch_drop(struct qcow2_batch *b, size_t i)
{
    memmove(b->p + i, b->p + i + 1, (b->n - i - 1) * sizeof(*b->p));
    b->n--;
}

static int32_t reserve(struct qcow2_batch *b, uint64_t cluster, bool counted)
{
    resv_vector_append(&b->resv, (struct resv){.cluster = cluster, .inc = !counted});
    return (int32_t)(b->resv.len - 1);
}

static uint64_t part_entry(const struct qcow2_part *p)
{
    return htobe64(p->act == QCOW2_ACT_SET ? p->new_l2e : p->host | QCOW2_OFLAG_COPIED);
}

/* ---- I/O completions ---------------------------------------------------------------------- */

static void io_done(struct qcow2_batch *b, int ret)
{
    if (ret < 0 && !b->err)
        b->err = ret;
    if (--b->pending == 0)
        batch_run(b);
}

/* Submissions of a state: hold the batch (+1) until the state has submitted everything. */
static void io_begin(struct qcow2_batch *b, enum bstate next)
{
    b->pending = 1;
    b->state = next;
}

static int io_end(struct qcow2_batch *b)
{
    io_done(b, 0);
    return WAIT;
}

static void chunks_done(void *opaque, int ret)
{
    io_done(opaque, ret);
}

static void req_done(struct block_req *req, int ret)
{
    io_done(req->opaque, ret);
}

static void newl2_done(struct block_req *req, int ret)
{
    struct qcow2_batch *b = req->opaque;

    if (ret < 0)
        log_warn("qcow2 %s: new L2 table write at %" PRIu64 " failed: %s",
                 b->s->node->node_name, req->offset, strerror(-ret));
    free(req);
    io_done(b, ret);
}

static void data_written(struct qcow2_part *p, int ret)
{
    io_done(p->batch, ret);
}

static void flush_done(struct block_req *req, int ret)
{
    struct qcow2_batch *b = req->opaque;

    if (ret < 0)
        log_warn("qcow2 %s: flush failed: %s", b->s->node->node_name, strerror(-ret));
    io_done(b, ret);
}

/* A flush of the file, then next; NEXT at once if it takes none (cache.no-flush). */
static int submit_flush(struct qcow2_batch *b, enum bstate next)
{
    if (b->s->file->no_flush) {
        b->state = next;
        return NEXT;
    }
    io_begin(b, next);
    b->pending++;
    b->flush = (struct block_req){.op = BLOCK_OP_FLUSH, .done = flush_done, .opaque = b};
    node_submit(b->s->file, &b->flush);
    return io_end(b);
}

static void wait_cb(struct qcow2_waiter *w, int ret)
{
    struct qcow2_batch *b = container_of(w, struct qcow2_batch, w);

    if (ret < 0)
        b->load_err = ret;
    batch_run(b);
}

static void grow_done(void *opaque, int ret)
{
    struct qcow2_batch *b = opaque;

    if (ret < 0)
        fail(b, ret);
    else
        b->state = B_ASSIGN;
    batch_run(b);
}

/* ---- the states --------------------------------------------------------------------------- */

static int st_lookup(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;

    if (b->load_err)
        return fail(b, b->load_err);
    while (b->i < b->n) {
        struct qcow2_part *p = b->p[b->i];
        uint64_t l2e, host, l2_off;
        int ret = qcow2_lookup(s, p->voff, false, &b->w, &l2e);
        if (ret == 1)
            return WAIT;
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
        uint64_t l1_idx = p->voff >> (2 * s->cluster_bits - 3);
        qcow2_l2_table(s, l1_idx, false, &l2_off);  /* checked by the lookup */
        p->ri = p->li = -1;
        p->cow_buf = NULL;
        p->run_next = NULL;
        p->ret = 0;
        p->link = NULL;
        p->batch = b;
        p->fill_skip = false;
        if (l2_off && !(be64toh(s->l1[l1_idx]) & QCOW2_OFLAG_COPIED)) {
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
            for (j = 0; j < b->nl2.len && b->nl2.ptr[j].l1_idx != l1_idx; j++)
                ;
            if (j == b->nl2.len)
                newl2_vector_append(&b->nl2, (struct newl2){.l1_idx = l1_idx, .ri = -1});
            p->li = (int32_t)j;
        }
        b->i++;
    }
    b->state = b->n ? B_ASSIGN : B_END;
    return NEXT;
}

/* The clusters after the batch's, as far as refcount blocks exist, counted by the same
 * refcount writes, so that the next batches find them ready. */
static void reserve_ahead(struct qcow2_batch *b)
{
    uint64_t want = MIN(MAX(AHEAD_BYTES / b->s->cluster_size, 1), AHEAD_MAX), cl;

    for (uint64_t i = 0; i < want && qcow2_reserve_take_ahead(b->s, &cl); i++) {
        int32_t r = reserve(b, cl, false);  /* may move b->resv */
        b->resv.ptr[r].ahead = true;
    }
}

static int st_assign(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;
    uint64_t cs = s->cluster_size, from_end;
    size_t n = b->nl2.len;

    for (size_t i = 0; i < b->n; i++)
        n += b->p[i]->act == QCOW2_ACT_ALLOC;
    b->i = 0;
    b->state = B_INCS;
    if (n == 0)
        return NEXT;
    struct qcow2_taken *t = xmalloc(n * sizeof(*t));
    b->wrote = b->wrote || s->rsv.spare.len;  /* a spare's refcount may not be flushed yet */
    int ret = qcow2_reserve_take(s, n, t, &from_end);
    if (ret <= 0) {
        free(t);
        b->state = B_ASSIGN;
        if (ret < 0)
            return fail(b, ret);
        if (b != b->a->batch) {
            b->gated = true;  /* growth runs in the first batch only: batch_end() resumes */
            return WAIT;
        }
        b->state = B_GROW;
        ret = qcow2_grow_start(s, from_end, grow_done, b);
        return ret < 0 ? fail(b, ret) : WAIT;
    }
    size_t k = 0;
    for (size_t j = 0; j < b->nl2.len; j++, k++) {
        b->nl2.ptr[j].host = t[k].cluster * cs;
        b->nl2.ptr[j].ri = reserve(b, t[k].cluster, t[k].counted);
    }
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        if (p->act != QCOW2_ACT_ALLOC)
            continue;
        p->host = t[k].cluster * cs;
        p->fill_skip = t[k].fresh && p->host >= s->meta.hwm;
        p->ri = reserve(b, t[k].cluster, t[k].counted);
        k++;
    }
    free(t);
    if (from_end)
        reserve_ahead(b);  /* allocating at the end of the image */
    return NEXT;
}

static int st_grow(struct qcow2_batch *b)
{
    (void)b;
    return WAIT;  /* grow_done() moves on */
}

/* The refcount increments of the reserved clusters from b->i on. */
static int st_incs(struct qcow2_batch *b)
{
    if (b->load_err)
        return fail(b, b->load_err);
    while (b->i < b->resv.len) {
        struct resv *r = &b->resv.ptr[b->i];
        if (r->inc) {
            int err;
            struct qcow2_chunk *c = qcow2_chunk_refcount(b->s, &b->incs, r->cluster, +1, true,
                                                         &b->w, &err);
            if (err)
                return fail(b, err);
            if (!c)
                return WAIT;
            r->rb = c;
        }
        b->i++;
    }
    b->state = B_A;
    return NEXT;
}

/* The new L2 tables in memory, with their entries. */
static void build_tables(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;
    uint32_t l2_bits = s->cluster_bits - 3;

    for (size_t j = 0; j < b->nl2.len; j++)
        b->nl2.ptr[j].table = qcow2_alloc_buf(s->cluster_size);
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        uint64_t l2_idx = (p->voff >> s->cluster_bits) & ((1ULL << l2_bits) - 1);
        if (p->li >= 0)
            b->nl2.ptr[p->li].table[l2_idx] = part_entry(p);
    }
}

/* The data writes: a bounce buffer for whole clusters merged from different buffers. */
static void submit_data(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;
    struct qcow2_alloc *a = b->a;
    size_t whole = 0;
    uint64_t bounce_at = 0;

    for (size_t i = 0; i < b->n; i++)
        whole += qcow2_cow_whole_fresh(s, b->p[i]);
    if (whole > 1 && a->bounce_len[b->slot] < whole * s->cluster_size) {
        free(a->bounce[b->slot]);
        a->bounce_len[b->slot] = whole * s->cluster_size;
        if (posix_memalign(&a->bounce[b->slot], 4096, a->bounce_len[b->slot]) != 0)
            abort();
    }
    b->bounce = a->bounce[b->slot];
    for (size_t i = 0; i < b->n;) {
        struct qcow2_part *p = b->p[i];
        if (p->act == QCOW2_ACT_SET) {
            i++;
            continue;
        }
        size_t j = qcow2_data_run(s, b->p, b->n, i, b->bounce, &bounce_at);
        b->pending++;
        qcow2_data_write(s, p, data_written);
        i = j;
    }
}

static int st_a(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;

    build_tables(b);
    io_begin(b, B_A_DONE);
    /* Refcounts and new L2 tables must be on disk before anything links them; data only
     * written (the entry is written after the data write completed). */
    b->wrote = b->wrote || b->incs.v.len || b->nl2.len;
    b->pending += qcow2_chunks_write(s, &b->incs, chunks_done, b);
    for (size_t j = 0; j < b->nl2.len; j++) {
        if (qcow2_pre_write(s, b->nl2.ptr[j].host, s->cluster_size, false) < 0) {
            b->err = b->err ? b->err : -EIO;
            continue;
        }
        struct block_req *req = xzalloc(sizeof(*req));
        *req = (struct block_req){.op = BLOCK_OP_WRITE, .offset = b->nl2.ptr[j].host,
                                  .len = s->cluster_size, .buf = b->nl2.ptr[j].table,
                                  .done = newl2_done, .opaque = b};
        b->pending++;
        node_submit(s->file, req);
    }
    submit_data(b);
    if (b == b->a->batch && !b->wrote && !b->err) {
        /* Data writes only, no flush and nothing to free after B: the next batch may start
         * (b->pending holds b meanwhile). */
        b->early = true;
        for (size_t i = 0; i < b->n && b->early; i++)
            b->early = b->p[i]->act != QCOW2_ACT_SET && !from_compressed(s, b->p[i]);
        if (b->early) {
            b->open = true;
            kick(b->a);
        }
    }
    return io_end(b);
}

static int st_a_done(struct qcow2_batch *b)
{
    b->open = false;
    if (b->err)
        return fail(b, b->err);
    if (b->wrote)
        return submit_flush(b, B_FLUSHED);
    b->state = B_FLUSHED;
    return NEXT;
}

/* The clusters reserved ahead, whose refcounts are durable now: the next batches may take
 * them. */
static int st_flushed(struct qcow2_batch *b)
{
    if (b->err)
        return fail(b, b->err);
    for (size_t r = 0; r < b->resv.len; r++) {
        struct resv *v = &b->resv.ptr[r];
        if (v->ahead && v->rb && v->rb->ret == 0 && qcow2_reserve_ahead_add(b->s, v->cluster))
            v->handed = true;
    }
    b->state = B_GATE;
    return NEXT;
}

static int st_gate(struct qcow2_batch *b)
{
    if (b != b->a->batch) {
        b->gated = true;  /* batch_end() of the one before runs it on */
        return WAIT;
    }
    b->i = 0;
    b->state = B_LINKS;
    return NEXT;
}

/* The chunks B writes, copied now (the batch is the first: the one before it has finished,
 * so memory holds every entry written before) and patched with the batch's entries: L1
 * entries of the new L2 tables, L2 entries from part b->i on. */
static int st_links(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;
    uint32_t l2_bits = s->cluster_bits - 3, a = s->meta_align;

    if (b->load_err)
        return fail(b, b->load_err);
    if (b->i == 0) {
        b->pipe = b->nl2.len == 0;
        for (size_t j = 0; j < b->nl2.len; j++) {
            struct newl2 *t = &b->nl2.ptr[j];
            uint64_t e = htobe64(t->host | QCOW2_OFLAG_COPIED);
            t->l1 = qcow2_chunk_touch(&b->links, a, QCOW2_CHUNK_L1, 0, s->l1, qcow2_l1_bytes(s),
                                      s->l1_offset, t->l1_idx * 8);
            memcpy(t->l1->buf + (t->l1_idx * 8 - t->l1->pos), &e, 8);
        }
    }
    for (; b->i < b->n; b->i++) {
        struct qcow2_part *p = b->p[b->i];
        if (p->act == QCOW2_ACT_SET || from_compressed(s, p))
            b->pipe = false;  /* C frees clusters: refcount writes after B */
        if (p->li >= 0) {
            p->link = b->nl2.ptr[p->li].l1;
            continue;
        }
        uint64_t l1_idx = p->voff >> (s->cluster_bits + l2_bits), l2_off;
        uint64_t l2_idx = (p->voff >> s->cluster_bits) & ((1ULL << l2_bits) - 1);
        uint64_t e = part_entry(p);
        if (qcow2_l2_table(s, l1_idx, false, &l2_off) < 0 || !l2_off)
            return fail(b, -EIO);  /* the table LOOKUP found went away: cannot happen */
        p->link = qcow2_chunk_find(&b->links, l2_off + ((l2_idx * 8) & ~(uint64_t)(a - 1)));
        if (!p->link) {
            const void *table = qcow2_cache_get(s->l2_cache, l2_off, &b->w);
            if (!table)
                return WAIT;
            p->link = qcow2_chunk_touch(&b->links, a, QCOW2_CHUNK_L2, l2_off, table,
                                        s->cluster_size, l2_off, l2_idx * 8);
        }
        memcpy(p->link->buf + (l2_idx * 8 - p->link->pos), &e, 8);
    }
    b->state = B_B;
    return NEXT;
}

static int st_b(struct qcow2_batch *b)
{
    io_begin(b, B_B_DONE);
    b->pending += qcow2_chunks_write(b->s, &b->links, chunks_done, b);
    if (b->pipe) {
        b->open = true;
        kick(b->a);  /* the next batch: LOOKUP to A_DONE while this one links */
    }
    return io_end(b);
}

/* After B: which parts are linked, what to decrement. */
static int st_b_done(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;
    uint64_t cs = s->cluster_size;

    b->err = 0;  /* each part goes by its own link's result */
    for (size_t j = 0; j < b->nl2.len; j++) {
        if (b->nl2.ptr[j].l1->ret == 0) {
            b->resv.ptr[b->nl2.ptr[j].ri].linked = true;
            qcow2_meta_add(s, b->nl2.ptr[j].host / cs, QCOW2_META_L2);
            qcow2_cache_insert(s->l2_cache, b->nl2.ptr[j].host, b->nl2.ptr[j].table);
        }
    }
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        if (p->link->ret != 0) {
            p->ret = p->link->ret;
            continue;
        }
        if (p->ri >= 0)
            b->resv.ptr[p->ri].linked = true;
        enum qcow2_ctype t = qcow2_l2e_type(p->old_l2e, s->cluster_bits, s->version, NULL);
        uint64_t h = p->old_l2e & QCOW2_OFFSET_MASK;
        if (t == QCOW2_COMPRESSED) {
            struct qcow2_cdesc d;
            qcow2_cdesc_decode(p->old_l2e, s->cluster_bits, &d);
            for (uint64_t k = 0; k < d.n; k++)
                u64_vector_append(&b->dec, d.first + k);
        } else if (p->act == QCOW2_ACT_SET && h && !(p->new_l2e & QCOW2_OFFSET_MASK)) {
            u64_vector_append(&b->dec, h / cs);
        }
    }
    b->i = 0;
    if (!b->dec.len) {
        b->state = B_END;
        return NEXT;
    }
    return submit_flush(b, B_DECS);
}

/* The refcount decrements from b->i on. A failure here only leaks. */
static int st_decs(struct qcow2_batch *b)
{
    if (b->err || b->load_err) {
        log_warn("qcow2 %s: %s: clusters leaked until the next writable open",
                 b->s->node->node_name, b->err ? "flush failed before the refcount decrements"
                                              : "cannot load a refcount block");
        b->err = 0;
        b->state = B_END;
        return NEXT;
    }
    while (b->i < b->dec.len) {
        int err;
        struct qcow2_chunk *c = qcow2_chunk_refcount(b->s, &b->decs, b->dec.ptr[b->i], -1,
                                                     false, &b->w, &err);
        if (err) {
            log_warn("qcow2 %s: refcount decrement failed: clusters leaked",
                     b->s->node->node_name);
            b->state = B_END;
            return NEXT;
        }
        if (!c)
            return WAIT;
        b->i++;
    }
    b->state = B_C;
    return NEXT;
}

static int st_c(struct qcow2_batch *b)
{
    io_begin(b, B_DISCARD);
    b->pending += qcow2_chunks_write(b->s, &b->decs, chunks_done, b);
    return io_end(b);
}

/* Which decremented clusters reached 0 (their chunk written); discard them in the file. */
static int st_discard(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;
    uint64_t cs = s->cluster_size;
    uint32_t order = s->refcount_order;

    b->err = 0;  /* a failed decrement only leaks */
    for (size_t i = 0; i < b->dec.len; i++) {
        uint64_t cl = b->dec.ptr[i], block;
        uint64_t idx = cl & ((1ULL << s->rb_bits) - 1);
        uint64_t byte = qcow2_refcount_byte(order, idx);
        if (qcow2_refblock(s, cl >> s->rb_bits, &block) < 0 || !block)
            continue;
        struct qcow2_chunk *c = qcow2_chunk_find(&b->decs,
                                                 block + (byte & ~(uint64_t)(s->meta_align - 1)));
        if (!c || c->ret != 0 ||
            qcow2_refcount_get(order, c->buf, idx - ((uint64_t)c->pos * 8 >> order)) != 0)
            continue;
        bool dup = false;
        for (size_t k = 0; k < b->freed.len && !dup; k++)
            dup = b->freed.ptr[k] == cl;
        if (!dup)
            u64_vector_append(&b->freed, cl);
    }
    io_begin(b, B_END);
    b->discards = xzalloc((b->freed.len + 1) * sizeof(*b->discards));
    for (size_t i = 0; i < b->freed.len; i++) {
        b->discards[i] = (struct block_req){.op = BLOCK_OP_DISCARD,
                                            .offset = b->freed.ptr[i] * cs, .len = cs,
                                            .done = req_done, .opaque = b};
        b->pending++;
        node_submit(s->file, &b->discards[i]);
    }
    return io_end(b);
}

/* Finish: clusters back to the lists, parts completed, the next batch. */
static int st_end(struct qcow2_batch *b)
{
    struct qcow2_state *s = b->s;
    struct qcow2_alloc *a = b->a;
    struct qcow2_batch *next = NULL;

    for (size_t r = 0; r < b->resv.len; r++) {
        struct resv *v = &b->resv.ptr[r];
        if (v->linked || v->handed)
            continue;
        if (!v->inc || (v->rb && v->rb->ret == 0))
            qcow2_reserve_put_spare(s, v->cluster);  /* refcount 1, nothing links it */
        else
            qcow2_reserve_put_free(s, v->cluster, 1);   /* refcount 0 */
    }
    for (size_t i = 0; i < b->freed.len; i++)
        qcow2_reserve_put_freed(s, b->freed.ptr[i]);
    for (size_t j = 0; j < b->nl2.len; j++)
        free(b->nl2.ptr[j].table);
    newl2_vector_reset(&b->nl2);
    resv_vector_reset(&b->resv);
    qcow2_chunkset_free(&b->links);
    qcow2_chunkset_free(&b->incs);
    qcow2_chunkset_free(&b->decs);
    u64_vector_reset(&b->dec);
    u64_vector_reset(&b->freed);
    free(b->discards);
    if (b == a->batch) {
        a->batch = next = a->batch2;  /* it may link now */
        a->batch2 = NULL;
    } else {
        a->batch2 = NULL;
    }
    if (a->bounce_len[b->slot] > BOUNCE_KEEP) {
        free(a->bounce[b->slot]);
        a->bounce[b->slot] = NULL;
        a->bounce_len[b->slot] = 0;
    }
    for (size_t i = 0; i < b->n; i++) {
        struct qcow2_part *p = b->p[i];
        int ret = b->fail ? b->fail : p->ret;
        free(p->cow_buf);
        p->cow_buf = NULL;
        free(p->run_iov);
        p->run_iov = NULL;
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
    kick(a);
    return WAIT;  /* b is gone */
}

static const struct {
    const char *name;
    int (*run)(struct qcow2_batch *b);
} batch_states[] = {
    [B_LOOKUP] = {"LOOKUP", st_lookup},
    [B_ASSIGN] = {"ASSIGN", st_assign},
    [B_GROW] = {"GROW", st_grow},
    [B_INCS] = {"INCS", st_incs},
    [B_A] = {"A", st_a},
    [B_A_DONE] = {"A_DONE", st_a_done},
    [B_FLUSHED] = {"FLUSHED", st_flushed},
    [B_GATE] = {"GATE", st_gate},
    [B_LINKS] = {"LINKS", st_links},
    [B_B] = {"B", st_b},
    [B_B_DONE] = {"B_DONE", st_b_done},
    [B_DECS] = {"DECS", st_decs},
    [B_C] = {"C", st_c},
    [B_DISCARD] = {"DISCARD", st_discard},
    [B_END] = {"END", st_end},
};

static void batch_run(struct qcow2_batch *b)
{
    while (batch_states[b->state].run(b) == NEXT)
        ;
}

/* ---- starting batches ------------------------------------------------------------------------ */

/* Where a new batch may go: the first if none runs, the second if the first is open to one
 * (it links, or writes data only, and nothing after writes refcounts), else NULL. */
static struct qcow2_batch **batch_slot(struct qcow2_alloc *a)
{
    if (!a->batch)
        return &a->batch;
    if (!a->batch2 && a->batch->open)
        return &a->batch2;
    return NULL;
}

static void kick(struct qcow2_alloc *a)
{
    struct qcow2_batch **slot;

    if (a->kicking)
        return;
    a->kicking = true;
    while (!qcow2_part_queue_empty(&a->queue) && (slot = batch_slot(a))) {
        struct qcow2_batch *b = batch_new(a);
        if (b->n == 0) {
            free(b->p);
            free(b);
            if (slot == &a->batch2)
                break;  /* every queued part waits for the first batch's */
            continue;
        }
        b->w.cb = wait_cb;
        b->slot = slot == &a->batch2 ? !a->batch->slot : 0;
        *slot = b;
        batch_run(b);
    }
    a->kicking = false;
}

static void kick_deferred(struct loop *loop, void *opaque)
{
    kick(opaque);
}

/* The batch starts from the loop, not at once: the other parts that arrive in this turn of
 * the loop (a request's clusters, other requests) join it. */
void qcow2_alloc_enqueue(struct qcow2_state *s, struct qcow2_part *p)
{
    struct qcow2_alloc *a = s->alloc;

    qcow2_part_queue_push(&a->queue, p);
    if (!loop_deferred_queued(&a->kick_call) && batch_slot(a))
        loop_defer(s->node->graph->loop, &a->kick_call);
}

struct qcow2_alloc *qcow2_alloc_new(struct qcow2_state *s)
{
    struct qcow2_alloc *a = xzalloc(sizeof(*a));

    a->s = s;
    a->kick_call = LOOP_DEFERRED_INIT(kick_deferred, a);
    return a;
}

bool qcow2_alloc_idle(const struct qcow2_state *s)
{
    const struct qcow2_alloc *a = s->alloc;

    return !a->batch && !a->batch2 && qcow2_part_queue_empty(&a->queue);
}

void qcow2_alloc_close(struct qcow2_state *s)
{
    if (!s || !s->alloc || s->meta.corrupt || s->alloc->batch || s->alloc->batch2)
        return;
    qcow2_reserve_close(s);
}

void qcow2_alloc_free(struct qcow2_state *s)
{
    struct qcow2_alloc *a = s->alloc;

    if (!a)
        return;
    if (loop_deferred_queued(&a->kick_call))  /* then s->node is set */
        loop_cancel_deferred(s->node->graph->loop, &a->kick_call);
    for (int i = 0; i < 2; i++)
        free(a->bounce[i]);
    free(a);
    s->alloc = NULL;
}
