/* qcow2 metadata: lookups, and the checks every piece of it passes before it is acted on.
 * See qcow2-meta.h.
 *
 * Corruption messages follow QEMU's where QEMU has the check ("L2 table offset %#x unaligned
 * (L1 index: %#x)", "Preventing invalid write on metadata (overlaps with %s)", ...); the
 * checks QEMU does not make (reserved bits, offsets past the end of the file, clusters the
 * open-time check found in conflict) say what is wrong in the same shape.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "block/qcow2.h"
#include "block/qcow2-cache.h"
#include "common/log.h"
#include "common/util.h"

/* ---- the metadata map ---------------------------------------------------------------- */

uint64_t qcow2_l1_bytes(const struct qcow2_state *s)
{
    return ((uint64_t)s->l1_size * 8 + s->meta_align - 1) & ~(uint64_t)(s->meta_align - 1);
}

uint64_t qcow2_rt_entry(const struct qcow2_state *s, uint64_t b)
{
    return b < s->rt_entries ? be64toh(s->rt[b]) & QCOW2_OFFSET_MASK : 0;
}

/* The fixed metadata: the header, the active L1 table, the refcount table. */
static const char *fixed_overlap(const struct qcow2_state *s, uint64_t cl)
{
    uint64_t cs = s->cluster_size;

    if (cl == 0)
        return "qcow2_header";
    if (s->l1_size && cl >= s->l1_offset / cs &&
        cl * cs < s->l1_offset + (uint64_t)s->l1_size * 8)
        return "active L1 table";
    if (cl >= s->rt_offset / cs && cl - s->rt_offset / cs < s->rt_clusters)
        return "refcount table";
    return NULL;
}

const char *qcow2_meta_overlap(const struct qcow2_state *s, uint64_t cl)
{
    const char *what = fixed_overlap(s, cl);
    const uint32_t *k;

    if (what)
        return what;
    k = u64map_get(&s->meta.map, cl);
    if (k && (*k & QCOW2_META_RB))
        return "refcount block";
    if (k && (*k & QCOW2_META_L2))
        return "active L2 table";
    return NULL;
}

void qcow2_meta_add(struct qcow2_state *s, uint64_t cl, unsigned kind)
{
    uint32_t *k = u64map_put(&s->meta.map, cl);

    if (*k & (QCOW2_META_L2 | QCOW2_META_RB))
        kind |= QCOW2_META_SHARED;  /* two structures claim it */
    *k |= kind;
}

void qcow2_meta_conflict(struct qcow2_state *s, uint64_t cl, unsigned why)
{
    *u64map_put(&s->meta.map, cl) |= why;
}

/* The QCOW2_META_CONFLICT bits of cl. */
static unsigned conflicted(const struct qcow2_state *s, uint64_t cl)
{
    const uint32_t *k = s->meta.map.len ? u64map_get(&s->meta.map, cl) : NULL;

    return k ? *k & QCOW2_META_CONFLICT : 0;
}

/* The cluster a table entry names is a table of this kind: not the fixed metadata; and,
 * unless the table is only read, not a table of the other kind nor claimed twice (two L1
 * entries naming one L2 table, a data cluster that is a table too): which claim is right is
 * not known, and a change through one would change the other. NULL, or what else it is. */
static const char *table_misplaced(const struct qcow2_state *s, uint64_t cl, unsigned kind,
                                   bool reading)
{
    const char *what = fixed_overlap(s, cl);
    const uint32_t *k;

    if (what)
        return what;
    k = reading ? NULL : u64map_get(&s->meta.map, cl);
    if (!k)
        return NULL;
    unsigned other = *k & ~(unsigned)QCOW2_META_CONFLICT & ~kind;
    if (other & QCOW2_META_RB)
        return "refcount block";
    if (other & QCOW2_META_L2)
        return "active L2 table";
    if (!(*k & kind))
        return NULL;  /* only in conflict as a data cluster: the check below */
    return (*k & QCOW2_META_CONFLICT) ? "another mapping" : NULL;
}

/* What may be wrong with a table entry naming a cluster, before the map is consulted. */
enum entry_wrong { ENTRY_OK, ENTRY_RESERVED, ENTRY_UNALIGNED, ENTRY_OUTSIDE, ENTRY_FIXED };

/* An L1 or refcount table entry e (reserved bits: mask): aligned, inside the file, not the
 * fixed metadata. Also used at open, before the map exists. */
static enum entry_wrong table_entry_wrong(const struct qcow2_state *s, uint64_t e,
                                          uint64_t reserved)
{
    uint64_t off = e & QCOW2_OFFSET_MASK;

    if (e & reserved)
        return ENTRY_RESERVED;
    if (off & (s->cluster_size - 1))
        return ENTRY_UNALIGNED;
    if (off && off >= s->meta.hwm)
        return ENTRY_OUTSIDE;
    if (off && fixed_overlap(s, off >> s->cluster_bits))
        return ENTRY_FIXED;
    return ENTRY_OK;
}

