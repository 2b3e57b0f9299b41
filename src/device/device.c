/* The device: error policy, io-status, parked and held requests. See device.h. */
#include "device/device.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "common/assert.h"
#include "common/list.h"
#include "common/log.h"
#include "common/util.h"
#include "common/vector.h"
#include "device/group.h"
#include "device/internal.h"
#include "loop/loop.h"

#define EVENT_PERIOD_NS (1000 * 1000 * 1000ull)

DEFINE_QUEUE_TYPE(req_queue, struct dev_req, next)
DEFINE_QUEUE_TYPE(dev_waiter_queue, struct dev_waiter, next)
DECLARE_LIST_HEAD(device_queue, struct device)

struct dev_stats {
    uint64_t rd_bytes, wr_bytes, unmap_bytes;
    uint64_t rd_ops, wr_ops, flush_ops, unmap_ops;
    uint64_t rd_ns, wr_ns, flush_ns, unmap_ns;
    uint64_t failed_rd, failed_wr, failed_flush, failed_unmap;
    uint64_t last_done_ns;  /* for idle_time_ns */
    uint64_t stopped_count, stopped_ns;  /* thinblk: times stopped and for how long */
    uint64_t stopped_since;              /* 0 while running */
    /* thinblk: requests that failed with action stop and were parked, requests that came while
     * stopped and were held, and the longest either waited before going to storage. */
    uint64_t parked_count, held_count, longest_wait_ns;
};

struct dev_context {
    struct loop *loop;
    dev_emit_fn *emit;
    void *emit_opaque;
    device_queue devices;           /* every device, in creation order */
    struct runstate *rs;
    struct dev_stopper *runstate;   /* the daemon's run state: the stopper of devices in no group */
    dev_group_queue groups;         /* group-stopper.c's */
};

struct device {
    struct device *next;  /* ctx->devices */
    struct dev_context *ctx;
    struct dev_stopper *stopper;  /* what it stops and resumes with */
    struct dev_group *group;      /* its stop group, or NULL: the run state is its stopper */
    char *name;
    struct block_node *root;
    enum dev_error_action werror, rerror;
    enum dev_iostatus iostatus;

    uint64_t seq;
    req_queue held;            /* came while stopped, in order */
    req_queue parked;          /* failed with action stop, by seq */
    req_queue flushes;         /* flushes waiting for earlier writes, in order */
    unsigned in_flight;        /* at the root node */
    unsigned unfinished_writes;
    /* seq of every unfinished write, to know when a waiting flush may go; small in practice
     * (bounded by the exports' in-flight limits), so a plain array. */
    u64_vector write_seqs;

    dev_waiter_queue waiters;

    uint64_t last_event_ns;    /* BLOCK_IO_ERROR throttling */
    json_t *pending_event;     /* the latest event held back, sent at the period's end */
    uint64_t suppressed;       /* events dropped in pending_event's favour */
    uint64_t event_timer;

    struct dev_stats stats;
    bool writethrough;
    bool dying;                /* device_free() was called; freed when in_flight drops to 0 */
};

DEFINE_QUEUE_FUNCTIONS(device_queue, struct device, next)

const char *const dev_error_action_names[] = {
    [DEV_ACTION_REPORT] = "report", [DEV_ACTION_IGNORE] = "ignore",
    [DEV_ACTION_STOP] = "stop", [DEV_ACTION_ENOSPC] = "enospc", NULL,
};

int dev_error_action_parse(const char *s)
{
    for (size_t i = 0; dev_error_action_names[i]; i++) {
        if (strcmp(s, dev_error_action_names[i]) == 0)
            return (int)i;
    }
    return -1;
}

const char *dev_iostatus_name(enum dev_iostatus s)
{
    static const char *const names[] = {
        [DEV_IOSTATUS_OK] = "ok", [DEV_IOSTATUS_FAILED] = "failed",
        [DEV_IOSTATUS_NOSPACE] = "nospace",
    };
    return names[s];
}

