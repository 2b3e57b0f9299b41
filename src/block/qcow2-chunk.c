/* A batch's staged metadata writes. See qcow2-chunk.h. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2-chunk.h"

#include "block/qcow2.h"
#include "block/qcow2-cache.h"
#include "common/log.h"
#include "common/util.h"

static size_t hash(const struct qcow2_chunkset *cs, uint64_t disk)
{
    return (size_t)((disk >> 9) * 0x9e3779b97f4a7c15ULL) & (cs->hcap - 1);
}

struct qcow2_chunk *qcow2_chunk_find(const struct qcow2_chunkset *cs, uint64_t disk)
{
    if (!cs->hcap)
        return NULL;
    for (size_t i = hash(cs, disk);; i = (i + 1) & (cs->hcap - 1)) {
        if (!cs->h[i] || cs->h[i]->disk == disk)
            return cs->h[i];
    }
}

static void hash_add(struct qcow2_chunkset *cs, struct qcow2_chunk *c)
{
    size_t i = hash(cs, c->disk);

    while (cs->h[i])
        i = (i + 1) & (cs->hcap - 1);
    cs->h[i] = c;
}

struct qcow2_chunk *qcow2_chunk_touch(struct qcow2_chunkset *cs, uint32_t align, int kind,
                                      uint64_t table, const void *image, uint64_t image_len,
                                      uint64_t base, uint64_t off)
{
    uint64_t pos = off & ~(uint64_t)(align - 1);
    struct qcow2_chunk *c = qcow2_chunk_find(cs, base + pos);

    if (c)
        return c;
    if (2 * (cs->v.len + 1) > cs->hcap) {
        free(cs->h);
        cs->hcap = cs->hcap ? 2 * cs->hcap : 64;
        cs->h = xzalloc(cs->hcap * sizeof(*cs->h));
        for (size_t i = 0; i < cs->v.len; i++)
            hash_add(cs, cs->v.ptr[i]);
    }
    c = xzalloc(sizeof(*c));
    c->disk = base + pos;
    c->table = table;
    c->pos = (uint32_t)pos;
    c->len = (uint32_t)MIN((uint64_t)align, image_len - pos);
    c->kind = (uint8_t)kind;
    c->ret = 1;
    c->buf = qcow2_alloc_buf(align);
    memcpy(c->buf, (const char *)image + pos, c->len);
    qcow2_chunk_vector_append(&cs->v, c);
    hash_add(cs, c);
    return c;
}

void qcow2_chunkset_free(struct qcow2_chunkset *cs)
{
    for (size_t i = 0; i < cs->v.len; i++) {
        free(cs->v.ptr[i]->buf);
        free(cs->v.ptr[i]);
    }
    qcow2_chunk_vector_reset(&cs->v);
    free(cs->h);
    *cs = (struct qcow2_chunkset){0};
}

static int chunk_cmp(const void *a, const void *b)
{
    const struct qcow2_chunk *x = *(struct qcow2_chunk *const *)a;
    const struct qcow2_chunk *y = *(struct qcow2_chunk *const *)b;

    return x->disk < y->disk ? -1 : x->disk > y->disk;
}

size_t qcow2_chunk_runs(struct qcow2_chunkset *cs, uint32_t align, uint64_t max,
                        struct qcow2_chunk_run *out)
{
    size_t nruns = 0;

    if (!cs->v.len)
        return 0;
    qsort(cs->v.ptr, cs->v.len, sizeof(*cs->v.ptr), chunk_cmp);
    for (size_t i = 0; i < cs->v.len;) {
        struct qcow2_chunk **v = cs->v.ptr;
        size_t j = i + 1;
        uint64_t len = v[i]->len;
        while (j < cs->v.len && v[j - 1]->disk + v[j - 1]->len == v[j]->disk &&
               v[j - 1]->len == align && len + v[j]->len <= max)
            len += v[j++]->len;
        out[nruns++] = (struct qcow2_chunk_run){.first = i, .n = j - i, .len = len};
        i = j;
    }
    return nruns;
}

/* A metadata write: a run of chunks contiguous on disk. */
struct mwrite {
    struct block_req req;
    struct qcow2_state *s;
    struct qcow2_chunk **c;
    size_t n;
    char *merged;
    void (*done)(void *opaque, int ret);
    void *opaque;
};

static void chunk_commit(struct qcow2_state *s, const struct qcow2_chunk *c)
{
    switch (c->kind) {
    case QCOW2_CHUNK_L1:
        memcpy((char *)s->l1 + c->pos, c->buf, c->len);
        break;
    case QCOW2_CHUNK_L2:
        qcow2_cache_patch(s->l2_cache, c->table, c->pos, c->buf, c->len);
        break;
    case QCOW2_CHUNK_RB:
        qcow2_cache_patch(s->rb_cache, c->table, c->pos, c->buf, c->len);
        break;
    }
}

