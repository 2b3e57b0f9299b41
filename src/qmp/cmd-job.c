/* QMP commands of jobs: query-jobs, job-finalize, job-dismiss, job-complete, job-cancel
 * (QEMU's job.json), and blockdev-create, the command that makes them. */
#include "qmp/commands.h"

#include "block/create.h"
#include "common/util.h"
#include "job/job.h"

static json_t *query_jobs(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    return job_list_query(svc->jobs);
}

static json_t *apply_verb(struct qmp_call *call, json_t *args, enum job_verb verb,
                          struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    const char *id = json_string_value(json_object_get(args, "id"));

    if (job_apply_verb(svc->jobs, id, verb, errp) < 0)
        return NULL;
    return json_object();
}

static json_t *job_finalize(struct qmp_call *call, json_t *args, struct error **errp)
{
    return apply_verb(call, args, JOB_VERB_FINALIZE, errp);
}

static json_t *job_dismiss(struct qmp_call *call, json_t *args, struct error **errp)
{
    return apply_verb(call, args, JOB_VERB_DISMISS, errp);
}

static json_t *job_complete(struct qmp_call *call, json_t *args, struct error **errp)
{
    return apply_verb(call, args, JOB_VERB_COMPLETE, errp);
}

static json_t *job_cancel(struct qmp_call *call, json_t *args, struct error **errp)
{
    return apply_verb(call, args, JOB_VERB_CANCEL, errp);
}

static json_t *blockdev_create(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    struct block_create *c = block_create_prepare(svc->graph, json_object_get(args, "options"),
                                                  errp);
    if (!c)
        return NULL;
    struct job *job = job_new(svc->jobs, json_string_value(json_object_get(args, "job-id")),
                              "create", errp);
    if (!job) {
        block_create_free(c);
        return NULL;
    }
    /* created and running go out before the return, as QEMU's; the rest when the work
     * ends, which may be at once (options QEMU checks inside the job). */
    job_start(job);
    block_create_run(c, job);
    return json_object();
}

static const struct schema_member id_args[] = {
    { "id", SCHEMA_STR },
    { NULL },
};

static const struct schema_member create_args[] = {
    { "job-id", SCHEMA_STR },
    { "options", SCHEMA_OBJECT, .members = block_create_options },
    { NULL },
};

/* In QEMU's query-commands order. */
static const struct qmp_command job_commands[] = {
    { "query-jobs", query_jobs, NULL, 0 },
    { "job-finalize", job_finalize, id_args, 0 },
    { "job-dismiss", job_dismiss, id_args, 0 },
    { "job-complete", job_complete, id_args, 0 },
    { "job-cancel", job_cancel, id_args, 0 },
    { "blockdev-create", blockdev_create, create_args, 0 },
};

void qmp_register_job(struct qmp_dispatcher *d, struct qmp_services *svc)
{
    qmp_dispatcher_add(d, job_commands, ARRAY_SIZE(job_commands), svc);
}
