#include "vhost-io/frontend.h"

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/util.h"

#define VIO_DEFAULT_QUEUE_SIZE 128
#define VIO_DEFAULT_MEM_SIZE (64ull << 20)
#define VIO_DEFAULT_MEM_GPA (1ull << 30)
#define VIO_DEFAULT_TIMEOUT_MS 30000

/* What we understand of virtio-blk and so may acknowledge when offered. */
static const uint64_t vio_blk_known_features =
    1ull << VIO_BLK_F_SIZE_MAX | 1ull << VIO_BLK_F_SEG_MAX | 1ull << VIO_BLK_F_GEOMETRY |
    1ull << VIO_BLK_F_RO | 1ull << VIO_BLK_F_BLK_SIZE | 1ull << VIO_BLK_F_FLUSH |
    1ull << VIO_BLK_F_TOPOLOGY | 1ull << VIO_BLK_F_CONFIG_WCE | 1ull << VIO_BLK_F_MQ |
    1ull << VIO_BLK_F_DISCARD | 1ull << VIO_BLK_F_WRITE_ZEROES;

static const uint64_t vio_known_protocol =
    1ull << VIO_PROTOCOL_F_MQ | 1ull << VIO_PROTOCOL_F_REPLY_ACK | 1ull << VIO_PROTOCOL_F_CONFIG;

static void trace(const struct vio_dev *d, const char *dir, uint32_t request, uint32_t flags,
                  uint32_t size, size_t nfds)
{
    if (d->opts.trace)
        fprintf(stderr, "vhost-io: %s %s flags=0x%x size=%u fds=%zu\n", dir,
                vio_request_name(request), flags, size, nfds);
}

int vio_dev_call_raw(struct vio_dev *d, uint32_t request, uint32_t flags, const void *payload,
                     uint32_t size, const int *fds, size_t nfds, bool want_reply,
                     struct vio_msg *reply, struct error **errp)
{
    trace(d, "->", request, flags, size, nfds);
    if (vio_msg_send(d->sock, request, flags, payload, size, fds, nfds, errp) < 0)
        return -1;
    if (!want_reply)
        return 0;
    if (vio_msg_recv(d->sock, reply, errp) < 0) {
        error_prepend(errp, "waiting for the reply to %s: ", vio_request_name(request));
        return -1;
    }
    trace(d, "<-", reply->hdr.request, reply->hdr.flags, reply->hdr.size, reply->nfds);
    return 0;
}

/* Send a message and check its reply: for a GET_* its own (of reply_size bytes exactly, into
 * reply), else, with REPLY_ACK, the u64 ack. */
static int vio_call(struct vio_dev *d, uint32_t request, const void *payload, uint32_t size,
                    const int *fds, size_t nfds, bool has_reply, void *reply,
                    uint32_t reply_size, struct error **errp)
{
    bool ack = !has_reply && (d->protocol & (1ull << VIO_PROTOCOL_F_REPLY_ACK));
    uint32_t flags = VIO_MSG_VERSION | (ack ? VIO_MSG_NEED_REPLY : 0);
    struct vio_msg *msg = xmalloc(sizeof(*msg));
    int ret = -1;

    if (vio_dev_call_raw(d, request, flags, payload, size, fds, nfds, has_reply || ack, msg,
                         errp) < 0)
        goto out;
    if (!has_reply && !ack) {
        ret = 0;
        goto out;
    }
    vio_msg_close_fds(msg);
    if (msg->hdr.request != request || (msg->hdr.flags & VIO_MSG_VERSION_MASK) != VIO_MSG_VERSION ||
        !(msg->hdr.flags & VIO_MSG_REPLY)) {
        error_setg(errp, "vhost-user: bad reply to %s (request %u, flags 0x%x)",
                   vio_request_name(request), msg->hdr.request, msg->hdr.flags);
        goto out;
    }
    if (ack) {
        if (msg->hdr.size != 8) {
            error_setg(errp, "vhost-user: ack of %s has %u bytes", vio_request_name(request),
                       msg->hdr.size);
            goto out;
        }
        if (msg->payload.u64 != 0) {
            error_setg(errp, "vhost-user: the backend refused %s (0x%" PRIx64 ")",
                       vio_request_name(request), msg->payload.u64);
            goto out;
        }
    } else {
        if (msg->hdr.size != reply_size) {
            error_setg(errp, "vhost-user: reply to %s has %u bytes, expected %u",
                       vio_request_name(request), msg->hdr.size, reply_size);
            goto out;
        }
        memcpy(reply, msg->payload.bytes, reply_size);
    }
    ret = 0;
out:
    free(msg);
    return ret;
}

