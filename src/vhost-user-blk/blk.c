/* virtio-blk requests (virtio 1.2, 5.2.6) to device requests and back.
 *
 * A popped chain is a byte stream the driver wrote (header, then a write's data or a discard's
 * segments) followed by one it reads back (a read's data, then the status byte); descriptor
 * boundaries carry no meaning. Each valid request becomes one struct dev_req through
 * device_submit(), exactly as an NBD request does, so werror/rerror, parking and the retry on
 * cont, thresholds and blockstats behave the same. A request the device cannot take (bad
 * header, out of range, misaligned, unknown type) is answered here with VIRTIO_BLK_S_IOERR or
 * VIRTIO_BLK_S_UNSUPP; a chain without a writable status byte is returned with nothing
 * written. errno -> virtio-blk status has one mapping: status_of().
 *
 * Data: a read or a write goes to the device as the vector of its guest memory segments, read
 * and written in place, when every segment's address and length suit the node's alignment
 * (always, but on an O_DIRECT node). Only a guest with odd segments on an O_DIRECT node gets
 * a bounce buffer: a write is gathered into it before it is submitted, a read scattered from
 * it once it succeeded.
 *
 * While the device does not accept requests (the daemon is stopped, or a stop is pending), the
 * queues are not read any further: kicks are drained (message.c) but what the guest makes
 * available stays in its ring, and device_wait() brings us back. Requests taken before are
 * held or parked by the device itself, as an NBD connection's.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "common/iov.h"
#include "common/log.h"
#include "common/util.h"
#include "vhost-user-blk/internal.h"

/* Largest data of one request: bounds a bounce buffer. The guest learns no such limit from
 * the configuration (SIZE_MAX is not offered), but Linux sends at most max_sectors_kb, 1280 KiB
 * by default, and never more than 4 MiB segments x seg_max. */
#define VUB_MAX_DATA (32u << 20)
/* seg_max: QEMU's queue size (128) minus the header's and status's descriptors. */
#define VUB_SEG_MAX 126u
/* Largest discard or write-zeroes in one request, in sectors (1 GiB). */
#define VUB_MAX_ZERO_SECTORS (1u << 21)

struct vub_req {
    struct dev_req dreq;
    struct vub_conn *conn;     /* a reference */
    struct vub_queue *q;
    uint64_t generation;       /* q's when the chain was popped */
    struct vub_mem *mem;       /* a reference: segs point into it */
    uint16_t head;
    uint32_t type;
    uint8_t *status;
    struct iovec *data;        /* the request's data, in guest memory */
    unsigned ndata;
    uint64_t data_len;
    uint8_t *bounce;           /* segments the node cannot take as they are: their copy */
    struct vub_req *prev, *next;  /* in q->in_device while submitted */
};

DEFINE_LIST_FUNCTIONS(vub_req_list, struct vub_req, prev, next)

uint64_t vub_blk_features(const struct vub_export *exp)
{
    uint64_t f = 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_RING_F_INDIRECT_DESC |
                 1ull << VIRTIO_RING_F_EVENT_IDX | 1ull << VHOST_USER_F_PROTOCOL_FEATURES |
                 1ull << VIRTIO_BLK_F_SEG_MAX | 1ull << VIRTIO_BLK_F_BLK_SIZE |
                 1ull << VIRTIO_BLK_F_FLUSH | 1ull << VIRTIO_BLK_F_MQ |
                 1ull << VIRTIO_BLK_F_TOPOLOGY;

    if (exp->writable)
        f |= 1ull << VIRTIO_BLK_F_DISCARD | 1ull << VIRTIO_BLK_F_WRITE_ZEROES;
    else
        f |= 1ull << VIRTIO_BLK_F_RO;
    return f;
}

void vub_blk_config(const struct vub_export *exp, struct virtio_blk_config *cfg)
{
    const struct block_node *root = device_root(exp->dev);
    uint32_t lbs_sectors = exp->blk_size / VIRTIO_BLK_SECTOR_SIZE;
    /* The node's alignment is its physical block (the export refuses a logical block below
     * it, server.c): a guest that aligns to it never splits one. */
    uint32_t phys_blocks = MAX(root->alignment, exp->blk_size) / exp->blk_size;

    memset(cfg, 0, sizeof(*cfg));
    cfg->capacity = root->size / VIRTIO_BLK_SECTOR_SIZE;
    cfg->seg_max = VUB_SEG_MAX;
    cfg->blk_size = exp->blk_size;
    cfg->physical_block_exp = (uint8_t)__builtin_ctz(phys_blocks);
    cfg->min_io_size = (uint16_t)MIN(phys_blocks, (uint32_t)UINT16_MAX);
    cfg->opt_io_size = phys_blocks;
    cfg->num_queues = exp->num_queues;
    cfg->max_discard_sectors = VUB_MAX_ZERO_SECTORS;
    cfg->max_discard_seg = 1;
    cfg->discard_sector_alignment = lbs_sectors;
    cfg->max_write_zeroes_sectors = VUB_MAX_ZERO_SECTORS;
    cfg->max_write_zeroes_seg = 1;
    cfg->write_zeroes_may_unmap = 1;
}

