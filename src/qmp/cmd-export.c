/* QMP commands of exports: nbd-server-start, nbd-server-stop, block-export-add,
 * block-export-del, query-block-exports. */
#include "qmp/commands.h"

#include "common/util.h"
#include "export/export.h"

/* nbd-server-start takes QEMU's SocketAddressLegacy ({"type": T, "data": {...}}); the
 * command line takes the flat SocketAddress. The exports layer wants the flat one. */
static json_t *flatten_address(json_t *legacy)
{
    json_t *flat = json_deep_copy(json_object_get(legacy, "data"));

    json_object_set(flat, "type", json_object_get(legacy, "type"));
    return flat;
}

static json_t *nbd_server_start(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    json_t *opts = json_deep_copy(args);
    int r;

    json_object_set_new(opts, "addr", flatten_address(json_object_get(args, "addr")));
    r = exports_nbd_server_start(svc->exports, opts, errp);
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

static const char *const export_del_modes[] = { "safe", "hard", NULL };

static const struct schema_member block_export_del_args[] = {
    { "id", SCHEMA_STR },
    { "mode", SCHEMA_ENUM, .optional = true, .values = export_del_modes },
    { NULL },
};

static const struct qmp_command export_commands[] = {
    { "nbd-server-start", nbd_server_start, nbd_server_start_args, 0 },
    { "nbd-server-stop", nbd_server_stop, NULL, 0 },
    { "block-export-add", block_export_add, export_options, 0 },
    { "block-export-del", block_export_del, block_export_del_args, 0 },
    { "query-block-exports", query_block_exports, NULL, 0 },
};

void qmp_register_export(struct qmp_dispatcher *d, struct qmp_services *svc)
{
    qmp_dispatcher_add(d, export_commands, ARRAY_SIZE(export_commands), svc);
}
