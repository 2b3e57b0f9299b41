/* qcow2 writable open: every reference counted against the refcounts. See qcow2-check.h.
 *
 * The spec on the dirty bit: "refcounts may be inconsistent, make sure to scan L1/L2 tables
 * to repair refcounts before accessing the image." QEMU does that for a dirty image only;
 * this driver does it at every writable open, because it trusts no refcount it has not
 * checked (a free that trusts a wrong refcount releases a cluster still in use: an
 * acknowledged write lost) and because it is what makes a crash cost nothing: the clusters a
 * killed thinblkd had reserved ahead are leaks, and this is where they come back.
 */
#include <endian.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2-check.h"

#include "block/qcow2.h"
#include "block/sync-io.h"
#include "common/log.h"
#include "common/util.h"
#include "common/vector.h"

/* ---- references per cluster ---------------------------------------------------------------- */

/* Two bits per cluster: no reference, one that others may share (compressed data), one
 * that must be the only (a table, a data cluster), or more (counted in the map). */
enum { REF_NONE, REF_SHARED, REF_EXCL, REF_MORE };
#define MORE_EXCL 0x80000000u   /* in the map: one of the references is exclusive */
#define MORE_MAX 0x7fffffffu

struct refs {
    uint64_t n;          /* clusters [0, n) are counted */
    uint8_t *bits;
    struct u64map more;  /* REF_MORE clusters: the count, | MORE_EXCL */
};

static unsigned refs_state(const struct refs *r, uint64_t c)
{
    return c < r->n ? (r->bits[c >> 2] >> ((c & 3) * 2)) & 3 : REF_NONE;
}

static void refs_set(struct refs *r, uint64_t c, unsigned st)
{
    unsigned shift = (unsigned)(c & 3) * 2;

    r->bits[c >> 2] = (uint8_t)((r->bits[c >> 2] & ~(3u << shift)) | st << shift);
}

/* Cover clusters [0, n): 0, or -1 if there is no memory for it. */
static int refs_reserve(struct refs *r, uint64_t n)
{
    if (n <= r->n)
        return 0;
    uint64_t bytes = (n + 3) / 4, old = (r->n + 3) / 4;
    if (bytes > SIZE_MAX)
        return -1;
    if (!r->bits) {
        /* The first time, for the whole file: calloc() leaves untouched pages unallocated. */
        r->bits = calloc((size_t)bytes, 1);
    } else {
        uint8_t *b = realloc(r->bits, (size_t)bytes);
        if (b)
            memset(b + old, 0, (size_t)(bytes - old));
        if (b)
            r->bits = b;
        else
            return -1;
    }
    if (!r->bits)
        return -1;
    r->n = MAX(n, r->n);
    return 0;
}

/* Add a reference to c (< r->n): false if c now has an exclusive reference and another. */
static bool refs_add(struct refs *r, uint64_t c, bool excl)
{
    unsigned st = refs_state(r, c);
    uint32_t *m;

    if (st == REF_NONE) {
        refs_set(r, c, excl ? REF_EXCL : REF_SHARED);
        return true;
    }
    m = u64map_put(&r->more, c);
    if (st != REF_MORE) {
        refs_set(r, c, REF_MORE);
        *m = 1 | (st == REF_EXCL ? MORE_EXCL : 0);
    }
    if ((*m & MORE_MAX) < MORE_MAX)
        (*m)++;
    if (excl)
        *m |= MORE_EXCL;
    return !(*m & MORE_EXCL);
}

static uint64_t refs_count(const struct refs *r, uint64_t c)
{
    switch (refs_state(r, c)) {
    case REF_NONE:
        return 0;
    case REF_MORE:
        return *u64map_get(&r->more, c) & MORE_MAX;
    default:
        return 1;
    }
}

/* Forget c's references (a cluster that turns out not to be used after all). */
static void refs_clear(struct refs *r, uint64_t c)
{
    if (c < r->n)
        refs_set(r, c, REF_NONE);
}

