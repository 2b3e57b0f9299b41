/* Internals of the qcow2 format driver, shared by qcow2*.c. Not an API for other modules:
 * they use block_driver_qcow2 (graph.h).
 *
 * Files: qcow2.c (open, header checks, request splitting, reads and in-place writes),
 * qcow2-alloc.c (cluster allocation: the one place that changes metadata),
 * qcow2-refcount.c (refcount entries of any width, the open-time scan),
 * qcow2-cache.c (the L2 table and refcount block caches),
 * qcow2-backing.c (backing files: opening the chain, reads and copy-on-write through it),
 * qcow2-repair.c (a dirty image's refcounts rebuilt at a writable open).
 *
 * Tables are kept in memory exactly as on disk (big-endian), so that a metadata update is a
 * copy of the aligned chunk holding the entry, patched, written, and copied back on success:
 * memory never runs ahead of the disk. Everything runs on the loop thread.
 */
#ifndef THINBLK_BLOCK_QCOW2_H
#define THINBLK_BLOCK_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "block/graph.h"
#include "io/uring.h"

#define QCOW2_MAGIC 0x514649fbu
#define QCOW2_OFFSET_MASK 0x00fffffffffffe00ULL
#define QCOW2_OFLAG_COPIED (1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED (1ULL << 62)
#define QCOW2_OFLAG_ZERO 1ULL
#define QCOW2_L1_RESERVED 0x7f000000000001ffULL
#define QCOW2_L2_RESERVED 0x3f000000000001feULL
#define QCOW2_RT_RESERVED 0xff000000000001ffULL

#define QCOW2_INCOMPAT_DIRTY (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ULL << 4)

/* Someone waiting for a table to be loaded into a cache: cb(w, 0) once it is there, or
 * cb(w, -errno). Embedded in the waiter's own struct. */
struct qcow2_waiter {
    struct qcow2_waiter *next;
    void (*cb)(struct qcow2_waiter *w, int ret);
};

struct qcow2_cache;

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

enum qcow2_ctype {
    QCOW2_UNALLOCATED,  /* reads from the backing node, or as zeroes without one */
    QCOW2_ZERO_PLAIN,   /* zero flag, no host cluster */
    QCOW2_ZERO_ALLOC,   /* zero flag, host cluster kept (with refcount 1) */
    QCOW2_NORMAL,
    QCOW2_COMPRESSED,
    QCOW2_BAD,          /* reserved bits or a misaligned offset: the image is corrupt */
};

struct qcow2_state;
struct qcow2_req;

/* A request from the parent: its parts, and a flush after them for FUA. */
struct qcow2_req {
    struct qcow2_state *s;
    struct block_req *parent;
    unsigned pending;          /* parts not done, +1 while submitting */
    int err;                   /* the first error */
    bool fua;
    struct uring_op uop;       /* completing without I/O, off the submitter's stack */
    struct block_req child;    /* FLUSH */
};

/* One request split at cluster boundaries: a part stays within one cluster. */
struct qcow2_part {
    struct qcow2_req *r;
    struct qcow2_part *next;   /* the allocation queue, then the batch */
    struct qcow2_waiter w;     /* L2 table loads */
    struct block_req child;
    uint64_t voff;             /* guest offset */
    uint32_t len;
    char *buf;                 /* READ, WRITE: into the parent's buffer */
    void *zbuf;                /* compressed reads: the sectors read; zero writes: zeroes */
    uint32_t zskip, zlen;      /* where the compressed data is in zbuf */
    bool inplace;              /* a write in place is in flight (counted in s->inplace) */
    /* While in an allocation batch (qcow2-alloc.c): */
    uint8_t act;               /* enum qcow2_act */
    bool fill_skip;            /* the host cluster reads as zeroes: nothing to fill */
    int32_t ri, li;            /* its cluster reservation, its new L2 table, or -1 */
    uint64_t host;             /* the data cluster */
    uint64_t old_l2e, new_l2e; /* the entry before; ACT_SET: the entry after */
    void *cow_buf;             /* the whole cluster, when some of it is filled */
    struct qcow2_zread *zr;    /* copy-on-write from a compressed cluster */
    struct qcow2_part *run_next;  /* parts whose data write is merged into this one's */
    char *run_buf;             /* their bytes copied together (in the batch's buffer), or NULL */
    struct qcow2_chunk *link;  /* the metadata chunk whose write makes the change reachable */
    struct qcow2_batch *batch; /* the batch it is in */
    void (*fill_done)(struct qcow2_part *p, int ret);
    int ret;
};

enum qcow2_act {
    QCOW2_ACT_NONE,
    QCOW2_ACT_ALLOC,   /* a new data cluster for a write (over nothing, zeroes or compressed) */
    QCOW2_ACT_REWRITE, /* a write over QCOW2_ZERO_ALLOC: the cluster is kept, the flag cleared */
    QCOW2_ACT_SET,     /* discard, write-zeroes: the entry becomes new_l2e, old clusters freed */
};

