/* The device: QEMU's BlockBackend for one export. The error policy lives here, and only here.
 *
 * An export turns protocol requests into device requests; the device submits them to its root
 * node while the daemon runs and holds them while it does not. When a request fails with errno
 * E, werror (writes, flushes, discards, write-zeroes) or rerror (reads) picks the action, with
 * QEMU's values and defaults (werror=enospc, rerror=report):
 *   report  the error goes to the client
 *   ignore  the client is told the request succeeded
 *   stop    the request is parked with its data, io-status becomes nospace or failed (first
 *           error only), BLOCK_IO_ERROR goes out, and the run state goes to io-error (one STOP
 *           after all the BLOCK_IO_ERRORs of the batch)
 *   enospc  stop on ENOSPC, report otherwise
 * BLOCK_IO_ERROR is sent for every action, at most one a second per device (the first at once,
 * later ones within the second coalesced into the last one, sent at its end; QEMU 9.2's rule).
 * So the first BLOCK_IO_ERROR of a stop always precedes its STOP; coalesced ones may follow it.
 *
 * On cont (the run state entering running), io-status returns to ok and parked requests are
 * resubmitted whole, in the order they were submitted, then the held ones. A flush is not
 * submitted before every write, discard and write-zeroes submitted before it has succeeded, so
 * it never overtakes a parked write. No request completes to its export before it succeeded or
 * its error was reported by policy: nothing is lost or done twice.
 *
 * Used from the loop thread only.
 */
#ifndef THINBLK_DEVICE_H
#define THINBLK_DEVICE_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "block/graph.h"
#include "common/error.h"
#include "runstate/runstate.h"

enum dev_error_action {
    DEV_ACTION_REPORT,
    DEV_ACTION_IGNORE,
    DEV_ACTION_STOP,
    DEV_ACTION_ENOSPC,
};

enum dev_iostatus {
    DEV_IOSTATUS_OK,
    DEV_IOSTATUS_FAILED,
    DEV_IOSTATUS_NOSPACE,
};

struct device;

/* A request from an export. The export fills breq.op, flags, offset, len, buf, and done; the
 * rest belongs to the device until done(req, ret) is called (ret 0 or -errno). */
struct dev_req {
    struct block_req breq;
    void (*done)(struct dev_req *req, int ret);
    void *opaque;  /* the export's */

    /* The device's: */
    struct device *dev;
    struct dev_req *next;  /* in one of the device's queues */
    uint64_t seq;          /* submission order */
    uint64_t start_ns;
    bool is_write;         /* counts for flush ordering: write, write-zeroes, discard */
};

/* Someone (an export connection) waiting for the device to take requests again. */
struct dev_waiter {
    struct dev_waiter *next;
    void (*fn)(struct dev_waiter *w);
};

/* Why the daemon last stopped because of a device, for __org.thinblk_query-stop-reason. */
struct dev_stop_cause {
    char *device;
    char *node_name;
    const char *operation;  /* "read" or "write" */
    int err;                /* positive errno */
    uint64_t when_ns;       /* wall clock */
};

/* Services the devices need from the daemon. */
struct dev_context {
    struct loop *loop;
    struct runstate *runstate;
    void (*emit)(void *opaque, const char *name, json_t *data);  /* data stolen */
    void *emit_opaque;
    struct device *devices;  /* every device, in creation order */
    struct dev_stop_cause last_stop;  /* the latest error with action stop */
};

/* The run state's I/O hooks (runstate_set_io_hooks()) for the devices of ctx (a struct
 * dev_context): whether any has requests in flight (a stop waits for them), and a pending stop
 * dropped by cont (the requests held or parked for it go). */
bool dev_context_busy(void *ctx);
void dev_context_released(void *ctx);

/* QEMU's names: "report", "ignore", "stop", "enospc". Returns -1 for an unknown name. */
int dev_error_action_parse(const char *s);
const char *dev_iostatus_name(enum dev_iostatus s);

/* A device named name on root (a reference is taken). Returns NULL with *errp set if the name
 * is taken. */
struct device *device_new(struct dev_context *ctx, const char *name, struct block_node *root,
                          enum dev_error_action werror, enum dev_error_action rerror,
                          struct error **errp);
/* Fail every request not yet at storage (held, parked, waiting flushes) with -ESHUTDOWN:
 * their export is going away. */
void device_abort(struct device *d);
/* Remove the device. Requests in flight at storage still complete through their done();
 * the memory goes after the last one. */
void device_free(struct device *d);

/* writethrough (QEMU's block-export-add option): every write is made durable before it
 * completes, as if it carried FUA. */
void device_set_writethrough(struct device *d, bool on);

struct device *device_find(struct dev_context *ctx, const char *name);
/* The device after d in ctx->devices, or NULL. */
struct device *device_next(const struct device *d);
const char *device_name(const struct device *d);
struct block_node *device_root(const struct device *d);
/* Whether requests are queued, in flight or parked. */
bool device_busy(const struct device *d);

/* Submit req. Never fails here: errors come through req->done. */
void device_submit(struct device *d, struct dev_req *req);

/* Whether new requests would go to storage now (the daemon runs and nothing is held). An
 * export reading requests stops while this is false, and calls device_wait() to be told. */
bool device_accepting(const struct device *d);
/* Call w->fn once when the device accepts requests again. */
void device_wait(struct device *d, struct dev_waiter *w);
/* Forget w (its connection is closing). */
void device_cancel_wait(struct device *d, struct dev_waiter *w);

/* QEMU's BlockInfo (query-block) and BlockStats (query-blockstats) for d. */
json_t *device_query_block(struct device *d);
json_t *device_query_stats(struct device *d);

#endif
