/* qcow2 repair at open: a dirty image (lazy refcounts) gets its refcounts rebuilt.
 *
 * The spec: "Dirty bit. If this bit is set then refcounts may be inconsistent, make sure to
 * scan L1/L2 tables to repair refcounts before accessing the image." QEMU with
 * lazy-refcounts=on writes refcounts late and sets the bit; killed before it cleared it, the
 * image has clusters in use with refcount 0, which an allocator would hand out again. As
 * QEMU's open does (qcow2_check with repair on a read/write open of a dirty image), a writable
 * open counts every reference (the header, the L1 table, the L2 tables, the data and
 * compressed clusters, the refcount table and blocks), then makes the refcount blocks say
 * exactly that: missing refcounts are set, leaks (refcount above the references) freed. Where
 * a referenced cluster has no refcount block, new blocks (and, if need be, a larger table)
 * go after the last cluster in use. Then the dirty bit is cleared. Missing OFLAG_COPIED flags
 * on L1 and L2 entries (every cluster has one reference, no snapshots here) are set, and the
 * flag cleared on compressed entries, as `qemu-img check -r all` does.
 *
 * What it does not repair, refusing the writable open instead (QEMU's repair would guess):
 * a cluster used twice where at most one reference is allowed (two L2 entries, metadata and
 * data), invalid L1/L2/refcount table entries, references past the end of the file, more
 * references than the refcount width holds. Snapshotted images are refused writable before
 * (qcow2.c), so there are no snapshot tables to walk.
 *
 * I/O: blocking, through sync-io.h, as the rest of open: it runs once, inside open(), before
 * the node has a parent (QEMU's check also runs inside bdrv_open). Every write is followed by
 * fdatasync(). The image stays dirty until all fixes are written, so a crash in the middle
 * leaves an image that the next open repairs again; nothing is ever written over a cluster
 * in use other than the metadata being fixed. Memory: 4 bytes and 1 bit per cluster of the
 * file, as QEMU's check.
 *
 * thinblkd itself never sets the dirty bit: refcounts are written before the entries that
 * use them (qcow2-alloc.c), whatever the lazy-refcounts option says.
 */
#include <endian.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/qcow2.h"
#include "block/sync-io.h"
#include "common/log.h"
#include "common/util.h"

#define MAX_RT_BYTES (8u << 20)  /* as qcow2.c's limit on open */

struct repair {
    struct qcow2_state *s;
    uint32_t *cnt;             /* references to each cluster */
    uint8_t *excl;             /* a bit per cluster: one of its references must be the only */
    uint64_t n;                /* clusters in cnt and excl */
    uint64_t limit;            /* clusters of the file: every reference must lie below */
    uint64_t copied_fixed;     /* L1/L2 entries whose OFLAG_COPIED was fixed */
    uint64_t missing, leaked;  /* refcounts raised, lowered */
    uint64_t new_blocks;
};

