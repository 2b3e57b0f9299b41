#include "vhost-io/virtqueue.h"

#include <endian.h>
#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/assert.h"
#include "common/util.h"

/* Where the two trailing event fields live: right after each ring's entries. */
static uint16_t *used_event_field(struct vio_vq *vq)
{
    return &vq->avail->ring[vq->size];
}

static uint16_t *avail_event_field(struct vio_vq *vq)
{
    return (uint16_t *)&vq->used->ring[vq->size];
}

int vio_vq_init(struct vio_vq *vq, unsigned index, unsigned size, bool event_idx,
                struct vio_mem *m, struct error **errp)
{
    *vq = (struct vio_vq){.index = index, .size = size, .event_idx = event_idx,
                          .kick_fd = -1, .call_fd = -1};
    if (size == 0 || size > VIO_VQ_MAX_SIZE || (size & (size - 1))) {
        error_setg(errp, "queue size %u is not a power of two up to %u", size,
                   VIO_VQ_MAX_SIZE);
        return -1;
    }
    /* Alignments from virtio 1.2 2.7.1: 16, 2 and 4. */
    vq->desc = vio_mem_alloc(m, 16ull * size, 16, &vq->desc_gpa);
    vq->avail = vio_mem_alloc(m, 6 + 2ull * size, 2, &vq->avail_gpa);
    vq->used = vio_mem_alloc(m, 6 + 8ull * size, 4, &vq->used_gpa);
    if (!vq->desc || !vq->avail || !vq->used) {
        error_setg(errp, "guest memory too small for queue %u", index);
        return -1;
    }
    vq->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    vq->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (vq->kick_fd < 0 || vq->call_fd < 0) {
        error_setg_errno(errp, errno, "eventfd");
        vio_vq_destroy(vq);
        return -1;
    }
    vq->next = xmalloc(sizeof(*vq->next) * size);
    vq->chain_len = xzalloc(sizeof(*vq->chain_len) * size);
    for (unsigned i = 0; i < size; i++)
        vq->next[i] = (uint16_t)(i + 1);
    vq->num_free = size;
    vq->free_head = 0;
    return 0;
}

void vio_vq_destroy(struct vio_vq *vq)
{
    if (vq->kick_fd >= 0)
        close(vq->kick_fd);
    if (vq->call_fd >= 0)
        close(vq->call_fd);
    vq->kick_fd = vq->call_fd = -1;
    free(vq->next);
    free(vq->chain_len);
    vq->next = vq->chain_len = NULL;
}

void vio_desc_set(struct vio_desc *d, uint64_t addr, uint32_t len, uint16_t flags,
                  uint16_t next)
{
    d->addr = htole64(addr);
    d->len = htole32(len);
    d->flags = htole16(flags);
    d->next = htole16(next);
}

struct vio_desc *vio_vq_desc(struct vio_vq *vq, unsigned i)
{
    ASSERT(i < vq->size);
    return &vq->desc[i];
}

void vio_vq_publish(struct vio_vq *vq, uint16_t head)
{
    vq->avail->ring[vq->avail_idx & (vq->size - 1)] = htole16(head);
    vq->avail_idx++;
    /* The device must see the ring entry (and the descriptors) before the index. */
    __atomic_store_n(&vq->avail->idx, htole16(vq->avail_idx), __ATOMIC_RELEASE);
}

int vio_vq_add(struct vio_vq *vq, const struct vio_sg *sg, unsigned n,
               struct vio_desc *indirect, uint64_t indirect_gpa)
{
    ASSERT(n > 0);
    unsigned need = indirect ? 1 : n;
    if (need > vq->num_free)
        return -1;
    uint16_t head = vq->free_head;

    if (indirect) {
        for (unsigned i = 0; i < n; i++)
            vio_desc_set(&indirect[i], sg[i].gpa, sg[i].len,
                         (uint16_t)((sg[i].device_writes ? VIO_DESC_F_WRITE : 0) |
                                    (i + 1 < n ? VIO_DESC_F_NEXT : 0)),
                         (uint16_t)(i + 1 < n ? i + 1 : 0));
        vio_desc_set(&vq->desc[head], indirect_gpa, (uint32_t)(n * sizeof(*indirect)),
                     VIO_DESC_F_INDIRECT, 0);
        vq->free_head = vq->next[head];
    } else {
        uint16_t i = head;
        for (unsigned k = 0; k < n; k++) {
            bool last = k + 1 == n;
            vio_desc_set(&vq->desc[i], sg[k].gpa, sg[k].len,
                         (uint16_t)((sg[k].device_writes ? VIO_DESC_F_WRITE : 0) |
                                    (last ? 0 : VIO_DESC_F_NEXT)),
                         last ? 0 : vq->next[i]);
            if (!last)
                i = vq->next[i];
        }
        vq->free_head = vq->next[i];
    }
    vq->num_free -= need;
    vq->chain_len[head] = (uint16_t)need;
    vio_vq_publish(vq, head);
    return head;
}

bool vio_vq_kick(struct vio_vq *vq, bool force)
{
    /* Publishing avail->idx must be ordered before reading the device's suppression. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bool kick = force;
    if (!kick && vq->event_idx) {
        uint16_t event = le16toh(__atomic_load_n(avail_event_field(vq), __ATOMIC_RELAXED));
        uint16_t new_idx = vq->avail_idx, old_idx = vq->kicked_idx;
        /* virtio 1.2 2.7.10: kick if event lies in (old, new]. */
        kick = (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
    } else if (!kick) {
        kick = !(le16toh(__atomic_load_n(&vq->used->flags, __ATOMIC_RELAXED)) &
                 VIO_USED_F_NO_NOTIFY);
    }
    vq->kicked_idx = vq->avail_idx;
    if (kick) {
        uint64_t one = 1;
        ssize_t n = write(vq->kick_fd, &one, sizeof(one));
        (void)n; /* EAGAIN: the counter is saturated, the device will look anyway */
        vq->kicks++;
    }
    return kick;
}

uint16_t vio_vq_used_idx(const struct vio_vq *vq)
{
    return le16toh(__atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE));
}

int vio_vq_get_used(struct vio_vq *vq, uint32_t *id, uint32_t *len)
{
    if (vio_vq_used_idx(vq) == vq->last_used)
        return 0;
    struct vio_used_elem *e = &vq->used->ring[vq->last_used & (vq->size - 1)];
    *id = le32toh(e->id);
    *len = le32toh(e->len);
    vq->last_used++;

    if (*id < vq->size && vq->chain_len[*id]) {
        /* Give the chain back: its links are ours, whatever the table holds now. */
        uint16_t tail = (uint16_t)*id;
        for (unsigned k = 1; k < vq->chain_len[*id]; k++)
            tail = vq->next[tail];
        vq->next[tail] = vq->free_head;
        vq->free_head = (uint16_t)*id;
        vq->num_free += vq->chain_len[*id];
        vq->chain_len[*id] = 0;
    }
    if (vq->event_idx)
        __atomic_store_n(used_event_field(vq), htole16(vq->last_used), __ATOMIC_RELAXED);
    return 1;
}

bool vio_vq_enable_cb(struct vio_vq *vq)
{
    if (vq->event_idx)
        __atomic_store_n(used_event_field(vq), htole16(vq->last_used), __ATOMIC_RELAXED);
    else
        vq->avail->flags = 0;
    /* The request must be visible before we look at the index again. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vio_vq_used_idx(vq) != vq->last_used;
}

void vio_vq_drain_call(struct vio_vq *vq)
{
    uint64_t v;
    if (read(vq->call_fd, &v, sizeof(v)) == sizeof(v))
        vq->calls++;
}
