/* qcow2 refcount structure growth, a state machine. See qcow2-grow.h.
 *
 * The machine: grow_states[] lists the states in order, each with the code that runs in it.
 * A state either moves on (it sets g->state and returns NEXT) or waits (WAIT) for the one
 * write, flush or refcount block load in flight; the completion runs the machine again, in
 * the state that was set before waiting. Errors go to G_FAIL, whose code decides what the
 * clusters reserved so far become.
 *
 *   WRITE        the new blocks and table, whole       -> WRITTEN
 *   WRITTEN                                             -> INC
 *   INC          the next new cluster an old block counts: increment it (load the block
 *                first if need be), else                -> FLUSH1
 *   INC_DONE                                            -> INC
 *   FLUSH1                                              -> LINK
 *   LINK         the header (a new table) or the next table entry, else -> LINKED
 *   LINK_DONE                                           -> LINK
 *   LINKED       memory follows the new structures      -> FLUSH2 (an old table) or END
 *   FLUSH2                                              -> FREE (failed: the old
 *                table leaks, done(-errno))
 *   FREE         decrement the next cluster of the old table, else -> END
 *   FREE_DONE                                           -> FREE
 *   END          done(0)
 *   FAIL         done(-errno): before the link, the clusters become spare or free
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2-grow.h"

#include "block/qcow2.h"
#include "block/qcow2-cache.h"
#include "common/log.h"
#include "common/util.h"

#define MAX_TABLE_BYTES (8u << 20)  /* as the refcount table's limit at open */

enum gstate {
    G_WRITE, G_WRITTEN, G_INC, G_INC_DONE, G_FLUSH1, G_LINK, G_LINK_DONE, G_LINKED, G_FLUSH2,
    G_FREE, G_FREE_DONE, G_END, G_FAIL,
};
enum { NEXT, WAIT };

/* Where the write in flight goes in memory once it succeeded. */
enum patch { PATCH_NONE, PATCH_HEADER, PATCH_TABLE, PATCH_BLOCK };

struct qcow2_grow {
    struct qcow2_state *s;
    enum gstate state;
    int ret;                 /* the last write's, flush's or load's result */
    struct block_req req;
    struct qcow2_waiter w;
    void *iobuf;
    enum patch patch;
    uint64_t patch_table;    /* PATCH_BLOCK: the block's offset */
    uint32_t patch_pos, patch_len;
    uint64_t c, k, m;        /* new table (k clusters) then blocks (m) at [c, c + k + m) */
    uint64_t *new_blocks;    /* their block indices, m of them */
    void *cover_buf;         /* (k + m) clusters: table then blocks */
    uint64_t old_rt_offset, old_rt_clusters;
    u64_vector ops;          /* increments (INC) or decrements (FREE) to make */
    size_t iop, link_i;
    bool committed;          /* something reached the disk: skip these clusters on failure */
    const char *what;        /* the write or flush in flight, for messages */
    void (*done)(void *opaque, int ret);
    void *opaque;
};

static void grow_run(struct qcow2_grow *g);
static void finish(struct qcow2_grow *g, int ret);

static void io_done(struct block_req *req, int ret)
{
    struct qcow2_grow *g = req->opaque;

    g->ret = ret;
    grow_run(g);
}

static void load_done(struct qcow2_waiter *w, int ret)
{
    struct qcow2_grow *g = container_of(w, struct qcow2_grow, w);

    g->ret = ret;
    grow_run(g);
}

static int submit(struct qcow2_grow *g, enum block_op op, uint64_t off, void *buf, size_t len,
                  const char *what, enum gstate next)
{
    g->what = what;
    g->req = (struct block_req){.op = op, .offset = off, .len = len, .buf = buf,
                                .done = io_done, .opaque = g};
    if (op == BLOCK_OP_WRITE)
        qcow2_pre_write(g->s, off, len, true);
    g->state = next;
    node_submit(g->s->file, &g->req);
    return WAIT;
}

/* A flush, unless the child does not want them (cache.no-flush). */
static int flush(struct qcow2_grow *g, enum gstate next)
{
    if (g->s->file->no_flush) {
        g->ret = 0;
        g->state = next;
        return NEXT;
    }
    return submit(g, BLOCK_OP_FLUSH, 0, NULL, 0, "flush", next);
}

/* Write the meta_align chunk(s) of image (image_len bytes in memory at disk offset base)
 * holding [pos, pos+len) with data there; memory follows in commit(). */
