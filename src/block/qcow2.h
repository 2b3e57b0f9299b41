/* The qcow2 format driver's state: one open image. Internal to src/block/qcow2*.c; other
 * modules use block_driver_qcow2 (graph.h).
 *
 * The driver's files, each with its header, bottom up; a file calls only those listed before
 * it (the driver's own upward call, running a part, is a callback: qcow2_reqs.run):
 *
 *   qcow2-format   on-disk constants, entry decoders, refcount entries (pure functions)
 *   qcow2-cache    the L2 table and refcount block caches
 *   qcow2-meta     lookups, and the checks every piece of metadata passes before it is acted
 *                  on; signalling corruption
 *   qcow2-header   open: header, extensions, names, snapshot table, L1 and refcount tables
 *   qcow2-reserve  host clusters the allocator may hand out: spare, free, reserved ahead
 *   qcow2-check    writable open: every reference counted against the refcounts; leaks
 *                  reclaimed, a dirty image repaired, conflicts recorded for qcow2-meta
 *   qcow2-req      requests split in parts; reads and writes in place; compressed reads
 *   qcow2-backing  the backing chain: opening it, reads through it, copy-on-write source
 *   qcow2-chunk    a batch's staged metadata writes (chunks of tables)
 *   qcow2-cow      new data clusters: the copy-on-write fill and the merged data writes
 *   qcow2-grow     refcount structure growth (a state machine)
 *   qcow2-plan     what a write, write-zeroes or discard needs, given its L2 entry
 *   qcow2-alloc    the allocation batch (a state machine): the one place metadata changes
 *   qcow2-status   block status: runs of L2 entries; metadata preallocation detected
 *   qcow2          the driver: options, open, close, submit
 *
 * Tables are kept in memory exactly as on disk (big-endian), so that a metadata update is a
 * copy of the aligned chunk holding the entry, patched, written, and copied back on success:
 * memory never runs ahead of the disk. Everything runs on the loop thread.
 */
#ifndef THINBLK_BLOCK_QCOW2_H
#define THINBLK_BLOCK_QCOW2_H

#include <stdbool.h>
#include <stdint.h>

#include "block/graph.h"
#include "block/qcow2-backing.h"
#include "block/qcow2-format.h"
#include "block/qcow2-meta.h"
#include "block/qcow2-req.h"
#include "block/qcow2-reserve.h"

struct qcow2_cache;
struct qcow2_alloc;

struct qcow2_state {
    struct block_node *node;
    struct block_node *file;
    bool writable;
    /* The header (qcow2-header.c; the refcount table moves when it grows: qcow2-grow.c and
     * qcow2-check.c update rt_*). */
    uint32_t version;
    uint32_t cluster_bits;
    uint32_t cluster_size;
    uint32_t refcount_order;    /* refcount width is 1 << refcount_order bits */
    uint32_t rb_bits;           /* log2 of the entries of a refcount block */
    uint32_t meta_align;        /* granularity of metadata writes: >= 512, <= cluster */
    uint64_t incompat, compat, autoclear;
    uint64_t l1_offset;
    uint32_t l1_size;           /* entries */
    uint64_t rt_offset;
    uint32_t rt_clusters;
    uint64_t rt_entries;
    uint32_t nb_snapshots;
    void *header;               /* the image's first meta_align bytes */
    uint64_t *l1;               /* big-endian, as on disk (qcow2_l1_bytes() long) */
    uint64_t *rt;               /* big-endian, as on disk: rt_clusters clusters */
    struct qcow2_cache *l2_cache;
    struct qcow2_cache *rb_cache;
    struct qcow2_meta meta;     /* qcow2-meta.c */
    struct qcow2_backing bk;    /* qcow2-backing.c */
    struct qcow2_reserve rsv;   /* qcow2-reserve.c */
    struct qcow2_reqs reqs;     /* qcow2-req.c */
    struct qcow2_alloc *alloc;  /* qcow2-alloc.c, writable images only */
    bool meta_prealloc;         /* qcow2-status.c: metadata preallocation, found at open */
};

#endif
