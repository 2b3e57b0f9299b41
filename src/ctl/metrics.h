/* thinblkctl metrics: the daemon's state in Prometheus' text exposition format (version
 * 0.0.4, what node_exporter's textfile collector reads). Writes to stdout only. */
#ifndef THINBLK_CTL_METRICS_H
#define THINBLK_CTL_METRICS_H

#include <jansson.h>

/* The queries' return values a metrics page is made of, borrowed. */
struct ctl_metrics_input {
    json_t *status;       /* query-status */
    json_t *block;        /* query-block */
    json_t *blockstats;   /* query-blockstats */
    json_t *nodes;        /* query-named-block-nodes: the size of every node of a chain */
};

/* Print the metrics of in: each family's # HELP and # TYPE, then its samples. Members a
 * server lacks (QEMU has no __org.thinblk_* statistics) give no samples. */
void ctl_metrics_print(const struct ctl_metrics_input *in);

#endif
