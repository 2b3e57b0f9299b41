/* thinblk-agent's own metrics: per disk, the extensions done, their durations, the failures,
 * and whether it is at its cap; per daemon and per stop group, the resumes; written to a file
 * in Prometheus' text format (for node_exporter's textfile collector) after every change.
 * Loop thread only. */
#ifndef THINBLK_AGENT_METRICS_H
#define THINBLK_AGENT_METRICS_H

#include <stdbool.h>
#include <stdint.h>

struct agent_metrics;

/* What is counted of one disk. Owned by its struct agent_metrics; change it, then call
 * agent_metrics_changed(). */
struct agent_disk_metrics {
    uint64_t extensions;      /* succeeded */
    uint64_t duration_ns;     /* the sum of their durations */
    uint64_t failures;        /* failed, or could not start */
    bool at_cap;              /* needs room but its volume is at its cap */
};

/* What is counted of a daemon's run state, or of one of its stop groups. Owned by its
 * struct agent_metrics; change it, then call agent_metrics_changed(). */
struct agent_group_metrics {
    uint64_t resumes;         /* cont (run state) or __org.thinblk_group-cont sent */
};

/* Metrics written to path, or kept in memory only if path is NULL (borrowed: must outlive
 * it). Writes the file at once (no disks yet). */
struct agent_metrics *agent_metrics_new(const char *path);
void agent_metrics_free(struct agent_metrics *m);

/* The record of the disk named disk of daemon, made zeroed the first time (and kept across
 * reconnects, as the disks are). */
struct agent_disk_metrics *agent_metrics_disk(struct agent_metrics *m, const char *daemon,
                                              const char *disk);

/* The record of the run state of daemon (group NULL) or of its stop group group, made zeroed
 * the first time and kept for the agent's life. */
struct agent_group_metrics *agent_metrics_group(struct agent_metrics *m, const char *daemon,
                                                const char *group);

/* Write the file again, atomically (a temporary file renamed over it, so a reader never sees
 * half of it); a failure is logged once per kind and the agent goes on. Blocks on the write
 * of a few hundred bytes. */
void agent_metrics_changed(struct agent_metrics *m);

#endif
