/* Wire formats: vhost-user (QEMU's docs/interop/vhost-user.rst), split virtqueues and
 * virtio-blk (virtio 1.2, sections 2.7 and 5.2). Everything on these wires is little-endian;
 * thinblk only builds for little-endian hosts (checked below), so the structs are used as is. */
#ifndef THINBLK_VUB_PROTOCOL_H
#define THINBLK_VUB_PROTOCOL_H

#include <stdint.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vhost-user-blk: little-endian hosts only (the rings are the guest's, little-endian)"
#endif

/* ---- vhost-user messages ---- */

enum vub_request {
    VHOST_USER_GET_FEATURES = 1,
    VHOST_USER_SET_FEATURES = 2,
    VHOST_USER_SET_OWNER = 3,
    VHOST_USER_RESET_OWNER = 4,
    VHOST_USER_SET_MEM_TABLE = 5,
    VHOST_USER_SET_LOG_BASE = 6,
    VHOST_USER_SET_LOG_FD = 7,
    VHOST_USER_SET_VRING_NUM = 8,
    VHOST_USER_SET_VRING_ADDR = 9,
    VHOST_USER_SET_VRING_BASE = 10,
    VHOST_USER_GET_VRING_BASE = 11,
    VHOST_USER_SET_VRING_KICK = 12,
    VHOST_USER_SET_VRING_CALL = 13,
    VHOST_USER_SET_VRING_ERR = 14,
    VHOST_USER_GET_PROTOCOL_FEATURES = 15,
    VHOST_USER_SET_PROTOCOL_FEATURES = 16,
    VHOST_USER_GET_QUEUE_NUM = 17,
    VHOST_USER_SET_VRING_ENABLE = 18,
    VHOST_USER_SET_BACKEND_REQ_FD = 21,  /* SET_SLAVE_REQ_FD in QEMU 7.2 */
    VHOST_USER_GET_CONFIG = 24,
    VHOST_USER_SET_CONFIG = 25,
    VHOST_USER_GET_INFLIGHT_FD = 31,
    VHOST_USER_SET_INFLIGHT_FD = 32,
    VHOST_USER_REQUEST_MAX = 33,   /* the table in message.c covers 0..this-1 */
};

/* Back-end requests, on the channel SET_BACKEND_REQ_FD gives. */
#define VHOST_USER_BACKEND_CONFIG_CHANGE_MSG 2u

#define VHOST_USER_VERSION 0x1u
#define VHOST_USER_VERSION_MASK 0x3u
#define VHOST_USER_REPLY_MASK (1u << 2)
#define VHOST_USER_NEED_REPLY_MASK (1u << 3)

#define VHOST_USER_F_PROTOCOL_FEATURES 30

#define VHOST_USER_PROTOCOL_F_MQ 0
#define VHOST_USER_PROTOCOL_F_REPLY_ACK 3
#define VHOST_USER_PROTOCOL_F_BACKEND_REQ 5  /* SLAVE_REQ in QEMU 7.2 */
#define VHOST_USER_PROTOCOL_F_CONFIG 9
#define VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD 12

/* u64 payload of SET_VRING_KICK/CALL/ERR. */
#define VHOST_USER_VRING_IDX_MASK 0xffu
#define VHOST_USER_VRING_NOFD_MASK (1u << 8)

/* The memory table of the "baseline" protocol (no CONFIGURE_MEM_SLOTS). */
#define VHOST_MEMORY_BASELINE_NREGIONS 8
/* fds one message may carry. */
#define VHOST_USER_MAX_FDS 8

struct vhost_user_header {
    uint32_t request;
    uint32_t flags;
    uint32_t size;  /* of the payload that follows */
};

struct vhost_vring_state {
    uint32_t index;
    uint32_t num;
};

struct vhost_vring_addr {
    uint32_t index;
    uint32_t flags;
    uint64_t desc_user_addr;
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
};

struct vhost_user_memory_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
};

struct vhost_user_memory {
    uint32_t nregions;
    uint32_t padding;
    struct vhost_user_memory_region regions[VHOST_MEMORY_BASELINE_NREGIONS];
};

#define VHOST_USER_CONFIG_HDR_SIZE 12u
#define VHOST_USER_MAX_CONFIG_SIZE 256u