static int vio_get_u64(struct vio_dev *d, uint32_t request, uint64_t *v, struct error **errp)
{
    return vio_call(d, request, NULL, 0, NULL, 0, true, v, sizeof(*v), errp);
}

static int vio_set_u64(struct vio_dev *d, uint32_t request, uint64_t v, struct error **errp)
{
    return vio_call(d, request, &v, sizeof(v), NULL, 0, false, NULL, 0, errp);
}

static int vio_connect_socket(const char *path, int timeout_ms, struct error **errp)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path)) {
        error_setg(errp, "socket path too long: %s", path);
        return -1;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        error_setg_errno(errp, errno, "socket");
        return -1;
    }
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        error_setg_errno(errp, errno, "Failed to connect to '%s'", path);
        close(fd);
        return -1;
    }
    return fd;
}

static void vio_config_from_le(struct vio_blk_config *c)
{
    c->capacity = le64toh(c->capacity);
    c->size_max = le32toh(c->size_max);
    c->seg_max = le32toh(c->seg_max);
    c->cylinders = le16toh(c->cylinders);
    c->blk_size = le32toh(c->blk_size);
    c->min_io_size = le16toh(c->min_io_size);
    c->opt_io_size = le32toh(c->opt_io_size);
    c->num_queues = le16toh(c->num_queues);
    c->max_discard_sectors = le32toh(c->max_discard_sectors);
    c->max_discard_seg = le32toh(c->max_discard_seg);
    c->discard_sector_alignment = le32toh(c->discard_sector_alignment);
    c->max_write_zeroes_sectors = le32toh(c->max_write_zeroes_sectors);
    c->max_write_zeroes_seg = le32toh(c->max_write_zeroes_seg);
}

static int vio_get_config(struct vio_dev *d, struct error **errp)
{
    struct {
        struct vio_config_hdr hdr;
        struct vio_blk_config config;
    } __attribute__((packed)) req = {.hdr = {.offset = 0, .size = sizeof(req.config)}},
      reply;
    if (vio_call(d, VIO_REQ_GET_CONFIG, &req, sizeof(req), NULL, 0, true, &reply,
                 sizeof(reply), errp) < 0)
        return -1;
    /* libvhost-user answers a failed read with size 0. */
    if (reply.hdr.size != sizeof(reply.config)) {
        error_setg(errp, "vhost-user: GET_CONFIG failed (size %u)", reply.hdr.size);
        return -1;
    }
    d->config = reply.config;
    vio_config_from_le(&d->config);
    d->have_config = true;
    return 0;
}

