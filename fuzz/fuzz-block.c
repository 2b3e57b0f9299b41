/* Shared set-up of the block-level fuzz targets. See fuzz-block.h. */
#include "fuzz-block.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/graph.h"
#include "common/log.h"
#include "io/uring.h"
#include "loop/loop.h"

static const char *program = "fuzz";

void fuzz_drop_event(void *opaque, const char *name, json_t *data)
{
    json_decref(data);
}

void fuzz_drop_device_event(void *opaque, const char *name, json_t *data, json_t *extra)
{
    json_decref(data);
    json_decref(extra);
}

void fuzz_die(const char *what, struct error *err)
{
    fprintf(stderr, "%s: %s: %s\n", program, what, err ? err->desc : strerror(errno));
    abort();
}

void fuzz_block_init(struct fuzz_block *fb, const char *prog)
{
    struct error *err = NULL;

    program = prog;
    log_max_level = LOG_LEVEL_ERROR;
    fb->loop = loop_new();
    if (!fb->loop)
        fuzz_die("loop_new", NULL);
    fb->uring = uring_new(fb->loop, 256, &err);
    if (!fb->uring)
        fuzz_die("uring_new", err);
    fb->graph = block_graph_new(fb->loop, fb->uring, fuzz_drop_event, NULL);
}
