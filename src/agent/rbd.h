/* thinblk-agent's rbd method: the "volume" of a disk whose protocol node is rbd is its pool's
 * max_bytes quota, which the agent raises ahead of the pool's usage.
 *
 * Ceph is asked by child processes of this program (librados blocks: a monitor that does not
 * answer holds a call for its whole timeout), never by the loop:
 *     thinblk-agent --rbd-pool-stat CONF POOL        prints the pool's usage, quota, full flag
 *     thinblk-agent --extend-rbd CONF POOL QUOTA     raises the quota (never lowers it), then
 *                                                    waits until the monitor no longer flags
 *                                                    the pool full
 * The first is a probe, watched by rbd_probe_start() (its output read through a pipe); the
 * second an extension, run by extend.c as the other methods. Loop thread only, but for the
 * *_main functions, which are the children's whole work and block.
 */
#ifndef THINBLK_AGENT_RBD_H
#define THINBLK_AGENT_RBD_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"

struct loop;
struct rbd_probe;

/* What the monitor says of a pool. */
struct rbd_pool_stat {
    uint64_t used;            /* the bytes its quota counts (current_num_bytes) */
    uint64_t quota;           /* max_bytes, 0: none */
    bool full;                /* flagged full (full_quota, or full) */
};

/* The pool, image and conf of an rbd node's file name: QEMU's json:{"driver": "rbd",
 * "pool": ..., "image": ..., "conf": ...} or its legacy rbd:POOL/IMAGE[@SNAP][:conf=FILE...].
 * Returns 0 with the strings allocated (*conf NULL if none given), or -1. */
int rbd_parse_filename(const char *filename, char **pool, char **image, char **conf);

/* The probe ended: ok with st, or failed with why (borrowed). The probe is already freed. */
typedef void rbd_probe_fn(void *opaque, bool ok, const struct rbd_pool_stat *st, const char *why);

/* Run "self_exe --rbd-pool-stat CONF POOL" (conf NULL: Ceph's default) on loop, killed after
 * timeout_ns, what it prints read back (a failure's message goes into why, not the log); done(opaque, ...) is called once when it ends, unless abandoned. Returns the
 * probe, or NULL with *errp set (done is not called). Never blocks. */
struct rbd_probe *rbd_probe_start(struct loop *loop, const char *self_exe, const char *conf,
                                  const char *pool, uint64_t timeout_ns, rbd_probe_fn *done,
                                  void *opaque, struct error **errp);
/* Forget a probe: it is killed, done is never called. */
void rbd_probe_abandon(struct rbd_probe *probe);

/* The children's work (argv after the option). Return the exit status; block. */
int rbd_pool_stat_main(int argc, char **argv);
int rbd_extend_main(int argc, char **argv);

#endif
