/* qcow2 cluster allocation: the only code that changes the image's metadata.
 *
 * One allocation at a time per image (the allocation lock): write parts that need a new
 * cluster wait in a FIFO queue. That serialises every change to L1, L2 tables, refcount
 * blocks, the refcount table and the header, so the state machine below never races with
 * itself; reads and in-place writes run beside it (they only read L1/L2).
 *
 * The order of writes, each waiting for the one before (so a process killed at any point
 * leaves at worst leaked clusters, never a reference to a cluster with refcount 0 or to
 * unwritten data):
 *   1. refcount coverage, if the clusters to allocate have no refcount block yet: new blocks
 *      (and a new, larger refcount table if needed) written at the end of the image, counting
 *      themselves; then increments in existing blocks for those of them they cover; then the
 *      link: the refcount table entries, or the header's table offset and size (one write);
 *      then the old table's clusters are freed (a failure there only leaks them);
 *   2. the data cluster, whole: the guest's bytes with zeroes around them, or the backing
 *      file's bytes (copy-on-write: qcow2_backing_fill());
 *   3. a new L2 table, whole, if the L1 entry was empty;
 *   4. the refcount increments of the new clusters;
 *   5. the link: the L2 entry, or the L1 entry for a new L2 table.
 * New space is written (1, 2, 3) before anything refers to it, so running out of space
 * (ENOSPC) fails the request with nothing committed; a retry allocates the same clusters
 * again. A failure after step 4 leaves clusters with refcount 1 that nothing refers to: they
 * go to the spare list and the next allocation uses them, so a retried write does not leak.
 *
 * No flush barriers between the steps yet: ordered completion protects against a killed
 * process, not against a power failure (that needs a flush before each link step).
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "block/qcow2.h"
#include "common/log.h"
#include "common/util.h"

enum {
    PATCH_NONE, PATCH_L1, PATCH_RT, PATCH_HEADER, PATCH_L2, PATCH_RB,
};

enum {
    A_LOOKUP, A_COVER, A_COVER_WRITE, A_COVER_INCS, A_COVER_LINK, A_COVER_DONE, A_COVER_FREE,
    A_ASSIGN, A_DATA, A_L2, A_INCS, A_LINK, A_DONE,
};

static void alloc_run(struct qcow2_state *s);
static void kick(struct qcow2_state *s);

static void spare_push(struct qcow2_state *s, uint64_t cluster)
{
    if (s->nspare == s->spare_cap) {
        s->spare_cap = s->spare_cap ? 2 * s->spare_cap : 8;
        s->spare = xrealloc(s->spare, s->spare_cap * sizeof(*s->spare));
    }
    s->spare[s->nspare++] = cluster;
}

static void ops_add(struct qcow2_alloc *a, uint64_t cluster, int delta)
{
    if (a->nops == a->ops_cap) {
        a->ops_cap = a->ops_cap ? 2 * a->ops_cap : 8;
        a->ops = xrealloc(a->ops, a->ops_cap * sizeof(*a->ops));
    }
    a->ops[a->nops++] = (struct qcow2_refop){cluster, delta};
}

/* Release the lock and complete the part (ret < 0), or hand it to an in-place write. */
static void alloc_finish(struct qcow2_state *s, int ret, uint64_t host)
{
    struct qcow2_alloc *a = &s->alloc;
    struct qcow2_part *p = a->part;
    struct qcow2_refop *ops = a->ops;
    size_t ops_cap = a->ops_cap;

    free(a->iobuf);
    free(a->l2_table);
    free(a->cover_buf);
    free(a->new_blocks);
    *a = (struct qcow2_alloc){.ops = ops, .ops_cap = ops_cap};
    s->alloc_busy = false;
    if (host)
        qcow2_part_write_host(p, host);
    else
        qcow2_part_done(p, ret);
    kick(s);
}

static void alloc_fail(struct qcow2_state *s, int ret)
{
    struct qcow2_alloc *a = &s->alloc;

    if ((a->step == A_COVER_INCS && a->iop > 0) || a->step == A_COVER_LINK) {
        /* Part of the new refcount structure is committed: skip over all of it. */
        s->next_free = MAX(s->next_free, a->c + a->k + a->m);
        log_warn("qcow2 %s: refcount update failed half-way (%s); up to %" PRIu64
                 " clusters leaked", s->node->node_name, strerror(-ret), a->k + a->m);
    }
    for (unsigned i = 0; i < a->nowned; i++)
        spare_push(s, a->owned[i]);
    alloc_finish(s, ret, 0);
}

