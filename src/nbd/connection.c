/* One NBD connection: socket I/O, back-pressure, lifetime. See internal.h.
 *
 * Reading: bytes come into c->in (or, for a large write payload, straight into the request's
 * buffer) and are handed out message by message; a state's handler runs when its message is
 * complete. Before a message starts, the phase may hold it back (too many requests in flight,
 * too much unsent output, the device not accepting): the socket is then not watched for
 * reading, which is the back-pressure the client sees.
 *
 * Writing: option replies in c->out, then request replies in completion order, sent with
 * non-blocking sendmsg(MSG_NOSIGNAL); the socket is watched for writing while any is left.
 *
 * TLS: once the session is up, conn_recv() and conn_send() go through it instead. GnuTLS may
 * hold decrypted bytes the socket no longer signals, so a run that stops with some left
 * schedules another (conn_run()).
 *
 * Lifetime: a reference for being open, one per request at the device, one per pending
 * deferred call. Closing drops the first; whatever comes back later finds the connection
 * CLOSED, frees its request and drops its reference; the last one frees the connection.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/log.h"
#include "loop/loop.h"
#include "nbd/internal.h"

typedef void nbd_state_fn(struct nbd_conn *c);

/* One handler per reading state: called when the state's message is complete. */
static nbd_state_fn *const state_handlers[] = {
    [NBD_STATE_CLIENT_FLAGS] = nbd_handshake_client_flags,
    [NBD_STATE_OPT_HEADER] = nbd_handshake_opt_header,
    [NBD_STATE_OPT_DATA] = nbd_handshake_opt_data,
    [NBD_STATE_REQ_HEADER] = nbd_transmission_req_header,
    [NBD_STATE_REQ_PAYLOAD] = nbd_transmission_req_payload,
    [NBD_STATE_REQ_DISCARD] = nbd_transmission_req_discard,
};

static bool is_reading_state(enum nbd_state s)
{
    return s <= NBD_STATE_REQ_DISCARD;
}

static void conn_run(struct nbd_conn *c);

void nbd_conn_ref(struct nbd_conn *c)
{
    c->refs++;
}

void nbd_conn_unref(struct nbd_conn *c)
{
    if (--c->refs > 0)
        return;
    /* The open reference goes at close; nothing else can be left once refs is 0. */
    nbd_transmission_release_buffers(c);
    free(c->opt_data);
    free(c->meta_export);
    free(c->tls_record);
    buf_free(&c->out);
    free(c);
}

void nbd_conn_expect(struct nbd_conn *c, enum nbd_state state, void *dst, size_t need)
{
    c->state = state;
    c->dst = dst;
    c->need = need;
    c->got = 0;
}

static void on_deferred_run(struct loop *loop, void *opaque)
{
    struct nbd_conn *c = opaque;

    if (c->state != NBD_STATE_CLOSED)
        conn_run(c);
    nbd_conn_unref(c);
}

void nbd_conn_schedule(struct nbd_conn *c)
{
    if (c->running) {
        c->rerun = true;
        return;
    }
    if (loop_deferred_queued(&c->run_call) || c->state == NBD_STATE_CLOSED)
        return;
    nbd_conn_ref(c);
    loop_defer(c->loop, &c->run_call);
}

void nbd_conn_queue_reply(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    cmd->sent = 0;
    nbd_cmd_queue_push(&c->replies, cmd);
    nbd_conn_schedule(c);
}

static void free_replies(struct nbd_conn *c)
{
    struct nbd_cmd *cmd;

    while ((cmd = nbd_cmd_queue_pop(&c->replies)))
        nbd_cmd_free(c, cmd);
}

