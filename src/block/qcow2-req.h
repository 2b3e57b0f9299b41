/* qcow2 requests: a request from the parent split into parts, one per guest cluster it
 * touches; parts run (at most QCOW2_MAX_ACTIVE at once), complete, and complete the request;
 * reads and writes in place; compressed cluster reads (qcow2-req.c).
 *
 * Calls qcow2-meta.h and qcow2-reserve.h. The part that runs a part (lookup, then read, write
 * in place or hand to the allocator) is above: the driver gives it as s->reqs.run. Loop
 * thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_REQ_H
#define THINBLK_BLOCK_QCOW2_REQ_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "block/graph.h"
#include "block/qcow2-cache.h"
#include "common/list.h"
#include "loop/loop.h"

struct qcow2_state;
struct qcow2_part;
struct qcow2_batch;
struct qcow2_chunk;

#define QCOW2_MAX_ACTIVE 64

/* A request from the parent: its parts, and a flush after them for FUA. */
struct qcow2_req {
    struct qcow2_state *s;
    struct block_req *parent;
    unsigned pending;          /* parts not done, +1 while submitting */
    int err;                   /* the first error */
    bool fua;
    struct loop_deferred done_call;  /* completing without I/O, off the submitter's stack */
    struct block_req child;    /* FLUSH */
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

/* What the allocator decided for a part (qcow2-alloc.c). */
enum qcow2_act {
    QCOW2_ACT_NONE,
    QCOW2_ACT_ALLOC,   /* a new data cluster for a write (over nothing, zeroes or compressed) */
    QCOW2_ACT_REWRITE, /* a write over QCOW2_ZERO_ALLOC: the cluster is kept, the flag cleared */
    QCOW2_ACT_SET,     /* discard, write-zeroes: the entry becomes new_l2e, old clusters freed */
};

/* One request split at cluster boundaries: a part stays within one cluster. */
struct qcow2_part {
    struct qcow2_req *r;
    struct qcow2_part *next;   /* the wait queue, the allocation queue, then the batch */
    struct qcow2_waiter w;     /* L2 table loads */
    struct block_req child;
    uint64_t voff;             /* guest offset */
    uint32_t len;
    void *zbuf;                /* compressed reads: the sectors read; zero writes: zeroes */
    bool inplace;              /* a write in place is in flight (counted by qcow2-reserve.c) */
    /* The allocator's, while the part is in a batch (qcow2-alloc.c, qcow2-cow.c): */
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
    void (*fill_done)(struct qcow2_part *p, int ret);  /* the copy-on-write fill's caller */
    void (*written)(struct qcow2_part *p, int ret);    /* the data write's caller */
    struct iovec *run_iov;     /* a run written in place: its parts' vectors one after another */
    int ret;
    /* The part's len bytes: READ, WRITE: the slice of the parent's data (buf or vector); zero
     * writes that allocate: zbuf as one segment; else none. Room for at least one. */
    unsigned niov;
    struct iovec iov[];
};

/* Parts in order, linked through next. */
DEFINE_QUEUE_TYPE(qcow2_part_queue, struct qcow2_part, next)

/* Owned by qcow2-req.c. Parts running (at most QCOW2_MAX_ACTIVE) and parts waiting for a
 * turn: a large request of small clusters must not flood the ring with thousands of
 * operations at once. */
struct qcow2_reqs {
    void (*run)(struct qcow2_part *p);  /* the driver's: runs a part given its turn */
    unsigned active;
    qcow2_part_queue waiting;
    struct loop_deferred resume_call;   /* resume(), queued while parts wait for room */
};

void qcow2_reqs_init(struct qcow2_state *s, void (*run)(struct qcow2_part *p));
/* Before s is freed: drop a pending resume of waiting parts. */
void qcow2_reqs_cleanup(struct qcow2_state *s);
/* Split req into parts and start them (the driver's submit()). */
void qcow2_req_submit(struct qcow2_state *s, struct block_req *req);
/* The part is done with ret: completes the request once all its parts are, lets a waiting
 * part run. */
void qcow2_part_done(struct qcow2_part *p, int ret);
/* Read the part from host cluster host (its bytes within it). */
void qcow2_part_read_host(struct qcow2_part *p, uint64_t host);
/* Write the part in place at host cluster host (pre_write checked here). */
void qcow2_part_write_host(struct qcow2_part *p, uint64_t host);
/* Read the part from the compressed cluster of entry l2e. */
void qcow2_part_read_compressed(struct qcow2_part *p, uint64_t l2e);
/* Read and inflate the compressed cluster of entry l2e into z->out; z->done(z, ret) later. */
void qcow2_zread_start(struct qcow2_state *s, struct qcow2_zread *z, uint64_t l2e);

#endif
