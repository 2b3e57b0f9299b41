/* qcow2 backing files: opening the chain, reads through it, copy-on-write from it
 * (qcow2-backing.c). Calls qcow2-meta.h and qcow2-req.h. Loop thread only, but for
 * qcow2_backing_open(), which runs inside open().
 */
#ifndef THINBLK_BLOCK_QCOW2_BACKING_H
#define THINBLK_BLOCK_QCOW2_BACKING_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

#include "common/error.h"

struct block_node;
struct qcow2_state;
struct qcow2_part;
struct qcow2_waiter;

/* Owned by qcow2-backing.c (name and format parsed by qcow2-header.c). The node itself is
 * node->backing. */
struct qcow2_backing {
    char *name;         /* the backing file name in the image header, or NULL */
    char *fmt;          /* the header's backing format extension, or NULL */
    json_t *opt;        /* the "backing" option (node name or options) until opened */
    bool null;          /* backing=null: a backing file named in the image is ignored */
    bool implicit;      /* node->backing was opened from name */
    bool have_img_id;   /* img_dev/img_ino name the image file (loop detection) */
    dev_t img_dev;
    ino_t img_ino;
};

/* The driver's open_backing, backing_overridden and query_image (graph.h). */
int qcow2_backing_open(struct block_node *n, struct error **errp);
bool qcow2_backing_overridden(struct block_node *n);
void qcow2_query_image(struct block_node *n, json_t *image);
/* Read an unallocated READ part from the backing node (zeroes past its end); completes it
 * through qcow2_part_done(). There must be a backing node. */
void qcow2_backing_read(struct qcow2_state *s, struct qcow2_part *p);
/* Copy-on-write: fill buf (one cluster, zeroed by the caller) with what the guest cluster
 * holding voff reads as before it is allocated: the backing's bytes if its L2 entry is
 * unallocated and there is a backing node (zeroes past the backing's end), else nothing.
 * Returns 0 if buf is ready, 1 if w->cb(w, ret) will be called (never inside this call),
 * or -errno. buf must stay valid until then. */
int qcow2_backing_fill(struct qcow2_state *s, uint64_t voff, void *buf, struct qcow2_waiter *w);
void qcow2_backing_cleanup(struct qcow2_state *s);

#endif
