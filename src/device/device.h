/* The device: QEMU's BlockBackend for one export. The error policy lives here, and only here.
 *
 * An export turns protocol requests into device requests; the device submits them to its root
 * node while its stopper (the daemon's run state, see "the stopper" below) runs and holds them
 * while it does not. When a request fails with errno E, werror (writes, flushes, discards,
 * write-zeroes) or rerror (reads) picks the action, with QEMU's values and defaults
 * (werror=enospc, rerror=report):
 *   report  the error goes to the client
 *   ignore  the client is told the request succeeded
 *   stop    the request is parked with its data, io-status becomes nospace or failed (first
 *           error only), BLOCK_IO_ERROR goes out, and the run state goes to io-error (one STOP
 *           after all the BLOCK_IO_ERRORs of the batch)
 *   enospc  stop on "no space", report otherwise
 * "No space" (dev_errno_nospace()) is ENOSPC, and EDQUOT: a quota reached, as an RBD pool's,
 * whose writes fail with EDQUOT. QEMU knows only ENOSPC; thinblk treats both alike: the stop,
 * io-status nospace, "nospace": true and ENOSPC's reason text ("No space left on device");
 * only __org.thinblk_query-stop-reason's "errno" tells which it was.
 * BLOCK_IO_ERROR is sent for every action, at most one a second per device (the first at once,
 * later ones within the second coalesced into the last one, sent at its end; QEMU 9.2's rule).
 * So the first BLOCK_IO_ERROR of a stop always precedes its STOP; coalesced ones may follow it.
 * A coalesced one carries "__org.thinblk_suppressed": K, the events of the device dropped in
 * its favour, so every failure is counted: events sent plus their K is the number of errors.
 * One held back when the device is freed is sent then, not lost.
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

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include <jansson.h>

#include "block/graph.h"
#include "common/error.h"
#include "runstate/runstate.h"

struct loop;

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

/* Whether positive errno err means the storage has no space (see the top). */
static inline bool dev_errno_nospace(int err)
{
    return err == ENOSPC || err == EDQUOT;
}

/* The reason text of err in BLOCK_IO_ERROR and the stop reason: strerror(), and ENOSPC's for
 * every "no space" errno, so management that matches QEMU's text sees the same. */
static inline const char *dev_error_reason(int err)
{
    return strerror(dev_errno_nospace(err) ? ENOSPC : err);
}

/* A request from an export. The export fills breq.op, flags, offset, len, its data (buf, or
 * iov and niov: block/graph.h), and done; the rest belongs to the device until done(req, ret)
 * is called (ret 0 or -errno). A parked request keeps pointing to the export's data. */
struct dev_req {
    struct block_req breq;
    void (*done)(struct dev_req *req, int ret);
    void *opaque;  /* the export's */

    /* The device's: */
    bool withdrawn;        /* device_withdraw() found it at storage */
    struct device *dev;
    struct dev_req *next;  /* in one of the device's queues */
    uint64_t seq;          /* submission order */
    uint64_t start_ns;
    uint64_t waiting_since_ns;  /* parked or held since, for the longest stall (0: neither) */
    bool is_write;         /* counts for flush ordering: write, write-zeroes, discard */
};

/* A block status query from an export: it fills st.offset, st.len, st.want_zero (see struct
 * block_status in block/graph.h) and done; done(ds, ret) gives the answer in st (ret 0) or
 * -errno. No error policy applies: a query changes nothing, and the client gets its error. */
struct dev_status {
    struct block_status st;
    void (*done)(struct dev_status *ds, int ret);
    void *opaque;  /* the export's */
    struct device *dev;  /* the device's */
};

/* Someone (an export connection) waiting for the device to take requests again. */
struct dev_waiter {
    struct dev_waiter *next;
    void (*fn)(struct dev_waiter *w);
};

/* Why a device's stopper last stopped (for __org.thinblk_query-stop-reason). */
struct dev_stop_cause {
    char *device;           /* NULL: no stop yet */
    char *node_name;
    const char *operation;  /* "read" or "write" */
    int err;                /* positive errno */
    uint64_t when_ns;       /* wall clock */
};

/* ---- the stopper: what a device stops and resumes with ----
 *
 * A device sends requests to storage only while its stopper lets it, and asks its stopper to
 * stop when a request fails with action stop. The daemon's run state is the stopper of every
 * device in no group (dev_context_new()); a stop group (device/group.h), a set of devices
 * stopping and resuming together apart from the run state, is the second implementation.
 *
 * One way, the device calls the stopper's ops. The other way, the stopper tells the devices it
 * stops with the dev_stopper_*() calls below. An implementation embeds struct dev_stopper,
 * fills it with dev_stopper_init() and recovers itself in its ops with container_of(). */
struct dev_stopper;
struct dev_group;

struct dev_stopper_ops {
    /* Whether the devices are running (not stopped), a stop pending or not. */
    bool (*running)(const struct dev_stopper *s);
    /* Whether requests may go to storage now: running, and no stop pending. */
    bool (*may_submit)(const struct dev_stopper *s);
    /* A request failed with action stop (its BLOCK_IO_ERROR is out, s->last_stop says why):
     * stop soon, after the rest of this batch and once dev_stopper_busy() is false. Requests
     * before the stop make one stop. Meanwhile may_submit() is false. */
    void (*request_stop)(struct dev_stopper *s);
    /* A device of s has no request in flight any more: a stop waiting for that may go. */
    void (*idle)(struct dev_stopper *s);
};

