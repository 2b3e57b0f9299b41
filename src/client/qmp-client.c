/* The QMP client: the connection, the protocol state machine and the message queue.
 *
 * Everything is built on one event-driven core: qmpc_read() fills the framer, take() turns
 * the next complete object into a message and advances the state machine, qmpc_pop() hands
 * messages out in order. The synchronous calls are loops over the same core that poll the
 * socket up to a deadline and queue whatever they were not waiting for.
 */
#include "client/qmp-client.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

#include "client/qmp-framer.h"
#include "common/list.h"
#include "common/util.h"

/* How much qmpc_read() takes in one call, so one busy connection cannot starve a loop. */
#define READ_CHUNK (64 * 1024)
#define READ_MAX (1024 * 1024)

struct qmpc_queued {
    struct qmpc_message *msg;
    struct qmpc_queued *next;
};

DEFINE_QUEUE_TYPE(qmpc_queue, struct qmpc_queued, next)

/* Not thread-safe: every field belongs to the one thread using the client. */
struct qmpc {
    int fd;                      /* the socket, or -1; open until qmpc_free() */
    enum qmpc_state state;
    bool eof;                    /* the server closed the stream */
    bool broken;                 /* the stream was malformed: qmpc_pop() fails */
    char *closed_why;            /* in QMPC_STATE_CLOSED: the reason, for later calls */
    struct qmpc_framer framer;
    qmpc_queue queue;            /* messages taken from the stream but not yet returned */
    json_t *greeting;            /* the greeting's "QMP" object, or NULL */
    int64_t next_id;
    qmpc_trace_fn *trace;
    void *trace_opaque;
};

/* ---- the queue ------------------------------------------------------------------------ */

static void queue_push(struct qmpc *c, struct qmpc_message *msg)
{
    struct qmpc_queued *q = xmalloc(sizeof(*q));
    q->msg = msg;
    qmpc_queue_push(&c->queue, q);
}

typedef bool queue_match_fn(const struct qmpc_message *msg, json_t *id);

/* Remove and return the oldest queued message for which match() holds, or NULL. */
static struct qmpc_message *queue_take(struct qmpc *c, queue_match_fn *match, json_t *id)
{
    for (struct qmpc_queued *q = c->queue.head; q; q = q->next) {
        if (!match(q->msg, id))
            continue;
        qmpc_queue_remove(&c->queue, q);
        struct qmpc_message *msg = q->msg;
        free(q);
        return msg;
    }
    return NULL;
}

static bool match_any(const struct qmpc_message *msg, json_t *id)
{
    return true;
}

static bool match_event(const struct qmpc_message *msg, json_t *id)
{
    return msg->kind == QMPC_MSG_EVENT;
}

/* The reply to the command sent with id: the server echoes it, or sends none when it could
 * not read the request's. Waiting for id NULL takes only replies without one. */
static bool match_reply(const struct qmpc_message *msg, json_t *id)
{
    if (msg->kind != QMPC_MSG_RETURN && msg->kind != QMPC_MSG_ERROR)
        return false;
    return !msg->id || (id && json_equal(msg->id, id));
}

/* ---- life cycle ----------------------------------------------------------------------- */

struct qmpc *qmpc_new(int fd)
{
    struct qmpc *c = xzalloc(sizeof(*c));
    c->fd = fd;
    if (fd >= 0) {
        int flags = fcntl(fd, F_GETFL);
        if (flags >= 0)
            fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    }
    c->state = QMPC_STATE_GREETING;
    qmpc_framer_init(&c->framer);
    c->next_id = 1;
    return c;
}

void qmpc_free(struct qmpc *c)
{
    if (!c)
        return;
    if (c->fd >= 0)
        close(c->fd);
    struct qmpc_message *msg;
    while ((msg = queue_take(c, match_any, NULL)))
        qmpc_message_free(msg);
    qmpc_framer_free(&c->framer);
    json_decref(c->greeting);
    free(c->closed_why);
    free(c);
}

int qmpc_fd(const struct qmpc *c) { return c->fd; }

