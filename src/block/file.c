/* The "file" protocol driver: a regular file or a host block device, through io_uring.
 *
 * Options (QEMU's BlockdevOptionsFile): filename (required), aio ("threads", "native" and
 * "io_uring" are accepted; I/O always goes through io_uring), locking ("auto", "on", "off":
 * accepted, not enforced yet), and the generic cache.direct, discard, read-only.
 *
 * cache.direct=on opens with O_DIRECT where the file system supports it (a block device, ext4,
 * xfs, tmpfs since Linux 6.6) and falls back to buffered I/O, with a note in the log, where it
 * does not; requests are then aligned to the device's logical block size. A read or a write
 * is one vector (a request's buf is its one segment): a transfer that the kernel completes
 * short is continued from where it stopped, in whichever segment, until it is whole or fails:
 * a write either fully happened or reports the errno that stopped it.
 *
 * Write-zeroes and discard, in QEMU's file-posix order (handle_aiocb_write_zeroes[_unmap],
 * handle_aiocb_discard), each a step through io_uring, the next tried where the kernel, the
 * file system or the device refuses one (EOPNOTSUPP, EINVAL, ENODEV, EBUSY):
 *  - write-zeroes that may unmap (BLOCK_REQ_MAY_UNMAP and discard=unmap): PUNCH_HOLE;
 *  - then ZERO_RANGE (zeroed in place, allocated);
 *  - a regular file then PUNCH_HOLE followed by a plain fallocate (a file system without
 *    ZERO_RANGE, such as tmpfs: zeroes, still allocated);
 *  - then zeroes written from memory.
 *  - discard (discard=unmap): PUNCH_HOLE; a refusal means there is nothing to do.
 * A host block device has no ioctl on io_uring (BLKZEROOUT, BLKDISCARD would block the loop),
 * but the block layer maps fallocate on it (Linux 4.9) to the same operations: ZERO_RANGE is
 * BLKZEROOUT (zeroes written by the device or, failing that, by the kernel; never unmapped),
 * PUNCH_HOLE a write-zeroes the device may unmap (never written by the kernel). Its discard
 * is BLKDISCARD's, as io_uring's block discard command (Linux 6.12), PUNCH_HOLE where the
 * kernel or the device has no such command.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/graph.h"
#include "common/iov.h"
#include "common/log.h"
#include "common/util.h"
#include "io/uring.h"
#include "loop/loop.h"

struct file_state {
    int fd;
    char *filename;
    bool is_bdev;
    bool direct;  /* O_DIRECT is in effect */
};

/* One request in flight at the file: a block_req may take several kernel operations. */
struct file_op {
    struct uring_op uop;
    struct loop_deferred done_call;  /* completing without I/O (nop_done()) */
    struct block_node *node;
    struct block_req *req;
    uint64_t done_bytes;  /* READ/WRITE: transferred so far */
    int step;             /* enum file_step */
    /* READ/WRITE: the request's vector, a copy whose transferred bytes are cut off the
     * front: iov[seg..niov) is what is left. */
    unsigned seg, niov;
    struct iovec iov[];
};

/* What a request's operation is doing, beyond its first step: the fallbacks of write-zeroes
 * and discard (see the top), FUA's flush. */
enum file_step {
    STEP_FIRST,        /* the operation; WRITE_ZEROES that may unmap: PUNCH_HOLE */
    STEP_ZERO_RANGE,   /* WRITE_ZEROES */
    STEP_PUNCH,        /* WRITE_ZEROES: then STEP_ALLOCATE; a block device's DISCARD */
    STEP_ALLOCATE,     /* WRITE_ZEROES: fallocate the punched range again */
    STEP_WRITE_ZEROES, /* WRITE_ZEROES: zeroes from memory */
    STEP_FUA,          /* WRITE, WRITE_ZEROES with FUA: fdatasync */
};

static struct file_state *st(struct block_node *n)
{
    return n->opaque;
}

/* The offset and length alignment O_DIRECT needs on this file: what the file system says
 * (statx STATX_DIOALIGN, Linux 6.1), else 4096, which every file system accepts. */
