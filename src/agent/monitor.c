/* thinblk-agent: one QMP connection per daemon, non-blocking, reconnecting with back-off.
 *
 * States: disconnected (a timer to try again) -> greeting -> negotiating -> ready; EOF or a
 * protocol error from any of them goes back to disconnected. Nothing here waits: the connect
 * is a Unix-socket connect that fails at once rather than block (qmpc_open with timeout 0),
 * and replies come back through mon_call()'s callbacks. What happens is reported up to the owner
 * through its mon_ops: the monitor never calls into the modules that use it.
 */
#include "agent/monitor.h"

#include <string.h>

#include "client/qmp-client.h"
#include "common/list.h"
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

DEFINE_QUEUE_TYPE(mon_call_queue, struct mon_call, next)

/* A watched daemon's connection. */
struct mon {
    struct loop *loop;
    const struct agent_daemon_conf *conf;
    uint64_t reconnect_max_ns;
    const struct mon_ops *ops;
    void *opaque;           /* the owner's, for ops and mon_opaque() */
    struct qmpc *c;         /* NULL while disconnected */
    bool ready;             /* capabilities negotiated */
    uint64_t connect_timer;
    uint64_t backoff_ns;
    bool ever_connected;
    char *last_connect_error; /* said once, not at every attempt */
    /* Replies expected: id -> callback, in the order sent. */
    mon_call_queue calls;
};

static void mon_connect(struct loop *loop, void *opaque);

struct mon *mon_new(struct loop *loop, const struct agent_daemon_conf *conf,
                    uint64_t reconnect_max_ns, const struct mon_ops *ops, void *opaque)
{
    struct mon *m = xzalloc(sizeof(*m));

    m->loop = loop;
    m->conf = conf;
    m->reconnect_max_ns = reconnect_max_ns;
    m->ops = ops;
    m->opaque = opaque;
    m->backoff_ns = RECONNECT_MIN_NS;
    return m;
}

bool mon_ready(const struct mon *m)
{
    return m->ready;
}

void *mon_opaque(const struct mon *m)
{
    return m->opaque;
}

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
    loop_del_fd(m->loop, qmpc_fd(m->c));
    qmpc_free(m->c);
    m->c = NULL;
    m->ready = false;
    drop_calls(m);
}

void mon_free(struct mon *m)
{
    if (!m)
        return;
    mon_close(m);
    loop_del_timer(m->loop, m->connect_timer);
    free(m->last_connect_error);
    free(m);
}

static void schedule_connect(struct mon *m)
{
    loop_del_timer(m->loop, m->connect_timer);
    m->connect_timer = loop_add_timer(m->loop, m->backoff_ns, mon_connect, m);
    m->backoff_ns = MIN(m->backoff_ns * 2, m->reconnect_max_ns);
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
        m->ops->disconnected(m->opaque);
    schedule_connect(m);
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
    m->ops->connected(m->opaque);
}

static void dispatch(struct mon *m, struct qmpc_message *msg)
{
    switch (msg->kind) {
    case QMPC_MSG_GREETING:
        if (mon_call(m, "qmp_capabilities", NULL, on_negotiated, NULL) < 0)
            lost(m, "could not send qmp_capabilities");
        return;
    case QMPC_MSG_EVENT:
        if (m->ready) {
            json_int_t seq = json_integer_value(json_object_get(msg->json, "__org.thinblk_seq"));
            m->ops->event(m->opaque, msg->event, msg->data, seq > 0 ? (uint64_t)seq : 0);
        }
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
    mon_connect(m->loop, m);
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
