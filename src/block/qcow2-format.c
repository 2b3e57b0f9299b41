/* The qcow2 on-disk format's pure decoders. See qcow2-format.h. */
#include "block/qcow2-format.h"

#include <stdlib.h>
#include <string.h>

enum qcow2_ctype qcow2_l2e_type(uint64_t l2e, uint32_t cluster_bits, uint32_t version,
                                enum qcow2_bad *why)
{
    uint64_t host = l2e & QCOW2_OFFSET_MASK;
    enum qcow2_bad bad = QCOW2_BAD_NONE;
    enum qcow2_ctype t;

    if (l2e & QCOW2_OFLAG_COMPRESSED)
        t = QCOW2_COMPRESSED;
    else if (l2e & QCOW2_L2_RESERVED)
        bad = QCOW2_BAD_RESERVED;
    else if (host & ((1ULL << cluster_bits) - 1))
        bad = QCOW2_BAD_UNALIGNED;
    else if ((l2e & QCOW2_OFLAG_ZERO) && version < 3)
        bad = QCOW2_BAD_ZERO_V2;
    else if (l2e & QCOW2_OFLAG_ZERO)
        t = host ? QCOW2_ZERO_ALLOC : QCOW2_ZERO_PLAIN;
    else
        t = host ? QCOW2_NORMAL : QCOW2_UNALLOCATED;
    if (bad)
        t = QCOW2_BAD;
    if (why)
        *why = bad;
    return t;
}

void qcow2_cdesc_decode(uint64_t l2e, uint32_t cluster_bits, struct qcow2_cdesc *d)
{
    uint32_t x = 62 - (cluster_bits - 8);
    uint64_t sectors = ((l2e >> x) & ((1ULL << (cluster_bits - 8)) - 1)) + 1;
    uint64_t end;

    d->off = l2e & ((1ULL << x) - 1);
    d->len = sectors * 512 - (d->off & 511);
    end = d->off + d->len;
    d->first = d->off >> cluster_bits;
    d->n = ((end + (1ULL << cluster_bits) - 1) >> cluster_bits) - d->first;
}

uint64_t qcow2_refcount_max(uint32_t order)
{
    return order == 6 ? UINT64_MAX : (1ULL << (1u << order)) - 1;
}

uint64_t qcow2_refcount_get(uint32_t order, const void *block, uint64_t idx)
{
    const uint8_t *b = block;

    if (order < 3) {
        unsigned shift = (unsigned)(idx & ((8u >> order) - 1)) << order;
        return (b[idx >> (3 - order)] >> shift) & ((1u << (1u << order)) - 1);
    }
    uint64_t v = 0;
    size_t width = 1u << (order - 3);
    for (size_t i = 0; i < width; i++)
        v = v << 8 | b[idx * width + i];
    return v;
}

void qcow2_refcount_encode(uint32_t order, const void *block, uint64_t idx, uint64_t value,
                           uint32_t *pos, uint32_t *len, uint8_t out[8])
{
    const uint8_t *b = block;

    if (order < 3) {
        unsigned shift = (unsigned)(idx & ((8u >> order) - 1)) << order;
        unsigned mask = ((1u << (1u << order)) - 1) << shift;
        *pos = (uint32_t)(idx >> (3 - order));
        *len = 1;
        out[0] = (uint8_t)((b[*pos] & ~mask) | ((unsigned)value << shift & mask));
        return;
    }
    uint32_t width = 1u << (order - 3);
    *pos = (uint32_t)(idx * width);
    *len = width;
    for (uint32_t i = 0; i < width; i++)
        out[i] = (uint8_t)(value >> (8 * (width - 1 - i)));
}

void qcow2_refcount_set(uint32_t order, void *block, uint64_t idx, uint64_t value)
{
    uint8_t bytes[8];
    uint32_t pos, len;

    qcow2_refcount_encode(order, block, idx, value, &pos, &len, bytes);
    memcpy((uint8_t *)block + pos, bytes, len);
}

void *qcow2_alloc_buf(uint64_t len)
{
    void *p;

    if (len > SIZE_MAX || posix_memalign(&p, 4096, len ? (size_t)len : 1) != 0)
        abort();
    memset(p, 0, (size_t)len);
    return p;
}
