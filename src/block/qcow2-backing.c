/* qcow2 backing files: opening the chain, reading through it, copy-on-write from it.
 *
 * The backing node is the node's `backing` child in the graph (a reference). It comes from
 * the "backing" option: a node name, inline options (an implicit node), or null (none: the
 * image reads as if it had no backing file). Without the option, the image header's backing
 * file name is opened, as QEMU does: a relative name is taken relative to the directory of
 * the image's file (plain concatenation, no normalisation, as QEMU's path_combine()), the
 * format is the backing format extension's or, without one, probed (qcow2 magic, else raw),
 * and the node is opened read-only with a generated "#blockN" name. Such chains open
 * recursively (each qcow2 opens its own backing); a file already open further up the chain
 * (a loop) or a chain deeper than MAX_CHAIN_DEPTH is refused with an error. We never write
 * to a backing node.
 *
 * Reads of an unallocated cluster fall through to the backing node (zeroes past its size);
 * zero clusters read zeroes and do not. A write that allocates a cluster it covers only in
 * part fills the rest from the backing (qcow2_backing_fill(), called by qcow2-alloc.c).
 *
 * Note: an image names its backing file, and opening it is what QEMU does; a hostile image
 * can so name any file the daemon can read. Management that does not trust its images gives
 * "backing" explicitly (a node name or null), as libvirt does.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/qcow2-backing.h"

#include "block/qcow2.h"
#include "block/qcow2-cache.h"
#include "common/iov.h"
#include "common/log.h"
#include "common/qjson.h"
#include "common/util.h"

#define MAX_CHAIN_DEPTH 128     /* qcow2 images opened one inside another's open */

void qcow2_backing_cleanup(struct qcow2_state *s)
{
    free(s->bk.name);
    free(s->bk.fmt);
    json_decref(s->bk.opt);
    s->bk.name = s->bk.fmt = NULL;
    s->bk.opt = NULL;
}

/* ---- opening the chain ----------------------------------------------------------------- */

/* The host file under n (the node that has a file name). */
static struct block_node *host_file(struct block_node *n)
{
    while (!n->drv->filename && n->file)
        n = n->file;
    return n;
}

static const char *host_filename(struct block_node *n)
{
    struct block_node *f = host_file(n);

    return f->drv->filename ? f->drv->filename(f) : "";
}

/* QEMU's path_combine(): name relative to the directory of base. Caller frees. */
static char *resolve(const char *base, const char *name)
{
    const char *slash = strrchr(base, '/');

    if (name[0] == '/' || !slash)
        return xstrdup(name);
    return xasprintf("%.*s%s", (int)(slash - base + 1), base, name);
}

/* A name with a protocol prefix ("nbd:...", "json:{...}"): a ':' before any '/'. */
static bool has_protocol(const char *name)
{
    size_t i = strcspn(name, ":/");

    return name[i] == ':';
}

/* The format of the file at path, as QEMU probes it among the formats we have. */
static const char *probe_format(const char *path)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    uint8_t magic[4];

    if (fd >= 0 && pread(fd, magic, 4, 0) == 4 && qcow2_be32(magic) == QCOW2_MAGIC)
        return "qcow2";
    return "raw";  /* also when it cannot be opened: the file node then says why */
}

/* Refuse a file already open further up this chain (a loop), or a chain too deep. The nodes
 * up the chain are still opening: each is the opener of the next. */
static int check_chain(struct block_node *n, const char *path, const char *name,
                       struct error **errp)
{
    struct stat st;
    bool have = stat(path, &st) == 0;
    unsigned depth = 0;

