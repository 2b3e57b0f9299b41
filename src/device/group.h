/* Stop groups: named sets of devices that stop and resume together, apart from the others
 * (docs/qmp.md, "Stop groups"). One group is typically one VM's disks.
 *
 * A group is the second stopper of device.h: a device made in a group (device_new()) stops
 * with its group, and the devices in no group with the daemon's run state. The group's state
 * is a run state machine of its own (runstate.h): running, paused (dev_group_stop()), or
 * io-error (a device's error with action stop, deferred and waiting for the group's I/O in
 * flight as the daemon's stop is). A device of a group submits only while both its group and
 * the daemon's run state run: the daemon's stop stops everything, its cont never resumes a
 * group. Its STOP and RESUME go out as __org.thinblk_GROUP_STOP {"group", "status"} and
 * __org.thinblk_GROUP_RESUME {"group"}.
 *
 * Owned by the device context (freed with it); used from the loop thread only.
 */
#ifndef THINBLK_DEVICE_GROUP_H
#define THINBLK_DEVICE_GROUP_H

#include <jansson.h>

#include "common/error.h"
#include "common/schema.h"
#include "device/device.h"

struct dev_group;

/* A group's options, {"name": string}: __org.thinblk_group-add's arguments and --group's. */
extern const struct schema_member dev_group_options[];

/* A new running group named name. Returns NULL with *errp set if the name is taken. */
struct dev_group *dev_group_add(struct dev_context *ctx, const char *name, struct error **errp);
/* Delete the group named name. Returns 0, or -1 with *errp set if there is none or a device
 * is still in it. */
int dev_group_del(struct dev_context *ctx, const char *name, struct error **errp);
/* The group named name, or NULL with *errp set (errp may be NULL). */
struct dev_group *dev_group_find(struct dev_context *ctx, const char *name, struct error **errp);

const char *dev_group_name(const struct dev_group *g);
/* The group's state machine: runstate_stop() and runstate_cont() are the group's stop and cont. */
struct runstate *dev_group_runstate(struct dev_group *g);
/* The cause of the group's latest stop on an error, or NULL if there was none. */
const struct dev_stop_cause *dev_group_last_stop(const struct dev_group *g);

/* Add the member "__org.thinblk_group" (QMP's name for a downstream member) with the name of
 * d's group to obj, a QEMU type describing d (BlockInfo, BlockExportInfo); nothing if d is in
 * no group, so that without groups the answer is QEMU's. */
void dev_group_tag(json_t *obj, const struct device *d);

/* __org.thinblk_query-groups: every group, in creation order, as
 * {"name", "status", "running", "exports": [device names]}. New reference. */
json_t *dev_groups_query(struct dev_context *ctx);

#endif
