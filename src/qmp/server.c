/* The QMP monitor server. See server.h. */
#include "qmp/server.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/list.h"
#include "common/log.h"
#include "common/qjson.h"
#include "common/unix-socket.h"
#include "common/util.h"
#include "loop/loop.h"
#include "qmp/dispatch.h"
#include "qmp/journal.h"
#include "common/json-stream.h"

#define READ_CHUNK 65536
#define ACCEPT_RETRY_NS (100 * 1000 * 1000ull)

struct monitor {
    struct monitor *next;
    struct qmp_server *srv;
    struct unix_listener sock;  /* its path, and which file is ours */
    char *path;             /* for the log, after the socket is gone */
    int fd;                 /* listening socket, -1 once closed */
    bool pretty;
    size_t output_limit;
    uint64_t retry_timer;   /* accept paused after EMFILE */
};

struct client {
    struct client *prev, *next;  /* srv->clients */
    struct qmp_server *srv;
    struct monitor *mon;
    int fd;
    struct qmp_session session;
    struct json_stream *in;
    struct buf out;         /* out.data[out_pos..out.len) is still to be sent */
    size_t out_pos;
    unsigned watched;       /* LOOP_READ/LOOP_WRITE currently registered */
    bool eof;               /* the client closed its side: no more input */
    bool dead;              /* closed; freed by a deferred call */
    struct loop_deferred free_call;   /* client_free_deferred() */
    struct loop_deferred flush_call;  /* flush_event() */
};

DEFINE_QUEUE_TYPE(monitor_queue, struct monitor, next)
DEFINE_LIST_TYPE(client_list, struct client, prev, next)

struct qmp_server {
    struct loop *loop;
    struct qmp_dispatcher *d;
    struct qmp_journal *journal;  /* borrowed */
    json_t *greeting;
    monitor_queue monitors;    /* the newest first */
    client_list clients;       /* open, the newest first */
    bool closed;
    void (*flushed_fn)(void *opaque);
    void *flushed_opaque;
};

static size_t unsent(const struct client *c)
{
    return c->out.len - c->out_pos;
}

static void check_flushed(struct qmp_server *srv)
{
    if (srv->flushed_fn && qmp_server_flushed(srv)) {
        void (*fn)(void *) = srv->flushed_fn;
        srv->flushed_fn = NULL;
        fn(srv->flushed_opaque);
    }
}

static void client_free_deferred(struct loop *loop, void *opaque)
{
    struct client *c = opaque;

    loop_cancel_deferred(loop, &c->flush_call);
    json_stream_free(c->in);
    buf_free(&c->out);
    free(c);
}

/* Close the connection: off the list, fd closed. The memory stays (see client_kill()). */
static void client_close(struct client *c)
{
    struct qmp_server *srv = c->srv;

    if (c->dead)
        return;
    c->dead = true;
    qmp_session_detach(&c->session);  /* a late answer is dropped; the command goes on */
    loop_del_fd(srv->loop, c->fd);
    close(c->fd);
    client_list_remove(&srv->clients, c);
    check_flushed(srv);
}

/* Close the connection now; the memory goes after the current callback, which may hold c. */
static void client_kill(struct client *c)
{
    if (c->dead)
        return;
    client_close(c);
    loop_defer(c->srv->loop, &c->free_call);
}

static void client_update_watch(struct client *c)
{
    unsigned want = 0;

    if (c->dead)
        return;
    /* Not while a command is pending: its requests wait in the socket, not in our memory. */
    if (!c->eof && !c->srv->closed && !c->session.pending &&
        unsent(c) < QMP_SERVER_SOFT_LIMIT)
        want |= LOOP_READ;
    if (unsent(c) > 0)
        want |= LOOP_WRITE;
    if (want != c->watched) {
        loop_mod_fd(c->srv->loop, c->fd, want);
        c->watched = want;
    }
}

/* Send what the socket takes. Returns -1 if the client is gone. */
static int client_flush(struct client *c)
{
    while (unsent(c) > 0) {
        ssize_t n = send(c->fd, c->out.data + c->out_pos, unsent(c), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            log_debug("monitor %s: client write failed: %s", c->mon->path, strerror(errno));
            client_kill(c);
            return -1;
        }
        c->out_pos += (size_t)n;
    }
    if (c->out_pos == c->out.len) {
        buf_reset(&c->out);
        c->out_pos = 0;
        if (c->out.cap > 4 * QMP_SERVER_SOFT_LIMIT)
            buf_free(&c->out);
    } else if (c->out_pos > c->out.len / 2) {
        buf_consume(&c->out, c->out_pos);
        c->out_pos = 0;
    }
    return 0;
}

static void client_queue_text(struct client *c, const char *text, size_t len)
{
    buf_append(&c->out, text, len);
}

