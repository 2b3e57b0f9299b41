/* io_uring on the event loop. See uring.h. */
#include "io/uring.h"

#include <errno.h>
#include <limits.h>
#include <liburing.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "common/assert.h"
#include "common/list.h"
#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"

/* An operation that found no free submission slot: prepared here, copied into the ring
 * when a slot frees up. */
struct backlog {
    struct backlog *next;
    struct io_uring_sqe sqe;
};

DEFINE_QUEUE_TYPE(backlog_queue, struct backlog, next)

struct uring {
    struct loop *loop;
    struct io_uring ring;
    int efd;               /* signalled by the kernel on completions */
    unsigned queued;       /* prepared in the ring, not yet submitted */
    unsigned in_flight;    /* backlog + queued + submitted, not completed */
    backlog_queue backlog;  /* in the order they were queued */
    struct loop_deferred submit_call;  /* deferred_submit(), queued while a submit is due */
    bool reaping;          /* inside reap() */
};

/* Run done() for every completion. A done() may queue more operations (submitted by the
 * deferred call) and, through a full submission queue, come back here: the outer call goes on. */
static void reap(struct uring *u)
{
    struct io_uring_cqe *cqe;

    if (u->reaping)
        return;
    u->reaping = true;
    for (;;) {
        while (io_uring_peek_cqe(&u->ring, &cqe) == 0) {
            struct uring_op *op = io_uring_cqe_get_data(cqe);
            int res = cqe->res;
            io_uring_cqe_seen(&u->ring, cqe);
            u->in_flight--;
            op->done(op, res);
        }
        /* Completions that found the completion queue full wait in the kernel and do not
         * signal the eventfd: bring them in, or their requests would hang. */
        if (!io_uring_cq_has_overflow(&u->ring))
            break;
        io_uring_get_events(&u->ring);
    }
    u->reaping = false;
}

static void on_eventfd(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct uring *u = opaque;
    uint64_t v;

    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        log_warn("io_uring eventfd: %s", strerror(errno));
    reap(u);
}

/* Submit at the end of this callback (once, however many operations are queued). */
static void schedule_submit(struct uring *u)
{
    if (!loop_deferred_queued(&u->submit_call))
        loop_defer(u->loop, &u->submit_call);
}

/* Move backlogged operations into free submission slots, oldest first. */
static void fill_from_backlog(struct uring *u)
{
    struct io_uring_sqe *sqe;

    while (!backlog_queue_empty(&u->backlog) && (sqe = io_uring_get_sqe(&u->ring))) {
        struct backlog *b = backlog_queue_pop(&u->backlog);
        *sqe = b->sqe;
        free(b);
        u->queued++;
    }
}

static void submit(struct uring *u)
{
    for (;;) {
        int r;

        fill_from_backlog(u);
        if (u->queued == 0)
            break;
        r = io_uring_submit(&u->ring);
        if (r < 0) {
            if (r == -EINTR || r == -EAGAIN || r == -EBUSY) {
                /* Completions must be reaped to make room. Inside reap() already, leave the
                 * rest to the deferred submission, after reap() has made room. */
                if (u->reaping) {
                    schedule_submit(u);
                    return;
                }
                reap(u);
                continue;
            }
            log_error("io_uring_submit: %s", strerror(-r));
            abort(); /* the ring is broken: nothing sane is left to do with queued requests */
        }
        u->queued -= (unsigned)r <= u->queued ? (unsigned)r : u->queued;
        if (r == 0)
            break;
    }
}

static void deferred_submit(struct loop *loop, void *opaque)
{
    submit(opaque);
}

/* A submission slot for op: in the ring, or in the backlog when the ring is full and cannot be
 * emptied now (the kernel refuses submissions until completions are reaped, and we are
 * inside reap()). Operations already backlogged go first. */
static struct io_uring_sqe *get_sqe(struct uring *u, struct uring_op *op)
{
    struct io_uring_sqe *sqe = NULL;

    ASSERT(op != NULL && op->done != NULL);
    if (backlog_queue_empty(&u->backlog)) {
        sqe = io_uring_get_sqe(&u->ring);
        if (!sqe) {
            submit(u);
            if (backlog_queue_empty(&u->backlog))
                sqe = io_uring_get_sqe(&u->ring);
        }
    }
    if (sqe) {
        u->queued++;
    } else {
        struct backlog *b = xzalloc(sizeof(*b));
        backlog_queue_push(&u->backlog, b);
        sqe = &b->sqe;
    }
    io_uring_sqe_set_data(sqe, op);
    u->in_flight++;
    schedule_submit(u);
    return sqe;
}

struct uring *uring_new(struct loop *loop, unsigned entries, struct error **errp)
{
    struct uring *u = xzalloc(sizeof(*u));
    struct io_uring_params p = { 0 };
    int r;