static void alloc_io_done(struct block_req *req, int ret)
{
    struct qcow2_state *s = req->opaque;
    struct qcow2_alloc *a = &s->alloc;
    const void *buf = a->iobuf;

    if (ret < 0 && a->step == A_COVER_FREE) {
        log_warn("qcow2 %s: freeing the old refcount table failed (%s): clusters leaked",
                 s->node->node_name, strerror(-ret));
        a->iop++;
        free(a->iobuf);
        a->iobuf = NULL;
        alloc_run(s);
        return;
    }
    if (ret < 0) {
        alloc_fail(s, ret);
        return;
    }
    switch (a->patch_kind) {  /* the disk has it: now memory may */
    case PATCH_L1:
        memcpy((char *)s->l1 + a->patch_pos, buf, a->patch_len);
        break;
    case PATCH_RT:
        memcpy((char *)s->rt + a->patch_pos, buf, a->patch_len);
        break;
    case PATCH_HEADER:
        memcpy((char *)s->header + a->patch_pos, buf, a->patch_len);
        break;
    case PATCH_L2:
        qcow2_cache_patch(s->l2_cache, a->patch_table, a->patch_pos, buf, a->patch_len);
        break;
    case PATCH_RB:
        qcow2_cache_patch(s->rb_cache, a->patch_table, a->patch_pos, buf, a->patch_len);
        break;
    }
    free(a->iobuf);
    a->iobuf = NULL;
    a->patch_kind = PATCH_NONE;
    switch (a->step) {
    case A_COVER_WRITE:
        a->step = A_COVER_INCS;
        a->iop = 0;
        break;
    case A_COVER_INCS:
    case A_COVER_FREE:
        a->iop++;
        break;
    case A_COVER_LINK:
        a->link_i++;
        break;
    case A_DATA:
        a->step = A_L2;
        break;
    case A_L2:
        a->step = A_INCS;
        a->iop = 0;
        break;
    case A_INCS: {
        uint64_t cl = a->ops[a->iop].cluster;
        a->owned[a->nowned++] = cl;
        s->next_free = MAX(s->next_free, cl + 1);
        a->iop++;
        break;
    }
    case A_LINK:
        a->step = A_DONE;
        break;
    }
    alloc_run(s);
}

static void alloc_write(struct qcow2_state *s, uint64_t offset, void *buf, size_t len,
                        bool own)
{
    struct qcow2_alloc *a = &s->alloc;

    a->req = (struct block_req){.op = BLOCK_OP_WRITE, .offset = offset, .len = len,
                                .buf = buf, .done = alloc_io_done, .opaque = s};
    if (own)
        a->iobuf = buf;
    node_submit(s->file, &a->req);
}

/* Write the meta_align chunk(s) of image (the in-memory copy of image_len bytes at disk
 * offset base) holding [pos, pos+len), with data there; memory follows once it is done. */
static void alloc_patch(struct qcow2_state *s, int kind, uint64_t table, const void *image,
                        size_t image_len, uint64_t base, uint32_t pos, const void *data,
                        uint32_t len)
{
    struct qcow2_alloc *a = &s->alloc;
    uint32_t g = s->meta_align;
    uint32_t start = pos & ~(g - 1);
    uint32_t end = (uint32_t)MIN(((uint64_t)pos + len + g - 1) & ~(uint64_t)(g - 1), image_len);
    char *buf = qcow2_alloc_buf(end - start);

    memcpy(buf, (const char *)image + start, end - start);
    memcpy(buf + (pos - start), data, len);
    a->patch_kind = kind;
    a->patch_table = table;
    a->patch_pos = start;
    a->patch_len = end - start;
    alloc_write(s, base + start, buf, end - start, true);
}

/* Apply refcount op a->ops[a->iop]. Returns 0 (a write or a load is under way) or -errno. */
static int refcount_change(struct qcow2_state *s)
{
    struct qcow2_alloc *a = &s->alloc;
    struct qcow2_refop *op = &a->ops[a->iop];
    uint64_t block = qcow2_rt_block(s, op->cluster >> s->rb_bits);
    uint64_t idx = op->cluster & ((1ULL << s->rb_bits) - 1);
    uint8_t bytes[8];
    uint32_t pos, len;

    if (!block) {
        log_error("qcow2 %s: no refcount block for cluster %" PRIu64, s->node->node_name,
                  op->cluster);
        return -EIO;
    }
    const void *table = qcow2_cache_get(s->rb_cache, block, &a->w);
    if (!table)
        return 0;
    uint64_t old = qcow2_refcount_get(s, table, idx);
    if ((op->delta > 0 && old == qcow2_refcount_max(s)) || (op->delta < 0 && old == 0)) {
        log_error("qcow2 %s: refcount of cluster %" PRIu64 " is %" PRIu64 ": cannot change "
                  "it by %d", s->node->node_name, op->cluster, old, op->delta);
        return -EIO;
    }
    qcow2_refcount_encode(s, table, idx, op->delta > 0 ? old + 1 : old - 1, &pos, &len, bytes);
    alloc_patch(s, PATCH_RB, block, table, s->cluster_size, block, pos, bytes, len);
    return 0;
}

