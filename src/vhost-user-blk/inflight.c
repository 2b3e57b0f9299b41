/* Inflight I/O tracking (vhost-user.rst, "Inflight I/O tracking"; split virtqueues).
 *
 * The front-end asks us for a region (GET_INFLIGHT_FD), keeps its fd, and hands it back on
 * every start (SET_INFLIGHT_FD), including to a new thinblkd after this one died. In it we
 * mark each head taken from a ring (inflight = 1, with a counter giving the order) and clear
 * it once the head is on the used ring. When the ring starts again, the heads still marked
 * were taken and never answered: they are handled again, in the order they were taken, and
 * the ring goes on past them. So a guest writing through `kill -9 thinblkd` and a restart
 * loses nothing; a request that had reached storage before the crash is written again, with
 * the same data (the guest was never told it completed, so nothing it did depends on it).
 *
 * Pushing one head: (1) link it as the last batch (next, last_batch_head), (2) fill the used
 * entry and the used index, (3) clear its inflight mark, (4) copy the used index into the
 * region. A crash between (2) and (4) leaves the region's used index behind the ring's: the
 * last batch's head is on the used ring already, and its mark is cleared at restart.
 *
 * The region is shared with a front-end we do not trust: every index read from it is checked
 * against the ring, the fd must be a memfd sealed against shrinking (ours are), so the mapping
 * can never turn into SIGBUS under us, and a region that does not fit is reset, not followed.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vhost-user-blk/internal.h"

#define REGION_ALIGN 64u

static size_t queue_region_size(uint16_t queue_size)
{
    size_t n = sizeof(struct vhost_inflight_queue) +
               (size_t)queue_size * sizeof(struct vhost_inflight_desc);
    return (n + REGION_ALIGN - 1) / REGION_ALIGN * REGION_ALIGN;
}

static bool shape_ok(const struct vhost_user_inflight *req)
{
    return req->num_queues > 0 && req->queue_size > 0 && req->queue_size <= VIRTQUEUE_MAX_SIZE;
}

static void reset_queue(struct vhost_inflight_queue *f, uint16_t queue_size)
{
    memset(f, 0, queue_region_size(queue_size));
    f->version = 1;
    f->desc_num = queue_size;
}

int vub_inflight_new(struct vhost_user_inflight *req, struct vub_inflight *inf)
{
    if (!shape_ok(req)) {
        log_warn("vhost-user-blk: GET_INFLIGHT_FD for %u queues of %u", req->num_queues,
                 req->queue_size);
        return -1;
    }
    size_t qsize = queue_region_size(req->queue_size);
    size_t size = qsize * req->num_queues;
    int fd = memfd_create("thinblk-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, (off_t)size) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        log_warn("vhost-user-blk: cannot make an inflight region: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        log_warn("vhost-user-blk: cannot map an inflight region: %s", strerror(errno));
        close(fd);
        return -1;
    }
    for (unsigned i = 0; i < req->num_queues; i++)
        reset_queue((struct vhost_inflight_queue *)((char *)map + i * qsize), req->queue_size);
    vub_inflight_unmap(inf);
    *inf = (struct vub_inflight){
        .map = map, .size = size, .num_queues = req->num_queues, .queue_size = req->queue_size,
    };
    req->mmap_size = size;
    req->mmap_offset = 0;
    return fd;
}

int vub_inflight_map(const struct vhost_user_inflight *req, int fd, struct vub_inflight *inf)
{
    const char *why = NULL;
    struct stat st;
    int seals;

    if (!shape_ok(req) ||
        req->mmap_size != queue_region_size(req->queue_size) * req->num_queues)
        why = "its size does not match its queues";
    else if (req->mmap_offset % (uint64_t)sysconf(_SC_PAGESIZE))
        why = "its offset is not page-aligned";
    else if ((seals = fcntl(fd, F_GET_SEALS)) < 0 || !(seals & F_SEAL_SHRINK))
        why = "it is not a memfd sealed against shrinking";
    else if (fstat(fd, &st) < 0 || (uint64_t)st.st_size < req->mmap_offset ||
             (uint64_t)st.st_size - req->mmap_offset < req->mmap_size)
        why = "the file is smaller than the region";
    if (why) {
        log_warn("vhost-user-blk: SET_INFLIGHT_FD refused: %s", why);
        close(fd);
        return -1;
    }
    void *map = mmap(NULL, req->mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                     (off_t)req->mmap_offset);
    close(fd);
    if (map == MAP_FAILED) {
        log_warn("vhost-user-blk: cannot map the inflight region: %s", strerror(errno));
        return -1;
    }
    vub_inflight_unmap(inf);
    *inf = (struct vub_inflight){
        .map = map, .size = req->mmap_size, .num_queues = req->num_queues,
        .queue_size = req->queue_size,
    };
    return 0;
}

void vub_inflight_unmap(struct vub_inflight *inf)
{
    if (inf->map)
        munmap(inf->map, inf->size);
    *inf = (struct vub_inflight){0};
}

/* Heads in the order they were taken. */
struct taken {
    uint64_t counter;
    uint16_t head;
};

