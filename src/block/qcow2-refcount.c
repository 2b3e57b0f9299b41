/* qcow2 refcounts: entries of any width from 1 to 64 bits, and the open-time scan.
 *
 * Entries narrower than a byte are packed from the least significant bit (the spec: "bit 0
 * means the least significant bit in this context"); wider ones are big-endian.
 */
#include <endian.h>
#include <inttypes.h>
#include <string.h>

#include "block/qcow2.h"
#include "block/sync-io.h"
#include "common/util.h"

uint64_t qcow2_refcount_max(const struct qcow2_state *s)
{
    return s->refcount_order == 6 ? UINT64_MAX : (1ULL << (1u << s->refcount_order)) - 1;
}

uint64_t qcow2_refcount_get(const struct qcow2_state *s, const void *block, uint64_t idx)
{
    const uint8_t *b = block;
    uint32_t o = s->refcount_order;

    if (o < 3) {
        unsigned shift = (unsigned)(idx & ((8u >> o) - 1)) << o;
        return (b[idx >> (3 - o)] >> shift) & ((1u << (1u << o)) - 1);
    }
    uint64_t v = 0;
    size_t width = 1u << (o - 3);
    for (size_t i = 0; i < width; i++)
        v = v << 8 | b[idx * width + i];
    return v;
}

void qcow2_refcount_encode(const struct qcow2_state *s, const void *block, uint64_t idx,
                           uint64_t value, uint32_t *pos, uint32_t *len, uint8_t out[8])
{
    const uint8_t *b = block;
    uint32_t o = s->refcount_order;

    if (o < 3) {
        unsigned shift = (unsigned)(idx & ((8u >> o) - 1)) << o;
        unsigned mask = ((1u << (1u << o)) - 1) << shift;
        *pos = (uint32_t)(idx >> (3 - o));
        *len = 1;
        out[0] = (uint8_t)((b[*pos] & ~mask) | ((unsigned)value << shift & mask));
        return;
    }
    uint32_t width = 1u << (o - 3);
    *pos = (uint32_t)(idx * width);
    *len = width;
    for (uint32_t i = 0; i < width; i++)
        out[i] = (uint8_t)(value >> (8 * (width - 1 - i)));
}

void qcow2_refcount_set(const struct qcow2_state *s, void *block, uint64_t idx, uint64_t value)
{
    uint8_t bytes[8];
    uint32_t pos, len;

    qcow2_refcount_encode(s, block, idx, value, &pos, &len, bytes);
    memcpy((uint8_t *)block + pos, bytes, len);
}

uint64_t qcow2_rt_block(const struct qcow2_state *s, uint64_t b)
{
    return b < s->rt_entries ? be64toh(s->rt[b]) & QCOW2_OFFSET_MASK : 0;
}

int qcow2_refcount_scan(struct qcow2_state *s, struct error **errp)
{
    uint64_t epb = 1ULL << s->rb_bits;
    uint64_t last = 0;  /* the last cluster with a refcount, + 1 */

    for (uint64_t i = 0; i < s->rt_entries; i++) {
        uint64_t e = be64toh(s->rt[i]);
        if ((e & QCOW2_RT_RESERVED) || (e & (s->cluster_size - 1))) {
            error_setg(errp, "qcow2: Invalid reference count table entry %" PRIu64
                       " (0x%" PRIx64 "); repair the image with 'qemu-img check -r all'", i, e);
            return -1;
        }
    }
    _cleanup_free_ void *block = qcow2_alloc_buf(s->cluster_size);
    for (uint64_t i = s->rt_entries; i-- > 0 && last == 0;) {
        uint64_t off = qcow2_rt_block(s, i);
        if (!off)
            continue;
        if (node_pread_sync(s->file, block, s->cluster_size, off, errp) < 0)
            return -1;
        for (uint64_t j = epb; j-- > 0;) {
            if (qcow2_refcount_get(s, block, j)) {
                last = (i << s->rb_bits) + j + 1;
                break;
            }
        }
    }
    /* Whatever the refcounts say, never allocate over the metadata we know of. */
    uint64_t cs = s->cluster_size;
    last = MAX(last, 1);
    last = MAX(last, (s->l1_offset + (uint64_t)s->l1_size * 8 + cs - 1) / cs);
    last = MAX(last, s->rt_offset / cs + s->rt_clusters);
    s->next_free = last;
    return 0;
}
