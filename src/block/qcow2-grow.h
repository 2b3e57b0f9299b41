/* qcow2 refcount structure growth (qcow2-grow.c): new refcount blocks, and a new, larger
 * refcount table when the old one cannot index them, placed at the end of the image.
 *
 * Rare (once per refcount block's worth of clusters) and ordered for crash safety, so one
 * write at a time: the new blocks (counting themselves) and table written whole; the
 * increments of the new clusters that old blocks count; a flush; the link (the header's
 * table offset, or the table entries); a flush; the old table's clusters freed. A crash
 * before the link leaks the new clusters at worst (the next writable open reclaims them),
 * never leaves a table entry pointing at an unwritten block.
 *
 * Calls qcow2-chunk.h, qcow2-reserve.h and qcow2-meta.h. Loop thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_GROW_H
#define THINBLK_BLOCK_QCOW2_GROW_H

#include <stdint.h>

struct qcow2_state;

/* Grow the refcount structures so that the n clusters from next_free have refcount blocks.
 * Returns 0 if it started: done(opaque, ret) is called later, ret 0 (next_free moved past
 * the new structures) or -errno (what it reserved given back, or leaked if it failed once
 * linked in part); or -errno if it cannot start (the table would pass its maximum size). */
int qcow2_grow_start(struct qcow2_state *s, uint64_t n, void (*done)(void *opaque, int ret),
                     void *opaque);

#endif
