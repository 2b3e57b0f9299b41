/* qcow2 block_resize (qcow2-resize.c): growing the virtual size, and the L1 table with it.
 *
 * As `qemu-img resize` grows an image: when the L1 table cannot map the new size, a new one
 * of the exact size is placed at the end of the image (its refcounts written first), written
 * whole, and the header switched to it in one sector write (L1 size and offset); the old
 * table's clusters are freed after. Then the header's size. Each write is followed by
 * fdatasync(): a crash at any point leaves a valid image, at worst with the new table's
 * clusters leaked (the next writable open reclaims them).
 *
 * The writes are synchronous (sync-io.h: small, a header and a table, as at open) and run
 * only while the allocator has no batch: nothing else changes metadata meanwhile. Calls
 * qcow2-check.h (synchronous writes), qcow2-reserve.h, qcow2-cache.h, qcow2-alloc.h.
 * Loop thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_RESIZE_H
#define THINBLK_BLOCK_QCOW2_RESIZE_H

#include <stdint.h>

#include "common/error.h"

struct block_node;

/* The qcow2 driver's truncate (block_driver.truncate): grow n to size bytes (QEMU's texts for
 * a size not a multiple of 512 and an L1 table past its maximum). Shrinking is refused.
 * Returns 0 or -1 with *errp set. Blocks. */
int qcow2_truncate(struct block_node *n, uint64_t size, struct error **errp);

#endif
