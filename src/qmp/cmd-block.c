/* QMP commands of the block graph and devices: blockdev-add, blockdev-del,
 * query-named-block-nodes, query-block, query-blockstats, block-set-write-threshold,
 * block_resize, and thinblk's __org.thinblk_fault-set. */
#include "qmp/commands.h"

#include <string.h>

#include "block/fault.h"
#include "block/graph.h"
#include "common/util.h"
#include "device/device.h"

static struct block_node *find_node(struct qmp_services *svc, const char *name,
                                    struct error **errp)
{
    struct block_node *node = block_graph_find(svc->graph, name);

    if (!node) {
        json_t *n = qjson_string_sanitized(name);
        error_setg(errp, "Device '%s' not found", json_string_value(n));
        json_decref(n);
    }
    return node;
}

static json_t *block_set_write_threshold(struct qmp_call *call, json_t *args,
                                         struct error **errp)
{
    const char *name = json_string_value(json_object_get(args, "node-name"));
    struct block_node *node = find_node(call->opaque, name, errp);

    if (!node)
        return NULL;
    /* As QEMU: armed until a write goes past it, then BLOCK_WRITE_THRESHOLD once; 0 disarms. */
    node->write_threshold = qjson_uint64(json_object_get(args, "write-threshold"));
    return json_object();
}

/* QEMU's bdrv_lookup_bs(): the root of the device named device, else the node named
 * node_name (either may be NULL). */
static struct block_node *lookup_node(struct qmp_services *svc, const char *device,
                                      const char *node_name, struct error **errp)
{
    struct device *d = device ? device_find(svc->devs, device) : NULL;
    struct block_node *n = node_name ? block_graph_find(svc->graph, node_name) : NULL;

    if (d)
        return device_root(d);
    if (!n)
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", device ? device : "",
                   node_name ? node_name : "");
    return n;
}

static void resized(const struct error *err, void *opaque)
{
    struct qmp_pending *p = opaque;

    if (err)
        qmp_pending_error(p, err);
    else
        qmp_pending_return(p, json_object());
}

static json_t *block_resize(struct qmp_call *call, json_t *args, struct error **errp)
{
    const char *device = json_string_value(json_object_get(args, "device"));
    json_int_t size = json_integer_value(json_object_get(args, "size"));
    struct block_node *n = lookup_node(call->opaque, device,
                                       json_string_value(json_object_get(args, "node-name")),
                                       errp);

    if (!n)
        return NULL;
    if (size < 0) {
        error_setg(errp, "Parameter 'size' expects a >0 size");
        return NULL;
    }
    if (block_node_resizes_later(n)) {
        /* rbd (or raw over it): rbd_resize() runs on the offload thread; the answer comes then. */
        struct qmp_pending *p = qmp_call_defer(call);
        struct error *err = NULL;
        if (block_node_resize_async(n, (uint64_t)size, device, resized, p, &err) < 0) {
            qmp_pending_error(p, err);
            error_free(err);
        }
        return QMP_DEFERRED;
    }
    if (block_node_resize(n, (uint64_t)size, device, errp) < 0)
        return NULL;
    return json_object();
}

/* The node is in the graph (or err says why not), whether or not the client is still there. */
static void blockdev_added(struct block_node *n, const struct error *err, void *opaque)
{
    struct qmp_pending *p = opaque;

    if (n)
        qmp_pending_return(p, json_object());
    else
        qmp_pending_error(p, err);
}

static json_t *blockdev_add(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    if (!json_object_get(args, "node-name")) {
        error_setg(errp, "'node-name' must be specified for the root node");
        return NULL;
    }
    if (block_node_opens_later(args)) {
        /* rbd, or rbd children inline: connecting and opening run on the offload thread; the
         * answer comes then. */
        struct qmp_pending *p = qmp_call_defer(call);
        struct error *err = NULL;
        if (block_node_create_async(svc->graph, args, blockdev_added, p, &err) < 0) {
            qmp_pending_error(p, err);
            error_free(err);
        }
        return QMP_DEFERRED;
    }
    if (!block_node_create(svc->graph, args, errp))
        return NULL;
    return json_object();
}

static json_t *blockdev_del(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    if (block_node_delete(svc->graph, json_string_value(json_object_get(args, "node-name")),
                          errp) < 0)
        return NULL;
    return json_object();
}

static json_t *query_named_block_nodes(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    json_t *list = json_array();

    bool flat = json_is_true(json_object_get(args, "flat"));

    /* Newest first, as QEMU lists them; backing images nested unless flat. */
    for (struct block_node *n = svc->graph->nodes.head; n; n = n->next)
        json_array_insert_new(list, 0, block_node_info_flat(n, flat));
    return list;
}

static json_t *query_block(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    json_t *list = json_array();

    for (struct device *d = device_first(svc->devs); d; d = device_next(d))
        json_array_append_new(list, device_query_block(d));
    return list;
}

static json_t *query_blockstats(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    json_t *list = json_array();

    if (json_is_true(json_object_get(args, "query-nodes"))) {
        error_setg(errp, "query-nodes is not supported; statistics are kept per device");
        json_decref(list);
        return NULL;
    }
    for (struct device *d = device_first(svc->devs); d; d = device_next(d))
        json_array_append_new(list, device_query_stats(d));
    return list;
}

static json_t *fault_set(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct block_node *node = find_node(call->opaque,
                                        json_string_value(json_object_get(args, "node-name")),
                                        errp);

    if (!node || fault_set_rules(node, json_object_get(args, "rules"), errp) < 0)
        return NULL;
    return json_object();
}

static const struct schema_member write_threshold_args[] = {
    { "node-name", SCHEMA_STR },
    { "write-threshold", SCHEMA_UINT64 },
    { NULL },
};

static const struct schema_member block_resize_args[] = {
    { "device", SCHEMA_STR, .optional = true },
    { "node-name", SCHEMA_STR, .optional = true },
    { "size", SCHEMA_INT },
    { NULL },
};

static const struct schema_member node_name_args[] = {
    { "node-name", SCHEMA_STR },
    { NULL },
};

static const struct schema_member named_nodes_args[] = {
    { "flat", SCHEMA_BOOL, .optional = true },
    { NULL },
};

static const struct schema_member blockstats_args[] = {
    { "query-nodes", SCHEMA_BOOL, .optional = true },
    { NULL },
};

static const struct schema_member fault_set_args[] = {
    { "node-name", SCHEMA_STR },
    { "rules", SCHEMA_ARRAY, .element = &fault_rule },
    { NULL },
};

static const struct qmp_command block_commands[] = {
    { "blockdev-add", blockdev_add, block_options, 0 },
    { "blockdev-del", blockdev_del, node_name_args, 0 },
    { "query-named-block-nodes", query_named_block_nodes, named_nodes_args, 0 },
    { "query-block", query_block, NULL, 0 },
    { "query-blockstats", query_blockstats, blockstats_args, 0 },
    { "block-set-write-threshold", block_set_write_threshold, write_threshold_args, 0 },
    { "block_resize", block_resize, block_resize_args, 0 },
    { "__org.thinblk_fault-set", fault_set, fault_set_args, 0 },
};

void qmp_register_block(struct qmp_dispatcher *d, struct qmp_services *svc)
{
    qmp_dispatcher_add(d, block_commands, ARRAY_SIZE(block_commands), svc);
}
