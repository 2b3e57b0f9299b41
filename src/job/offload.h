/* Blocking work off the loop thread: a thread runs it, the loop thread hears when it ends.
 *
 * For the few system calls that have no asynchronous form on the kernels we support
 * (open with O_CREAT and ftruncate for blockdev-create's "file" driver: io_uring has no
 * ftruncate before Linux 6.9), and librbd's blocking calls (connecting, opening, closing and
 * resizing an image: block/rbd.c). One thread per call: these are rare operations.
 */
#ifndef THINBLK_JOB_OFFLOAD_H
#define THINBLK_JOB_OFFLOAD_H

#include "common/error.h"

struct loop;

/* Run work(opaque) on a new thread, then done(opaque) on the loop thread (never inside this
 * call). work must touch nothing the loop thread uses meanwhile. Returns 0, or -1 with *errp
 * set (no thread could be started: neither function is called). */
int offload_run(struct loop *loop, void (*work)(void *opaque), void (*done)(void *opaque),
                void *opaque, struct error **errp);

#endif
