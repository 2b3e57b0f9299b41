/* The vhost-user message state machine (QEMU's docs/interop/vhost-user.rst), back-end side.
 *
 * States: HEADER (reading the 12-byte header) -> PAYLOAD (its payload, if any) -> the message's
 * handler -> HEADER; CLOSED is terminal. File descriptors come with the message as SCM_RIGHTS
 * ancillary data; a handler takes those it needs, the rest are closed after it.
 *
 * Every message is checked before its handler runs: the version, a payload no larger than the
 * largest known one and of the size its request has, a ring index below num-queues. A message
 * that breaks these rules, or a request we do not know, closes the connection: after a framing
 * error the stream cannot be followed, and a frontend waiting for a reply we cannot give would
 * hang. A valid request that cannot be carried out (a memory table that cannot be mapped)
 * answers failure through REPLY_ACK when the frontend asked for it.
 *
 * The frontend waits for each reply before sending on (the protocol is synchronous), so a reply
 * always fits in the socket's buffer and is written at once.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"
#include "vhost-user-blk/internal.h"

/* What a handler returns. */
enum {
    MSG_OK = 0,       /* done (REPLY_ACK: 0) */
    MSG_FAILED = 1,   /* not done (REPLY_ACK: 1) */
    MSG_CLOSE = -1,   /* a protocol error: close the connection */
    MSG_DEFERRED = 2, /* answered later; nothing is read meanwhile (VUB_CONN_DRAINING) */
};

#define PROTOCOL_FEATURES                                                                  \
    (1ull << VHOST_USER_PROTOCOL_F_MQ | 1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK |          \
     1ull << VHOST_USER_PROTOCOL_F_BACKEND_REQ | 1ull << VHOST_USER_PROTOCOL_F_CONFIG |    \
     1ull << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)

/* Payload sizes; VAR: checked by the handler. */
#define VAR UINT32_MAX

struct msg_handler {
    const char *name;
    int (*fn)(struct vub_conn *c);
    uint32_t size;
    bool replies;    /* sends its own reply (REPLY_ACK does not apply) */
};

bool vub_conn_has_feature(const struct vub_conn *c, unsigned bit)
{
    return (c->features >> bit) & 1;
}

static void protocol_error(struct vub_conn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void protocol_error(struct vub_conn *c, const char *fmt, ...)
{
    char why[200];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    vub_conn_close(c, why);
}

/* Send a reply, with fd (if not -1) as SCM_RIGHTS. */
static int send_reply_fd(struct vub_conn *c, const void *payload, uint32_t size, int fd)
{
    struct vhost_user_header h = {
        .request = c->hdr.request,
        .flags = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK,
        .size = size,
    };
    struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)payload, size } };
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2 };
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;

    if (fd >= 0) {
        m.msg_control = control.buf;
        m.msg_controllen = sizeof(control.buf);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    }
    ssize_t n = sendmsg(c->fd, &m, MSG_NOSIGNAL);

    if (n != (ssize_t)(sizeof(h) + size)) {
        vub_conn_close(c, n < 0 ? strerror(errno) : "short write of a reply");
        return MSG_CLOSE;
    }
    return MSG_OK;
}

static int send_reply(struct vub_conn *c, const void *payload, uint32_t size)
{
    return send_reply_fd(c, payload, size, -1);
}

static int reply_u64(struct vub_conn *c, uint64_t v)
{
    return send_reply(c, &v, sizeof(v));
}

/* Take the message's only fd (or -1 if none came). */
static int take_fd(struct vub_conn *c)
{
    if (c->nfds != 1)
        return -1;
    c->nfds = 0;
    return c->fds[0];
}

/* The queue a message names, or NULL (the connection closed) if there is none. */
static struct vub_queue *queue(struct vub_conn *c, uint32_t index)
{
    if (index >= c->exp->num_queues) {
        protocol_error(c, "no queue %" PRIu32, index);
        return NULL;
    }
    return &c->queues[index];
}

