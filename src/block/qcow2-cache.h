/* The qcow2 metadata caches (L2 tables, refcount blocks): LRU over a hash by offset,
 * write-through (qcow2-cache.c). Loop thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_CACHE_H
#define THINBLK_BLOCK_QCOW2_CACHE_H

#include <stdint.h>

struct block_node;
struct qcow2_cache;

/* Someone waiting for a table to be loaded into a cache: cb(w, 0) once it is there, or
 * cb(w, -errno). Embedded in the waiter's own struct. */
struct qcow2_waiter {
    struct qcow2_waiter *next;
    void (*cb)(struct qcow2_waiter *w, int ret);
};

/* A cache of up to capacity tables of table_size bytes read from file (more while that
 * many are loading). */
struct qcow2_cache *qcow2_cache_new(struct block_node *file, uint32_t table_size,
                                    unsigned capacity);
/* Free the cache; nothing may be loading. */
void qcow2_cache_free(struct qcow2_cache *c);
/* The table at offset, or NULL if it is being loaded: then w->cb is called later (never
 * inside this call). The pointer is valid until the next return to the loop. */
const void *qcow2_cache_get(struct qcow2_cache *c, uint64_t offset, struct qcow2_waiter *w);
/* The disk now holds data at [pos, pos+len) of the table at offset: update the cached copy,
 * or have a load in flight read again. */
void qcow2_cache_patch(struct qcow2_cache *c, uint64_t offset, uint32_t pos, const void *data,
                       uint32_t len);
/* A table just written in whole at offset (a new one): cache a copy. */
void qcow2_cache_insert(struct qcow2_cache *c, uint64_t offset, const void *table);

#endif
