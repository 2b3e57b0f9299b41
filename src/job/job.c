/* Jobs. See job.h. */
#include "job/job.h"

#include <ctype.h>
#include <errno.h>
#include <string.h>

#include "common/list.h"
#include "common/utf8.h"
#include "common/util.h"

struct job {
    struct job *next;          /* list->jobs, newest first (query-jobs order) */
    struct job_list *list;
    char *id;
    const char *type;
    enum job_status status;
    bool cancelled;
    bool busy;                 /* between job_start() and job_finish() */
    uint64_t progress_current, progress_total;
    struct error *err;         /* why it failed, once concluded */
};

DEFINE_QUEUE_TYPE(job_queue, struct job, next)

struct job_list {
    job_queue jobs;
    void (*emit)(void *opaque, const char *name, json_t *data);
    void *emit_opaque;
};

static const char *const status_names[JOB_STATUS__MAX] = {
    [JOB_STATUS_UNDEFINED] = "undefined", [JOB_STATUS_CREATED] = "created",
    [JOB_STATUS_RUNNING] = "running", [JOB_STATUS_PAUSED] = "paused",
    [JOB_STATUS_READY] = "ready", [JOB_STATUS_STANDBY] = "standby",
    [JOB_STATUS_WAITING] = "waiting", [JOB_STATUS_PENDING] = "pending",
    [JOB_STATUS_ABORTING] = "aborting", [JOB_STATUS_CONCLUDED] = "concluded",
    [JOB_STATUS_NULL] = "null",
};

static const char *const verb_names[JOB_VERB__MAX] = {
    [JOB_VERB_CANCEL] = "cancel", [JOB_VERB_COMPLETE] = "complete",
    [JOB_VERB_FINALIZE] = "finalize", [JOB_VERB_DISMISS] = "dismiss",
};

/* In which statuses QEMU takes each verb (its JobVerbTable). */
#define S(x) (1u << JOB_STATUS_##x)
static const unsigned verb_allowed[JOB_VERB__MAX] = {
    [JOB_VERB_CANCEL] = S(CREATED) | S(RUNNING) | S(PAUSED) | S(READY) | S(STANDBY) |
                        S(WAITING) | S(PENDING) | S(ABORTING),
    [JOB_VERB_COMPLETE] = S(READY),
    [JOB_VERB_FINALIZE] = S(PENDING),
    [JOB_VERB_DISMISS] = S(CONCLUDED),
};

/* Which moves QEMU's state machine allows (its JobSTT), for the statuses used here. */
static const unsigned transitions[JOB_STATUS__MAX] = {
    [JOB_STATUS_UNDEFINED] = S(CREATED),
    [JOB_STATUS_CREATED] = S(RUNNING) | S(ABORTING) | S(NULL),
    [JOB_STATUS_RUNNING] = S(PAUSED) | S(READY) | S(WAITING) | S(ABORTING),
    [JOB_STATUS_WAITING] = S(PENDING) | S(ABORTING),
    [JOB_STATUS_PENDING] = S(ABORTING) | S(CONCLUDED),
    [JOB_STATUS_ABORTING] = S(ABORTING) | S(CONCLUDED),
    [JOB_STATUS_CONCLUDED] = S(NULL),
};
#undef S

const char *job_status_name(enum job_status s)
{
    return s < JOB_STATUS__MAX ? status_names[s] : "undefined";
}

struct job_list *job_list_new(void (*emit)(void *opaque, const char *name, json_t *data),
                              void *emit_opaque)
{
    struct job_list *l = xzalloc(sizeof(*l));

    l->emit = emit;
    l->emit_opaque = emit_opaque;
    return l;
}

static void job_free(struct job *job)
{
    error_free(job->err);
    free(job->id);
    free(job);
}

void job_list_free(struct job_list *l)
{
    struct job *job;

    if (!l)
        return;
    while ((job = job_queue_pop(&l->jobs)))
        job_free(job);
    free(l);
}

bool job_list_busy(const struct job_list *l)
{
    for (const struct job *job = l ? l->jobs.head : NULL; job; job = job->next) {
        if (job->busy)
            return true;
    }
    return false;
}