void qcow2_meta_init(struct qcow2_state *s)
{
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t e = be64toh(s->l1[i]);
        if ((e & QCOW2_OFFSET_MASK) && table_entry_wrong(s, e, QCOW2_L1_RESERVED) == ENTRY_OK)
            qcow2_meta_add(s, (e & QCOW2_OFFSET_MASK) >> s->cluster_bits, QCOW2_META_L2);
    }
    for (uint64_t b = 0; b < s->rt_entries; b++) {
        uint64_t e = be64toh(s->rt[b]);
        if ((e & QCOW2_OFFSET_MASK) && table_entry_wrong(s, e, QCOW2_RT_RESERVED) == ENTRY_OK)
            qcow2_meta_add(s, (e & QCOW2_OFFSET_MASK) >> s->cluster_bits, QCOW2_META_RB);
    }
}

void qcow2_meta_cleanup(struct qcow2_state *s)
{
    u64map_reset(&s->meta.map);
}

/* ---- corruption ---------------------------------------------------------------------- */

static void corrupt_header_done(struct block_req *req, int ret)
{
    if (ret < 0)
        log_warn("cannot write the qcow2 header's corrupt bit: %s", strerror(-ret));
    free(req->buf);
    free(req);
}

void qcow2_signal_corruption(struct qcow2_state *s, int64_t off, int64_t size,
                             const char *fmt, ...)
{
    struct block_graph *g = s->node->graph;
    bool fatal = s->writable;
    char msg[256];
    va_list ap;

    if (s->meta.signalled && (!fatal || s->meta.corrupt))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (fatal)
        log_error("qcow2: Marking image as corrupt: %s; further corruption events will be "
                  "suppressed", msg);
    else
        log_error("qcow2: Image is corrupt: %s; further non-fatal corruption events will be "
                  "suppressed", msg);
    if (g->emit) {
        json_t *data = json_pack("{s:s, s:s, s:s}", "device", "", "node-name",
                                 s->node->node_name, "msg", msg);
        if (off >= 0)
            json_object_set_new(data, "offset", json_integer(off));
        if (size >= 0)
            json_object_set_new(data, "size", json_integer(size));
        json_object_set_new(data, "fatal", json_boolean(fatal));
        g->emit(g->emit_opaque, "BLOCK_IMAGE_CORRUPTED", data);
    }
    s->meta.signalled = true;
    if (!fatal)
        return;
    s->meta.corrupt = true;
    if (s->version >= 3) {
        /* QEMU's qcow2_mark_corrupt(): the bit in the header, so that no writer opens the
         * image again before it is repaired. Version 2 has no such bit. */
        uint8_t *h = qcow2_alloc_buf(s->meta_align);
        struct block_req *req = xzalloc(sizeof(*req));

        ((uint8_t *)s->header)[QCOW2_HDR_INCOMPAT + 7] |= QCOW2_INCOMPAT_CORRUPT;
        s->incompat |= QCOW2_INCOMPAT_CORRUPT;
        memcpy(h, s->header, s->meta_align);
        *req = (struct block_req){.op = BLOCK_OP_WRITE, .offset = 0, .len = s->meta_align,
                                  .buf = h, .done = corrupt_header_done};
        node_submit(s->file, req);
    }
}

int qcow2_pre_write(struct qcow2_state *s, uint64_t off, uint64_t len, bool meta)
{
    uint64_t end = (off + len + s->cluster_size - 1) & ~(uint64_t)(s->cluster_size - 1);

    if (s->meta.corrupt)
        return -EIO;
    if (!meta) {
        for (uint64_t cl = off >> s->cluster_bits; cl < end >> s->cluster_bits; cl++) {
            const char *what = qcow2_meta_overlap(s, cl);
            if (what) {
                qcow2_signal_corruption(s, (int64_t)off, (int64_t)len, "Preventing invalid "
                                        "write on metadata (overlaps with %s)", what);
                return -EIO;
            }
        }
    }
    s->meta.hwm = MAX(s->meta.hwm, end);
    return 0;
}

/* ---- checked lookups ----------------------------------------------------------------- */

/* How a table's entries are named in messages (QEMU's words). */
struct table_names {
    const char *entry;       /* "L1 entry" */
    const char *target;      /* "L2 table offset" */
    const char *index;       /* "L1 index" */
    uint64_t reserved;       /* the entry's reserved bits */
    unsigned kind;           /* what the entry names: QCOW2_META_L2 or _RB */
};

static const struct table_names l1_names = {"L1 entry", "L2 table offset", "L1 index",
                                            QCOW2_L1_RESERVED, QCOW2_META_L2};
