/* The run state machine. See runstate.h. */
#include "runstate/runstate.h"

#include <string.h>

#include "common/util.h"
#include "common/vector.h"
#include "loop/loop.h"

struct listener {
    runstate_listener_fn *fn;
    void *opaque;
};

DEFINE_VECTOR_TYPE(listener_vector, struct listener)

struct runstate {
    struct loop *loop;
    enum run_state state;
    uint64_t since_ns;
    runstate_event_fn *emit;
    void *emit_opaque;

    listener_vector listeners;  /* in the order added */

    /* A stop asked for by the I/O path and not yet carried out (deferred to the loop). */
    bool stop_requested;
    struct loop_deferred stop_call;  /* deferred_stop() */
    enum run_state requested_state;
    struct runstate_io *io;    /* the stop waits while it is busy; NULL: nothing to wait for */
};

static const char *const names[] = {
    [RUN_STATE_PRELAUNCH] = "prelaunch",
    [RUN_STATE_RUNNING] = "running",
    [RUN_STATE_PAUSED] = "paused",
    [RUN_STATE_IO_ERROR] = "io-error",
    [RUN_STATE_SHUTDOWN] = "shutdown",
};

const char *runstate_name(enum run_state state)
{
    return names[state];
}

static loop_fn deferred_stop;

struct runstate *runstate_new(struct loop *loop, enum run_state initial, runstate_event_fn *emit,
                              void *emit_opaque)
{
    struct runstate *rs = xzalloc(sizeof(*rs));

    rs->loop = loop;
    rs->state = initial;
    rs->since_ns = now_realtime_ns();
    rs->emit = emit;
    rs->emit_opaque = emit_opaque;
    rs->stop_call = LOOP_DEFERRED_INIT(deferred_stop, rs);
    return rs;
}

void runstate_free(struct runstate *rs)
{
    if (!rs)
        return;
    loop_cancel_deferred(rs->loop, &rs->stop_call);
    listener_vector_reset(&rs->listeners);
    free(rs);
}

enum run_state runstate_get(const struct runstate *rs)
{
    return rs->state;
}

uint64_t runstate_since_ns(const struct runstate *rs)
{
    return rs->since_ns;
}

bool runstate_is_running(const struct runstate *rs)
{
    return rs->state == RUN_STATE_RUNNING;
}

void runstate_add_listener(struct runstate *rs, runstate_listener_fn *fn, void *opaque)
{
    listener_vector_append(&rs->listeners, (struct listener){ fn, opaque });
}

void runstate_remove_listener(struct runstate *rs, runstate_listener_fn *fn, void *opaque)
{
    listener_vector *v = &rs->listeners;

    for (size_t i = 0; i < v->len; i++) {
        if (v->ptr[i].fn == fn && v->ptr[i].opaque == opaque) {
            memmove(&v->ptr[i], &v->ptr[i + 1], (v->len - i - 1) * sizeof(*v->ptr));
            v->len--;
            return;
        }
    }
}

static void set_state(struct runstate *rs, enum run_state new_state)
{
    enum run_state old = rs->state;

    rs->state = new_state;
    rs->since_ns = now_realtime_ns();
    for (size_t i = 0; i < rs->listeners.len; i++)
        rs->listeners.ptr[i].fn(rs->listeners.ptr[i].opaque, old, new_state);
}

/* QEMU's do_vm_stop(): only a running machine stops, and only then is STOP sent. */
static void do_stop(struct runstate *rs, enum run_state new_state)
{
    if (rs->state != RUN_STATE_RUNNING)
        return;
    set_state(rs, new_state);
    rs->emit(rs->emit_opaque, "STOP", NULL);
}

void runstate_stop(struct runstate *rs)
{
    do_stop(rs, RUN_STATE_PAUSED);
}

int runstate_cont(struct runstate *rs, struct error **errp)
{
    if (rs->state == RUN_STATE_SHUTDOWN) {
        error_setg(errp, "Resetting the Virtual Machine is required");
        return -1;
    }
    if (rs->state == RUN_STATE_RUNNING) {
        /* QEMU's vm_prepare_start(): a pending stop request is dropped, but its STOP and a
         * RESUME are still sent, so a client sees the pair. */
        if (rs->stop_requested) {
            rs->stop_requested = false;
            rs->emit(rs->emit_opaque, "STOP", NULL);
            rs->emit(rs->emit_opaque, "RESUME", NULL);
            /* Requests held or parked while the stop was pending go now. */
            if (rs->io)
                rs->io->released(rs->io);
        }
        return 0;
    }
    rs->stop_requested = false;
    /* RESUME goes out before listeners resubmit held requests, as in QEMU. */
    rs->emit(rs->emit_opaque, "RESUME", NULL);
    set_state(rs, RUN_STATE_RUNNING);
    return 0;
}

static void deferred_stop(struct loop *loop, void *opaque)
{
    struct runstate *rs = opaque;

    if (!rs->stop_requested)
        return;
    if (rs->state == RUN_STATE_RUNNING && rs->io && rs->io->busy(rs->io))
        return;  /* runstate_poke() once the I/O in flight is done */
    rs->stop_requested = false;
    do_stop(rs, rs->requested_state);
}

void runstate_poke(struct runstate *rs)
{
    if (rs->stop_requested && !loop_deferred_queued(&rs->stop_call))
        loop_defer(rs->loop, &rs->stop_call);
}

void runstate_request_stop(struct runstate *rs, enum run_state new_state)
{
    if (rs->stop_requested)
        return;
    rs->stop_requested = true;
    rs->requested_state = new_state;
    runstate_poke(rs);
}

bool runstate_stop_pending(const struct runstate *rs)
{
    return rs->stop_requested && rs->state == RUN_STATE_RUNNING;
}

void runstate_set_io(struct runstate *rs, struct runstate_io *io)
{
    rs->io = io;
}

void runstate_shutdown(struct runstate *rs, enum runstate_shutdown_cause cause)
{
    static const char *const reasons[] = {
        [RUNSTATE_SHUTDOWN_HOST_QMP_QUIT] = "host-qmp-quit",
        [RUNSTATE_SHUTDOWN_HOST_SIGNAL] = "host-signal",
    };

    if (rs->state == RUN_STATE_SHUTDOWN)
        return;
    rs->stop_requested = false;
    rs->emit(rs->emit_opaque, "SHUTDOWN",
             json_pack("{s:b,s:s}", "guest", 0, "reason", reasons[cause]));
    set_state(rs, RUN_STATE_SHUTDOWN);
}
