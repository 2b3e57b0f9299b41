/* Asynchronous file I/O on the event loop, through io_uring (liburing).
 *
 * One ring per loop. Operations are queued with uring_*() and submitted together at the end of
 * the loop iteration (one io_uring_submit() for a whole batch of NBD requests); completions
 * arrive through an eventfd watched by the loop, and each operation's done() runs on the loop
 * thread, never inside the uring_*() call that queued it. Nothing here blocks.
 */
#ifndef THINBLK_IO_URING_H
#define THINBLK_IO_URING_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "common/error.h"

struct loop;
struct uring;

/* An operation in flight. Embed it in the caller's request; it must stay valid until done()
 * is called with res: bytes transferred (>= 0) or -errno. */
struct uring_op {
    void (*done)(struct uring_op *op, int res);
};

/* A ring of entries slots on loop. Returns NULL with *errp set (e.g. io_uring disabled). */
struct uring *uring_new(struct loop *loop, unsigned entries, struct error **errp);
/* Free the ring. No operation may be in flight. */
void uring_free(struct uring *u);

/* The operations below check their arguments (ASSERT, common/assert.h: in every build): op and
 * op->done set, fd >= 0, a buffer for any bytes, offset + len within off_t. To complete
 * something without I/O, off the caller's stack, use loop_defer(). */
void uring_read(struct uring *u, struct uring_op *op, int fd, void *buf, uint32_t len,
                uint64_t offset);
void uring_write(struct uring *u, struct uring_op *op, int fd, const void *buf, uint32_t len,
                 uint64_t offset);
/* preadv/pwritev: iov[0..n) (1 <= n <= IOV_MAX), which must stay valid until done(), as the
 * bytes. */
void uring_readv(struct uring *u, struct uring_op *op, int fd, const struct iovec *iov,
                 unsigned n, uint64_t offset);
void uring_writev(struct uring *u, struct uring_op *op, int fd, const struct iovec *iov,
                  unsigned n, uint64_t offset);
/* fdatasync(fd) */
void uring_fdatasync(struct uring *u, struct uring_op *op, int fd);
/* fallocate(fd, mode, offset, len) */
void uring_fallocate(struct uring *u, struct uring_op *op, int fd, int mode, uint64_t offset,
                     uint64_t len);
/* Discard [offset, offset + len) of block device fd: BLKDISCARD's operation, as io_uring's
 * BLOCK_URING_CMD_DISCARD (Linux 6.12), not the ioctl, which would block the loop. res 0 or
 * -errno; -EOPNOTSUPP where the kernel lacks the command or the device cannot discard. */
void uring_bdev_discard(struct uring *u, struct uring_op *op, int fd, uint64_t offset,
                        uint64_t len);

/* Operations queued or in flight. */
unsigned uring_in_flight(const struct uring *u);

#endif