static const struct table_names rt_names = {"Refcount table entry", "Refblock offset",
                                            "reftable index", QCOW2_RT_RESERVED, QCOW2_META_RB};

/* Entry e at index idx of a table: 0 with *off (0: none), or -EIO with corruption signalled. */
static int check_table_entry(struct qcow2_state *s, const struct table_names *t, uint64_t e,
                             uint64_t idx, bool reading, uint64_t *off)
{
    uint64_t o = e & QCOW2_OFFSET_MASK;
    const char *what = NULL;

    *off = 0;
    switch (table_entry_wrong(s, e, t->reserved)) {
    case ENTRY_OK:
        if (o && (what = table_misplaced(s, o >> s->cluster_bits, t->kind, reading)) != NULL)
            break;
        *off = o;
        return 0;
    case ENTRY_RESERVED:
        qcow2_signal_corruption(s, -1, -1, "%s %#" PRIx64 " has reserved bits set (%s: %#"
                                PRIx64 ")", t->entry, e, t->index, idx);
        return -EIO;
    case ENTRY_UNALIGNED:
        qcow2_signal_corruption(s, -1, -1, "%s %#" PRIx64 " unaligned (%s: %#" PRIx64 ")",
                                t->target, o, t->index, idx);
        return -EIO;
    case ENTRY_OUTSIDE:
        qcow2_signal_corruption(s, -1, -1, "%s %#" PRIx64 " lies outside the image file (%s: %#"
                                PRIx64 ")", t->target, o, t->index, idx);
        return -EIO;
    case ENTRY_FIXED:
        what = fixed_overlap(s, o >> s->cluster_bits);
        break;
    }
    qcow2_signal_corruption(s, -1, -1, "%s %#" PRIx64 " overlaps with %s (%s: %#" PRIx64 ")",
                            t->target, o, what, t->index, idx);
    return -EIO;
}

int qcow2_l2_table(struct qcow2_state *s, uint64_t l1_idx, bool reading, uint64_t *l2_off)
{
    *l2_off = 0;
    if (l1_idx >= s->l1_size)
        return -EIO;  /* open checked that L1 covers the virtual size */
    return check_table_entry(s, &l1_names, be64toh(s->l1[l1_idx]), l1_idx, reading, l2_off);
}

/* Where the entry of voff lives, for messages: its L2 table and index. */
static void entry_where(const struct qcow2_state *s, uint64_t voff, uint64_t *l2_off,
                        uint32_t *l2_idx)
{
    uint32_t l2_bits = s->cluster_bits - 3;
    uint64_t l1_idx = voff >> (s->cluster_bits + l2_bits);

    *l2_off = l1_idx < s->l1_size ? be64toh(s->l1[l1_idx]) & QCOW2_OFFSET_MASK : 0;
    *l2_idx = (uint32_t)((voff >> s->cluster_bits) & ((1ULL << l2_bits) - 1));
}

/* The checks every use of an entry needs: its kind, and where its clusters are. */
static int check_entry(struct qcow2_state *s, uint64_t voff, uint64_t l2e)
{
    enum qcow2_bad why;
    enum qcow2_ctype t = qcow2_l2e_type(l2e, s->cluster_bits, s->version, &why);
    uint64_t host = l2e & QCOW2_OFFSET_MASK, l2_off;
    uint32_t l2_idx;
    struct qcow2_cdesc d;

    switch (t) {
    case QCOW2_NORMAL:
    case QCOW2_ZERO_ALLOC:
        if (host < s->meta.hwm)
            return 0;
        break;
    case QCOW2_COMPRESSED:
        qcow2_cdesc_decode(l2e, s->cluster_bits, &d);
        if ((d.first + d.n) << s->cluster_bits <= s->meta.hwm)
            return 0;
        break;
    case QCOW2_BAD:
        break;
    default:
        return 0;
    }
    entry_where(s, voff, &l2_off, &l2_idx);
    if (t == QCOW2_COMPRESSED)
        qcow2_signal_corruption(s, -1, -1, "Compressed cluster at %#" PRIx64 " (%" PRIu64
                                " bytes) lies outside the image file (L2 offset: %#" PRIx64
                                ", L2 index: %#" PRIx32 ")", d.off, d.len, l2_off, l2_idx);
    else if (t != QCOW2_BAD)
        qcow2_signal_corruption(s, -1, -1, "Cluster allocation offset %#" PRIx64 " lies outside "
                                "the image file (L2 offset: %#" PRIx64 ", L2 index: %#" PRIx32
                                ")", host, l2_off, l2_idx);
    else if (why == QCOW2_BAD_ZERO_V2)
        qcow2_signal_corruption(s, -1, -1, "Zero cluster entry found in pre-v3 image (L2 offset: "
                                "%#" PRIx64 ", L2 index: %#" PRIx32 ")", l2_off, l2_idx);
    else if (why == QCOW2_BAD_UNALIGNED)
        qcow2_signal_corruption(s, -1, -1, "Cluster allocation offset %#" PRIx64 " unaligned (L2 "
                                "offset: %#" PRIx64 ", L2 index: %#" PRIx32 ")", host, l2_off,
                                l2_idx);
    else
        qcow2_signal_corruption(s, -1, -1, "L2 entry %#" PRIx64 " has reserved bits set (L2 "
                                "offset: %#" PRIx64 ", L2 index: %#" PRIx32 ")", l2e, l2_off,
                                l2_idx);
    return -EIO;
}