/* What qcow2_plan() decided for a part. */
enum qcow2_plan {
    QCOW2_PLAN_DONE,   /* nothing to do */
    QCOW2_PLAN_HOST,   /* I/O in place */
    QCOW2_PLAN_META,   /* metadata changes: the allocator's (p->act says which) */
};

/* A compressed cluster read: the sectors holding its deflate stream, inflated into out. */
struct qcow2_zread {
    struct block_req req;
    struct qcow2_state *s;
    void *zbuf;
    uint32_t zskip, zlen;
    void *out;                 /* cluster_size bytes, the caller's */
    void (*done)(struct qcow2_zread *z, int ret);
    void *opaque;
};

struct qcow2_u64v {
    uint64_t *v;
    size_t n, cap;
};

struct qcow2_batch;
struct qcow2_cover;

struct qcow2_state {
    struct block_node *node;
    struct block_node *file;
    uint32_t version;
    uint32_t cluster_bits;
    uint32_t cluster_size;
    uint32_t refcount_order;    /* refcount width is 1 << refcount_order bits */
    uint32_t rb_bits;           /* log2 of the entries of a refcount block */
    uint32_t meta_align;        /* granularity of metadata writes: >= 512, <= cluster */
    uint64_t incompat, compat, autoclear;
    uint64_t l1_offset;
    uint32_t l1_size;           /* entries */
    uint64_t rt_offset;
    uint32_t rt_clusters;
    uint64_t rt_entries;
    void *header;               /* the image's first meta_align bytes */
    uint64_t *l1;               /* big-endian, as on disk (rounded up to meta_align) */
    uint64_t *rt;               /* big-endian, as on disk: rt_clusters clusters */
    struct qcow2_cache *l2_cache;
    struct qcow2_cache *rb_cache;
    bool writable;
    bool backing_null;          /* backing=null: a backing file named in the image is ignored */
    /* ---- backing file (qcow2-backing.c); the node itself is node->backing ---- */
    char *backing_name;         /* the backing file name in the image header, or NULL */
    char *backing_fmt;          /* the header's backing format extension, or NULL */
    json_t *backing_opt;        /* the "backing" option (node name or options) until opened */
    bool backing_implicit;      /* node->backing was opened from backing_name */
    bool have_img_id;           /* img_dev/img_ino name the image file (loop detection) */
    dev_t img_dev;
    ino_t img_ino;
    /* ---- end backing file ---- */
    /* Allocation (qcow2-alloc.c). next_free is the first cluster of the free space at the end
     * of the image (every cluster from there has refcount 0). Spare clusters have refcount 1
     * and nothing pointing at them (left by failed allocations); free ones have refcount 0
     * below next_free (freed by discards); freeing ones are free but wait until no write in
     * place is in flight (one may have looked them up before they were unlinked). hwm: no
     * host byte from there has been written since open, nor was in the file then. */
    uint64_t next_free, hwm;
    struct qcow2_u64v spare, free, freeing;
    /* Clusters reserved ahead: [ahead_next, ahead_end) have refcount 1 on disk (written and
     * flushed), nothing links them, nothing was written to them since open, and they are
     * handed out in order before next_free, so that a stream of allocations needs neither a
     * refcount write nor a flush per batch. Released (and spares too) on close. */
    uint64_t ahead_next, ahead_end;
    void *bounce[2];            /* the batches' merged data writes (not zeroed), kept */
    size_t bounce_len[2];
    unsigned inplace;           /* writes in place in flight */
    bool kicking, kick_scheduled;
    struct uring_op kick_uop;   /* starts a batch once the parts queued meanwhile are in */
    struct qcow2_part *queue_head, **queue_tail;
    struct qcow2_batch *batch;  /* the oldest batch in progress */
    struct qcow2_batch *batch2; /* the next one, started while batch links (see qcow2-alloc.c) */
    bool corrupt;               /* marked corrupt: every write fails */
    /* Clusters of L2 tables and refcount blocks in use (open addressing, 0 = empty slot:
     * cluster 0 is the header's), for the overlap checks. */
    uint64_t *meta_set;
    size_t meta_cap, meta_n;
    bool warned_compressed;
    /* Parts running (at most QCOW2_MAX_ACTIVE) and parts waiting for a turn: a large request
     * of small clusters must not flood the ring with thousands of operations at once. */
    unsigned active;
    struct qcow2_part *wait_head, **wait_tail;
    struct uring_op resume_uop;
    bool resume_scheduled;
};

#define QCOW2_MAX_ACTIVE 64

/* qcow2.c */
enum qcow2_ctype qcow2_classify(const struct qcow2_state *s, uint64_t l2e);
/* The L2 entry for guest offset voff in *l2e (0 if no L2 table): returns 0, or 1 if w waits
 * for the L2 table to load, or -errno. */
int qcow2_lookup(struct qcow2_state *s, uint64_t voff, struct qcow2_waiter *w, uint64_t *l2e);
/* The part is done with ret: completes the request once all its parts are. */
void qcow2_part_done(struct qcow2_part *p, int ret);
/* Write the part in place at host cluster offset host. */
void qcow2_part_write_host(struct qcow2_part *p, uint64_t host);
/* Read and inflate the compressed cluster of entry l2e into z->out; z->done(z, ret) later. */
void qcow2_zread_start(struct qcow2_state *s, struct qcow2_zread *z, uint64_t l2e);
/* The host clusters a compressed entry's data takes: [*first, *first + *n). */
void qcow2_compressed_span(const struct qcow2_state *s, uint64_t l2e, uint64_t *first,
                           uint64_t *n);
