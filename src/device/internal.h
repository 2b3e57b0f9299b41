/* What the files of the device module share and nobody else needs. */
#ifndef THINBLK_DEVICE_INTERNAL_H
#define THINBLK_DEVICE_INTERNAL_H

#include "common/list.h"
#include "device/device.h"

/* The daemon's run state rs as the stopper of the devices of ctx (runstate-stopper.c): it
 * listens to rs and is rs's I/O (runstate_set_io()) until freed. Never fails. */
struct dev_stopper *dev_runstate_stopper_new(struct dev_context *ctx, struct runstate *rs);
void dev_runstate_stopper_free(struct dev_stopper *s);

/* A stopper's devices as the I/O of its run state machine (runstate_set_io()): busy while
 * one has a request in flight, and released, when cont drops a pending stop, to submit what it
 * held. Both stoppers are a run state machine over their devices. */
struct dev_stopper_io {
    struct runstate_io io;
    struct dev_stopper *s;
};
void dev_stopper_io_init(struct dev_stopper_io *sio, struct dev_stopper *s);

/* The context's stop groups (group-stopper.c), in creation order. */
DECLARE_LIST_HEAD(dev_group_queue, struct dev_group)
dev_group_queue *dev_context_groups(struct dev_context *ctx);
/* The daemon's run state, above every group. */
struct runstate *dev_context_runstate(const struct dev_context *ctx);
/* Free every group of ctx; no device may be in one. */
void dev_groups_free(struct dev_context *ctx);
/* The stopper of g's devices. */
struct dev_stopper *dev_group_stopper(struct dev_group *g);

#endif
