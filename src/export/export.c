/* Block exports. See export.h. */
#include "export/export.h"

#include <string.h>

#include "block/graph.h"
#include "common/list.h"
#include "common/log.h"
#include "common/util.h"
#include "device/device.h"
#include "nbd/server.h"

struct export {
    struct export *next;
    char *id;
    char *name;   /* the NBD export name */
    struct device *dev;
};

DEFINE_QUEUE_TYPE(export_queue, struct export, next)

struct exports {
    struct block_graph *graph;
    struct dev_context *devs;
    struct nbd_server *nbd;
    export_queue list;
};

struct exports *exports_new(struct block_graph *graph, struct dev_context *devs)
{
    struct exports *x = xzalloc(sizeof(*x));

    x->graph = graph;
    x->devs = devs;
    return x;
}

static struct export *find(struct exports *x, const char *id)
{
    for (struct export *e = x->list.head; e; e = e->next) {
        if (strcmp(e->id, id) == 0)
            return e;
    }
    return NULL;
}

static void export_free(struct exports *x, struct export *e)
{
    export_queue_remove(&x->list, e);
    device_free(e->dev);
    free(e->id);
    free(e->name);
    free(e);
}

/* Remove e from the NBD server and the list; BLOCK_EXPORT_DELETED as QEMU sends it. */
static void export_remove(struct exports *x, struct export *e)
{
    char *id = xstrdup(e->id);

    if (x->nbd)
        nbd_server_remove_export(x->nbd, e->name, true, NULL);
    /* Requests the clients left behind (held or parked) have nobody to answer to. */
    device_abort(e->dev);
    export_free(x, e);
    x->devs->emit(x->devs->emit_opaque, "BLOCK_EXPORT_DELETED", json_pack("{s:s}", "id", id));
    free(id);
}

void exports_shutdown(struct exports *x)
{
    while (!export_queue_empty(&x->list))
        export_remove(x, x->list.head);
    if (x->nbd) {
        nbd_server_stop(x->nbd);
        x->nbd = NULL;
    }
}

void exports_free(struct exports *x)
{
    if (!x)
        return;
    exports_shutdown(x);
    free(x);
}

int exports_nbd_server_start(struct exports *x, json_t *opts, struct error **errp)
{
    json_t *addr = json_object_get(opts, "addr");
    json_t *maxc = json_object_get(opts, "max-connections");
    const char *key;
    json_t *v;

    json_object_foreach(opts, key, v) {
        if (strcmp(key, "addr") && strcmp(key, "max-connections")) {
            if (!strcmp(key, "tls-creds") || !strcmp(key, "tls-authz") ||
                !strcmp(key, "tls-hostname"))
                error_setg(errp, "TLS is not supported");
            else
                error_setg(errp, "Parameter '%s' is unexpected", key);
            return -1;
        }
    }
    if (x->nbd) {
        error_setg(errp, "NBD server already running");
        return -1;
    }
    if (!addr) {
        error_setg(errp, "Parameter 'addr' is missing");
        return -1;
    }
    if (maxc && (!json_is_integer(maxc) || json_integer_value(maxc) < 0 ||
                 json_integer_value(maxc) > UINT32_MAX)) {
        error_setg(errp, "Parameter 'max-connections' expects uint32");
        return -1;
    }
    x->nbd = nbd_server_start(x->devs->loop, addr, maxc ? (uint32_t)json_integer_value(maxc) : 0,
                              errp);
    return x->nbd ? 0 : -1;
}

int exports_nbd_server_stop(struct exports *x, struct error **errp)
{
    if (!x->nbd) {
        error_setg(errp, "NBD server not running");
        return -1;
    }
    exports_shutdown(x);
    return 0;
}

static const char *opt_str(json_t *opts, const char *key, struct error **errp, bool *bad)
{
    json_t *v = json_object_get(opts, key);

    if (v && !json_is_string(v)) {
        error_setg(errp, "Invalid parameter type for '%s', expected: string", key);
        *bad = true;
    }
    return json_string_value(v);
}

static bool opt_bool(json_t *opts, const char *key, struct error **errp, bool *bad)
{
    json_t *v = json_object_get(opts, key);

    if (v && !json_is_boolean(v)) {
        error_setg(errp, "Invalid parameter type for '%s', expected: boolean", key);
        *bad = true;
    }
    return json_is_true(v);
}

static int opt_action(json_t *opts, const char *key, enum dev_error_action dflt,
                      struct error **errp, bool *bad)
{
    const char *s = opt_str(opts, key, errp, bad);
    int a;

    if (!s)
        return (int)dflt;
    a = dev_error_action_parse(s);
    if (a < 0) {
        error_setg(errp, "Parameter '%s' does not accept value '%s'", key, s);
        *bad = true;
    }
    return a;
}

