/* The layout of a new qcow2 image. See qcow2-layout.h. */
#include "block/qcow2-layout.h"

#include <string.h>

#include "block/qcow2-format.h"
#include "common/util.h"

#define COMPAT_LAZY_REFCOUNTS 1ULL
#define V2_HEADER_LEN 72u
#define V3_HEADER_LEN 112u   /* 104 and the compression type byte, padded to 8 */

static uint64_t div_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

/* Header extensions and backing file name: where they go and how long they are. */
static uint32_t ext_len(const struct qcow2_layout *l)
{
    uint32_t len = 8;  /* end of extensions */

    if (l->backing_fmt)
        len += 8 + (uint32_t)((strlen(l->backing_fmt) + 7) & ~(size_t)7);
    return len;
}

int qcow2_layout_compute(struct qcow2_layout *l, struct error **errp)
{
    uint64_t cs = 1ULL << l->cluster_bits;

    l->cluster_size = cs;
    if (l->size > QCOW2_MAX_IMAGE_SIZE) {
        error_setg(errp, "Could not resize image: offset(%llu) exceeds maximum(%llu)",
                   (unsigned long long)l->size, (unsigned long long)QCOW2_MAX_IMAGE_SIZE);
        return -1;
    }
    /* An L2 table holds cs / 8 entries, each mapping one cluster. */
    uint64_t l2_span = cs * (cs / 8);
    l->l1_entries = div_up(l->size, l2_span);
    if (l->l1_entries > QCOW2_MAX_L1_BYTES / 8) {
        error_setg(errp, "Could not resize image: Failed to grow the L1 table: File too large");
        return -1;
    }
    l->l1_clusters = div_up(l->l1_entries * 8, cs);

    uint32_t base = l->version >= 3 ? V3_HEADER_LEN : V2_HEADER_LEN;
    size_t name_len = l->backing_file ? strlen(l->backing_file) : 0;
    if (name_len > QCOW2_MAX_BACKING_NAME || (l->backing_fmt && strlen(l->backing_fmt) > 64) ||
        base + ext_len(l) + name_len > cs) {
        error_setg(errp, "Could not assign backing file '%s': File name too long",
                   l->backing_file ? l->backing_file : "");
        return -1;
    }
    l->header_len = base + ext_len(l) + (uint32_t)name_len;

    /* Refcount blocks must cover every cluster, themselves and the table included: grow
     * the counts until they stop changing (two or three rounds). */
    uint64_t per_block = cs * 8 >> l->refcount_order;
    uint64_t rb = 1, rt = 1;
    for (;;) {
        uint64_t n = 1 + rt + rb + l->l1_clusters;
        uint64_t rb2 = div_up(n, per_block);
        uint64_t rt2 = div_up(rb2 * 8, cs);
        if (rb2 == rb && rt2 == rt)
            break;
        rb = MAX(rb, rb2);
        rt = MAX(rt, rt2);
    }
    l->rt_offset = cs;
    l->rt_clusters = rt;
    l->rb_offset = l->rt_offset + rt * cs;
    l->rb_count = rb;
    l->l1_offset = l->rb_offset + rb * cs;
    l->nclusters = 1 + rt + rb + l->l1_clusters;
    l->meta_end = l->nclusters * cs;
    return 0;
}

/* The header cluster's first header_len bytes into out (zeroed by the caller). */
static void build_header(const struct qcow2_layout *l, uint8_t *out)
{
    uint32_t base = l->version >= 3 ? V3_HEADER_LEN : V2_HEADER_LEN;
    uint32_t pos = base;

    qcow2_put_be32(out + 0, QCOW2_MAGIC);
    qcow2_put_be32(out + 4, l->version);
    qcow2_put_be32(out + 20, l->cluster_bits);
    qcow2_put_be64(out + 24, l->size);
    /* 32: no encryption */
    qcow2_put_be32(out + 36, (uint32_t)l->l1_entries);
    qcow2_put_be64(out + 40, l->l1_offset);
    qcow2_put_be64(out + 48, l->rt_offset);
    qcow2_put_be32(out + 56, (uint32_t)l->rt_clusters);
    /* 60, 64: no snapshots */
    if (l->version >= 3) {
        /* 72: no incompatible features (zlib compression needs no bit) */
        qcow2_put_be64(out + 80, l->lazy_refcounts ? COMPAT_LAZY_REFCOUNTS : 0);
        /* 88: no autoclear features */
        qcow2_put_be32(out + 96, l->refcount_order);
        qcow2_put_be32(out + 100, base);
        /* 104: compression type 0 (zlib), then padding */
    }
    if (l->backing_fmt) {
        size_t len = strlen(l->backing_fmt);
        qcow2_put_be32(out + pos, QCOW2_EXT_BACKING_FORMAT);
        qcow2_put_be32(out + pos + 4, (uint32_t)len);
        memcpy(out + pos + 8, l->backing_fmt, len);
        pos += 8 + (uint32_t)((len + 7) & ~(size_t)7);
    }
    pos += 8;  /* the end-of-extensions marker: type 0, length 0 */
    if (l->backing_file) {
        size_t len = strlen(l->backing_file);
        qcow2_put_be64(out + 8, pos);
        qcow2_put_be32(out + 16, (uint32_t)len);
        memcpy(out + pos, l->backing_file, len);
    }
}

/* The bytes of cluster c of the image into out (cluster_size bytes, zeroed by the caller). */
static void fill_cluster(const struct qcow2_layout *l, uint64_t c, uint8_t *out)
{
    uint64_t cs = l->cluster_size;

    if (c == 0) {
        build_header(l, out);
    } else if (c < 1 + l->rt_clusters) {
        /* Refcount table entries: the offsets of the refcount blocks. */
        uint64_t first = (c - 1) * (cs / 8);
        for (uint64_t i = 0; i < cs / 8 && first + i < l->rb_count; i++)
            qcow2_put_be64(out + i * 8, l->rb_offset + (first + i) * cs);
    } else if (c < 1 + l->rt_clusters + l->rb_count) {
        uint64_t per_block = cs * 8 >> l->refcount_order;
        uint64_t first = (c - 1 - l->rt_clusters) * per_block;
        for (uint64_t i = 0; i < per_block && first + i < l->nclusters; i++)
            qcow2_refcount_set(l->refcount_order, out, i, 1);
    }
    /* L1 clusters and anything past meta_end: zeroes. */
}

void qcow2_layout_fill(const struct qcow2_layout *l, uint64_t offset, void *buf, size_t len)
{
    uint64_t cs = l->cluster_size;
    uint8_t *cluster = xzalloc(cs);
    uint8_t *out = buf;

    memset(buf, 0, len);
    while (len > 0) {
        uint64_t c = offset / cs, in = offset % cs;
        size_t n = (size_t)MIN(len, cs - in);
        if (c < l->nclusters) {
            memset(cluster, 0, cs);
            fill_cluster(l, c, cluster);
            memcpy(out, cluster + in, n);
        }
        out += n;
        offset += n;
        len -= n;
    }
    free(cluster);
}