void nbd_conn_close(struct nbd_conn *c, const char *fmt, ...)
{
    char why[256];
    va_list ap;

    if (c->state == NBD_STATE_CLOSED)
        return;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    log_debug("nbd: client %" PRIu64 ": closing: %s", c->id, why);

    c->state = NBD_STATE_CLOSED;
    if (c->handshake_timer) {
        loop_del_timer(c->loop, c->handshake_timer);
        c->handshake_timer = 0;
    }
    if (c->waiting) {
        device_cancel_wait(c->dev, &c->waiter);
        c->waiting = false;
    }
    loop_del_fd(c->loop, c->fd);
    tls_session_free(c->tls);
    c->tls = NULL;
    c->tls_up = false;
    close(c->fd);
    c->fd = -1;
    free_replies(c);
    if (c->cur) {
        nbd_cmd_free(c, c->cur);
        c->cur = NULL;
    }
    buf_free(&c->out);
    nbd_transmission_release_buffers(c);
    if (c->server)
        nbd_server_forget_conn(c->server, c);
    c->server = NULL;
    c->exp = NULL;
    nbd_conn_unref(c);  /* the open reference */
}

/* ---- transport: the socket, or the TLS session once up ---- */

/* A failed TLS record is logged here, where its text is; the caller sees EPROTO. */
static ssize_t tls_result(struct nbd_conn *c, ssize_t r, struct error *err)
{
    if (r >= 0)
        return r;
    if (r == TLS_AGAIN) {
        errno = EAGAIN;
    } else {
        log_debug("nbd: client %" PRIu64 ": %s", c->id, err->desc);
        error_free(err);
        errno = EPROTO;
    }
    return -1;
}

/* As recv(MSG_DONTWAIT): bytes, 0 at the end of input, or -1 with errno. */
static ssize_t conn_recv(struct nbd_conn *c, void *buf, size_t len)
{
    struct error *err = NULL;

    ssize_t r;

    if (!c->tls_up)
        return recv(c->fd, buf, len, MSG_DONTWAIT);
    r = tls_session_recv(c->tls, buf, len, &err);
    return tls_result(c, r, err);
}

/* The most plaintext one TLS record carries (RFC 8446, 5.1). */
#define TLS_RECORD_MAX 16384

/* As sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of n > 0 pieces. TLS has no vectored send: a first
 * piece shorter than a record (a reply's header) is sent in one record with what follows it,
 * up to a record's worth, so a 4 KiB read's reply costs one record and one write, not two;
 * a longer one goes as it is. If this returns EAGAIN, the next call starts with the same
 * bytes, as GnuTLS asks (the caller's pieces have not moved). */
static ssize_t conn_send(struct nbd_conn *c, struct iovec *iov, size_t n)
{
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = n };
    struct error *err = NULL;
    const void *buf = iov[0].iov_base;
    size_t len = iov[0].iov_len;
    ssize_t r;

    if (!c->tls_up)
        return sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 1 && len < TLS_RECORD_MAX) {
        if (!c->tls_record)
            c->tls_record = xmalloc(TLS_RECORD_MAX);
        len = 0;
        for (size_t i = 0; i < n && len < TLS_RECORD_MAX; i++) {
            size_t k = MIN(iov[i].iov_len, TLS_RECORD_MAX - len);
            memcpy(c->tls_record + len, iov[i].iov_base, k);
            len += k;
        }
        buf = c->tls_record;
    }
    r = tls_session_send(c->tls, buf, len, &err);
    return tls_result(c, r, err);
}

/* ---- output ---- */

static bool output_pending(const struct nbd_conn *c)
{
    return c->out.len > 0 || !nbd_cmd_queue_empty(&c->replies);
}