static int write_patch(struct qcow2_grow *g, enum patch kind, uint64_t table, const void *image,
                       size_t image_len, uint64_t base, uint32_t pos, const void *data,
                       uint32_t len, const char *what, enum gstate next)
{
    uint32_t a = g->s->meta_align;
    uint32_t start = pos & ~(a - 1);
    uint32_t end = (uint32_t)MIN(((uint64_t)pos + len + a - 1) & ~(uint64_t)(a - 1), image_len);
    char *buf = qcow2_alloc_buf(end - start);

    memcpy(buf, (const char *)image + start, end - start);
    memcpy(buf + (pos - start), data, len);
    g->patch = kind;
    g->patch_table = table;
    g->patch_pos = start;
    g->patch_len = end - start;
    free(g->iobuf);
    g->iobuf = buf;
    return submit(g, BLOCK_OP_WRITE, base + start, buf, end - start, what, next);
}

/* The patch written: memory follows. */
static void commit(struct qcow2_grow *g)
{
    struct qcow2_state *s = g->s;

    switch (g->patch) {
    case PATCH_HEADER:
        memcpy((char *)s->header + g->patch_pos, g->iobuf, g->patch_len);
        break;
    case PATCH_TABLE:
        memcpy((char *)s->rt + g->patch_pos, g->iobuf, g->patch_len);
        break;
    case PATCH_BLOCK:
        qcow2_cache_patch(s->rb_cache, g->patch_table, g->patch_pos, g->iobuf, g->patch_len);
        break;
    case PATCH_NONE:
        break;
    }
    g->patch = PATCH_NONE;
}

/* Change the refcount of cluster ops[iop] by delta: a write under way (WAIT, then next), a
 * block loading (WAIT, then this state again), or an error (g->ret, NEXT to FAIL). */
static int refcount_step(struct qcow2_grow *g, int delta, enum gstate again, enum gstate next)
{
    struct qcow2_state *s = g->s;
    uint64_t cl = g->ops.ptr[g->iop], block, idx = cl & ((1ULL << s->rb_bits) - 1);
    uint32_t pos, len, order = s->refcount_order;
    uint8_t bytes[8];

    if (qcow2_refblock(s, cl >> s->rb_bits, &block) < 0 || !block) {
        g->ret = -EIO;
        g->state = G_FAIL;
        return NEXT;
    }
    g->state = again;
    g->what = "refcount block load";
    const void *table = qcow2_cache_get(s->rb_cache, block, &g->w);
    if (!table)
        return WAIT;
    uint64_t old = qcow2_refcount_get(order, table, idx);
    if ((delta > 0 && old != 0) || (delta < 0 && old == 0)) {
        qcow2_signal_corruption(s, -1, -1, "Refcount of cluster %#" PRIx64 " is %" PRIu64
                                ": cannot %s it for the refcount structures (refblock offset: "
                                "%#" PRIx64 ")", cl << s->cluster_bits, old,
                                delta > 0 ? "increment" : "decrement", block);
        g->ret = -EIO;
        g->state = G_FAIL;
        return NEXT;
    }
    qcow2_refcount_encode(order, table, idx, delta > 0 ? old + 1 : old - 1, &pos, &len, bytes);
    return write_patch(g, PATCH_BLOCK, block, table, s->cluster_size, block, pos, bytes, len,
                       "refcount block write", next);
}

/* ---- the states ---------------------------------------------------------------------------- */

static int st_write(struct qcow2_grow *g)
{
    uint64_t cs = g->s->cluster_size;

    return submit(g, BLOCK_OP_WRITE, g->c * cs, g->cover_buf, (g->k + g->m) * cs,
                  "new refcount blocks write", G_WRITTEN);
}

static int st_written(struct qcow2_grow *g)
{
    g->state = g->ret < 0 ? G_FAIL : G_INC;
    g->iop = 0;
    return NEXT;
}

static int st_inc(struct qcow2_grow *g)
{
    if (g->ret < 0) {         /* a block failed to load */
        g->state = G_FAIL;
        return NEXT;
    }
    if (g->iop == g->ops.len) {
        g->state = G_FLUSH1;
        return NEXT;
    }
    return refcount_step(g, +1, G_INC, G_INC_DONE);
}

static int st_inc_done(struct qcow2_grow *g)
{
    if (g->ret < 0) {
        g->state = G_FAIL;
        return NEXT;
    }
    commit(g);
    g->committed = true;
    g->iop++;
    g->state = G_INC;
    return NEXT;
}

static int st_flush1(struct qcow2_grow *g)
{
    g->link_i = 0;
    if (g->ret < 0) {
        g->state = G_FAIL;
        return NEXT;
    }
    return flush(g, G_LINK);
}

