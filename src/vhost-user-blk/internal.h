/* The vhost-user-blk export's modules among themselves: server.c (the listening socket, one
 * frontend at a time), message.c (the vhost-user message state machine), memory.c (the guest
 * memory table), virtqueue.c (the split-ring walker), blk.c (virtio-blk requests <-> device
 * requests). Everything runs on the daemon's loop thread. */
#ifndef THINBLK_VUB_INTERNAL_H
#define THINBLK_VUB_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "common/assert.h"
#include "common/list.h"
#include "common/unix-socket.h"
#include "device/device.h"
#include "vhost-user-blk/protocol.h"
#include "vhost-user-blk/server.h"

struct loop;

/* ---- guest memory (memory.c) ---- */

struct vub_region {
    uint64_t gpa;    /* guest physical start */
    uint64_t size;
    uint64_t qva;    /* the frontend's virtual address of gpa (ring addresses use these) */
    uint8_t *host;   /* our mapping of gpa */
    void *map;       /* what mmap() returned, and its length */
    size_t map_len;
};

/* A memory table as SET_MEM_TABLE gave it. Reference-counted: each request holds the table it
 * was read with, so a new SET_MEM_TABLE (or a disconnect) never unmaps memory a request in the
 * device still points into. */
struct vub_conn;
struct vub_mem {
    unsigned refs;
    unsigned n;
    struct vub_region r[VHOST_MEMORY_BASELINE_NREGIONS];
    int slot[VHOST_MEMORY_BASELINE_NREGIONS];  /* each region's place in the SIGBUS guard */
    struct loop *loop;
    /* The connection whose table this is (it outlives the table: every holder of a table
     * reference holds one on the connection too). */
    struct vub_conn *conn;
    /* Set by the SIGBUS handler: the frontend cut a region's file short under us and a page
     * of it was replaced by a private zero page. Read on the loop, which closes conn. */
    bool poisoned;
    bool poison_handled;
};

/* Map the regions of msg with fds (taken: closed here in every case) for connection c.
 * Returns a table with one reference, or NULL (logged) if a region is invalid or cannot be
 * mapped. A region its frontend truncates later does not kill the daemon: touching the part
 * gone reads zeroes, and c is closed (memory.c, "The SIGBUS guard"). */
struct vub_mem *vub_mem_new(struct vub_conn *c, const struct vhost_user_memory *msg, int *fds,
                            unsigned nfds);
struct vub_mem *vub_mem_ref(struct vub_mem *m);
void vub_mem_unref(struct vub_mem *m);
/* Our address of guest physical [gpa, gpa + len), or NULL unless it lies in one region. */
void *vub_mem_gpa(const struct vub_mem *m, uint64_t gpa, uint64_t len);
/* The same for a frontend virtual address (ring addresses). */
void *vub_mem_qva(const struct vub_mem *m, uint64_t qva, uint64_t len);

/* ---- virtqueues (virtqueue.c) ---- */

struct vub_conn;
struct vub_req;
DECLARE_LIST_HEAD(vub_req_list, struct vub_req)

struct vub_queue {
    struct vub_conn *conn;
    unsigned index;
    uint16_t num;              /* ring size; 0: not set */
    struct vhost_vring_addr addr;
    bool addr_set;
    /* The rings in our mapping of the current memory table; NULL until the ring starts. */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t last_avail_idx;   /* the next avail entry to take */
    uint16_t used_idx;         /* the next used entry to fill */
    int kick_fd, call_fd, err_fd;  /* -1: none */
    bool started;              /* a kick fd came, and no GET_VRING_BASE since */
    bool enabled;              /* SET_VRING_ENABLE (always, without protocol features) */
    bool broken;               /* the guest broke the ring: not processed until restarted */
    uint64_t generation;       /* bumped when the ring stops: older requests are dropped */
    vub_req_list in_device;    /* requests of this ring submitted, not done */
    bool draining;             /* GET_VRING_BASE waits for in_device to empty */
    /* This ring's part of the inflight region (inflight.c), or NULL: not tracked. */
    struct vhost_inflight_queue *inflight;
    uint64_t inflight_counter; /* the next head's counter */
    /* Heads taken before the ring's restart and never answered, handled again before the
     * avail ring is read further: resubmit[resubmit_next..nresubmit). */
    uint16_t *resubmit;
    unsigned nresubmit, resubmit_next;
};

/* A data segment of a request, in our mapping of guest memory. */
struct vub_seg {
    uint8_t *p;
    uint32_t len;
    bool write;   /* device-writable (VRING_DESC_F_WRITE) */
};

/* One popped descriptor chain. */
struct vub_elem {
    uint16_t head;
    unsigned nseg;
    struct vub_seg *segs;   /* the connection's scratch array, copied out by the caller */
};

/* Most segments one chain may have (QEMU's VIRTQUEUE_MAX_SIZE); seg_max advertises fewer. */
#define VUB_MAX_SEGS 1024u

/* Map q's rings in the connection's memory. Returns 0, or -1 (logged) if they are not in it. */
int vub_vq_map(struct vub_queue *q);
/* Take the next available chain. Returns 1 with *e filled, 0 if the ring is empty, -1 if the
 * guest broke the ring (q->broken set, logged, the error eventfd signalled). */
int vub_vq_pop(struct vub_queue *q, struct vub_elem *e);
/* The chain at head (taken before, found again in the inflight region). Returns 1 with *e
 * filled, or -1 if the guest broke the ring (as vub_vq_pop()). */
int vub_vq_chain(struct vub_queue *q, uint16_t head, struct vub_elem *e);
/* Put head on the used ring with len bytes written and notify the guest (EVENT_IDX honoured). */
void vub_vq_push(struct vub_queue *q, uint16_t head, uint32_t len);
/* With EVENT_IDX: ask for a kick when entries past last_avail_idx come. Returns whether some
 * already came (process again). Without EVENT_IDX: false. */