/* Before writing [off, off+len) of the file (data unless meta): 0, or -EIO if it overlaps
 * metadata in use, the image then marked corrupt. Also keeps s->hwm. */
int qcow2_pre_write(struct qcow2_state *s, uint64_t off, uint64_t len, bool meta);
/* Note that cluster cl now holds an L2 table or a refcount block. */
void qcow2_meta_add(struct qcow2_state *s, uint64_t cl);
/* An aligned buffer (for O_DIRECT children) of len bytes, zeroed; aborts on failure. */
void *qcow2_alloc_buf(size_t len);

/* qcow2-alloc.c */
/* What write, write-zeroes or discard part p needs given its L2 entry l2e now: a
 * QCOW2_PLAN_* (HOST: *host is the data cluster; META: p->act is set), or -errno. */
int qcow2_plan(struct qcow2_state *s, struct qcow2_part *p, uint64_t l2e, uint64_t *host);
/* Queue a part qcow2_plan() sent to the allocator; done through qcow2_part_done(). */
void qcow2_alloc_enqueue(struct qcow2_state *s, struct qcow2_part *p);
/* A write in place finished (s->inplace was decremented). */
void qcow2_alloc_inplace_done(struct qcow2_state *s);
void qcow2_alloc_cleanup(struct qcow2_state *s);
/* Close: give the clusters reserved ahead and the spares back (refcount 0), synchronously. */
void qcow2_alloc_close(struct qcow2_state *s);
/* Fill the bytes of p's new data cluster that the write does not cover (copy-on-write):
 * the one place for it, see qcow2-alloc.c. Calls done(p, ret), maybe inside the call. */
void qcow2_cow_fill(struct qcow2_state *s, struct qcow2_part *p,
                    void (*done)(struct qcow2_part *p, int ret));

/* qcow2-backing.c */
/* Parse the backing file name (header) and format (extension) of the image in cluster 0.
 * Returns 0 or -1 with *errp set (QEMU's texts). */
int qcow2_backing_header(struct qcow2_state *s, const uint8_t *c0, uint32_t cs,
                         uint32_t ext_start, struct error **errp);
/* The driver's open_backing, backing_overridden and query_image (graph.h). */
int qcow2_backing_open(struct block_node *n, struct error **errp);
bool qcow2_backing_overridden(struct block_node *n);
void qcow2_query_image(struct block_node *n, json_t *image);
/* Read an unallocated READ part from the backing node (zeroes past its end); completes it
 * through qcow2_part_done(). There must be a backing node. */
void qcow2_backing_read(struct qcow2_state *s, struct qcow2_part *p);
/* Copy-on-write: fill buf (one cluster, zeroed by the caller) with what the guest cluster
 * holding voff reads as before it is allocated: the backing's bytes if its L2 entry is
 * unallocated and there is a backing node (zeroes past the backing's end), else nothing.
 * Returns 0 if buf is ready, 1 if w->cb(w, ret) will be called (never inside this call),
 * or -errno. buf must stay valid until then. */
int qcow2_backing_fill(struct qcow2_state *s, uint64_t voff, void *buf, struct qcow2_waiter *w);
void qcow2_backing_cleanup(struct qcow2_state *s);

/* qcow2-refcount.c */
uint64_t qcow2_refcount_get(const struct qcow2_state *s, const void *block, uint64_t idx);
/* The bytes of the entry idx once it holds value: *pos and *len in the block, into out[8]. */
void qcow2_refcount_encode(const struct qcow2_state *s, const void *block, uint64_t idx,
                           uint64_t value, uint32_t *pos, uint32_t *len, uint8_t out[8]);
/* Set entry idx to value in a block in memory. */
void qcow2_refcount_set(const struct qcow2_state *s, void *block, uint64_t idx, uint64_t value);
uint64_t qcow2_refcount_max(const struct qcow2_state *s);
/* The refcount block at index b of the table, 0 if none. */
uint64_t qcow2_rt_block(const struct qcow2_state *s, uint64_t b);
/* Open: validate the refcount table and set next_free from the last referenced cluster,
 * reading refcount blocks synchronously. Returns 0 or -1 with *errp set. */
int qcow2_refcount_scan(struct qcow2_state *s, struct error **errp);

/* qcow2-repair.c */
/* Open, writable, the dirty bit set: rebuild the refcounts from every reference, fix the
 * refcount blocks (adding blocks and moving the table if needed), clear the dirty bit.
 * Blocking I/O (sync-io.h); before the caches exist. Updates s->rt, rt_offset, rt_clusters,
 * rt_entries, l1, header and incompat. Returns 0, or -1 with *errp set (naming
 * 'qemu-img check -r all') if the image cannot be repaired safely. */
int qcow2_repair(struct qcow2_state *s, struct error **errp);

#endif
