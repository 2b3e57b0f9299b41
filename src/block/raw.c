/* The "raw" format driver: the child's bytes, or a window of them (offset, size).
 *
 * Options (QEMU's BlockdevOptionsRaw): file (a node name or inline options), offset, size.
 */
#include <inttypes.h>
#include <string.h>

#include "block/graph.h"
#include "common/util.h"

struct raw_state {
    uint64_t offset;
    bool has_size;  /* a "size" option: the window does not follow the child's size */
};

struct raw_op {
    struct block_req child;  /* the request as the child sees it */
    struct block_req *parent;
};

/* QEMU's BlockdevOptionsRaw; offset and size are ints there, refused below 0 here. */
const struct schema_member block_raw_options[] = {
    BLOCK_REF_MEMBER("file"),
    { "offset", SCHEMA_INT, .optional = true, .min = 0, .max = INT64_MAX, .range_name = "uint64" },
    { "size", SCHEMA_INT, .optional = true, .min = 0, .max = INT64_MAX, .range_name = "uint64" },
    { NULL },
};

static int raw_open(struct block_node *n, json_t *opts, struct error **errp)
{
    json_t *size_opt = json_object_get(opts, "size");
    uint64_t offset = (uint64_t)json_integer_value(json_object_get(opts, "offset"));
    uint64_t size = (uint64_t)json_integer_value(size_opt);
    struct block_node *child;

    child = block_node_open_child(n->graph, json_object_get(opts, "file"), errp);
    if (!child)
        return -1;
    if (!size_opt)
        size = child->size > offset ? child->size - offset : 0;
    if (offset > child->size || size > child->size - offset) {
        error_setg(errp, "The sum of offset (%" PRIu64 ") and size (%" PRIu64 ") has to be "
                   "smaller or equal to the  actual size of the containing file (%" PRIu64 ")",
                   offset, size, child->size);
        block_node_unref(child);
        return -1;
    }
    if (offset % child->alignment) {
        error_setg(errp, "offset must be a multiple of %" PRIu32, child->alignment);
        block_node_unref(child);
        return -1;
    }
    struct raw_state *s = xzalloc(sizeof(*s));
    s->offset = offset;
    s->has_size = size_opt != NULL;
    n->opaque = s;
    n->file = child;
    n->size = size;
    n->alignment = child->alignment;
    n->read_only = n->read_only || child->read_only;
    return 0;
}

static void raw_close(struct block_node *n)
{
    free(n->opaque);
}

static void raw_done(struct block_req *child, int ret)
{
    struct raw_op *op = container_of(child, struct raw_op, child);
    struct block_req *parent = op->parent;

    free(op);
    parent->done(parent, ret);
}

static void raw_submit(struct block_node *n, struct block_req *req)
{
    struct raw_state *s = n->opaque;
    struct raw_op *op = xmalloc(sizeof(*op));

    op->child = *req;
    op->child.offset = req->offset + s->offset;
    op->child.done = raw_done;
    op->parent = req;
    node_submit(n->file, &op->child);
}

/* QEMU's raw_co_truncate(): the child is resized to hold the window, which follows it
 * (raw_child_resized()). */
static int raw_resize_child(struct block_node *n, uint64_t size, uint64_t *child_size,
                            struct error **errp)
{
    struct raw_state *s = n->opaque;

    if (s->has_size) {
        error_setg(errp, "Cannot resize fixed-size raw disks");
        return -1;
    }
    if (INT64_MAX - size < s->offset) {
        error_setg(errp, "Disk size too large for the chosen offset");
        return -1;
    }
    *child_size = size + s->offset;
    return 0;
}

static void raw_child_resized(struct block_node *n)
{
    struct raw_state *s = n->opaque;

    if (!s->has_size)
        block_node_set_size(n, n->file->size > s->offset ? n->file->size - s->offset : 0);
}

static bool raw_keeps_child_size(struct block_node *n)
{
    return ((struct raw_state *)n->opaque)->has_size;
}

/* The child's status at the window's offset. */
static int raw_block_status(struct block_node *n, struct block_status_call *c)
{
    struct raw_state *s = n->opaque;

    block_status_pass(c, n->file, c->offset + s->offset);
    return 0;
}

const struct block_driver block_driver_raw = {
    .name = "raw",
    .open = raw_open,
    .close = raw_close,
    .submit = raw_submit,
    .resize_child = raw_resize_child,
    .child_resized = raw_child_resized,
    .keeps_child_size = raw_keeps_child_size,
    .block_status = raw_block_status,
};
