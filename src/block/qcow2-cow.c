/* qcow2 new data clusters: copy-on-write, merged data writes. See qcow2-cow.h. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2-cow.h"

#include "block/qcow2.h"
#include "common/iov.h"
#include "common/log.h"
#include "common/util.h"

#define MERGE_MAX (4u << 20)  /* bytes: larger runs are written in several requests */

static bool from_compressed(const struct qcow2_state *s, const struct qcow2_part *p)
{
    return qcow2_l2e_type(p->old_l2e, s->cluster_bits, s->version, NULL) == QCOW2_COMPRESSED;
}

/* Whether p's new cluster takes the bytes it does not write from the backing file: an
 * unallocated entry (zero-flagged ones read as zeroes) under a node with a backing. */
static bool cow_from_backing(const struct qcow2_state *s, const struct qcow2_part *p)
{
    return p->act == QCOW2_ACT_ALLOC && p->len != s->cluster_size && s->node->backing &&
           qcow2_l2e_type(p->old_l2e, s->cluster_bits, s->version, NULL) == QCOW2_UNALLOCATED;
}

/* ---- the fill -------------------------------------------------------------------------------- */

/* The bytes p writes, in their place in its cluster's copy. */
static void put_guest_bytes(const struct qcow2_state *s, struct qcow2_part *p)
{
    iov_to_buf(p->iov, p->niov, 0, (char *)p->cow_buf + (p->voff & (s->cluster_size - 1)),
               p->len);
}

static void cow_zread_done(struct qcow2_zread *z, int ret)
{
    struct qcow2_part *p = z->opaque;
    struct qcow2_state *s = z->s;

    if (ret == 0)
        put_guest_bytes(s, p);
    p->fill_done(p, ret);
}

static void cow_backing_done(struct qcow2_waiter *w, int ret)
{
    struct qcow2_part *p = container_of(w, struct qcow2_part, w);
    struct qcow2_state *s = p->r->s;

    if (ret == 0)
        put_guest_bytes(s, p);
    p->fill_done(p, ret);
}

void qcow2_cow_fill(struct qcow2_state *s, struct qcow2_part *p,
                    void (*done)(struct qcow2_part *p, int ret))
{
    uint32_t cs = s->cluster_size;
    bool compressed = p->act == QCOW2_ACT_ALLOC && from_compressed(s, p);
    bool backing = !compressed && cow_from_backing(s, p);

    if (p->len == cs || (p->fill_skip && !compressed && !backing)) {
        done(p, 0);
        return;
    }
    p->cow_buf = qcow2_alloc_buf(cs);  /* zeroed */
    p->fill_done = done;
    if (backing) {
        p->w.cb = cow_backing_done;
        int ret = qcow2_backing_fill(s, p->voff, p->cow_buf, &p->w);
        if (ret != 1)
            cow_backing_done(&p->w, ret < 0 ? ret : 0);
        return;
    }
    if (compressed) {
        p->zr = xzalloc(sizeof(*p->zr));
        p->zr->out = p->cow_buf;
        p->zr->done = cow_zread_done;
        p->zr->opaque = p;
        qcow2_zread_start(s, p->zr, p->old_l2e);
        return;
    }
    put_guest_bytes(s, p);
    done(p, 0);
}

/* ---- merging ----------------------------------------------------------------------------- */

bool qcow2_cow_whole_fresh(const struct qcow2_state *s, const struct qcow2_part *p)
{
    return p->act == QCOW2_ACT_ALLOC && p->len == s->cluster_size && !from_compressed(s, p);
}