static int st_link(struct qcow2_grow *g)
{
    struct qcow2_state *s = g->s;
    uint64_t cs = s->cluster_size;

    if (g->ret < 0) {
        g->state = G_FAIL;
        return NEXT;
    }
    if (g->k && g->link_i == 0) {
        /* A new table: the header points at it (offset, clusters), in one write. */
        uint8_t hdr[12];
        qcow2_put_be64(hdr, g->c * cs);
        qcow2_put_be32(hdr + 8, (uint32_t)g->k);
        return write_patch(g, PATCH_HEADER, 0, s->header, s->meta_align, 0, 48, hdr, 12,
                           "header link write", G_LINK_DONE);
    }
    if (!g->k && g->link_i < g->m) {
        uint64_t e = htobe64((g->c + g->link_i) * cs);
        return write_patch(g, PATCH_TABLE, 0, s->rt, (size_t)s->rt_clusters * cs, s->rt_offset,
                           (uint32_t)(g->new_blocks[g->link_i] * 8), &e, 8,
                           "refcount table link write", G_LINK_DONE);
    }
    g->state = G_LINKED;
    return NEXT;
}

static int st_link_done(struct qcow2_grow *g)
{
    if (g->ret < 0) {
        g->state = G_FAIL;
        return NEXT;
    }
    commit(g);
    g->committed = true;
    g->link_i++;
    g->state = G_LINK;
    return NEXT;
}

/* The new structures are linked: memory follows, the old table's clusters are to free. */
static int st_linked(struct qcow2_grow *g)
{
    struct qcow2_state *s = g->s;
    uint64_t cs = s->cluster_size;

    if (g->k) {
        free(s->rt);
        s->rt = qcow2_alloc_buf(g->k * cs);
        memcpy(s->rt, g->cover_buf, g->k * cs);
        s->rt_offset = g->c * cs;
        s->rt_clusters = (uint32_t)g->k;
        s->rt_entries = g->k * cs / 8;
    }
    for (uint64_t j = 0; j < g->m; j++) {
        qcow2_meta_add(s, g->c + g->k + j, QCOW2_META_RB);
        qcow2_cache_insert(s->rb_cache, (g->c + g->k + j) * cs,
                           (char *)g->cover_buf + (g->k + j) * cs);
    }
    qcow2_reserve_skip_to(s, g->c + g->k + g->m);
    g->ops.len = 0;
    if (g->k) {
        for (uint64_t i = 0; i < g->old_rt_clusters; i++)
            u64_vector_append(&g->ops, g->old_rt_offset / cs + i);
    }
    g->iop = 0;
    g->committed = false;  /* linked: nothing to undo any more */
    if (!g->ops.len) {
        g->state = G_END;
        return NEXT;
    }
    return flush(g, G_FLUSH2);
}

static int st_flush2(struct qcow2_grow *g)
{
    if (g->ret < 0) {
        /* The link may not be durable: the header may still name the old table, which must
         * be neither freed nor reused. It leaks until the next writable open. */
        log_warn("qcow2 %s: flush after linking the new refcount table failed (%s); the old "
                 "table's %zu clusters leak", g->s->node->node_name, strerror(-g->ret),
                 g->ops.len);
        finish(g, g->ret);
        return WAIT;  /* g is gone */
    }
    g->state = G_FREE;
    return NEXT;
}

static int st_free(struct qcow2_grow *g)
{
    if (g->ret < 0) {         /* a block failed to load: only leaks the old table's cluster */
        g->ret = 0;
        g->iop++;
    }
    if (g->iop == g->ops.len) {
        g->state = G_END;
        return NEXT;
    }
    int r = refcount_step(g, -1, G_FREE, G_FREE_DONE);
    if (g->state == G_FAIL) {  /* as a failed load */
        g->state = G_FREE;
        g->iop++;
        g->ret = 0;
        return NEXT;
    }
    return r;
}

static int st_free_done(struct qcow2_grow *g)
{
    if (g->ret < 0) {
        log_warn("qcow2 %s: freeing the old refcount table failed (%s): its clusters stay "
                 "counted, as spares", g->s->node->node_name, strerror(-g->ret));
        for (size_t i = g->iop; i < g->ops.len; i++)
            qcow2_reserve_put_spare(g->s, g->ops.ptr[i]);
        g->iop = g->ops.len;
        g->ret = 0;
        g->patch = PATCH_NONE;
    } else {
        commit(g);
        g->iop++;
    }
    g->state = G_FREE;
    return NEXT;
}

static void finish(struct qcow2_grow *g, int ret)
{
    void (*done)(void *, int) = g->done;
    void *opaque = g->opaque;

    free(g->iobuf);
    free(g->new_blocks);
    free(g->cover_buf);
    u64_vector_reset(&g->ops);
    free(g);
    done(opaque, ret);
}

static int st_end(struct qcow2_grow *g)
{
    finish(g, 0);
    return WAIT;  /* g is gone */
}