/* Insert in seq order (parked requests may fail in any order). */
static void queue_insert_sorted(req_queue *q, struct dev_req *r)
{
    struct dev_req *after = NULL;

    for (struct dev_req *x = q->head; x && x->seq < r->seq; x = x->next)
        after = x;
    req_queue_insert_after(q, after, r);
}

static void write_seq_add(struct device *d, uint64_t seq)
{
    u64_vector_append(&d->write_seqs, seq);
}

static void write_seq_del(struct device *d, uint64_t seq)
{
    for (size_t i = 0; i < d->write_seqs.len; i++) {
        if (d->write_seqs.ptr[i] == seq) {
            d->write_seqs.ptr[i] = d->write_seqs.ptr[--d->write_seqs.len];
            return;
        }
    }
}

/* Whether a write submitted before seq has not finished yet. */
static bool earlier_write_pending(const struct device *d, uint64_t seq)
{
    for (size_t i = 0; i < d->write_seqs.len; i++) {
        if (d->write_seqs.ptr[i] < seq)
            return true;
    }
    return false;
}

/* Running and no stop pending: requests may go to the node. */
static bool device_running(const struct device *d)
{
    return d->stopper->ops->may_submit(d->stopper);
}

bool device_accepting(const struct device *d)
{
    return device_running(d) && !d->held.head;
}

void device_wait(struct device *d, struct dev_waiter *w)
{
    for (struct dev_waiter *x = d->waiters.head; x; x = x->next) {
        if (x == w)
            return;
    }
    dev_waiter_queue_push_head(&d->waiters, w);
}

void device_cancel_wait(struct device *d, struct dev_waiter *w)
{
    dev_waiter_queue_remove(&d->waiters, w);
}

static void wake_waiters(struct device *d)
{
    dev_waiter_queue ws = d->waiters;  /* those waiting again from fn() wait for the next */
    struct dev_waiter *w;

    d->waiters = (dev_waiter_queue){0};
    while ((w = dev_waiter_queue_pop(&ws)))
        w->fn(w);
}

/* ---- statistics ---- */

static void account(struct device *d, struct dev_req *r, int ret)
{
    struct dev_stats *s = &d->stats;
    uint64_t now = now_monotonic_ns(), ns = now - r->start_ns;

    s->last_done_ns = now;
    switch (r->breq.op) {
    case BLOCK_OP_READ:
        if (ret < 0) { s->failed_rd++; break; }
        s->rd_ops++, s->rd_bytes += r->breq.len, s->rd_ns += ns;
        break;
    case BLOCK_OP_WRITE:
    case BLOCK_OP_WRITE_ZEROES:
        if (ret < 0) { s->failed_wr++; break; }
        s->wr_ops++, s->wr_bytes += r->breq.len, s->wr_ns += ns;
        break;
    case BLOCK_OP_FLUSH:
        if (ret < 0) { s->failed_flush++; break; }
        s->flush_ops++, s->flush_ns += ns;
        break;
    case BLOCK_OP_DISCARD:
        if (ret < 0) { s->failed_unmap++; break; }
        s->unmap_ops++, s->unmap_bytes += r->breq.len, s->unmap_ns += ns;
        break;
    }
}

/* ---- BLOCK_IO_ERROR ---- */

static void send_pending_event(struct loop *loop, void *opaque)
{
    struct device *d = opaque;
    json_t *extra = NULL;

    d->event_timer = 0;
    if (!d->pending_event)
        return;
    d->last_event_ns = now_monotonic_ns();
    if (d->suppressed > 0)
        extra = json_pack("{s:I}", "__org.thinblk_suppressed", (json_int_t)d->suppressed);
    d->ctx->emit(d->ctx->emit_opaque, "BLOCK_IO_ERROR", d->pending_event, extra);
    d->pending_event = NULL;
    d->suppressed = 0;
}

