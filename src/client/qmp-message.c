/* Parsing one server message and checking its shape (QMP spec, "Server responses" and
 * "Asynchronous events"). Messages are validated here, once, so users read the fields of
 * struct qmpc_message without checking again. */
#include "client/qmp-client.h"

#include <string.h>

#include "common/json-stream.h"
#include "common/util.h"

void qmpc_message_free(struct qmpc_message *msg)
{
    if (!msg)
        return;
    json_decref(msg->json);
    free(msg->text);
    free(msg);
}

static int parse_error(struct qmpc_message *m, struct error **errp)
{
    json_t *err = json_object_get(m->json, "error");
    json_t *cls = json_object_get(err, "class");
    json_t *desc = json_object_get(err, "desc");
    if (!json_is_string(cls) || !json_is_string(desc)) {
        error_setg(errp, "QMP error reply without a string 'class' and 'desc'");
        return -1;
    }
    m->kind = QMPC_MSG_ERROR;
    m->error_class = json_string_value(cls);
    m->error_desc = json_string_value(desc);
    return 0;
}

static int parse_event(struct qmpc_message *m, struct error **errp)
{
    json_t *name = json_object_get(m->json, "event");
    json_t *ts = json_object_get(m->json, "timestamp");
    json_t *sec = json_object_get(ts, "seconds");
    json_t *usec = json_object_get(ts, "microseconds");
    if (!json_is_string(name)) {
        error_setg(errp, "QMP event whose 'event' is not a string");
        return -1;
    }
    if (!json_is_integer(sec) || !json_is_integer(usec)) {
        error_setg(errp, "QMP event %s without an integer 'timestamp'", json_string_value(name));
        return -1;
    }
    m->kind = QMPC_MSG_EVENT;
    m->event = json_string_value(name);
    m->data = json_object_get(m->json, "data");
    m->seconds = json_integer_value(sec);
    m->microseconds = json_integer_value(usec);
    return 0;
}

/* Fill in the kind and the views of m->json. */
static int classify(struct qmpc_message *m, struct error **errp)
{
    json_t *j = m->json;
    if (!json_is_object(j)) {
        error_setg(errp, "QMP message is not a JSON object");
        return -1;
    }
    if (json_object_get(j, "QMP")) {
        if (!json_is_object(json_object_get(j, "QMP"))) {
            error_setg(errp, "QMP greeting whose 'QMP' is not an object");
            return -1;
        }
        m->kind = QMPC_MSG_GREETING;
        return 0;
    }
    m->id = json_object_get(j, "id");
    if (json_object_get(j, "return")) {
        m->kind = QMPC_MSG_RETURN;
        m->ret = json_object_get(j, "return");
        return 0;
    }
    if (json_object_get(j, "error"))
        return parse_error(m, errp);
    if (json_object_get(j, "event")) {
        m->id = NULL;
        return parse_event(m, errp);
    }
    error_setg(errp, "Unrecognised QMP message: %.200s", m->text);
    return -1;
}

struct qmpc_message *qmpc_message_parse(const char *text, size_t len, struct error **errp)
{
    struct qmpc_message *m = xzalloc(sizeof(*m));
    m->text = xmalloc(len + 1);
    memcpy(m->text, text, len);
    m->text[len] = '\0';
    m->text_len = len;

    /* The monitor's own reader: integers above INT64_MAX stay exact (common/qjson.h). */
    struct error *err = NULL;
    m->json = json_stream_parse(text, len, &err);
    if (!m->json) {
        error_setg(errp, "Invalid JSON from the server: %s: %.200s", err->desc, m->text);
        error_free(err);
        qmpc_message_free(m);
        return NULL;
    }
    if (classify(m, errp) < 0) {
        qmpc_message_free(m);
        return NULL;
    }
    return m;
}