static void client_queue(struct client *c, json_t *msg)
{
    qjson_write(&c->out, msg, c->mon->pretty);
    buf_append(&c->out, "\r\n", 2);
}

static void client_process(struct client *c);

/* Dispatch queued requests while the client keeps up with its responses. */
static void client_process(struct client *c)
{
    struct qmp_server *srv = c->srv;

    while (!c->dead && !srv->closed && !c->session.pending &&
           unsent(c) < QMP_SERVER_SOFT_LIMIT) {
        json_t *req;
        struct error *err;
        if (json_stream_next(c->in, &req, &err) == 0)
            break;
        json_t *rsp = qmp_dispatch(srv->d, &c->session, req, err);
        json_decref(req);
        error_free(err);
        if (rsp && !c->dead)  /* NULL: deferred, see client_deliver() */
            client_queue(c, rsp);
        json_decref(rsp);
    }
    if (c->dead)
        return;
    if (client_flush(c) < 0)
        return;
    if (c->eof && unsent(c) == 0 && !c->session.pending) {
        client_kill(c);  /* the client hung up and everything it asked for is answered */
        return;
    }
    client_update_watch(c);
    check_flushed(srv);
}

/* A deferred command's response: queued, then the client's next requests go on (not inside
 * this call, which may come from inside the dispatch itself). */
static void client_deliver(struct qmp_session *s, json_t *rsp)
{
    struct client *c = container_of(s, struct client, session);

    client_queue(c, rsp);
    json_decref(rsp);
    if (!loop_deferred_queued(&c->flush_call))
        loop_defer(c->srv->loop, &c->flush_call);
}

static void client_io(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct client *c = opaque;
    char buf[READ_CHUNK];

    if ((events & LOOP_WRITE) && client_flush(c) < 0)
        return;
    if ((events & LOOP_READ) && !(c->watched & LOOP_READ) && c->session.pending) {
        /* Not reading while a command is pending: only a hangup or an error wakes us (and
         * would again and again). The peer is gone: the answer will be dropped. */
        log_debug("monitor %s: client left with a command pending", c->mon->path);
        client_kill(c);
        return;
    }
    if ((events & LOOP_READ) && (c->watched & LOOP_READ)) {
        ssize_t n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) {
            json_stream_feed(c->in, buf, (size_t)n);
        } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            c->eof = true;
        }
    }
    client_process(c);
}

static void accept_clients(struct loop *loop, int fd, unsigned events, void *opaque);
static loop_fn flush_event;

static void accept_retry(struct loop *loop, void *opaque)
{
    struct monitor *mon = opaque;

    mon->retry_timer = 0;
    if (mon->fd >= 0)
        loop_add_fd(loop, mon->fd, LOOP_READ, accept_clients, mon);
}

static void accept_clients(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct monitor *mon = opaque;
    struct qmp_server *srv = mon->srv;

    for (;;) {
        int cfd = socket_accept(fd);
        if (cfd < 0) {
            if (socket_accept_starved(errno)) {
                /* Out of descriptors: stop accepting for a moment instead of spinning. */
                log_warn("monitor %s: cannot accept: %s", mon->path, strerror(errno));
                loop_del_fd(loop, fd);
                mon->retry_timer = loop_add_timer(loop, ACCEPT_RETRY_NS, accept_retry, mon);
            }
            return;
        }
        struct client *c = xzalloc(sizeof(*c));
        c->srv = srv;
        c->mon = mon;
        c->fd = cfd;
        c->in = json_stream_new();
        c->session.deliver = client_deliver;
        c->free_call = LOOP_DEFERRED_INIT(client_free_deferred, c);
        c->flush_call = LOOP_DEFERRED_INIT(flush_event, c);
        if (loop_add_fd(loop, cfd, 0, client_io, c) < 0) {
            log_warn("monitor %s: cannot watch client: %s", mon->path, strerror(errno));
            json_stream_free(c->in);
            close(cfd);
            free(c);
            continue;
        }
        client_list_push_head(&srv->clients, c);
        client_queue(c, srv->greeting);
        if (client_flush(c) == 0)
            client_update_watch(c);
    }
}

struct qmp_server *qmp_server_new(struct loop *loop, struct qmp_dispatcher *d,
                                  struct qmp_journal *journal, json_t *version)
{
    struct qmp_server *srv = xzalloc(sizeof(*srv));

    srv->loop = loop;
    srv->d = d;
    srv->journal = journal;
    srv->greeting = json_pack("{s:{s:O,s:[s]}}", "QMP", "version", version, "capabilities",
                              "oob");
    return srv;
}

