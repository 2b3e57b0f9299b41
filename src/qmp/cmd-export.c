/* QMP commands of exports: nbd-server-start, nbd-server-stop, block-export-add,
 * block-export-del, query-block-exports. */
#include "qmp/commands.h"

#include <string.h>

#include "common/util.h"
#include "export/export.h"

/* nbd-server-start takes QEMU's SocketAddressLegacy ({"type": T, "data": {...}}); the
 * command line takes the flat SocketAddress. The exports layer wants the flat one. */
static json_t *flatten_address(json_t *legacy, struct error **errp)
{
    json_t *type = json_object_get(legacy, "type");
    json_t *data = json_object_get(legacy, "data");
    const char *key;
    json_t *v;

    if (!json_is_string(type)) {
        error_setg(errp, "Parameter 'addr.type' is missing");
        return NULL;
    }
    if (!json_is_object(data)) {
        error_setg(errp, "Parameter 'addr.data' is missing");
        return NULL;
    }
    json_t *flat = json_deep_copy(data);
    json_object_foreach(legacy, key, v) {
        if (strcmp(key, "type") && strcmp(key, "data")) {
            error_setg(errp, "Parameter 'addr.%s' is unexpected", key);
            json_decref(flat);
            return NULL;
        }
    }
    json_object_set(flat, "type", type);
    return flat;
}

static json_t *nbd_server_start(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    json_t *opts = json_deep_copy(args);
    json_t *addr = flatten_address(json_object_get(args, "addr"), errp);
    int r = -1;

    if (addr) {
        json_object_set_new(opts, "addr", addr);
        r = exports_nbd_server_start(svc->exports, opts, errp);
    }
    json_decref(opts);
    return r < 0 ? NULL : json_object();
}

static json_t *nbd_server_stop(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    return exports_nbd_server_stop(svc->exports, errp) < 0 ? NULL : json_object();
}

static json_t *block_export_add(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    return exports_add(svc->exports, args, errp) < 0 ? NULL : json_object();
}

static json_t *block_export_del(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    if (exports_del(svc->exports, json_string_value(json_object_get(args, "id")),
                    json_string_value(json_object_get(args, "mode")), errp) < 0)
        return NULL;
    return json_object();
}

static json_t *query_block_exports(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    return exports_query(svc->exports);
}

static const struct qmp_arg nbd_server_start_args[] = {
    { "addr", QMP_ARG_OBJECT },
    { "tls-creds", QMP_ARG_STR, .optional = true },
    { "tls-authz", QMP_ARG_STR, .optional = true },
    { "max-connections", QMP_ARG_INT, .optional = true },
    { NULL },
};

static const struct qmp_arg block_export_del_args[] = {
    { "id", QMP_ARG_STR },
    { "mode", QMP_ARG_STR, .optional = true },
    { NULL },
};

static const struct qmp_command export_commands[] = {
    { "nbd-server-start", nbd_server_start, nbd_server_start_args, 0 },
    { "nbd-server-stop", nbd_server_stop, NULL, 0 },
    { "block-export-add", block_export_add, NULL, QMP_CMD_OPEN_ARGS },
    { "block-export-del", block_export_del, block_export_del_args, 0 },
    { "query-block-exports", query_block_exports, NULL, 0 },
};

void qmp_register_export(struct qmp_dispatcher *d, struct qmp_services *svc)
{
    qmp_dispatcher_add(d, export_commands, ARRAY_SIZE(export_commands), svc);
}