size_t qcow2_data_run(struct qcow2_state *s, struct qcow2_part **parts, size_t n, size_t i,
                      char *bounce, uint64_t *bounce_at)
{
    struct qcow2_part *p = parts[i], *last = p;
    uint32_t cs = s->cluster_size;
    uint64_t total = p->len;
    size_t j = i + 1;
    bool copy = false;

    p->run_next = NULL;
    p->run_buf = NULL;
    if (p->act != QCOW2_ACT_ALLOC || from_compressed(s, p) || cow_from_backing(s, p) ||
        (p->len != cs && !p->fill_skip))
        return j;
    while (j < n && total < MERGE_MAX) {
        struct qcow2_part *q = parts[j];
        if (q->act != QCOW2_ACT_ALLOC || q->host != last->host + cs)
            break;
        /* In place: q's bytes follow last's in the guest and in the request's data (a write's
         * own, not the zeroes of a write-zeroes part, which has a buffer of its own). */
        bool inplace = !copy && q->r == p->r && p->r->parent->op == BLOCK_OP_WRITE &&
                       !from_compressed(s, q) && (last->voff + last->len) % cs == 0 &&
                       q->voff == last->voff + last->len && !cow_from_backing(s, q) &&
                       (q->len == cs || q->fill_skip);
        if (!inplace) {
            /* Whole clusters from other buffers: copied together. */
            bool all = qcow2_cow_whole_fresh(s, q);
            for (struct qcow2_part *x = p; all && x; x = x->run_next)
                all = qcow2_cow_whole_fresh(s, x);
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
        p->run_buf = bounce + *bounce_at;
        *bounce_at += total;
    }
    return j;
}

/* ---- the write --------------------------------------------------------------------------- */

static void data_done(struct block_req *req, int ret)
{
    struct qcow2_part *p = container_of(req, struct qcow2_part, child);
    struct qcow2_state *s = p->r->s;

    for (struct qcow2_part *q = p; q; q = q->run_next)
        q->ret = ret;
    if (ret < 0)
        log_warn("qcow2 %s: data write at %" PRIu64 " failed: %s", s->node->node_name,
                 req->offset, strerror(-ret));
    p->written(p, ret);
}

/* The vectors of the run headed by p, one after another, into p->run_iov. Returns how many
 * segments. */
static unsigned run_vector(struct qcow2_part *p)
{
    unsigned n = 0;

    for (struct qcow2_part *q = p; q; q = q->run_next)
        n += q->niov;
    p->run_iov = xmalloc(n * sizeof(p->run_iov[0]));
    n = 0;
    for (struct qcow2_part *q = p; q; q = q->run_next) {
        memcpy(p->run_iov + n, q->iov, q->niov * sizeof(q->iov[0]));
        n += q->niov;
    }
    return n;
}

static void data_submit(struct qcow2_state *s, struct qcow2_part *p)
{
    uint32_t cs = s->cluster_size;
    struct block_req w = {.op = BLOCK_OP_WRITE, .offset = p->host, .done = data_done};

    if (p->cow_buf) {
        w.len = cs;
        w.buf = p->cow_buf;
    } else if (p->run_buf) {
        w.buf = p->run_buf;
        for (struct qcow2_part *q = p; q; q = q->run_next) {
            iov_to_buf(q->iov, q->niov, 0, p->run_buf + w.len, q->len);
            w.len += q->len;
        }
    } else {
        w.offset = p->host + (p->voff & (cs - 1));
        for (struct qcow2_part *q = p; q; q = q->run_next)
            w.len += q->len;
        if (p->run_next) {
            w.niov = run_vector(p);
            w.iov = p->run_iov;
        } else {
            w.niov = p->niov;
            w.iov = p->iov;
        }
    }
    int ret = qcow2_pre_write(s, w.offset, w.len, false);
    if (ret < 0) {
        data_done(&p->child, ret);
        return;
    }
    p->child = w;
    node_submit(s->file, &p->child);
}

static void filled(struct qcow2_part *p, int ret)
{
    struct qcow2_state *s = p->r->s;

    if (ret < 0) {
        log_warn("qcow2 %s: copy-on-write for offset %" PRIu64 " failed: %s",
                 s->node->node_name, p->voff, strerror(-ret));
        p->ret = ret;
        p->written(p, ret);
        return;
    }
    data_submit(s, p);
}

void qcow2_data_write(struct qcow2_state *s, struct qcow2_part *p,
                      void (*done)(struct qcow2_part *p, int ret))
{
    p->written = done;
    qcow2_cow_fill(s, p, filled);
}