static void mwrite_done(struct block_req *req, int ret)
{
    struct mwrite *w = container_of(req, struct mwrite, req);
    static const char *const names[] = {[QCOW2_CHUNK_L1] = "L1 table",
                                        [QCOW2_CHUNK_L2] = "L2 table",
                                        [QCOW2_CHUNK_RB] = "refcount block"};

    for (size_t i = 0; i < w->n; i++) {
        w->c[i]->ret = ret;
        if (ret == 0)
            chunk_commit(w->s, w->c[i]);
    }
    if (ret < 0)
        log_warn("qcow2 %s: %s write at %" PRIu64 " failed: %s", w->s->node->node_name,
                 names[w->c[0]->kind], req->offset, strerror(-ret));
    w->done(w->opaque, ret);
    free(w->merged);
    free(w->c);
    free(w);
}

#define MERGE_MAX (4u << 20)  /* bytes: larger runs are written in several requests */

size_t qcow2_chunks_write(struct qcow2_state *s, struct qcow2_chunkset *cs,
                          void (*done)(void *opaque, int ret), void *opaque)
{
    struct qcow2_chunk_run *runs = xmalloc(MAX(cs->v.len, 1) * sizeof(*runs));
    size_t nruns = qcow2_chunk_runs(cs, s->meta_align, MERGE_MAX, runs);

    for (size_t r = 0; r < nruns; r++) {
        struct mwrite *w = xzalloc(sizeof(*w));
        struct qcow2_chunk **c = cs->v.ptr + runs[r].first;
        void *buf = c[0]->buf;

        w->s = s;
        w->n = runs[r].n;
        w->c = xmalloc(w->n * sizeof(*w->c));
        memcpy(w->c, c, w->n * sizeof(*w->c));
        w->done = done;
        w->opaque = opaque;
        if (w->n > 1) {
            w->merged = qcow2_alloc_buf(runs[r].len);
            for (size_t k = 0, at = 0; k < w->n; at += c[k]->len, k++)
                memcpy(w->merged + at, c[k]->buf, c[k]->len);
            buf = w->merged;
        }
        w->req = (struct block_req){.op = BLOCK_OP_WRITE, .offset = c[0]->disk,
                                    .len = runs[r].len, .buf = buf, .done = mwrite_done};
        qcow2_pre_write(s, w->req.offset, runs[r].len, true);
        node_submit(s->file, &w->req);
    }
    free(runs);
    return nruns;
}

struct qcow2_chunk *qcow2_chunk_refcount(struct qcow2_state *s, struct qcow2_chunkset *cs,
                                         uint64_t cl, int delta, bool want_zero,
                                         struct qcow2_waiter *w, int *err)
{
    uint32_t order = s->refcount_order;
    uint64_t block, idx = cl & ((1ULL << s->rb_bits) - 1);
    uint64_t byte = qcow2_refcount_byte(order, idx);
    struct qcow2_chunk *c;

    *err = qcow2_refblock(s, cl >> s->rb_bits, &block);
    if (*err)
        return NULL;
    if (!block) {
        qcow2_signal_corruption(s, -1, -1, "Cluster %#" PRIx64 " has no refcount block "
                                "(reftable index: %#" PRIx64 ")", cl << s->cluster_bits,
                                cl >> s->rb_bits);
        *err = -EIO;
        return NULL;
    }
    c = qcow2_chunk_find(cs, block + (byte & ~(uint64_t)(s->meta_align - 1)));
    if (!c) {
        const void *table = qcow2_cache_get(s->rb_cache, block, w);
        if (!table)
            return NULL;
        c = qcow2_chunk_touch(cs, s->meta_align, QCOW2_CHUNK_RB, block, table, s->cluster_size,
                              block, byte);
    }
    uint64_t ci = idx - ((uint64_t)c->pos * 8 >> order);
    uint64_t old = qcow2_refcount_get(order, c->buf, ci);
    if ((delta > 0 && (old == qcow2_refcount_max(order) || (want_zero && old != 0))) ||
        (delta < 0 && old == 0)) {
        qcow2_signal_corruption(s, -1, -1, "Refcount of cluster %#" PRIx64 " is %" PRIu64
                                ": cannot %s it%s (refblock offset: %#" PRIx64 ")",
                                cl << s->cluster_bits, old,
                                delta > 0 ? "increment" : "decrement",
                                want_zero && old ? " for a new allocation" : "", block);
        *err = -EIO;
        return NULL;
    }
    qcow2_refcount_set(order, c->buf, ci, delta > 0 ? old + 1 : old - 1);
    return c;
}