static void close_fd(struct vub_conn *c, int *fd, bool watched)
{
    if (*fd < 0)
        return;
    if (watched)
        loop_del_fd(c->loop, *fd);
    close(*fd);
    *fd = -1;
}

/* Stop q: no more processing; requests still in the device are dropped when they finish. */
static void stop_ring(struct vub_queue *q)
{
    close_fd(q->conn, &q->kick_fd, true);
    q->started = false;
    q->broken = false;
    q->generation++;
    vub_inflight_stop(q);
}

static void on_kick(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct vub_queue *q = opaque;
    uint64_t v;

    /* Drained even while the device is stopped (then blk.c leaves the ring alone). */
    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN && errno != EINTR) {
        log_warn("vhost-user-blk: queue %u: kick eventfd: %s", q->index, strerror(errno));
        close_fd(q->conn, &q->kick_fd, true);
        return;
    }
    vub_blk_process(q);
}

/* The rings in the current memory table, with the driver's used index. */
static void map_ring(struct vub_queue *q)
{
    if (vub_vq_map(q) < 0) {
        vub_vq_break(q, "rings not in guest memory");
        return;
    }
    q->used_idx = __atomic_load_n(&q->used->idx, __ATOMIC_RELAXED);
}

/* ---- handlers ---- */

static int get_features(struct vub_conn *c)
{
    return reply_u64(c, vub_blk_features(c->exp));
}

static int set_features(struct vub_conn *c)
{
    uint64_t offered = vub_blk_features(c->exp);

    if (c->payload.u64 & ~offered)
        log_warn("vhost-user-blk: %s: frontend set features 0x%" PRIx64 " not offered",
                 c->exp->id, c->payload.u64 & ~offered);
    c->features = c->payload.u64 & offered;
    return MSG_OK;
}

static int set_owner(struct vub_conn *c)
{
    c->owner = true;
    return MSG_OK;
}

static int reset_owner(struct vub_conn *c)
{
    for (unsigned i = 0; i < c->exp->num_queues; i++)
        stop_ring(&c->queues[i]);
    c->owner = false;
    c->features = 0;
    return MSG_OK;
}

static int set_mem_table(struct vub_conn *c)
{
    const struct vhost_user_memory *m = &c->payload.memory;

    if (c->hdr.size < 8 || m->nregions > VHOST_MEMORY_BASELINE_NREGIONS ||
        c->hdr.size != 8 + m->nregions * sizeof(struct vhost_user_memory_region)) {
        protocol_error(c, "%s", "SET_MEM_TABLE of a wrong size");
        return MSG_CLOSE;
    }
    struct vub_mem *mem = vub_mem_new(c, m, c->fds, c->nfds);
    c->nfds = 0;
    if (!mem)
        return MSG_FAILED;
    vub_mem_unref(c->mem);
    c->mem = mem;
    for (unsigned i = 0; i < c->exp->num_queues; i++) {
        if (c->queues[i].started)
            map_ring(&c->queues[i]);
    }
    return MSG_OK;
}

static int set_vring_num(struct vub_conn *c)
{
    struct vub_queue *q = queue(c, c->payload.state.index);
    uint32_t num = c->payload.state.num;

    if (!q)
        return MSG_CLOSE;
    if (num == 0 || num > VIRTQUEUE_MAX_SIZE || q->started)
        return MSG_FAILED;
    q->num = (uint16_t)num;
    return MSG_OK;
}

static int set_vring_addr(struct vub_conn *c)
{
    struct vub_queue *q = queue(c, c->payload.addr.index);

    if (!q)
        return MSG_CLOSE;
    q->addr = c->payload.addr;
    q->addr_set = true;
    if (q->started)
        map_ring(q);
    return MSG_OK;
}

static int set_vring_base(struct vub_conn *c)
{
    struct vub_queue *q = queue(c, c->payload.state.index);

    if (!q)
        return MSG_CLOSE;
    if (c->payload.state.num > UINT16_MAX || q->started)
        return MSG_FAILED;
    q->last_avail_idx = (uint16_t)c->payload.state.num;
    q->used_idx = q->last_avail_idx;
    return MSG_OK;
}