struct vhost_user_config {
    uint32_t offset;
    uint32_t size;
    uint32_t flags;
    uint8_t region[VHOST_USER_MAX_CONFIG_SIZE];
};

/* GET_INFLIGHT_FD and SET_INFLIGHT_FD. The spec lists 20 bytes of fields; QEMU sends and
 * expects the C struct's 24 (padded), and so do we. */
struct vhost_user_inflight {
    uint64_t mmap_size;
    uint64_t mmap_offset;
    uint16_t num_queues;
    uint16_t queue_size;
};
#define VHOST_USER_INFLIGHT_FIELDS_SIZE 20u

/* The shared inflight region for split virtqueues ("Inflight I/O tracking"): one of these per
 * queue, each followed by queue_size descriptor states. Its layout is the back-end's to
 * define (the front-end only keeps the fd); this one is the spec's. */
struct vhost_inflight_desc {
    uint8_t inflight;     /* 1: taken from the avail ring, not yet on the used ring */
    uint8_t padding[5];
    uint16_t next;        /* the last batch of used heads, as a list */
    uint64_t counter;     /* the order heads were taken in */
};

struct vhost_inflight_queue {
    uint64_t features;
    uint16_t version;     /* 1 */
    uint16_t desc_num;    /* the queue's size */
    uint16_t last_batch_head;
    uint16_t used_idx;    /* the used index once the last batch was completely pushed */
    struct vhost_inflight_desc desc[];
};

union vhost_user_payload {
    uint64_t u64;
    struct vhost_user_inflight inflight;
    struct vhost_vring_state state;
    struct vhost_vring_addr addr;
    struct vhost_user_memory memory;
    struct vhost_user_config config;
};

/* ---- virtio ---- */

#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

/* The largest queue a split virtqueue may have. */
#define VIRTQUEUE_MAX_SIZE 32768u

#define VRING_DESC_F_NEXT 1u
#define VRING_DESC_F_WRITE 2u
#define VRING_DESC_F_INDIRECT 4u

#define VRING_AVAIL_F_NO_INTERRUPT 1u
#define VRING_USED_F_NO_NOTIFY 1u

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];  /* num entries, then used_event with EVENT_IDX */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];  /* num entries, then avail_event with EVENT_IDX */
};

/* ---- virtio-blk ---- */

#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_TOPOLOGY 10
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

#define VIRTIO_BLK_T_IN 0u
#define VIRTIO_BLK_T_OUT 1u
#define VIRTIO_BLK_T_FLUSH 4u
#define VIRTIO_BLK_T_GET_ID 8u
#define VIRTIO_BLK_T_DISCARD 11u
#define VIRTIO_BLK_T_WRITE_ZEROES 13u

#define VIRTIO_BLK_S_OK 0u
#define VIRTIO_BLK_S_IOERR 1u
#define VIRTIO_BLK_S_UNSUPP 2u

#define VIRTIO_BLK_ID_BYTES 20u
#define VIRTIO_BLK_SECTOR_SIZE 512u

#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1u

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

struct virtio_blk_discard_write_zeroes {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* The device configuration space (virtio 1.2, 5.2.4), up to write_zeroes_may_unmap. */
struct virtio_blk_config {
    uint64_t capacity;
    uint32_t size_max;
    uint32_t seg_max;
    uint16_t cylinders;
    uint8_t heads;
    uint8_t sectors;
    uint32_t blk_size;
    uint8_t physical_block_exp;
    uint8_t alignment_offset;
    uint16_t min_io_size;
    uint32_t opt_io_size;
    uint8_t writeback;
    uint8_t unused0;
    uint16_t num_queues;
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t discard_sector_alignment;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    uint8_t write_zeroes_may_unmap;
    uint8_t unused1[3];
} __attribute__((packed));

_Static_assert(sizeof(struct virtio_blk_config) == 60, "virtio_blk_config layout");
_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc layout");
_Static_assert(sizeof(struct virtio_blk_outhdr) == 16, "virtio_blk_outhdr layout");
_Static_assert(sizeof(struct vhost_user_inflight) == 24, "vhost_user_inflight layout");
_Static_assert(sizeof(struct vhost_inflight_desc) == 16, "vhost_inflight_desc layout");
_Static_assert(sizeof(struct vhost_inflight_queue) == 16, "vhost_inflight_queue layout");

#endif
