/* Synchronous, bounded reads and writes on a protocol node, for a format driver's open().
 *
 * The driver API's open() is synchronous (it runs at startup or inside a QMP command, as
 * QEMU's bdrv_open() does), and a format driver must read its header before it can say
 * whether the image opens. These helpers do that with pread()/pwrite() on a descriptor of
 * their own to the node's file; they block, so use them only at open time, for small
 * amounts (a header, a table). The data path uses node_submit().
 */
#ifndef THINBLK_BLOCK_SYNC_IO_H
#define THINBLK_BLOCK_SYNC_IO_H

#include <stddef.h>
#include <stdint.h>

#include "block/graph.h"
#include "common/error.h"

/* Read len bytes at offset of n (a "file"/"host_device" node, or "fault" nodes over one;
 * fault rules do not apply here). Bytes past the end of the file read as zeroes. Blocks.
 * Returns 0 or -1 with *errp set. */
int node_pread_sync(struct block_node *n, void *buf, size_t len, uint64_t offset,
                    struct error **errp);
/* Write len bytes at offset of n (as node_pread_sync()) and fdatasync(). Blocks.
 * Returns 0 or -1 with *errp set. */
int node_pwrite_sync(struct block_node *n, const void *buf, size_t len, uint64_t offset,
                     struct error **errp);

#endif