static void io_error_event(struct device *d, const struct dev_req *r, enum dev_error_action act,
                           int err)
{
    const char *action = act == DEV_ACTION_REPORT ? "report"
                       : act == DEV_ACTION_IGNORE ? "ignore" : "stop";
    /* Members in QEMU's schema order; "nospace" is there as io-status is always enabled. */
    json_t *data = json_pack("{s:s,s:s,s:s,s:s,s:b,s:s}", "device", d->name, "node-name",
                             d->root->node_name, "operation",
                             r->breq.op == BLOCK_OP_READ ? "read" : "write", "action", action,
                             "nospace", dev_errno_nospace(err), "reason", dev_error_reason(err));
    uint64_t now = now_monotonic_ns();

    /* Nothing is held back while the timer is off: a period that ended with nothing held
     * lets the next event go at once. */
    if (!d->event_timer && (d->last_event_ns == 0 || now - d->last_event_ns >= EVENT_PERIOD_NS)) {
        d->last_event_ns = now;
        dev_context_emit(d->ctx, "BLOCK_IO_ERROR", data);
        return;
    }
    if (d->pending_event) {
        json_decref(d->pending_event);
        d->suppressed++;
    }
    d->pending_event = data;
    if (!d->event_timer)
        d->event_timer = loop_add_timer(d->ctx->loop, d->last_event_ns + EVENT_PERIOD_NS - now,
                                        send_pending_event, d);
}

/* ---- the request path ---- */

static void dispatch(struct device *d, struct dev_req *r);

static void complete(struct device *d, struct dev_req *r, int ret)
{
    account(d, r, ret);
    r->done(r, ret);
}

static void write_finished(struct device *d, struct dev_req *r)
{
    write_seq_del(d, r->seq);
    /* Flushes that were waiting for this write may go now, in order; while the device does
     * not run, they join the held requests. */
    while (d->flushes.head && !earlier_write_pending(d, d->flushes.head->seq)) {
        struct dev_req *f = req_queue_pop(&d->flushes);
        if (!device_running(d)) {
            queue_insert_sorted(&d->held, f);
            continue;
        }
        d->in_flight++;
        node_submit(d->root, &f->breq);
    }
}

static void really_free(struct device *d);

/* A request or a query came back from the root node. */
static void left_storage(struct device *d)
{
    d->in_flight--;
    if (d->in_flight == 0)
        d->stopper->ops->idle(d->stopper);  /* a pending stop may have waited for us */
}

/* The request starts waiting for a cont (parked or held). */
static void start_waiting(struct dev_req *r)
{
    r->waiting_since_ns = now_monotonic_ns();
}

/* The request leaves a wait (sent to storage again, or withdrawn): the longest stall so far. */
static void stop_waiting(struct device *d, struct dev_req *r)
{
    if (r->waiting_since_ns) {
        uint64_t waited = now_monotonic_ns() - r->waiting_since_ns;
        if (waited > d->stats.longest_wait_ns)
            d->stats.longest_wait_ns = waited;
        r->waiting_since_ns = 0;
    }
}

