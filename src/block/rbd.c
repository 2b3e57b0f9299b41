/* The "rbd" protocol driver: a Ceph RBD image through librbd's asynchronous API.
 *
 * Options (QEMU's BlockdevOptionsRbd): pool and image (required), namespace, conf (a
 * ceph.conf; without it librbd's default search), user (the client id, "admin" by default),
 * snapshot (opens the snapshot, read-only), auth-client-required (a list of "cephx" and
 * "none", set as auth_client_required), server (the monitors, set as mon_host over the conf
 * file's), key-secret (a secret object holding the user's cephx key, its raw bytes, as
 * QEMU: their base64 is set as librados' "key" over any keyring, so a libvirt-style secret,
 * encrypted with a master key, works too; the graph looks it up on the loop thread, see
 * block_driver.secret_option).
 * thinblk's own __org.thinblk_op-timeout (seconds, default 30) bounds what waits on the
 * cluster: it is client_mount_timeout, rados_mon_op_timeout and rados_osd_op_timeout, so an
 * unreachable cluster gives ETIMEDOUT (librados needs about twice the value) instead of a
 * request that never ends.
 *
 * Completions: librbd calls back on its own threads; the callback puts the op on a list under
 * a mutex and writes an eventfd that the loop watches, and the loop thread completes the
 * requests. Nothing on the loop thread waits for an I/O: reads, writes, discards,
 * write-zeroes and flushes are rbd_aio_*; block status (rbd_diff_iterate2, which lists the
 * objects' snapshots, I/O) runs on a thread of the node's own that reports through the same
 * list. What waits on the cluster otherwise runs on the offload thread (job/offload.h), QMP
 * answering later (a deferred reply): connecting and opening for blockdev-add, of the node
 * added or an inline child of it (the driver's prepare, rbd_prepare(); the node is then made
 * on the loop thread from the open image), rbd_resize for block_resize, through raw nodes too
 * (truncate_blocking), and closing (rbd_close, rados_shutdown, with the node already out of
 * the graph). Still on the loop thread, bounded by the op timeout: opening at --blockdev
 * (open calls rbd_prepare() itself) and closing at block_graph_free() (shutdown).
 * rbd_get_size() (the queries' size) reads librbd's cached header, which it
 * refreshes first when the header changed (another client resized the image).
 *
 * librbd's cache is always off (rbd_cache=false). Its default mode in 16.2, writearound,
 * completes a write as soon as it is sent to the OSDs and reports the write's error at the
 * next flush instead (measured: a write into a full pool "succeeded", the flush after it failed
 * with EDQUOT, and the flush retried on cont succeeded with the data never written). The error
 * policy parks and retries the request that failed, so each write must report its own result.
 * QEMU 7.2 turns the cache on unless cache.direct=on (whether its werror=stop retries lose
 * data the same way was not measured).
 *
 * A full pool: rados_set_pool_full_try() on the I/O context before rbd_open(). Without it,
 * librados holds every write to a pool flagged full (and the open itself) until the flag goes;
 * with it, a write that would grow the pool fails at once with EDQUOT (a quota) or ENOSPC (a
 * full cluster), which the device's error policy takes as "no space" (device.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "block/create.h"
#include "block/graph.h"
#include "common/log.h"
#include "common/qjson.h"
#include "common/util.h"
#include "job/offload.h"
#include "loop/loop.h"
#include "tls/secret.h"

#define RBD_DEFAULT_OP_TIMEOUT 30
#define DIFF_MAX_LEN (1ull << 30)  /* bytes one rbd_diff_iterate2 looks at */

struct rbd_op;

/* The last rbd_diff_iterate2 answer: the allocated extents of [start, end). */
struct rbd_diff {
    bool running;          /* the thread is working */
    bool valid;            /* extents describe [start, end) as of gen */
    uint64_t gen;          /* rbd_state.write_gen when the answer came */
    uint64_t start, end;
    int ret;               /* the thread's: 0 or -errno */
    uint64_t (*ext)[2];    /* offset, length; sorted */
    size_t n_ext, cap_ext;
    pthread_t thread;
    struct block_status **waiting;  /* queries to resume when the thread is done */
    size_t n_waiting;
};