static int answer_vring_base(struct vub_conn *c, struct vub_queue *q)
{
    stop_ring(q);
    struct vhost_vring_state st = { q->index, q->last_avail_idx };
    return send_reply(c, &st, sizeof(st));
}

/* The frontend restarts the ring at the base we answer. While the device takes requests, the
 * answer waits for the ring's requests in the device, so that all are on the used ring
 * (reading stops meanwhile: the frontend waits for the answer anyway). While the device is
 * stopped they may wait for a cont the frontend cannot wait for: they are taken back from the
 * device and the answer goes at once. With an inflight region they stay marked there and are
 * handled again when the ring restarts; without one they are lost to the guest, as they would
 * be with any back-end. */
static int get_vring_base(struct vub_conn *c)
{
    struct vub_queue *q = queue(c, c->payload.state.index);

    if (!q)
        return MSG_CLOSE;
    if (!device_accepting(c->exp->dev))
        vub_blk_withdraw(q);
    if (!q->in_device.head || !device_accepting(c->exp->dev))
        return answer_vring_base(c, q);
    q->draining = true;
    c->state = VUB_CONN_DRAINING;
    loop_mod_fd(c->loop, c->fd, 0);
    return MSG_DEFERRED;
}

void vub_conn_ring_drained(struct vub_queue *q)
{
    struct vub_conn *c = q->conn;

    q->draining = false;
    if (c->state != VUB_CONN_DRAINING)
        return;
    c->state = VUB_CONN_HEADER;
    c->have = 0;
    if (answer_vring_base(c, q) == MSG_OK)
        loop_mod_fd(c->loop, c->fd, LOOP_READ);
}

/* SET_VRING_KICK/CALL/ERR's payload: the queue, and its fd (or -1 with the no-fd flag). */
static struct vub_queue *vring_fd(struct vub_conn *c, int *fd)
{
    uint64_t v = c->payload.u64;
    struct vub_queue *q;

    if (v & ~(uint64_t)(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)) {
        protocol_error(c, "%s", "bad vring fd message");
        return NULL;
    }
    q = queue(c, (uint32_t)(v & VHOST_USER_VRING_IDX_MASK));
    if (!q)
        return NULL;
    *fd = v & VHOST_USER_VRING_NOFD_MASK ? -1 : take_fd(c);
    if (!(v & VHOST_USER_VRING_NOFD_MASK) && *fd < 0) {
        protocol_error(c, "%s", "vring fd message without its fd");
        return NULL;
    }
    return q;
}

static int set_vring_kick(struct vub_conn *c)
{
    int fd;
    struct vub_queue *q = vring_fd(c, &fd);

    if (!q)
        return MSG_CLOSE;
    stop_ring(q);
    if (fd >= 0) {
        if (loop_add_fd(c->loop, fd, LOOP_READ, on_kick, q) < 0) {
            log_warn("vhost-user-blk: %s: cannot watch a kick eventfd: %s", c->exp->id,
                     strerror(errno));
            close(fd);
            return MSG_FAILED;
        }
        q->kick_fd = fd;
    }
    /* Without a kick fd (polling), the ring is processed on the other events only. */
    q->started = true;
    map_ring(q);
    vub_inflight_start(q);
    vub_blk_process(q);
    return MSG_OK;
}

/* SET_VRING_CALL and SET_VRING_ERR: replace the queue's eventfd at member off. */
static int set_vring_notifier(struct vub_conn *c, size_t off)
{
    int fd;
    struct vub_queue *q = vring_fd(c, &fd);

    if (!q)
        return MSG_CLOSE;
    int *slot = (int *)((char *)q + off);
    close_fd(c, slot, false);
    *slot = fd;
    return MSG_OK;
}

