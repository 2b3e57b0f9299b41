/* The layout of a new, empty qcow2 image, as blockdev-create writes it. Pure functions: no
 * I/O, no graph (unit-tested in tests/unit/test-qcow2-layout.c).
 *
 * The image (docs/interop/qcow2.txt) is, cluster by cluster:
 *   0                      header, header extensions, backing file name
 *   1 ..                   refcount table (rt_clusters)
 *   then                   refcount blocks (rb_count), covering every cluster listed here
 *   then                   L1 table (l1_clusters, zeroed: nothing is allocated yet)
 * Every one of those clusters has refcount 1; nothing else is allocated, so the image ends at
 * meta_end. This is the layout QEMU's qcow2 creation produces too (header, refcount table,
 * refcount block, L1).
 */
#ifndef THINBLK_BLOCK_QCOW2_LAYOUT_H
#define THINBLK_BLOCK_QCOW2_LAYOUT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

/* QEMU's limits: an image is at most this large (BDRV_MAX_LENGTH), its L1 table 32 MiB. */
#define QCOW2_MAX_IMAGE_SIZE 9223372035781033984ULL
#define QCOW2_MAX_L1_BYTES (32u << 20)

struct qcow2_layout {
    /* Asked for (set by the caller before qcow2_layout_compute()). */
    uint64_t size;              /* virtual size, bytes, a multiple of 512 */
    uint32_t version;           /* 2 or 3 */
    uint32_t cluster_bits;      /* 9 .. 21 */
    uint32_t refcount_order;    /* 0 .. 6; 4 for version 2 */
    bool lazy_refcounts;        /* version 3 only */
    const char *backing_file;   /* NULL for none; borrowed */
    const char *backing_fmt;    /* NULL for none; borrowed */
    /* Computed. */
    uint64_t cluster_size;
    uint64_t rt_offset, rt_clusters;
    uint64_t rb_offset, rb_count;
    uint64_t l1_offset, l1_entries, l1_clusters;
    uint64_t nclusters;         /* clusters in use, all of the above */
    uint64_t meta_end;          /* nclusters * cluster_size */
    uint32_t header_len;        /* bytes of cluster 0 in use */
};

/* Compute the layout of an image with the asked properties. Returns 0, or -1 with *errp set
 * (QEMU's texts) when the image would be too large or the backing file name does not fit. */
int qcow2_layout_compute(struct qcow2_layout *l, struct error **errp);

/* Fill buf with the bytes [offset, offset + len) of the new image; bytes at or past
 * meta_end are zeroes. */
void qcow2_layout_fill(const struct qcow2_layout *l, uint64_t offset, void *buf, size_t len);

#endif