static void on_block_done(struct block_req *breq, int ret)
{
    struct dev_req *r = container_of(breq, struct dev_req, breq);
    struct device *d = r->dev;
    enum dev_error_action act;
    int err = -ret;

    left_storage(d);
    if (d->dying) {
        /* The export is gone: no policy, no parking; the request just ends. */
        r->done(r, ret < 0 ? ret : 0);
        if (d->in_flight == 0)
            really_free(d);
        return;
    }
    if (ret == 0) {
        if (r->is_write)
            write_finished(d, r);
        complete(d, r, 0);
        return;
    }

    act = r->breq.op == BLOCK_OP_READ ? d->rerror : d->werror;
    if (act == DEV_ACTION_ENOSPC)
        act = dev_errno_nospace(err) ? DEV_ACTION_STOP : DEV_ACTION_REPORT;
    /* EFAULT is the request's buffer, not the storage: guest memory a vhost-user frontend cut
     * short under the kernel's copy. No extension or cont fixes it, and a stop would let one
     * frontend stop every device of the daemon (or its group): that request fails instead. */
    if (act == DEV_ACTION_STOP && err == EFAULT)
        act = DEV_ACTION_REPORT;

    if (act != DEV_ACTION_STOP) {
        io_error_event(d, r, act, err);
        if (r->is_write)
            write_finished(d, r);
        complete(d, r, act == DEV_ACTION_IGNORE ? 0 : ret);
        return;
    }

    /* Park it, whole, for cont. io-status first, so a query after the event agrees with it;
     * then the event; the stop itself is deferred to the end of this batch of completions.
     * A withdrawn request is not parked: its export submits it again itself. */
    if (!r->withdrawn) {
        queue_insert_sorted(&d->parked, r);
        d->stats.parked_count++;
        start_waiting(r);
    }
    if (d->iostatus == DEV_IOSTATUS_OK)
        d->iostatus = dev_errno_nospace(err) ? DEV_IOSTATUS_NOSPACE : DEV_IOSTATUS_FAILED;
    struct dev_stop_cause *c = &d->stopper->last_stop;
    free(c->device);
    free(c->node_name);
    c->device = xstrdup(d->name);
    c->node_name = xstrdup(d->root->node_name);
    c->operation = r->breq.op == BLOCK_OP_READ ? "read" : "write";
    c->err = err;
    c->when_ns = now_realtime_ns();
    log_info("device %s: %s failed at %" PRIu64 " (+%" PRIu64 "): %s; parked until cont",
             d->name, c->operation, r->breq.offset, r->breq.len, strerror(err));
    io_error_event(d, r, DEV_ACTION_STOP, err);
    d->stopper->ops->request_stop(d->stopper);
    if (r->withdrawn) {
        if (r->is_write)
            write_finished(d, r);
        r->done(r, -ECANCELED);
    }
}

static void dispatch(struct device *d, struct dev_req *r)
{
    stop_waiting(d, r);
    if (r->breq.op == BLOCK_OP_FLUSH && earlier_write_pending(d, r->seq)) {
        req_queue_push(&d->flushes, r);
        return;
    }
    d->in_flight++;
    node_submit(d->root, &r->breq);
}

static void on_status_done(struct block_status *st, int ret)
{
    struct dev_status *ds = container_of(st, struct dev_status, st);
    struct device *d = ds->dev;

    left_storage(d);
    ds->done(ds, ret);
    if (d->dying && d->in_flight == 0)
        really_free(d);
}

void device_block_status(struct device *d, struct dev_status *ds)
{
    ASSERT(ds->done);
    ds->dev = d;
    ds->st.done = on_status_done;
    d->in_flight++;
    node_block_status(d->root, &ds->st);
}

void device_submit(struct device *d, struct dev_req *r)
{
    /* The export validated the request (nbd/transmission.c): the node's contract, and within
     * the root's size. node_submit() asserts the contract when the request goes (a vector is
     * walked once, not here too); the range is asserted here, not on a protocol root: a host
     * device's size is read again by queries, and may have shrunk since the export checked. */
    ASSERT(r->done);
    r->breq.done = on_block_done;
    if (r->breq.op == BLOCK_OP_FLUSH)
        ASSERT(r->breq.offset == 0 && r->breq.len == 0);
    else
        ASSERT(!d->root->file || r->breq.offset + r->breq.len <= d->root->size);
    r->dev = d;
    r->seq = ++d->seq;
    r->start_ns = now_monotonic_ns();
    r->is_write = r->breq.op == BLOCK_OP_WRITE || r->breq.op == BLOCK_OP_WRITE_ZEROES ||
                  r->breq.op == BLOCK_OP_DISCARD;
    if (d->writethrough && (r->breq.op == BLOCK_OP_WRITE || r->breq.op == BLOCK_OP_WRITE_ZEROES))
        r->breq.flags |= BLOCK_REQ_FUA;
    if (r->is_write)
        write_seq_add(d, r->seq);
    if (!device_accepting(d)) {
        req_queue_push(&d->held, r);
        d->stats.held_count++;
        start_waiting(r);
        return;
    }
    dispatch(d, r);
}

