/* blockdev-create: creating an image, as a job (QEMU's BlockdevCreateOptions).
 *
 * Drivers: "file" (a regular file: create, truncate to 0, extend to size; preallocation
 * "off" only; nocow and extent-size-hint accepted and ignored), "qcow2" (an empty image
 * written through the node named by "file", see qcow2-create.c) and, when built, "rbd"
 * (rbd_create on a thread, see rbd.c). Options are checked against
 * block_create_options when the command runs (errors go back to the command, QEMU's texts);
 * what QEMU checks inside the job (option values, the node, the I/O) fails the job instead.
 *
 * Everything runs on the loop thread; blocking system calls go to a thread (job/offload.h),
 * image writes through node_submit().
 */
#ifndef THINBLK_BLOCK_CREATE_H
#define THINBLK_BLOCK_CREATE_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "common/error.h"
#include "common/schema.h"

struct block_graph;
struct job;

struct block_create;

/* QEMU's BlockdevCreateOptions, for blockdev-create's "options". */
extern const struct schema_member block_create_options[];

/* The creation options (borrowed, checked against block_create_options) ask for: returns the
 * creation to run, or NULL with *errp set (a driver thinblk cannot create with). */
struct block_create *block_create_prepare(struct block_graph *g, json_t *options,
                                          struct error **errp);
/* Run it as job (running): the job ends with job_finish(), now or later; c is freed then. */
void block_create_run(struct block_create *c, struct job *job);
/* Free a creation that was not run. */
void block_create_free(struct block_create *c);

/* ---- internal to create.c and qcow2-create.c ---- */

/* QEMU's BlockdevDriver and PreallocMode values. */
extern const char *const block_driver_names[];
extern const char *const block_prealloc_names[];

struct block_create {
    struct block_graph *graph;
    json_t *opts;        /* the options, checked (a copy, owned) */
    struct job *job;
    void (*run)(struct block_create *c);
};

/* qcow2-create.c */
extern const struct schema_member qcow2_create_opts[];
void qcow2_create_run(struct block_create *c);

#ifdef THINBLK_HAVE_RBD
/* rbd.c: QEMU's BlockdevCreateOptionsRbd; an image made through librbd on a thread. */
extern const struct schema_member rbd_create_opts[];
void rbd_create_run(struct block_create *c);
#endif

/* End the creation: finish its job with err (stolen) and free c. */
void block_create_finish(struct block_create *c, struct error *err);

#endif