static void refs_free(struct refs *r)
{
    free(r->bits);
    u64map_reset(&r->more);
    *r = (struct refs){0};
}

/* The most runs of free clusters the check lists (16 bytes each): a huge image whose free
 * space is scattered keeps the rest unused until a later open finds it again. */
#define FREE_RUNS_MAX (1u << 20)

/* ---- the check ------------------------------------------------------------------------------- */

int qcow2_write_sync(struct qcow2_state *s, const void *buf, uint64_t len, uint64_t off,
                      struct error **errp)
{
    uint64_t end = (off + len + s->cluster_size - 1) & ~(uint64_t)(s->cluster_size - 1);

    if (node_pwrite_sync(s->file, buf, len, off, errp) < 0)
        return -1;
    s->meta.hwm = MAX(s->meta.hwm, end);
    return 0;
}

/* A refcount block the check changed: its offset and new contents. */
struct fixed {
    uint64_t off;
    void *buf;
};
DEFINE_VECTOR_TYPE(fixed_vector, struct fixed)

struct check {
    struct qcow2_state *s;
    struct refs refs;
    bool dirty;              /* the image's dirty bit: refcounts may be missing; repair */
    bool incomplete;         /* some reference could not be counted: reclaim nothing */
    struct error *refusal;   /* a dirty image that cannot be repaired: why */
    uint64_t conflicts, leaked, missing, copied_fixed, new_blocks;
    qcow2_run_vector free;   /* clusters with refcount 0 and no reference, in runs */
    uint64_t unlisted;       /* free clusters past FREE_RUNS_MAX runs */
    fixed_vector fixed;      /* blocks changed, written once all have been compared */
    uint64_t last_ref;       /* the last cluster referenced, + 1 */
};