struct rbd_state {
    struct block_node *node;
    rados_t cluster;
    rados_ioctx_t io;
    rbd_image_t image;
    char *filename;        /* for queries: QEMU's "json:{...}" */
    uint64_t size;         /* at open (rbd_prepare()); then the node's */
    uint64_t obj_size;     /* bytes of each RADOS object: QEMU's cluster-size */
    int efd;               /* written by librbd's threads when ops are done */
    pthread_mutex_t lock;  /* protects done_head, done_tail */
    struct rbd_op *done_head, *done_tail;
    struct rbd_op *diff_op;  /* the diff thread's completion marker */
    uint64_t write_gen;    /* bumped by every write, write-zeroes, discard: diff answers age */
    struct rbd_diff diff;  /* loop thread only, but for the thread's ext and ret */
};

/* One request at librbd (or one diff). */
struct rbd_op {
    struct rbd_op *next;   /* rbd_state.done_* */
    struct rbd_state *s;
    struct block_req *req; /* NULL: the diff thread's marker */
    ssize_t ret;           /* librbd's answer, set by the callback */
    bool fua_flush;        /* the flush after a FUA write is running */
    struct loop_deferred done_call;  /* completing without librbd */
};

static struct rbd_state *st(struct block_node *n)
{
    return n->opaque;
}

static const char *const auth_values[] = { "cephx", "none", NULL };
static const struct schema_member auth_mode = { "", SCHEMA_ENUM, .values = auth_values };

static const struct schema_member inet_address[] = {
    { "host", SCHEMA_STR },
    { "port", SCHEMA_STR },
    { NULL },
};
static const struct schema_member inet_element = { "", SCHEMA_OBJECT, .members = inet_address };

/* QEMU's BlockdevOptionsRbd (7.2, without "encrypt"), and thinblk's op timeout. */
const struct schema_member block_rbd_options[] = {
    { "pool", SCHEMA_STR },
    { "namespace", SCHEMA_STR, .optional = true },
    { "image", SCHEMA_STR },
    { "conf", SCHEMA_STR, .optional = true },
    { "snapshot", SCHEMA_STR, .optional = true },
    { "user", SCHEMA_STR, .optional = true },
    { "auth-client-required", SCHEMA_ARRAY, .optional = true, .element = &auth_mode },
    { "key-secret", SCHEMA_STR, .optional = true },
    { "server", SCHEMA_ARRAY, .optional = true, .element = &inet_element },
    { "__org.thinblk_op-timeout", SCHEMA_INT, .optional = true, .min = 1, .max = 86400,
      .range_name = "an integer between 1 and 86400" },
    { NULL },
};

/* ---- completions ------------------------------------------------------------------------ */

