/* The guest's memory as SET_MEM_TABLE describes it: regions of shared memory (fds) mapped here,
 * and every guest address a request or a ring names translated and bounds-checked against them.
 * A guest address that is not wholly inside one region is refused (NULL), never followed. */
#include <inttypes.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vhost-user-blk/internal.h"

static void unmap_all(struct vub_mem *m)
{
    for (unsigned i = 0; i < m->n; i++)
        munmap(m->r[i].map, m->r[i].map_len);
    m->n = 0;
}

struct vub_mem *vub_mem_new(const struct vhost_user_memory *msg, int *fds, unsigned nfds)
{
    struct vub_mem *m = xzalloc(sizeof(*m));
    unsigned i;

    m->refs = 1;
    if (msg->nregions == 0 || msg->nregions > VHOST_MEMORY_BASELINE_NREGIONS ||
        msg->nregions != nfds) {
        log_warn("vhost-user-blk: memory table of %" PRIu32 " regions with %u fds",
                 msg->nregions, nfds);
        goto fail;
    }
    for (i = 0; i < msg->nregions; i++) {
        const struct vhost_user_memory_region *r = &msg->regions[i];
        uint64_t len = r->mmap_offset + r->memory_size;

        if (r->memory_size == 0 || len < r->mmap_offset || len > SIZE_MAX ||
            r->guest_phys_addr + r->memory_size < r->guest_phys_addr ||
            r->userspace_addr + r->memory_size < r->userspace_addr) {
            log_warn("vhost-user-blk: invalid memory region %u", i);
            goto fail;
        }
        /* A mapping past the end of its file maps, but touching that part raises SIGBUS:
         * a frontend's region larger than its fd would kill the daemon. */
        struct stat st;
        if (fstat(fds[i], &st) < 0 || (S_ISREG(st.st_mode) && (uint64_t)st.st_size < len)) {
            log_warn("vhost-user-blk: memory region %u (%" PRIu64 " bytes) past the end of "
                     "its file", i, len);
            goto fail;
        }
        void *p = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                       fds[i], 0);
        if (p == MAP_FAILED) {
            log_warn("vhost-user-blk: cannot map memory region %u (%" PRIu64 " bytes): %m", i,
                     len);
            goto fail;
        }
        m->r[i] = (struct vub_region){
            .gpa = r->guest_phys_addr, .size = r->memory_size, .qva = r->userspace_addr,
            .host = (uint8_t *)p + r->mmap_offset, .map = p, .map_len = (size_t)len,
        };
        m->n = i + 1;
    }
    for (i = 0; i < nfds; i++)
        close(fds[i]);
    return m;
fail:
    for (i = 0; i < nfds; i++)
        close(fds[i]);
    unmap_all(m);
    free(m);
    return NULL;
}

struct vub_mem *vub_mem_ref(struct vub_mem *m)
{
    m->refs++;
    return m;
}

void vub_mem_unref(struct vub_mem *m)
{
    if (!m || --m->refs > 0)
        return;
    unmap_all(m);
    free(m);
}

/* Overflow-safe: [a, a + len) within [start, start + size). */
static bool inside(uint64_t a, uint64_t len, uint64_t start, uint64_t size)
{
    return a >= start && a - start <= size && len <= size - (a - start);
}

void *vub_mem_gpa(const struct vub_mem *m, uint64_t gpa, uint64_t len)
{
    for (unsigned i = 0; m && i < m->n; i++) {
        if (inside(gpa, len, m->r[i].gpa, m->r[i].size))
            return m->r[i].host + (gpa - m->r[i].gpa);
    }
    return NULL;
}

void *vub_mem_qva(const struct vub_mem *m, uint64_t qva, uint64_t len)
{
    for (unsigned i = 0; m && i < m->n; i++) {
        if (inside(qva, len, m->r[i].qva, m->r[i].size))
            return m->r[i].host + (qva - m->r[i].qva);
    }
    return NULL;
}
