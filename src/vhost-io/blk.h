/* virtio-blk requests over a started vio_dev queue (virtio 1.2, 5.2.6).
 *
 * A queue gets depth request slots, each with its header, status byte, data buffer and
 * indirect table carved out of guest memory once. A request is: header (type, reserved,
 * sector), data buffers, one status byte the device writes. Submitting never blocks;
 * vio_blk_wait() blocks in poll() on the call eventfds up to a timeout.
 */
#ifndef THINBLK_VHOST_IO_BLK_H
#define THINBLK_VHOST_IO_BLK_H

#include <stdint.h>

#include "common/error.h"
#include "vhost-io/frontend.h"

enum vio_blk_type {
    VIO_BLK_T_IN = 0,
    VIO_BLK_T_OUT = 1,
    VIO_BLK_T_FLUSH = 4,
    VIO_BLK_T_GET_ID = 8,
    VIO_BLK_T_DISCARD = 11,
    VIO_BLK_T_WRITE_ZEROES = 13,
};

enum vio_blk_status {
    VIO_BLK_S_OK = 0,
    VIO_BLK_S_IOERR = 1,
    VIO_BLK_S_UNSUPP = 2,
};

#define VIO_BLK_SECTOR 512
#define VIO_BLK_ID_BYTES 20
#define VIO_BLK_WZ_F_UNMAP 1u
/* A status byte value the device never writes: still there after completion means it did
 * not write the status. */
#define VIO_BLK_S_UNWRITTEN 0xa5

struct vio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

struct vio_blk_seg {      /* one range of DISCARD / WRITE_ZEROES */
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

struct vio_blk_queue;

struct vio_blk_req {
    struct vio_blk_queue *q;
    struct vio_blk_outhdr *hdr;  /* in guest memory, like status, data, indirect */
    uint8_t *status;
    uint8_t *data;               /* data_cap bytes */
    struct vio_desc *indirect;   /* segs + 2 entries */
    uint64_t hdr_gpa, status_gpa, data_gpa, indirect_gpa;
    int head;                    /* the chain's head while in flight, else -1 */
    uint32_t type;
    uint64_t offset;             /* bytes */
    uint32_t len;                /* data bytes */
    uint32_t used_len;           /* what the device said it wrote */
    uint64_t submit_ns;
    struct vio_blk_req *next_free;
};

/* Most data segments of one request: the seg_max thinblkd and QEMU offer. */
#define VIO_BLK_MAX_DATA_SEGS 126

struct vio_blk_queue {
    struct vio_dev *dev;
    struct vio_vq *vq;
    bool indirect;               /* put chains in indirect tables */
    unsigned depth;
    size_t data_cap;
    unsigned segs;               /* data descriptors of a read or a write (at most) */
    struct vio_blk_req *reqs;    /* depth slots */
    struct vio_blk_req **by_head;/* vq->size entries: the request a head belongs to */
    struct vio_blk_req *free;
    unsigned inflight;
};

/* Bytes of guest memory a queue of depth slots of data_cap bytes in up to segs segments
 * needs (for the options' mem_size, with the rings' own). */
uint64_t vio_blk_queue_mem(unsigned queue_size, unsigned depth, size_t data_cap,
                           unsigned segs);

/* Set up q on queue index of the started device d. segs: data descriptors per read or write
 * (1 to VIO_BLK_MAX_DATA_SEGS, see vio_blk_seg()). indirect: use indirect tables (needs the
 * feature). Returns 0, or -1 with *errp (memory full, depth above the queue size). */
int vio_blk_queue_init(struct vio_blk_queue *q, struct vio_dev *d, unsigned index,
                       unsigned depth, size_t data_cap, unsigned segs, bool indirect,
                       struct error **errp);
void vio_blk_queue_destroy(struct vio_blk_queue *q);

/* A free request slot, or NULL when depth requests are in flight. */
struct vio_blk_req *vio_blk_req_get(struct vio_blk_queue *q);

/* Put r (not in flight) back. */
void vio_blk_req_put(struct vio_blk_req *r);

/* Data segment i of a read or write of len bytes split in up to segs: sets *at (where it is
 * in the request's data) and *mem (where it is in r->data), returns its length, or 0 past
 * the last. The segments are whole sectors (the last takes the rest) and lie in r->data in
 * reverse order, last first: a device that took them for one buffer would misplace bytes. */
uint32_t vio_blk_seg(uint32_t len, unsigned segs, unsigned i, uint32_t *at, uint32_t *mem);

/* Queue request r: IN/OUT with len bytes at offset (data in r->data, len <= data_cap, in the
 * queue's segments: vio_blk_seg());
 * FLUSH; GET_ID (20 bytes into r->data); DISCARD/WRITE_ZEROES of len bytes at offset, flags
 * VIO_BLK_WZ_F_UNMAP or 0. Does not kick. Returns 0, or -1 if the ring is full. */
int vio_blk_submit(struct vio_blk_req *r, uint32_t type, uint64_t offset, uint32_t len,
                   uint32_t flags);

/* Kick q's queue if the device asks for it. */
void vio_blk_kick(struct vio_blk_queue *q);

/* The next completed request of q (its status in *r->status), or NULL. */
struct vio_blk_req *vio_blk_poll(struct vio_blk_queue *q);

/* Wait until one of the n queues has a completion, up to timeout_ms (-1: forever).
 * Returns 0, or -1 with *errp on a timeout or when the backend hangs up. */
int vio_blk_wait(struct vio_blk_queue *const *qs, unsigned n, int timeout_ms,
                 struct error **errp);

/* Submit one request on q, kick, wait for it. Returns its status byte, or -1 with *errp.
 * r is put back either way unless the wait failed. */
int vio_blk_run(struct vio_blk_req *r, uint32_t type, uint64_t offset, uint32_t len,
                uint32_t flags, int timeout_ms, struct error **errp);

/* "OK", "IOERR", "UNSUPP", or "unknown". */
const char *vio_blk_status_name(int status);

#endif