static void set_status(struct job *job, enum job_status s)
{
    if (!(transitions[job->status] & (1u << s)))
        abort();  /* a move QEMU's state machine does not have: a bug here */
    job->status = s;
    job->list->emit(job->list->emit_opaque, "JOB_STATUS_CHANGE",
                    json_pack("{s:s,s:s}", "status", status_names[s], "id", job->id));
}

struct job *job_find(struct job_list *l, const char *id)
{
    for (struct job *job = l->jobs.head; job; job = job->next) {
        if (strcmp(job->id, id) == 0)
            return job;
    }
    return NULL;
}

struct job *job_new(struct job_list *l, const char *id, const char *type, struct error **errp)
{
    if (!id_wellformed(id)) {
        error_setg(errp, "Invalid job ID '%s'", id);
        return NULL;
    }
    if (job_find(l, id)) {
        error_setg(errp, "Job ID '%s' already in use", id);
        return NULL;
    }
    struct job *job = xzalloc(sizeof(*job));
    job->list = l;
    job->id = xstrdup(id);
    job->type = type;
    job_queue_push_head(&l->jobs, job);
    set_status(job, JOB_STATUS_CREATED);
    return job;
}

void job_start(struct job *job)
{
    job->busy = true;
    job->progress_current = 0;
    job->progress_total = 1;
    set_status(job, JOB_STATUS_RUNNING);
}

void job_set_progress(struct job *job, uint64_t current, uint64_t total)
{
    job->progress_current = current;
    job->progress_total = total;
}

bool job_is_cancelled(const struct job *job)
{
    return job->cancelled;
}

enum job_status job_status(const struct job *job)
{
    return job->status;
}

void job_finish(struct job *job, struct error *err)
{
    job->busy = false;
    job->progress_current = job->progress_total;  /* QEMU's: done, failed or not */
    /* As QEMU's job_update_rc(): a cancelled job fails, with strerror(ECANCELED) if its
     * work did not fail by itself. */
    if (!err && job->cancelled)
        error_setg(&err, "%s", strerror(ECANCELED));
    if (err) {
        job->err = err;
        set_status(job, JOB_STATUS_ABORTING);
    } else {
        set_status(job, JOB_STATUS_WAITING);
        set_status(job, JOB_STATUS_PENDING);  /* auto-finalize: nothing to wait for */
    }
    set_status(job, JOB_STATUS_CONCLUDED);
}

int job_apply_verb(struct job_list *l, const char *id, enum job_verb verb, struct error **errp)
{
    struct job *job = job_find(l, id);

    if (!job) {
        error_setg(errp, "Job not found");
        return -1;
    }
    if (!(verb_allowed[verb] & (1u << job->status))) {
        error_setg(errp, "Job '%s' in state '%s' cannot accept command verb '%s'", job->id,
                   status_names[job->status], verb_names[verb]);
        return -1;
    }
    switch (verb) {
    case JOB_VERB_CANCEL:
        /* Only a running job can be seen here (created, waiting, pending and aborting are
         * passed through within one call); its end reports the cancel. */
        job->cancelled = true;
        break;
    case JOB_VERB_DISMISS:
        set_status(job, JOB_STATUS_NULL);
        job_queue_remove(&l->jobs, job);
        job_free(job);
        break;
    case JOB_VERB_COMPLETE:   /* no job here is ever ready */
    case JOB_VERB_FINALIZE:   /* nor pending while anyone can ask (auto-finalize) */
    default:
        abort();
    }
    return 0;
}

json_t *job_list_query(struct job_list *l)
{
    json_t *list = json_array();

    for (struct job *job = l->jobs.head; job; job = job->next) {
        json_t *info = json_pack("{s:s,s:s,s:s,s:I,s:I}", "id", job->id, "type", job->type,
                                 "status", status_names[job->status],
                                 "current-progress", (json_int_t)job->progress_current,
                                 "total-progress", (json_int_t)job->progress_total);
        if (job->err) {
            /* The text may quote a client's file name: keep the JSON valid UTF-8. */
            _cleanup_free_ char *text = utf8_sanitize(job->err->desc);
            json_object_set_new(info, "error", json_string(text));
        }
        json_array_append_new(list, info);
    }
    return list;
}