static void monitor_close(struct qmp_server *srv, struct monitor *mon)
{
    if (mon->fd < 0)
        return;
    if (mon->retry_timer)
        loop_del_timer(srv->loop, mon->retry_timer);
    else
        loop_del_fd(srv->loop, mon->fd);
    close(mon->fd);
    mon->fd = -1;
    unix_listener_remove(&mon->sock);
}

void qmp_server_close(struct qmp_server *srv)
{
    srv->closed = true;
    for (struct monitor *m = srv->monitors.head; m; m = m->next)
        monitor_close(srv, m);
    for (struct client *c = srv->clients.head; c; c = c->next)
        client_update_watch(c);
}

void qmp_server_free(struct qmp_server *srv)
{
    struct monitor *m;

    if (!srv)
        return;
    qmp_server_close(srv);
    /* No callback holds a client now: free them at once (the loop may be freed next). */
    srv->flushed_fn = NULL;
    while (!client_list_empty(&srv->clients)) {
        struct client *c = srv->clients.head;
        client_close(c);
        client_free_deferred(srv->loop, c);
    }
    while ((m = monitor_queue_pop(&srv->monitors))) {
        free(m->path);
        free(m);
    }
    json_decref(srv->greeting);
    free(srv);
}

int qmp_server_add_monitor(struct qmp_server *srv, const struct qmp_monitor_config *cfg,
                           struct error **errp)
{
    struct monitor *mon = xzalloc(sizeof(*mon));

    /* The monitor controls the daemon: only its owner may connect (unix_listen: 0600). */
    mon->fd = unix_listen(cfg->path, &mon->sock, errp);
    if (mon->fd < 0) {
        free(mon);
        return -1;
    }
    mon->srv = srv;
    mon->path = xstrdup(cfg->path);
    mon->pretty = cfg->pretty;
    mon->output_limit = cfg->output_limit ? cfg->output_limit : QMP_SERVER_DEFAULT_OUTPUT_LIMIT;
    if (loop_add_fd(srv->loop, mon->fd, LOOP_READ, accept_clients, mon) < 0) {
        error_setg_errno(errp, errno, "Failed to watch socket");
        close(mon->fd);
        unix_listener_remove(&mon->sock);
        free(mon->path);
        free(mon);
        return -1;
    }
    monitor_queue_push_head(&srv->monitors, mon);
    return 0;
}

static void flush_event(struct loop *loop, void *opaque)
{
    struct client *c = opaque;

    if (!c->dead)
        client_process(c);
}

void qmp_server_emit(struct qmp_server *srv, const char *name, json_t *data)
{
    qmp_server_emit_with(srv, name, data, NULL);
}

void qmp_server_emit_with(struct qmp_server *srv, const char *name, json_t *data, json_t *extra)
{
    uint64_t ns = now_realtime_ns();
    json_t *ev = json_pack("{s:s,s:{s:I,s:I}}", "event", name, "timestamp",
                           "seconds", (json_int_t)(ns / 1000000000u),
                           "microseconds", (json_int_t)(ns % 1000000000u / 1000u));
    struct buf text[2] = { { 0 }, { 0 } };  /* compact, pretty: each written once */

    if (data)
        json_object_set_new(ev, "data", data);
    if (extra) {
        json_object_update(ev, extra);
        json_decref(extra);
    }
    /* Numbered and kept whether or not anyone listens: a client asks for what it missed. */
    qmp_journal_record(srv->journal, ev);

    for (struct client *c = srv->clients.head, *next; c; c = next) {
        next = c->next;
        if (!c->session.negotiated)
            continue;
        struct buf *t = &text[c->mon->pretty];
        if (t->len == 0) {
            qjson_write(t, ev, c->mon->pretty);
            buf_append(t, "\r\n", 2);
        }
        if (unsent(c) + t->len > c->mon->output_limit) {
            log_warn("monitor %s: client does not read its output; disconnecting it",
                     c->mon->path);
            client_kill(c);
            continue;
        }
        bool was_idle = unsent(c) == 0;
        client_queue_text(c, t->data, t->len);
        /* Sent at the end of this loop iteration, together with the response that caused it,
         * if any; only one deferred flush per idle client. */
        if (was_idle && !loop_deferred_queued(&c->flush_call))
            loop_defer(srv->loop, &c->flush_call);
    }
    buf_free(&text[0]);
    buf_free(&text[1]);
    json_decref(ev);
}

bool qmp_server_flushed(const struct qmp_server *srv)
{
    for (const struct client *c = srv->clients.head; c; c = c->next) {
        if (unsent(c) > 0)
            return false;
    }
    return true;
}

void qmp_server_notify_flushed(struct qmp_server *srv, void (*fn)(void *opaque), void *opaque)
{
    srv->flushed_fn = fn;
    srv->flushed_opaque = opaque;
    check_flushed(srv);
}