/* Send what the socket takes. Returns the number of replies fully sent (and freed). */
static unsigned flush_output(struct nbd_conn *c)
{
    unsigned done = 0;

    while (c->out.len > 0) {
        struct iovec out = { c->out.data, c->out.len };
        ssize_t r = conn_send(c, &out, 1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                nbd_conn_close(c, "send: %s", strerror(errno));
            return done;
        }
        buf_consume(&c->out, (size_t)r);
    }
    while (!nbd_cmd_queue_empty(&c->replies)) {
        struct iovec iov[64];
        size_t n = 0;

        for (struct nbd_cmd *cmd = c->replies.head; cmd && n + 2 <= ARRAY_SIZE(iov);
             cmd = cmd->next) {
            size_t pos = cmd->sent;
            if (pos < cmd->reply_len) {
                iov[n++] = (struct iovec){ cmd->reply + pos, cmd->reply_len - pos };
                pos = cmd->reply_len;
            }
            if (pos - cmd->reply_len < cmd->payload_len) {
                size_t off = pos - cmd->reply_len;
                iov[n++] = (struct iovec){ (char *)cmd->payload + off, cmd->payload_len - off };
            }
        }
        ssize_t r = conn_send(c, iov, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                nbd_conn_close(c, "send: %s", strerror(errno));
            return done;
        }
        size_t left = (size_t)r;
        while (!nbd_cmd_queue_empty(&c->replies)) {
            struct nbd_cmd *cmd = c->replies.head;
            size_t rest = cmd->reply_len + cmd->payload_len - cmd->sent;
            if (left < rest) {
                cmd->sent += left;
                break;
            }
            left -= rest;
            nbd_cmd_queue_pop(&c->replies);
            nbd_cmd_free(c, cmd);
            done++;
        }
    }
    return done;
}

/* ---- input ---- */

static void handle_eof(struct nbd_conn *c)
{
    c->eof = true;
    /* Between requests, a client that shut its side may still read our replies: finish
     * them as for NBD_CMD_DISC. Anywhere else it broke off a message. */
    if (c->state == NBD_STATE_REQ_HEADER && c->got == 0 && c->in_pos == c->in_len)
        c->state = NBD_STATE_DISCONNECTING;
    else
        nbd_conn_close(c, "end of input");
}

/* Move bytes towards the current message. Returns false when no more can come now. */
static bool fill(struct nbd_conn *c, unsigned *recvs)
{
    size_t want = c->need - c->got;
    ssize_t r;

    if (c->in_pos < c->in_len) {
        size_t n = MIN(want, c->in_len - c->in_pos);
        if (c->dst)
            memcpy((char *)c->dst + c->got, c->in + c->in_pos, n);
        c->in_pos += n;
        c->got += n;
        return true;
    }
    if (c->eof || *recvs >= NBD_RECV_BUDGET)
        return false;
    ++*recvs;
    if (c->dst && want >= sizeof(c->in)) {
        r = conn_recv(c, (char *)c->dst + c->got, want);
        if (r > 0)
            c->got += (size_t)r;
    } else {
        r = conn_recv(c, c->in, sizeof(c->in));
        if (r > 0) {
            c->in_pos = 0;
            c->in_len = (size_t)r;
        }
    }
    if (r > 0)
        return true;
    if (r == 0) {
        handle_eof(c);
        return false;
    }
    if (errno == EINTR)
        return true;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
        nbd_conn_close(c, "recv: %s", strerror(errno));
    return false;
}

/* Whether the phase lets the next message start now. */
static bool may_start_message(struct nbd_conn *c)
{
    if (c->state <= NBD_STATE_OPT_DATA)
        return nbd_handshake_may_read(c);
    if (c->state == NBD_STATE_REQ_HEADER)
        return nbd_transmission_may_read(c);
    return true;
}

/* Handle messages until input runs dry, the phase holds back, or recvs reaches the budget.
 * Every handler sets up the next message or leaves the reading states. */
static void process_input(struct nbd_conn *c, unsigned *recvs)
{
    c->paused = false;
    /* The STARTTLS reply goes out in plaintext before the TLS handshake starts. */
    if (c->state == NBD_STATE_TLS_HANDSHAKE && !output_pending(c))
        nbd_handshake_tls(c);
    while (is_reading_state(c->state)) {
        if (c->got < c->need) {
            if (c->got == 0 && !may_start_message(c)) {
                c->paused = true;
                return;
            }
            if (!fill(c, recvs))
                return;
            continue;
        }
        state_handlers[c->state](c);
    }
}

/* ---- events ---- */