/* errno -> virtio-blk status: the one mapping. */
static uint8_t status_of(int err)
{
    switch (err) {
    case 0:
        return VIRTIO_BLK_S_OK;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
        return VIRTIO_BLK_S_UNSUPP;
    default:
        return VIRTIO_BLK_S_IOERR;
    }
}

static void req_free(struct vub_req *r)
{
    vub_mem_unref(r->mem);
    free(r->data);
    free(r->bounce);
    free(r);
}

/* Whether r's queue still is the ring r came from. */
static bool req_current(const struct vub_req *r)
{
    return r->conn->state != VUB_CONN_CLOSED && r->q->generation == r->generation &&
           r->q->used;
}

/* Write the status, put r on the used ring (in_len bytes of data written before the status)
 * and free r. */
static void complete(struct vub_req *r, uint8_t status, uint64_t in_len)
{
    if (req_current(r)) {
        if (r->status)
            __atomic_store_n(r->status, status, __ATOMIC_RELAXED);
        vub_vq_push(r->q, r->head, r->status ? (uint32_t)(in_len + 1) : 0);
    }
    req_free(r);
}

/* The segments of [skip, skip + len) of the driver's (write=false) or the device's
 * (write=true) stream of e, into a new array at *out. Returns how many. */
static unsigned slice(const struct vub_elem *e, bool write, uint64_t skip, uint64_t len,
                      struct iovec **out)
{
    struct iovec *s = xmalloc(sizeof(*s) * (e->nseg ? e->nseg : 1));
    unsigned n = 0;

    for (unsigned i = 0; i < e->nseg && len; i++) {
        const struct vub_seg *g = &e->segs[i];
        if (g->write != write)
            continue;
        if (skip >= g->len) {
            skip -= g->len;
            continue;
        }
        uint64_t k = MIN(g->len - skip, len);
        s[n++] = (struct iovec){g->p + skip, k};
        skip = 0;
        len -= k;
    }
    *out = s;
    return n;
}

static void on_device_done(struct dev_req *dreq, int ret)
{
    struct vub_req *r = container_of(dreq, struct vub_req, dreq);
    struct vub_conn *c = r->conn;
    struct vub_queue *q = r->q;  /* lives as long as c */

    vub_req_list_remove(&q->in_device, r);
    if (ret == 0 && r->type == VIRTIO_BLK_T_IN && r->bounce && req_current(r))
        iov_from_buf(r->data, r->ndata, 0, r->bounce, r->data_len);
    complete(r, status_of(-ret), r->type == VIRTIO_BLK_T_IN && ret == 0 ? r->data_len : 0);
    if (q->draining && vub_req_list_empty(&q->in_device))
        vub_conn_ring_drained(q);
    vub_conn_unref(c);
}

/* Submit r as breq (all but done). */
static void submit(struct vub_req *r, struct block_req breq)
{
    struct vub_conn *c = r->conn;

    r->dreq.breq = breq;
    r->dreq.done = on_device_done;
    r->dreq.opaque = r;
    vub_req_list_push(&r->q->in_device, r);
    vub_conn_ref(c);
    device_submit(c->exp->dev, &r->dreq);
}

/* r's data for the device in breq: the guest's own memory if every segment is aligned for
 * the node, else a bounce buffer (gathered for a write). Returns -1 if out of memory. */
static int set_data(struct vub_req *r, uint32_t align, struct block_req *breq)
{
    if (iov_aligned(r->data, r->ndata, align)) {
        breq->iov = r->data;
        breq->niov = r->ndata;
        return 0;
    }
    if (posix_memalign((void **)&r->bounce, MAX(align, 4096u), r->data_len) != 0) {
        r->bounce = NULL;
        return -1;
    }
    if (r->type == VIRTIO_BLK_T_OUT)
        iov_to_buf(r->data, r->ndata, 0, r->bounce, r->data_len);
    breq->buf = r->bounce;
    return 0;
}

/* A read or a write of the data at sector. Returns a status to answer with, or -1 if
 * submitted. */
