/* QMP commands of user-creatable objects: object-add, object-del (TLS credentials and
 * authorization objects, tls/objects.h). */
#include "qmp/commands.h"

#include "common/util.h"
#include "tls/objects.h"

static json_t *object_add(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;

    return tls_objects_add(svc->tls, args, errp) < 0 ? NULL : json_object();
}

static json_t *object_del(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    const char *id = json_string_value(json_object_get(args, "id"));

    return tls_objects_del(svc->tls, id, errp) < 0 ? NULL : json_object();
}

static const struct schema_member object_del_args[] = {
    { "id", SCHEMA_STR },
    { NULL },
};

static const struct qmp_command object_commands[] = {
    { "object-add", object_add, tls_object_options, 0 },
    { "object-del", object_del, object_del_args, 0 },
};

void qmp_register_object(struct qmp_dispatcher *d, struct qmp_services *svc)
{
    qmp_dispatcher_add(d, object_commands, ARRAY_SIZE(object_commands), svc);
}