static int set_vring_call(struct vub_conn *c)
{
    return set_vring_notifier(c, offsetof(struct vub_queue, call_fd));
}

static int set_vring_err(struct vub_conn *c)
{
    return set_vring_notifier(c, offsetof(struct vub_queue, err_fd));
}

static int get_protocol_features(struct vub_conn *c)
{
    return reply_u64(c, PROTOCOL_FEATURES);
}

static int set_protocol_features(struct vub_conn *c)
{
    c->protocol_features = c->payload.u64 & PROTOCOL_FEATURES;
    return MSG_OK;
}

static int get_queue_num(struct vub_conn *c)
{
    return reply_u64(c, c->exp->num_queues);
}

static int set_vring_enable(struct vub_conn *c)
{
    struct vub_queue *q = queue(c, c->payload.state.index);

    if (!q)
        return MSG_CLOSE;
    if (c->payload.state.num > 1)
        return MSG_FAILED;
    q->enabled = c->payload.state.num == 1;
    if (q->enabled)
        vub_blk_process(q);
    return MSG_OK;
}

static int get_config(struct vub_conn *c)
{
    struct vhost_user_config *cfg = &c->payload.config;
    uint8_t space[VHOST_USER_MAX_CONFIG_SIZE] = {0};

    if (c->hdr.size < VHOST_USER_CONFIG_HDR_SIZE ||
        cfg->size > VHOST_USER_MAX_CONFIG_SIZE ||
        c->hdr.size != VHOST_USER_CONFIG_HDR_SIZE + cfg->size ||
        cfg->offset > VHOST_USER_MAX_CONFIG_SIZE - cfg->size) {
        protocol_error(c, "%s", "GET_CONFIG of a wrong size");
        return MSG_CLOSE;
    }
    vub_blk_config(c->exp, (struct virtio_blk_config *)space);
    memcpy(cfg->region, space + cfg->offset, cfg->size);
    return send_reply(c, cfg, VHOST_USER_CONFIG_HDR_SIZE + cfg->size);
}

/* GET_INFLIGHT_FD and SET_INFLIGHT_FD: QEMU sends the padded struct, others may send the
 * fields alone. */
static bool inflight_size_ok(struct vub_conn *c)
{
    if (c->hdr.size != VHOST_USER_INFLIGHT_FIELDS_SIZE &&
        c->hdr.size != sizeof(struct vhost_user_inflight)) {
        protocol_error(c, "%s", "inflight message of a wrong size");
        return false;
    }
    return true;
}

static bool any_ring_started(const struct vub_conn *c)
{
    for (unsigned i = 0; i < c->exp->num_queues; i++) {
        if (c->queues[i].started)
            return true;
    }
    return false;
}

static int get_inflight_fd(struct vub_conn *c)
{
    struct vhost_user_inflight req = c->payload.inflight;
    int fd = -1;

    if (!inflight_size_ok(c))
        return MSG_CLOSE;
    if (req.num_queues > c->exp->num_queues || any_ring_started(c))
        log_warn("vhost-user-blk: %s: GET_INFLIGHT_FD for %u queues (of %u)%s", c->exp->id,
                 req.num_queues, c->exp->num_queues,
                 any_ring_started(c) ? " while a ring runs" : "");
    else
        fd = vub_inflight_new(&req, &c->inflight);
    if (fd < 0)
        req.mmap_size = req.mmap_offset = 0;  /* "no region": the frontend goes on without */
    int r = send_reply_fd(c, &req, sizeof(req), fd);
    if (fd >= 0)
        close(fd);
    return r;
}

