/* Block status: the drivers' answers put together as QEMU's block layer does (block/io.c's
 * bdrv_co_block_status() and bdrv_co_common_block_status_above()), so that what an export
 * reports for an image is what qemu-storage-daemon reports for it.
 *
 * One query asks the node, then, where the node leaves the range unallocated, its backing
 * chain, node by node, with the range shortened to the extent found so far. A driver that
 * needs I/O (a qcow2 L2 table to load) returns 1; the query then waits and asks again from
 * its top once block_status_resume() says the I/O is done. Asking again is cheap (what was
 * loaded is cached) and keeps the walk a plain recursion: a chain, and the raw and fault
 * filters over files, are a few nodes deep.
 */
#include "block/graph.h"
#include "common/assert.h"
#include "common/util.h"

/* What one node says of [offset, offset + pnum), as bdrv_co_block_status(). */
struct answer {
    uint64_t pnum;  /* 0: offset is at or past the node's end */
    unsigned flags; /* DATA, ZERO, ALLOCATED */
};

static int ask(struct block_status *st, struct block_node *n, bool want_zero, uint64_t offset,
               uint64_t len, struct answer *a);

/* Past the end of what its format driver maps, the file reads as zeroes; a hole reads as
 * zeroes too. Errors only cost the extra information, as in QEMU. Returns 0, or 1 (waiting:
 * a format node as the file). */
static int ask_file_for_zeroes(struct block_status *st, const struct block_status_call *c,
                               struct answer *a)
{
    struct answer f;
    int ret = ask(st, c->file, true, c->map, a->pnum, &f);

    if (ret != 0)
        return ret == 1;
    if (f.pnum == 0) {
        a->flags |= BLOCK_STATUS_ZERO;
    } else {
        a->pnum = f.pnum;
        a->flags |= f.flags & BLOCK_STATUS_ZERO;
    }
    return 0;
}

void block_status_pass(struct block_status_call *c, struct block_node *child, uint64_t map)
{
    c->pnum = c->len;
    c->flags = BLOCK_STATUS_RAW;
    c->map = map;
    c->file = child;
}

/* The driver's call: what n has no driver op for, a node over a child passes to it and
 * one without it holds data. */
static int call_driver(struct block_node *n, struct block_status_call *c)
{
    if (n->drv->block_status)
        return n->drv->block_status(n, c);
    if (n->file) {
        block_status_pass(c, n->file, c->offset);
    } else {
        c->pnum = c->len;
        c->flags = BLOCK_STATUS_DATA;
    }
    return 0;
}

/* One node's answer for [offset, offset + len): 0, 1 (waiting), or -errno. */
static int ask(struct block_status *st, struct block_node *n, bool want_zero, uint64_t offset,
               uint64_t len, struct answer *a)
{
    struct block_status_call c = { .offset = offset, .len = len, .want_zero = want_zero,
                                   .st = st };
    int ret;

    *a = (struct answer){0};
    /* Over a child, the size is fixed; a protocol node answers past its end itself. */
    if (n->file) {
        if (offset >= n->size)
            return 0;
        c.len = MIN(len, n->size - offset);
    }
    ret = call_driver(n, &c);
    if (ret != 0)
        return ret;
    ASSERT(c.pnum > 0 && c.pnum <= c.len);
    if (c.flags & BLOCK_STATUS_RAW)
        return ask(st, c.file, want_zero, c.map, c.pnum, a);
    a->pnum = c.pnum;
    a->flags = c.flags & (BLOCK_STATUS_DATA | BLOCK_STATUS_ZERO);
    if (a->flags)
        a->flags |= BLOCK_STATUS_ALLOCATED;
    else if (n->drv->open_backing && (!n->backing || (want_zero && offset >= n->backing->size)))
        a->flags |= BLOCK_STATUS_ZERO;  /* reads as zeroes, but not allocated here */
    if (want_zero && (c.flags & BLOCK_STATUS_RECURSE) && c.file && c.file != n &&
        (c.flags & BLOCK_STATUS_OFFSET_VALID) && a->flags == (BLOCK_STATUS_DATA |
                                                              BLOCK_STATUS_ALLOCATED))
        return ask_file_for_zeroes(st, &c, a);
    return 0;
}

/* The query's answer: the top node's, or where it leaves the range unallocated, the first
 * node down its backing chain that allocates it. Past the end of a shorter backing node,
 * the range reads as zeroes allocated there. Returns 0, 1 (waiting) or -errno. */
static int walk(struct block_status *st)
{
    struct block_node *n = st->node;
    uint64_t len = st->len;
    struct answer a = {0};
    int ret;

    st->depth = 0;
    for (struct block_node *p = n; p; p = p->backing) {
        ret = ask(st, p, st->want_zero, st->offset, len, &a);
        if (ret != 0)
            return ret;
        st->depth++;
        if (a.pnum == 0)  /* past the end of a shorter backing node, or of a shrunk file */
            a = (struct answer){ len, BLOCK_STATUS_ZERO | BLOCK_STATUS_ALLOCATED };
        len = a.pnum;
        if (a.flags & BLOCK_STATUS_ALLOCATED)
            break;
    }
    st->pnum = len;
    st->flags = a.flags;
    if (!(a.flags & BLOCK_STATUS_ALLOCATED))
        st->depth = 0;
    return 0;
}

static void deferred_done(struct loop *loop, void *opaque)
{
    struct block_status *st = opaque;

    st->done(st, st->ret);
}

void node_block_status(struct block_node *n, struct block_status *st)
{
    ASSERT(st->done && st->len > 0 && st->offset < n->size && st->len <= n->size - st->offset);
    st->node = n;
    st->done_call = LOOP_DEFERRED_INIT(deferred_done, st);
    st->ret = walk(st);
    if (st->ret != 1)
        loop_defer(n->graph->loop, &st->done_call);
}

void block_status_resume(struct block_status *st, int ret)
{
    if (ret == 0)
        ret = walk(st);
    if (ret != 1)
        st->done(st, ret);
}
