/* The vhost-user frontend: connect to a backend's socket, negotiate, hand it guest memory
 * and queues, and take them back at the end.
 *
 * The setup is a fixed sequence, as QEMU's vhost-user-blk device does it:
 *   vio_dev_connect():  GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER,
 *                       GET_CONFIG  -> the device's features and virtio-blk config
 *   vio_dev_start():    SET_FEATURES, SET_MEM_TABLE, then per queue SET_VRING_NUM, _BASE,
 *                       _ADDR, _KICK, _CALL, _ENABLE  -> queues ready for requests
 *   vio_dev_stop():     GET_VRING_BASE per queue (the backend stops the rings)
 * Every call blocks on the socket, each wait bounded by the timeout of the options.
 * With REPLY_ACK negotiated, every message that has no reply of its own asks for one, so a
 * backend's refusal is reported at the message that caused it.
 */
#ifndef THINBLK_VHOST_IO_FRONTEND_H
#define THINBLK_VHOST_IO_FRONTEND_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "vhost-io/memory.h"
#include "vhost-io/message.h"
#include "vhost-io/virtqueue.h"

/* Device-independent feature bits. */
#define VIO_F_INDIRECT_DESC 28
#define VIO_F_EVENT_IDX 29
#define VIO_F_PROTOCOL_FEATURES 30  /* VHOST_USER_F_PROTOCOL_FEATURES */
#define VIO_F_VERSION_1 32

/* virtio-blk feature bits (virtio 1.2, 5.2.3). */
#define VIO_BLK_F_SIZE_MAX 1
#define VIO_BLK_F_SEG_MAX 2
#define VIO_BLK_F_GEOMETRY 4
#define VIO_BLK_F_RO 5
#define VIO_BLK_F_BLK_SIZE 6
#define VIO_BLK_F_FLUSH 9
#define VIO_BLK_F_TOPOLOGY 10
#define VIO_BLK_F_CONFIG_WCE 11
#define VIO_BLK_F_MQ 12
#define VIO_BLK_F_DISCARD 13
#define VIO_BLK_F_WRITE_ZEROES 14

/* struct virtio_blk_config, as far as we read it (60 bytes, little-endian on the wire). */
struct vio_blk_config {
    uint64_t capacity;              /* in 512-byte sectors */
    uint32_t size_max;
    uint32_t seg_max;
    uint16_t cylinders;
    uint8_t heads, sectors;
    uint32_t blk_size;
    uint8_t physical_block_exp, alignment_offset;
    uint16_t min_io_size;
    uint32_t opt_io_size;
    uint8_t writeback, unused0;
    uint16_t num_queues;
    uint32_t max_discard_sectors, max_discard_seg, discard_sector_alignment;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    uint8_t write_zeroes_may_unmap, unused1[3];
} __attribute__((packed));

struct vio_options {
    unsigned num_queues;      /* queues to start; 0: 1 */
    unsigned queue_size;      /* entries per queue (power of two); 0: 128 */
    bool event_idx;           /* offer VIRTIO_RING_F_EVENT_IDX if the device has it */
    bool indirect;            /* offer VIRTIO_RING_F_INDIRECT_DESC if the device has it */
    uint64_t mem_size;        /* guest memory in bytes; 0: 64 MiB */
    uint64_t mem_gpa;         /* its guest-physical base; 0: 1 GiB */
    int timeout_ms;           /* for each reply; <= 0: 30 s */
    bool trace;               /* log each message to stderr */
};

struct vio_dev {
    int sock;
    struct vio_options opts;
    uint64_t device_features;   /* GET_FEATURES */
    uint64_t features;          /* what we SET_FEATURES */
    uint64_t device_protocol;   /* GET_PROTOCOL_FEATURES, 0 without the feature */
    uint64_t protocol;          /* what we SET_PROTOCOL_FEATURES */
    unsigned max_queues;        /* GET_QUEUE_NUM, or 1 without MQ */
    struct vio_blk_config config;
    bool have_config;
    struct vio_mem mem;
    struct vio_vq *vqs;         /* num_queues of them, after vio_dev_start() */
    unsigned nvqs;
    bool started;
};

/* Connect to the backend at path and negotiate up to GET_CONFIG. Returns a new device (free
 * with vio_dev_free()), or NULL with *errp set. */
struct vio_dev *vio_dev_connect(const char *path, const struct vio_options *opts,
                                struct error **errp);

/* Acknowledge features, set up guest memory and the queues. The memory's size must leave
 * room for the rings and for what the caller carves out afterwards. Returns 0 or -1. */
int vio_dev_start(struct vio_dev *d, struct error **errp);

/* GET_VRING_BASE on each queue, which stops it in the backend. Returns 0 or -1. */
int vio_dev_stop(struct vio_dev *d, struct error **errp);

/* Close the connection and free everything (d may be NULL). */
void vio_dev_free(struct vio_dev *d);

static inline bool vio_dev_has(const struct vio_dev *d, unsigned bit)
{
    return d->features & (1ull << bit);
}

/* ---- raw messages, for tests ---- */

/* Send one message as given and, if want_reply, wait for the reply into *reply (its fds are
 * the caller's). Returns 0, or -1 with *errp (the backend may hang up on a bad message). */
int vio_dev_call_raw(struct vio_dev *d, uint32_t request, uint32_t flags, const void *payload,
                     uint32_t size, const int *fds, size_t nfds, bool want_reply,
                     struct vio_msg *reply, struct error **errp);

/* Whether the backend has closed the connection (a non-blocking check). */
bool vio_dev_hung_up(struct vio_dev *d);

#endif