int qcow2_lookup(struct qcow2_state *s, uint64_t voff, bool reading, struct qcow2_waiter *w,
                 uint64_t *l2e)
{
    uint32_t l2_bits = s->cluster_bits - 3;
    uint64_t l1_idx = voff >> (s->cluster_bits + l2_bits);
    uint64_t l2_idx = (voff >> s->cluster_bits) & ((1ULL << l2_bits) - 1);
    uint64_t l2_off;
    const uint64_t *table;
    int ret;

    *l2e = 0;
    ret = qcow2_l2_table(s, l1_idx, reading, &l2_off);
    if (ret < 0 || !l2_off)
        return ret;
    table = qcow2_cache_get(s->l2_cache, l2_off, w);
    if (!table)
        return 1;
    *l2e = be64toh(table[l2_idx]);
    if (check_entry(s, voff, *l2e) < 0) {
        *l2e = 0;
        return -EIO;
    }
    return 0;
}

/* Cluster cl, which a write in place or a free would change: NULL, or how something else
 * uses it, into buf. A write over metadata is qcow2_pre_write()'s to refuse, with QEMU's
 * message and the write's offset and size. */
static const char *shared_with(const struct qcow2_state *s, uint64_t cl, bool freeing,
                               char *buf, size_t len)
{
    const char *what = qcow2_meta_overlap(s, cl);

    if (what && !freeing)
        return NULL;
    unsigned why = conflicted(s, cl);
    if (what)
        snprintf(buf, len, "overlaps with %s", what);
    else if (why & QCOW2_META_SHARED)
        snprintf(buf, len, "is referenced elsewhere too");
    else if (why)
        snprintf(buf, len, "has more references than its refcount");
    else
        return NULL;
    return buf;
}

int qcow2_check_use(struct qcow2_state *s, uint64_t voff, uint64_t l2e, enum qcow2_use use)
{
    enum qcow2_ctype t = qcow2_l2e_type(l2e, s->cluster_bits, s->version, NULL);
    uint64_t host = l2e & QCOW2_OFFSET_MASK, first = host >> s->cluster_bits, n = 1, l2_off;
    uint32_t l2_idx;
    const char *what = NULL, *verb = use == QCOW2_USE_FREE ? "free" : "write to";
    struct qcow2_cdesc d = {0};
    char buf[64];
    uint64_t cl;

    if (use == QCOW2_USE_READ)
        return 0;
    if (t == QCOW2_COMPRESSED) {
        if (use != QCOW2_USE_FREE)
            return 0;  /* compressed clusters are never written in place */
        qcow2_cdesc_decode(l2e, s->cluster_bits, &d);
        first = d.first;
        n = d.n;
    } else if (t != QCOW2_NORMAL && t != QCOW2_ZERO_ALLOC) {
        return 0;
    }
    for (cl = first; cl - first < n; cl++) {
        what = shared_with(s, cl, use == QCOW2_USE_FREE, buf, sizeof(buf));
        if (what)
            break;
    }
    if (!what)
        return 0;
    entry_where(s, voff, &l2_off, &l2_idx);
    if (t == QCOW2_COMPRESSED)
        qcow2_signal_corruption(s, -1, -1, "Compressed cluster at %#" PRIx64 " (%" PRIu64
                                " bytes) covers cluster %#" PRIx64 ", which %s; refusing to "
                                "%s it (L2 offset: %#" PRIx64 ", L2 index: %#" PRIx32 ")",
                                d.off, d.len, cl << s->cluster_bits, what, verb, l2_off,
                                l2_idx);
    else
        qcow2_signal_corruption(s, -1, -1, "Cluster allocation offset %#" PRIx64 " %s; refusing "
                                "to %s it (L2 offset: %#" PRIx64 ", L2 index: %#" PRIx32 ")",
                                host, what, verb, l2_off, l2_idx);
    return -EIO;
}

int qcow2_refblock(struct qcow2_state *s, uint64_t b, uint64_t *off)
{
    *off = 0;
    if (b >= s->rt_entries)
        return 0;
    return check_table_entry(s, &rt_names, be64toh(s->rt[b]), b, false, off);
}