static bool covered(const struct qcow2_state *s, uint64_t first, uint64_t n)
{
    for (uint64_t cl = first; cl < first + n; cl++) {
        if (!qcow2_rt_block(s, cl >> s->rb_bits))
            return false;
    }
    return true;
}

/* Plan new refcount blocks (and a new table) at next_free so that they and the n clusters
 * after them have refcount blocks: fill a->c, k, m, new_blocks, cover_buf, ops. */
static int cover_plan(struct qcow2_state *s, uint64_t n)
{
    struct qcow2_alloc *a = &s->alloc;
    uint64_t cs = s->cluster_size, c = s->next_free, k = 0, m = 0;
    uint64_t max_k = (8u << 20) / cs;

    for (;;) {
        uint64_t last_b = (c + k + m + n - 1) >> s->rb_bits;
        uint64_t nk = 0, nm = 0;
        if (last_b >= s->rt_entries) {
            uint64_t need = ((last_b + 1) * 8 + cs - 1) / cs;
            if (need > max_k)
                return -EFBIG;
            nk = MAX(need, MIN(2 * (uint64_t)s->rt_clusters, max_k));
            nk = MAX(nk, k);
        }
        for (uint64_t b = c >> s->rb_bits; b <= last_b; b++)
            nm += !qcow2_rt_block(s, b);
        if (nk == k && nm == m)
            break;
        k = nk;
        m = nm;
    }
    a->c = c;
    a->k = k;
    a->m = m;
    a->new_blocks = xmalloc(m * sizeof(*a->new_blocks));
    uint64_t j = 0, last_b = (c + k + m + n - 1) >> s->rb_bits;
    for (uint64_t b = c >> s->rb_bits; b <= last_b; b++) {
        if (!qcow2_rt_block(s, b))
            a->new_blocks[j++] = b;
    }
    a->cover_buf = qcow2_alloc_buf((k + m) * cs);
    uint64_t *table = a->cover_buf;
    if (k) {
        memcpy(table, s->rt, s->rt_entries * 8);
        for (j = 0; j < m; j++)
            table[a->new_blocks[j]] = htobe64((c + k + j) * cs);
    }
    a->nops = 0;
    for (uint64_t cl = c; cl < c + k + m; cl++) {
        uint64_t b = cl >> s->rb_bits;
        for (j = 0; j < m && a->new_blocks[j] != b; j++)
            ;
        if (j < m)
            qcow2_refcount_set(s, (char *)a->cover_buf + (k + j) * cs,
                               cl & ((1ULL << s->rb_bits) - 1), 1);
        else
            ops_add(a, cl, +1);
    }
    a->old_rt_offset = s->rt_offset;
    a->old_rt_clusters = s->rt_clusters;
    return 0;
}

/* The new refcount structure is linked: make memory follow. */
static void cover_done(struct qcow2_state *s)
{
    struct qcow2_alloc *a = &s->alloc;
    uint64_t cs = s->cluster_size;

    if (a->k) {
        free(s->rt);
        s->rt = qcow2_alloc_buf(a->k * cs);
        memcpy(s->rt, a->cover_buf, a->k * cs);
        s->rt_offset = a->c * cs;
        s->rt_clusters = (uint32_t)a->k;
        s->rt_entries = a->k * cs / 8;
    }
    for (uint64_t j = 0; j < a->m; j++)
        qcow2_cache_insert(s->rb_cache, (a->c + a->k + j) * cs,
                           (char *)a->cover_buf + (a->k + j) * cs);
    s->next_free = MAX(s->next_free, a->c + a->k + a->m);
    a->nops = 0;
    if (a->k) {
        for (uint64_t i = 0; i < a->old_rt_clusters; i++)
            ops_add(a, a->old_rt_offset / cs + i, -1);
    }
    free(a->cover_buf);
    a->cover_buf = NULL;
    free(a->new_blocks);
    a->new_blocks = NULL;
    a->iop = 0;
}

