/* The run state: QEMU's RunState machine, as much of it as a storage daemon has.
 *
 *   prelaunch --cont--> running --stop--> paused --cont--> running
 *                       running --I/O error with action stop--> io-error --cont--> running
 *   any state --quit, SIGTERM, SIGINT--> shutdown (terminal: the daemon exits)
 *
 * While not running, devices hold their requests (their stopper, device.h, listens for
 * changes with runstate_add_listener() and is the machine's I/O, runstate_set_io()). Transitions emit QEMU's events through the event sink: STOP when
 * leaving running, RESUME when entering it, SHUTDOWN on shutdown. Like QEMU's vm_stop(), a stop
 * when not running changes nothing and emits nothing; like vm_start(), cont when running emits
 * nothing (unless a stop request is pending: then STOP and RESUME, and the request is dropped).
 *
 * The I/O-error path does not stop at once: runstate_request_stop() defers the stop to the end
 * of the current loop iteration, as QEMU's qemu_system_vmstop_request() does, so the
 * BLOCK_IO_ERROR that caused it goes out before the one STOP (later ones of the same batch may
 * be held back by the device's event rate limit, device.h). Like QEMU, which drains every
 * request in flight before its monitor can see a cont, the stop waits for the I/O in flight to
 * finish (runstate_set_io()): a request that was running when the error came and
 * fails too is parked before the STOP, so one cont retries everything. Meanwhile the state is
 * still running and new requests are held (runstate_stop_pending()).
 *
 * Owned by the daemon; used from the loop thread only.
 */
#ifndef THINBLK_RUNSTATE_H
#define THINBLK_RUNSTATE_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "common/error.h"

struct loop;

enum run_state {
    RUN_STATE_PRELAUNCH,
    RUN_STATE_RUNNING,
    RUN_STATE_PAUSED,
    RUN_STATE_IO_ERROR,
    RUN_STATE_SHUTDOWN,
};

/* Why the daemon shuts down: QEMU's ShutdownCause names, as SHUTDOWN's "reason". */
enum runstate_shutdown_cause {
    RUNSTATE_SHUTDOWN_HOST_QMP_QUIT,  /* "host-qmp-quit" */
    RUNSTATE_SHUTDOWN_HOST_SIGNAL,    /* "host-signal" */
};

/* Send event name with data (stolen, may be NULL) to every negotiated monitor client. */
typedef void runstate_event_fn(void *opaque, const char *name, json_t *data);
/* Called after the state changed from old to new (listeners run in the order added). */
typedef void runstate_listener_fn(void *opaque, enum run_state old_state, enum run_state new_state);

struct runstate;

/* A new machine in state initial (RUN_STATE_PRELAUNCH or RUN_STATE_RUNNING). Events go to
 * emit(emit_opaque, ...). */
struct runstate *runstate_new(struct loop *loop, enum run_state initial, runstate_event_fn *emit,
                              void *emit_opaque);
/* Free rs (a deferred stop still pending is dropped); before its loop. */
void runstate_free(struct runstate *rs);

enum run_state runstate_get(const struct runstate *rs);
/* Wall-clock time (ns) when the current state was entered. */
uint64_t runstate_since_ns(const struct runstate *rs);
bool runstate_is_running(const struct runstate *rs);
/* QEMU's name: "prelaunch", "running", "paused", "io-error", "shutdown". */
const char *runstate_name(enum run_state state);

/* Watch state changes. */
void runstate_add_listener(struct runstate *rs, runstate_listener_fn *fn, void *opaque);
/* Stop watching (the pair given to runstate_add_listener()). */
void runstate_remove_listener(struct runstate *rs, runstate_listener_fn *fn, void *opaque);

/* The "stop" command: if running, go to paused and emit STOP. */
void runstate_stop(struct runstate *rs);

/* The "cont" command: from prelaunch, paused or io-error, go to running and emit RESUME.
 * Returns 0, or -1 with *errp set if the state does not allow it (shutdown). */
int runstate_cont(struct runstate *rs, struct error **errp);

/* Ask for a stop into new_state (RUN_STATE_IO_ERROR) at the end of this loop iteration. Several
 * requests before then make one stop. */
void runstate_request_stop(struct runstate *rs, enum run_state new_state);

/* Whether a requested stop has not been carried out yet. */
bool runstate_stop_pending(const struct runstate *rs);

/* The I/O under the machine (the devices, device.h): a requested stop waits while busy()
 * says I/O is in flight, and runstate_poke() asks again; released() is called when cont drops
 * a pending stop (no state change, so no listener hears of it): what was held for the stop may
 * go. Embed it and recover the container with container_of(). */
struct runstate_io {
    bool (*busy)(struct runstate_io *io);
    void (*released)(struct runstate_io *io);
};
/* Set the machine's I/O, borrowed until set again (NULL: none). Without one, a requested stop
 * comes at the end of the loop iteration. */
void runstate_set_io(struct runstate *rs, struct runstate_io *io);
void runstate_poke(struct runstate *rs);

/* Shut down: emit SHUTDOWN {"guest": false, "reason": cause} and go to shutdown. The daemon
 * watches for it with a listener. A second call does nothing. */
void runstate_shutdown(struct runstate *rs, enum runstate_shutdown_cause cause);

#endif
