/* Synchronous I/O for open(). See sync-io.h.
 *
 * The file driver's descriptor is its own (file.c); this opens the file again by name. At
 * open time nothing is in flight on a new parent, and the kernel keeps buffered and O_DIRECT
 * access to one file coherent, so the second descriptor sees what the first one would.
 */
#include "block/sync-io.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

/* The file node under n, or NULL with *errp set. */
static struct block_node *file_node(struct block_node *n, struct error **errp)
{
    struct block_node *p = n;

    while (p->drv == &block_driver_fault && p->file)
        p = p->file;
    if (p->drv != &block_driver_file && p->drv != &block_driver_host_device) {
        error_setg(errp, "Node '%s' (driver '%s') cannot hold an image here: use a 'file' or "
                   "'host_device' node", n->node_name, n->drv->name);
        return NULL;
    }
    return p;
}

static int open_file(struct block_node *n, int flags, struct error **errp)
{
    struct block_node *p = file_node(n, errp);
    const char *name;
    int fd;

    if (!p)
        return -1;
    name = p->drv->filename(p);
    fd = open(name, flags | O_CLOEXEC);
    if (fd < 0)
        error_setg_errno(errp, errno, "Could not open '%s'", name);
    return fd;
}

int node_pread_sync(struct block_node *n, void *buf, size_t len, uint64_t offset,
                    struct error **errp)
{
    _cleanup_close_ int fd = open_file(n, O_RDONLY, errp);
    size_t done = 0;

    if (fd < 0)
        return -1;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(offset + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            error_setg_errno(errp, errno, "Could not read image metadata");
            return -1;
        }
        if (r == 0) {
            memset((char *)buf + done, 0, len - done);
            break;
        }
        done += (size_t)r;
    }
    return 0;
}

int node_pwrite_sync(struct block_node *n, const void *buf, size_t len, uint64_t offset,
                     struct error **errp)
{
    _cleanup_close_ int fd = open_file(n, O_WRONLY, errp);
    size_t done = 0;

    if (fd < 0)
        return -1;
    while (done < len) {
        ssize_t r = pwrite(fd, (const char *)buf + done, len - done, (off_t)(offset + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            error_setg_errno(errp, r < 0 ? errno : EIO, "Could not write image metadata");
            return -1;
        }
        done += (size_t)r;
    }
    if (fdatasync(fd) < 0) {
        error_setg_errno(errp, errno, "Could not write image metadata");
        return -1;
    }
    return 0;
}
