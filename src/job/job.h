/* Jobs: QEMU's background operations (qapi/job.json), the part blockdev-create needs.
 *
 * A job has an id, a type ("create") and a status that moves as QEMU's job state machine
 * (job.c) says, each move announced by JOB_STATUS_CHANGE {"id", "status"}:
 *
 *   created -> running -> waiting -> pending -> concluded -> null (job-dismiss)
 *                     \-> aborting -> concluded                    (failed or cancelled)
 *
 * Jobs here are what blockdev-create makes: auto-finalize (pending passes on to concluded by
 * itself) and manual dismiss (a concluded job stays in query-jobs, with its error, until
 * job-dismiss). The job layer does no work itself: whoever created a job runs the work and
 * reports its end with job_finish(). Verbs (cancel, finalize, dismiss, complete) are allowed
 * per status as in QEMU's table, with its error texts.
 *
 * Everything runs on the loop thread.
 */
#ifndef THINBLK_JOB_JOB_H
#define THINBLK_JOB_JOB_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "common/error.h"

/* QEMU's JobStatus, in its order (the verb table is indexed by it). */
enum job_status {
    JOB_STATUS_UNDEFINED,
    JOB_STATUS_CREATED,
    JOB_STATUS_RUNNING,
    JOB_STATUS_PAUSED,
    JOB_STATUS_READY,
    JOB_STATUS_STANDBY,
    JOB_STATUS_WAITING,
    JOB_STATUS_PENDING,
    JOB_STATUS_ABORTING,
    JOB_STATUS_CONCLUDED,
    JOB_STATUS_NULL,
    JOB_STATUS__MAX,
};

/* QEMU's JobVerb, the ones with a QMP command here. */
enum job_verb {
    JOB_VERB_CANCEL,
    JOB_VERB_COMPLETE,
    JOB_VERB_FINALIZE,
    JOB_VERB_DISMISS,
    JOB_VERB__MAX,
};

struct job;
struct job_list;

/* A list emitting events through emit (data stolen). */
struct job_list *job_list_new(void (*emit)(void *opaque, const char *name, json_t *data),
                              void *emit_opaque);
/* Free the list and its jobs. No job may still be running (see job_list_busy()). */
void job_list_free(struct job_list *l);
/* Whether a job is still running its work. */
bool job_list_busy(const struct job_list *l);

/* A new job in status created (JOB_STATUS_CHANGE sent), owned by the list. type is a static
 * string. Returns NULL with *errp set for an ill-formed id or one in use (QEMU's texts). */
struct job *job_new(struct job_list *l, const char *id, const char *type, struct error **errp);
/* created -> running. The caller then runs the work and ends it with job_finish(). */
void job_start(struct job *job);
/* The work is over: err (stolen) NULL for success. Success goes waiting -> pending ->
 * concluded; failure, or a cancel that came while running, aborting -> concluded with the
 * error kept for query-jobs. */
void job_finish(struct job *job, struct error *err);
/* Progress for query-jobs (QEMU's create jobs: 0 of 1 while running, 1 of 1 at the end). */
void job_set_progress(struct job *job, uint64_t current, uint64_t total);
/* Whether job-cancel was asked for (work may stop early; job_finish() reports the cancel). */
bool job_is_cancelled(const struct job *job);

/* The job called id, or NULL. */
struct job *job_find(struct job_list *l, const char *id);
enum job_status job_status(const struct job *job);
/* QEMU's name of a status ("created", ...). */
const char *job_status_name(enum job_status s);

/* Apply a verb from QMP to the job called id. Returns 0, or -1 with *errp set: "Job not
 * found", or "Job 'ID' in state 'S' cannot accept command verb 'V'". */
int job_apply_verb(struct job_list *l, const char *id, enum job_verb verb, struct error **errp);

/* query-jobs: QEMU's JobInfo list, newest first. New reference. */
json_t *job_list_query(struct job_list *l);

#endif