static int set_inflight_fd(struct vub_conn *c)
{
    int fd = take_fd(c);

    if (!inflight_size_ok(c)) {
        if (fd >= 0)
            close(fd);
        return MSG_CLOSE;
    }
    if (fd < 0) {
        protocol_error(c, "%s", "SET_INFLIGHT_FD without its fd");
        return MSG_CLOSE;
    }
    if (c->payload.inflight.num_queues > c->exp->num_queues || any_ring_started(c)) {
        log_warn("vhost-user-blk: %s: SET_INFLIGHT_FD for %u queues (of %u)%s", c->exp->id,
                 c->payload.inflight.num_queues, c->exp->num_queues,
                 any_ring_started(c) ? " while a ring runs" : "");
        close(fd);
        return MSG_FAILED;
    }
    return vub_inflight_map(&c->payload.inflight, fd, &c->inflight) < 0 ? MSG_FAILED : MSG_OK;
}

static void close_backend(struct vub_conn *c)
{
    if (c->backend_fd >= 0)
        close(c->backend_fd);
    c->backend_fd = -1;
}

/* The channel for our requests. Nonblocking: the loop never waits for the frontend. */
static int set_backend_req_fd(struct vub_conn *c)
{
    int fd = take_fd(c);

    if (fd < 0) {
        protocol_error(c, "%s", "SET_BACKEND_REQ_FD without its fd");
        return MSG_CLOSE;
    }
    close_backend(c);
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
        log_warn("vhost-user-blk: %s: back-end channel: %s", c->exp->id, strerror(errno));
        close(fd);
        return MSG_FAILED;
    }
    c->backend_fd = fd;
    return MSG_OK;
}

void vub_conn_config_changed(struct vub_conn *c)
{
    /* One-way: without NEED_REPLY the frontend answers nothing, so nothing is read here. */
    struct vhost_user_header h = {
        .request = VHOST_USER_BACKEND_CONFIG_CHANGE_MSG,
        .flags = VHOST_USER_VERSION,
    };

    if (c->backend_fd < 0 ||
        !(c->protocol_features & (1ull << VHOST_USER_PROTOCOL_F_BACKEND_REQ)))
        return;
    ssize_t n = send(c->backend_fd, &h, sizeof(h), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n == (ssize_t)sizeof(h))
        return;
    log_warn("vhost-user-blk: %s: CONFIG_CHANGE_MSG not sent (%s); the back-end channel is "
             "closed", c->exp->id, n < 0 ? strerror(errno) : "short write");
    close_backend(c);
}

/* No field of the configuration is writable (CONFIG_WCE is not offered). */
static int set_config(struct vub_conn *c)
{
    return MSG_FAILED;
}

static const struct msg_handler handlers[VHOST_USER_REQUEST_MAX] = {
    [VHOST_USER_GET_FEATURES] = { "GET_FEATURES", get_features, 0, true },
    [VHOST_USER_SET_FEATURES] = { "SET_FEATURES", set_features, 8, false },
    [VHOST_USER_SET_OWNER] = { "SET_OWNER", set_owner, 0, false },
    [VHOST_USER_RESET_OWNER] = { "RESET_OWNER", reset_owner, 0, false },
    [VHOST_USER_SET_MEM_TABLE] = { "SET_MEM_TABLE", set_mem_table, VAR, false },
    [VHOST_USER_SET_VRING_NUM] = { "SET_VRING_NUM", set_vring_num, 8, false },
    [VHOST_USER_SET_VRING_ADDR] = { "SET_VRING_ADDR", set_vring_addr, 40, false },
    [VHOST_USER_SET_VRING_BASE] = { "SET_VRING_BASE", set_vring_base, 8, false },
    [VHOST_USER_GET_VRING_BASE] = { "GET_VRING_BASE", get_vring_base, 8, true },
    [VHOST_USER_SET_VRING_KICK] = { "SET_VRING_KICK", set_vring_kick, 8, false },
    [VHOST_USER_SET_VRING_CALL] = { "SET_VRING_CALL", set_vring_call, 8, false },
    [VHOST_USER_SET_VRING_ERR] = { "SET_VRING_ERR", set_vring_err, 8, false },
    [VHOST_USER_GET_PROTOCOL_FEATURES] = { "GET_PROTOCOL_FEATURES", get_protocol_features, 0,
                                           true },
    [VHOST_USER_SET_PROTOCOL_FEATURES] = { "SET_PROTOCOL_FEATURES", set_protocol_features, 8,
                                           false },
    [VHOST_USER_GET_QUEUE_NUM] = { "GET_QUEUE_NUM", get_queue_num, 0, true },
    [VHOST_USER_SET_VRING_ENABLE] = { "SET_VRING_ENABLE", set_vring_enable, 8, false },
    [VHOST_USER_SET_BACKEND_REQ_FD] = { "SET_BACKEND_REQ_FD", set_backend_req_fd, 0, false },
    [VHOST_USER_GET_CONFIG] = { "GET_CONFIG", get_config, VAR, true },
    [VHOST_USER_SET_CONFIG] = { "SET_CONFIG", set_config, VAR, false },
    [VHOST_USER_GET_INFLIGHT_FD] = { "GET_INFLIGHT_FD", get_inflight_fd, VAR, true },
    [VHOST_USER_SET_INFLIGHT_FD] = { "SET_INFLIGHT_FD", set_inflight_fd, VAR, false },
};

