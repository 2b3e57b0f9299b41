/* QMP commands of the run state: query-status, stop, cont, quit. */
#include "qmp/commands.h"

#include "common/util.h"
#include "runstate/runstate.h"

static json_t *query_status(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct runstate *rs = call->opaque;

    /* "singlestep" is a VM's; QEMU 7.2 always sends it, so clients may expect it. Members in
     * QEMU's schema order, which decides their order on the wire (json-writer.h). */
    return json_pack("{s:b,s:b,s:s}", "running", runstate_is_running(rs), "singlestep", 0,
                     "status", runstate_name(runstate_get(rs)));
}

static json_t *stop(struct qmp_call *call, json_t *args, struct error **errp)
{
    runstate_stop(call->opaque);
    return json_object();
}

static json_t *cont(struct qmp_call *call, json_t *args, struct error **errp)
{
    if (runstate_cont(call->opaque, errp) < 0)
        return NULL;
    return json_object();
}

static json_t *quit(struct qmp_call *call, json_t *args, struct error **errp)
{
    /* SHUTDOWN goes out now, the response after it, then the daemon exits once both are
     * sent: the order QEMU's clients see. */
    runstate_shutdown(call->opaque, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    return json_object();
}

static const struct qmp_command run_commands[] = {
    { "query-status", query_status, NULL, 0 },
    { "stop", stop, NULL, 0 },
    { "cont", cont, NULL, 0 },
    { "quit", quit, NULL, 0 },
};

void qmp_register_run(struct qmp_dispatcher *d, struct runstate *rs)
{
    qmp_dispatcher_add(d, run_commands, ARRAY_SIZE(run_commands), rs);
}