static void update_events(struct nbd_conn *c)
{
    unsigned want = 0;

    if (c->state == NBD_STATE_CLOSED)
        return;
    if (is_reading_state(c->state) && !c->eof && !c->paused)
        want |= LOOP_READ;
    /* Not reading (held while the device is stopped, or back-pressure), a client that goes
     * away would hold its slot until we read again (cont): watch for its shutdown. */
    else if (is_reading_state(c->state) && !c->eof)
        want |= LOOP_PEER_SHUTDOWN;
    if (c->state == NBD_STATE_TLS_HANDSHAKE && !output_pending(c))
        want |= tls_session_wants_write(c->tls) ? LOOP_WRITE : LOOP_READ;
    if (output_pending(c))
        want |= LOOP_WRITE;
    if (want != c->watched && loop_mod_fd(c->loop, c->fd, want) == 0)
        c->watched = want;
}

static void finish_disconnect(struct nbd_conn *c)
{
    if (c->state == NBD_STATE_DISCONNECTING && c->in_flight == 0 && !output_pending(c))
        nbd_conn_close(c, "disconnected");
}

/* Send, read and handle until nothing moves. Not reentrant: a call from inside asks the
 * running one to go round again. */
static void conn_run(struct nbd_conn *c)
{
    unsigned recvs = 0;

    if (c->running) {
        c->rerun = true;
        return;
    }
    c->running = true;
    nbd_conn_ref(c);
    do {
        c->rerun = false;
        /* Replies sent free room: read on if that is what held us. */
        if (flush_output(c) > 0 && c->paused)
            c->rerun = true;
        if (c->state != NBD_STATE_CLOSED)
            process_input(c, &recvs);
        if (c->state != NBD_STATE_CLOSED && flush_output(c) > 0 && c->paused)
            c->rerun = true;
        finish_disconnect(c);
    } while (c->rerun && c->state != NBD_STATE_CLOSED);
    update_events(c);
    c->running = false;
    if (c->tls_up && is_reading_state(c->state) && !c->eof && !c->paused &&
        tls_session_pending(c->tls))
        nbd_conn_schedule(c);
    nbd_conn_unref(c);
}

static void on_socket(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct nbd_conn *c = opaque;

    /* An event we did not ask for is a hang-up or an error (or stale, from before the mask
     * changed in this iteration): ask the socket which. After a hang-up, input still queued
     * is read while we read at all; otherwise nobody is left to answer. */
    if (events & ~c->watched) {
        struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT | POLLRDHUP };
        if (poll(&p, 1, 0) == 1 && ((p.revents & (POLLERR | POLLNVAL)) ||
                                    ((p.revents & POLLHUP) && !(c->watched & LOOP_READ)))) {
            nbd_conn_close(c, "hang-up");
            return;
        }
        /* The client shut its side while we do not read (held by a stopped device, or
         * back-pressure): it has gone, as NBD has no use for half a connection (a client
         * that wants its replies sends NBD_CMD_DISC first). Its connection goes now, not at
         * cont: requests it sent but we did not read are dropped unanswered, those at the
         * device finish there, unanswered. */
        if ((p.revents & POLLRDHUP) && (c->watched & LOOP_PEER_SHUTDOWN)) {
            nbd_conn_close(c, "hang-up while not reading");
            return;
        }
    }
    conn_run(c);
}

static void on_handshake_timeout(struct loop *loop, void *opaque)
{
    struct nbd_conn *c = opaque;

    c->handshake_timer = 0;
    nbd_conn_close(c, "handshake not finished in time");
}

void nbd_conn_new(struct nbd_server *s, int fd)
{
    struct nbd_conn *c = xzalloc(sizeof(*c));

    c->server = s;
    c->loop = s->loop;
    c->id = ++s->next_conn_id;
    c->fd = fd;
    c->run_call = LOOP_DEFERRED_INIT(on_deferred_run, c);
    c->refs = 1;
    nbd_conn_list_push_head(&s->conns, c);
    s->nconns++;
    log_debug("nbd: client %" PRIu64 ": connected", c->id);

    if (loop_add_fd(c->loop, fd, 0, on_socket, c) < 0) {
        log_warn("nbd: cannot watch a client's socket: %s", strerror(errno));
        nbd_conn_close(c, "cannot watch the socket");
        return;
    }
    c->handshake_timer = loop_add_timer(c->loop, NBD_HANDSHAKE_TIMEOUT_NS,
                                        on_handshake_timeout, c);
    nbd_handshake_start(c);
    conn_run(c);
}
