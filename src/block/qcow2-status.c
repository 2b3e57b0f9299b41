/* qcow2 block status: runs of L2 entries of one kind, as QEMU's qcow2_co_block_status().
 * See qcow2-status.h.
 */
#include <inttypes.h>
#include <stdlib.h>

#include "block/qcow2-status.h"

#include "block/qcow2.h"
#include "block/sync-io.h"
#include "common/util.h"

/* ---- metadata preallocation ------------------------------------------------------------- */

/* Bytes the image's file takes on the host (its actual-size), or -1 if unknown. */
static int64_t host_allocation(struct block_node *n)
{
    while (!n->drv->allocated && n->file)
        n = n->file;
    return n->drv->allocated ? n->drv->allocated(n) : -1;
}

/* Clusters of the first end ones with a refcount, counting stops past limit. Blocks. */
static int count_used(struct qcow2_state *s, uint64_t end, uint64_t limit, uint64_t *count,
                      struct error **errp)
{
    uint64_t per_block = 1ull << s->rb_bits;
    _cleanup_free_ uint8_t *block = qcow2_alloc_buf(s->cluster_size);

    *count = 0;
    for (uint64_t b = 0; b * per_block < end && *count <= limit; b++) {
        uint64_t off = qcow2_rt_entry(s, b) & ~(uint64_t)(s->cluster_size - 1);
        if (!off)
            continue;
        if (node_pread_sync(s->file, block, s->cluster_size, off, errp) < 0)
            return -1;
        for (uint64_t i = 0; i < per_block && b * per_block + i < end; i++)
            *count += qcow2_refcount_get(s->refcount_order, block, i) != 0;
    }
    return 0;
}

int qcow2_detect_prealloc(struct qcow2_state *s, struct error **errp)
{
    int64_t real = host_allocation(s->file);
    uint64_t end = (s->file->size + s->cluster_size - 1) >> s->cluster_bits;
    uint64_t used, real_clusters, threshold;

    s->meta_prealloc = false;
    if (real < 0)
        return 0;
    real_clusters = (uint64_t)real >> s->cluster_bits;
    threshold = MAX(real_clusters * 10 / 9, real_clusters + 2);
    /* Most files hold what they are long: then no refcount needs reading. */
    if (end <= threshold)
        return 0;
    if (count_used(s, end, threshold, &used, errp) < 0)
        return -1;
    s->meta_prealloc = used > threshold;
    return 0;
}

/* ---- status -------------------------------------------------------------------------------- */

struct status_wait {
    struct qcow2_waiter w;
    struct block_status *st;
};

static void table_loaded(struct qcow2_waiter *w, int ret)
{
    struct status_wait *sw = container_of(w, struct status_wait, w);
    struct block_status *st = sw->st;

    free(sw);
    block_status_resume(st, ret);
}

/* What a run of entries like l2e says (graph.h's flags). An unallocated one says nothing:
 * the graph asks the backing node. */
static unsigned entry_flags(const struct qcow2_state *s, uint64_t l2e)
{
    switch (qcow2_l2e_type(l2e, s->cluster_bits, s->version, NULL)) {
    case QCOW2_ZERO_PLAIN:
    case QCOW2_ZERO_ALLOC:
        return BLOCK_STATUS_ZERO;
    case QCOW2_NORMAL:
        /* Preallocated clusters may be holes in the file: ask it, as QEMU does. */
        return s->meta_prealloc ? BLOCK_STATUS_DATA | BLOCK_STATUS_OFFSET_VALID |
                                  BLOCK_STATUS_RECURSE : BLOCK_STATUS_DATA;
    case QCOW2_COMPRESSED:
        return BLOCK_STATUS_DATA;
    default:
        return 0;
    }
}

/* The end of the run of entries from voff (whose entry is first) to at most end: same flags,
 * and for a mapped run, host clusters one after another. An entry that fails its check ends
 * the run; the next query fails on it. */
static uint64_t run_end(struct qcow2_state *s, uint64_t voff, uint64_t first, uint64_t end,
                        struct qcow2_waiter *w)
{
    uint64_t cs = s->cluster_size, start = voff & ~(cs - 1), l2e;
    unsigned flags = entry_flags(s, first);

    for (uint64_t off = start + cs; off < end; off += cs) {
        /* The table is in the cache now: no wait. */
        if (qcow2_lookup(s, off, true, w, &l2e) != 0 || entry_flags(s, l2e) != flags)
            return off;
        if ((flags & BLOCK_STATUS_OFFSET_VALID) &&
            (l2e & QCOW2_OFFSET_MASK) != (first & QCOW2_OFFSET_MASK) + (off - start))
            return off;
    }
    return end;
}

int qcow2_block_status(struct block_node *n, struct block_status_call *c)
{
    struct qcow2_state *s = n->opaque;
    uint64_t span = (uint64_t)s->cluster_size << (s->cluster_bits - 3);  /* one L2 table's */
    uint64_t end = MIN(c->offset + c->len, (c->offset / span + 1) * span);
    struct status_wait *sw = xmalloc(sizeof(*sw));
    uint64_t l2e;
    int ret;

    sw->w.cb = table_loaded;
    sw->st = c->st;
    ret = qcow2_lookup(s, c->offset, true, &sw->w, &l2e);
    if (ret == 1)
        return 1;  /* sw is the cache's until table_loaded() */
    if (ret == 0) {
        c->flags = entry_flags(s, l2e);
        c->pnum = run_end(s, c->offset, l2e, end, &sw->w) - c->offset;
        c->map = (l2e & QCOW2_OFFSET_MASK) + (c->offset & (s->cluster_size - 1));
        c->file = s->file;
    }
    free(sw);
    return ret;
}