/* Decide what the part needs. Returns 1 to go on, 0 if waiting or finished. */
static int alloc_lookup(struct qcow2_state *s)
{
    struct qcow2_alloc *a = &s->alloc;
    struct qcow2_part *p = a->part;
    uint32_t l2_bits = s->cluster_bits - 3;
    uint64_t l2e, l1e;
    int ret = qcow2_lookup(s, p->voff, &a->w, &l2e);

    if (ret == 1)
        return 0;
    if (ret < 0) {
        alloc_fail(s, ret);
        return 0;
    }
    a->l1_idx = p->voff >> (s->cluster_bits + l2_bits);
    a->l2_idx = (p->voff >> s->cluster_bits) & ((1ULL << l2_bits) - 1);
    l1e = be64toh(s->l1[a->l1_idx]);
    uint64_t host = l2e & QCOW2_OFFSET_MASK;
    switch (qcow2_classify(s, l2e)) {
    case QCOW2_NORMAL:
        if (!(l2e & QCOW2_OFLAG_COPIED))
            break;
        alloc_finish(s, 0, host);  /* allocated meanwhile by a write queued before */
        return 0;
    case QCOW2_ZERO_ALLOC:
        if (!(l2e & QCOW2_OFLAG_COPIED))
            break;
        a->data_off = host;  /* keep the cluster; clear the flag */
        goto l2;
    case QCOW2_UNALLOCATED:
    case QCOW2_ZERO_PLAIN:
        if (s->nspare) {
            a->data_off = s->spare[--s->nspare] * s->cluster_size;
            a->owned[a->nowned++] = a->data_off / s->cluster_size;
        } else {
            a->data_fresh = true;
        }
        goto l2;
    case QCOW2_COMPRESSED:
        alloc_fail(s, -ENOTSUP);
        return 0;
    default:
        break;
    }
    log_error("qcow2 %s: cannot allocate over L2 entry 0x%" PRIx64, s->node->node_name, l2e);
    alloc_fail(s, -EIO);
    return 0;
l2:
    if ((l1e & QCOW2_OFFSET_MASK) && !(l1e & QCOW2_OFLAG_COPIED)) {
        log_error("qcow2 %s: L2 table %" PRIu64 " is shared; cannot update it in place",
                  s->node->node_name, a->l1_idx);
        alloc_fail(s, -EIO);
        return 0;
    }
    a->l2_off = l1e & QCOW2_OFFSET_MASK;
    a->new_l2 = a->l2_off == 0;
    if (a->new_l2 && s->nspare) {
        a->l2_off = s->spare[--s->nspare] * s->cluster_size;
        a->owned[a->nowned++] = a->l2_off / s->cluster_size;
    } else if (a->new_l2) {
        a->l2_fresh = true;
    }
    a->step = A_COVER;
    return 1;
}

