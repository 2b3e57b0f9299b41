/* The block graph. See graph.h. */
#include "block/graph.h"

#include <string.h>

#include "common/util.h"

struct block_graph *block_graph_new(void)
{
    return xzalloc(sizeof(struct block_graph));
}

void block_graph_free(struct block_graph *g)
{
    if (!g)
        return;
    while (g->nodes) {
        struct block_node *n = g->nodes;
        g->nodes = n->next;
        free(n->node_name);
        free(n);
    }
    free(g);
}

struct block_node *block_graph_find(struct block_graph *g, const char *name)
{
    for (struct block_node *n = g->nodes; n; n = n->next) {
        if (strcmp(n->node_name, name) == 0)
            return n;
    }
    return NULL;
}
