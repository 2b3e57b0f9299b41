/* vhost-user messages, frontend side (QEMU's docs/interop/vhost-user.rst).
 *
 * A message is a 12-byte header (request, flags, payload size; host byte order, as the spec
 * says: both ends are on one machine) and a payload of at most VIO_MSG_MAX_PAYLOAD bytes.
 * File descriptors travel beside it as SCM_RIGHTS ancillary data. These calls block on the
 * socket: the frontend sets SO_RCVTIMEO/SO_SNDTIMEO so that a silent backend is an error.
 */
#ifndef THINBLK_VHOST_IO_MESSAGE_H
#define THINBLK_VHOST_IO_MESSAGE_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

enum vio_request {
    VIO_REQ_GET_FEATURES = 1,
    VIO_REQ_SET_FEATURES = 2,
    VIO_REQ_SET_OWNER = 3,
    VIO_REQ_RESET_OWNER = 4,
    VIO_REQ_SET_MEM_TABLE = 5,
    VIO_REQ_SET_LOG_BASE = 6,
    VIO_REQ_SET_LOG_FD = 7,
    VIO_REQ_SET_VRING_NUM = 8,
    VIO_REQ_SET_VRING_ADDR = 9,
    VIO_REQ_SET_VRING_BASE = 10,
    VIO_REQ_GET_VRING_BASE = 11,
    VIO_REQ_SET_VRING_KICK = 12,
    VIO_REQ_SET_VRING_CALL = 13,
    VIO_REQ_SET_VRING_ERR = 14,
    VIO_REQ_GET_PROTOCOL_FEATURES = 15,
    VIO_REQ_SET_PROTOCOL_FEATURES = 16,
    VIO_REQ_GET_QUEUE_NUM = 17,
    VIO_REQ_SET_VRING_ENABLE = 18,
    VIO_REQ_GET_CONFIG = 24,
    VIO_REQ_SET_CONFIG = 25,
    VIO_REQ_GET_INFLIGHT_FD = 31,
    VIO_REQ_SET_INFLIGHT_FD = 32,
};

/* Header flags: the low two bits are the protocol version, which is 1. */
#define VIO_MSG_VERSION 0x1u
#define VIO_MSG_VERSION_MASK 0x3u
#define VIO_MSG_REPLY (1u << 2)
#define VIO_MSG_NEED_REPLY (1u << 3)

/* Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
#define VIO_PROTOCOL_F_MQ 0
#define VIO_PROTOCOL_F_REPLY_ACK 3
#define VIO_PROTOCOL_F_CONFIG 9
#define VIO_PROTOCOL_F_INFLIGHT_SHMFD 12

/* The payload of SET_VRING_KICK/CALL/ERR: the queue index, and this bit when no fd is sent. */
#define VIO_VRING_NOFD (1ull << 8)

/* libvhost-user and QEMU both cap the payload at a few KiB; GET_CONFIG needs 12 + 256. */
#define VIO_MSG_MAX_PAYLOAD 4096
#define VIO_MSG_MAX_FDS 8
#define VIO_MEM_MAX_REGIONS 8

struct vio_msg_header {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
} __attribute__((packed));

struct vio_vring_state {
    uint32_t index;
    uint32_t num;
};

struct vio_vring_addr {
    uint32_t index;
    uint32_t flags;
    uint64_t desc_user_addr;  /* the frontend's own (virtual) addresses, not guest ones */
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
};

struct vio_mem_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
};

struct vio_mem_table {
    uint32_t nregions;
    uint32_t padding;
    struct vio_mem_region regions[VIO_MEM_MAX_REGIONS];
};

struct vio_config_hdr {
    uint32_t offset;
    uint32_t size;
    uint32_t flags;
};

/* A received message. fds[0..nfds) are owned by the receiver of the struct. */
struct vio_msg {
    struct vio_msg_header hdr;
    union {
        uint64_t u64;
        struct vio_vring_state state;
        uint8_t bytes[VIO_MSG_MAX_PAYLOAD];
    } payload;
    int fds[VIO_MSG_MAX_FDS];
    size_t nfds;
};

/* Send one message: header fields as given (flags exactly as given, so a test can send a
 * wrong version), size bytes of payload and nfds descriptors. With payload NULL only the
 * header goes out, size being then just what it claims. Returns 0, or -1 with *errp. */
int vio_msg_send(int sock, uint32_t request, uint32_t flags, const void *payload,
                 uint32_t size, const int *fds, size_t nfds, struct error **errp);

/* Receive one message into *msg. A payload larger than VIO_MSG_MAX_PAYLOAD, a short read or
 * EOF is an error (-1, *errp set; fds received are closed). */
int vio_msg_recv(int sock, struct vio_msg *msg, struct error **errp);

/* Close the fds a received message carried. */
void vio_msg_close_fds(struct vio_msg *msg);

/* "GET_FEATURES", ... or "UNKNOWN". */
const char *vio_request_name(uint32_t request);

#endif
