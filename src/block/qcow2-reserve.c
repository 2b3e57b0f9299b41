/* qcow2 host clusters the allocator may hand out. See qcow2-reserve.h. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2-reserve.h"

#include "block/qcow2.h"
#include "block/qcow2-cache.h"
#include "block/sync-io.h"
#include "common/log.h"
#include "common/util.h"

/* The lowest cluster of the last free run. */
static uint64_t take_free(struct qcow2_reserve *r)
{
    struct qcow2_run *last = &r->free.ptr[r->free.len - 1];
    uint64_t cl = last->first++;

    if (--last->n == 0)
        r->free.len--;
    r->nfree--;
    return cl;
}

int qcow2_reserve_take(struct qcow2_state *s, size_t n, struct qcow2_taken *out,
                       uint64_t *from_end)
{
    struct qcow2_reserve *r = &s->rsv;
    uint64_t ahead = r->ahead_end - r->ahead_next;
    uint64_t nf = n - MIN(n, r->spare.len + r->nfree + ahead);
    size_t got = 0;

    *from_end = nf;
    /* The run at next_free must have refcount blocks: one check per block it touches. */
    for (uint64_t b = r->next_free >> s->rb_bits;
         nf && b <= (r->next_free + nf - 1) >> s->rb_bits; b++) {
        uint64_t off;
        if (qcow2_refblock(s, b, &off) < 0)
            return -EIO;
        if (!off)
            return 0;
    }
    while (got < n && r->spare.len)
        out[got++] = (struct qcow2_taken){.cluster = r->spare.ptr[--r->spare.len],
                                          .counted = true};
    while (got < n && r->nfree)
        out[got++] = (struct qcow2_taken){.cluster = take_free(r)};
    while (got < n && r->ahead_next < r->ahead_end)
        out[got++] = (struct qcow2_taken){.cluster = r->ahead_next++, .counted = true,
                                          .fresh = true};
    while (got < n)
        out[got++] = (struct qcow2_taken){.cluster = r->next_free++, .fresh = true};
    return 1;
}

int qcow2_reserve_take_ahead(struct qcow2_state *s, uint64_t *cl)
{
    uint64_t off;

    if (qcow2_refblock(s, s->rsv.next_free >> s->rb_bits, &off) < 0 || !off)
        return 0;
    *cl = s->rsv.next_free++;
    return 1;
}

bool qcow2_reserve_ahead_add(struct qcow2_state *s, uint64_t cl)
{
    struct qcow2_reserve *r = &s->rsv;

    if (r->ahead_next == r->ahead_end)
        r->ahead_next = cl;
    else if (r->ahead_end != cl)
        return false;
    r->ahead_end = cl + 1;
    return true;
}

void qcow2_reserve_put_spare(struct qcow2_state *s, uint64_t cl)
{
    u64_vector_append(&s->rsv.spare, cl);
}

void qcow2_reserve_put_free(struct qcow2_state *s, uint64_t first, uint64_t n)
{
    struct qcow2_reserve *r = &s->rsv;
    struct qcow2_run *last = r->free.len ? &r->free.ptr[r->free.len - 1] : NULL;

    r->nfree += n;
    /* Discards free clusters in a row: they grow the last run, either way. */
    if (last && last->first == first + n) {
        last->first = first;
        last->n += n;
    } else if (last && last->first + last->n == first) {
        last->n += n;
    } else {
        qcow2_run_vector_append(&r->free, (struct qcow2_run){first, n});
    }
}

void qcow2_reserve_put_freed(struct qcow2_state *s, uint64_t cl)
{
    if (s->rsv.inplace)
        u64_vector_append(&s->rsv.freeing, cl);
    else
        qcow2_reserve_put_free(s, cl, 1);
}

void qcow2_reserve_inplace_start(struct qcow2_state *s)
{
    s->rsv.inplace++;
}

void qcow2_reserve_inplace_done(struct qcow2_state *s)
{
    struct qcow2_reserve *r = &s->rsv;

    if (--r->inplace == 0 && r->freeing.len) {
        for (size_t i = 0; i < r->freeing.len; i++)
            qcow2_reserve_put_free(s, r->freeing.ptr[i], 1);
        r->freeing.len = 0;
    }
}

void qcow2_reserve_skip_to(struct qcow2_state *s, uint64_t cl)
{
    s->rsv.next_free = MAX(s->rsv.next_free, cl);
}

static int u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

void qcow2_reserve_close(struct qcow2_state *s)
{
    struct qcow2_reserve *r = &s->rsv;
    u64_vector cl = {0};
    uint64_t cs = s->cluster_size, mask = (1ULL << s->rb_bits) - 1;
    uint32_t order = s->refcount_order;
    void *buf;

    for (uint64_t c = r->ahead_next; c < r->ahead_end; c++)
        u64_vector_append(&cl, c);
    for (size_t i = 0; i < r->spare.len; i++)
        u64_vector_append(&cl, r->spare.ptr[i]);
    r->ahead_next = r->ahead_end = 0;
    r->spare.len = 0;
    if (!cl.len)
        return;
    qsort(cl.ptr, cl.len, sizeof(*cl.ptr), u64_cmp);
    buf = qcow2_alloc_buf(cs);
    for (size_t i = 0; i < cl.len;) {
        uint64_t b = cl.ptr[i] >> s->rb_bits, block;
        uint64_t lo = UINT64_MAX, hi = 0;
        struct error *err = NULL;
        size_t j = i;

        while (j < cl.len && cl.ptr[j] >> s->rb_bits == b)
            j++;
        if (qcow2_refblock(s, b, &block) < 0 || !block ||
            node_pread_sync(s->file, buf, cs, block, &err) < 0)
            goto leak;
        for (size_t k = i; k < j; k++) {
            uint64_t idx = cl.ptr[k] & mask, v = qcow2_refcount_get(order, buf, idx);
            if (v == 0 || (k > i && cl.ptr[k] == cl.ptr[k - 1]))
                continue;
            qcow2_refcount_set(order, buf, idx, v - 1);
            lo = MIN(lo, qcow2_refcount_byte(order, idx));
            hi = MAX(hi, qcow2_refcount_byte(order, idx) + 1);
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
        log_warn("qcow2 %s: cannot release %zu reserved clusters%s%s: leaked until the next "
                 "writable open", s->node->node_name, j - i, err ? ": " : "",
                 err ? err->desc : "");
        error_free(err);
        i = j;
    }
    free(buf);
    u64_vector_reset(&cl);
}

void qcow2_reserve_cleanup(struct qcow2_state *s)
{
    u64_vector_reset(&s->rsv.spare);
    qcow2_run_vector_reset(&s->rsv.free);
    u64_vector_reset(&s->rsv.freeing);
}