static int vio_negotiate(struct vio_dev *d, struct error **errp)
{
    if (vio_get_u64(d, VIO_REQ_GET_FEATURES, &d->device_features, errp) < 0)
        return -1;
    if (!(d->device_features & (1ull << VIO_F_VERSION_1))) {
        error_setg(errp, "the device does not offer VIRTIO_F_VERSION_1");
        return -1;
    }
    uint64_t want = 1ull << VIO_F_VERSION_1 | 1ull << VIO_F_PROTOCOL_FEATURES |
                    vio_blk_known_features;
    if (d->opts.indirect)
        want |= 1ull << VIO_F_INDIRECT_DESC;
    if (d->opts.event_idx)
        want |= 1ull << VIO_F_EVENT_IDX;
    d->features = d->device_features & want;

    d->max_queues = 1;
    if (vio_dev_has(d, VIO_F_PROTOCOL_FEATURES)) {
        if (vio_get_u64(d, VIO_REQ_GET_PROTOCOL_FEATURES, &d->device_protocol, errp) < 0)
            return -1;
        uint64_t protocol = d->device_protocol & vio_known_protocol;
        if (vio_set_u64(d, VIO_REQ_SET_PROTOCOL_FEATURES, protocol, errp) < 0)
            return -1;
        d->protocol = protocol; /* REPLY_ACK applies from the next message on */
        if (d->protocol & (1ull << VIO_PROTOCOL_F_MQ)) {
            uint64_t n;
            if (vio_get_u64(d, VIO_REQ_GET_QUEUE_NUM, &n, errp) < 0)
                return -1;
            d->max_queues = (unsigned)MIN(n, 65535);
        }
    }
    if (vio_call(d, VIO_REQ_SET_OWNER, NULL, 0, NULL, 0, false, NULL, 0, errp) < 0)
        return -1;
    if ((d->protocol & (1ull << VIO_PROTOCOL_F_CONFIG)) && vio_get_config(d, errp) < 0)
        return -1;
    return 0;
}

struct vio_dev *vio_dev_connect(const char *path, const struct vio_options *opts,
                                struct error **errp)
{
    struct vio_dev *d = xzalloc(sizeof(*d));
    d->opts = *opts;
    d->mem.fd = -1;
    if (!d->opts.num_queues)
        d->opts.num_queues = 1;
    if (!d->opts.queue_size)
        d->opts.queue_size = VIO_DEFAULT_QUEUE_SIZE;
    if (!d->opts.mem_size)
        d->opts.mem_size = VIO_DEFAULT_MEM_SIZE;
    if (!d->opts.mem_gpa)
        d->opts.mem_gpa = VIO_DEFAULT_MEM_GPA;
    if (d->opts.timeout_ms <= 0)
        d->opts.timeout_ms = VIO_DEFAULT_TIMEOUT_MS;

    d->sock = vio_connect_socket(path, d->opts.timeout_ms, errp);
    if (d->sock < 0 || vio_negotiate(d, errp) < 0) {
        vio_dev_free(d);
        return NULL;
    }
    return d;
}

static int vio_set_vring_fd(struct vio_dev *d, uint32_t request, unsigned index, int fd,
                            struct error **errp)
{
    uint64_t v = index;
    return vio_call(d, request, &v, sizeof(v), &fd, 1, false, NULL, 0, errp);
}

static int vio_start_queue(struct vio_dev *d, struct vio_vq *vq, struct error **errp)
{
    struct vio_vring_state num = {.index = vq->index, .num = vq->size};
    struct vio_vring_state base = {.index = vq->index, .num = 0};
    struct vio_vring_addr addr = {
        .index = vq->index,
        .desc_user_addr = (uintptr_t)vq->desc,
        .used_user_addr = (uintptr_t)vq->used,
        .avail_user_addr = (uintptr_t)vq->avail,
    };
    if (vio_call(d, VIO_REQ_SET_VRING_NUM, &num, sizeof(num), NULL, 0, false, NULL, 0, errp) ||
        vio_call(d, VIO_REQ_SET_VRING_BASE, &base, sizeof(base), NULL, 0, false, NULL, 0,
                 errp) ||
        vio_call(d, VIO_REQ_SET_VRING_ADDR, &addr, sizeof(addr), NULL, 0, false, NULL, 0,
                 errp) ||
        /* The call fd before the kick: the backend may complete as soon as it can read. */
        vio_set_vring_fd(d, VIO_REQ_SET_VRING_CALL, vq->index, vq->call_fd, errp) ||
        vio_set_vring_fd(d, VIO_REQ_SET_VRING_KICK, vq->index, vq->kick_fd, errp))
        return -1;
    return 0;
}