    u->loop = loop;
    u->efd = -1;
    u->submit_call = LOOP_DEFERRED_INIT(deferred_submit, u);
    /* A completion queue four times the submission queue: completions are only reaped
     * between loop iterations, and many requests may be in flight at once. */
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = entries * 4;
    r = io_uring_queue_init_params(entries, &u->ring, &p);
    if (r < 0) {
        error_setg_errno(errp, -r, "Cannot set up io_uring");
        free(u);
        return NULL;
    }
    u->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (u->efd < 0 || io_uring_register_eventfd(&u->ring, u->efd) < 0 ||
        loop_add_fd(loop, u->efd, LOOP_READ, on_eventfd, u) < 0) {
        error_setg_errno(errp, errno, "Cannot watch io_uring completions");
        if (u->efd >= 0)
            close(u->efd);
        io_uring_queue_exit(&u->ring);
        free(u);
        return NULL;
    }
    return u;
}

void uring_free(struct uring *u)
{
    struct backlog *b;

    if (!u)
        return;
    while ((b = backlog_queue_pop(&u->backlog)))
        free(b);
    loop_cancel_deferred(u->loop, &u->submit_call);
    loop_del_fd(u->loop, u->efd);
    close(u->efd);
    io_uring_queue_exit(&u->ring);
    free(u);
}

unsigned uring_in_flight(const struct uring *u)
{
    return u->in_flight;
}

/* The kernel reads or writes buf[0..len) at offset, which must fit in off_t. */
static void check_transfer(int fd, const void *buf, uint32_t len, uint64_t offset)
{
    ASSERT(fd >= 0);
    ASSERT(buf != NULL || len == 0);
    ASSERT(offset <= (uint64_t)INT64_MAX - len);
}

void uring_read(struct uring *u, struct uring_op *op, int fd, void *buf, uint32_t len,
                uint64_t offset)
{
    check_transfer(fd, buf, len, offset);
    io_uring_prep_read(get_sqe(u, op), fd, buf, len, offset);
}

void uring_write(struct uring *u, struct uring_op *op, int fd, const void *buf, uint32_t len,
                 uint64_t offset)
{
    check_transfer(fd, buf, len, offset);
    io_uring_prep_write(get_sqe(u, op), fd, buf, len, offset);
}

/* The kernel reads or writes the segments of iov[0..n) at offset. Their total is not bounded
 * here: the kernel transfers at most MAX_RW_COUNT, a short transfer the caller continues. */
static void check_vector(int fd, const struct iovec *iov, unsigned n, uint64_t offset)
{
    ASSERT(fd >= 0);
    ASSERT(iov != NULL && n >= 1 && n <= IOV_MAX);
    ASSERT(offset <= (uint64_t)INT64_MAX);
}

void uring_readv(struct uring *u, struct uring_op *op, int fd, const struct iovec *iov,
                 unsigned n, uint64_t offset)
{
    check_vector(fd, iov, n, offset);
    io_uring_prep_readv(get_sqe(u, op), fd, iov, n, offset);
}

void uring_writev(struct uring *u, struct uring_op *op, int fd, const struct iovec *iov,
                  unsigned n, uint64_t offset)
{
    check_vector(fd, iov, n, offset);
    io_uring_prep_writev(get_sqe(u, op), fd, iov, n, offset);
}

void uring_fdatasync(struct uring *u, struct uring_op *op, int fd)
{
    ASSERT(fd >= 0);
    io_uring_prep_fsync(get_sqe(u, op), fd, IORING_FSYNC_DATASYNC);
}

void uring_fallocate(struct uring *u, struct uring_op *op, int fd, int mode, uint64_t offset,
                     uint64_t len)
{
    ASSERT(fd >= 0);
    ASSERT(offset <= (uint64_t)INT64_MAX && len <= (uint64_t)INT64_MAX - offset);
    io_uring_prep_fallocate(get_sqe(u, op), fd, mode, (off_t)offset, (off_t)len);
}

#ifndef BLOCK_URING_CMD_DISCARD
#define BLOCK_URING_CMD_DISCARD _IO(0x12, 0)  /* linux/fs.h since 6.12 */
#endif

void uring_bdev_discard(struct uring *u, struct uring_op *op, int fd, uint64_t offset,
                        uint64_t len)
{
    struct io_uring_sqe *sqe;

    ASSERT(fd >= 0);
    ASSERT(offset <= (uint64_t)INT64_MAX && len <= (uint64_t)INT64_MAX - offset);
    sqe = get_sqe(u, op);
    io_uring_prep_rw(IORING_OP_URING_CMD, sqe, fd, NULL, 0, 0);
    /* The kernel's blkdev_uring_cmd(): the range in addr and addr3. */
    sqe->cmd_op = BLOCK_URING_CMD_DISCARD;
    sqe->addr = offset;
    sqe->addr3 = len;
}