static uint32_t dio_alignment(int fd)
{
    struct statx sx;

    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN) &&
        sx.stx_dio_offset_align > 0)
        return sx.stx_dio_offset_align;  /* buffers are 4096-aligned already */
    return 4096;
}

static const char *const aio_values[] = { "threads", "native", "io_uring", NULL };
static const char *const locking_values[] = { "auto", "on", "off", NULL };

/* QEMU's BlockdevOptionsFile, the part thinblk takes. */
const struct schema_member block_file_options[] = {
    { "filename", SCHEMA_STR },
    { "locking", SCHEMA_ENUM, .optional = true, .values = locking_values },
    { "aio", SCHEMA_ENUM, .optional = true, .values = aio_values },
    { NULL },
};

static int file_open(struct block_node *n, json_t *opts, struct error **errp)
{
    struct file_state *s;
    const char *filename;
    struct stat sb;
    int flags, fd;

    filename = json_string_value(json_object_get(opts, "filename"));
    /* O_NONBLOCK for the open only: a FIFO named here (by a person, or by a qcow2 image as its
     * backing file) must not block the daemon; it is refused below. The flag is cleared before
     * any I/O, as io_uring would otherwise fail reads and writes with EAGAIN. */
    flags = (n->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK;
    bool direct = n->cache_direct;
    fd = open(filename, flags | (direct ? O_DIRECT : 0));
    if (fd < 0 && direct && errno == EINVAL) {
        log_info("%s: O_DIRECT not supported here; using the page cache", filename);
        direct = false;
        fd = open(filename, flags);
    }
    if (fd < 0) {
        error_setg_errno(errp, errno, "Could not open '%s'", filename);
        return -1;
    }
    if (fstat(fd, &sb) < 0) {
        error_setg_errno(errp, errno, "Could not stat '%s'", filename);
        close(fd);
        return -1;
    }

    if ((S_ISREG(sb.st_mode) || S_ISBLK(sb.st_mode)) &&
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
        error_setg_errno(errp, errno, "Could not open '%s'", filename);
        close(fd);
        return -1;
    }

    s = xzalloc(sizeof(*s));
    s->fd = fd;
    s->filename = xstrdup(filename);
    s->direct = direct;
    if (S_ISBLK(sb.st_mode)) {
        uint64_t size;
        int lbs = 512;
        s->is_bdev = true;
        if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
            error_setg_errno(errp, errno, "Could not get the size of '%s'", filename);
            goto fail;
        }
        ioctl(fd, BLKSSZGET, &lbs);
        n->size = size;
        if (direct)
            n->alignment = (uint32_t)lbs;
    } else if (S_ISREG(sb.st_mode)) {
        n->size = (uint64_t)sb.st_size;
        if (direct)
            n->alignment = dio_alignment(fd);
    } else {
        error_setg(errp, "'%s' is not a file", filename);
        goto fail;
    }
    n->opaque = s;
    return 0;
fail:
    close(fd);
    free(s->filename);
    free(s);
    return -1;
}

static void file_close(struct block_node *n)
{
    struct file_state *s = st(n);

    close(s->fd);
    free(s->filename);
    free(s);
}

static void op_finish(struct file_op *op, int ret)
{
    struct block_req *req = op->req;

    free(op);
    req->done(req, ret);
}

static void op_step(struct file_op *op);

/* n more bytes of op's read or write were transferred: cut them off the front of its
 * vector. */
static void advance(struct file_op *op, uint64_t n)
{
    op->done_bytes += n;
    while (n > 0) {
        struct iovec *v = &op->iov[op->seg];
        uint64_t k = MIN(n, v->iov_len);
        v->iov_base = (char *)v->iov_base + k;
        v->iov_len -= k;
        n -= k;
        if (v->iov_len == 0)
            op->seg++;
    }
}

/* op's step was refused with res: move op to the next way of doing it (see the top), or
 * return false if there is none. */
