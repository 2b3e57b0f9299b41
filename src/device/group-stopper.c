/* Stop groups, the second stopper of the devices (device.h). See group.h.
 *
 * The group's state is a run state machine of its own, so a group stops, defers an error's
 * stop to the end of the batch, waits for its I/O in flight and drops a pending stop on cont
 * exactly as the daemon's run state does; this file only ties it to the daemon's run state
 * (both must run for the group's devices to submit) and to the group's devices. */
#include "device/group.h"

#include <string.h>

#include "common/util.h"
#include "device/internal.h"
#include "runstate/runstate.h"

struct dev_group {
    struct dev_group *next;  /* the context's groups */
    struct dev_stopper s;
    char *name;
    struct runstate *own;     /* the group's state: running, paused or io-error */
    struct runstate *daemon;  /* the daemon's run state (borrowed) */
    struct dev_stopper_io io; /* own's I/O: the group's devices */
    bool running;             /* own and daemon both running, as last told to the devices */
};

DEFINE_QUEUE_FUNCTIONS(dev_group_queue, struct dev_group, next)

const struct schema_member dev_group_options[] = {
    { "name", SCHEMA_STR },
    { NULL },
};

static struct dev_group *group_of(const struct dev_stopper *s)
{
    return container_of(s, struct dev_group, s);
}

static bool group_running(const struct dev_stopper *s)
{
    return runstate_is_running(group_of(s)->own) && runstate_is_running(group_of(s)->daemon);
}

/* The daemon's pending stop is left out: it waits for the devices in no group only, as
 * a grouped device's error stops its group, not the daemon. */
static bool group_may_submit(const struct dev_stopper *s)
{
    return group_running(s) && !runstate_stop_pending(group_of(s)->own);
}

static void group_request_stop(struct dev_stopper *s)
{
    runstate_request_stop(group_of(s)->own, RUN_STATE_IO_ERROR);
}

static void group_idle(struct dev_stopper *s)
{
    runstate_poke(group_of(s)->own);
}

static const struct dev_stopper_ops group_stopper_ops = {
    .running = group_running,
    .may_submit = group_may_submit,
    .request_stop = group_request_stop,
    .idle = group_idle,
};

/* Either machine changed: tell the devices when the pair starts or stops running. */
static void on_change(void *opaque, enum run_state old_state, enum run_state new_state)
{
    struct dev_group *g = opaque;
    bool running = group_running(&g->s);

    if (running == g->running)
        return;
    g->running = running;
    if (running)
        dev_stopper_resumed(&g->s);
    else
        dev_stopper_stopped(&g->s);
}

/* The group machine's STOP and RESUME, told as the group's own events: STOP and RESUME mean
 * the whole daemon to a QEMU client (docs/qmp.md, "Stop groups"). */
static void emit(void *opaque, const char *name, json_t *data)
{
    struct dev_group *g = opaque;
    enum run_state state = runstate_get(g->own);

    json_decref(data);  /* STOP and RESUME have none */
    if (strcmp(name, "RESUME") == 0) {
        dev_context_emit(g->s.ctx, "__org.thinblk_GROUP_RESUME",
                         json_pack("{s:s}", "group", g->name));
        return;
    }
    /* A STOP while still running is cont dropping a pending stop, which only an error
     * requests. */
    dev_context_emit(g->s.ctx, "__org.thinblk_GROUP_STOP",
                     json_pack("{s:s,s:s}", "group", g->name, "status",
                               runstate_name(state == RUN_STATE_RUNNING ? RUN_STATE_IO_ERROR
                                                                        : state)));
}

struct dev_group *dev_group_find(struct dev_context *ctx, const char *name, struct error **errp)
{
    for (struct dev_group *g = dev_context_groups(ctx)->head; g; g = g->next) {
        if (strcmp(g->name, name) == 0)
            return g;
    }
    error_setg(errp, "Group '%s' not found", name);
    return NULL;
}

struct dev_group *dev_group_add(struct dev_context *ctx, const char *name, struct error **errp)
{
    struct dev_group *g;

    if (dev_group_find(ctx, name, NULL)) {
        error_setg(errp, "Group '%s' already exists", name);
        return NULL;
    }
    g = xzalloc(sizeof(*g));
    dev_stopper_init(&g->s, &group_stopper_ops, ctx);
    g->name = xstrdup(name);
    g->daemon = dev_context_runstate(ctx);
    g->own = runstate_new(dev_context_loop(ctx), RUN_STATE_RUNNING, emit, g);
    dev_stopper_io_init(&g->io, &g->s);
    runstate_set_io(g->own, &g->io.io);
    g->running = group_running(&g->s);
    runstate_add_listener(g->own, on_change, g);
    runstate_add_listener(g->daemon, on_change, g);
    dev_group_queue_push(dev_context_groups(ctx), g);
    return g;
}

static void group_free(struct dev_group *g)
{
    runstate_remove_listener(g->daemon, on_change, g);
    runstate_free(g->own);
    dev_stopper_fini(&g->s);
    free(g->name);
    free(g);
}

static bool has_devices(const struct dev_group *g)
{
    for (struct device *d = device_first(g->s.ctx); d; d = device_next(d)) {
        if (device_group(d) == g)
            return true;
    }
    return false;
}

int dev_group_del(struct dev_context *ctx, const char *name, struct error **errp)
{
    struct dev_group *g = dev_group_find(ctx, name, errp);

    if (!g)
        return -1;
    if (has_devices(g)) {
        error_setg(errp, "Group '%s' still has exports", name);
        return -1;
    }
    dev_group_queue_remove(dev_context_groups(ctx), g);
    group_free(g);
    return 0;
}

void dev_groups_free(struct dev_context *ctx)
{
    struct dev_group *g;

    while ((g = dev_group_queue_pop(dev_context_groups(ctx))))
        group_free(g);
}

struct dev_stopper *dev_group_stopper(struct dev_group *g)
{
    return &g->s;
}

const char *dev_group_name(const struct dev_group *g)
{
    return g->name;
}

struct runstate *dev_group_runstate(struct dev_group *g)
{
    return g->own;
}

const struct dev_stop_cause *dev_group_last_stop(const struct dev_group *g)
{
    return g->s.last_stop.device ? &g->s.last_stop : NULL;
}

void dev_group_tag(json_t *obj, const struct device *d)
{
    if (device_group(d))
        json_object_set_new(obj, "__org.thinblk_group", json_string(device_group(d)->name));
}

static json_t *group_query(struct dev_group *g)
{
    json_t *exports = json_array();

    for (struct device *d = device_first(g->s.ctx); d; d = device_next(d)) {
        if (device_group(d) == g)
            json_array_append_new(exports, json_string(device_name(d)));
    }
    return json_pack("{s:s,s:s,s:b,s:o}", "name", g->name, "status",
                     runstate_name(runstate_get(g->own)), "running",
                     runstate_is_running(g->own), "exports", exports);
}

json_t *dev_groups_query(struct dev_context *ctx)
{
    json_t *list = json_array();

    for (struct dev_group *g = dev_context_groups(ctx)->head; g; g = g->next)
        json_array_append_new(list, group_query(g));
    return list;
}