static void refuse(struct check *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A dirty image cannot be repaired safely: remember the first reason. */
static void refuse(struct check *k, const char *fmt, ...)
{
    char detail[256];
    va_list ap;

    if (k->refusal)
        return;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    error_setg(&k->refusal, "qcow2: the image is dirty and cannot be repaired at open: %s; "
               "repair it with 'qemu-img check -r all' or open it read-only", detail);
}

/* Something the check cannot count: on a dirty image, a refusal; on a clean one, nothing is
 * reclaimed (the lookups check the entry again when a request gets to it). */
static void cannot_count(struct check *k, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void cannot_count(struct check *k, const char *fmt, ...)
{
    char detail[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    if (k->dirty)
        refuse(k, "%s", detail);
    else if (!k->incomplete)
        log_warn("qcow2 %s: %s; leaked clusters are not reclaimed", k->s->node->node_name,
                 detail);
    k->incomplete = true;
}

/* A conflict at cluster c (QCOW2_META_SHARED: the last use found, what, may not share it;
 * QCOW2_META_UNCOUNTED: its refcount is too low): refused on a dirty image, recorded on a
 * clean one. */
static void conflict(struct check *k, uint64_t c, unsigned why, const char *what)
{
    struct qcow2_state *s = k->s;

    if (k->dirty) {
        refuse(k, "cluster %" PRIu64 " (offset %#" PRIx64 ") is used twice, the second time by "
               "%s", c, c << s->cluster_bits, what);
        return;
    }
    if (k->conflicts++ < 8)
        log_warn("qcow2 %s: cluster %" PRIu64 " (offset %#" PRIx64 ") is in use more than "
                 "once or more than its refcount says (the last use found: %s); writes to it "
                 "and frees of it will mark the image corrupt", s->node->node_name, c,
                 c << s->cluster_bits, what);
    qcow2_meta_conflict(s, c, why);
}

/* Count a reference to clusters [first, first + count), by what. Returns false if they lie
 * past the end of the file (not counted). */
static bool ref(struct check *k, uint64_t first, uint64_t count, bool excl, const char *what)
{
    struct qcow2_state *s = k->s;

    for (uint64_t c = first; c - first < count; c++) {
        if (c >= k->refs.n) {
            cannot_count(k, "%s at offset %#" PRIx64 " lies past the end of the file", what,
                         c << s->cluster_bits);
            return false;
        }
        if (!refs_add(&k->refs, c, excl))
            conflict(k, c, QCOW2_META_SHARED, what);
        k->last_ref = MAX(k->last_ref, c + 1);
    }
    return true;
}

/* One L2 table: count what its entries use; on a dirty image fix their OFLAG_COPIED flags
 * (every cluster has one reference, no snapshots here). */
static int scan_l2(struct check *k, uint64_t l2_off, uint64_t *table, struct error **errp)
{
    struct qcow2_state *s = k->s;
    uint64_t entries = s->cluster_size / 8, fixed = 0;
    struct qcow2_cdesc d;

    if (node_pread_sync(s->file, table, s->cluster_size, l2_off, errp) < 0)
        return -1;
    for (uint64_t i = 0; i < entries; i++) {
        uint64_t e = be64toh(table[i]);
        switch (qcow2_l2e_type(e, s->cluster_bits, s->version, NULL)) {
        case QCOW2_BAD:
            cannot_count(k, "L2 table at %#" PRIx64 " has an invalid entry %" PRIu64 " (0x%"
                         PRIx64 ")", l2_off, i, e);
            break;
        case QCOW2_NORMAL:
        case QCOW2_ZERO_ALLOC:
            ref(k, (e & QCOW2_OFFSET_MASK) >> s->cluster_bits, 1, true, "a data cluster");
            if (k->dirty && !(e & QCOW2_OFLAG_COPIED)) {
                table[i] = htobe64(e | QCOW2_OFLAG_COPIED);
                fixed++;
            }
            break;
        case QCOW2_COMPRESSED:
            qcow2_cdesc_decode(e, s->cluster_bits, &d);
            ref(k, d.first, d.n, false, "a compressed cluster");
            if (k->dirty && (e & QCOW2_OFLAG_COPIED)) {
                table[i] = htobe64(e & ~QCOW2_OFLAG_COPIED);
                fixed++;
            }
            break;
        default:
            break;
        }
    }
    k->copied_fixed += fixed;
    if (fixed && !k->refusal && qcow2_write_sync(s, table, s->cluster_size, l2_off,
                                                 errp) < 0)
        return -1;
    return 0;
}

/* Count every reference of the image. */
static int count_refs(struct check *k, struct error **errp)
{
    struct qcow2_state *s = k->s;
    uint64_t cs = s->cluster_size;
    bool l1_fixed = false;

    ref(k, 0, 1, true, "the header");
    ref(k, s->l1_offset / cs, ((uint64_t)s->l1_size * 8 + cs - 1) / cs, true, "the L1 table");
    ref(k, s->rt_offset / cs, s->rt_clusters, true, "the refcount table");
    for (uint64_t b = 0; b < s->rt_entries; b++) {
        uint64_t e = be64toh(s->rt[b]);
        if ((e & QCOW2_RT_RESERVED) || (e & (cs - 1))) {
            cannot_count(k, "refcount table entry %" PRIu64 " is invalid (0x%" PRIx64 ")", b, e);
            continue;
        }
        if (e)
            ref(k, e / cs, 1, true, "a refcount block");
    }
    _cleanup_free_ uint64_t *table = qcow2_alloc_buf(cs);
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t e = be64toh(s->l1[i]), l2_off = e & QCOW2_OFFSET_MASK;
        if ((e & QCOW2_L1_RESERVED) || (l2_off & (cs - 1))) {
            cannot_count(k, "L1 entry %" PRIu32 " is invalid (0x%" PRIx64 ")", i, e);
            continue;
        }
        if (!l2_off)
            continue;
        /* A table claimed before (by another L1 entry, as a refcount block or a table) is
         * in conflict, and its entries are counted once. */
        bool first = refs_state(&k->refs, l2_off / cs) == REF_NONE;
        if (!ref(k, l2_off / cs, 1, true, "an L2 table") || !first)
            continue;
        if (scan_l2(k, l2_off, table, errp) < 0)
            return -1;
        if (k->dirty && !(e & QCOW2_OFLAG_COPIED)) {
            s->l1[i] = htobe64(e | QCOW2_OFLAG_COPIED);
            k->copied_fixed++;
            l1_fixed = true;
        }
    }
    /* s->l1 is read rounded up to meta_align, the tail as it was on disk. */
    if (l1_fixed && !k->refusal &&
        qcow2_write_sync(s, s->l1, qcow2_l1_bytes(s), s->l1_offset, errp) < 0)
        return -1;
    return 0;
}

/* ---- refcount structures for a dirty image's clusters that have none ------------------------- */

/* New refcount structures, placed from the first cluster after the last one in use. */
struct growth {
    u64_vector newb;     /* per block index: the new block's cluster, or 0 */
    uint64_t next;       /* the next cluster to place one at */
    uint64_t rt_first;   /* a new refcount table: its first cluster and size, or 0 */
    uint64_t rt_k;
};

/* Clusters [b << rb_bits, (b + 1) << rb_bits) hold one in use. */
static bool block_in_use(const struct check *k, uint64_t b)
{
    uint64_t first = b << k->s->rb_bits, end = MIN(k->refs.n, (b + 1) << k->s->rb_bits);

    for (uint64_t c = first; c < end; c++) {
        if (refs_state(&k->refs, c) != REF_NONE)
            return true;
    }
    return false;
}

static uint64_t used_end(const struct check *k)
{
    uint64_t c = MIN(k->last_ref, k->refs.n);

    while (c > 0 && refs_state(&k->refs, c - 1) == REF_NONE)
        c--;
    return c;
}

static int place(struct check *k, struct growth *g, uint64_t n, struct error **errp)
{
    if (refs_reserve(&k->refs, g->next + n) < 0) {
        error_setg(errp, "qcow2: not enough memory to repair the dirty image (%" PRIu64
                   " clusters)", g->next + n);
        return -1;
    }
    for (uint64_t i = 0; i < n; i++)
        refs_add(&k->refs, g->next + i, true);
    g->next += n;
    k->last_ref = MAX(k->last_ref, g->next);
    return 0;
}

/* Find the refcount blocks (and table) the counted clusters lack; place them, and count them
 * too, until nothing more is needed. */
static int plan_growth(struct check *k, struct growth *g, struct error **errp)
{
    struct qcow2_state *s = k->s;
    uint64_t cs = s->cluster_size, entries = s->rt_entries;

    g->next = used_end(k);
    for (;;) {
        bool changed = false;
        uint64_t nb = (used_end(k) + (1ULL << s->rb_bits) - 1) >> s->rb_bits, last = 0;
        u64_vector_grow_to(&g->newb, nb);
        for (uint64_t b = 0; b < nb; b++) {
            if (!block_in_use(k, b))
                continue;
            last = b + 1;
            if (qcow2_rt_entry(s, b) || g->newb.ptr[b])
                continue;
            g->newb.ptr[b] = g->next;
            if (place(k, g, 1, errp) < 0)
                return -1;
            k->new_blocks++;
            changed = true;
        }
        if (last > entries) {
            uint64_t n = (last * 8 + cs - 1) / cs;
            n += n / 4 + 1;  /* room to grow, so that the table does not move again soon */
            if (n * cs > QCOW2_MAX_RT_BYTES) {
                refuse(k, "the refcount table would exceed %u bytes", QCOW2_MAX_RT_BYTES);
                return 0;
            }
            if (g->rt_k) {
                for (uint64_t i = 0; i < g->rt_k; i++)
                    refs_clear(&k->refs, g->rt_first + i);  /* too small already: unwritten */
            } else {
                for (uint64_t i = 0; i < s->rt_clusters; i++)
                    refs_clear(&k->refs, s->rt_offset / cs + i);  /* the old table, replaced */
            }
            g->rt_first = g->next;
            g->rt_k = n;
            entries = n * cs / 8;
            if (place(k, g, n, errp) < 0)
                return -1;
            changed = true;
        }
        if (!changed)
            return 0;
    }
}

/* ---- comparing, reclaiming, repairing ---------------------------------------------------------- */

/* Cluster c has refcount 0 and nothing references it: free, unless the check ends up
 * changing nothing. Blocks are compared in order, so the runs grow at their end. */
static void add_free(struct check *k, uint64_t c)
{
    struct qcow2_run *last = k->free.len ? &k->free.ptr[k->free.len - 1] : NULL;

    if (last && last->first + last->n == c)
        last->n++;
    else if (k->free.len < FREE_RUNS_MAX)
        qcow2_run_vector_append(&k->free, (struct qcow2_run){c, 1});
    else
        k->unlisted++;
}

/* Make refcount block b at off agree with the references where it may (a new one: from
 * zeroes); a changed block goes to k->fixed. *last: the last cluster with a refcount after
 * that, + 1. */
static int fix_block(struct check *k, uint64_t b, uint64_t off, bool fresh, uint64_t *last,
                     struct error **errp)
{
    struct qcow2_state *s = k->s;
    uint64_t epb = 1ULL << s->rb_bits, max = qcow2_refcount_max(s->refcount_order);
    void *block = qcow2_alloc_buf(s->cluster_size);
    bool changed = fresh;

    if (!fresh && node_pread_sync(s->file, block, s->cluster_size, off, errp) < 0) {
        free(block);
        return -1;
    }
    for (uint64_t j = 0; j < epb; j++) {
        uint64_t c = (b << s->rb_bits) + j;
        uint64_t want = refs_count(&k->refs, c), have = qcow2_refcount_get(s->refcount_order,
                                                                           block, j);
        if (want > max) {
            if (k->dirty)
                refuse(k, "cluster %" PRIu64 " has %" PRIu64 " references, more than %u-bit "
                       "refcounts hold", c, want, 1u << s->refcount_order);
            else
                conflict(k, c, QCOW2_META_UNCOUNTED,
                         "too many references for its refcount width");
            want = have;
        }
        if (want > have && !k->dirty) {
            conflict(k, c, QCOW2_META_UNCOUNTED, "a reference its refcount does not count");
            want = have;
        }
        if (want < have && k->incomplete)
            want = have;  /* a reference we could not count may be the one */
        if (want != have) {
            if (!fresh) {
                k->missing += want > have;
                k->leaked += want < have;
            }
            qcow2_refcount_set(s->refcount_order, block, j, want);
            changed = true;
        }
        if (want || (have && k->incomplete))
            *last = c + 1;
        else
            add_free(k, c);
    }
    if (changed)
        fixed_vector_append(&k->fixed, (struct fixed){.off = off, .buf = block});
    else
        free(block);
    return 0;
}

int qcow2_write_header(struct qcow2_state *s, struct error **errp)
{
    _cleanup_free_ void *h = qcow2_alloc_buf(s->meta_align);

    memcpy(h, s->header, s->meta_align);
    return qcow2_write_sync(s, h, s->meta_align, 0, errp);
}

/* Every refcount block against the references (new blocks of a dirty image included), then,
 * if nothing forbids it, the changed blocks written and new ones linked into the table,
 * which moves if it grew. *last as fix_block(). */
static int compare_and_fix(struct check *k, struct growth *g, uint64_t *last,
                           struct error **errp)
{
    struct qcow2_state *s = k->s;
    uint64_t cs = s->cluster_size;

    for (uint64_t b = 0; b < g->newb.len; b++) {
        if (g->newb.ptr[b] && fix_block(k, b, g->newb.ptr[b] * cs, true, last, errp) < 0)
            return -1;
    }
    for (uint64_t b = 0; b < s->rt_entries; b++) {
        uint64_t e = be64toh(s->rt[b]), off = e & QCOW2_OFFSET_MASK;
        if (!off || (e & QCOW2_RT_RESERVED) || (off & (cs - 1)))
            continue;
        if (off / cs >= k->refs.n || refs_count(&k->refs, off / cs) != 1) {
            /* Past the end of the file, or also something else: not read as refcounts. */
            k->incomplete = true;
            continue;
        }
        if (fix_block(k, b, off, false, last, errp) < 0)
            return -1;
    }
    /* Clusters in use that no block counts (a dirty image got blocks for them above). */
    uint64_t end = used_end(k);
    for (uint64_t b = 0; !k->dirty && b << s->rb_bits < end; b++) {
        if (qcow2_rt_entry(s, b))
            continue;
        for (uint64_t c = b << s->rb_bits; c < MIN(end, (b + 1) << s->rb_bits); c++) {
            if (refs_state(&k->refs, c) != REF_NONE)
                conflict(k, c, QCOW2_META_UNCOUNTED, "a reference no refcount block counts");
        }
    }
    if (k->refusal)
        return 0;
    if (!k->dirty && (k->conflicts || k->incomplete)) {
        /* Which reference is right is not known: change nothing, reclaim nothing. */
        if (k->leaked)
            log_warn("qcow2 %s: %" PRIu64 " leaked clusters are not reclaimed: the image has "
                     "clusters in conflict or entries that cannot be counted",
                     s->node->node_name, k->leaked);
        k->leaked = 0;
        k->free.len = 0;
        k->unlisted = 0;
        *last = MAX(*last, k->last_ref);
        for (size_t i = 0; i < k->fixed.len; i++)
            free(k->fixed.ptr[i].buf);
        k->fixed.len = 0;
        return 0;
    }
    for (size_t i = 0; i < k->fixed.len; i++) {
        if (qcow2_write_sync(s, k->fixed.ptr[i].buf, cs, k->fixed.ptr[i].off, errp) < 0)
            return -1;
    }
    if (!g->rt_k && !k->new_blocks)
        return 0;
    uint64_t n = g->rt_k ? g->rt_k : s->rt_clusters;
    uint64_t *rt = qcow2_alloc_buf(n * cs);
    memcpy(rt, s->rt, s->rt_entries * 8);
    for (uint64_t b = 0; b < g->newb.len; b++) {
        if (g->newb.ptr[b])
            rt[b] = htobe64(g->newb.ptr[b] * cs);
    }
    uint64_t off = g->rt_k ? g->rt_first * cs : s->rt_offset;
    if (qcow2_write_sync(s, rt, n * cs, off, errp) < 0) {
        free(rt);
        return -1;
    }
    free(s->rt);
    s->rt = rt;
    for (uint64_t b = 0; b < g->newb.len; b++) {
        if (g->newb.ptr[b])
            qcow2_meta_add(s, g->newb.ptr[b], QCOW2_META_RB);
    }
    if (g->rt_k) {
        /* The header switches to the new table (still dirty: the old table is free now). */
        qcow2_put_be64((uint8_t *)s->header + 48, off);
        qcow2_put_be32((uint8_t *)s->header + 56, (uint32_t)n);
        s->rt_offset = off;
        s->rt_clusters = (uint32_t)n;
        s->rt_entries = n * cs / 8;
        if (qcow2_write_header(s, errp) < 0)
            return -1;
    }
    return 0;
}

static int run_cmp(const void *a, const void *b)
{
    uint64_t x = ((const struct qcow2_run *)a)->first, y = ((const struct qcow2_run *)b)->first;

    return x < y ? -1 : x > y;
}

/* The free clusters below the new end (leaks reclaimed, and those freed before: discarded
 * clusters are reused after a reopen) go to the free list, the lowest handed out first (the
 * list is taken from its end); those above are free space after next_free. */
static void reclaim_free(struct check *k, uint64_t end)
{
    struct qcow2_state *s = k->s;
    uint64_t n = 0;

    if (k->free.len)
        qsort(k->free.ptr, k->free.len, sizeof(*k->free.ptr), run_cmp);
    for (size_t i = k->free.len; i-- > 0;) {
        struct qcow2_run *r = &k->free.ptr[i];
        if (r->first < end) {
            qcow2_reserve_put_free(s, r->first, MIN(r->n, end - r->first));
            n += MIN(r->n, end - r->first);
        }
    }
    if (n)
        log_info("qcow2 %s: %" PRIu64 " free clusters below the end of the image%s",
                 s->node->node_name, n, k->unlisted ? " (more, not listed: too scattered)" : "");
}

int qcow2_check_open(struct qcow2_state *s, struct error **errp)
{
    struct check k = {.s = s, .dirty = (s->incompat & QCOW2_INCOMPAT_DIRTY) != 0};
    struct growth g = {0};
    uint64_t last = 0, t0 = now_monotonic_ns(), cs = s->cluster_size;
    int ret = -1;

    if (refs_reserve(&k.refs, MAX(s->meta.hwm >> s->cluster_bits, 1)) < 0) {
        error_setg(errp, "qcow2: not enough memory to check the image (%" PRIu64 " clusters)",
                   s->meta.hwm >> s->cluster_bits);
        goto out;
    }
    if (count_refs(&k, errp) < 0)
        goto out;
    if (k.dirty && !k.refusal && plan_growth(&k, &g, errp) < 0)
        goto out;
    if (!k.refusal && compare_and_fix(&k, &g, &last, errp) < 0)
        goto out;
    if (k.refusal) {
        error_propagate(errp, k.refusal);
        k.refusal = NULL;
        goto out;
    }
    if (k.dirty) {
        ((uint8_t *)s->header)[QCOW2_HDR_INCOMPAT + 7] &= (uint8_t)~QCOW2_INCOMPAT_DIRTY;
        if (qcow2_write_header(s, errp) < 0)
            goto out;
        s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
        log_warn("qcow2 %s: the image was dirty (lazy refcounts); repaired: %" PRIu64 " missing "
                 "refcounts set, %" PRIu64 " leaked clusters freed, %" PRIu64 " refcount blocks "
                 "added%s, %" PRIu64 " OFLAG_COPIED flags fixed", s->node->node_name, k.missing,
                 k.leaked, k.new_blocks, g.rt_k ? ", the refcount table moved" : "",
                 k.copied_fixed);
    } else if (k.leaked) {
        log_info("qcow2 %s: %" PRIu64 " leaked clusters reclaimed", s->node->node_name,
                 k.leaked);
    }
    /* Whatever the refcounts say, never allocate over what is referenced or the tables. */
    last = MAX(last, k.last_ref);
    last = MAX(last, 1);
    last = MAX(last, (s->l1_offset + (uint64_t)s->l1_size * 8 + cs - 1) / cs);
    last = MAX(last, s->rt_offset / cs + s->rt_clusters);
    qcow2_reserve_skip_to(s, last);
    reclaim_free(&k, last);
    log_debug("qcow2 %s: checked %" PRIu64 " clusters in %.3f s", s->node->node_name,
              k.refs.n, (double)(now_monotonic_ns() - t0) / 1e9);
    ret = 0;
out:
    error_free(k.refusal);
    qcow2_run_vector_reset(&k.free);
    for (size_t i = 0; i < k.fixed.len; i++)
        free(k.fixed.ptr[i].buf);
    fixed_vector_reset(&k.fixed);
    refs_free(&k.refs);
    u64_vector_reset(&g.newb);
    return ret;
}