enum qmpc_state qmpc_state(const struct qmpc *c) { return c->state; }

void qmpc_set_trace(struct qmpc *c, qmpc_trace_fn *fn, void *opaque)
{
    c->trace = fn;
    c->trace_opaque = opaque;
}

/* Enter the terminal state, remembering the first reason for the errors of later calls. */
static void set_closed(struct qmpc *c, const char *why)
{
    c->state = QMPC_STATE_CLOSED;
    if (!c->closed_why)
        c->closed_why = xstrdup(why);
}

/* A malformed stream: close, report err through errp. Returns -1. */
static int protocol_fail(struct qmpc *c, struct error *err, struct error **errp)
{
    set_closed(c, err->desc);
    c->broken = true;
    qmpc_framer_reset(&c->framer);
    error_propagate(errp, err);
    return -1;
}

/* Fails if the client can no longer talk to the server. */
static int check_open(struct qmpc *c, struct error **errp)
{
    if (c->state == QMPC_STATE_CLOSED) {
        error_setg(errp, "%s", c->closed_why ? c->closed_why : "Connection closed");
        return -1;
    }
    if (c->fd < 0) {
        error_setg(errp, "Not connected to a QMP monitor");
        return -1;
    }
    return 0;
}

/* ---- the greeting --------------------------------------------------------------------- */

json_t *qmpc_greeting(const struct qmpc *c) { return c->greeting; }

int qmpc_server_version(const struct qmpc *c, int *major, int *minor, int *micro)
{
    json_t *v = json_object_get(json_object_get(c->greeting, "version"), "qemu");
    json_t *ma = json_object_get(v, "major"), *mi = json_object_get(v, "minor");
    json_t *mc = json_object_get(v, "micro");
    if (!json_is_integer(ma) || !json_is_integer(mi) || !json_is_integer(mc))
        return -1;
    if (major)
        *major = (int)json_integer_value(ma);
    if (minor)
        *minor = (int)json_integer_value(mi);
    if (micro)
        *micro = (int)json_integer_value(mc);
    return 0;
}

bool qmpc_has_capability(const struct qmpc *c, const char *name)
{
    size_t i;
    json_t *cap;
    json_array_foreach(json_object_get(c->greeting, "capabilities"), i, cap) {
        if (json_is_string(cap) && strcmp(json_string_value(cap), name) == 0)
            return true;
    }
    return false;
}

/* ---- the state machine: one handler per state ----------------------------------------- */

static int on_greeting_state(struct qmpc *c, struct qmpc_message *msg, struct error **errp)
{
    if (msg->kind != QMPC_MSG_GREETING) {
        error_setg(errp, "Expected the QMP greeting, got: %.200s", msg->text);
        return -1;
    }
    c->greeting = json_incref(json_object_get(msg->json, "QMP"));
    c->state = QMPC_STATE_CAPABILITIES;
    return 0;
}

static int on_capabilities_state(struct qmpc *c, struct qmpc_message *msg, struct error **errp)
{
    if (msg->kind == QMPC_MSG_GREETING) {
        error_setg(errp, "Unexpected second QMP greeting");
        return -1;
    }
    /* In capabilities negotiation mode qmp_capabilities is the only command a server runs,
     * so a successful return can only be its reply. */
    if (msg->kind == QMPC_MSG_RETURN)
        c->state = QMPC_STATE_COMMAND;
    return 0;
}

static int on_command_state(struct qmpc *c, struct qmpc_message *msg, struct error **errp)
{
    if (msg->kind == QMPC_MSG_GREETING) {
        error_setg(errp, "Unexpected second QMP greeting");
        return -1;
    }
    return 0;
}

/* Messages still buffered when the connection ended keep their meaning, but the state does
 * not change any more. */
static int on_closed_state(struct qmpc *c, struct qmpc_message *msg, struct error **errp)
{
    if (msg->kind == QMPC_MSG_GREETING && !c->greeting)
        c->greeting = json_incref(json_object_get(msg->json, "QMP"));
    return 0;
}

