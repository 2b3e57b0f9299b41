/* qcow2 requests: split into parts, throttled, completed; I/O in place; compressed reads.
 * See qcow2-req.h.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2-req.h"

#include "block/qcow2.h"
#include "common/iov.h"
#include "common/log.h"
#include "common/util.h"

#ifdef THINBLK_HAVE_ZLIB
#include <zlib.h>
#endif

/* ---- requests ---------------------------------------------------------------------------- */

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

static void req_deferred_done(struct loop *loop, void *opaque)
{
    req_finish(opaque);
}

/* Start waiting parts while there is room. A deferred call, never inside node_submit(), so
 * that a part finishing at once cannot complete another request there. */
static void resume(struct loop *loop, void *opaque)
{
    struct qcow2_reqs *q = &((struct qcow2_state *)opaque)->reqs;

    while (!qcow2_part_queue_empty(&q->waiting) && q->active < QCOW2_MAX_ACTIVE) {
        q->active++;
        q->run(qcow2_part_queue_pop(&q->waiting));
    }
}

static void schedule_resume(struct qcow2_state *s)
{
    if (!loop_deferred_queued(&s->reqs.resume_call))
        loop_defer(s->node->graph->loop, &s->reqs.resume_call);
}

void qcow2_reqs_init(struct qcow2_state *s, void (*run)(struct qcow2_part *p))
{
    s->reqs.run = run;
    s->reqs.resume_call = LOOP_DEFERRED_INIT(resume, s);
}

void qcow2_reqs_cleanup(struct qcow2_state *s)
{
    if (loop_deferred_queued(&s->reqs.resume_call))  /* then s->node is set */
        loop_cancel_deferred(s->node->graph->loop, &s->reqs.resume_call);
}

void qcow2_part_done(struct qcow2_part *p, int ret)
{
    struct qcow2_req *r = p->r;
    struct qcow2_state *s = r->s;

    if (p->inplace)
        qcow2_reserve_inplace_done(s);
    free(p->zbuf);
    free(p);
    s->reqs.active--;
    if (!qcow2_part_queue_empty(&s->reqs.waiting))
        schedule_resume(s);
    if (ret < 0 && !r->err)
        r->err = ret;
    if (--r->pending == 0)
        req_finish(r);
}

/* A new part of req for [off, off + len), with its slice of req's data (if req has data). */
static struct qcow2_part *part_new(struct block_req *req, uint64_t off, uint64_t len)
{
    bool rw = req->op == BLOCK_OP_READ || req->op == BLOCK_OP_WRITE;
    struct iovec one;
    unsigned n = 0;
    const struct iovec *iov = rw ? block_req_iov(req, &one, &n) : NULL;
    unsigned count = rw ? iov_slice(iov, n, off - req->offset, len, NULL) : 0;
    struct qcow2_part *p = xzalloc(sizeof(*p) + MAX(count, 1u) * sizeof(p->iov[0]));

    p->voff = off;
    p->len = (uint32_t)len;
    if (rw)
        p->niov = iov_slice(iov, n, off - req->offset, len, p->iov);
    return p;
}

void qcow2_req_submit(struct qcow2_state *s, struct block_req *req)
{
    struct qcow2_req *r = xzalloc(sizeof(*r));
    uint64_t cs = s->cluster_size, end = req->offset + req->len;

    r->s = s;
    r->parent = req;
    r->done_call = LOOP_DEFERRED_INIT(req_deferred_done, r);
    if (req->op == BLOCK_OP_FLUSH) {
        r->fua = true;  /* the flush after no writes is the whole request */
        req_finish(r);
        return;
    }
    /* DISCARD frees clusters only with discard=unmap (as QEMU's pass-discard-request). */
    r->pending = 1;  /* held while submitting: nothing completes inside node_submit() */
    if (req->op != BLOCK_OP_DISCARD || s->node->discard_unmap) {
        r->fua = (req->flags & BLOCK_REQ_FUA) != 0;
        for (uint64_t off = req->offset; off < end;) {
            uint64_t len = MIN(end - off, cs - (off & (cs - 1)));
            struct qcow2_part *p = part_new(req, off, len);
            p->r = r;
            r->pending++;
            qcow2_part_queue_push(&s->reqs.waiting, p);
            off += len;
        }
        schedule_resume(s);
    }
    if (--r->pending == 0)
        loop_defer(s->node->graph->loop, &r->done_call);
}

/* ---- I/O in place ------------------------------------------------------------------------ */

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
                                  .len = p->len, .iov = p->iov, .niov = p->niov,
                                  .done = part_child_done};
    node_submit(s->file, &p->child);
}

void qcow2_part_read_host(struct qcow2_part *p, uint64_t host)
{
    part_submit_child(p, BLOCK_OP_READ, host);
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
    qcow2_reserve_inplace_start(s);
    part_submit_child(p, op, host);
}

/* ---- compressed clusters ------------------------------------------------------------------- */

/* The sectors of the deflate stream (qcow2_cdesc_decode()) are read, widened to the child's
 * alignment (past the end of the file reads as zeroes), and inflated: a raw deflate stream
 * (no zlib header) of the whole cluster. */
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
    struct qcow2_cdesc d;
    uint64_t a = s->meta_align, start, end;

    /* At most 2 clusters of data (the descriptor's sector count), inside the file (the
     * lookup checked). */
    qcow2_cdesc_decode(l2e, s->cluster_bits, &d);
    start = d.off & ~(a - 1);
    end = (d.off + d.len + a - 1) & ~(a - 1);
    z->s = s;
    z->zbuf = qcow2_alloc_buf(end - start);
    z->zskip = (uint32_t)(d.off - start);
    z->zlen = (uint32_t)d.len;
    z->req = (struct block_req){.op = BLOCK_OP_READ, .offset = start, .len = end - start,
                                .buf = z->zbuf, .done = zread_done};
    node_submit(s->file, &z->req);
}

static void part_zread_done(struct qcow2_zread *z, int ret)
{
    struct qcow2_part *p = z->opaque;
    struct qcow2_state *s = p->r->s;

    if (ret == 0)
        iov_from_buf(p->iov, p->niov, 0, (char *)z->out + (p->voff & (s->cluster_size - 1)),
                     p->len);
    else
        log_error("qcow2 %s: cannot decompress the cluster for offset %" PRIu64,
                  s->node->node_name, p->voff);
    free(z->out);
    free(z);
    qcow2_part_done(p, ret);
}

void qcow2_part_read_compressed(struct qcow2_part *p, uint64_t l2e)
{
    struct qcow2_state *s = p->r->s;
    struct qcow2_zread *z = xzalloc(sizeof(*z));

    z->out = xmalloc(s->cluster_size);
    z->done = part_zread_done;
    z->opaque = p;
    qcow2_zread_start(s, z, l2e);
}