/* The fields are the device module's; an implementation only passes s around. */
struct dev_stopper {
    const struct dev_stopper_ops *ops;
    struct dev_context *ctx;             /* its devices are those of ctx that it stops */
    struct dev_stop_cause last_stop;     /* the latest request_stop()'s cause */
};

void dev_stopper_init(struct dev_stopper *s, const struct dev_stopper_ops *ops,
                      struct dev_context *ctx);
/* Release what s holds (not s itself). No device may still use it. */
void dev_stopper_fini(struct dev_stopper *s);

/* The stopper's calls to its devices: whether any has a request in flight at storage (a stop
 * waits for those), that they left running (for the statistics), and that they may submit
 * again (running again, or a pending stop dropped): parked requests go, in order, then held
 * ones. */
bool dev_stopper_busy(const struct dev_stopper *s);
void dev_stopper_stopped(struct dev_stopper *s);
void dev_stopper_resumed(struct dev_stopper *s);

/* ---- the device context: every device of the daemon ---- */

struct dev_context;

/* Where the devices' events go: event name with data (stolen) and extra top-level members
 * (stolen, NULL if none: a coalesced BLOCK_IO_ERROR's "__org.thinblk_suppressed"). */
typedef void dev_emit_fn(void *opaque, const char *name, json_t *data, json_t *extra);

/* A context for devices stopped by runstate rs (borrowed, must outlive it), with events going
 * to emit(emit_opaque, ...). Never fails. */
struct dev_context *dev_context_new(struct loop *loop, struct runstate *rs, dev_emit_fn *emit,
                                    void *emit_opaque);
/* Free ctx; every device must have been freed. NULL does nothing. */
void dev_context_free(struct dev_context *ctx);
struct loop *dev_context_loop(const struct dev_context *ctx);
/* Send event name with data (stolen) through ctx's sink. */
void dev_context_emit(struct dev_context *ctx, const char *name, json_t *data);
/* The cause of the latest stop a device asked of the run state, or NULL if none did. */
const struct dev_stop_cause *dev_context_last_stop(const struct dev_context *ctx);

/* QEMU's names: "report", "ignore", "stop", "enospc". Returns -1 for an unknown name. */
int dev_error_action_parse(const char *s);
/* The names, indexed by enum dev_error_action, NULL-terminated (an option schema's enum). */
extern const char *const dev_error_action_names[];
const char *dev_iostatus_name(enum dev_iostatus s);

/* A device named name on root (a reference is taken), stopped by group (device/group.h,
 * borrowed: it outlives the device) or, if NULL, by the run state. Returns NULL with *errp set
 * if the name is taken. */
struct device *device_new(struct dev_context *ctx, const char *name, struct block_node *root,
                          enum dev_error_action werror, enum dev_error_action rerror,
                          struct dev_group *group, struct error **errp);
/* Fail every request not yet at storage (held, parked, waiting flushes) with -ESHUTDOWN:
 * their export is going away. */
void device_abort(struct device *d);
/* Take req back from d, undone: the export will submit it again later (a vhost-user ring
 * whose requests the front-end tracks across a restart). A request not yet at storage (held,
 * parked, a flush waiting) leaves the device at once: returns true, and done() is never
 * called. One at storage cannot be called back: returns false, and it completes through done()
 * as usual, except that a failure whose action is stop is not parked (the error is reported
 * and the stop happens as for any other) but ends with -ECANCELED. */
bool device_withdraw(struct device *d, struct dev_req *req);
/* Remove the device. Requests in flight at storage still complete through their done();
 * the memory goes after the last one. */
void device_free(struct device *d);

/* writethrough (QEMU's block-export-add option): every write is made durable before it
 * completes, as if it carried FUA. */
void device_set_writethrough(struct device *d, bool on);

struct device *device_find(struct dev_context *ctx, const char *name);
/* The first device of ctx and the one after d, in creation order; NULL after the last. */
struct device *device_first(const struct dev_context *ctx);
struct device *device_next(const struct device *d);
const char *device_name(const struct device *d);
struct block_node *device_root(const struct device *d);
/* Its stop group, or NULL. */
struct dev_group *device_group(const struct device *d);
/* Whether requests are queued, in flight or parked. */
bool device_busy(const struct device *d);

/* Submit req. Never fails here: errors come through req->done. req must be valid for the
 * root node (node_assert_req(), block/graph.h), and end within its size (asserted where the
 * size is fixed: a root over a child) or be a flush with offset and len 0; the export validates what its client sent, and an
 * invalid req aborts. */
void device_submit(struct device *d, struct dev_req *req);

/* Ask the root node for the block status of a range within its size (asserted), also while
 * stopped: a query does not touch the data. Counts as in flight until done (device_free()
 * waits for it). */
void device_block_status(struct device *d, struct dev_status *ds);

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