bool vub_vq_arm_kick(struct vub_queue *q);
/* Mark q broken (logged once, error eventfd signalled). */
void vub_vq_break(struct vub_queue *q, const char *why);

/* ---- inflight tracking (inflight.c) ----
 *
 * With INFLIGHT_SHMFD the front-end keeps a region we share with it, marking which heads a
 * ring has taken and not yet put on the used ring, across our crash or a reconnect. */

struct vub_inflight {
    void *map;
    size_t size;
    uint16_t num_queues, queue_size;
};

/* GET_INFLIGHT_FD: a new region for *req's queues, sealed against shrinking. Returns its fd
 * (req->mmap_size and mmap_offset filled; the mapping in *inf), or -1 (logged). */
int vub_inflight_new(struct vhost_user_inflight *req, struct vub_inflight *inf);
/* SET_INFLIGHT_FD: map the region fd (taken) as *req describes. Returns 0, or -1 (logged) if
 * it is not one we could have made: wrong size, not sealed against shrinking, too small. */
int vub_inflight_map(const struct vhost_user_inflight *req, int fd, struct vub_inflight *inf);
void vub_inflight_unmap(struct vub_inflight *inf);
/* The ring q starts: attach its part of c's region (if any and it fits the ring), repair what
 * a crash between the used ring and the region left, and queue the heads still in flight, in
 * the order they were taken, for resubmission (q->resubmit; q->last_avail_idx set past them). */
void vub_inflight_start(struct vub_queue *q);
/* The ring q stops: detach it from the region, drop the heads not handled again yet (they stay
 * marked in the region, for the next start). */
void vub_inflight_stop(struct vub_queue *q);
/* Head taken from the avail ring / about to go on the used ring / went on it. */
void vub_inflight_take(struct vub_queue *q, uint16_t head);
void vub_inflight_put_begin(struct vub_queue *q, uint16_t head);
void vub_inflight_put_end(struct vub_queue *q, uint16_t head);

/* ---- the connection (message.c) ---- */

enum vub_conn_state {
    VUB_CONN_HEADER,    /* reading a message header */
    VUB_CONN_PAYLOAD,   /* reading its payload */
    VUB_CONN_DRAINING,  /* a GET_VRING_BASE waits for its ring's requests: nothing is read */
    VUB_CONN_CLOSED,    /* terminal: freed once no request refers to it */
};

struct vub_conn {
    struct vub_export *exp;
    struct loop *loop;
    int fd;
    enum vub_conn_state state;
    unsigned refs;             /* the export's while open, + one per request in the device */
    /* The message being read. */
    struct vhost_user_header hdr;
    union vhost_user_payload payload;
    size_t have;               /* bytes of the header or the payload read */
    int fds[VHOST_USER_MAX_FDS];
    unsigned nfds;
    /* Negotiated. */
    uint64_t features;
    uint64_t protocol_features;
    bool owner;
    struct vub_mem *mem;       /* a reference; NULL before SET_MEM_TABLE */
    struct vub_inflight inflight;  /* map NULL: none */
    int backend_fd;            /* SET_BACKEND_REQ_FD's socket (nonblocking), or -1 */
    struct vub_queue *queues;  /* exp->num_queues of them */
    struct vub_seg *scratch;   /* VUB_MAX_SEGS, for vub_vq_pop() */
    struct dev_waiter waiter;  /* while the device does not take requests */
    bool waiting;
};

/* A new connection on fd (owned). */
struct vub_conn *vub_conn_new(struct vub_export *exp, int fd);
/* Close c (idempotent): stop its rings, drop its memory when no request uses it. */
void vub_conn_close(struct vub_conn *c, const char *why);
void vub_conn_ref(struct vub_conn *c);
void vub_conn_unref(struct vub_conn *c);
bool vub_conn_has_feature(const struct vub_conn *c, unsigned bit);
/* The configuration space changed (the capacity): send CONFIG_CHANGE_MSG on the back-end
 * channel, if the frontend gave one. Never blocks; a failed send is logged, and the channel
 * dropped. */
void vub_conn_config_changed(struct vub_conn *c);
/* q was draining and its last request in the device is done: answer the GET_VRING_BASE that
 * waited for it, and read messages again. */
void vub_conn_ring_drained(struct vub_queue *q);

/* ---- virtio-blk (blk.c) ---- */

/* The virtio feature bits the export offers. */
uint64_t vub_blk_features(const struct vub_export *exp);
/* The configuration space. */
void vub_blk_config(const struct vub_export *exp, struct virtio_blk_config *cfg);
/* Take what q has available to the device, unless the device is stopped (then wait for it). */
void vub_blk_process(struct vub_queue *q);
/* Process every started queue of c (the device accepts requests again). */
void vub_blk_process_all(struct vub_conn *c);
/* Take q's requests that have not reached storage back from the device, unanswered (the
 * ring stops; the inflight region, if any, still has them for its restart). Those at storage
 * complete as usual, to a stopped ring. */
void vub_blk_withdraw(struct vub_queue *q);

/* ---- the export (server.c) ---- */

struct vub_export {
    struct loop *loop;
    struct device *dev;
    char *id;
    bool writable;
    uint16_t num_queues;
    uint32_t blk_size;          /* logical-block-size */
    int listen_fd;
    struct unix_listener listener;
    uint64_t accept_timer;      /* accepting paused (out of fds) until it fires; 0: none */
    struct vub_conn *conn;      /* the frontend, or NULL */
};

/* The connection c went away: the export may take another. */
void vub_export_conn_gone(struct vub_export *exp, struct vub_conn *c);

#endif
