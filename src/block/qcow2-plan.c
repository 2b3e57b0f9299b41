/* qcow2 write planning: what a write, write-zeroes or discard part needs, given its L2 entry.
 * See qcow2-alloc.h (qcow2_plan()). Calls qcow2-meta.h only.
 */
#include <errno.h>
#include <inttypes.h>

#include "block/qcow2-alloc.h"

#include "block/qcow2.h"
#include "common/log.h"

/* The entry a discarded cluster gets: unallocated, or with a backing file on v3 the zero flag,
 * so that the backing's old data does not show through (QEMU does the same; on v2 it may). */
static uint64_t discarded_entry(const struct qcow2_state *s)
{
    return s->node->backing && s->version >= 3 ? QCOW2_OFLAG_ZERO : 0;
}

/* A write-zeroes or discard: what the entry becomes. */
static int plan_zero(struct qcow2_state *s, struct qcow2_part *p, enum qcow2_ctype t,
                     uint64_t h)
{
    struct block_req *parent = p->r->parent;
    bool whole = p->len == s->cluster_size;

    if (parent->op == BLOCK_OP_DISCARD) {
        /* As QEMU: partial clusters are not discarded; an unallocated one only needs the
         * zero flag when a backing file would show through (v3). */
        if (!whole || t == QCOW2_ZERO_PLAIN ||
            (t == QCOW2_UNALLOCATED && discarded_entry(s) == 0))
            return QCOW2_PLAN_DONE;
        p->new_l2e = discarded_entry(s);
        p->act = QCOW2_ACT_SET;
        return QCOW2_PLAN_META;
    }
    if ((t == QCOW2_COMPRESSED || (t == QCOW2_UNALLOCATED && s->node->backing)) &&
        (!whole || s->version < 3)) {
        /* A new cluster with zeroes written over what copy-on-write brings (the rest of a
         * compressed cluster, or the backing's bytes, which must not show through). */
        if (!p->zbuf)
            p->zbuf = qcow2_alloc_buf(p->len);
        p->iov[0] = (struct iovec){p->zbuf, p->len};
        p->niov = 1;
        p->act = QCOW2_ACT_ALLOC;
        return QCOW2_PLAN_META;
    }
    if (t == QCOW2_NORMAL && (!whole || s->version < 3))
        return QCOW2_PLAN_HOST;  /* zeroes in place */
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
}

int qcow2_plan(struct qcow2_state *s, struct qcow2_part *p, uint64_t l2e, uint64_t *host)
{
    enum qcow2_ctype t = qcow2_l2e_type(l2e, s->cluster_bits, s->version, NULL);
    uint64_t h = l2e & QCOW2_OFFSET_MASK;
    int plan;

    *host = h;
    p->old_l2e = l2e;
    if ((t == QCOW2_NORMAL || t == QCOW2_ZERO_ALLOC) && !(l2e & QCOW2_OFLAG_COPIED)) {
        /* Shared with a snapshot (or a refcount that check must repair): COW needed. */
        log_error("qcow2 %s: cluster at %" PRIu64 " is shared; cannot change it in place",
                  s->node->node_name, h);
        return -EIO;
    }
    switch (p->r->parent->op) {
    case BLOCK_OP_WRITE:
        if (t == QCOW2_NORMAL) {
            plan = QCOW2_PLAN_HOST;
        } else {
            p->act = t == QCOW2_ZERO_ALLOC ? QCOW2_ACT_REWRITE : QCOW2_ACT_ALLOC;
            plan = QCOW2_PLAN_META;
        }
        break;
    case BLOCK_OP_WRITE_ZEROES:
    case BLOCK_OP_DISCARD:
        plan = plan_zero(s, p, t, h);
        break;
    default:
        return -EINVAL;
    }
    /* Before anything is written: the clusters changed in place, or unlinked and freed. */
    if (plan == QCOW2_PLAN_HOST || (plan == QCOW2_PLAN_META && p->act == QCOW2_ACT_REWRITE))
        return qcow2_check_use(s, p->voff, l2e, QCOW2_USE_WRITE) < 0 ? -EIO : plan;
    if (plan == QCOW2_PLAN_META &&
        ((p->act == QCOW2_ACT_SET && h && !(p->new_l2e & QCOW2_OFFSET_MASK)) ||
         t == QCOW2_COMPRESSED))
        return qcow2_check_use(s, p->voff, l2e, QCOW2_USE_FREE) < 0 ? -EIO : plan;
    return plan;
}

