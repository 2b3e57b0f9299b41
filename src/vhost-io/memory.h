/* Guest memory of the frontend: one memfd, mapped shared here and by the backend.
 *
 * The region sits at a chosen guest-physical address (gpa), deliberately not our virtual
 * address, so a backend that confuses the two address spaces fails visibly. Rings, request
 * headers and data buffers are carved out of it by a bump allocator that never frees: the
 * frontend sizes the region once for its queues and depth. Nothing here blocks.
 */
#ifndef THINBLK_VHOST_IO_MEMORY_H
#define THINBLK_VHOST_IO_MEMORY_H

#include <stdint.h>

#include "common/error.h"

struct vio_mem {
    int fd;           /* the memfd, owned; -1 when not set up */
    uint8_t *base;    /* our shared mapping of all of it */
    uint64_t gpa;     /* guest-physical address of base[0] */
    uint64_t size;    /* bytes, a multiple of the page size */
    uint64_t used;    /* bytes handed out by vio_mem_alloc() */
};

/* Create a memfd of size bytes (rounded up to a page) at guest address gpa and map it.
 * Returns 0, or -1 with *errp set. */
int vio_mem_init(struct vio_mem *m, uint64_t gpa, uint64_t size, struct error **errp);

/* Unmap and close; m may be half set up or already destroyed. */
void vio_mem_destroy(struct vio_mem *m);

/* len bytes aligned to align (a power of two), zeroed. Returns our pointer and stores the
 * guest address in *gpa, or NULL when the region is full. */
void *vio_mem_alloc(struct vio_mem *m, uint64_t len, uint64_t align, uint64_t *gpa);

/* Our pointer for guest range [gpa, gpa + len), or NULL if it is not all inside m. */
void *vio_mem_ptr(const struct vio_mem *m, uint64_t gpa, uint64_t len);

/* The guest address of p, a pointer into m. */
uint64_t vio_mem_gpa(const struct vio_mem *m, const void *p);

#endif
