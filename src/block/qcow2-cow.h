/* qcow2 new data clusters: what fills the bytes a write does not cover (copy-on-write), and
 * the data writes of an allocation batch, merged where the host clusters are contiguous
 * (qcow2-cow.c).
 *
 * Calls qcow2-backing.h (the backing's bytes), qcow2-req.h (compressed reads) and
 * qcow2-meta.h. Loop thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_COW_H
#define THINBLK_BLOCK_QCOW2_COW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qcow2_state;
struct qcow2_part;

/* Fill the bytes of p's new data cluster that the write does not cover: the one place for
 * it. Sources, in order: the cluster's old compressed data (a write over a compressed
 * cluster); the backing node's bytes of the guest cluster where the entry was unallocated
 * (zeroes past the backing's end); else zeroes, as the cluster read before. p->cow_buf
 * becomes the whole cluster with the guest's bytes in place, or stays NULL when the write
 * covers the cluster or nothing needs filling (p->fill_skip: the host cluster reads as zeroes
 * already). Calls done(p, ret), maybe inside the call. */
void qcow2_cow_fill(struct qcow2_state *s, struct qcow2_part *p,
                    void (*done)(struct qcow2_part *p, int ret));
/* Whether p allocates a whole cluster over nothing compressed: merged by copying. */
bool qcow2_cow_whole_fresh(const struct qcow2_state *s, const struct qcow2_part *p);
/* Chain the parts after p[i] (of n, in guest order) whose data write merges into p[i]'s
 * (p[i]->run_next): host clusters contiguous and nothing to fill; in place where guest and
 * buffer are contiguous too, else whole clusters copied into bounce at *bounce_at (which
 * advances). Returns the index after the run. */
size_t qcow2_data_run(struct qcow2_state *s, struct qcow2_part **p, size_t n, size_t i,
                      char *bounce, uint64_t *bounce_at);
/* The data write of the run headed by p: fill (copy-on-write) then one write. Sets q->ret for
 * every part q of the run, then calls done(p, ret) once. */
void qcow2_data_write(struct qcow2_state *s, struct qcow2_part *p,
                      void (*done)(struct qcow2_part *p, int ret));

#endif
