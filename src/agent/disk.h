/* thinblk-agent's decisions for one watched daemon: its disks with a policy, when to arm a
 * write threshold, when to extend, when to resume the daemon (cont) or one of its stop groups
 * (__org.thinblk_group-cont).
 *
 * What the agent knows of a daemon comes from a "reconcile", a batch of queries whose answers
 * are looked at together (disk.c), run after every (re)connect, on every event that matters,
 * after every extension and every poll interval. It owns the daemon's connection (monitor.h)
 * and its extensions (extend.h) and hears from both only through the callbacks it gives them.
 *
 * Loop thread only; nothing here blocks.
 */
#ifndef THINBLK_AGENT_DISK_H
#define THINBLK_AGENT_DISK_H

#include "agent/config.h"
#include "agent/metrics.h"

struct loop;
struct disk_daemon;

/* A watched daemon, conf, with the policies of cfg that name it, on loop. self_exe is the
 * program the built-in loop method runs (--extend-loop); its disks are counted in metrics.
 * cfg, conf, self_exe and metrics are borrowed and must outlive it. Does not connect yet.
 * Free with disk_daemon_free(). */
struct disk_daemon *disk_daemon_new(struct loop *loop, const struct agent_config *cfg,
                                    const struct agent_daemon_conf *conf, const char *self_exe,
                                    struct agent_metrics *metrics);
/* Start connecting to the daemon (now); from then on it runs from the loop. */
void disk_daemon_start(struct disk_daemon *dm);
/* Close the connection, leave extensions in flight to finish on their own (logged), free
 * everything. NULL is allowed. */
void disk_daemon_free(struct disk_daemon *dm);

#endif