int vio_dev_start(struct vio_dev *d, struct error **errp)
{
    unsigned n = d->opts.num_queues;
    if (n > d->max_queues ||
        (vio_dev_has(d, VIO_BLK_F_MQ) && d->have_config && n > d->config.num_queues) ||
        (!vio_dev_has(d, VIO_BLK_F_MQ) && n > 1)) {
        error_setg(errp, "the device has fewer than %u queues", n);
        return -1;
    }
    if (vio_set_u64(d, VIO_REQ_SET_FEATURES, d->features, errp) < 0)
        return -1;
    if (vio_mem_init(&d->mem, d->opts.mem_gpa, d->opts.mem_size, errp) < 0)
        return -1;

    struct vio_mem_table table = {
        .nregions = 1,
        .regions[0] = {.guest_phys_addr = d->mem.gpa, .memory_size = d->mem.size,
                       .userspace_addr = (uintptr_t)d->mem.base, .mmap_offset = 0},
    };
    /* The payload holds only the regions used. */
    uint32_t size = (uint32_t)(offsetof(struct vio_mem_table, regions) +
                               sizeof(table.regions[0]));
    if (vio_call(d, VIO_REQ_SET_MEM_TABLE, &table, size, &d->mem.fd, 1, false, NULL, 0,
                 errp) < 0)
        return -1;

    d->vqs = xzalloc(sizeof(*d->vqs) * n);
    for (unsigned i = 0; i < n; i++) {
        d->vqs[i].kick_fd = d->vqs[i].call_fd = -1;
        if (vio_vq_init(&d->vqs[i], i, d->opts.queue_size, vio_dev_has(d, VIO_F_EVENT_IDX),
                        &d->mem, errp) < 0)
            return -1;
        d->nvqs = i + 1;
        if (vio_start_queue(d, &d->vqs[i], errp) < 0)
            return -1;
    }
    /* With protocol features, rings start disabled (vhost-user.rst, "Ring states"). */
    if (vio_dev_has(d, VIO_F_PROTOCOL_FEATURES)) {
        for (unsigned i = 0; i < n; i++) {
            struct vio_vring_state en = {.index = i, .num = 1};
            if (vio_call(d, VIO_REQ_SET_VRING_ENABLE, &en, sizeof(en), NULL, 0, false, NULL, 0,
                         errp) < 0)
                return -1;
        }
    }
    d->started = true;
    return 0;
}

int vio_dev_stop(struct vio_dev *d, struct error **errp)
{
    if (!d->started)
        return 0;
    d->started = false;
    for (unsigned i = 0; i < d->nvqs; i++) {
        struct vio_vring_state st = {.index = i}, reply;
        if (vio_call(d, VIO_REQ_GET_VRING_BASE, &st, sizeof(st), NULL, 0, true, &reply,
                     sizeof(reply), errp) < 0)
            return -1;
        if (reply.index != i) {
            error_setg(errp, "vhost-user: GET_VRING_BASE of queue %u answered for queue %u", i,
                       reply.index);
            return -1;
        }
        /* Not checked against avail_idx: a raw test may have left the ring stuck. */
        d->vqs[i].stop_base = reply.num;
    }
    return 0;
}

void vio_dev_free(struct vio_dev *d)
{
    if (!d)
        return;
    if (d->sock >= 0)
        close(d->sock);
    for (unsigned i = 0; i < d->nvqs; i++)
        vio_vq_destroy(&d->vqs[i]);
    free(d->vqs);
    vio_mem_destroy(&d->mem);
    free(d);
}

bool vio_dev_hung_up(struct vio_dev *d)
{
    struct pollfd p = {.fd = d->sock, .events = POLLIN};
    if (poll(&p, 1, 0) <= 0)
        return false;
    if (p.revents & (POLLHUP | POLLERR))
        return true;
    char c;
    return recv(d->sock, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}
