/* The block graph: the named block nodes of the daemon.
 *
 * Nodes are added by --blockdev and blockdev-add (the block layer); QMP commands find them by
 * node name here. Used from the loop thread only.
 */
#ifndef THINBLK_BLOCK_GRAPH_H
#define THINBLK_BLOCK_GRAPH_H

#include <stdint.h>

struct block_node {
    struct block_node *next;  /* graph->nodes */
    char *node_name;
    uint64_t write_threshold; /* bytes; 0: not armed */
};

struct block_graph {
    struct block_node *nodes;
};

struct block_graph *block_graph_new(void);
/* Free the graph and every node in it. */
void block_graph_free(struct block_graph *g);

/* The node named name, or NULL. */
struct block_node *block_graph_find(struct block_graph *g, const char *name);

#endif