int exports_add(struct exports *x, json_t *opts, struct error **errp)
{
    static const char *const known[] = {
        "type", "id", "node-name", "writable", "writethrough", "name", "description",
        "werror", "rerror", "fixed-iothread", "iothread", "bitmaps", "allocation-depth",
    };
    const char *key;
    json_t *v;
    bool bad = false;

    json_object_foreach(opts, key, v) {
        size_t i = 0;
        while (i < ARRAY_SIZE(known) && strcmp(known[i], key))
            i++;
        if (i == ARRAY_SIZE(known)) {
            error_setg(errp, "Parameter '%s' is unexpected", key);
            return -1;
        }
    }
    const char *type = opt_str(opts, "type", errp, &bad);
    const char *id = opt_str(opts, "id", errp, &bad);
    const char *node_name = opt_str(opts, "node-name", errp, &bad);
    bool writable = opt_bool(opts, "writable", errp, &bad);
    bool writethrough = opt_bool(opts, "writethrough", errp, &bad);
    const char *name = opt_str(opts, "name", errp, &bad);
    const char *desc = opt_str(opts, "description", errp, &bad);
    int werror = opt_action(opts, "werror", DEV_ACTION_ENOSPC, errp, &bad);
    int rerror = opt_action(opts, "rerror", DEV_ACTION_REPORT, errp, &bad);
    if (bad)
        return -1;
    if (!type) {
        error_setg(errp, "Parameter 'type' is missing");
        return -1;
    }
    if (strcmp(type, "nbd") != 0) {
        error_setg(errp, "Parameter 'type' does not accept value '%s'", type);
        return -1;
    }
    if (!id) {
        error_setg(errp, "Parameter 'id' is missing");
        return -1;
    }
    if (!node_name) {
        error_setg(errp, "Parameter 'node-name' is missing");
        return -1;
    }
    if (json_object_get(opts, "bitmaps") || json_object_get(opts, "iothread") ||
        json_is_true(json_object_get(opts, "allocation-depth"))) {
        error_setg(errp, "bitmaps, iothread and allocation-depth are not supported");
        return -1;
    }
    if (find(x, id)) {
        error_setg(errp, "Block export id '%s' is already in use", id);
        return -1;
    }
    if (!x->nbd) {
        error_setg(errp, "NBD server not running");
        return -1;
    }
    struct block_node *root = block_graph_find(x->graph, node_name);
    if (!root) {
        error_setg(errp, "Cannot find device='' nor node-name='%s'", node_name);
        return -1;
    }
    if (writable && root->read_only) {
        error_setg(errp, "Cannot export read-only node '%s' as writable", node_name);
        return -1;
    }
    if (!name)
        name = node_name;
    if (strlen(name) > 4096) {
        error_setg(errp, "export name '%s' too long", name);
        return -1;
    }

    struct device *dev = device_new(x->devs, id, root, (enum dev_error_action)werror,
                                    (enum dev_error_action)rerror, errp);
    if (!dev)
        return -1;
    device_set_writethrough(dev, writethrough);
    if (nbd_server_add_export(x->nbd, name, desc, dev, writable, errp) < 0) {
        device_free(dev);
        return -1;
    }
    struct export *e = xzalloc(sizeof(*e));
    e->id = xstrdup(id);
    e->name = xstrdup(name);
    e->dev = dev;
    export_queue_push(&x->list, e);
    log_info("export %s: node %s as NBD export '%s'%s", id, node_name, name,
             writable ? ", writable" : "");
    return 0;
}

int exports_del(struct exports *x, const char *id, const char *mode, struct error **errp)
{
    struct export *e = find(x, id);
    bool hard = mode && strcmp(mode, "hard") == 0;

    if (mode && !hard && strcmp(mode, "safe") != 0) {
        error_setg(errp, "Parameter 'mode' does not accept value '%s'", mode);
        return -1;
    }
    if (!e) {
        error_setg(errp, "Export '%s' is not found", id);
        return -1;
    }
    if (!hard && x->nbd && nbd_server_export_clients(x->nbd, e->name) > 0) {
        error_setg(errp, "export '%s' still in use", id);
        return -1;
    }
    export_remove(x, e);
    return 0;
}

json_t *exports_query(struct exports *x)
{
    json_t *list = json_array();

    for (struct export *e = x->list.head; e; e = e->next) {
        json_array_append_new(list, json_pack("{s:s,s:s,s:s,s:b}", "type", "nbd", "id", e->id,
                                              "node-name", device_root(e->dev)->node_name,
                                              "shutting-down", 0));
    }
    return list;
}