/* Failed before or during the link. Not linked: the new clusters an old block counts
 * already are spares, the others free (refcount 0); linked in part: the new blocks a table
 * entry links count themselves, and leak until the next writable open. */
static int st_fail(struct qcow2_grow *g)
{
    struct qcow2_state *s = g->s;
    int ret = g->ret < 0 ? g->ret : -EIO;

    if (g->what && g->ret < 0)
        log_warn("qcow2 %s: refcount structure growth: %s failed: %s", s->node->node_name,
                 g->what, strerror(-ret));
    else
        log_warn("qcow2 %s: refcount structure growth failed: %s", s->node->node_name,
                 strerror(-ret));
    if (g->committed) {
        qcow2_reserve_skip_to(s, g->c + g->k + g->m);
        if (g->link_i == 0) {
            for (size_t i = 0; i < g->ops.len; i++) {
                if (i < g->iop)
                    qcow2_reserve_put_spare(s, g->ops.ptr[i]);
                else
                    qcow2_reserve_put_free(s, g->ops.ptr[i], 1);
            }
        } else {
            log_warn("qcow2 %s: up to %" PRIu64 " clusters leaked until the next writable open",
                     s->node->node_name, g->k + g->m);
        }
    }
    finish(g, ret);
    return WAIT;
}

static const struct {
    const char *name;
    int (*run)(struct qcow2_grow *g);
} grow_states[] = {
    [G_WRITE] = {"WRITE", st_write},
    [G_WRITTEN] = {"WRITTEN", st_written},
    [G_INC] = {"INC", st_inc},
    [G_INC_DONE] = {"INC_DONE", st_inc_done},
    [G_FLUSH1] = {"FLUSH1", st_flush1},
    [G_LINK] = {"LINK", st_link},
    [G_LINK_DONE] = {"LINK_DONE", st_link_done},
    [G_LINKED] = {"LINKED", st_linked},
    [G_FLUSH2] = {"FLUSH2", st_flush2},
    [G_FREE] = {"FREE", st_free},
    [G_FREE_DONE] = {"FREE_DONE", st_free_done},
    [G_END] = {"END", st_end},
    [G_FAIL] = {"FAIL", st_fail},
};

static void grow_run(struct qcow2_grow *g)
{
    while (grow_states[g->state].run(g) == NEXT)
        ;
}

/* ---- planning -------------------------------------------------------------------------------- */

int qcow2_grow_start(struct qcow2_state *s, uint64_t n, void (*done)(void *opaque, int ret),
                     void *opaque)
{
    uint64_t cs = s->cluster_size, c = s->rsv.next_free, k = 0, m = 0;
    uint64_t max_k = MAX_TABLE_BYTES / cs;
    struct qcow2_grow *g;

    /* New blocks must cover themselves and a new table too: grow k and m together until
     * they stop changing. */
    for (;;) {
        uint64_t last_b = (c + k + m + n - 1) >> s->rb_bits, nk = 0, nm = 0;
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
            nm += !qcow2_rt_entry(s, bl);
        if (nk == k && nm == m)
            break;
        k = nk;
        m = nm;
    }
    g = xzalloc(sizeof(*g));
    g->s = s;
    g->done = done;
    g->opaque = opaque;
    g->w.cb = load_done;
    g->c = c;
    g->k = k;
    g->m = m;
    g->new_blocks = xmalloc(MAX(m, 1) * sizeof(*g->new_blocks));
    uint64_t j = 0, last_b = (c + k + m + n - 1) >> s->rb_bits;
    for (uint64_t bl = c >> s->rb_bits; bl <= last_b; bl++) {
        if (!qcow2_rt_entry(s, bl))
            g->new_blocks[j++] = bl;
    }
    g->cover_buf = qcow2_alloc_buf((k + m) * cs);
    uint64_t *table = g->cover_buf;
    if (k) {
        memcpy(table, s->rt, s->rt_entries * 8);
        for (j = 0; j < m; j++)
            table[g->new_blocks[j]] = htobe64((c + k + j) * cs);
    }
    /* Each new cluster is counted by a new block (set here) or by an old one (INC). */
    for (uint64_t cl = c; cl < c + k + m; cl++) {
        uint64_t bl = cl >> s->rb_bits;
        for (j = 0; j < m && g->new_blocks[j] != bl; j++)
            ;
        if (j < m)
            qcow2_refcount_set(s->refcount_order, (char *)g->cover_buf + (k + j) * cs,
                               cl & ((1ULL << s->rb_bits) - 1), 1);
        else
            u64_vector_append(&g->ops, cl);
    }
    g->old_rt_offset = s->rt_offset;
    g->old_rt_clusters = s->rt_clusters;
    g->state = G_WRITE;
    grow_run(g);
    return 0;
}