/* Any thread: op is done; the loop thread finishes it (on_efd()). */
static void post_done(struct rbd_state *s, struct rbd_op *op)
{
    uint64_t one = 1;

    op->next = NULL;
    pthread_mutex_lock(&s->lock);
    if (s->done_tail)
        s->done_tail->next = op;
    else
        s->done_head = op;
    s->done_tail = op;
    pthread_mutex_unlock(&s->lock);
    while (write(s->efd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

/* librbd's thread. */
static void aio_callback(rbd_completion_t c, void *arg)
{
    struct rbd_op *op = arg;

    op->ret = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    post_done(op->s, op);
}

static void op_finish(struct rbd_op *op, int ret)
{
    struct block_req *req = op->req;

    free(op);
    req->done(req, ret);
}

static void diff_finished(struct rbd_state *s);
static void op_start(struct rbd_op *op);

static void op_done(struct rbd_op *op)
{
    struct block_req *req = op->req;
    int ret = op->ret < 0 ? (int)op->ret : 0;

    if (req->op == BLOCK_OP_WRITE || req->op == BLOCK_OP_WRITE_ZEROES ||
        req->op == BLOCK_OP_DISCARD)
        op->s->write_gen++;  /* a diff that ran meanwhile may not have seen it */
    if (ret == 0 && req->op == BLOCK_OP_READ && (uint64_t)op->ret != req->len)
        ret = -EIO;  /* librbd answers the bytes read: all of them, within the image */
    if (ret == 0 && (req->flags & BLOCK_REQ_FUA) && !op->fua_flush) {
        op->fua_flush = true;
        op_start(op);
        return;
    }
    op_finish(op, ret);
}

static void on_efd(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct rbd_state *s = opaque;
    struct rbd_op *list;
    uint64_t v;

    if (read(fd, &v, sizeof(v)) < 0 && errno == EAGAIN)
        return;
    pthread_mutex_lock(&s->lock);
    list = s->done_head;
    s->done_head = s->done_tail = NULL;
    pthread_mutex_unlock(&s->lock);
    while (list) {
        struct rbd_op *op = list;
        list = op->next;
        if (op->req)
            op_done(op);
        else
            diff_finished(s);
    }
}

/* ---- requests ---------------------------------------------------------------------------- */

static void deferred_done(struct loop *loop, void *opaque)
{
    struct rbd_op *op = opaque;

    op_finish(op, (int)op->ret);
}

/* Complete op with ret later on the loop thread, never inside node_submit(). */
static void complete_later(struct rbd_op *op, int ret)
{
    op->ret = ret;
    op->done_call = LOOP_DEFERRED_INIT(deferred_done, op);
    loop_defer(op->s->node->graph->loop, &op->done_call);
}

static void op_start(struct rbd_op *op)
{
    struct rbd_state *s = op->s;
    struct block_req *req = op->req;
    rbd_completion_t c;
    struct iovec one;
    unsigned niov;
    const struct iovec *iov;
    int r;

    r = rbd_aio_create_completion(op, aio_callback, &c);
    if (r < 0) {
        complete_later(op, r);
        return;
    }
    if (op->fua_flush) {
        r = rbd_aio_flush(s->image, c);
    } else {
        switch (req->op) {
        case BLOCK_OP_READ:
        case BLOCK_OP_WRITE:
            iov = block_req_iov(req, &one, &niov);
            if (niov == 1 && req->op == BLOCK_OP_READ)
                r = rbd_aio_read(s->image, req->offset, req->len, iov[0].iov_base, c);
            else if (niov == 1)
                r = rbd_aio_write(s->image, req->offset, req->len, iov[0].iov_base, c);
            else if (req->op == BLOCK_OP_READ)
                r = rbd_aio_readv(s->image, iov, (int)niov, req->offset, c);
            else
                r = rbd_aio_writev(s->image, iov, (int)niov, req->offset, c);
            break;
        case BLOCK_OP_FLUSH:
            r = rbd_aio_flush(s->image, c);
            break;
        case BLOCK_OP_DISCARD:
            r = rbd_aio_discard(s->image, req->offset, req->len, c);
            break;
        case BLOCK_OP_WRITE_ZEROES:
            /* As QEMU: zeroes stay allocated unless the request may deallocate. */
            r = rbd_aio_write_zeroes(s->image, req->offset, req->len, c,
                                     (req->flags & BLOCK_REQ_MAY_UNMAP) && s->node->discard_unmap
                                         ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, 0);
            break;
        default:
            r = -EINVAL;
            break;
        }
    }
    if (r < 0) {
        /* Refused before it started: librbd does not call back. */
        rbd_aio_release(c);
        complete_later(op, r);
    }
}

static void rbd_submit(struct block_node *n, struct block_req *req)
{
    struct rbd_op *op = xzalloc(sizeof(*op));

    op->s = st(n);
    op->req = req;
    if (req->op == BLOCK_OP_WRITE || req->op == BLOCK_OP_WRITE_ZEROES ||
        req->op == BLOCK_OP_DISCARD)
        op->s->write_gen++;
    if ((req->op == BLOCK_OP_DISCARD && !n->discard_unmap) ||
        (req->op == BLOCK_OP_FLUSH && n->no_flush)) {
        complete_later(op, 0);  /* discard=ignore, cache.no-flush=on */
        return;
    }
    op_start(op);
}

/* ---- block status ------------------------------------------------------------------------ */

static int diff_cb(uint64_t offset, size_t len, int exists, void *arg)
{
    struct rbd_diff *d = arg;

    if (!exists || len == 0)
        return 0;
    if (d->n_ext > 0 && d->ext[d->n_ext - 1][0] + d->ext[d->n_ext - 1][1] == offset) {
        d->ext[d->n_ext - 1][1] += len;
        return 0;
    }
    if (d->n_ext == d->cap_ext) {
        d->cap_ext = d->cap_ext ? 2 * d->cap_ext : 16;
        d->ext = xrealloc(d->ext, d->cap_ext * sizeof(d->ext[0]));
    }
    d->ext[d->n_ext][0] = offset;
    d->ext[d->n_ext][1] = len;
    d->n_ext++;
    return 0;
}

static int ext_cmp(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;

    return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* The diff thread: the loop thread leaves s->diff alone while running is set. */
static void *diff_main(void *arg)
{
    struct rbd_state *s = arg;
    struct rbd_diff *d = &s->diff;

    d->n_ext = 0;
    d->ret = rbd_diff_iterate2(s->image, NULL, d->start, d->end - d->start, 1, 0, diff_cb, d);
    if (d->ret == 0 && d->n_ext > 1)
        qsort(d->ext, d->n_ext, sizeof(d->ext[0]), ext_cmp);
    post_done(s, s->diff_op);
    return NULL;
}

static void diff_finished(struct rbd_state *s)
{
    struct rbd_diff *d = &s->diff;
    struct block_status **waiting = d->waiting;
    size_t n = d->n_waiting;

    pthread_join(d->thread, NULL);
    d->running = false;
    d->valid = d->ret == 0;
    d->gen = s->write_gen;  /* the queries waiting take this answer, even if writes came */
    d->waiting = NULL;
    d->n_waiting = 0;
    if (d->ret < 0)
        log_warn("block node %s: rbd_diff_iterate2: %s", s->node->node_name, strerror(-d->ret));
    for (size_t i = 0; i < n; i++)
        block_status_resume(waiting[i], d->ret);
    free(waiting);
}

/* Answer c from the last diff: allocated extents are data, the rest reads as zeroes (an RBD
 * image is thin: what was never written or was discarded reads as zeroes). */
static void answer_from_diff(struct rbd_diff *d, struct block_status_call *c)
{
    uint64_t end = MIN(c->offset + c->len, d->end);
    uint64_t next = end;

    c->flags = BLOCK_STATUS_ZERO;
    for (size_t i = 0; i < d->n_ext; i++) {
        uint64_t a = d->ext[i][0], b = a + d->ext[i][1];
        if (b <= c->offset)
            continue;
        if (a <= c->offset) {
            c->flags = BLOCK_STATUS_DATA;
            next = MIN(b, end);
        } else {
            next = MIN(a, end);
        }
        break;
    }
    c->pnum = next - c->offset;
}

static int rbd_block_status(struct block_node *n, struct block_status_call *c)
{
    struct rbd_state *s = st(n);
    struct rbd_diff *d = &s->diff;

    c->map = c->offset;
    c->file = n;
    if (c->offset >= n->size) {
        c->flags = BLOCK_STATUS_ZERO | BLOCK_STATUS_OFFSET_VALID;
        c->pnum = c->len;
        return 0;
    }
    if (!c->want_zero) {
        c->flags = BLOCK_STATUS_DATA | BLOCK_STATUS_OFFSET_VALID;
        c->pnum = c->len;
        return 0;
    }
    if (!d->running && d->valid && d->gen == s->write_gen && c->offset >= d->start &&
        c->offset < d->end) {
        answer_from_diff(d, c);
        c->flags |= BLOCK_STATUS_OFFSET_VALID;
        return 0;
    }
    d->waiting = xrealloc(d->waiting, (d->n_waiting + 1) * sizeof(d->waiting[0]));
    d->waiting[d->n_waiting++] = c->st;
    if (d->running)
        return 1;
    d->running = true;
    d->valid = false;
    d->start = c->offset;
    d->end = c->offset + MIN(n->size - c->offset, MAX(c->len, DIFF_MAX_LEN));
    d->end = MIN(d->end, n->size);
    int r = pthread_create(&d->thread, NULL, diff_main, s);
    if (r != 0) {
        d->running = false;
        d->n_waiting--;
        return -r;
    }
    return 1;
}

/* ---- open, close, size -------------------------------------------------------------------- */

/* QEMU's filename of a node opened with -blockdev: "json:" and its strong options. */
static char *make_filename(json_t *opts)
{
    static const char *const strong[] = { "pool", "namespace", "image", "conf", "snapshot",
                                          "user", "server", NULL };
    json_t *o = json_pack("{s:s}", "driver", "rbd");
    struct buf b = {0};

    for (size_t i = 0; strong[i]; i++) {
        json_t *v = json_object_get(opts, strong[i]);
        if (v)
            json_object_set(o, strong[i], v);
    }
    buf_append(&b, "json:", 5);
    qjson_write(&b, o, false);
    buf_append(&b, "", 1);
    json_decref(o);
    return b.data;
}

/* What any thread may free: librbd's handles and our memory. Blocks (rbd_close). */
static void state_release(struct rbd_state *s)
{
    if (s->image)
        rbd_close(s->image);
    if (s->io)
        rados_ioctx_destroy(s->io);
    if (s->cluster)
        rados_shutdown(s->cluster);
    pthread_mutex_destroy(&s->lock);
    free(s->diff.ext);
    free(s->diff.waiting);
    free(s->diff_op);
    free(s->filename);
    free(s);
}

/* On the loop thread: the eventfd too. */
static void state_free(struct rbd_state *s)
{
    if (s->efd >= 0) {
        loop_del_fd(s->node->graph->loop, s->efd);
        close(s->efd);
    }
    state_release(s);
}

/* Set a librados option; false with *errp set if librados refuses it. */
static bool conf_set(rados_t cluster, const char *key, const char *value, struct error **errp)
{
    int r = rados_conf_set(cluster, key, value);

    if (r < 0)
        error_setg_errno(errp, -r, "invalid conf option %s", key);
    return r >= 0;
}

/* QEMU's qemu_rbd_set_auth(), the key part: key's bytes, base64, as librados' "key". */
static int set_key(rados_t cluster, const struct secret *key, struct error **errp)
{
    char *b64 = secret_base64_encode(key->data, key->len);
    int r = rados_conf_set(cluster, "key", b64);

    explicit_bzero(b64, strlen(b64));
    free(b64);
    if (r < 0) {
        error_setg_errno(errp, -r, "Could not set 'key'");
        return -1;
    }
    return 0;
}

/* Everything up to rados_connect(): the configuration. */
static int configure(rados_t cluster, json_t *opts, const struct secret *key,
                     struct error **errp)
{
    const char *conf = json_string_value(json_object_get(opts, "conf"));
    json_t *auth = json_object_get(opts, "auth-client-required");
    json_t *server = json_object_get(opts, "server");
    json_t *t = json_object_get(opts, "__org.thinblk_op-timeout");
    char timeout[32];
    int r;

    if (conf) {
        r = rados_conf_read_file(cluster, conf);
        if (r < 0) {
            error_setg_errno(errp, -r, "error reading conf file %s", conf);
            return -1;
        }
    } else {
        rados_conf_read_file(cluster, NULL);  /* the default search; none found is fine */
    }
    rados_conf_parse_env(cluster, NULL);  /* CEPH_ARGS, as the ceph tools */
    /* Always off, whatever the conf file or cache.direct say (see the top). */
    if (!conf_set(cluster, "rbd_cache", "false", errp))
        return -1;
    snprintf(timeout, sizeof(timeout), "%" PRId64,
             t ? (int64_t)json_integer_value(t) : (int64_t)RBD_DEFAULT_OP_TIMEOUT);
    if (!conf_set(cluster, "client_mount_timeout", timeout, errp) ||
        !conf_set(cluster, "rados_mon_op_timeout", timeout, errp) ||
        !conf_set(cluster, "rados_osd_op_timeout", timeout, errp))
        return -1;
    if (json_array_size(server) > 0) {
        /* QEMU's qemu_rbd_mon_host(): "host:port;...", an IPv6 host in brackets. */
        struct buf b = {0};
        size_t i;
        json_t *v;
        json_array_foreach(server, i, v) {
            const char *host = json_string_value(json_object_get(v, "host"));
            const char *port = json_string_value(json_object_get(v, "port"));
            char *hp = xasprintf(strchr(host, ':') ? "%s[%s]:%s" : "%s%s:%s", i ? ";" : "",
                                 host, port);
            buf_append(&b, hp, strlen(hp));
            free(hp);
        }
        buf_append(&b, "", 1);
        bool ok = conf_set(cluster, "mon_host", b.data, errp);
        buf_free(&b);
        if (!ok)
            return -1;
    }
    if (key && set_key(cluster, key, errp) < 0)
        return -1;
    if (json_array_size(auth) > 0) {
        struct buf b = {0};
        size_t i;
        json_t *v;
        json_array_foreach(auth, i, v) {
            if (i > 0)
                buf_append(&b, ";", 1);
            buf_append(&b, json_string_value(v), strlen(json_string_value(v)));
        }
        buf_append(&b, "", 1);
        bool ok = conf_set(cluster, "auth_client_required", b.data, errp);
        buf_free(&b);
        if (!ok)
            return -1;
    }
    return 0;
}

/* Connect to the cluster and open the pool (and namespace) that opts (BlockdevOptionsRbd,
 * checked) name; full_try: with rados_set_pool_full_try() (see the top); key: key-secret's
 * bytes, or NULL. Blocks, up to the op timeout; touches nothing of the loop's, so it may run
 * on any thread. Returns 0, or -1 with *errp set and nothing left to free. */
static int rbd_connect(json_t *opts, bool full_try, const struct secret *key, rados_t *cluster,
                       rados_ioctx_t *io, struct error **errp)
{
    const char *pool = json_string_value(json_object_get(opts, "pool"));
    const char *ns = json_string_value(json_object_get(opts, "namespace"));
    const char *user = json_string_value(json_object_get(opts, "user"));
    int r;

    r = rados_create(cluster, user);
    if (r < 0) {
        error_setg_errno(errp, -r, "error initializing");
        return -1;
    }
    if (configure(*cluster, opts, key, errp) < 0)
        goto fail;
    r = rados_connect(*cluster);
    if (r < 0) {
        error_setg_errno(errp, -r, "error connecting");
        goto fail;
    }
    r = rados_ioctx_create(*cluster, pool, io);
    if (r < 0) {
        error_setg_errno(errp, -r, "error opening pool %s", pool);
        goto fail;
    }
    rados_ioctx_set_namespace(*io, ns ? ns : "");
    if (full_try)
        rados_set_pool_full_try(*io);
    return 0;
fail:
    rados_shutdown(*cluster);
    return -1;
}

/* The driver's prepare: connect and open the image, blocking (up to about twice the op
 * timeout); any thread. key: key-secret's bytes, or NULL. Returns a state with cluster, io,
 * image, size and obj_size, or NULL with *errp set (QEMU's texts). */
static void *rbd_prepare(json_t *opts, bool read_only, const struct secret *key,
                         struct error **errp)
{
    const char *image = json_string_value(json_object_get(opts, "image"));
    const char *snap = json_string_value(json_object_get(opts, "snapshot"));
    struct rbd_state *s;
    int r;

    if (snap && !read_only) {
        error_setg(errp, "rbd snapshots are read-only");
        return NULL;
    }
    s = xzalloc(sizeof(*s));
    s->efd = -1;
    pthread_mutex_init(&s->lock, NULL);
    if (rbd_connect(opts, true, key, &s->cluster, &s->io, errp) < 0) {
        s->cluster = NULL;
        s->io = NULL;
        goto fail;
    }
    r = read_only ? rbd_open_read_only(s->io, image, &s->image, snap)
                  : rbd_open(s->io, image, &s->image, snap);
    if (r < 0) {
        s->image = NULL;
        error_setg_errno(errp, -r, "error reading header from %s", image);
        goto fail;
    }
    rbd_image_info_t info;
    r = rbd_stat(s->image, &info, sizeof(info));
    if (r < 0) {
        error_setg_errno(errp, -r, "error getting image info from %s", image);
        goto fail;
    }
    s->size = info.size;
    s->obj_size = info.obj_size;
    return s;
fail:
    state_release(s);
    return NULL;
}

static void rbd_drop_prepared(void *handle)
{
    state_release(handle);
}

/* With n->opaque from rbd_prepare() (blockdev-add: the offload thread did it), or without
 * (--blockdev: it is done here, blocking the loop thread). */
static int rbd_node_open(struct block_node *n, json_t *opts, struct error **errp)
{
    struct rbd_state *s = n->opaque;

    n->opaque = NULL;
    if (!s) {
        struct secret key;
        if (block_graph_secret(n->graph, opts, n->drv->secret_option, &key, errp) < 0)
            return -1;
        s = rbd_prepare(opts, n->read_only, key.data ? &key : NULL, errp);
        secret_clear(&key);
    }
    if (!s)
        return -1;
    s->node = n;
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->efd < 0) {
        error_setg_errno(errp, errno, "Could not create an eventfd");
        goto fail;
    }
    if (loop_add_fd(n->graph->loop, s->efd, LOOP_READ, on_efd, s) < 0) {
        error_setg_errno(errp, errno, "Failed to watch the eventfd");
        close(s->efd);
        s->efd = -1;
        goto fail;
    }
    s->diff_op = xzalloc(sizeof(*s->diff_op));
    s->diff_op->s = s;
    s->filename = make_filename(opts);
    n->size = s->size;
    n->opaque = s;
    return 0;
fail:
    state_free(s);
    return -1;
}

/* On the offload thread (block_graph_offload_close()): the rest of closing. The block status
 * thread may still write the eventfd: it is joined before the eventfd is closed. */
static void close_work(void *opaque)
{
    struct rbd_state *s = opaque;

    if (s->diff.running)
        pthread_join(s->diff.thread, NULL);
    close(s->efd);
    state_release(s);
}

/* Nothing is in flight (the devices drained); a block status thread may be. The node is out
 * of the graph: joining that thread, rbd_close() and rados_shutdown(), which wait on the
 * cluster, go to the offload thread; the loop stops watching the eventfd now. */
static void rbd_node_close(struct block_node *n)
{
    struct rbd_state *s = st(n);

    loop_del_fd(n->graph->loop, s->efd);
    block_graph_offload_close(n->graph, close_work, s);
}

static const char *rbd_filename(struct block_node *n)
{
    return st(n)->filename;
}

/* librbd keeps the header's size current (it watches the header object). */
static void rbd_refresh_size(struct block_node *n)
{
    uint64_t size;

    if (rbd_get_size(st(n)->image, &size) == 0)
        block_node_set_size(n, size);
}

/* On the offload thread (block_resize): librbd's image handle is thread-safe. */
static int rbd_truncate_blocking(struct block_node *n, uint64_t size, struct error **errp)
{
    int r = rbd_resize(st(n)->image, size);

    if (r < 0) {
        error_setg_errno(errp, -r, "failed to resize rbd image");
        return -1;
    }
    return 0;
}

/* block_node_resize() on the loop thread, which QMP does not use (block_node_resize_async()):
 * blocks, up to the op timeout. */
static int rbd_truncate(struct block_node *n, uint64_t size, struct error **errp)
{
    if (rbd_truncate_blocking(n, size, errp) < 0)
        return -1;
    block_node_set_size(n, size);
    return 0;
}

/* QEMU's bdrv_get_info (the object size as cluster-size) and ImageInfoSpecificRbd (nothing
 * without encryption). */
static void rbd_query_image(struct block_node *n, json_t *image)
{
    json_object_set_new(image, "cluster-size", json_integer((json_int_t)st(n)->obj_size));
    json_object_set_new(image, "format-specific",
                        json_pack("{s:s,s:{}}", "type", "rbd", "data"));
}

const struct block_driver block_driver_rbd = {
    .name = "rbd",
    .open = rbd_node_open,
    .prepare = rbd_prepare,
    .secret_option = "key-secret",
    .drop_prepared = rbd_drop_prepared,
    .close = rbd_node_close,
    .submit = rbd_submit,
    .filename = rbd_filename,
    .refresh_size = rbd_refresh_size,
    .truncate = rbd_truncate,
    .truncate_blocking = rbd_truncate_blocking,
    .block_status = rbd_block_status,
    .query_image = rbd_query_image,
};

/* ---- blockdev-create -------------------------------------------------------------------- */

/* QEMU's BlockdevCreateOptionsRbd, without encrypt. */
const struct schema_member rbd_create_opts[] = {
    { "location", SCHEMA_OBJECT, .members = block_rbd_options },
    { "size", SCHEMA_UINT64 },
    { "cluster-size", SCHEMA_UINT64, .optional = true },
    { NULL },
};

struct rbd_create {
    struct block_create *c;
    struct secret key;  /* location's key-secret, looked up on the loop thread */
    struct error *key_err;  /* or why it could not be: reported where QEMU connects */
    struct error *err;  /* set by the thread */
};

/* On the offload thread: QEMU's qemu_rbd_do_create(). */
static void rbd_create_work(void *opaque)
{
    struct rbd_create *rc = opaque;
    json_t *opts = rc->c->opts;
    json_t *loc = json_object_get(opts, "location");
    const char *image = json_string_value(json_object_get(loc, "image"));
    uint64_t size = qjson_uint64(json_object_get(opts, "size"));
    json_t *cs = json_object_get(opts, "cluster-size");
    rados_t cluster;
    rados_ioctx_t io;
    int order = 0, r;

    if (json_object_get(loc, "snapshot")) {
        error_setg(&rc->err, "Can't use snapshot name for image creation");
        return;
    }
    if (cs) {
        uint64_t objsize = qjson_uint64(cs);
        if (objsize & (objsize - 1)) {
            error_setg(&rc->err, "obj size needs to be power of 2");
            return;
        }
        if (objsize < 4096) {
            error_setg(&rc->err, "obj size too small");
            return;
        }
        order = __builtin_ctzll(objsize);
    }
    /* No full try: QEMU's creation waits for a full pool too; the op timeout bounds it. */
    if (rc->key_err) {
        rc->err = rc->key_err;
        rc->key_err = NULL;
        return;
    }
    r = rbd_connect(loc, false, rc->key.data ? &rc->key : NULL, &cluster, &io, &rc->err);
    secret_clear(&rc->key);
    if (r < 0)
        return;
    r = rbd_create(io, image, size, &order);
    if (r < 0)
        error_setg_errno(&rc->err, -r, "error rbd create");
    rados_ioctx_destroy(io);
    rados_shutdown(cluster);
}

static void rbd_create_done(void *opaque)
{
    struct rbd_create *rc = opaque;
    struct block_create *c = rc->c;
    struct error *err = rc->err;

    secret_clear(&rc->key);  /* the checks before connecting return without it */
    error_free(rc->key_err);
    free(rc);
    block_create_finish(c, err);
}

void rbd_create_run(struct block_create *c)
{
    struct rbd_create *rc = xzalloc(sizeof(*rc));
    struct error *err = NULL;

    rc->c = c;
    block_graph_secret(c->graph, json_object_get(c->opts, "location"), "key-secret", &rc->key,
                       &rc->key_err);
    if (offload_run(c->graph->loop, rbd_create_work, rbd_create_done, rc, &err) < 0) {
        secret_clear(&rc->key);
        error_free(rc->key_err);
        free(rc);
        block_create_finish(c, err);
    }
}
