#include "vhost-io/memory.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/assert.h"

int vio_mem_init(struct vio_mem *m, uint64_t gpa, uint64_t size, struct error **errp)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    *m = (struct vio_mem){.fd = -1};
    size = (size + page - 1) & ~(page - 1);
    if (size == 0 || gpa + size < gpa) {
        error_setg(errp, "guest memory: bad size %" PRIu64 " at 0x%" PRIx64, size, gpa);
        return -1;
    }
    m->fd = memfd_create("thinblk-vhost-io", MFD_CLOEXEC);
    if (m->fd < 0) {
        error_setg_errno(errp, errno, "memfd_create");
        return -1;
    }
    if (ftruncate(m->fd, (off_t)size) < 0) {
        error_setg_errno(errp, errno, "guest memory: ftruncate");
        vio_mem_destroy(m);
        return -1;
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, m->fd, 0);
    if (p == MAP_FAILED) {
        error_setg_errno(errp, errno, "guest memory: mmap");
        vio_mem_destroy(m);
        return -1;
    }
    m->base = p;
    m->gpa = gpa;
    m->size = size;
    return 0;
}

void vio_mem_destroy(struct vio_mem *m)
{
    if (m->base)
        munmap(m->base, m->size);
    if (m->fd >= 0)
        close(m->fd);
    *m = (struct vio_mem){.fd = -1};
}

void *vio_mem_alloc(struct vio_mem *m, uint64_t len, uint64_t align, uint64_t *gpa)
{
    ASSERT(align && (align & (align - 1)) == 0);
    uint64_t start = (m->used + align - 1) & ~(align - 1);
    if (start > m->size || len > m->size - start)
        return NULL;
    m->used = start + len;
    *gpa = m->gpa + start;
    memset(m->base + start, 0, len);
    return m->base + start;
}

void *vio_mem_ptr(const struct vio_mem *m, uint64_t gpa, uint64_t len)
{
    if (gpa < m->gpa || gpa - m->gpa > m->size || len > m->size - (gpa - m->gpa))
        return NULL;
    return m->base + (gpa - m->gpa);
}

uint64_t vio_mem_gpa(const struct vio_mem *m, const void *p)
{
    const uint8_t *q = p;
    ASSERT(q >= m->base && q <= m->base + m->size);
    return m->gpa + (uint64_t)(q - m->base);
}