    for (struct block_node *p = n; p; p = p->opener) {
        if (p->drv != &block_driver_qcow2 || !p->opaque)
            continue;
        struct qcow2_state *ps = p->opaque;
        if (have && ps->bk.have_img_id && ps->bk.img_dev == st.st_dev && ps->bk.img_ino == st.st_ino) {
            error_setg(errp, "Backing file '%s' creates an infinite loop", name);
            return -1;
        }
        if (++depth >= MAX_CHAIN_DEPTH) {
            error_setg(errp, "Backing file '%s': the backing chain is deeper than %u images",
                       name, MAX_CHAIN_DEPTH);
            return -1;
        }
    }
    return 0;
}

/* Options that open the backing file the image names, or NULL with *errp set. */
static json_t *implicit_options(struct block_node *n, struct error **errp)
{
    struct qcow2_state *s = n->opaque;
    const char *name = s->bk.name;
    struct stat st;

    if (has_protocol(name)) {
        error_setg(errp, "Backing file '%s': protocols and json: names are not supported; "
                   "give the backing node with the 'backing' option", name);
        return NULL;
    }
    _cleanup_free_ char *path = resolve(host_filename(n), name);
    if (check_chain(n, path, name, errp) < 0)
        return NULL;
    const char *fmt = s->bk.fmt ? s->bk.fmt : probe_format(path);
    const char *proto = stat(path, &st) == 0 && S_ISBLK(st.st_mode) ? "host_device" : "file";
    json_t *file = json_pack("{s:s,s:s}", "driver", proto, "filename", path);
    if (!file) {
        error_setg(errp, "Backing file name '%s' is not valid UTF-8", name);
        return NULL;
    }
    if (strcmp(fmt, "file") == 0 || strcmp(fmt, "host_device") == 0) {
        json_object_set_new(file, "read-only", json_true());
        return file;
    }
    return json_pack("{s:s,s:o,s:b}", "driver", fmt, "file", file, "read-only", 1);
}

/* Whether n is reachable from b through file and backing children. */
static bool reaches(struct block_node *b, struct block_node *n)
{
    for (; b; b = b->file) {
        if (b == n || (b->backing && reaches(b->backing, n)))
            return true;
    }
    return false;
}

int qcow2_backing_open(struct block_node *n, struct error **errp)
{
    struct qcow2_state *s = n->opaque;
    struct stat st;
    json_t *opts;
    struct block_node *b;

    if (stat(host_filename(n), &st) == 0) {
        s->bk.have_img_id = true;
        s->bk.img_dev = st.st_dev;
        s->bk.img_ino = st.st_ino;
    }
    if (s->bk.null || (!s->bk.opt && !s->bk.name))
        return 0;
    if (json_is_string(s->bk.opt) &&
        !block_graph_find(n->graph, json_string_value(s->bk.opt))) {
        error_setg(errp, "Could not open backing file: Cannot find device='%s' nor "
                   "node-name='%s'", json_string_value(s->bk.opt),
                   json_string_value(s->bk.opt));
        return -1;
    }
    if (s->bk.opt) {
        opts = json_incref(s->bk.opt);
        if (qjson_is_object(opts)) {  /* a backing node is read-only unless asked otherwise */
            json_t *copy = json_deep_copy(opts);
            json_decref(opts);
            opts = copy;
            if (!json_object_get(opts, "read-only"))
                json_object_set_new(opts, "read-only", json_true());
        }
    } else {
        /* From the image, not checked yet: checked as blockdev-add's would be. */
        opts = implicit_options(n, errp);
        if (opts && schema_check(block_options, opts, errp) < 0) {
            json_decref(opts);
            opts = NULL;
        }
        if (!opts) {
            error_prepend(errp, "Could not open backing file: ");
            return -1;
        }
    }
    b = block_node_open_child(n->graph, opts, errp);
    json_decref(opts);
    if (!b) {
        error_prepend(errp, "Could not open backing file: ");
        return -1;
    }
    if (reaches(b, n)) {
        error_setg(errp, "Making '%s' a backing child of '%s' would create a cycle",
                   b->node_name, n->node_name);
        block_node_unref(b);
        return -1;
    }
    n->backing = b;
    s->bk.implicit = !s->bk.opt;
    json_decref(s->bk.opt);
    s->bk.opt = NULL;
    return 0;
}

