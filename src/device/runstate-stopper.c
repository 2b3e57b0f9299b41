/* The daemon's run state as the devices' stopper (device.h). A device's stop request is the
 * run state's deferred stop into io-error, which waits for the devices' I/O in flight; the
 * run state's changes, and a pending stop dropped by cont, reach the devices. */
#include "device/internal.h"

#include "common/util.h"

struct runstate_stopper {
    struct dev_stopper s;
    struct runstate *rs;
    struct dev_stopper_io io;
};

static struct runstate *rs_of(const struct dev_stopper *s)
{
    return container_of(s, const struct runstate_stopper, s)->rs;
}

static bool rs_running(const struct dev_stopper *s)
{
    return runstate_is_running(rs_of(s));
}

static bool rs_may_submit(const struct dev_stopper *s)
{
    return runstate_is_running(rs_of(s)) && !runstate_stop_pending(rs_of(s));
}

static void rs_request_stop(struct dev_stopper *s)
{
    runstate_request_stop(rs_of(s), RUN_STATE_IO_ERROR);
}

static void rs_idle(struct dev_stopper *s)
{
    runstate_poke(rs_of(s));
}

static const struct dev_stopper_ops runstate_stopper_ops = {
    .running = rs_running,
    .may_submit = rs_may_submit,
    .request_stop = rs_request_stop,
    .idle = rs_idle,
};

static void on_change(void *opaque, enum run_state old_state, enum run_state new_state)
{
    struct runstate_stopper *r = opaque;

    if (new_state == RUN_STATE_RUNNING)
        dev_stopper_resumed(&r->s);
    else if (old_state == RUN_STATE_RUNNING)
        dev_stopper_stopped(&r->s);
}

struct dev_stopper *dev_runstate_stopper_new(struct dev_context *ctx, struct runstate *rs)
{
    struct runstate_stopper *r = xzalloc(sizeof(*r));

    dev_stopper_init(&r->s, &runstate_stopper_ops, ctx);
    r->rs = rs;
    dev_stopper_io_init(&r->io, &r->s);
    runstate_set_io(rs, &r->io.io);
    runstate_add_listener(rs, on_change, r);
    return &r->s;
}

void dev_runstate_stopper_free(struct dev_stopper *s)
{
    struct runstate_stopper *r = container_of(s, struct runstate_stopper, s);

    runstate_remove_listener(r->rs, on_change, r);
    runstate_set_io(r->rs, NULL);
    dev_stopper_fini(&r->s);
    free(r);
}