/* cont: parked requests first, in submission order, then the held ones. */
static void resume(struct device *d)
{
    struct dev_req *r;

    d->iostatus = DEV_IOSTATUS_OK;
    while (device_running(d) && (r = req_queue_pop(&d->parked)))
        dispatch(d, r);
    while (device_running(d) && (r = req_queue_pop(&d->held)))
        dispatch(d, r);
    if (device_running(d))
        wake_waiters(d);
}

/* ---- the stopper's side ---- */

void dev_stopper_init(struct dev_stopper *s, const struct dev_stopper_ops *ops,
                      struct dev_context *ctx)
{
    *s = (struct dev_stopper){ .ops = ops, .ctx = ctx };
}

void dev_stopper_fini(struct dev_stopper *s)
{
    free(s->last_stop.device);
    free(s->last_stop.node_name);
    s->last_stop = (struct dev_stop_cause){ 0 };
}

bool dev_stopper_busy(const struct dev_stopper *s)
{
    for (struct device *d = s->ctx->devices.head; d; d = d->next) {
        if (d->stopper == s && d->in_flight)
            return true;
    }
    return false;
}

static bool sio_busy(struct runstate_io *io)
{
    return dev_stopper_busy(container_of(io, struct dev_stopper_io, io)->s);
}

static void sio_released(struct runstate_io *io)
{
    dev_stopper_resumed(container_of(io, struct dev_stopper_io, io)->s);
}

void dev_stopper_io_init(struct dev_stopper_io *sio, struct dev_stopper *s)
{
    *sio = (struct dev_stopper_io){ { sio_busy, sio_released }, s };
}

void dev_stopper_stopped(struct dev_stopper *s)
{
    for (struct device *d = s->ctx->devices.head; d; d = d->next) {
        if (d->stopper == s) {
            d->stats.stopped_count++;
            d->stats.stopped_since = now_monotonic_ns();
        }
    }
}

void dev_stopper_resumed(struct dev_stopper *s)
{
    for (struct device *d = s->ctx->devices.head; d; d = d->next) {
        if (d->stopper != s)
            continue;
        if (d->stats.stopped_since) {
            d->stats.stopped_ns += now_monotonic_ns() - d->stats.stopped_since;
            d->stats.stopped_since = 0;
        }
        resume(d);
    }
}

/* ---- the context ---- */

struct dev_context *dev_context_new(struct loop *loop, struct runstate *rs, dev_emit_fn *emit,
                                    void *emit_opaque)
{
    struct dev_context *ctx = xzalloc(sizeof(*ctx));

    ctx->loop = loop;
    ctx->emit = emit;
    ctx->emit_opaque = emit_opaque;
    ctx->rs = rs;
    ctx->runstate = dev_runstate_stopper_new(ctx, rs);
    return ctx;
}

void dev_context_free(struct dev_context *ctx)
{
    if (!ctx)
        return;
    dev_groups_free(ctx);
    dev_runstate_stopper_free(ctx->runstate);
    free(ctx);
}

struct loop *dev_context_loop(const struct dev_context *ctx)
{
    return ctx->loop;
}

void dev_context_emit(struct dev_context *ctx, const char *name, json_t *data)
{
    ctx->emit(ctx->emit_opaque, name, data, NULL);
}

dev_group_queue *dev_context_groups(struct dev_context *ctx)
{
    return &ctx->groups;
}

struct runstate *dev_context_runstate(const struct dev_context *ctx)
{
    return ctx->rs;
}

const struct dev_stop_cause *dev_context_last_stop(const struct dev_context *ctx)
{
    return ctx->runstate->last_stop.device ? &ctx->runstate->last_stop : NULL;
}

/* ---- lifecycle and queries ---- */

