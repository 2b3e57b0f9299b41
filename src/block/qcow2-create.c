/* blockdev-create for qcow2: an empty image written through the node named by "file".
 *
 * The options are checked in QEMU's order (qcow2_co_create()), each failure failing the job
 * with QEMU's text; what thinblk does not do (preallocation other than "off", encryption,
 * external data files, extended L2 entries, zstd compression) fails the same way, worded as
 * QEMU words its own limits. The image (qcow2-layout.h) is then written from offset 0 up, in
 * chunks, through node_submit(): the header first, as QEMU writes it, then the refcount
 * structures and the L1 table, then a flush. A regular file grows as it is written; the file
 * node's size is then re-read, as QEMU refreshes it, so the new image opens over that node.
 */
#include <errno.h>
#include <string.h>

#include "block/create.h"
#include "block/graph.h"
#include "block/qcow2-layout.h"
#include "common/qjson.h"
#include "common/util.h"
#include "job/job.h"

#define CHUNK_BYTES (1u << 20)

static const char *const versions[] = { "v2", "v3", NULL };
static const char *const compression_types[] = { "zlib", "zstd", NULL };

/* QEMU's BlockdevCreateOptionsQcow2. */
const struct schema_member qcow2_create_opts[] = {
    BLOCK_REF_MEMBER("file"),
    BLOCK_REF_MEMBER("data-file", .optional = true),
    { "data-file-raw", SCHEMA_BOOL, .optional = true },
    { "extended-l2", SCHEMA_BOOL, .optional = true },
    { "size", SCHEMA_UINT64 },
    { "version", SCHEMA_ENUM, .optional = true, .values = versions },
    { "backing-file", SCHEMA_STR, .optional = true },
    { "backing-fmt", SCHEMA_ENUM, .optional = true, .values = block_driver_names },
    { "encrypt", SCHEMA_OBJECT, .optional = true },
    { "cluster-size", SCHEMA_UINT64, .optional = true },
    { "preallocation", SCHEMA_ENUM, .optional = true, .values = block_prealloc_names },
    { "lazy-refcounts", SCHEMA_BOOL, .optional = true },
    { "refcount-bits", SCHEMA_INT, .optional = true },
    { "compression-type", SCHEMA_ENUM, .optional = true, .values = compression_types },
    { NULL },
};

struct qcow2_create {
    struct block_create *c;
    struct block_node *node;   /* the file node; a reference */
    struct qcow2_layout l;
    struct block_req req;
    void *buf;                 /* CHUNK_BYTES, aligned */
    uint64_t pos;              /* next byte to write */
    uint64_t end;              /* meta_end, rounded up to the node's alignment */
    bool flushing;
};

#define V3_ONLY "compatibility level 1.1 and above (use version=v3 or greater)"

static bool opt_bool(json_t *opts, const char *name)
{
    return json_is_true(json_object_get(opts, name));
}

/* The options' values checked as QEMU's qcow2_co_create() does, in its order, into l.
 * Returns 0 or -1 with *errp set. */
static int check_values(json_t *o, struct qcow2_layout *l, struct error **errp)
{
    const char *s;
    json_t *v;

    l->size = qjson_uint64(json_object_get(o, "size"));
    if (l->size % 512) {
        error_setg(errp, "Image size must be a multiple of 512 bytes");
        return -1;
    }
    s = json_string_value(json_object_get(o, "version"));
    l->version = s && strcmp(s, "v2") == 0 ? 2 : 3;

    uint64_t cs = 65536;
    if ((v = json_object_get(o, "cluster-size")))
        cs = qjson_uint64(v);
    if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1))) {
        error_setg(errp, "Cluster size must be a power of two between 512 and 2048k");
        return -1;
    }
    bool extended_l2 = opt_bool(o, "extended-l2");
    if (extended_l2 && cs < 16384) {
        error_setg(errp, "Extended L2 entries are only supported with cluster sizes of at "
                   "least 16384 bytes");
        return -1;
    }
    l->cluster_bits = (uint32_t)__builtin_ctzll(cs);

    const char *prealloc = json_string_value(json_object_get(o, "preallocation"));
    l->backing_file = json_string_value(json_object_get(o, "backing-file"));
    l->backing_fmt = json_string_value(json_object_get(o, "backing-fmt"));
    if (l->backing_file && prealloc && strcmp(prealloc, "off") != 0 && !extended_l2) {
        error_setg(errp, "Backing file and preallocation can only be used at the same time "
                   "if extended_l2 is on");
        return -1;
    }
    if (prealloc && strcmp(prealloc, "off") != 0) {
        error_setg(errp, "Unsupported preallocation mode '%s'", prealloc);
        return -1;
    }
    if (l->backing_fmt && !l->backing_file) {
        error_setg(errp, "Backing format cannot be used without backing file");
        return -1;
    }
    l->lazy_refcounts = opt_bool(o, "lazy-refcounts");
    if (l->version < 3 && l->lazy_refcounts) {
        error_setg(errp, "Lazy refcounts only supported with " V3_ONLY);
        return -1;
    }
    json_int_t bits = 16;
    if ((v = json_object_get(o, "refcount-bits")))
        bits = json_integer_value(v);
    if (bits <= 0 || bits > 64 || (bits & (bits - 1))) {
        error_setg(errp, "Refcount width must be a power of two and may not exceed 64 bits");
        return -1;
    }
    if (l->version < 3 && bits != 16) {
        /* QEMU says "or above" here, "and above" in the others. */
        error_setg(errp, "Different refcount widths than 16 bits require compatibility "
                   "level 1.1 or above (use version=v3 or greater)");
        return -1;
    }
    l->refcount_order = (uint32_t)__builtin_ctzll((unsigned long long)bits);

    bool has_data_file = json_object_get(o, "data-file") != NULL;
    if (opt_bool(o, "data-file-raw") && !has_data_file) {
        error_setg(errp, "data-file-raw requires data-file");
        return -1;
    }
    s = json_string_value(json_object_get(o, "compression-type"));
    if (s && strcmp(s, "zlib") != 0) {
        if (l->version < 3)
            error_setg(errp, "Non-zlib compression type is only supported with " V3_ONLY);
        else
            error_setg(errp, "Unknown compression type");  /* QEMU's, built without zstd */
        return -1;
    }
    if (extended_l2) {
        if (l->version < 3)
            error_setg(errp, "Extended L2 entries are only supported with " V3_ONLY);
        else
            error_setg(errp, "Extended L2 entries are not supported");
        return -1;
    }
    if (has_data_file) {
        if (l->version < 3)
            error_setg(errp, "External data files are only supported with " V3_ONLY);
        else
            error_setg(errp, "External data files are not supported");
        return -1;
    }
    if (json_object_get(o, "encrypt")) {
        error_setg(errp, "Encrypted qcow2 images are not supported");
        return -1;
    }
    return 0;
}