static int rw(struct vub_req *r, uint64_t sector)
{
    const struct block_node *root = device_root(r->conn->exp->dev);
    uint32_t align = MAX(root->alignment, 1u);
    uint64_t offset = sector * VIRTIO_BLK_SECTOR_SIZE;
    bool write = r->type == VIRTIO_BLK_T_OUT;

    if (write && !r->conn->exp->writable)
        return VIRTIO_BLK_S_IOERR;
    if (sector > root->size / VIRTIO_BLK_SECTOR_SIZE || r->data_len > root->size - offset ||
        r->data_len % VIRTIO_BLK_SECTOR_SIZE || offset % align || r->data_len % align ||
        r->data_len > VUB_MAX_DATA)
        return VIRTIO_BLK_S_IOERR;
    if (r->data_len == 0)
        return VIRTIO_BLK_S_IOERR;  /* a read or write of nothing: a broken driver */
    struct block_req breq = {.op = write ? BLOCK_OP_WRITE : BLOCK_OP_READ, .offset = offset,
                             .len = r->data_len};
    if (set_data(r, align, &breq) < 0)
        return VIRTIO_BLK_S_IOERR;
    submit(r, breq);
    return -1;
}

/* DISCARD and WRITE_ZEROES: one segment (max_*_seg is 1). */
static int zero(struct vub_req *r)
{
    const struct block_node *root = device_root(r->conn->exp->dev);
    uint64_t align = MAX(root->alignment, 1u);
    struct virtio_blk_discard_write_zeroes seg;
    bool discard = r->type == VIRTIO_BLK_T_DISCARD;

    if (!r->conn->exp->writable || r->data_len != sizeof(seg))
        return VIRTIO_BLK_S_IOERR;
    iov_to_buf(r->data, r->ndata, 0, &seg, sizeof(seg));
    if (seg.flags & ~(discard ? 0u : VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return VIRTIO_BLK_S_UNSUPP;
    uint64_t offset = seg.sector * VIRTIO_BLK_SECTOR_SIZE;
    uint64_t len = (uint64_t)seg.num_sectors * VIRTIO_BLK_SECTOR_SIZE;
    if (seg.sector > root->size / VIRTIO_BLK_SECTOR_SIZE || len > root->size - offset ||
        seg.num_sectors > VUB_MAX_ZERO_SECTORS)
        return VIRTIO_BLK_S_IOERR;
    if (discard) {
        /* As an NBD trim: rounded in to the node's alignment; nothing left is done. */
        uint64_t start = (offset + align - 1) / align * align;
        uint64_t end = (offset + len) / align * align;
        if (end <= start)
            return VIRTIO_BLK_S_OK;
        submit(r, (struct block_req){.op = BLOCK_OP_DISCARD, .offset = start,
                                     .len = end - start});
        return -1;
    }
    if (offset % align || len % align)
        return VIRTIO_BLK_S_IOERR;
    if (len == 0)
        return VIRTIO_BLK_S_OK;
    submit(r, (struct block_req){
        .op = BLOCK_OP_WRITE_ZEROES, .offset = offset, .len = len,
        .flags = seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP ? BLOCK_REQ_MAY_UNMAP : 0});
    return -1;
}

/* GET_ID: the export id, NUL-padded to 20 bytes (not terminated if it is that long). */
static void get_id(struct vub_req *r)
{
    char id[VIRTIO_BLK_ID_BYTES] = {0};
    const char *name = r->conn->exp->id;
    uint64_t n = MIN(r->data_len, (uint64_t)VIRTIO_BLK_ID_BYTES);

    memcpy(id, name, MIN(strlen(name), sizeof(id)));
    iov_from_buf(r->data, r->ndata, 0, id, n);
    complete(r, VIRTIO_BLK_S_OK, n);
}

/* Turn chain e of q into a request: submitted, or answered at once. */
static void handle(struct vub_queue *q, const struct vub_elem *e)
{
    struct vub_req *r = xzalloc(sizeof(*r));
    struct virtio_blk_outhdr hdr;
    uint64_t out_len = 0, in_len = 0;
    bool seen_in = false, ordered = true;
    int st;

    r->conn = q->conn;
    r->q = q;
    r->generation = q->generation;
    r->mem = vub_mem_ref(q->conn->mem);
    r->head = e->head;
    for (unsigned i = 0; i < e->nseg; i++) {
        if (e->segs[i].write) {
            in_len += e->segs[i].len;
            seen_in = true;
        } else {
            out_len += e->segs[i].len;
            ordered = ordered && !seen_in;  /* driver-written before device-written */
        }
    }
    /* The status byte: the last byte the device writes. */
    if (e->nseg && e->segs[e->nseg - 1].write) {
        const struct vub_seg *last = &e->segs[e->nseg - 1];
        r->status = last->p + last->len - 1;
    } else {
        log_debug("vhost-user-blk: %s: queue %u: request without a status byte",
                  q->conn->exp->id, q->index);
        complete(r, 0, 0);
        return;
    }
    if (!ordered || out_len < sizeof(hdr)) {
        complete(r, VIRTIO_BLK_S_IOERR, 0);
        return;
    }
    struct iovec *hs;
    unsigned nh = slice(e, false, 0, sizeof(hdr), &hs);
    iov_to_buf(hs, nh, 0, &hdr, sizeof(hdr));
    free(hs);
    r->type = hdr.type;

    switch (hdr.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_GET_ID:
        /* Nothing the driver wrote past the header: a buffer it meant for the data, but did
         * not mark device-writable, must not be taken for the header's tail. */
        if (out_len != sizeof(hdr)) {
            complete(r, VIRTIO_BLK_S_IOERR, 0);
            return;
        }
        r->data_len = in_len - 1;
        r->ndata = slice(e, true, 0, r->data_len, &r->data);
        break;
    default:
        /* A write's data is the driver's: nothing the device would write but the status. */
        if (in_len != 1 && (hdr.type == VIRTIO_BLK_T_OUT || hdr.type == VIRTIO_BLK_T_DISCARD ||
                            hdr.type == VIRTIO_BLK_T_WRITE_ZEROES)) {
            complete(r, VIRTIO_BLK_S_IOERR, 0);
            return;
        }
        r->data_len = out_len - sizeof(hdr);
        r->ndata = slice(e, false, sizeof(hdr), r->data_len, &r->data);
        break;
    }

    switch (hdr.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        st = rw(r, hdr.sector);
        break;
    case VIRTIO_BLK_T_FLUSH:
        submit(r, (struct block_req){.op = BLOCK_OP_FLUSH});
        st = -1;
        break;
    case VIRTIO_BLK_T_GET_ID:
        get_id(r);
        return;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        st = zero(r);
        break;
    default:
        st = VIRTIO_BLK_S_UNSUPP;
        break;
    }
    if (st >= 0)
        complete(r, (uint8_t)st, 0);
}

static bool runnable(const struct vub_queue *q)
{
    /* Without protocol features a ring is enabled once started (vhost-user.rst, "Ring
     * states"); with them, SET_VRING_ENABLE decides. */
    bool enabled = q->enabled ||
                   !vub_conn_has_feature(q->conn, VHOST_USER_F_PROTOCOL_FEATURES);

    return q->conn->state != VUB_CONN_CLOSED && q->started && enabled && !q->broken &&
           !q->draining && q->desc;
}

static void on_device_accepting(struct dev_waiter *w)
{
    struct vub_conn *c = container_of(w, struct vub_conn, waiter);

    c->waiting = false;
    vub_blk_process_all(c);
}

void vub_blk_process(struct vub_queue *q)
{
    struct vub_conn *c = q->conn;
    struct vub_elem e;

    do {
        while (runnable(q)) {
            if (!device_accepting(c->exp->dev)) {
                /* Stopped: leave the rest in the ring until the device takes requests. */
                if (!c->waiting) {
                    c->waiting = true;
                    c->waiter.fn = on_device_accepting;
                    device_wait(c->exp->dev, &c->waiter);
                }
                return;
            }
            /* Heads the inflight region gave back come first: they were taken first. */
            if (q->resubmit_next < q->nresubmit) {
                if (vub_vq_chain(q, q->resubmit[q->resubmit_next++], &e) < 0)
                    break;
            } else if (vub_vq_pop(q, &e) <= 0) {
                break;
            }
            handle(q, &e);
        }
    } while (runnable(q) && vub_vq_arm_kick(q));
}

void vub_blk_process_all(struct vub_conn *c)
{
    for (unsigned i = 0; c->state != VUB_CONN_CLOSED && i < c->exp->num_queues; i++)
        vub_blk_process(&c->queues[i]);
}

void vub_blk_withdraw(struct vub_queue *q)
{
    struct vub_conn *c = q->conn;
    struct vub_req *r = q->in_device.head;

    while (r) {
        struct vub_req *next = r->next;
        if (device_withdraw(c->exp->dev, &r->dreq)) {
            vub_req_list_remove(&q->in_device, r);
            req_free(r);
            vub_conn_unref(c);
        }
        r = next;
    }
}
