/* The vhost-user-blk export: a Unix socket a vhost-user frontend (QEMU's vhost-user-blk-pci,
 * thinblk-vhost-io) connects to; the guest's virtio-blk requests go to a device, like an NBD
 * export's (see docs/ARCHITECTURE.md, "Path 1"). One frontend at a time: another connection
 * is accepted and closed at once. Loop thread only.
 */
#ifndef THINBLK_VUB_SERVER_H
#define THINBLK_VUB_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"

struct device;
struct loop;
struct vub_export;

struct vub_export_config {
    const char *id;            /* the export id, GET_ID's answer */
    const char *path;          /* the socket */
    bool writable;
    uint16_t num_queues;       /* >= 1 */
    uint32_t logical_block_size;  /* a power of two, 512..2 MiB */
};

/* Listen on cfg->path for frontends serving dev (borrowed: must outlive the export). Returns
 * the export, or NULL with *errp set (the socket cannot be made). */
struct vub_export *vub_export_new(struct loop *loop, struct device *dev,
                                  const struct vub_export_config *cfg, struct error **errp);
/* Whether a frontend is connected. */
bool vub_export_connected(const struct vub_export *exp);
/* The device's root changed size: tell the frontend (CONFIG_CHANGE_MSG, if it negotiated
 * BACKEND_REQ and gave a channel), which reads the capacity again with GET_CONFIG. */
void vub_export_size_changed(struct vub_export *exp);
/* Close the frontend's connection and the socket, and free the export. Requests still in the
 * device complete into nothing (their memory stays mapped until they do). NULL does nothing. */
void vub_export_free(struct vub_export *exp);

#endif