struct device *device_new(struct dev_context *ctx, const char *name, struct block_node *root,
                          enum dev_error_action werror, enum dev_error_action rerror,
                          struct dev_group *group, struct error **errp)
{
    struct device *d;

    if (device_find(ctx, name)) {
        error_setg(errp, "Device with id '%s' already exists", name);
        return NULL;
    }
    d = xzalloc(sizeof(*d));
    d->ctx = ctx;
    d->group = group;
    d->stopper = group ? dev_group_stopper(group) : ctx->runstate;
    d->name = xstrdup(name);
    d->root = root;
    block_node_ref(root);
    d->werror = werror;
    d->rerror = rerror;
    if (!d->stopper->ops->running(d->stopper))
        d->stats.stopped_since = now_monotonic_ns();

    device_queue_push(&ctx->devices, d);
    return d;
}

void device_abort(struct device *d)
{
    struct dev_req *r;

    while ((r = req_queue_pop(&d->flushes)))
        r->done(r, -ESHUTDOWN);
    while ((r = req_queue_pop(&d->parked)))
        r->done(r, -ESHUTDOWN);
    while ((r = req_queue_pop(&d->held)))
        r->done(r, -ESHUTDOWN);
    d->write_seqs.len = 0;
    d->iostatus = DEV_IOSTATUS_OK;
}

bool device_withdraw(struct device *d, struct dev_req *r)
{
    ASSERT(r->dev == d);
    if (!req_queue_remove(&d->held, r) && !req_queue_remove(&d->parked, r) &&
        !req_queue_remove(&d->flushes, r)) {
        r->withdrawn = true;
        return false;
    }
    stop_waiting(d, r);
    if (r->is_write)
        write_finished(d, r);  /* flushes after it no longer wait for it */
    return true;
}

static void really_free(struct device *d)
{
    block_node_unref(d->root);
    u64_vector_reset(&d->write_seqs);
    free(d->name);
    free(d);
}

void device_free(struct device *d)
{
    if (!d)
        return;
    device_abort(d);
    device_queue_remove(&d->ctx->devices, d);
    /* The last of its second goes now, with its count, as QEMU's monitor would send it. */
    if (d->event_timer)
        loop_del_timer(d->ctx->loop, d->event_timer);
    send_pending_event(d->ctx->loop, d);
    d->waiters = (dev_waiter_queue){0};
    d->dying = true;
    if (d->in_flight == 0)
        really_free(d);
}

struct device *device_find(struct dev_context *ctx, const char *name)
{
    for (struct device *d = ctx->devices.head; d; d = d->next) {
        if (strcmp(d->name, name) == 0)
            return d;
    }
    return NULL;
}

void device_set_writethrough(struct device *d, bool on)
{
    d->writethrough = on;
}

struct device *device_first(const struct dev_context *ctx)
{
    return ctx->devices.head;
}

struct device *device_next(const struct device *d)
{
    return d->next;
}

const char *device_name(const struct device *d)
{
    return d->name;
}

struct dev_group *device_group(const struct device *d)
{
    return d->group;
}

struct block_node *device_root(const struct device *d)
{
    return d->root;
}

bool device_busy(const struct device *d)
{
    return d->in_flight || d->held.head || d->parked.head || d->flushes.head;
}

json_t *device_query_block(struct device *d)
{
    /* Members in QEMU's schema order (BlockInfo). */
    json_t *info = json_pack("{s:s,s:s,s:b,s:b,s:o,s:s}", "device", d->name, "type", "unknown",
                             "removable", 0, "locked", 0, "inserted", block_node_info(d->root),
                             "io-status", dev_iostatus_name(d->iostatus));

    dev_group_tag(info, d);
    return info;
}

/* QEMU's BlockDeviceStats, in its schema order. s is NULL for a node below the device's root:
 * QEMU counts requests per device, so a child node has only its wr_highest_offset. */
