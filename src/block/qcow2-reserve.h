/* qcow2 host clusters: which ones the allocator may hand out (qcow2-reserve.c).
 *
 * next_free is the first cluster of the free space at the end of the image (every cluster
 * from there has refcount 0 and nothing references it: the open-time check made sure). Spare
 * clusters have refcount 1 and nothing pointing at them (left by failed allocations); free
 * ones have refcount 0 below next_free (freed by discards, and every such cluster the
 * open-time check found: a discarded cluster is reused after a restart too), kept as runs
 * so that the free space of a large image costs a few runs, not a word per cluster;
 * freeing ones are free but wait until no write in place is in flight (one may have looked
 * them up before they were unlinked). Clusters reserved ahead, [ahead_next, ahead_end), have
 * refcount 1 on disk (written and flushed), nothing links them, nothing was written to them
 * since open, and they are handed out in order before next_free, so that a stream of
 * allocations needs neither a refcount write nor a flush per batch. A crash leaks spares and
 * clusters reserved ahead; the next writable open reclaims them (qcow2-check.c); a clean close
 * gives them back (qcow2_reserve_close()).
 *
 * Calls qcow2-meta.h and the sync I/O helpers (at close). Loop thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_RESERVE_H
#define THINBLK_BLOCK_QCOW2_RESERVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/vector.h"

struct qcow2_state;

/* Clusters [first, first + n). */
struct qcow2_run {
    uint64_t first, n;
};
DEFINE_VECTOR_TYPE(qcow2_run_vector, struct qcow2_run)

/* Owned by qcow2-reserve.c; others read next_free. */
struct qcow2_reserve {
    uint64_t next_free;
    uint64_t ahead_next, ahead_end;
    u64_vector spare, freeing;
    qcow2_run_vector free;      /* handed out from the last run, its lowest cluster first */
    uint64_t nfree;             /* clusters in free */
    unsigned inplace;           /* writes in place in flight */
};

/* Where a cluster handed out by qcow2_reserve_take() came from. */
struct qcow2_taken {
    uint64_t cluster;
    bool counted;  /* its refcount is 1 already (a spare, or reserved ahead) */
    bool fresh;    /* never written since open (reserved ahead, or at next_free) */
};

/* Take n clusters into out: spares, free clusters, those reserved ahead, then a run at
 * next_free. Returns 1 (*from_end: how many came from next_free), 0 if that run is not
 * covered by refcount blocks yet (nothing taken; *from_end: how many the refcount structures
 * must grow to cover), or -EIO (a refcount table entry failed its check). */
int qcow2_reserve_take(struct qcow2_state *s, size_t n, struct qcow2_taken *out,
                       uint64_t *from_end);
/* Take cluster next_free to reserve it ahead, if a refcount block covers it: 1, else 0. */
int qcow2_reserve_take_ahead(struct qcow2_state *s, uint64_t *cl);
/* Cluster cl, reserved ahead, is durable (refcount 1 flushed): hand it out before next_free.
 * It must follow the clusters already reserved ahead, or they must all be gone: returns false
 * (nothing done) otherwise. */
bool qcow2_reserve_ahead_add(struct qcow2_state *s, uint64_t cl);
/* A cluster with refcount 1 that nothing links (a failed allocation's). */
void qcow2_reserve_put_spare(struct qcow2_state *s, uint64_t cl);
/* Clusters [first, first + n) with refcount 0 below next_free (a refcount write failed, or
 * they were freed), handed out before those put earlier. */
void qcow2_reserve_put_free(struct qcow2_state *s, uint64_t first, uint64_t n);
/* A cluster whose refcount just reached 0 on disk: free once no write in place is in flight. */
void qcow2_reserve_put_freed(struct qcow2_state *s, uint64_t cl);
/* A write in place starts / finished. */
void qcow2_reserve_inplace_start(struct qcow2_state *s);
void qcow2_reserve_inplace_done(struct qcow2_state *s);
/* Move next_free to at least cl. */
void qcow2_reserve_skip_to(struct qcow2_state *s, uint64_t cl);
/* Close: give the clusters reserved ahead and the spares back (refcount 0), synchronously
 * (blocking I/O, at close only). Leaks them, with a warning, if that fails. */
void qcow2_reserve_close(struct qcow2_state *s);
void qcow2_reserve_cleanup(struct qcow2_state *s);

#endif
