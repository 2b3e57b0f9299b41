/* QMP commands about the monitor itself: qmp_capabilities, query-version, query-commands. */
#include "qmp/commands.h"

#include <stdio.h>
#include <string.h>

#include "common/util.h"

static json_t *qmp_capabilities(struct qmp_call *call, json_t *args, struct error **errp)
{
    json_t *enable = json_object_get(args, "enable");
    bool oob = false;
    size_t i;
    json_t *cap;

    /* It stays in the table after negotiation only to give this answer, as in QEMU. */
    if (call->session->negotiated) {
        error_set(errp, ERROR_CLASS_COMMAND_NOT_FOUND,
                  "Capabilities negotiation is already complete, command ignored");
        return NULL;
    }
    /* The dispatcher checked the list (QMPCapability values: only "oob"). */
    json_array_foreach(enable, i, cap)
        oob = true;
    call->session->negotiated = true;
    call->session->oob = oob;
    return json_object();
}

static json_t *query_version(struct qmp_call *call, json_t *args, struct error **errp)
{
    return json_deep_copy(call->opaque);
}

static void add_name(const struct qmp_command *cmd, void *opaque)
{
    json_array_append_new(opaque, json_pack("{s:s}", "name", cmd->name));
}

static json_t *query_commands(struct qmp_call *call, json_t *args, struct error **errp)
{
    json_t *list = json_array();

    qmp_dispatcher_foreach(call->dispatcher, add_name, list);
    return list;
}

static const char *const capabilities[] = { "oob", NULL };

/* A list element has no name in QEMU's enum error: "Parameter 'null' does not accept ...". */
static const struct schema_member capability = { NULL, SCHEMA_ENUM, .values = capabilities };

static const struct schema_member capabilities_args[] = {
    { "enable", SCHEMA_ARRAY, .optional = true, .element = &capability },
    { NULL },
};

static const struct qmp_command control_commands[] = {
    { "qmp_capabilities", qmp_capabilities, capabilities_args, QMP_CMD_PRECAP },
    { "query-version", query_version, NULL, 0 },
    { "query-commands", query_commands, NULL, 0 },
};

void qmp_register_control(struct qmp_dispatcher *d, json_t *version)
{
    qmp_dispatcher_add(d, control_commands, ARRAY_SIZE(control_commands), version);
}

json_t *qmp_version_info(const char *version)
{
    int major = 0, minor = 0, micro = 0;

    sscanf(version, "%d.%d.%d", &major, &minor, &micro);
    return json_pack("{s:{s:i,s:i,s:i},s:s+}", "qemu", "major", major, "minor", minor,
                     "micro", micro, "package", "thinblk ", version);
}
