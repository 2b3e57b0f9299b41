/* thinblk-agent: one QMP connection per daemon, non-blocking, reconnecting with back-off.
 *
 * States: disconnected (a timer to try again) -> greeting -> negotiating -> ready; EOF or a
 * protocol error from any of them goes back to disconnected. Nothing here waits: the connect
 * is a Unix-socket connect that fails at once rather than block (qmpc_open with timeout 0),
 * and replies come back through mon_call()'s callbacks.
 */
#include "agent/agent.h"

#include <string.h>

#include "client/qmp-client.h"
#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"

#define RECONNECT_MIN_NS 100000000ull  /* 100 ms, doubling up to reconnect-max */

struct mon_call {
    struct mon_call *next;
    int64_t id;
    mon_reply_fn *fn;
    void *opaque;
};

static void mon_connect(struct loop *loop, void *opaque);

struct mon *mon_new(struct agent *a, const struct agent_daemon_conf *conf)
{
    struct mon *m = xzalloc(sizeof(*m));

    m->agent = a;
    m->conf = conf;
    m->backoff_ns = RECONNECT_MIN_NS;
    return m;
}

DEFINE_QUEUE_FUNCTIONS(mon_call_queue, struct mon_call, next)

static void drop_calls(struct mon *m)
{
    struct mon_call *c;

    while ((c = mon_call_queue_pop(&m->calls)))
        free(c);
}

static void mon_close(struct mon *m)
{
    if (!m->c)
        return;
    loop_del_fd(m->agent->loop, qmpc_fd(m->c));
    qmpc_free(m->c);
    m->c = NULL;
    m->ready = false;
    drop_calls(m);
    loop_del_timer(m->agent->loop, m->poll_timer);
    m->poll_timer = 0;
}

void mon_free(struct mon *m)
{
    if (!m)
        return;
    mon_close(m);
    loop_del_timer(m->agent->loop, m->connect_timer);
    disk_free_all(m);
    free(m->last_connect_error);
    for (size_t i = 0; i < ARRAY_SIZE(m->snap); i++)
        json_decref(m->snap[i]);
    free(m);
}

static void schedule_connect(struct mon *m)
{
    loop_del_timer(m->agent->loop, m->connect_timer);
    m->connect_timer = loop_add_timer(m->agent->loop, m->backoff_ns, mon_connect, m);
    m->backoff_ns = MIN(m->backoff_ns * 2, m->agent->cfg->reconnect_max_ns);
}

static void lost(struct mon *m, const char *why)
{
    bool was_ready = m->ready;

    if (was_ready)
        log_warn("daemon %s: connection lost (%s); reconnecting", m->conf->name, why);
    else
        log_debug("daemon %s: connection failed (%s)", m->conf->name, why);
    mon_close(m);
    if (was_ready)
        disk_on_disconnect(m);
    schedule_connect(m);
}

static void on_poll(struct loop *loop, void *opaque)
{
    struct mon *m = opaque;

    m->poll_timer = loop_add_timer(loop, m->agent->cfg->poll_ns, on_poll, m);
    disk_reconcile(m);
}

static void on_negotiated(struct mon *m, json_t *ret, const char *cls, const char *desc,
                          void *opaque)
{
    if (cls) {
        log_error("daemon %s: qmp_capabilities refused: %s", m->conf->name, desc);
        lost(m, "negotiation refused");
        return;
    }
    m->ready = true;
    m->backoff_ns = RECONNECT_MIN_NS;
    m->last_connect_error = NULL;
    log_info("daemon %s: connected to %s%s", m->conf->name, m->conf->socket,
             m->ever_connected ? " again" : "");
    m->ever_connected = true;
    m->poll_timer = loop_add_timer(m->agent->loop, m->agent->cfg->poll_ns, on_poll, m);
    disk_reconcile(m);
}

static void dispatch(struct mon *m, struct qmpc_message *msg)
{
    switch (msg->kind) {
    case QMPC_MSG_GREETING:
        if (mon_call(m, "qmp_capabilities", NULL, on_negotiated, NULL) < 0)
            lost(m, "could not send qmp_capabilities");
        return;
    case QMPC_MSG_EVENT:
        if (m->ready)
            disk_on_event(m, msg->event, msg->data);
        return;
    case QMPC_MSG_RETURN:
    case QMPC_MSG_ERROR:
        break;
    }
    if (!json_is_integer(msg->id)) {
        log_warn("daemon %s: a reply without our id: %.200s", m->conf->name, msg->text);
        return;
    }
    for (struct mon_call *c = m->calls.head; c; c = c->next) {
        if (c->id != json_integer_value(msg->id))
            continue;
        mon_call_queue_remove(&m->calls, c);
        if (c->fn)
            c->fn(m, msg->kind == QMPC_MSG_RETURN ? msg->ret : NULL, msg->error_class,
                  msg->error_desc, c->opaque);
        free(c);
        return;
    }
    log_warn("daemon %s: a reply nobody asked for: %.200s", m->conf->name, msg->text);
}

static void on_readable(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct mon *m = opaque;
    struct qmpc *c = m->c;
    _cleanup_error_ struct error *err = NULL;
    ssize_t r = qmpc_read(c, &err);

    /* Take what came before an EOF first: a SHUTDOWN, the last replies. */
    for (;;) {
        struct qmpc_message *msg = NULL;
        _cleanup_error_ struct error *perr = NULL;
        int p = qmpc_pop(c, &msg, &perr);
        if (p < 0) {
            lost(m, perr->desc);
            return;
        }
        if (p == 0)
            break;
        dispatch(m, msg);
        qmpc_message_free(msg);
        if (m->c != c)
            return;  /* a callback closed it */
    }
    if (r < 0)
        lost(m, err ? err->desc : "connection closed");
}

static void mon_connect(struct loop *loop, void *opaque)
{
    struct mon *m = opaque;
    _cleanup_error_ struct error *err = NULL;

    m->connect_timer = 0;
    m->c = qmpc_open(m->conf->socket, 0, &err);
    if (!m->c) {
        /* Said once per kind of failure, not at every attempt. */
        if (!m->last_connect_error || strcmp(m->last_connect_error, err->desc)) {
            log_warn("daemon %s: %s; retrying", m->conf->name, err->desc);
            free(m->last_connect_error);
            m->last_connect_error = xstrdup(err->desc);
        }
        schedule_connect(m);
        return;
    }
    free(m->last_connect_error);
    m->last_connect_error = NULL;
    if (loop_add_fd(loop, qmpc_fd(m->c), LOOP_READ, on_readable, m) < 0) {
        qmpc_free(m->c);
        m->c = NULL;
        schedule_connect(m);
    }
}

void mon_start(struct mon *m)
{
    mon_connect(m->agent->loop, m);
}

int mon_call(struct mon *m, const char *name, json_t *args, mon_reply_fn *fn, void *opaque)
{
    _cleanup_error_ struct error *err = NULL;

    if (!m->c)
        return -1;
    int64_t id = qmpc_send_command(m->c, name, args, &err);
    if (id < 0) {
        log_debug("daemon %s: %s: %s", m->conf->name, name, err->desc);
        return -1;
    }
    struct mon_call *c = xzalloc(sizeof(*c));
    c->id = id;
    c->fn = fn;
    c->opaque = opaque;
    mon_call_queue_push(&m->calls, c);
    return 0;
}