/* Run steps until one waits for I/O or a table, or the allocation ends. */
static void alloc_run(struct qcow2_state *s)
{
    struct qcow2_alloc *a = &s->alloc;
    struct qcow2_part *p = a->part;
    uint64_t cs = s->cluster_size, e;
    int ret;

    for (;;) {
        switch (a->step) {
        case A_LOOKUP:
            if (!alloc_lookup(s))
                return;
            break;
        case A_COVER: {
            uint64_t n = a->data_fresh + a->l2_fresh;
            if (n == 0 || covered(s, s->next_free, n)) {
                a->step = A_ASSIGN;
                break;
            }
            ret = cover_plan(s, n);
            if (ret < 0) {
                log_error("qcow2 %s: the refcount table cannot grow further",
                          s->node->node_name);
                alloc_fail(s, ret);
                return;
            }
            a->step = A_COVER_WRITE;
            alloc_write(s, a->c * cs, a->cover_buf, (a->k + a->m) * cs, false);
            return;
        }
        case A_COVER_INCS:
        case A_INCS:
            if (a->iop < a->nops) {
                ret = refcount_change(s);
                if (ret < 0)
                    alloc_fail(s, ret);
                return;
            }
            a->step = a->step == A_INCS ? A_LINK : A_COVER_LINK;
            a->link_i = 0;
            break;
        case A_COVER_LINK:
            if (a->k && a->link_i == 0) {
                uint8_t hdr[12];
                uint64_t off = htobe64(a->c * cs);
                uint32_t clusters = htobe32((uint32_t)a->k);
                memcpy(hdr, &off, 8);
                memcpy(hdr + 8, &clusters, 4);
                alloc_patch(s, PATCH_HEADER, 0, s->header, s->meta_align, 0, 48, hdr, 12);
                return;
            }
            if (!a->k && a->link_i < a->m) {
                e = htobe64((a->c + a->link_i) * cs);
                alloc_patch(s, PATCH_RT, 0, s->rt, (size_t)s->rt_clusters * cs, s->rt_offset,
                            (uint32_t)(a->new_blocks[a->link_i] * 8), &e, 8);
                return;
            }
            a->step = A_COVER_DONE;
            break;
        case A_COVER_DONE:
            cover_done(s);
            a->step = a->nops ? A_COVER_FREE : A_COVER;
            break;
        case A_COVER_FREE:
            while (a->iop < a->nops) {
                if (refcount_change(s) == 0)
                    return;
                a->iop++;  /* a failure here only leaks the old table */
            }
            a->step = A_COVER;
            break;
        case A_ASSIGN: {
            uint64_t next = s->next_free;
            a->nops = 0;
            a->iop = 0;
            if (a->data_fresh) {
                a->data_off = next++ * cs;
                ops_add(a, a->data_off / cs, +1);
            }
            if (a->l2_fresh) {
                a->l2_off = next * cs;
                ops_add(a, a->l2_off / cs, +1);
            }
            a->step = A_DATA;
            break;
        }
        case A_DATA:
            if (p->len == cs) {
                alloc_write(s, a->data_off, p->buf, cs, false);
            } else {
                if (!a->iobuf) {  /* backing file: the rest of the cluster is the backing's */
                    a->iobuf = qcow2_alloc_buf(cs);
                    ret = qcow2_backing_fill(s, p->voff, a->iobuf, &a->w);
                    if (ret < 0)
                        alloc_fail(s, ret);
                    if (ret != 0)
                        return;  /* failed, or a->w comes back to this step */
                }
                memcpy((char *)a->iobuf + (p->voff & (cs - 1)), p->buf, p->len);
                alloc_write(s, a->data_off, a->iobuf, cs, true);
            }
            return;
        case A_L2:
            if (!a->new_l2) {
                a->step = A_INCS;
                a->iop = 0;
                break;
            }
            a->l2_table = qcow2_alloc_buf(cs);
            ((uint64_t *)a->l2_table)[a->l2_idx] = htobe64(a->data_off | QCOW2_OFLAG_COPIED);
            alloc_write(s, a->l2_off, a->l2_table, cs, false);
            return;
        case A_LINK:
            if (a->new_l2) {
                e = htobe64(a->l2_off | QCOW2_OFLAG_COPIED);
                size_t l1_len = ((size_t)s->l1_size * 8 + s->meta_align - 1) &
                                ~(size_t)(s->meta_align - 1);
                alloc_patch(s, PATCH_L1, 0, s->l1, l1_len, s->l1_offset,
                            (uint32_t)(a->l1_idx * 8), &e, 8);
            } else {
                const void *table = qcow2_cache_get(s->l2_cache, a->l2_off, &a->w);
                if (!table)
                    return;
                e = htobe64(a->data_off | QCOW2_OFLAG_COPIED);
                alloc_patch(s, PATCH_L2, a->l2_off, table, cs, a->l2_off,
                            (uint32_t)(a->l2_idx * 8), &e, 8);
            }
            return;
        case A_DONE:
            if (a->new_l2)
                qcow2_cache_insert(s->l2_cache, a->l2_off, a->l2_table);
            a->nowned = 0;
            alloc_finish(s, 0, 0);
            return;
        }
    }
}

static void alloc_wait_done(struct qcow2_waiter *w, int ret)
{
    struct qcow2_state *s = container_of(w, struct qcow2_state, alloc.w);

    if (ret < 0 && s->alloc.step == A_COVER_FREE) {
        s->alloc.iop++;
        ret = 0;
    }
    if (ret < 0)
        alloc_fail(s, ret);
    else
        alloc_run(s);
}

/* Start queued allocations while the lock is free. Not reentrant: an allocation that ends at
 * once (a lookup that finds the cluster allocated) returns here, and the loop goes on. */
static void kick(struct qcow2_state *s)
{
    if (s->kicking)
        return;
    s->kicking = true;
    while (!s->alloc_busy && s->queue_head) {
        struct qcow2_part *p = s->queue_head;
        s->queue_head = p->next;
        if (!s->queue_head)
            s->queue_tail = &s->queue_head;
        s->alloc_busy = true;
        s->alloc.part = p;
        s->alloc.step = A_LOOKUP;
        s->alloc.w.cb = alloc_wait_done;
        alloc_run(s);
    }
    s->kicking = false;
}

void qcow2_alloc_enqueue(struct qcow2_state *s, struct qcow2_part *p)
{
    p->next = NULL;
    *s->queue_tail = p;
    s->queue_tail = &p->next;
    kick(s);
}

void qcow2_alloc_cleanup(struct qcow2_state *s)
{
    free(s->alloc.ops);
    s->alloc.ops = NULL;
    free(s->spare);
    s->spare = NULL;
}
