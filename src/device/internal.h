/* What the files of the device module share and nobody else needs. */
#ifndef THINBLK_DEVICE_INTERNAL_H
#define THINBLK_DEVICE_INTERNAL_H

#include "device/device.h"

/* The daemon's run state rs as the stopper of the devices of ctx (runstate-stopper.c): it
 * listens to rs and is rs's I/O (runstate_set_io()) until freed. Never fails. */
struct dev_stopper *dev_runstate_stopper_new(struct dev_context *ctx, struct runstate *rs);
void dev_runstate_stopper_free(struct dev_stopper *s);

#endif
