/* Split virtqueues, driver side (virtio 1.2, 2.7): a descriptor table, an available ring
 * and a used ring in guest memory, a kick eventfd we write and a call eventfd we wait on.
 *
 * Two levels. The normal one, vio_vq_add() / vio_vq_get_used(), keeps a free list of
 * descriptors on our side (never read back from guest memory, which the backend can see)
 * and returns chains to it when they complete. The raw one, vio_vq_desc() /
 * vio_vq_publish(), lets a test write any descriptors it likes (out of range addresses,
 * loops, chains longer than the ring) and publish any head; such chains are not
 * tracked, so a raw test uses a queue for raw requests only (vio_vq_get_used() then just
 * reports what the device wrote).
 *
 * The ring fields are little-endian, as virtio 1.x wants; one thread uses a queue at a time.
 */
#ifndef THINBLK_VHOST_IO_VIRTQUEUE_H
#define THINBLK_VHOST_IO_VIRTQUEUE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "vhost-io/memory.h"

#define VIO_DESC_F_NEXT 1
#define VIO_DESC_F_WRITE 2
#define VIO_DESC_F_INDIRECT 4

#define VIO_AVAIL_F_NO_INTERRUPT 1
#define VIO_USED_F_NO_NOTIFY 1

#define VIO_VQ_MAX_SIZE 32768

struct vio_desc {
    uint64_t addr;   /* guest-physical */
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vio_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* size entries, then used_event */
};

struct vio_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vio_used {
    uint16_t flags;
    uint16_t idx;
    struct vio_used_elem ring[]; /* size entries, then avail_event */
};

/* One element of a chain for vio_vq_add(). */
struct vio_sg {
    uint64_t gpa;
    uint32_t len;
    bool device_writes;  /* VIO_DESC_F_WRITE: the device fills it (read data, status) */
};

struct vio_vq {
    unsigned index;
    unsigned size;             /* a power of two, <= VIO_VQ_MAX_SIZE */
    bool event_idx;            /* VIRTIO_RING_F_EVENT_IDX negotiated */
    struct vio_desc *desc;     /* in guest memory */
    struct vio_avail *avail;
    struct vio_used *used;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    int kick_fd, call_fd;      /* eventfds, owned */

    uint16_t avail_idx;        /* our copy of avail->idx */
    uint16_t kicked_idx;       /* avail_idx at the last kick (for event idx) */
    uint16_t last_used;        /* the next used entry we will read */
    unsigned num_free;
    uint16_t free_head;
    uint16_t *next;            /* our free list and chain links, size entries */
    uint16_t *chain_len;       /* by head: descriptors the chain holds in the table */
    uint64_t kicks, calls;     /* counters, for the bench */
    uint32_t stop_base;        /* the device's next avail index, from GET_VRING_BASE */
};

/* Allocate the rings of a queue of size entries in m and create its eventfds.
 * Returns 0, or -1 with *errp set (m full, size not a power of two, eventfd failed). */
int vio_vq_init(struct vio_vq *vq, unsigned index, unsigned size, bool event_idx,
                struct vio_mem *m, struct error **errp);

/* Close the eventfds and free our bookkeeping (the rings stay in guest memory). */
void vio_vq_destroy(struct vio_vq *vq);

/* Put a chain of n elements on the ring, readable ones first by convention (not checked).
 * With indirect set (not NULL; n entries of guest memory at indirect_gpa), the chain goes in
 * that table behind one ring descriptor. Returns the head, or -1 if too few descriptors are
 * free. Does not kick. */
int vio_vq_add(struct vio_vq *vq, const struct vio_sg *sg, unsigned n,
               struct vio_desc *indirect, uint64_t indirect_gpa);

/* Kick the device if it wants it (used->flags or avail_event), or always with force.
 * Returns whether it kicked. */
bool vio_vq_kick(struct vio_vq *vq, bool force);

/* Take the next used element: returns 1 with *id and *len, or 0 if there is none. A chain
 * vio_vq_add() made goes back to the free list; an id that is not such a head is
 * reported as it is (the raw API's backends may answer anything). */
int vio_vq_get_used(struct vio_vq *vq, uint32_t *id, uint32_t *len);

/* Ask for a call at the next used element, and return whether there already is one (so
 * the caller should not sleep). */
bool vio_vq_enable_cb(struct vio_vq *vq);

/* Reset the call eventfd's counter (after poll says it is readable). */
void vio_vq_drain_call(struct vio_vq *vq);

/* The used index the device has published. */
uint16_t vio_vq_used_idx(const struct vio_vq *vq);

/* ---- raw access, for tests and fuzzing ---- */

/* Descriptor i of the table (i < size), for the caller to write as it likes. */
struct vio_desc *vio_vq_desc(struct vio_vq *vq, unsigned i);

/* Publish head on the avail ring as is, with no check and no tracking. */
void vio_vq_publish(struct vio_vq *vq, uint16_t head);

/* Fill d (little-endian) from its fields. */
void vio_desc_set(struct vio_desc *d, uint64_t addr, uint32_t len, uint16_t flags,
                  uint16_t next);

#endif
