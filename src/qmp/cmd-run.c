/* QMP commands of the run state: query-status, stop, cont, quit, and thinblk's stop reason
 * and stop groups (docs/qmp.md, "Stop groups"). */
#include "qmp/commands.h"

#include <errno.h>
#include <string.h>

#include "common/util.h"
#include "device/device.h"
#include "device/group.h"
#include "runstate/runstate.h"

static json_t *query_status(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct runstate *rs = ((struct qmp_services *)call->opaque)->runstate;

    /* "singlestep" is a VM's; QEMU 7.2 always sends it, so clients may expect it. Members in
     * QEMU's schema order, which decides their order on the wire (common/qjson.h). */
    return json_pack("{s:b,s:b,s:s}", "running", runstate_is_running(rs), "singlestep", 0,
                     "status", runstate_name(runstate_get(rs)));
}

static json_t *stop(struct qmp_call *call, json_t *args, struct error **errp)
{
    runstate_stop(((struct qmp_services *)call->opaque)->runstate);
    return json_object();
}

static json_t *cont(struct qmp_call *call, json_t *args, struct error **errp)
{
    if (runstate_cont(((struct qmp_services *)call->opaque)->runstate, errp) < 0)
        return NULL;
    return json_object();
}

static json_t *quit(struct qmp_call *call, json_t *args, struct error **errp)
{
    /* SHUTDOWN goes out now, the response after it, then the daemon exits once both are
     * sent: the order QEMU's clients see. */
    runstate_shutdown(((struct qmp_services *)call->opaque)->runstate,
                      RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    return json_object();
}

static json_t *timestamp(uint64_t ns)
{
    return json_pack("{s:I,s:I}", "seconds", (json_int_t)(ns / 1000000000u), "microseconds",
                     (json_int_t)(ns % 1000000000u / 1000u));
}

/* thinblk's extension, proposed for QEMU in 2011 ("I/O error info & query-stop-reason") and
 * never added: why the daemon is not running, in one call, for a client that connects late
 * and missed the events. */
static json_t *stop_reason(struct runstate *rs, const struct dev_stop_cause *c)
{
    enum run_state state = runstate_get(rs);
    json_t *ret = json_pack("{s:s,s:b,s:o}", "status", runstate_name(state), "running",
                            state == RUN_STATE_RUNNING, "since",
                            timestamp(runstate_since_ns(rs)));

    if (state == RUN_STATE_IO_ERROR && c) {
        json_object_set_new(ret, "io-error",
                            json_pack("{s:s,s:s,s:s,s:b,s:s,s:s,s:o}", "device", c->device,
                                      "node-name", c->node_name, "operation", c->operation,
                                      "nospace", dev_errno_nospace(c->err), "errno",
                                      strerrorname_np(c->err) ? strerrorname_np(c->err) : "",
                                      "reason", dev_error_reason(c->err), "timestamp",
                                      timestamp(c->when_ns)));
    }
    return ret;
}

static json_t *query_stop_reason(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    const char *name = json_string_value(json_object_get(args, "group"));
    struct dev_group *g;

    if (!name)
        return stop_reason(svc->runstate, dev_context_last_stop(svc->devs));
    g = dev_group_find(svc->devs, name, errp);
    return g ? stop_reason(dev_group_runstate(g), dev_group_last_stop(g)) : NULL;
}

static const char *name_arg(json_t *args)
{
    return json_string_value(json_object_get(args, "name"));
}

static json_t *group_add(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    return dev_group_add(svc->devs, name_arg(args), errp) ? json_object() : NULL;
}

static json_t *group_del(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    return dev_group_del(svc->devs, name_arg(args), errp) < 0 ? NULL : json_object();
}

/* The group's stop and cont are the run state's, on the group's own machine. */
static json_t *group_stop(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct dev_group *g = dev_group_find(((struct qmp_services *)call->opaque)->devs,
                                         name_arg(args), errp);

    if (!g)
        return NULL;
    runstate_stop(dev_group_runstate(g));
    return json_object();
}

static json_t *group_cont(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct dev_group *g = dev_group_find(((struct qmp_services *)call->opaque)->devs,
                                         name_arg(args), errp);

    if (!g || runstate_cont(dev_group_runstate(g), errp) < 0)
        return NULL;
    return json_object();
}

static json_t *query_groups(struct qmp_call *call, json_t *args, struct error **errp)
{
    return dev_groups_query(((struct qmp_services *)call->opaque)->devs);
}

static const struct schema_member stop_reason_args[] = {
    { "group", SCHEMA_STR, .optional = true },
    { NULL },
};

static const struct qmp_command run_commands[] = {
    { "query-status", query_status, NULL, 0 },
    { "stop", stop, NULL, 0 },
    { "cont", cont, NULL, 0 },
    { "quit", quit, NULL, 0 },
    { "__org.thinblk_query-stop-reason", query_stop_reason, stop_reason_args, 0 },
    { "__org.thinblk_group-add", group_add, dev_group_options, 0 },
    { "__org.thinblk_group-del", group_del, dev_group_options, 0 },
    { "__org.thinblk_group-stop", group_stop, dev_group_options, 0 },
    { "__org.thinblk_group-cont", group_cont, dev_group_options, 0 },
    { "__org.thinblk_query-groups", query_groups, NULL, 0 },
};

void qmp_register_run(struct qmp_dispatcher *d, struct qmp_services *svc)
{
    qmp_dispatcher_add(d, run_commands, ARRAY_SIZE(run_commands), svc);
}
