/* qcow2 open: the header and its extensions, the backing file name, the snapshot table, the
 * L1 and refcount tables (qcow2-header.c).
 *
 * Everything here is read once, at open, synchronously (sync-io.h), and checked as QEMU's
 * qcow2_do_open() checks it, with its error texts: an image whose header, extensions, names
 * or table placement are invalid does not open. The entries of the tables are checked later,
 * where they are used (qcow2-meta.h), and at a writable open by qcow2-check.c.
 */
#ifndef THINBLK_BLOCK_QCOW2_HEADER_H
#define THINBLK_BLOCK_QCOW2_HEADER_H

#include <stdint.h>

#include "common/error.h"

struct qcow2_state;

/* Parse and check the header in cluster 0 (c0, cluster_size bytes; s->cluster_bits and
 * s->writable set by the caller): geometry, features, extensions, backing file name and
 * format, snapshot count. *size: the virtual size. Returns 0 or -1 with *errp set. */
int qcow2_header_parse(struct qcow2_state *s, const uint8_t *c0, uint64_t *size,
                       struct error **errp);
/* Check the tables' placement against the limits, the image size and each other; read the
 * L1 and refcount tables into s->l1 and s->rt, and check the snapshot table. Blocks. Returns 0
 * or -1 with *errp set. */
int qcow2_tables_load(struct qcow2_state *s, uint64_t size, struct error **errp);

#endif
