/* The qcow2 on-disk format (docs/interop/qcow2.txt in qemu/qemu): constants, big-endian
 * fields, and the pure decoders every other qcow2 file shares. No state, no I/O: each function
 * here depends only on its arguments (unit-tested in tests/unit/test-qcow2-meta.c).
 *
 * The bottom of the qcow2 driver's files; see qcow2.h for how the rest sits on it.
 */
#ifndef THINBLK_BLOCK_QCOW2_FORMAT_H
#define THINBLK_BLOCK_QCOW2_FORMAT_H

#include <stdbool.h>
#include <stdint.h>

#define QCOW2_MAGIC 0x514649fbu

/* Entries of the L1 table, the L2 tables and the refcount table. */
#define QCOW2_OFFSET_MASK 0x00fffffffffffe00ULL
#define QCOW2_OFLAG_COPIED (1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED (1ULL << 62)
#define QCOW2_OFLAG_ZERO 1ULL
#define QCOW2_L1_RESERVED 0x7f000000000001ffULL
#define QCOW2_L2_RESERVED 0x3f000000000001feULL
#define QCOW2_RT_RESERVED 0xff000000000001ffULL

/* Header fields (byte offsets) and feature bits. */
#define QCOW2_HDR_INCOMPAT 72
#define QCOW2_INCOMPAT_DIRTY (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ULL << 4)
#define QCOW2_AUTOCLEAR_BITMAPS (1ULL << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ULL << 1)

/* Header extension types. */
#define QCOW2_EXT_END 0u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_NAMES 0x6803f857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_CRYPTO 0x0537be77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

/* QEMU's limits. */
#define QCOW2_MAX_L1_TABLE_BYTES (32u << 20)
#define QCOW2_MAX_RT_BYTES (8u << 20)
#define QCOW2_MAX_SNAPSHOTS 65536u
#define QCOW2_SNAPSHOT_HEADER_BYTES 40u
#define QCOW2_MAX_SNAPSHOT_TABLE_BYTES (64u << 20)
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024u
#define QCOW2_MAX_BACKING_NAME 1023u
#define QCOW2_MAX_BACKING_FORMAT 15u

static inline uint32_t qcow2_be32(const void *p)
{
    const uint8_t *b = p;

    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static inline uint16_t qcow2_be16(const void *p)
{
    const uint8_t *b = p;

    return (uint16_t)(b[0] << 8 | b[1]);
}

static inline uint64_t qcow2_be64(const void *p)
{
    return (uint64_t)qcow2_be32(p) << 32 | qcow2_be32((const uint8_t *)p + 4);
}

static inline void qcow2_put_be32(void *p, uint32_t v)
{
    uint8_t *b = p;

    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

static inline void qcow2_put_be64(void *p, uint64_t v)
{
    qcow2_put_be32(p, (uint32_t)(v >> 32));
    qcow2_put_be32((uint8_t *)p + 4, (uint32_t)v);
}

/* What an L2 entry says of its guest cluster. */
enum qcow2_ctype {
    QCOW2_UNALLOCATED,  /* reads from the backing node, or as zeroes without one */
    QCOW2_ZERO_PLAIN,   /* zero flag, no host cluster */
    QCOW2_ZERO_ALLOC,   /* zero flag, host cluster kept (with refcount 1) */
    QCOW2_NORMAL,
    QCOW2_COMPRESSED,
    QCOW2_BAD,          /* reserved bits, a misaligned offset, a zero flag in v2 */
};

/* Why qcow2_l2e_type() said QCOW2_BAD. */
enum qcow2_bad {
    QCOW2_BAD_NONE,
    QCOW2_BAD_RESERVED,   /* reserved bits set */
    QCOW2_BAD_UNALIGNED,  /* host offset not a multiple of the cluster size */
    QCOW2_BAD_ZERO_V2,    /* zero flag in a version 2 image, where the bit is reserved */
};

/* The kind of L2 entry l2e in an image of cluster_bits and version; *why (may be NULL) says
 * what is wrong with a QCOW2_BAD one. */
enum qcow2_ctype qcow2_l2e_type(uint64_t l2e, uint32_t cluster_bits, uint32_t version,
                                enum qcow2_bad *why);

/* A compressed cluster descriptor (bits 0..61 of its L2 entry): with x = 62 - (cluster_bits -
 * 8), bits 0..x-1 are the host byte offset of the deflate stream, bits x..61 the number of
 * 512-byte sectors it takes beyond the one holding the offset. Its data is the bytes
 * [off, off + len); they touch host clusters [first, first + n), at most three. */
struct qcow2_cdesc {
    uint64_t off, len;
    uint64_t first, n;
};
void qcow2_cdesc_decode(uint64_t l2e, uint32_t cluster_bits, struct qcow2_cdesc *d);

/* Refcount entries of 1 << order bits (order 0..6) in a refcount block in memory. Entries
 * narrower than a byte are packed from the least significant bit (the spec: "bit 0 means the
 * least significant bit in this context"); wider ones are big-endian. */
uint64_t qcow2_refcount_max(uint32_t order);
uint64_t qcow2_refcount_get(uint32_t order, const void *block, uint64_t idx);
void qcow2_refcount_set(uint32_t order, void *block, uint64_t idx, uint64_t value);
/* The bytes of block that entry idx changes once it holds value: [*pos, *pos + *len) of the
 * block, their new contents in out[0..*len). block is not changed. */
void qcow2_refcount_encode(uint32_t order, const void *block, uint64_t idx, uint64_t value,
                           uint32_t *pos, uint32_t *len, uint8_t out[8]);
/* The byte of a refcount block that holds entry idx. */
static inline uint64_t qcow2_refcount_byte(uint32_t order, uint64_t idx)
{
    return (idx << order) >> 3;
}

/* An aligned (4 KiB, for O_DIRECT children) buffer of len bytes, zeroed; aborts on failure.
 * Free with free(). */
void *qcow2_alloc_buf(uint64_t len);

#endif