/* ---- queries --------------------------------------------------------------------------- */

bool qcow2_backing_overridden(struct block_node *n)
{
    struct qcow2_state *s = n->opaque;

    if (s->bk.implicit)
        return false;
    if (!n->backing)
        return s->bk.name != NULL;  /* backing=null hides the image's */
    char *name = block_node_filename(n->backing);
    bool r = strcmp(s->bk.name ? s->bk.name : "", name) != 0;
    free(name);
    return r;
}

void qcow2_query_image(struct block_node *n, json_t *image)
{
    struct qcow2_state *s = n->opaque;
    json_t *data;

    json_object_set_new(image, "cluster-size", json_integer(s->cluster_size));
    json_object_set_new(image, "dirty-flag",
                        json_boolean((s->incompat & QCOW2_INCOMPAT_DIRTY) != 0));
    if (s->version >= 3) {
        bool zstd = (s->incompat & QCOW2_INCOMPAT_COMPRESSION) &&
                    ((const uint8_t *)s->header)[104] == 1;
        data = json_pack("{s:s,s:s,s:b,s:i,s:b,s:b}", "compat", "1.1", "compression-type",
                         zstd ? "zstd" : "zlib", "lazy-refcounts", (int)(s->compat & 1),
                         "refcount-bits", 1 << s->refcount_order, "corrupt",
                         (s->incompat & QCOW2_INCOMPAT_CORRUPT) != 0, "extended-l2",
                         (s->incompat & QCOW2_INCOMPAT_EXTL2) != 0);
    } else {
        data = json_pack("{s:s,s:s,s:i}", "compat", "0.10", "compression-type", "zlib",
                         "refcount-bits", 16);
    }
    json_object_set_new(image, "format-specific",
                        json_pack("{s:s,s:o}", "type", "qcow2", "data", data));
    if (s->bk.name) {
        char *full = has_protocol(s->bk.name) ? xstrdup(s->bk.name)
                                                   : resolve(host_filename(n), s->bk.name);
        json_object_set_new(image, "backing-filename", json_string(s->bk.name));
        json_object_set_new(image, "full-backing-filename", json_string(full));
        free(full);
        if (s->bk.fmt)
            json_object_set_new(image, "backing-filename-format", json_string(s->bk.fmt));
    }
}

/* ---- reads through the backing --------------------------------------------------------- */

/* One read of guest bytes from the backing node: the part inside the backing's size, into
 * the destination's vector cut to it, or through a bounce buffer where offset, length or
 * memory are not aligned for the backing. */
struct backing_read {
    struct block_req req;
    struct qcow2_waiter lw;    /* fills: the L2 table lookup */
    struct qcow2_state *s;
    uint64_t voff;
    const struct iovec *dst;   /* where the bytes go: a read part's vector, or &one */
    unsigned ndst;
    struct iovec one;          /* a fill's cluster buffer */
    struct iovec *iov;         /* dst cut to the backing's end */
    uint32_t len;              /* bytes wanted at dst */
    uint32_t skip;             /* where they start in the bounce buffer */
    void *bounce;
    struct qcow2_part *p;      /* a read part, or */
    struct qcow2_waiter *w;    /* a fill's waiter */
};

static void backing_read_finish(struct backing_read *br, int ret)
{
    if (br->p)
        qcow2_part_done(br->p, ret);
    else
        br->w->cb(br->w, ret);
    free(br->bounce);
    free(br->iov);
    free(br);
}

static void backing_read_done(struct block_req *req, int ret)
{
    struct backing_read *br = container_of(req, struct backing_read, req);

    if (ret == 0 && br->bounce)
        iov_from_buf(br->dst, br->ndst, 0, (char *)br->bounce + br->skip, br->len);
    backing_read_finish(br, ret);
}

