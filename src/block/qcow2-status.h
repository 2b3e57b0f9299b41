/* qcow2 block status (qcow2-status.c): the driver's answer from its L2 entries, and whether
 * the image is metadata-preallocated, as QEMU decides it, so that a cluster whose host range
 * is a hole in the file reports zeroes exactly where qemu-storage-daemon does.
 *
 * Calls qcow2-meta.h and the graph. Loop thread only, but for qcow2_detect_prealloc(), which
 * runs inside open().
 */
#ifndef THINBLK_BLOCK_QCOW2_STATUS_H
#define THINBLK_BLOCK_QCOW2_STATUS_H

#include "block/graph.h"
#include "common/error.h"

struct qcow2_state;

/* The driver's block_status (graph.h): the run of clusters from c->offset whose entries say
 * the same, within one L2 table. Unallocated: no flags (the graph asks the backing); zero
 * clusters: ZERO; normal and compressed ones: DATA, and for normal ones in a metadata-
 * preallocated image also the host offset, to be asked whether it is a hole. */
int qcow2_block_status(struct block_node *n, struct block_status_call *c);

/* Set s->meta_prealloc as QEMU's qcow2_detect_metadata_preallocation(): more clusters have a
 * refcount than the file holds (by a ninth, or two). Reads refcount blocks only when the file
 * is longer than that; blocks (open time). Returns 0 or -1 with *errp set. */
int qcow2_detect_prealloc(struct qcow2_state *s, struct error **errp);

#endif