static bool fall_back(struct file_op *op, int res)
{
    if (res != -EOPNOTSUPP && res != -EINVAL && res != -ENODEV && res != -EBUSY)
        return false;
    switch (op->req->op) {
    case BLOCK_OP_WRITE_ZEROES:
        if (op->step == STEP_ZERO_RANGE && st(op->node)->is_bdev)
            op->step = STEP_WRITE_ZEROES;  /* ZERO_RANGE was BLKZEROOUT: QEMU writes next */
        else if (op->step == STEP_PUNCH || op->step == STEP_ALLOCATE)
            op->step = STEP_WRITE_ZEROES;
        else if (op->step < STEP_WRITE_ZEROES)
            op->step++;
        else
            return false;
        return true;
    case BLOCK_OP_DISCARD:
        if (op->step != STEP_FIRST || !st(op->node)->is_bdev)
            return false;
        op->step = STEP_PUNCH;
        return true;
    default:
        return false;
    }
}

static void op_done(struct uring_op *uop, int res)
{
    struct file_op *op = container_of(uop, struct file_op, uop);
    struct block_req *req = op->req;

    if (res < 0) {
        if (res == -EINTR || res == -EAGAIN || fall_back(op, res)) {
            op_step(op);  /* transient: the same step again; refused: the next one */
            return;
        }
        /* DISCARD is advisory: storage that cannot deallocate has nothing to do. */
        if (req->op == BLOCK_OP_DISCARD && (res == -EOPNOTSUPP || res == -ENODEV))
            res = 0;
        else {
            op_finish(op, res);
            return;
        }
    }
    switch (req->op) {
    case BLOCK_OP_READ:
        if (res == 0) {
            /* Past the end of a file that shrank under us: reads as zeroes, as QEMU's. */
            iov_memset(op->iov + op->seg, op->niov - op->seg, 0, 0, req->len - op->done_bytes);
            op->done_bytes = req->len;
        }
        advance(op, (uint64_t)res);
        if (op->done_bytes < req->len) {
            op_step(op);
            return;
        }
        break;
    case BLOCK_OP_WRITE:
        if (op->step == STEP_FIRST) {
            advance(op, (uint64_t)res);
            if (res == 0) {
                op_finish(op, -EIO);  /* the kernel made no progress and gave no reason */
                return;
            }
            if (op->done_bytes < req->len) {
                op_step(op);
                return;
            }
            if (req->flags & BLOCK_REQ_FUA) {
                op->step = STEP_FUA;
                op_step(op);
                return;
            }
        }
        break;
    case BLOCK_OP_WRITE_ZEROES:
        if (op->step == STEP_PUNCH) {
            op->step = STEP_ALLOCATE;
            op_step(op);
            return;
        }
        if (op->step == STEP_WRITE_ZEROES) {
            op->done_bytes += (uint64_t)res;
            if (res == 0) {
                op_finish(op, -EIO);
                return;
            }
            if (op->done_bytes < req->len) {
                op_step(op);
                return;
            }
        }
        if (op->step != STEP_FUA && (req->flags & BLOCK_REQ_FUA)) {
            op->step = STEP_FUA;
            op_step(op);
            return;
        }
        break;
    default:
        break;
    }
    op_finish(op, 0);
}

#define ZERO_CHUNK (1u << 20)

/* ZERO_CHUNK bytes of zeroes, aligned for O_DIRECT, made once and only ever read: the
 * writes of every write-zeroes the file system cannot zero in place. */
static const void *zeroes(void)
{
    static void *z;

    if (!z && posix_memalign(&z, 4096, ZERO_CHUNK) == 0)
        memset(z, 0, ZERO_CHUNK);
    return z;
}

/* Read or write what is left of op's vector: one segment with a plain read or write, several
 * (up to IOV_MAX at once) with readv or writev. */
static void transfer(struct file_op *op, int fd)
{
    struct uring *u = op->node->graph->uring;
    const struct iovec *v = &op->iov[op->seg];
    unsigned n = MIN(op->niov - op->seg, (unsigned)IOV_MAX);
    uint64_t offset = op->req->offset + op->done_bytes;
    bool write = op->req->op == BLOCK_OP_WRITE;

    if (n == 1) {
        uint32_t chunk = (uint32_t)MIN(v->iov_len, 1u << 30);
        if (write)
            uring_write(u, &op->uop, fd, v->iov_base, chunk, offset);
        else
            uring_read(u, &op->uop, fd, v->iov_base, chunk, offset);
    } else if (write) {
        uring_writev(u, &op->uop, fd, v, n, offset);
    } else {
        uring_readv(u, &op->uop, fd, v, n, offset);
    }
}