static void refuse(struct error **errp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The one error of this file: the repair cannot fix the image safely. */
static void refuse(struct error **errp, const char *fmt, ...)
{
    char detail[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    error_setg(errp, "qcow2: the image is dirty and cannot be repaired at open: %s; repair it "
               "with 'qemu-img check -r all' or open it read-only", detail);
}

/* Make room for clusters [0, n): 0 or -1 with *errp set. */
static int reserve(struct repair *r, uint64_t n, struct error **errp)
{
    if (n <= r->n)
        return 0;
    uint64_t cap = MAX(n, r->n + r->n / 4);
    uint32_t *cnt = NULL;
    uint8_t *excl = NULL;

    if (cap <= SIZE_MAX / 4 && !r->cnt) {
        /* The first time, for the whole file: calloc() leaves untouched pages unallocated. */
        cnt = calloc(cap, 4);
        excl = cnt ? calloc(cap / 8 + 1, 1) : NULL;
        if (excl) {
            r->cnt = cnt;
            r->excl = excl;
            r->n = cap;
            return 0;
        }
        free(cnt);
    } else if (cap <= SIZE_MAX / 4) {
        cnt = realloc(r->cnt, cap * 4);
        if (cnt)
            r->cnt = cnt;
        excl = cnt ? realloc(r->excl, cap / 8 + 1) : NULL;
        if (excl) {
            r->excl = excl;
            memset(r->cnt + r->n, 0, (cap - r->n) * 4);
            /* The new bytes (bits from r->n in the byte before were never set). */
            memset(r->excl + r->n / 8 + 1, 0, cap / 8 - r->n / 8);
            r->n = cap;
            return 0;
        }
    }
    error_setg(errp, "qcow2: not enough memory to repair the dirty image (%" PRIu64
               " clusters)", cap);
    return -1;
}

static bool excl_bit(const struct repair *r, uint64_t c)
{
    return r->excl[c / 8] >> (c % 8) & 1;
}

/* Count a reference to count clusters from first, by what. */
static int ref(struct repair *r, uint64_t first, uint64_t count, bool excl, const char *what,
               struct error **errp)
{
    for (uint64_t c = first; c - first < count; c++) {
        if (c >= r->limit) {
            refuse(errp, "%s at offset 0x%" PRIx64 " lies past the end of the file", what,
                   c << r->s->cluster_bits);
            return -1;
        }
        if (r->cnt[c] == UINT32_MAX) {
            refuse(errp, "cluster %" PRIu64 " has too many references", c);
            return -1;
        }
        r->cnt[c]++;
        if (excl)
            r->excl[c / 8] |= (uint8_t)(1u << (c % 8));
        if (excl_bit(r, c) && r->cnt[c] > 1) {
            refuse(errp, "cluster %" PRIu64 " (offset 0x%" PRIx64 ") is used twice, the second "
                   "time by %s", c, c << r->s->cluster_bits, what);
            return -1;
        }
    }
    return 0;
}

/* One L2 table: count what its entries use, fix their OFLAG_COPIED flags. */
static int scan_l2(struct repair *r, uint64_t l2_off, uint64_t *table, struct error **errp)
{
    struct qcow2_state *s = r->s;
    uint64_t entries = s->cluster_size / 8, fixed = 0;

    if (node_pread_sync(s->file, table, s->cluster_size, l2_off, errp) < 0)
        return -1;
    for (uint64_t i = 0; i < entries; i++) {
        uint64_t e = be64toh(table[i]), first, n;
        switch (qcow2_classify(s, e)) {
        case QCOW2_BAD:
            refuse(errp, "L2 table at 0x%" PRIx64 " has an invalid entry %" PRIu64 " (0x%"
                   PRIx64 ")", l2_off, i, e);
            return -1;
        case QCOW2_NORMAL:
        case QCOW2_ZERO_ALLOC:
            if (ref(r, (e & QCOW2_OFFSET_MASK) >> s->cluster_bits, 1, true, "a data cluster",
                    errp) < 0)
                return -1;
            if (!(e & QCOW2_OFLAG_COPIED)) {
                table[i] = htobe64(e | QCOW2_OFLAG_COPIED);
                fixed++;
            }
            break;
        case QCOW2_COMPRESSED:
            qcow2_compressed_span(s, e, &first, &n);
            if (ref(r, first, n, false, "a compressed cluster", errp) < 0)
                return -1;
            if (e & QCOW2_OFLAG_COPIED) {
                table[i] = htobe64(e & ~QCOW2_OFLAG_COPIED);
                fixed++;
            }
            break;
        default:
            break;
        }
    }
    r->copied_fixed += fixed;
    if (fixed && node_pwrite_sync(s->file, table, s->cluster_size, l2_off, errp) < 0)
        return -1;
    return 0;
}

/* Count every reference of the image. */
static int count_refs(struct repair *r, struct error **errp)
{
    struct qcow2_state *s = r->s;
    uint64_t cs = s->cluster_size;
    bool l1_fixed = false;

    if (ref(r, 0, 1, true, "the header", errp) < 0 ||
        ref(r, s->l1_offset / cs, ((uint64_t)s->l1_size * 8 + cs - 1) / cs, true,
            "the L1 table", errp) < 0 ||
        ref(r, s->rt_offset / cs, s->rt_clusters, true, "the refcount table", errp) < 0)
        return -1;
    for (uint64_t b = 0; b < s->rt_entries; b++) {
        uint64_t e = be64toh(s->rt[b]);
        if ((e & QCOW2_RT_RESERVED) || (e & (cs - 1))) {
            refuse(errp, "refcount table entry %" PRIu64 " is invalid (0x%" PRIx64 ")", b, e);
            return -1;
        }
        if (e && ref(r, e / cs, 1, true, "a refcount block", errp) < 0)
            return -1;
    }
    _cleanup_free_ uint64_t *table = qcow2_alloc_buf(cs);
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t e = be64toh(s->l1[i]), l2_off = e & QCOW2_OFFSET_MASK;
        if ((e & QCOW2_L1_RESERVED) || (l2_off & (cs - 1))) {
            refuse(errp, "L1 entry %" PRIu32 " is invalid (0x%" PRIx64 ")", i, e);
            return -1;
        }
        if (!l2_off)
            continue;
        if (ref(r, l2_off / cs, 1, true, "an L2 table", errp) < 0 ||
            scan_l2(r, l2_off, table, errp) < 0)
            return -1;
        if (!(e & QCOW2_OFLAG_COPIED)) {
            s->l1[i] = htobe64(e | QCOW2_OFLAG_COPIED);
            r->copied_fixed++;
            l1_fixed = true;
        }
    }
    /* s->l1 is read rounded up to meta_align, the tail as it was on disk. */
    size_t l1_len = ((size_t)s->l1_size * 8 + s->meta_align - 1) & ~(size_t)(s->meta_align - 1);
    if (l1_fixed && node_pwrite_sync(s->file, s->l1, l1_len, s->l1_offset, errp) < 0)
        return -1;
    uint64_t max = qcow2_refcount_max(s);
    for (uint64_t c = 0; c < r->n; c++) {
        if (r->cnt[c] > max) {
            refuse(errp, "cluster %" PRIu64 " has %" PRIu32 " references, more than %u-bit "
                   "refcounts hold", c, r->cnt[c], 1u << s->refcount_order);
            return -1;
        }
    }
    return 0;
}

/* Clusters [b << rb_bits, (b + 1) << rb_bits) (block b's) hold one in use. */
static bool block_in_use(const struct repair *r, uint64_t b)
{
    uint64_t first = b << r->s->rb_bits, end = MIN(r->n, (b + 1) << r->s->rb_bits);

    for (uint64_t c = first; c < end; c++) {
        if (r->cnt[c])
            return true;
    }
    return false;
}

/* The last cluster in use, + 1. */
static uint64_t used_end(const struct repair *r)
{
    uint64_t c = r->n;

    while (c > 0 && !r->cnt[c - 1])
        c--;
    return c;
}

/* New refcount structures, placed from the first cluster after the last one in use. */
struct growth {
    uint64_t *newb;      /* per block index: the new block's cluster, or 0 */
    uint64_t nb;         /* entries of newb */
    uint64_t next;       /* the next cluster to place one at */
    uint64_t rt_first;   /* a new refcount table: its first cluster and size, or 0 */
    uint64_t rt_k;
};

static int place(struct repair *r, struct growth *g, uint64_t k, struct error **errp)
{
    if (reserve(r, g->next + k, errp) < 0)
        return -1;
    for (uint64_t i = 0; i < k; i++)
        r->cnt[g->next + i] = 1;
    g->next += k;
    return 0;
}

/* Find the refcount blocks (and table) that the counted clusters lack; places them, and
 * counts them too, until nothing more is needed. */
static int plan_growth(struct repair *r, struct growth *g, struct error **errp)
{
    struct qcow2_state *s = r->s;
    uint64_t cs = s->cluster_size, entries = s->rt_entries;

    g->next = used_end(r);
    for (;;) {
        bool changed = false;
        uint64_t nb = (used_end(r) + (1ULL << s->rb_bits) - 1) >> s->rb_bits, last = 0;
        if (nb > g->nb) {
            g->newb = xrealloc(g->newb, nb * sizeof(*g->newb));
            memset(g->newb + g->nb, 0, (nb - g->nb) * sizeof(*g->newb));
            g->nb = nb;
        }
        for (uint64_t b = 0; b < nb; b++) {
            if (!block_in_use(r, b))
                continue;
            last = b + 1;
            if (qcow2_rt_block(s, b) || g->newb[b])
                continue;
            g->newb[b] = g->next;
            if (place(r, g, 1, errp) < 0)
                return -1;
            r->new_blocks++;
            changed = true;
        }
        if (last > entries) {
            uint64_t k = (last * 8 + cs - 1) / cs;
            k += k / 4 + 1;  /* room to grow, so that the table does not move again soon */
            if (k * cs > MAX_RT_BYTES) {
                refuse(errp, "the refcount table would exceed %u bytes", MAX_RT_BYTES);
                return -1;
            }
            if (g->rt_k) {
                for (uint64_t i = 0; i < g->rt_k; i++)
                    r->cnt[g->rt_first + i] = 0;  /* too small already: never written */
            } else {
                for (uint64_t i = 0; i < s->rt_clusters; i++)
                    r->cnt[s->rt_offset / cs + i] = 0;  /* the old table, once replaced */
            }
            g->rt_first = g->next;
            g->rt_k = k;
            entries = k * cs / 8;
            if (place(r, g, k, errp) < 0)
                return -1;
            changed = true;
        }
        if (!changed)
            return 0;
    }
}

/* Make refcount block b at off say what cnt says (a new one: from zeroes). */
static int fix_block(struct repair *r, uint64_t b, uint64_t off, bool fresh, void *block,
                     struct error **errp)
{
    struct qcow2_state *s = r->s;
    uint64_t epb = 1ULL << s->rb_bits;
    bool changed = fresh;

    if (fresh)
        memset(block, 0, s->cluster_size);
    else if (node_pread_sync(s->file, block, s->cluster_size, off, errp) < 0)
        return -1;
    for (uint64_t j = 0; j < epb; j++) {
        uint64_t c = (b << s->rb_bits) + j;
        uint64_t want = c < r->n ? r->cnt[c] : 0, have = qcow2_refcount_get(s, block, j);
        if (want == have)
            continue;
        if (!fresh) {
            r->missing += want > have;
            r->leaked += want < have;
        }
        qcow2_refcount_set(s, block, j, want);
        changed = true;
    }
    if (changed && node_pwrite_sync(s->file, block, s->cluster_size, off, errp) < 0)
        return -1;
    return 0;
}

/* Write the header's first meta_align bytes from s->header. */
static int write_header(struct qcow2_state *s, struct error **errp)
{
    _cleanup_free_ void *h = qcow2_alloc_buf(s->meta_align);

    memcpy(h, s->header, s->meta_align);
    return node_pwrite_sync(s->file, h, s->meta_align, 0, errp);
}

static void put_be(uint8_t *p, uint64_t v, unsigned bytes)
{
    for (unsigned i = 0; i < bytes; i++)
        p[i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
}

/* Write the new blocks, fix the old ones, link the new ones into the (new) table. */
static int write_refcounts(struct repair *r, struct growth *g, struct error **errp)
{
    struct qcow2_state *s = r->s;
    uint64_t cs = s->cluster_size;
    _cleanup_free_ void *block = qcow2_alloc_buf(cs);

    for (uint64_t b = 0; b < g->nb; b++) {
        if (g->newb[b] && fix_block(r, b, g->newb[b] * cs, true, block, errp) < 0)
            return -1;
    }
    for (uint64_t b = 0; b < s->rt_entries; b++) {
        uint64_t off = qcow2_rt_block(s, b);
        if (off && fix_block(r, b, off, false, block, errp) < 0)
            return -1;
    }
    if (!g->rt_k && !r->new_blocks)
        return 0;
    uint64_t k = g->rt_k ? g->rt_k : s->rt_clusters;
    uint64_t *rt = qcow2_alloc_buf(k * cs);
    memcpy(rt, s->rt, s->rt_entries * 8);
    for (uint64_t b = 0; b < g->nb; b++) {
        if (g->newb[b])
            rt[b] = htobe64(g->newb[b] * cs);
    }
    uint64_t off = g->rt_k ? g->rt_first * cs : s->rt_offset;
    if (node_pwrite_sync(s->file, rt, k * cs, off, errp) < 0) {
        free(rt);
        return -1;
    }
    free(s->rt);
    s->rt = rt;
    if (g->rt_k) {
        /* The header switches to the new table (still dirty: the old table is free now). */
        put_be((uint8_t *)s->header + 48, off, 8);
        put_be((uint8_t *)s->header + 56, k, 4);
        s->rt_offset = off;
        s->rt_clusters = (uint32_t)k;
        s->rt_entries = k * cs / 8;
        if (write_header(s, errp) < 0)
            return -1;
    }
    return 0;
}

int qcow2_repair(struct qcow2_state *s, struct error **errp)
{
    struct repair r = {.s = s};
    struct growth g = {0};
    int ret = -1;

    r.limit = (s->file->size + s->cluster_size - 1) >> s->cluster_bits;
    if (reserve(&r, MAX(r.limit, 1), errp) < 0)
        goto out;
    if (count_refs(&r, errp) < 0 || plan_growth(&r, &g, errp) < 0 ||
        write_refcounts(&r, &g, errp) < 0)
        goto out;
    ((uint8_t *)s->header)[79] &= (uint8_t)~QCOW2_INCOMPAT_DIRTY;  /* incompatible: 72..79 */
    if (write_header(s, errp) < 0)
        goto out;
    s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
    log_warn("qcow2 %s: the image was dirty (lazy refcounts); repaired: %" PRIu64 " missing "
             "refcounts set, %" PRIu64 " leaked clusters freed, %" PRIu64 " refcount blocks "
             "added%s, %" PRIu64 " OFLAG_COPIED flags fixed", s->node->node_name, r.missing,
             r.leaked, r.new_blocks, g.rt_k ? ", the refcount table moved" : "",
             r.copied_fixed);
    ret = 0;
out:
    free(r.cnt);
    free(r.excl);
    free(g.newb);
    return ret;
}
