/* The daemon's QMP command tables, one registration function per cmd-<group>.c. */
#ifndef THINBLK_QMP_COMMANDS_H
#define THINBLK_QMP_COMMANDS_H

#include <jansson.h>

#include "qmp/dispatch.h"

struct runstate;
struct block_graph;
struct dev_context;
struct exports;
struct job_list;
struct tls_objects;
struct qmp_journal;

/* What the command handlers act on; owned by the daemon, outliving the dispatcher. */
struct qmp_services {
    struct runstate *runstate;
    struct block_graph *graph;
    struct dev_context *devs;
    struct exports *exports;
    struct job_list *jobs;
    struct tls_objects *tls;
    struct qmp_journal *journal;  /* the events sent, for __org.thinblk_query-event-journal */
};

/* qmp_capabilities, query-version (answers version, borrowed: must outlive d), query-commands. */
void qmp_register_control(struct qmp_dispatcher *d, json_t *version);
/* query-status, stop, cont, quit, __org.thinblk_query-stop-reason, and the stop groups'
 * __org.thinblk_group-add/-del/-stop/-cont and __org.thinblk_query-groups. */
void qmp_register_run(struct qmp_dispatcher *d, struct qmp_services *svc);
/* blockdev-add/-del, query-named-block-nodes, query-block, query-blockstats,
 * block-set-write-threshold, block_resize, __org.thinblk_fault-set. */
void qmp_register_block(struct qmp_dispatcher *d, struct qmp_services *svc);
/* nbd-server-start/-stop, block-export-add/-del, query-block-exports. */
void qmp_register_export(struct qmp_dispatcher *d, struct qmp_services *svc);

/* __org.thinblk_query-event-journal (svc->journal). */
void qmp_register_event(struct qmp_dispatcher *d, struct qmp_services *svc);

/* object-add, object-del. */
void qmp_register_object(struct qmp_dispatcher *d, struct qmp_services *svc);

/* query-jobs, job-finalize, job-dismiss, job-complete, job-cancel, blockdev-create. */
void qmp_register_job(struct qmp_dispatcher *d, struct qmp_services *svc);

/* The version object of the greeting and query-version for version "X.Y.Z": QEMU's shape,
 * {"qemu": {"major": X, "minor": Y, "micro": Z}, "package": "thinblk X.Y.Z"}. New reference. */
json_t *qmp_version_info(const char *version);

#endif
