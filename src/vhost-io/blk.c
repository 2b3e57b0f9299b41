#include "vhost-io/blk.h"

#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <string.h>

#include "common/assert.h"
#include "common/util.h"

uint64_t vio_blk_queue_mem(unsigned queue_size, unsigned depth, size_t data_cap,
                           unsigned segs)
{
    uint64_t rings = 16ull * queue_size + 6 + 2ull * queue_size + 6 + 8ull * queue_size + 64;
    uint64_t slot = 64 + 64 + 16ull * (segs + 2) + data_cap + 4096;
    return rings + depth * slot;
}

int vio_blk_queue_init(struct vio_blk_queue *q, struct vio_dev *d, unsigned index,
                       unsigned depth, size_t data_cap, unsigned segs, bool indirect,
                       struct error **errp)
{
    ASSERT(d->started && index < d->nvqs);
    ASSERT(segs >= 1 && segs <= VIO_BLK_MAX_DATA_SEGS);
    *q = (struct vio_blk_queue){.dev = d, .vq = &d->vqs[index], .indirect = indirect,
                                .depth = depth, .data_cap = data_cap, .segs = segs};
    /* Without indirect tables a request takes up to segs + 2 descriptors. */
    unsigned per_req = indirect ? 1 : segs + 2;
    if (depth == 0 || depth * per_req > q->vq->size) {
        error_setg(errp, "queue depth %u does not fit a queue of %u entries", depth,
                   q->vq->size);
        return -1;
    }
    if (indirect && !vio_dev_has(d, VIO_F_INDIRECT_DESC)) {
        error_setg(errp, "indirect descriptors were not negotiated");
        return -1;
    }
    q->reqs = xzalloc(sizeof(*q->reqs) * depth);
    q->by_head = xzalloc(sizeof(*q->by_head) * q->vq->size);
    for (unsigned i = 0; i < depth; i++) {
        struct vio_blk_req *r = &q->reqs[i];
        r->q = q;
        r->head = -1;
        r->hdr = vio_mem_alloc(&d->mem, sizeof(*r->hdr), 16, &r->hdr_gpa);
        r->status = vio_mem_alloc(&d->mem, 1, 1, &r->status_gpa);
        r->indirect = vio_mem_alloc(&d->mem, sizeof(struct vio_desc) * (segs + 2), 16,
                                    &r->indirect_gpa);
        /* Page-aligned data, as a guest's O_DIRECT buffers are: a backend may need it. */
        r->data = vio_mem_alloc(&d->mem, MAX(data_cap, 64), 4096, &r->data_gpa);
        if (!r->hdr || !r->status || !r->indirect || !r->data) {
            error_setg(errp, "guest memory too small for %u requests of %zu bytes", depth,
                       data_cap);
            vio_blk_queue_destroy(q);
            return -1;
        }
        r->next_free = q->free;
        q->free = r;
    }
    return 0;
}

void vio_blk_queue_destroy(struct vio_blk_queue *q)
{
    free(q->reqs);
    free(q->by_head);
    q->reqs = NULL;
    q->by_head = NULL;
    q->free = NULL;
}

struct vio_blk_req *vio_blk_req_get(struct vio_blk_queue *q)
{
    struct vio_blk_req *r = q->free;
    if (r)
        q->free = r->next_free;
    return r;
}

void vio_blk_req_put(struct vio_blk_req *r)
{
    ASSERT(r->head < 0);
    r->next_free = r->q->free;
    r->q->free = r;
}

uint32_t vio_blk_seg(uint32_t len, unsigned segs, unsigned i, uint32_t *at, uint32_t *mem)
{
    uint32_t each = MAX(len / segs / VIO_BLK_SECTOR, 1u) * VIO_BLK_SECTOR;
    uint32_t k;

    if ((uint64_t)i * each >= len)
        return 0;
    *at = i * each;
    k = i == segs - 1 || len - *at <= each ? len - *at : each;
    *mem = len - (*at + k);
    return k;
}

/* The data descriptors of a read (device-writable) or a write of r. Returns how many. */
static unsigned data_sg(const struct vio_blk_req *r, bool write, struct vio_sg *sg)
{
    uint32_t at, mem, k;
    unsigned n = 0;

    while ((k = vio_blk_seg(r->len, r->q->segs, n, &at, &mem)) > 0)
        sg[n++] = (struct vio_sg){r->data_gpa + mem, k, write};
    return n;
}

