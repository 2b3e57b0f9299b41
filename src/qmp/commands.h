/* The daemon's QMP command tables, one registration function per cmd-<group>.c. */
#ifndef THINBLK_QMP_COMMANDS_H
#define THINBLK_QMP_COMMANDS_H

#include <jansson.h>

#include "qmp/dispatch.h"

struct runstate;
struct block_graph;

/* qmp_capabilities, query-version (answers version, borrowed: must outlive d), query-commands. */
void qmp_register_control(struct qmp_dispatcher *d, json_t *version);
/* query-status, stop, cont, quit. */
void qmp_register_run(struct qmp_dispatcher *d, struct runstate *rs);
/* block-set-write-threshold. */
void qmp_register_block(struct qmp_dispatcher *d, struct block_graph *graph);

/* The version object of the greeting and query-version for version "X.Y.Z": QEMU's shape,
 * {"qemu": {"major": X, "minor": Y, "micro": Z}, "package": "thinblk X.Y.Z"}. New reference. */
json_t *qmp_version_info(const char *version);

#endif