static int by_counter(const void *a, const void *b)
{
    const struct taken *x = a, *y = b;

    return x->counter < y->counter ? -1 : x->counter > y->counter;
}

void vub_inflight_stop(struct vub_queue *q)
{
    free(q->resubmit);
    q->resubmit = NULL;
    q->nresubmit = q->resubmit_next = 0;
    q->inflight = NULL;
    q->inflight_counter = 0;
}

void vub_inflight_start(struct vub_queue *q)
{
    const struct vub_inflight *inf = &q->conn->inflight;
    struct vhost_inflight_queue *f;

    vub_inflight_stop(q);
    if (!inf->map || q->index >= inf->num_queues || !q->used)
        return;
    if (inf->queue_size != q->num) {
        log_warn("vhost-user-blk: %s: queue %u: inflight region for %u entries, ring of %u: "
                 "not tracked", q->conn->exp->id, q->index, inf->queue_size, q->num);
        return;
    }
    f = (struct vhost_inflight_queue *)((char *)inf->map +
                                        q->index * queue_region_size(inf->queue_size));
    if (f->version != 1 || f->desc_num != q->num) {
        log_warn("vhost-user-blk: %s: queue %u: inflight region not ours (version %u, %u "
                 "entries): reset", q->conn->exp->id, q->index, f->version, f->desc_num);
        reset_queue(f, q->num);
    }
    q->inflight = f;

    uint16_t used = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    if (f->used_idx != used) {
        /* Stopped between the used index and the region's copy of it: the last head pushed
         * is on the used ring. */
        uint16_t last = f->last_batch_head;
        if (last < q->num)
            f->desc[last].inflight = 0;
        f->used_idx = used;
    }

    struct taken *t = xmalloc(sizeof(*t) * q->num);
    unsigned n = 0;
    for (unsigned i = 0; i < q->num; i++) {
        if (f->desc[i].inflight) {
            t[n].head = (uint16_t)i;
            t[n].counter = f->desc[i].counter;
            n++;
        }
    }
    qsort(t, n, sizeof(*t), by_counter);
    q->used_idx = used;
    q->last_avail_idx = (uint16_t)(used + n);
    if (n) {
        q->resubmit = xmalloc(sizeof(*q->resubmit) * n);
        q->nresubmit = n;
        for (unsigned i = 0; i < n; i++)
            q->resubmit[i] = t[i].head;
        q->inflight_counter = t[n - 1].counter + 1;
        log_warn("vhost-user-blk: %s: queue %u: %u request%s taken before the restart and "
                 "never answered: handled again", q->conn->exp->id, q->index, n,
                 n == 1 ? "" : "s");
    }
    free(t);
}

void vub_inflight_take(struct vub_queue *q, uint16_t head)
{
    struct vhost_inflight_queue *f = q->inflight;

    if (!f)
        return;
    f->desc[head].counter = q->inflight_counter++;
    /* The counter before the mark: a mark always has its order. */
    __atomic_store_n(&f->desc[head].inflight, 1, __ATOMIC_RELEASE);
}

void vub_inflight_put_begin(struct vub_queue *q, uint16_t head)
{
    struct vhost_inflight_queue *f = q->inflight;

    if (!f)
        return;
    f->desc[head].next = f->last_batch_head;
    __atomic_store_n(&f->last_batch_head, head, __ATOMIC_RELEASE);
}

void vub_inflight_put_end(struct vub_queue *q, uint16_t head)
{
    struct vhost_inflight_queue *f = q->inflight;

    if (!f)
        return;
    __atomic_store_n(&f->desc[head].inflight, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&f->used_idx, q->used_idx, __ATOMIC_RELEASE);
}
