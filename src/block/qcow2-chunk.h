/* A batch's staged metadata writes (qcow2-chunk.c).
 *
 * A chunk is a meta_align piece of a table (the L1 table, an L2 table, a refcount block) as
 * it will be on disk: copied from the table in memory when the batch first touches it,
 * patched there, written, and copied back to memory once the write succeeded (memory never
 * runs ahead of the disk). A chunk set holds a batch's chunks of one phase, found by disk
 * offset; its writes merge chunks contiguous on disk.
 *
 * Calls qcow2-meta.h and qcow2-cache.h. Loop thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_CHUNK_H
#define THINBLK_BLOCK_QCOW2_CHUNK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/vector.h"

struct qcow2_state;
struct qcow2_waiter;

enum qcow2_chunk_kind { QCOW2_CHUNK_L1, QCOW2_CHUNK_L2, QCOW2_CHUNK_RB };

struct qcow2_chunk {
    uint64_t disk;       /* where it goes */
    uint64_t table;      /* L2, RB: the table's offset (the cache key) */
    uint32_t pos, len;   /* in the table */
    uint8_t kind;        /* enum qcow2_chunk_kind */
    int ret;             /* 1 until written, then the write's result */
    char *buf;           /* len bytes (an aligned buffer of the chunk size) */
};

DEFINE_VECTOR_TYPE(qcow2_chunk_vector, struct qcow2_chunk *)

struct qcow2_chunkset {
    qcow2_chunk_vector v;    /* in the order touched; qcow2_chunk_runs() sorts it */
    struct qcow2_chunk **h;  /* open addressing on disk offset */
    size_t hcap;
};

/* A run of chunks written together: v[first, first + n), len bytes at v[first]->disk. */
struct qcow2_chunk_run {
    size_t first, n;
    uint64_t len;
};

/* The chunk at disk offset disk, or NULL. */
struct qcow2_chunk *qcow2_chunk_find(const struct qcow2_chunkset *cs, uint64_t disk);
/* The chunk of size align of a table (image: image_len bytes in memory, at disk offset base;
 * table: its cache key) holding byte off: the set's copy, made now if this is the first
 * touch. */
struct qcow2_chunk *qcow2_chunk_touch(struct qcow2_chunkset *cs, uint32_t align, int kind,
                                      uint64_t table, const void *image, uint64_t image_len,
                                      uint64_t base, uint64_t off);
/* Sort the set by disk offset and group it into runs: chunks contiguous on disk, each but
 * the last of a run whole (align bytes), at most max bytes a run. Writes n runs to out
 * (room for cs->v.len) and returns n. */
size_t qcow2_chunk_runs(struct qcow2_chunkset *cs, uint32_t align, uint64_t max,
                        struct qcow2_chunk_run *out);
/* Write every chunk of cs, a request per run; each completion sets its chunks' ret, copies
 * them to memory (L1 table, caches) on success, then calls done(opaque, ret). Returns the
 * number of writes submitted. */
size_t qcow2_chunks_write(struct qcow2_state *s, struct qcow2_chunkset *cs,
                          void (*done)(void *opaque, int ret), void *opaque);
void qcow2_chunkset_free(struct qcow2_chunkset *cs);

/* Add delta (+1 or -1) to the refcount of cluster cl, in cs (a chunk of its refcount block,
 * touched from the cache). Returns the chunk; NULL if the block is loading (w waits: w->cb
 * later) or on error (*err: -EIO with corruption signalled for a refcount table entry that
 * fails its check, no refcount block, a refcount that would go below 0 or past its width, or
 * that is not 0 before an allocation: want_zero). */
struct qcow2_chunk *qcow2_chunk_refcount(struct qcow2_state *s, struct qcow2_chunkset *cs,
                                         uint64_t cl, int delta, bool want_zero,
                                         struct qcow2_waiter *w, int *err);

#endif