/* ---- reading ---- */

static void close_fds(struct vub_conn *c)
{
    for (unsigned i = 0; i < c->nfds; i++)
        close(c->fds[i]);
    c->nfds = 0;
}

/* A whole message is in: check it, run its handler, answer REPLY_ACK. */
static void dispatch(struct vub_conn *c)
{
    uint32_t req = c->hdr.request;
    const struct msg_handler *h = req < VHOST_USER_REQUEST_MAX ? &handlers[req] : NULL;
    if (!h || !h->fn) {
        protocol_error(c, "unknown request %" PRIu32, req);
        return;
    }
    if (h->size != VAR && c->hdr.size != h->size) {
        protocol_error(c, "%s with a payload of the wrong size", h->name);
        return;
    }
    log_debug("vhost-user-blk: %s: %s", c->exp->id, h->name);
    int r = h->fn(c);
    close_fds(c);
    if (r == MSG_CLOSE || r == MSG_DEFERRED || c->state == VUB_CONN_CLOSED)
        return;
    if (r == MSG_FAILED)
        log_warn("vhost-user-blk: %s: %s failed", c->exp->id, h->name);
    if (!h->replies && (c->hdr.flags & VHOST_USER_NEED_REPLY_MASK) &&
        (c->protocol_features & (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK)))
        reply_u64(c, r == MSG_OK ? 0 : 1);
}

/* Receive into buf[0..len), collecting fds. Returns bytes, 0 at end of input, -1 (errno). */
static ssize_t receive(struct vub_conn *c, void *buf, size_t len)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * VHOST_USER_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = { buf, len };
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
        .msg_controllen = sizeof(control.buf),
    };
    ssize_t n = recvmsg(c->fd, &m, MSG_CMSG_CLOEXEC);

    if (n < 0)
        return -1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        unsigned k = (unsigned)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int fds[VHOST_USER_MAX_FDS];
        memcpy(fds, CMSG_DATA(cm), sizeof(int) * MIN(k, VHOST_USER_MAX_FDS));
        for (unsigned i = 0; i < k && i < VHOST_USER_MAX_FDS; i++) {
            if (c->nfds < VHOST_USER_MAX_FDS)
                c->fds[c->nfds++] = fds[i];
            else
                close(fds[i]);
        }
    }
    if (m.msg_flags & MSG_CTRUNC) {
        errno = EPROTO;  /* more fds than a message may carry */
        return -1;
    }
    return n;
}

/* HEADER: a whole header is in. */
static void header_done(struct vub_conn *c)
{
    if ((c->hdr.flags & VHOST_USER_VERSION_MASK) != VHOST_USER_VERSION) {
        protocol_error(c, "%s", "wrong protocol version");
        return;
    }
    if (c->hdr.size > sizeof(c->payload)) {
        protocol_error(c, "%s", "message too large");
        return;
    }
    c->have = 0;
    c->state = VUB_CONN_PAYLOAD;
}