/* Write-zeroes' step op->step (see the top). */
static void zero_step(struct file_op *op)
{
    struct block_node *n = op->node;
    struct file_state *s = st(n);
    struct uring *u = n->graph->uring;
    struct block_req *req = op->req;
    const int punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;

    if (op->step == STEP_FIRST && !((req->flags & BLOCK_REQ_MAY_UNMAP) && n->discard_unmap))
        op->step = STEP_ZERO_RANGE;
    switch (op->step) {
    case STEP_FIRST:
    case STEP_PUNCH:
        uring_fallocate(u, &op->uop, s->fd, punch, req->offset, req->len);
        break;
    case STEP_ZERO_RANGE:
        uring_fallocate(u, &op->uop, s->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                        req->offset, req->len);
        break;
    case STEP_ALLOCATE:
        uring_fallocate(u, &op->uop, s->fd, FALLOC_FL_KEEP_SIZE, req->offset, req->len);
        break;
    default: {
        uint32_t chunk = (uint32_t)MIN(req->len - op->done_bytes, ZERO_CHUNK);
        if (!zeroes()) {
            op_finish(op, -ENOMEM);
            return;
        }
        uring_write(u, &op->uop, s->fd, zeroes(), chunk, req->offset + op->done_bytes);
        break;
    }
    }
}

static void op_step(struct file_op *op)
{
    struct block_node *n = op->node;
    struct file_state *s = st(n);
    struct uring *u = n->graph->uring;
    struct block_req *req = op->req;

    if (op->step == STEP_FUA) {
        uring_fdatasync(u, &op->uop, s->fd);
        return;
    }
    switch (req->op) {
    case BLOCK_OP_READ:
    case BLOCK_OP_WRITE:
        transfer(op, s->fd);
        break;
    case BLOCK_OP_FLUSH:
        uring_fdatasync(u, &op->uop, s->fd);
        break;
    case BLOCK_OP_DISCARD:
        if (s->is_bdev && op->step == STEP_FIRST)
            uring_bdev_discard(u, &op->uop, s->fd, req->offset, req->len);
        else
            uring_fallocate(u, &op->uop, s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                            req->offset, req->len);
        break;
    case BLOCK_OP_WRITE_ZEROES:
        zero_step(op);
        break;
    }
}

/* A request with nothing to do, completed as an operation with res 0 would be. */
static void nop_done(struct loop *loop, void *opaque)
{
    struct file_op *op = opaque;

    op_done(&op->uop, 0);
}

static void file_submit(struct block_node *n, struct block_req *req)
{
    bool rw = req->op == BLOCK_OP_READ || req->op == BLOCK_OP_WRITE;
    struct iovec one;
    unsigned niov = 0;
    const struct iovec *iov = rw ? block_req_iov(req, &one, &niov) : NULL;
    struct file_op *op = xzalloc(sizeof(*op) + niov * sizeof(op->iov[0]));

    if (niov)
        memcpy(op->iov, iov, niov * sizeof(op->iov[0]));
    op->niov = niov;

    op->uop.done = op_done;
    op->node = n;
    op->req = req;
    if ((req->op == BLOCK_OP_DISCARD && !n->discard_unmap) ||
        (req->op == BLOCK_OP_FLUSH && n->no_flush)) {
        /* discard=ignore, cache.no-flush=on: nothing to do, but done() still comes later,
         * never inside node_submit(). */
        op->done_call = LOOP_DEFERRED_INIT(nop_done, op);
        loop_defer(n->graph->loop, &op->done_call);
        return;
    }
    op_step(op);
}

static int64_t file_allocated(struct block_node *n)
{
    struct stat sb;

    if (st(n)->is_bdev)
        return 0;  /* QEMU reports 0 for a host device too */
    if (fstat(st(n)->fd, &sb) < 0)
        return -1;
    return (int64_t)sb.st_blocks * 512;
}