static int advance(struct qmpc *c, struct qmpc_message *msg, struct error **errp)
{
    switch (c->state) {
    case QMPC_STATE_GREETING:
        return on_greeting_state(c, msg, errp);
    case QMPC_STATE_CAPABILITIES:
        return on_capabilities_state(c, msg, errp);
    case QMPC_STATE_COMMAND:
        return on_command_state(c, msg, errp);
    case QMPC_STATE_CLOSED:
        return on_closed_state(c, msg, errp);
    }
    abort();
}

/* Take the next complete message from the stream (not the queue). Returns 1 with *msgp,
 * 0 if none is complete, -1 on a protocol error (including EOF in mid-message). */
static int take(struct qmpc *c, struct qmpc_message **msgp, struct error **errp)
{
    struct error *err = NULL;
    const char *text;
    size_t len;

    if (c->broken)
        return 0;
    int r = qmpc_framer_next(&c->framer, &text, &len, &err);
    if (r < 0)
        return protocol_fail(c, err, errp);
    if (r == 0) {
        if (c->eof && qmpc_framer_partial(&c->framer)) {
            error_setg(&err, "Connection closed by the server in the middle of a message");
            return protocol_fail(c, err, errp);
        }
        return 0;
    }
    if (c->trace)
        c->trace(c->trace_opaque, false, text, len);
    struct qmpc_message *msg = qmpc_message_parse(text, len, &err);
    qmpc_framer_consume(&c->framer);
    if (!msg)
        return protocol_fail(c, err, errp);
    if (advance(c, msg, &err) < 0) {
        qmpc_message_free(msg);
        return protocol_fail(c, err, errp);
    }
    *msgp = msg;
    return 1;
}

/* ---- the event-driven core ------------------------------------------------------------ */

ssize_t qmpc_read(struct qmpc *c, struct error **errp)
{
    if (check_open(c, errp) < 0)
        return -1;

    char chunk[READ_CHUNK];
    ssize_t total = 0;
    while (total < READ_MAX) {
        ssize_t n = recv(c->fd, chunk, sizeof(chunk), 0);
        if (n > 0) {
            qmpc_framer_feed(&c->framer, chunk, (size_t)n);
            total += n;
            if ((size_t)n < sizeof(chunk))
                break;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (total > 0)
            break; /* return the data; EOF or the error shows again on the next call */
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (n == 0) {
            c->eof = true;
            set_closed(c, "Connection closed by the server");
            error_setg(errp, "Connection closed by the server");
        } else {
            struct error *err = NULL;
            error_setg_errno(&err, errno, "Failed to read from the QMP monitor");
            set_closed(c, err->desc);
            error_propagate(errp, err);
        }
        return -1;
    }
    return total;
}

void qmpc_feed(struct qmpc *c, const void *data, size_t len)
{
    qmpc_framer_feed(&c->framer, data, len);
}

int qmpc_pop(struct qmpc *c, struct qmpc_message **msg, struct error **errp)
{
    *msg = queue_take(c, match_any, NULL);
    if (*msg)
        return 1;
    int r = take(c, msg, errp);
    if (r == 0 && c->broken) {
        error_setg(errp, "%s", c->closed_why);
        return -1;
    }
    return r;
}

bool qmpc_pending(struct qmpc *c)
{
    if (!qmpc_queue_empty(&c->queue))
        return true;
    if (c->broken)
        return false;
    const char *text;
    size_t len;
    /* A malformed stream is pending too: qmpc_pop() has an error to report. */
    return qmpc_framer_next(&c->framer, &text, &len, NULL) != 0 ||
           (c->eof && qmpc_framer_partial(&c->framer));
}

bool qmpc_eof(const struct qmpc *c)
{
    return c->eof && !c->broken && qmpc_queue_empty(&c->queue) && !qmpc_framer_partial(&c->framer);
}

/* ---- sending -------------------------------------------------------------------------- */

/* Write all of data; waits for room on a full socket. */
static int write_all(struct qmpc *c, const char *data, size_t len, struct error **errp)
{
    while (len > 0) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n >= 0) {
            data += n;
            len -= (size_t)n;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
            if (poll(&pfd, 1, -1) >= 0 || errno == EINTR)
                continue;
        }
        struct error *err = NULL;
        error_setg_errno(&err, errno, "Failed to send to the QMP monitor");
        set_closed(c, err->desc);
        error_propagate(errp, err);
        return -1;
    }
    return 0;
}

