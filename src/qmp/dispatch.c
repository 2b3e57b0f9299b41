/* QMP command dispatch. See dispatch.h. */
#include "qmp/dispatch.h"

#include <string.h>

#include "common/assert.h"
#include "common/qjson.h"
#include "common/util.h"
#include "common/vector.h"

char qmp_deferred_marker;

/* A deferred command's answer: where it goes and its id. */
struct qmp_pending {
    struct qmp_session *session;  /* NULL once detached: the answer is dropped */
    json_t *id;                   /* a reference, or NULL */
};

struct entry {
    const struct qmp_command *cmd;
    void *opaque;
};

DEFINE_VECTOR_TYPE(entry_vector, struct entry)

struct qmp_dispatcher {
    entry_vector entries;
};

struct qmp_dispatcher *qmp_dispatcher_new(void)
{
    return xzalloc(sizeof(struct qmp_dispatcher));
}

void qmp_dispatcher_free(struct qmp_dispatcher *d)
{
    if (!d)
        return;
    entry_vector_reset(&d->entries);
    free(d);
}

static const struct entry *find(struct qmp_dispatcher *d, const char *name)
{
    for (size_t i = 0; i < d->entries.len; i++) {
        if (strcmp(d->entries.ptr[i].cmd->name, name) == 0)
            return &d->entries.ptr[i];
    }
    return NULL;
}

void qmp_dispatcher_add(struct qmp_dispatcher *d, const struct qmp_command *cmds, size_t n,
                        void *opaque)
{
    for (size_t i = 0; i < n; i++) {
        if (find(d, cmds[i].name))
            abort(); /* two tables claim one name: a programming error */
        entry_vector_append(&d->entries, (struct entry){ &cmds[i], opaque });
    }
}

void qmp_dispatcher_foreach(struct qmp_dispatcher *d,
                            void (*fn)(const struct qmp_command *cmd, void *opaque), void *opaque)
{
    for (size_t i = 0; i < d->entries.len; i++)
        fn(d->entries.ptr[i].cmd, opaque);
}

json_t *qmp_error_response(const struct error *err, json_t *id)
{
    json_t *rsp = json_pack("{s:{s:s,s:o}}", "error", "class", error_class_name(err->cls),
                            "desc", qjson_string_sanitized(err->desc));

    if (id)
        json_object_set(rsp, "id", id);
    return rsp;
}

json_t *qmp_return_response(json_t *ret, json_t *id)
{
    json_t *rsp = json_object();

    json_object_set_new(rsp, "return", ret);
    if (id)
        json_object_set(rsp, "id", id);
    return rsp;
}

/* The request's shape, as QEMU's qmp_dispatch_check_obj(). Returns the command name. */
static const char *check_request(struct qmp_session *s, json_t *req, bool *oob,
                                 struct error **errp)
{
    const char *name = NULL;
    size_t nkeys;

    if (!qjson_is_object(req)) {
        error_setg(errp, "QMP input must be a JSON object");
        return NULL;
    }
    /* In QEMU's member order, so a request with two problems gets QEMU's error for it. */
    _cleanup_free_ const char **keys = qjson_keys(req, &nkeys);
    for (size_t i = 0; i < nkeys; i++) {
        const char *key = keys[i];
        json_t *v = json_object_get(req, key);
        bool is_exec = strcmp(key, "execute") == 0;
        if (is_exec || (strcmp(key, "exec-oob") == 0 && s->oob)) {
            if (!json_is_string(v)) {
                error_setg(errp, "QMP input member '%s' must be a string", key);
                return NULL;
            }
            if (name) {
                error_setg(errp, "QMP input member 'execute' clashes with 'exec-oob'");
                return NULL;
            }
            name = json_string_value(v);
            *oob = !is_exec;
        } else if (strcmp(key, "arguments") == 0) {
            if (!qjson_is_object(v)) {
                error_setg(errp, "QMP input member 'arguments' must be an object");
                return NULL;
            }
        } else if (strcmp(key, "id") != 0) {
            json_t *k = qjson_string_sanitized(key);
            error_setg(errp, "QMP input member '%s' is unexpected", json_string_value(k));
            json_decref(k);
            return NULL;
        }
    }
    if (!name)
        error_setg(errp, "QMP input lacks member 'execute'");
    return name;
}

json_t *qmp_dispatch(struct qmp_dispatcher *d, struct qmp_session *s, json_t *req,
                     const struct error *parse_err)
{
    _cleanup_error_ struct error *err = NULL;
    json_t *id = qjson_is_object(req) ? json_object_get(req, "id") : NULL;
    bool oob = false;

    if (!req)
        return qmp_error_response(parse_err, NULL);

    const char *name = check_request(s, req, &oob, &err);
    if (!name)
        return qmp_error_response(err, id);

    const struct entry *e = find(d, name);
    if (!s->negotiated && e && !(e->cmd->flags & QMP_CMD_PRECAP))
        e = NULL;
    if (!e) {
        if (!s->negotiated) {
            error_set(&err, ERROR_CLASS_COMMAND_NOT_FOUND,
                      "Expecting capabilities negotiation with 'qmp_capabilities'");
        } else {
            json_t *n = qjson_string_sanitized(name);
            error_set(&err, ERROR_CLASS_COMMAND_NOT_FOUND, "The command %s has not been found",
                      json_string_value(n));
            json_decref(n);
        }
        return qmp_error_response(err, id);
    }
    if (oob) {
        /* None of our commands may run out of band, as none of QEMU's but a few. */
        error_setg(&err, "The command %s does not support OOB", name);
        return qmp_error_response(err, id);
    }

    json_t *args = json_object_get(req, "arguments");
    json_t *empty = NULL;
    if (!args)
        args = empty = json_object();
    json_t *ret = NULL;
    struct qmp_call call = { .session = s, .opaque = e->opaque, .dispatcher = d, .id = id };
    ASSERT(!s->pending);
    if (schema_check(e->cmd->args, args, &err) == 0)
        ret = e->cmd->fn(&call, args, &err);
    json_decref(empty);
    ASSERT((ret == QMP_DEFERRED) == (call.deferred != NULL));
    if (ret == QMP_DEFERRED)
        return NULL;
    if (!ret)
        return qmp_error_response(err, id);
    return qmp_return_response(ret, id);
}

struct qmp_pending *qmp_call_defer(struct qmp_call *call)
{
    struct qmp_pending *p = xzalloc(sizeof(*p));

    ASSERT(!call->deferred && !call->session->pending);
    p->session = call->session;
    p->id = call->id ? json_incref(call->id) : NULL;
    call->deferred = p;
    call->session->pending = p;
    return p;
}

static void pending_answer(struct qmp_pending *p, json_t *rsp)
{
    struct qmp_session *s = p->session;

    if (s) {
        s->pending = NULL;
        if (s->deliver)
            s->deliver(s, rsp);
        else
            json_decref(rsp);
    } else {
        json_decref(rsp);
    }
    json_decref(p->id);
    free(p);
}

void qmp_pending_return(struct qmp_pending *p, json_t *ret)
{
    pending_answer(p, qmp_return_response(ret, p->id));
}

void qmp_pending_error(struct qmp_pending *p, const struct error *err)
{
    pending_answer(p, qmp_error_response(err, p->id));
}

void qmp_session_detach(struct qmp_session *s)
{
    if (s->pending) {
        s->pending->session = NULL;
        s->pending = NULL;
    }
}