int vio_blk_submit(struct vio_blk_req *r, uint32_t type, uint64_t offset, uint32_t len,
                   uint32_t flags)
{
    struct vio_blk_queue *q = r->q;
    ASSERT(r->head < 0);
    ASSERT(len <= q->data_cap || (type != VIO_BLK_T_IN && type != VIO_BLK_T_OUT));
    struct vio_sg sg[VIO_BLK_MAX_DATA_SEGS + 2];
    unsigned n = 0;

    r->type = type;
    r->offset = offset;
    r->len = len;
    r->used_len = 0;
    r->hdr->type = htole32(type);
    r->hdr->ioprio = 0;
    r->hdr->sector = htole64(offset / VIO_BLK_SECTOR);
    *r->status = VIO_BLK_S_UNWRITTEN;
    sg[n++] = (struct vio_sg){r->hdr_gpa, sizeof(*r->hdr), false};

    switch (type) {
    case VIO_BLK_T_IN:
        n += data_sg(r, true, sg + n);
        break;
    case VIO_BLK_T_OUT:
        n += data_sg(r, false, sg + n);
        break;
    case VIO_BLK_T_GET_ID:
        sg[n++] = (struct vio_sg){r->data_gpa, VIO_BLK_ID_BYTES, true};
        break;
    case VIO_BLK_T_DISCARD:
    case VIO_BLK_T_WRITE_ZEROES: {
        struct vio_blk_seg *seg = (struct vio_blk_seg *)r->data;
        r->hdr->sector = 0;
        seg->sector = htole64(offset / VIO_BLK_SECTOR);
        seg->num_sectors = htole32(len / VIO_BLK_SECTOR);
        seg->flags = htole32(flags);
        sg[n++] = (struct vio_sg){r->data_gpa, sizeof(*seg), false};
        break;
    }
    default: /* FLUSH and anything else: no data */
        break;
    }
    sg[n++] = (struct vio_sg){r->status_gpa, 1, true};

    int head = vio_vq_add(q->vq, sg, n, q->indirect ? r->indirect : NULL, r->indirect_gpa);
    if (head < 0)
        return -1;
    r->head = head;
    q->by_head[head] = r;
    q->inflight++;
    r->submit_ns = now_monotonic_ns();
    return 0;
}

void vio_blk_kick(struct vio_blk_queue *q)
{
    vio_vq_kick(q->vq, false);
}

struct vio_blk_req *vio_blk_poll(struct vio_blk_queue *q)
{
    uint32_t id, len;
    while (vio_vq_get_used(q->vq, &id, &len) == 1) {
        struct vio_blk_req *r = id < q->vq->size ? q->by_head[id] : NULL;
        if (!r) /* not ours: a buggy device; nothing we can complete */
            continue;
        q->by_head[id] = NULL;
        r->head = -1;
        r->used_len = len;
        q->inflight--;
        return r;
    }
    return NULL;
}

int vio_blk_wait(struct vio_blk_queue *const *qs, unsigned n, int timeout_ms,
                 struct error **errp)
{
    ASSERT(n > 0 && n <= 64);
    struct pollfd p[65];
    for (unsigned i = 0; i < n; i++) {
        if (vio_vq_enable_cb(qs[i]->vq))
            return 0;
        p[i] = (struct pollfd){.fd = qs[i]->vq->call_fd, .events = POLLIN};
    }
    /* The socket carries no traffic now; it turning readable means the backend went away. */
    p[n] = (struct pollfd){.fd = qs[0]->dev->sock, .events = POLLRDHUP};
    int r;
    do {
        r = poll(p, n + 1, timeout_ms);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        error_setg_errno(errp, errno, "poll");
        return -1;
    }
    if (r == 0) {
        error_setg(errp, "timed out waiting for a completion");
        return -1;
    }
    for (unsigned i = 0; i < n; i++) {
        if (p[i].revents & POLLIN)
            vio_vq_drain_call(qs[i]->vq);
    }
    if (p[n].revents) {
        /* A completion may have raced the hang-up: let the caller take it first. */
        for (unsigned i = 0; i < n; i++) {
            if (vio_vq_used_idx(qs[i]->vq) != qs[i]->vq->last_used)
                return 0;
        }
        error_setg(errp, "the backend closed the connection");
        return -1;
    }
    return 0;
}

int vio_blk_run(struct vio_blk_req *r, uint32_t type, uint64_t offset, uint32_t len,
                uint32_t flags, int timeout_ms, struct error **errp)
{
    struct vio_blk_queue *q = r->q;
    if (vio_blk_submit(r, type, offset, len, flags) < 0) {
        error_setg(errp, "the ring is full");
        vio_blk_req_put(r);
        return -1;
    }
    vio_blk_kick(q);
    for (;;) {
        struct vio_blk_req *done = vio_blk_poll(q);
        if (done) {
            int status = *done->status;
            vio_blk_req_put(done);
            if (done == r)
                return status;
            continue;
        }
        if (vio_blk_wait(&q, 1, timeout_ms, errp) < 0)
            return -1;
    }
}

const char *vio_blk_status_name(int status)
{
    switch (status) {
    case VIO_BLK_S_OK:
        return "OK";
    case VIO_BLK_S_IOERR:
        return "IOERR";
    case VIO_BLK_S_UNSUPP:
        return "UNSUPP";
    default:
        return "unknown";
    }
}