/* The node the image goes to: a node name (QEMU looks it up as a device or node name) or
 * options for a new one. Returns it with a reference, or NULL with *errp set. */
static struct block_node *open_file(struct block_graph *g, json_t *ref, struct error **errp)
{
    struct block_node *n;

    if (json_is_string(ref)) {
        const char *name = json_string_value(ref);
        n = block_graph_find(g, name);
        if (!n) {
            error_setg(errp, "Cannot find device='%s' nor node-name='%s'", name, name);
            return NULL;
        }
        block_node_ref(n);
    } else {
        n = block_node_open_child(g, ref, errp);
        if (!n)
            return NULL;
    }
    if (n->read_only) {
        error_setg(errp, "Block node is read-only");
        block_node_unref(n);
        return NULL;
    }
    return n;
}

/* After writing past its end, a regular file is larger: re-read the sizes from the bottom
 * of the chain up (the filters over it pass the file's size through). */
static void refresh_sizes(struct block_node *n)
{
    if (n->file)
        refresh_sizes(n->file);
    if (n->drv == &block_driver_file || n->drv == &block_driver_host_device)
        file_node_refresh_size(n);
    else if (n->drv == &block_driver_fault)
        n->size = n->file->size;
}

static void finish(struct qcow2_create *q, struct error *err)
{
    struct block_create *c = q->c;

    if (q->node) {
        refresh_sizes(q->node);  /* even after a failure: some of it may be written */
        block_node_unref(q->node);
    }
    free(q->buf);
    free(q);
    block_create_finish(c, err);
}

static void write_next(struct qcow2_create *q);

static void write_done(struct block_req *req, int ret)
{
    struct qcow2_create *q = req->opaque;
    struct error *err = NULL;

    if (ret < 0) {
        /* QEMU's texts: the header goes first, then the refcount structures. */
        error_setg_errno(&err, -ret, q->flushing ? "Could not flush the image"
                         : req->offset == 0 ? "Could not write qcow2 header"
                         : "Could not write refcount table");
        finish(q, err);
        return;
    }
    if (q->flushing || job_is_cancelled(q->c->job)) {
        finish(q, NULL);  /* job_finish() turns a cancel into its error */
        return;
    }
    write_next(q);
}

static void write_next(struct qcow2_create *q)
{
    struct block_req *req = &q->req;

    *req = (struct block_req){ .done = write_done, .opaque = q };
    if (q->pos >= q->end) {
        q->flushing = true;
        req->op = BLOCK_OP_FLUSH;
    } else {
        req->op = BLOCK_OP_WRITE;
        req->offset = q->pos;
        req->len = MIN(q->end - q->pos, CHUNK_BYTES);
        req->buf = q->buf;
        qcow2_layout_fill(&q->l, req->offset, q->buf, req->len);
        q->pos += req->len;
    }
    node_submit(q->node, req);
}

void qcow2_create_run(struct block_create *c)
{
    struct qcow2_create *q = xzalloc(sizeof(*q));
    struct error *err = NULL;

    q->c = c;
    q->node = open_file(c->graph, json_object_get(c->opts, "file"), &err);
    if (!q->node || check_values(c->opts, &q->l, &err) < 0 ||
        qcow2_layout_compute(&q->l, &err) < 0) {
        finish(q, err);
        return;
    }
    /* Whole chunks of the node's alignment (cache.direct); zeroes pad the last one. */
    uint32_t align = MAX(q->node->alignment, 1u);
    q->end = (q->l.meta_end + align - 1) / align * align;
    if (posix_memalign(&q->buf, 4096, CHUNK_BYTES) != 0)
        abort();
    write_next(q);
}
