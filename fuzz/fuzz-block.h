/* What the block-level fuzz targets share: a loop, an io_uring and a block graph, made once per
 * process, and a way to stop loudly when the harness itself (not the code under test) fails. */
#ifndef THINBLK_FUZZ_BLOCK_H
#define THINBLK_FUZZ_BLOCK_H

#include <jansson.h>

#include "common/error.h"

struct fuzz_block {
    struct loop *loop;
    struct uring *uring;
    struct block_graph *graph;
};

/* Set up fb (logging errors only); aborts if the loop or the ring cannot be made. */
void fuzz_block_init(struct fuzz_block *fb, const char *prog);
/* An event sink that drops events (data stolen). */
void fuzz_drop_event(void *opaque, const char *name, json_t *data);
void fuzz_drop_device_event(void *opaque, const char *name, json_t *data, json_t *extra);
/* Report what failed (err, or errno if NULL) and abort. */
__attribute__((noreturn)) void fuzz_die(const char *what, struct error *err);

#endif
