/* The split virtqueue (virtio 1.2, 2.7), walked from the device's side.
 *
 * The rings live in guest memory the guest writes concurrently: every index and descriptor is
 * read once into a local copy and checked there, and every address goes through the memory
 * table (memory.c). A guest that breaks the ring's rules (an avail index running more than the
 * ring ahead, a head or next index past the ring, a loop, a chain longer than the ring, a
 * nested or misaligned indirect table, a buffer outside memory) gets the ring marked broken:
 * it is no longer processed, the error eventfd is signalled, and nothing outside mapped memory
 * is ever touched. Request-level problems (a short header, no status byte) are blk.c's.
 */
#include <inttypes.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vhost-user-blk/internal.h"

static void signal_fd(int fd)
{
    uint64_t one = 1;

    if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
        /* EAGAIN: the counter is already signalled, which is all we want. */
    }
}

void vub_vq_break(struct vub_queue *q, const char *why)
{
    if (!q->broken)
        log_warn("vhost-user-blk: %s: queue %u: %s; the queue is stopped",
                 q->conn->exp ? q->conn->exp->id : "?", q->index, why);
    q->broken = true;
    signal_fd(q->err_fd);
}

static bool event_idx(const struct vub_queue *q)
{
    return vub_conn_has_feature(q->conn, VIRTIO_RING_F_EVENT_IDX);
}

int vub_vq_map(struct vub_queue *q)
{
    struct vub_mem *m = q->conn->mem;
    uint64_t n = q->num;
    size_t ev = event_idx(q) ? 2 : 0;

    q->desc = NULL;
    q->avail = NULL;
    q->used = NULL;
    if (!q->addr_set || n == 0 || !m)
        return -1;
    if (q->addr.desc_user_addr % 16 || q->addr.avail_user_addr % 2 || q->addr.used_user_addr % 4)
        return -1;
    q->desc = vub_mem_qva(m, q->addr.desc_user_addr, n * sizeof(struct vring_desc));
    q->avail = vub_mem_qva(m, q->addr.avail_user_addr, 4 + 2 * n + ev);
    q->used = vub_mem_qva(m, q->addr.used_user_addr, 4 + 8 * n + ev);
    if (!q->desc || !q->avail || !q->used) {
        q->desc = NULL;
        q->avail = NULL;
        q->used = NULL;
        return -1;
    }
    return 0;
}