static void on_readable(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct vub_conn *c = opaque;

    if (c->state == VUB_CONN_DRAINING) {
        /* Nothing is asked for now but hang-ups and errors, which epoll always reports. */
        vub_conn_close(c, "the frontend hung up while GET_VRING_BASE waited");
        return;
    }
    vub_conn_ref(c);
    while (c->state == VUB_CONN_HEADER || c->state == VUB_CONN_PAYLOAD) {
        bool header = c->state == VUB_CONN_HEADER;
        size_t want = header ? sizeof(c->hdr) : c->hdr.size;
        char *dst = header ? (char *)&c->hdr : (char *)&c->payload;

        if (c->have < want) {
            ssize_t n = receive(c, dst + c->have, want - c->have);
            if (n == 0) {
                vub_conn_close(c, "the frontend disconnected");
                break;
            }
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                vub_conn_close(c, strerror(errno));
                break;
            }
            c->have += (size_t)n;
            if (c->have < want)
                continue;
        }
        if (header) {
            header_done(c);
        } else {
            memset((char *)&c->payload + c->hdr.size, 0, sizeof(c->payload) - c->hdr.size);
            dispatch(c);
            if (c->state == VUB_CONN_PAYLOAD) {
                c->state = VUB_CONN_HEADER;
                c->have = 0;
            }
        }
    }
    vub_conn_unref(c);
}

/* ---- the connection ---- */

struct vub_conn *vub_conn_new(struct vub_export *exp, int fd)
{
    struct vub_conn *c = xzalloc(sizeof(*c));

    c->exp = exp;
    c->loop = exp->loop;
    c->fd = fd;
    c->refs = 1;
    c->state = VUB_CONN_HEADER;
    c->backend_fd = -1;
    c->queues = xzalloc(sizeof(*c->queues) * exp->num_queues);
    c->scratch = xmalloc(sizeof(*c->scratch) * VUB_MAX_SEGS);
    for (unsigned i = 0; i < exp->num_queues; i++) {
        struct vub_queue *q = &c->queues[i];
        q->conn = c;
        q->index = i;
        q->kick_fd = q->call_fd = q->err_fd = -1;
    }
    if (loop_add_fd(c->loop, fd, LOOP_READ, on_readable, c) < 0) {
        log_warn("vhost-user-blk: %s: cannot watch the connection: %s", exp->id,
                 strerror(errno));
        close(fd);
        free(c->queues);
        free(c->scratch);
        free(c);
        return NULL;
    }
    return c;
}

void vub_conn_close(struct vub_conn *c, const char *why)
{
    if (c->state == VUB_CONN_CLOSED)
        return;
    log_info("vhost-user-blk: %s: frontend connection closed: %s", c->exp->id, why);
    c->state = VUB_CONN_CLOSED;
    loop_del_fd(c->loop, c->fd);
    close(c->fd);
    c->fd = -1;
    close_fds(c);
    for (unsigned i = 0; i < c->exp->num_queues; i++) {
        struct vub_queue *q = &c->queues[i];
        /* Not yet at storage: not done at all. The frontend hands them to the next
         * connection through the inflight region, or starts again from the used index. */
        vub_blk_withdraw(q);
        stop_ring(q);
        close_fd(c, &q->call_fd, false);
        close_fd(c, &q->err_fd, false);
    }
    vub_inflight_unmap(&c->inflight);
    close_backend(c);
    if (c->waiting) {
        device_cancel_wait(c->exp->dev, &c->waiter);
        c->waiting = false;
    }
    vub_mem_unref(c->mem);
    c->mem = NULL;
    vub_export_conn_gone(c->exp, c);
    c->exp = NULL;
    vub_conn_unref(c);
}

void vub_conn_ref(struct vub_conn *c)
{
    c->refs++;
}

void vub_conn_unref(struct vub_conn *c)
{
    if (--c->refs > 0)
        return;
    free(c->queues);
    free(c->scratch);
    free(c);
}