int qmpc_send(struct qmpc *c, json_t *msg, struct error **errp)
{
    if (check_open(c, errp) < 0)
        return -1;
    _cleanup_free_ char *text = json_dumps(msg, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!text) {
        error_setg(errp, "Cannot encode the QMP command as JSON");
        return -1;
    }
    size_t len = strlen(text);
    if (c->trace)
        c->trace(c->trace_opaque, true, text, len);
    text[len] = '\n'; /* replaces the NUL: the server needs no terminator, but logs read better */
    return write_all(c, text, len + 1, errp);
}

int64_t qmpc_send_command(struct qmpc *c, const char *name, json_t *args, struct error **errp)
{
    int64_t id = c->next_id;
    json_t *cmd = json_pack("{s:s}", "execute", name);
    if (args)
        json_object_set(cmd, "arguments", args);
    json_object_set_new(cmd, "id", json_integer(id));
    int r = qmpc_send(c, cmd, errp);
    json_decref(cmd);
    if (r < 0)
        return -1;
    c->next_id++;
    return id;
}

/* ---- the synchronous calls ------------------------------------------------------------ */

/* A deadline in CLOCK_MONOTONIC nanoseconds, or UINT64_MAX for none. */
static uint64_t deadline_after(int timeout_ms)
{
    if (timeout_ms < 0)
        return UINT64_MAX;
    return now_monotonic_ns() + (uint64_t)timeout_ms * 1000000;
}

/* Milliseconds left until deadline, rounded up, for poll(). */
static int remaining_ms(uint64_t deadline)
{
    if (deadline == UINT64_MAX)
        return -1;
    uint64_t now = now_monotonic_ns();
    if (now >= deadline)
        return 0;
    uint64_t ms = (deadline - now + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* Take the next message from the stream, reading until deadline. Returns 1 with *msgp,
 * 0 on timeout, -1 on failure (EOF included). */
static int receive(struct qmpc *c, uint64_t deadline, struct qmpc_message **msgp,
                   struct error **errp)
{
    for (;;) {
        int r = take(c, msgp, errp);
        if (r != 0)
            return r;
        if (check_open(c, errp) < 0)
            return -1;
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        r = poll(&pfd, 1, remaining_ms(deadline));
        if (r < 0 && errno != EINTR) {
            error_setg_errno(errp, errno, "poll");
            return -1;
        }
        if (r == 0)
            return 0;
        /* On EOF or an error, go round: take() reports half a message left behind, else
         * check_open() the reason the connection closed. */
        if (r > 0)
            qmpc_read(c, NULL);
    }
}

/* A connected, non-blocking Unix stream socket, or -1. */
static int connect_unix(const char *path, uint64_t deadline, struct error **errp)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path)) {
        error_setg(errp, "UNIX socket path '%s' is too long", path);
        return -1;
    }
    strcpy(addr.sun_path, path);

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        error_setg_errno(errp, errno, "Failed to create a socket");
        return -1;
    }
    /* A Unix connect() fails with EAGAIN, rather than block, while the listener's backlog
     * is full: retry until the deadline. */
    while (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN || remaining_ms(deadline) == 0) {
            error_setg_errno(errp, errno, "Failed to connect to '%s'", path);
            close(fd);
            return -1;
        }
        nanosleep(&(struct timespec){.tv_nsec = 10 * 1000 * 1000}, NULL);
    }
    return fd;
}

struct qmpc *qmpc_open(const char *path, int timeout_ms, struct error **errp)
{
    int fd = connect_unix(path, deadline_after(timeout_ms), errp);
    return fd < 0 ? NULL : qmpc_new(fd);
}

