/* The qcow2 metadata caches (L2 tables, refcount blocks): LRU over a hash by offset.
 *
 * Write-through: the cache never holds anything the disk does not (qcow2-alloc.c writes an
 * entry's chunk first and patches the cache once the write is done), so eviction is free.
 * A load races with a write to the same table only when a reader misses while the allocator
 * updates that table; the patch then marks the load to be read again.
 */
#include <errno.h>
#include <string.h>

#include "block/qcow2-cache.h"

#include "block/graph.h"
#include "block/qcow2-format.h"
#include "common/list.h"
#include "common/util.h"

DEFINE_QUEUE_TYPE(waiter_queue, struct qcow2_waiter, next)

struct slot {
    struct slot *hnext;             /* hash chain */
    struct slot *lprev, *lnext;     /* LRU list, most recent first */
    uint64_t offset;
    void *table;
    bool loading, reload;
    waiter_queue waiters;           /* while loading, in arrival order */
    struct block_req req;
    struct qcow2_cache *cache;
};

DEFINE_LIST_TYPE(slot_lru, struct slot, lprev, lnext)

struct qcow2_cache {
    struct block_node *file;
    uint32_t table_size;
    unsigned capacity, count;
    struct slot **buckets;
    size_t nbuckets;                /* a power of two */
    slot_lru lru;                   /* most recent first */
};

struct qcow2_cache *qcow2_cache_new(struct block_node *file, uint32_t table_size,
                                    unsigned capacity)
{
    struct qcow2_cache *c = xzalloc(sizeof(*c));

    c->file = file;
    c->table_size = table_size;
    c->capacity = MAX(capacity, 4u);
    c->nbuckets = 16;
    while (c->nbuckets < 2 * (size_t)c->capacity)
        c->nbuckets *= 2;
    c->buckets = xzalloc(c->nbuckets * sizeof(*c->buckets));
    return c;
}

static size_t bucket(const struct qcow2_cache *c, uint64_t offset)
{
    return (size_t)((offset >> 9) * 0x9e3779b97f4a7c15ULL >> 20) & (c->nbuckets - 1);
}

static struct slot *find(struct qcow2_cache *c, uint64_t offset)
{
    for (struct slot *sl = c->buckets[bucket(c, offset)]; sl; sl = sl->hnext) {
        if (sl->offset == offset)
            return sl;
    }
    return NULL;
}

static void slot_remove(struct qcow2_cache *c, struct slot *sl)
{
    for (struct slot **p = &c->buckets[bucket(c, sl->offset)]; *p; p = &(*p)->hnext) {
        if (*p == sl) {
            *p = sl->hnext;
            break;
        }
    }
    slot_lru_remove(&c->lru, sl);
    c->count--;
    free(sl->table);
    free(sl);
}

/* Make room: drop least recently used tables that are not loading, and not keep (a table
 * just loaded, whose waiters have yet to use it; NULL for none). */
static void evict(struct qcow2_cache *c, struct slot *keep)
{
    struct slot *sl = c->lru.last;

    while (c->count > c->capacity && sl) {
        struct slot *prev = sl->lprev;
        if (!sl->loading && sl != keep)
            slot_remove(c, sl);
        sl = prev;
    }
}

static struct slot *slot_new(struct qcow2_cache *c, uint64_t offset)
{
    struct slot *sl = xzalloc(sizeof(*sl));
    size_t b = bucket(c, offset);

    sl->cache = c;
    sl->offset = offset;
    sl->table = qcow2_alloc_buf(c->table_size);
    sl->hnext = c->buckets[b];
    c->buckets[b] = sl;
    slot_lru_push_head(&c->lru, sl);
    c->count++;
    return sl;
}

static void load_done(struct block_req *req, int ret)
{
    struct slot *sl = container_of(req, struct slot, req);
    struct qcow2_cache *c = sl->cache;

    if (ret == 0 && sl->reload) {
        sl->reload = false;
        node_submit(c->file, &sl->req);
        return;
    }
    /* Detach the waiters first: their callbacks may use the cache, evicting this slot. */
    waiter_queue ws = sl->waiters;
    struct qcow2_waiter *w;

    sl->waiters = (waiter_queue){0};
    sl->loading = false;
    if (ret < 0) {
        slot_remove(c, sl);
    } else {
        /* Most recently used, and kept while its waiters run: with more tables loading than
         * the cache holds, evicting it here would send every waiter to load it again, and
         * the cache would go round in circles without serving anyone. Over capacity for the
         * moment; the next eviction trims it. */
        slot_lru_remove(&c->lru, sl);
        slot_lru_push_head(&c->lru, sl);
        evict(c, sl);
    }
    while ((w = waiter_queue_pop(&ws)))
        w->cb(w, ret);
}

const void *qcow2_cache_get(struct qcow2_cache *c, uint64_t offset, struct qcow2_waiter *w)
{
    struct slot *sl = find(c, offset);

    if (sl && !sl->loading) {
        slot_lru_remove(&c->lru, sl);
        slot_lru_push_head(&c->lru, sl);
        return sl->table;
    }
    if (sl) {
        waiter_queue_push(&sl->waiters, w);
        return NULL;
    }
    sl = slot_new(c, offset);
    sl->loading = true;
    waiter_queue_push(&sl->waiters, w);
    sl->req = (struct block_req){.op = BLOCK_OP_READ, .offset = offset, .len = c->table_size,
                                 .buf = sl->table, .done = load_done};
    node_submit(c->file, &sl->req);
    return NULL;
}

void qcow2_cache_patch(struct qcow2_cache *c, uint64_t offset, uint32_t pos, const void *data,
                       uint32_t len)
{
    struct slot *sl = find(c, offset);

    if (!sl)
        return;
    if (sl->loading)
        sl->reload = true;
    else
        memcpy((char *)sl->table + pos, data, len);
}

void qcow2_cache_insert(struct qcow2_cache *c, uint64_t offset, const void *table)
{
    struct slot *sl = find(c, offset);

    if (sl && sl->loading) {
        sl->reload = true;
        return;
    }
    if (!sl)
        sl = slot_new(c, offset);
    memcpy(sl->table, table, c->table_size);
    evict(c, sl);
}

void qcow2_cache_free(struct qcow2_cache *c)
{
    if (!c)
        return;
    while (!slot_lru_empty(&c->lru))
        slot_remove(c, c->lru.head);
    free(c->buckets);
    free(c);
}