/* Start the read: returns 1 if a request is under way, 0 if everything was past the end of
 * the backing (dst is zeroes and nothing was submitted). */
static int backing_read_start(struct backing_read *br)
{
    struct block_node *b = br->s->node->backing;
    uint64_t a = MAX(b->alignment, 1u);
    uint64_t n, start, end;
    unsigned niov;

    if (br->voff >= b->size) {
        iov_memset(br->dst, br->ndst, 0, 0, br->len);
        return 0;
    }
    n = MIN((uint64_t)br->len, b->size - br->voff);
    iov_memset(br->dst, br->ndst, n, 0, br->len - n);
    start = br->voff & ~(a - 1);
    end = (br->voff + n + a - 1) & ~(a - 1);
    br->req = (struct block_req){.op = BLOCK_OP_READ, .offset = start, .len = end - start,
                                 .done = backing_read_done};
    niov = iov_slice(br->dst, br->ndst, 0, n, NULL);
    br->iov = xmalloc(niov * sizeof(br->iov[0]));
    iov_slice(br->dst, br->ndst, 0, n, br->iov);
    if (start != br->voff || end != br->voff + n || !iov_aligned(br->iov, niov, a)) {
        br->bounce = qcow2_alloc_buf(end - start);
        br->skip = (uint32_t)(br->voff - start);
        br->len = (uint32_t)n;
        br->req.buf = br->bounce;
    } else {
        br->req.iov = br->iov;
        br->req.niov = niov;
    }
    node_submit(b, &br->req);
    return 1;
}

void qcow2_backing_read(struct qcow2_state *s, struct qcow2_part *p)
{
    struct backing_read *br = xzalloc(sizeof(*br));

    br->s = s;
    br->p = p;
    br->voff = p->voff;
    br->dst = p->iov;
    br->ndst = p->niov;
    br->len = p->len;
    if (backing_read_start(br) == 0)
        backing_read_finish(br, 0);
}

/* The fill's L2 entry is known: read from the backing if the cluster is unallocated.
 * Returns as backing_read_start(), or -errno. */
static int fill_classified(struct backing_read *br, uint64_t l2e)
{
    switch (qcow2_l2e_type(l2e, br->s->cluster_bits, br->s->version, NULL)) {
    case QCOW2_UNALLOCATED:
        return backing_read_start(br);
    case QCOW2_BAD:
        return -EIO;
    default:
        return 0;  /* zero clusters read as zeroes, not as the backing */
    }
}

static void fill_lookup_done(struct qcow2_waiter *lw, int ret)
{
    struct backing_read *br = container_of(lw, struct backing_read, lw);
    uint64_t l2e;

    if (ret == 0) {
        ret = qcow2_lookup(br->s, br->voff, true, &br->lw, &l2e);
        if (ret == 1)
            return;  /* evicted again meanwhile: lw comes back */
        if (ret == 0)
            ret = fill_classified(br, l2e);
        if (ret == 1)
            return;
    }
    backing_read_finish(br, ret);
}

int qcow2_backing_fill(struct qcow2_state *s, uint64_t voff, void *buf, struct qcow2_waiter *w)
{
    struct backing_read *br;
    uint64_t l2e;
    int ret;

    if (!s->node->backing)
        return 0;
    br = xzalloc(sizeof(*br));
    br->s = s;
    br->w = w;
    br->voff = voff & ~(uint64_t)(s->cluster_size - 1);
    br->one = (struct iovec){buf, s->cluster_size};
    br->dst = &br->one;
    br->ndst = 1;
    br->len = s->cluster_size;
    br->lw.cb = fill_lookup_done;
    ret = qcow2_lookup(s, br->voff, true, &br->lw, &l2e);
    if (ret == 1)
        return 1;
    if (ret == 0)
        ret = fill_classified(br, l2e);
    if (ret != 1) {
        free(br->bounce);
        free(br->iov);
        free(br);
    }
    return ret;
}
