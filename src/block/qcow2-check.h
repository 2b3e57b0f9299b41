/* qcow2 writable open: every reference counted against the refcounts (qcow2-check.c).
 *
 * A writable open reads every L2 table and refcount block once and counts the references to
 * each host cluster: the header, the L1 and refcount tables, the refcount blocks, the L2
 * tables, data clusters, and the clusters compressed data touches. Then, cluster by cluster:
 *  - refcount above the references: a leak (a crash left clusters reserved but unused:
 *    thinblkd's reservation ahead, QEMU's in-flight allocations): the refcount is lowered, the
 *    cluster reused. Only when every reference could be counted: an entry the check cannot
 *    read (reserved bits, out of the file) might reference anything.
 *  - refcount below the references, or a cluster used twice where one use must be the only
 *    (a data cluster in two L2 entries, compressed data over a data cluster or a table): in
 *    conflict. A dirty image (lazy refcounts) gets the missing refcounts written; otherwise
 *    the cluster is marked in the metadata map, and a write in place to it or a free of it
 *    signals corruption (qcow2-meta.h) when a request gets there: nothing the image says
 *    about it is acted on.
 *  - A dirty image whose references are not all countable, or that has conflicts, cannot be
 *    repaired safely: the writable open is refused (read-only, it opens).
 * It also finds the end of the image (next_free: after the last cluster referenced or
 * counted), hands every free cluster below it (refcount 0, no reference: reclaimed leaks, and
 * what discards freed before the image was closed) to the allocator, as runs (at most
 * FREE_RUNS_MAX), and fixes OFLAG_COPIED flags of a dirty image, as `qemu-img check -r all`
 * does. An image with conflicts or uncountable entries hands over nothing.
 *
 * Cost: 2 bits per cluster of the file, a map entry per cluster referenced more than once,
 * 16 bytes per run of free clusters; reads every table once, synchronously (sync-io.h)
 * inside open(), before the node has a parent (QEMU's check of a dirty image also runs
 * inside bdrv_open()). Writes only what it changes, each followed by fdatasync(): a crash in
 * the middle leaves the image as consistent as before, and the next open goes on.
 */
#ifndef THINBLK_BLOCK_QCOW2_CHECK_H
#define THINBLK_BLOCK_QCOW2_CHECK_H

#include <stdint.h>

#include "common/error.h"

struct qcow2_state;

/* Run the check on s (writable, tables loaded, metadata map built); sets s->rsv.next_free
 * and the free list, and conflicts in the map; repairs a dirty image (clears the bit).
 * Returns 0, or -1 with *errp set if the image is dirty and cannot be repaired safely or an
 * I/O error happened. Blocks. */
int qcow2_check_open(struct qcow2_state *s, struct error **errp);

/* Write len bytes of metadata at off and fdatasync(); the file's extent (s->meta.hwm)
 * follows, as new structures go past its end. Blocks: open time and resize only. Returns 0
 * or -1 with *errp set. */
int qcow2_write_sync(struct qcow2_state *s, const void *buf, uint64_t len, uint64_t off,
                     struct error **errp);
/* Write the header's first meta_align bytes from s->header, as qcow2_write_sync(). */
int qcow2_write_header(struct qcow2_state *s, struct error **errp);

#endif
