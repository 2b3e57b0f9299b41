/* QMP commands about events: thinblk's __org.thinblk_query-event-journal (docs/qmp.md,
 * "Event journal"). */
#include "qmp/commands.h"

#include "common/util.h"
#include "qmp/journal.h"

static json_t *query_event_journal(struct qmp_call *call, json_t *args, struct error **errp)
{
    struct qmp_services *svc = call->opaque;
    json_t *after = json_object_get(args, "after");

    return qmp_journal_query(svc->journal, after ? (uint64_t)json_integer_value(after) : 0,
                             json_string_value(json_object_get(args, "instance")), errp);
}

static const struct schema_member query_event_journal_args[] = {
    { "after", SCHEMA_INT, .optional = true, .min = 0, .max = INT64_MAX,
      .range_name = "uint64" },
    { "instance", SCHEMA_STR, .optional = true },
    { NULL },
};

static const struct qmp_command event_commands[] = {
    { "__org.thinblk_query-event-journal", query_event_journal, query_event_journal_args, 0 },
};

void qmp_register_event(struct qmp_dispatcher *d, struct qmp_services *svc)
{
    qmp_dispatcher_add(d, event_commands, ARRAY_SIZE(event_commands), svc);
}