void file_node_refresh_size(struct block_node *n)
{
    struct file_state *s = st(n);
    struct stat sb;
    uint64_t size;

    /* Metadata the kernel has at hand: no I/O to wait for, as file_allocated(). */
    if (s->is_bdev) {
        if (ioctl(s->fd, BLKGETSIZE64, &size) == 0)
            block_node_set_size(n, size);
    } else if (fstat(s->fd, &sb) == 0) {
        block_node_set_size(n, (uint64_t)sb.st_size);
    }
}

/* A host block device can be extended while open (lvextend, a loop device's new capacity):
 * queries report its size now, so management sees the extension without a restart. Writes
 * past the old end need nothing: the kernel checks them against the device's current size.
 * A regular file keeps the size it had when opened (or created: file_node_refresh_size()), or
 * was resized to. */
static void file_refresh_size(struct block_node *n)
{
    if (st(n)->is_bdev)
        file_node_refresh_size(n);
}

/* QEMU's raw_co_truncate() without preallocation: a regular file is cut or extended (sparse);
 * a device cannot grow, and a smaller size leaves it as it is (its size is the device's). */
static int file_truncate(struct block_node *n, uint64_t size, struct error **errp)
{
    struct file_state *s = st(n);

    if (s->is_bdev) {
        file_node_refresh_size(n);
        if (size > n->size) {
            error_setg(errp, "Cannot grow device files");
            return -1;
        }
        return 0;
    }
    if (ftruncate(s->fd, (off_t)size) < 0) {
        error_setg_errno(errp, errno, "Could not resize file");
        return -1;
    }
    block_node_set_size(n, size);
    return 0;
}

/* Where the data and the holes are: SEEK_DATA, then SEEK_HOLE, the extent at offset in two
 * calls. Metadata the file system has at hand, as fstat(): the loop does not wait on I/O.
 * As QEMU's file-posix: a hole, and what lies past the end (ENXIO), read as zeroes; where
 * lseek cannot tell, everything is data. Not the cached size: the file grows under a format
 * driver. */
static void seek_extent(int fd, struct block_status_call *c)
{
    off_t start = (off_t)c->offset;
    off_t data = lseek(fd, start, SEEK_DATA);
    off_t hole = data == start ? lseek(fd, start, SEEK_HOLE) : -1;

    c->flags = BLOCK_STATUS_DATA;
    c->pnum = c->len;
    if (data < 0 && errno == ENXIO) {
        c->flags = BLOCK_STATUS_ZERO;  /* a trailing hole, or past the end */
    } else if (data > start) {
        c->flags = BLOCK_STATUS_ZERO;
        c->pnum = MIN(c->len, (uint64_t)(data - start));
    } else if (data == start && hole > start) {
        c->pnum = MIN(c->len, (uint64_t)(hole - start));
    }
}

/* A host device holds data everywhere, as far as lseek tells (Linux answers every offset of
 * a block device as data); a regular file: seek_extent(). */
static int file_block_status(struct block_node *n, struct block_status_call *c)
{
    struct file_state *s = st(n);

    if (c->want_zero && !s->is_bdev) {
        seek_extent(s->fd, c);
    } else {
        c->flags = BLOCK_STATUS_DATA;
        c->pnum = c->len;
    }
    c->flags |= BLOCK_STATUS_OFFSET_VALID;
    c->map = c->offset;
    c->file = n;
    return 0;
}

static const char *file_filename(struct block_node *n)
{
    return st(n)->filename;
}

const struct block_driver block_driver_host_device = {
    .name = "host_device",
    .open = file_open,
    .close = file_close,
    .submit = file_submit,
    .allocated = file_allocated,
    .filename = file_filename,
    .refresh_size = file_refresh_size,
    .truncate = file_truncate,
    .block_status = file_block_status,
};

const struct block_driver block_driver_file = {
    .name = "file",
    .open = file_open,
    .close = file_close,
    .submit = file_submit,
    .allocated = file_allocated,
    .filename = file_filename,
    .refresh_size = file_refresh_size,
    .truncate = file_truncate,
    .block_status = file_block_status,
};