struct qmpc *qmpc_connect(const char *path, int timeout_ms, struct error **errp)
{
    uint64_t deadline = deadline_after(timeout_ms);
    int fd = connect_unix(path, deadline, errp);
    if (fd < 0)
        return NULL;
    _cleanup_qmpc_ struct qmpc *c = qmpc_new(fd);
    _cleanup_qmpc_message_ struct qmpc_message *greeting = NULL;
    int r = receive(c, deadline, &greeting, errp);
    if (r == 0)
        error_setg(errp, "Timed out waiting for the QMP greeting");
    if (r <= 0)
        return NULL;
    struct qmpc *ret = c;
    c = NULL;
    return ret;
}

struct qmpc_message *qmpc_wait_reply(struct qmpc *c, json_t *id, int timeout_ms,
                                     struct error **errp)
{
    uint64_t deadline = deadline_after(timeout_ms);
    struct qmpc_message *msg = queue_take(c, match_reply, id);
    while (!msg) {
        int r = receive(c, deadline, &msg, errp);
        if (r == 0)
            error_setg(errp, "Timed out waiting for a reply from the QMP monitor");
        if (r <= 0)
            return NULL;
        /* Greetings are kept in c->greeting by the state machine; nobody waits for them. */
        if (msg->kind == QMPC_MSG_GREETING) {
            qmpc_message_free(msg);
            msg = NULL;
        } else if (!match_reply(msg, id)) {
            queue_push(c, msg);
            msg = NULL;
        }
    }
    return msg;
}

struct qmpc_message *qmpc_execute(struct qmpc *c, const char *name, json_t *args, int timeout_ms,
                                  struct error **errp)
{
    int64_t id = qmpc_send_command(c, name, args, errp);
    if (id < 0)
        return NULL;
    json_t *jid = json_integer(id);
    struct qmpc_message *reply = qmpc_wait_reply(c, jid, timeout_ms, errp);
    json_decref(jid);
    return reply;
}

int qmpc_negotiate(struct qmpc *c, json_t *enable, int timeout_ms, struct error **errp)
{
    uint64_t deadline = deadline_after(timeout_ms);
    while (c->state == QMPC_STATE_GREETING) {
        _cleanup_qmpc_message_ struct qmpc_message *greeting = NULL;
        int r = receive(c, deadline, &greeting, errp);
        if (r == 0)
            error_setg(errp, "Timed out waiting for the QMP greeting");
        if (r <= 0)
            return -1;
    }
    if (c->state == QMPC_STATE_COMMAND)
        return 0;

    json_t *args = enable ? json_pack("{s:O}", "enable", enable) : NULL;
    _cleanup_qmpc_message_ struct qmpc_message *reply =
        qmpc_execute(c, "qmp_capabilities", args, remaining_ms(deadline), errp);
    json_decref(args);
    if (!reply)
        return -1;
    if (reply->kind == QMPC_MSG_ERROR) {
        error_setg(errp, "Capabilities negotiation failed: %s: %s", reply->error_class,
                   reply->error_desc);
        return -1;
    }
    if (c->state != QMPC_STATE_COMMAND) {
        error_setg(errp, "%s", c->closed_why ? c->closed_why : "Capabilities negotiation failed");
        return -1;
    }
    return 0;
}

int qmpc_next_event(struct qmpc *c, int timeout_ms, struct qmpc_message **ev,
                    struct error **errp)
{
    uint64_t deadline = deadline_after(timeout_ms);
    *ev = queue_take(c, match_event, NULL);
    while (!*ev) {
        struct qmpc_message *msg;
        int r = receive(c, deadline, &msg, errp);
        if (r <= 0)
            return r;
        if (msg->kind == QMPC_MSG_EVENT)
            *ev = msg;
        else if (msg->kind == QMPC_MSG_GREETING)
            qmpc_message_free(msg);
        else
            queue_push(c, msg);
    }
    return 1;
}
