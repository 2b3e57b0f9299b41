/* QMP commands of the block graph. */
#include "qmp/commands.h"

#include "block/graph.h"
#include "common/util.h"

static json_t *block_set_write_threshold(struct qmp_call *call, json_t *args,
                                         struct error **errp)
{
    const char *name = json_string_value(json_object_get(args, "node-name"));
    struct block_node *node = block_graph_find(call->opaque, name);

    if (!node) {
        json_t *n = qmp_string_sanitized(name);
        error_setg(errp, "Device '%s' not found", json_string_value(n));
        json_decref(n);
        return NULL;
    }
    /* QEMU: the threshold is armed until crossed, then BLOCK_WRITE_THRESHOLD is sent once
     * and it is disarmed; 0 disarms. Checked by the write path. */
    node->write_threshold = qmp_arg_uint64(json_object_get(args, "write-threshold"));
    return json_object();
}

static const struct qmp_arg write_threshold_args[] = {
    { "node-name", QMP_ARG_STR },
    { "write-threshold", QMP_ARG_UINT64 },
    { NULL },
};

static const struct qmp_command block_commands[] = {
    { "block-set-write-threshold", block_set_write_threshold, write_threshold_args, 0 },
};

void qmp_register_block(struct qmp_dispatcher *d, struct block_graph *graph)
{
    qmp_dispatcher_add(d, block_commands, ARRAY_SIZE(block_commands), graph);
}
