#include "vhost-io/message.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common/util.h"

int vio_msg_send(int sock, uint32_t request, uint32_t flags, const void *payload,
                 uint32_t size, const int *fds, size_t nfds, struct error **errp)
{
    struct vio_msg_header hdr = {.request = request, .flags = flags, .size = size};
    struct iovec iov[2] = {
        {.iov_base = &hdr, .iov_len = sizeof(hdr)},
        {.iov_base = (void *)payload, .iov_len = payload ? size : 0},
    };
    union {
        char buf[CMSG_SPACE(sizeof(int) * VIO_MSG_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};

    if (nfds > VIO_MSG_MAX_FDS) {
        error_setg(errp, "vhost-user: too many fds (%zu)", nfds);
        return -1;
    }
    if (nfds) {
        memset(&control, 0, sizeof(control));
        mh.msg_control = control.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
    }

    size_t total = iov[0].iov_len + iov[1].iov_len;
    ssize_t n;
    do {
        n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        error_setg_errno(errp, errno, "vhost-user: sending %s", vio_request_name(request));
        return -1;
    }
    /* The fds went with the first byte; finish a short send without them. */
    size_t done = (size_t)n;
    while (done < total) {
        const char *p;
        size_t left;
        if (done < sizeof(hdr)) {
            p = (const char *)&hdr + done;
            left = sizeof(hdr) - done;
        } else {
            p = (const char *)payload + (done - sizeof(hdr));
            left = total - done;
        }
        n = send(sock, p, left, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            error_setg_errno(errp, n < 0 ? errno : EPIPE, "vhost-user: sending %s",
                             vio_request_name(request));
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

/* The error of a recv() that returned n <= 0 (EAGAIN is SO_RCVTIMEO running out). */
static int recv_failed(ssize_t n, struct error **errp)
{
    if (n == 0)
        error_setg(errp, "vhost-user: the backend closed the connection");
    else
        error_setg_errno(errp, errno == EAGAIN ? ETIMEDOUT : errno,
                         "vhost-user: receiving a message");
    return -1;
}

/* Read exactly len bytes; returns 0, or -1 with *errp (EOF included). */
static int read_full(int sock, void *buf, size_t len, struct error **errp)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = recv(sock, (char *)buf + done, len - done, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return recv_failed(n, errp);
        done += (size_t)n;
    }
    return 0;
}

void vio_msg_close_fds(struct vio_msg *msg)
{
    for (size_t i = 0; i < msg->nfds; i++)
        close(msg->fds[i]);
    msg->nfds = 0;
}

int vio_msg_recv(int sock, struct vio_msg *msg, struct error **errp)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * VIO_MSG_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = &msg->hdr, .iov_len = sizeof(msg->hdr)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = sizeof(control.buf)};
    msg->nfds = 0;

    ssize_t n;
    do {
        n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return recv_failed(n, errp);
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *fds = (int *)CMSG_DATA(cm);
        for (size_t i = 0; i < count; i++) {
            if (msg->nfds < VIO_MSG_MAX_FDS)
                msg->fds[msg->nfds++] = fds[i];
            else
                close(fds[i]);
        }
    }
    if ((size_t)n < sizeof(msg->hdr) &&
        read_full(sock, (char *)&msg->hdr + n, sizeof(msg->hdr) - (size_t)n, errp) < 0)
        goto fail;
    if (msg->hdr.size > VIO_MSG_MAX_PAYLOAD) {
        error_setg(errp, "vhost-user: %s reply of %u bytes is too large",
                   vio_request_name(msg->hdr.request), msg->hdr.size);
        goto fail;
    }
    if (read_full(sock, msg->payload.bytes, msg->hdr.size, errp) < 0)
        goto fail;
    return 0;

fail:
    vio_msg_close_fds(msg);
    return -1;
}

const char *vio_request_name(uint32_t request)
{
    static const char *const names[] = {
        [VIO_REQ_GET_FEATURES] = "GET_FEATURES",
        [VIO_REQ_SET_FEATURES] = "SET_FEATURES",
        [VIO_REQ_SET_OWNER] = "SET_OWNER",
        [VIO_REQ_RESET_OWNER] = "RESET_OWNER",
        [VIO_REQ_SET_MEM_TABLE] = "SET_MEM_TABLE",
        [VIO_REQ_SET_LOG_BASE] = "SET_LOG_BASE",
        [VIO_REQ_SET_LOG_FD] = "SET_LOG_FD",
        [VIO_REQ_SET_VRING_NUM] = "SET_VRING_NUM",
        [VIO_REQ_SET_VRING_ADDR] = "SET_VRING_ADDR",
        [VIO_REQ_SET_VRING_BASE] = "SET_VRING_BASE",
        [VIO_REQ_GET_VRING_BASE] = "GET_VRING_BASE",
        [VIO_REQ_SET_VRING_KICK] = "SET_VRING_KICK",
        [VIO_REQ_SET_VRING_CALL] = "SET_VRING_CALL",
        [VIO_REQ_SET_VRING_ERR] = "SET_VRING_ERR",
        [VIO_REQ_GET_PROTOCOL_FEATURES] = "GET_PROTOCOL_FEATURES",
        [VIO_REQ_SET_PROTOCOL_FEATURES] = "SET_PROTOCOL_FEATURES",
        [VIO_REQ_GET_QUEUE_NUM] = "GET_QUEUE_NUM",
        [VIO_REQ_SET_VRING_ENABLE] = "SET_VRING_ENABLE",
        [VIO_REQ_GET_CONFIG] = "GET_CONFIG",
        [VIO_REQ_SET_CONFIG] = "SET_CONFIG",
        [VIO_REQ_GET_INFLIGHT_FD] = "GET_INFLIGHT_FD",
        [VIO_REQ_SET_INFLIGHT_FD] = "SET_INFLIGHT_FD",
    };
    if (request < ARRAY_SIZE(names) && names[request])
        return names[request];
    return "UNKNOWN";
}
