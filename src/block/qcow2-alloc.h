/* qcow2 metadata changes: cluster allocation, copy-on-write, discard and write-zeroes
 * (qcow2-alloc.c, the allocation batch). The driver plans each write part against its L2
 * entry and queues those that change metadata here.
 *
 * Calls qcow2-grow.h, qcow2-cow.h, qcow2-chunk.h, qcow2-req.h, qcow2-reserve.h and
 * qcow2-meta.h. Loop thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_ALLOC_H
#define THINBLK_BLOCK_QCOW2_ALLOC_H

#include <stdbool.h>
#include <stdint.h>

struct qcow2_state;
struct qcow2_part;
struct qcow2_alloc;

/* What qcow2_plan() decided for a part. */
enum qcow2_plan {
    QCOW2_PLAN_DONE,   /* nothing to do */
    QCOW2_PLAN_HOST,   /* I/O in place */
    QCOW2_PLAN_META,   /* metadata changes: the allocator's (p->act says which) */
};

/* What write, write-zeroes or discard part p needs given its L2 entry l2e now (checked by
 * the lookup): a QCOW2_PLAN_* (HOST: *host is the data cluster; META: p->act is set), or
 * -errno (-EIO with corruption signalled when the clusters it would write in place or free
 * fail their checks, qcow2_check_use()). */
int qcow2_plan(struct qcow2_state *s, struct qcow2_part *p, uint64_t l2e, uint64_t *host);
/* Queue a part qcow2_plan() sent to the allocator; done through qcow2_part_done(). */
void qcow2_alloc_enqueue(struct qcow2_state *s, struct qcow2_part *p);

/* The allocator of a writable image (s->alloc). */
struct qcow2_alloc *qcow2_alloc_new(struct qcow2_state *s);
/* Whether no batch runs and no part waits for one: nothing changes metadata now. */
bool qcow2_alloc_idle(const struct qcow2_state *s);
/* Close, no request in flight: give back the clusters reserved ahead and the spares unless
 * a batch is stuck (the image is then left with leaks the next open reclaims). */
void qcow2_alloc_close(struct qcow2_state *s);
void qcow2_alloc_free(struct qcow2_state *s);

#endif