static json_t *stats_object(const struct dev_stats *s, uint64_t longest_wait_ns,
                            uint64_t wr_highest_offset)
{
    static const struct dev_stats none;
    const struct dev_stats *z = s ? s : &none;
    uint64_t now = now_monotonic_ns();
    json_t *stats = json_object();

#define SET(k, v) json_object_set_new(stats, k, json_integer((json_int_t)(v)))
    SET("rd_bytes", z->rd_bytes);
    SET("wr_bytes", z->wr_bytes);
    SET("unmap_bytes", z->unmap_bytes);
    SET("rd_operations", z->rd_ops);
    SET("wr_operations", z->wr_ops);
    SET("flush_operations", z->flush_ops);
    SET("unmap_operations", z->unmap_ops);
    SET("rd_total_time_ns", z->rd_ns);
    SET("wr_total_time_ns", z->wr_ns);
    SET("flush_total_time_ns", z->flush_ns);
    SET("unmap_total_time_ns", z->unmap_ns);
    SET("wr_highest_offset", wr_highest_offset);
    SET("rd_merged", 0);
    SET("wr_merged", 0);
    SET("unmap_merged", 0);
    if (z->last_done_ns)
        SET("idle_time_ns", now - z->last_done_ns);
    SET("failed_rd_operations", z->failed_rd);
    SET("failed_wr_operations", z->failed_wr);
    SET("failed_flush_operations", z->failed_flush);
    SET("failed_unmap_operations", z->failed_unmap);
    SET("invalid_rd_operations", 0);
    SET("invalid_wr_operations", 0);
    SET("invalid_flush_operations", 0);
    SET("invalid_unmap_operations", 0);
    json_object_set_new(stats, "account_invalid", json_false());
    json_object_set_new(stats, "account_failed", json_boolean(s != NULL));
    json_object_set_new(stats, "timed_stats", json_array());
    if (s) {
        /* thinblk's extension, named by QMP's rule for downstream members. */
        uint64_t stopped_ns = s->stopped_ns + (s->stopped_since ? now - s->stopped_since : 0);
        SET("__org.thinblk_stopped-count", s->stopped_count);
        SET("__org.thinblk_stopped-time-ns", stopped_ns);
        SET("__org.thinblk_parked-requests", s->parked_count);
        SET("__org.thinblk_held-requests", s->held_count);
        SET("__org.thinblk_longest-stall-ns", longest_wait_ns);
    }
#undef SET
    return stats;
}

/* QEMU's "parent": the BlockStats of the node's file child, and of its own, down the chain.
 * Management reads the protocol node's wr_highest_offset there: how far the image has grown
 * on its storage (libvirt's "allocation", what VDSM extends by). */
static json_t *child_stats(const struct block_node *n)
{
    json_t *ret = json_pack("{s:s,s:o}", "node-name", n->node_name, "stats",
                            stats_object(NULL, 0, n->wr_highest_offset));

    if (n->file)
        json_object_set_new(ret, "parent", child_stats(n->file));
    return ret;
}

/* The longest a request of d has waited for a cont, counting those waiting now. */
static uint64_t longest_wait_ns(const struct device *d)
{
    const req_queue *queues[] = { &d->parked, &d->held };
    uint64_t now = now_monotonic_ns(), longest = d->stats.longest_wait_ns;

    for (size_t i = 0; i < ARRAY_SIZE(queues); i++) {
        for (const struct dev_req *r = queues[i]->head; r; r = r->next) {
            if (r->waiting_since_ns && now - r->waiting_since_ns > longest)
                longest = now - r->waiting_since_ns;
        }
    }
    return longest;
}

json_t *device_query_stats(struct device *d)
{
    json_t *ret = json_pack("{s:s,s:s,s:o}", "device", d->name, "node-name", d->root->node_name,
                            "stats", stats_object(&d->stats, longest_wait_ns(d),
                                                  d->root->wr_highest_offset));

    if (d->root->file)
        json_object_set_new(ret, "parent", child_stats(d->root->file));
    return ret;
}