static uint16_t load16(const uint16_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static void store16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

/* Copy descriptor i of table (of n) into *d. */
static void read_desc(const struct vring_desc *table, unsigned i, struct vring_desc *d)
{
    /* One copy, then only the copy is looked at: the guest may change the table meanwhile. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    *d = ((const volatile struct vring_desc *)table)[i];
}

/* Add the buffer of d to e. Returns 0, or -1 with *why. */
static int add_seg(struct vub_queue *q, struct vub_elem *e, const struct vring_desc *d,
                   const char **why)
{
    if (e->nseg >= VUB_MAX_SEGS) {
        *why = "descriptor chain too long";
        return -1;
    }
    if (d->len == 0)
        return 0;  /* nothing to transfer; allowed */
    void *p = vub_mem_gpa(q->conn->mem, d->addr, d->len);
    if (!p) {
        *why = "buffer outside guest memory";
        return -1;
    }
    e->segs[e->nseg++] = (struct vub_seg){
        .p = p, .len = d->len, .write = (d->flags & VRING_DESC_F_WRITE) != 0,
    };
    return 0;
}

/* Walk the indirect table that d points to. */
static int walk_indirect(struct vub_queue *q, struct vub_elem *e, const struct vring_desc *d,
                         const char **why)
{
    struct vring_desc x;
    unsigned n, i, count = 0;

    if (!vub_conn_has_feature(q->conn, VIRTIO_RING_F_INDIRECT_DESC)) {
        *why = "indirect descriptor not negotiated";
        return -1;
    }
    /* No chain longer than the queue (2.7.5.3.1), indirect or not. */
    if (d->len == 0 || d->len % sizeof(struct vring_desc) ||
        d->len / sizeof(struct vring_desc) > MIN((unsigned)VUB_MAX_SEGS, q->num) ||
        (d->flags & VRING_DESC_F_NEXT)) {
        *why = "invalid indirect descriptor";
        return -1;
    }
    n = d->len / sizeof(struct vring_desc);
    const struct vring_desc *table = vub_mem_gpa(q->conn->mem, d->addr, d->len);
    if (!table || d->addr % 16) {
        *why = "indirect table outside guest memory or misaligned";
        return -1;
    }
    for (i = 0;;) {
        if (++count > n) {
            *why = "loop in an indirect table";
            return -1;
        }
        read_desc(table, i, &x);
        if (x.flags & VRING_DESC_F_INDIRECT) {
            *why = "nested indirect descriptor";
            return -1;
        }
        if (add_seg(q, e, &x, why) < 0)
            return -1;
        if (!(x.flags & VRING_DESC_F_NEXT))
            return 0;
        if (x.next >= n) {
            *why = "next index past the indirect table";
            return -1;
        }
        i = x.next;
    }
}

/* Walk the chain at head into *e. Returns 0, or -1 with *why. */
static int walk_chain(struct vub_queue *q, uint16_t head, struct vub_elem *e, const char **why)
{
    struct vring_desc d;
    unsigned count = 0;

    e->head = head;
    e->nseg = 0;
    e->segs = q->conn->scratch;
    for (unsigned i = head;;) {
        if (++count > q->num) {
            *why = "descriptor chain longer than the ring (a loop)";
            return -1;
        }
        read_desc(q->desc, i, &d);
        if (d.flags & VRING_DESC_F_INDIRECT) {
            /* An indirect descriptor is the chain's only one (2.7.5.3.1). */
            if (count != 1) {
                *why = "indirect descriptor inside a chain";
                return -1;
            }
            return walk_indirect(q, e, &d, why);
        }
        if (add_seg(q, e, &d, why) < 0)
            return -1;
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        if (d.next >= q->num) {
            *why = "next index past the ring";
            return -1;
        }
        i = d.next;
    }
}

int vub_vq_chain(struct vub_queue *q, uint16_t head, struct vub_elem *e)
{
    const char *why = NULL;

    if (q->broken || !q->desc)
        return -1;
    if (head >= q->num) {
        vub_vq_break(q, "head index past the ring");
        return -1;
    }
    if (walk_chain(q, head, e, &why) < 0) {
        vub_vq_break(q, why);
        return -1;
    }
    return 1;
}

int vub_vq_pop(struct vub_queue *q, struct vub_elem *e)
{
    if (q->broken || !q->desc)
        return 0;
    uint16_t avail_idx = load16(&q->avail->idx);
    uint16_t pending = (uint16_t)(avail_idx - q->last_avail_idx);
    if (pending == 0)
        return 0;
    if (pending > q->num) {
        vub_vq_break(q, "avail index ran more than the ring ahead");
        return -1;
    }
    /* The entries were written before the index: read them after it. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint16_t head = load16(&q->avail->ring[q->last_avail_idx % q->num]);
    if (vub_vq_chain(q, head, e) < 0)
        return -1;
    q->last_avail_idx++;
    vub_inflight_take(q, head);
    return 1;
}

/* virtio 1.2, 2.7.10's vring_need_event(). */
static bool need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

void vub_vq_push(struct vub_queue *q, uint16_t head, uint32_t len)
{
    uint16_t old = q->used_idx;
    struct vring_used_elem *u = &q->used->ring[old % q->num];
    bool notify;

    vub_inflight_put_begin(q, head);
    __atomic_store_n(&u->id, head, __ATOMIC_RELAXED);
    __atomic_store_n(&u->len, len, __ATOMIC_RELAXED);
    /* The entry (and the data and status before it) before the index. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q->used_idx = (uint16_t)(old + 1);
    store16(&q->used->idx, q->used_idx);
    vub_inflight_put_end(q, head);
    /* The index before reading what the driver wants notified. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (event_idx(q))
        notify = need_event(load16(&q->avail->ring[q->num]), q->used_idx, old);
    else
        notify = !(load16(&q->avail->flags) & VRING_AVAIL_F_NO_INTERRUPT);
    if (notify)
        signal_fd(q->call_fd);
}

bool vub_vq_arm_kick(struct vub_queue *q)
{
    if (!event_idx(q) || q->broken || !q->desc)
        return false;
    /* used->ring[num] is avail_event: kick us once the driver makes last_avail_idx available. */
    store16((uint16_t *)&q->used->ring[q->num], q->last_avail_idx);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load16(&q->avail->idx) != q->last_avail_idx;
}
