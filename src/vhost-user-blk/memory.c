/* The guest's memory as SET_MEM_TABLE describes it: regions of shared memory (fds) mapped here,
 * and every guest address a request or a ring names translated and bounds-checked against them.
 * A guest address that is not wholly inside one region is refused (NULL), never followed. */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"
#include "vhost-user-blk/internal.h"

/* ---- The SIGBUS guard ----
 *
 * The regions are the frontend's files, mapped shared. vub_mem_new() refuses a region past the
 * end of its file, but the frontend can truncate the file afterwards, and touching the part
 * gone raises SIGBUS: a frontend (buggy or hostile) would kill the daemon and every other
 * export with it. So every mapped region is listed here, and a SIGBUS handler looks the
 * faulting address up: inside a region, it puts a private zero page (of the file's page size)
 * over the page and flags the table, and the access completes on that page; the loop then
 * closes the frontend's connection (on_poisoned). Any other SIGBUS keeps its default action.
 * The kernel's own accesses to guest memory (io_uring reads and writes) fail with EFAULT
 * instead, which the request gets as an I/O error.
 *
 * The list is a fixed array changed only on the loop thread; the handler may run on any thread
 * (librbd's threads copy the data of reads into guest memory), so a slot is published len last and withdrawn len first,
 * and a table is unmapped only after its slots are withdrawn. */

#define GUARD_SLOTS 4096   /* regions mapped at once: 8 per connection */

struct guard_slot {
    uintptr_t start;
    size_t len;            /* 0: free */
    size_t page;           /* the file's page size: 4 KiB, or a huge page */
    struct vub_mem *mem;
};

static struct guard_slot guard[GUARD_SLOTS];
static unsigned guard_used;    /* slots in use */
static int guard_efd = -1;     /* the handler's wake-up for the loop */
static struct loop *guard_loop;

static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
    int saved_errno = errno;
    uintptr_t a = (uintptr_t)si->si_addr;

    (void)ctx;
    if (si->si_code == BUS_ADRERR) {
        for (unsigned i = 0; i < GUARD_SLOTS; i++) {
            size_t len = __atomic_load_n(&guard[i].len, __ATOMIC_ACQUIRE);
            struct vub_mem *m = __atomic_load_n(&guard[i].mem, __ATOMIC_ACQUIRE);
            if (len == 0 || !m || a - guard[i].start >= len)
                continue;
            void *page = (void *)(a & ~(uintptr_t)(guard[i].page - 1));
            if (mmap(page, guard[i].page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
                break;
            __atomic_store_n(&m->poisoned, true, __ATOMIC_RELEASE);
            uint64_t one = 1;
            if (write(guard_efd, &one, sizeof(one)) < 0) {
                /* The counter is already non-zero: the loop will look anyway. */
            }
            errno = saved_errno;
            return;
        }
    }
    /* Not guest memory: as if there were no handler. A fault re-executes and takes the default
     * action (a core dump); a SIGBUS someone sent is sent again. */
    struct sigaction dfl = { .sa_handler = SIG_DFL };
    sigaction(sig, &dfl, NULL);
    if (si->si_code <= 0)
        raise(sig);
    errno = saved_errno;
}

/* On the loop: close the connections whose memory the handler had to patch. */
static void on_poisoned(struct loop *loop, int fd, unsigned events, void *opaque)
{
    uint64_t v;

    (void)loop, (void)events, (void)opaque;
    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN && errno != EINTR)
        log_warn("vhost-user-blk: SIGBUS guard eventfd: %m");
    for (unsigned i = 0; i < GUARD_SLOTS; i++) {
        struct vub_mem *m = guard[i].len ? guard[i].mem : NULL;
        if (!m || !__atomic_load_n(&m->poisoned, __ATOMIC_ACQUIRE) || m->poison_handled)
            continue;
        m->poison_handled = true;
        struct vub_conn *c = m->conn;
        if (c->state != VUB_CONN_CLOSED) {
            log_warn("vhost-user-blk: %s: guest memory shrank under the daemon (the frontend "
                     "truncated a memory region's file): closing the connection", c->exp->id);
            vub_conn_close(c, "guest memory truncated by the frontend");
        }
    }
}

static bool guard_start(struct loop *loop)
{
    if (guard_efd < 0) {
        guard_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (guard_efd < 0) {
            log_warn("vhost-user-blk: eventfd for the SIGBUS guard: %m");
            return false;
        }
        struct sigaction sa = { .sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO };
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, NULL) < 0) {
            log_warn("vhost-user-blk: SIGBUS handler: %m");
            close(guard_efd);
            guard_efd = -1;
            return false;
        }
    }
    if (guard_used == 0) {
        if (loop_add_fd(loop, guard_efd, LOOP_READ, on_poisoned, NULL) < 0) {
            log_warn("vhost-user-blk: cannot watch the SIGBUS guard eventfd: %m");
            return false;
        }
        guard_loop = loop;
    }
    ASSERT(guard_loop == loop);
    return true;
}

/* List [p, p + len) of m. Returns the slot, or -1 (logged) if none is free. */
static int guard_add(struct vub_mem *m, void *p, size_t len, size_t page)
{
    if (!guard_start(m->loop))
        return -1;
    for (int i = 0; i < GUARD_SLOTS; i++) {
        if (guard[i].len)
            continue;
        guard[i].start = (uintptr_t)p;
        guard[i].page = page;
        __atomic_store_n(&guard[i].mem, m, __ATOMIC_RELEASE);
        __atomic_store_n(&guard[i].len, len, __ATOMIC_RELEASE);
        guard_used++;
        return i;
    }
    if (guard_used == 0) {
        loop_del_fd(guard_loop, guard_efd);
        guard_loop = NULL;
    }
    log_warn("vhost-user-blk: more than %d guest memory regions mapped at once", GUARD_SLOTS);
    return -1;
}

static void guard_del(int slot)
{
    __atomic_store_n(&guard[slot].len, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&guard[slot].mem, NULL, __ATOMIC_RELEASE);
    if (--guard_used == 0) {
        loop_del_fd(guard_loop, guard_efd);
        guard_loop = NULL;
    }
}

/* The page size of the file fd: a huge page on hugetlbfs, else the system's. */
static size_t file_page_size(const struct stat *st)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t b = (size_t)st->st_blksize;

    return b > page && (b & (b - 1)) == 0 ? b : page;
}

static void unmap_all(struct vub_mem *m)
{
    for (unsigned i = 0; i < m->n; i++) {
        guard_del(m->slot[i]);
        munmap(m->r[i].map, m->r[i].map_len);
    }
    m->n = 0;
}

struct vub_mem *vub_mem_new(struct vub_conn *c, const struct vhost_user_memory *msg, int *fds,
                            unsigned nfds)
{
    struct vub_mem *m = xzalloc(sizeof(*m));
    unsigned i;

    m->refs = 1;
    m->conn = c;
    m->loop = c->loop;
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
        int slot = guard_add(m, p, (size_t)len, file_page_size(&st));
        if (slot < 0) {
            munmap(p, (size_t)len);
            goto fail;
        }
        m->r[i] = (struct vub_region){
            .gpa = r->guest_phys_addr, .size = r->memory_size, .qva = r->userspace_addr,
            .host = (uint8_t *)p + r->mmap_offset, .map = p, .map_len = (size_t)len,
        };
        m->slot[i] = slot;
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
