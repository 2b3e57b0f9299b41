/* thinblk-agent: what it does with what the daemon says.
 *
 * Every decision is taken from one reconcile: query-status, query-block, query-blockstats,
 * query-named-block-nodes and __org.thinblk_query-stop-reason, sent together and looked at
 * once all have answered. Events only ask for a reconcile (coalesced: many events, one more
 * run), so a lost event changes nothing but the delay, and the poll interval bounds that.
 *
 * For each disk with a policy (volume size S, highest write H on the node that grows,
 * watermark W, chunk C, cap M):
 *   - H + W <= S and not stopped: arm the write threshold at S - W on the protocol node;
 *   - H + W > S (threshold crossed, or found by the poll), or stopped on ENOSPC with no
 *     extension since the stop: extend to min(M, max(S + C, H + W rounded up to a MiB)),
 *     unless one is running or waiting to retry; at M, report and leave it;
 *   - the daemon in io-error: cont once every device in no group that stopped is a disk of
 *     ours that stopped on ENOSPC and has been extended past its writes (or, with
 *     resume-on-other-errors, any other error). Never cont a daemon in "paused": a person
 *     stopped it.
 *   - each stop group (__org.thinblk_query-groups; none from a daemon without it) in io-error:
 *     the same decision over the group's own devices, then __org.thinblk_group-cont of that
 *     group alone, so a group waiting (at its cap, a failing extension) holds no other group
 *     and not the daemon. A grouped disk's stop is its group's, with the group's own since.
 *     Never resume a group in "paused" (__org.thinblk_group-stop: a person's).
 *
 * Events missed while disconnected are read back from the daemon's event journal
 * (__org.thinblk_query-event-journal, from the last event seen) when the connection is back:
 * logged, so the operator knows what happened meanwhile, and taken as live ones (a missed
 * BLOCK_WRITE_THRESHOLD still says how far the write went). The decisions need none of them.
 */
#include "agent/disk.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "agent/extend.h"
#include "agent/monitor.h"
#include "agent/rbd.h"
#include "common/list.h"
#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"

enum {
    SNAP_STATUS,
    SNAP_BLOCK,
    SNAP_STATS,
    SNAP_NODES,
    SNAP_STOP_REASON,
    SNAP_GROUPS,
    SNAP_COUNT,
};

static const char *const snap_commands[SNAP_COUNT] = {
    "query-status", "query-block", "query-blockstats", "query-named-block-nodes",
    "__org.thinblk_query-stop-reason", "__org.thinblk_query-groups",
};

/* A device of a daemon that has a policy. Kept across reconnects (keyed by device name), so
 * back-off and what was reported survive them. */
struct disk {
    struct disk *next;
    struct disk_daemon *dm;
    const struct agent_disk_policy *policy;
    char *name;             /* the policy's, or the device's for "device = *" */
    char *device;
    /* From the latest reconcile: */
    bool present;
    char *group;            /* query-block's __org.thinblk_group, or NULL: in no group */
    char *format_node;      /* the device's root node */
    char *proto_node;       /* the node that grows: the root's file child, or the root */
    char *filename;         /* the protocol node's file */
    char *format;           /* the root node's driver: "qcow2", "raw"... */
    uint64_t virtual_size;  /* the root node's */
    uint64_t node_size;     /* the protocol node's, as the daemon sees it */
    uint64_t highest;       /* the protocol node's wr_highest_offset */
    uint64_t armed;         /* the protocol node's write_threshold (0: none) */
    bool nospace;           /* io-status "nospace" */
    bool failed;            /* io-status "failed" */
    uint64_t crossed_at;    /* from BLOCK_WRITE_THRESHOLD: how far the write went, or 0 */
    /* Extension: */
    struct extend_job *job; /* in flight (extend.c's), or NULL */
    uint64_t retry_timer;   /* waiting to try again after a failure */
    uint64_t backoff_ns;
    unsigned failures;
    uint64_t last_extended_wall_ns; /* when the latest extension succeeded (realtime) */
    struct agent_disk_metrics *metrics; /* dm->metrics' record of it */
    const char *reported;   /* the last state logged, so each is logged once */
    /* rbd (its protocol node's driver is rbd): the volume is the pool's max_bytes quota. */
    bool rbd;
    char *rbd_pool;         /* the policy's volume, or the image's pool */
    char *rbd_conf;         /* the node's conf, NULL: Ceph's default */
    struct rbd_probe *probe;/* asking Ceph about the pool (rbd.c's), or NULL */
    uint64_t probe_wall_ns; /* when the latest probe started (realtime) */
    bool pool_known;
    struct rbd_pool_stat pool; /* the latest probe's answer ... */
    uint64_t pool_wall_ns;  /* ... from a probe started then (realtime) */
    /* Set by the reconcile, read by the cont decision: */
    bool ready;             /* nothing to wait for before cont */
    const char *waiting;    /* why not, for the log */
    bool waiting_normal;    /* waiting is the normal course (our own extension...), not news */
};

DEFINE_QUEUE_TYPE(disk_queue, struct disk, next)

/* Something the agent may resume: the daemon's run state (cont), or one stop group
 * (__org.thinblk_group-cont); what it knows of its current stop. */
struct stopped {
    const char *what;       /* "daemon NAME" or "daemon NAME: group NAME", for the log */
    bool cont_in_flight;
    uint64_t since_wall_ns; /* the current io-error's start (0: not in io-error) */
    const char *reported;   /* its last logged state */
    char waiting_text[256]; /* the last reason logged for not resuming */
};

/* A stop group of the daemon, as __org.thinblk_query-groups said at the latest reconcile.
 * Kept while a call about it is in flight (the reply's opaque), else dropped when gone. */
struct group {
    struct group *next;
    struct disk_daemon *dm;
    char *name;
    char *label;            /* st.what */
    bool present;
    bool io_error;          /* its state is io-error */
    bool since_in_flight;   /* query-stop-reason {group} sent, no reply yet */
    unsigned conts;         /* group-conts sent, to tell a reply about an older stop */
    unsigned since_conts;   /* conts when that query-stop-reason was sent */
    struct stopped st;
    struct agent_group_metrics *metrics; /* dm->metrics' record of it */
};

DEFINE_QUEUE_TYPE(group_queue, struct group, next)

/* A watched daemon: its connection and its disks. */
struct disk_daemon {
    struct loop *loop;
    const struct agent_config *cfg;
    const struct agent_daemon_conf *conf;
    const char *self_exe;   /* for the built-in loop method's child */
    struct agent_metrics *metrics; /* shared by every daemon, borrowed */
    struct mon *mon;        /* the connection, ours */
    uint64_t poll_timer;    /* while connected */
    /* Reconcile: */
    bool reconciling;
    bool reconcile_again;
    json_t *snap[SNAP_COUNT]; /* the replies of one reconcile */
    unsigned snap_pending;
    struct stopped run;     /* the run state */
    struct agent_group_metrics *run_metrics; /* its resumes, in metrics */
    char *run_label;        /* run.what */
    disk_queue disks;       /* the newest first */
    group_queue groups;     /* the newest first */
    /* The daemon's event journal: where the agent is in it, to read back what it missed. */
    char *journal_instance; /* the daemon's journal, or NULL: not known (yet, or no journal) */
    uint64_t journal_seq;   /* the newest event of journal_instance seen */
    uint64_t first_live_seq; /* the first event seen on this connection (0: none yet) */
};

static void reconcile(struct disk_daemon *dm);
static void extension_done(void *opaque, bool ok, uint64_t new_size, uint64_t duration_ns,
                           const char *why);

static const char *str(json_t *obj, const char *key)
{
    return json_string_value(json_object_get(obj, key));
}

static uint64_t u64(json_t *obj, const char *key)
{
    json_int_t v = json_integer_value(json_object_get(obj, key));
    return v > 0 ? (uint64_t)v : 0;
}

static void set_str(char **field, const char *value)
{
    if (*field && value && strcmp(*field, value) == 0)
        return;
    free(*field);
    *field = value ? xstrdup(value) : NULL;
}

static uint64_t round_up(uint64_t v, uint64_t to)
{
    return (v + to - 1) / to * to;
}

/* What was last logged about a disk or a daemon, compared by address. */
static const char R_ARMED[] = "armed", R_NOVOLUME[] = "novolume", R_CAP[] = "cap",
                  R_CAP_STOPPED[] = "cap-stopped", R_RUNNING[] = "running",
                  R_PAUSED[] = "paused", R_CONT[] = "cont", R_WAITING[] = "waiting",
                  R_RBD_MISMATCH[] = "rbd-mismatch", R_NOQUOTA[] = "noquota",
                  R_PROBE_FAILED[] = "probe-failed", R_WATCHING[] = "watching";

/* ---- learning the disks --------------------------------------------------------------- */

static const struct agent_disk_policy *find_policy(struct disk_daemon *dm, const char *device,
                                                   const char *root, const char *proto)
{
    const struct agent_config *cfg = dm->cfg;

    /* A policy that names the device or a node wins over "device = *". */
    for (size_t i = 0; i < cfg->disks.len; i++) {
        const struct agent_disk_policy *p = &cfg->disks.ptr[i];
        if (strcmp(p->daemon, dm->conf->name))
            continue;
        if (p->device && strcmp(p->device, "*") && strcmp(p->device, device) == 0)
            return p;
        if (p->node && (strcmp(p->node, root) == 0 || strcmp(p->node, proto) == 0))
            return p;
    }
    for (size_t i = 0; i < cfg->disks.len; i++) {
        const struct agent_disk_policy *p = &cfg->disks.ptr[i];
        if (strcmp(p->daemon, dm->conf->name) == 0 && p->device && strcmp(p->device, "*") == 0)
            return p;
    }
    return NULL;
}

static struct disk *find_disk(struct disk_daemon *dm, const char *device)
{
    for (struct disk *d = dm->disks.head; d; d = d->next) {
        if (strcmp(d->device, device) == 0)
            return d;
    }
    return NULL;
}

static json_t *find_by(json_t *list, const char *key, const char *value)
{
    size_t i;
    json_t *e;

    json_array_foreach(list, i, e) {
        const char *v = str(e, key);
        if (v && strcmp(v, value) == 0)
            return e;
    }
    return NULL;
}

/* The name of a query-block entry's device: its name, or for a device without one (QEMU's
 * -blockdev, as libvirt starts it), its root node's, as learn() names it. NULL: no medium. */
static const char *block_device(json_t *entry)
{
    const char *device = str(entry, "device");

    if (device && *device)
        return device;
    return str(json_object_get(entry, "inserted"), "node-name");
}

static json_t *find_block(json_t *block, const char *device)
{
    size_t i;
    json_t *e;

    json_array_foreach(block, i, e) {
        const char *name = block_device(e);
        if (name && strcmp(name, device) == 0)
            return e;
    }
    return NULL;
}

/* One entry of query-blockstats: the device, its root node and the chain of "parent"s down
 * to the protocol node, whose wr_highest_offset is how far the image reaches. */
static void learn(struct disk_daemon *dm, json_t *entry, json_t *block, json_t *nodes)
{
    const char *device = str(entry, "device"), *root = str(entry, "node-name");
    json_t *bottom = entry;

    if (!root)
        return;
    if (!device || !*device)
        device = root;  /* QEMU: a device without a name is known by its node */
    while (json_is_object(json_object_get(bottom, "parent")) &&
           str(json_object_get(bottom, "parent"), "node-name"))
        bottom = json_object_get(bottom, "parent");
    const char *proto = str(bottom, "node-name");

    const struct agent_disk_policy *p = find_policy(dm, device, root, proto);
    if (!p)
        return;
    struct disk *d = find_disk(dm, device);
    if (!d) {
        d = xzalloc(sizeof(*d));
        d->dm = dm;
        d->device = xstrdup(device);
        d->name = xstrdup(strcmp(p->device ? p->device : "", "*") ? p->name : device);
        d->backoff_ns = dm->cfg->retry_min_ns;
        d->metrics = agent_metrics_disk(dm->metrics, dm->conf->name, d->name);
        disk_queue_push_head(&dm->disks, d);
    }
    d->policy = p;
    d->present = true;
    set_str(&d->format_node, root);
    set_str(&d->proto_node, proto);
    d->highest = u64(json_object_get(bottom, "stats"), "wr_highest_offset");

    json_t *pinfo = find_by(nodes, "node-name", proto), *rinfo = find_by(nodes, "node-name", root);
    json_t *pimage = json_object_get(pinfo, "image"), *rimage = json_object_get(rinfo, "image");
    set_str(&d->filename, str(pimage, "filename") ? str(pimage, "filename") : str(pinfo, "file"));
    d->node_size = u64(pimage, "virtual-size");
    d->armed = u64(pinfo, "write_threshold");
    set_str(&d->format, str(rinfo, "drv"));
    d->rbd = str(pinfo, "drv") && strcmp(str(pinfo, "drv"), "rbd") == 0;
    if (d->rbd) {
        char *pool, *image, *conf;
        if (rbd_parse_filename(d->filename, &pool, &image, &conf) == 0) {
            set_str(&d->rbd_pool, p->volume ? p->volume : pool);
            set_str(&d->rbd_conf, conf);
            free(pool);
            free(image);
            free(conf);
        } else {
            set_str(&d->rbd_pool, p->volume);
        }
    }
    d->virtual_size = u64(rimage, "virtual-size");

    json_t *binfo = find_block(block, device);
    const char *io = str(binfo, "io-status");
    set_str(&d->group, str(binfo, "__org.thinblk_group"));
    d->nospace = io && strcmp(io, "nospace") == 0;
    d->failed = io && strcmp(io, "failed") == 0;
}

/* ---- one disk ------------------------------------------------------------------------- */

static uint64_t disk_cap(const struct disk *d)
{
    const struct agent_disk_policy *p = d->policy;
    unsigned pct = p->cap_percent;

    if (p->cap)
        return p->cap;
    if (!pct)
        pct = d->format && strcmp(d->format, "qcow2") == 0 ? AGENT_CAP_PERCENT : 100;
    return d->virtual_size / 100 * pct / 512 * 512;
}

/* Log what is new about the disk, once. */
static void report(struct disk *d, const char *what, enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void report(struct disk *d, const char *what, enum log_level level, const char *fmt, ...)
{
    char line[768];
    va_list ap;

    if (d->reported == what)
        return;
    d->reported = what;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    log_msg(level, "%s: %s", d->name, line);
}

static void arm(struct disk_daemon *dm, struct disk *d, uint64_t threshold, uint64_t size)
{
    char a[32], b[32], c[32];

    if (d->armed == threshold)
        return;
    json_t *args = json_pack("{s:s,s:I}", "node-name", d->proto_node, "write-threshold",
                             (json_int_t)threshold);
    int r = mon_call(dm->mon, "block-set-write-threshold", args, NULL, NULL);
    json_decref(args);
    if (r < 0)
        return;
    /* Said once per volume size: a re-arm after a reconnect is not news. */
    report(d, R_ARMED, LOG_LEVEL_INFO, "write threshold at %s on node %s (volume %s, "
           "watermark %s)", agent_fmt_size(threshold, a, sizeof(a)), d->proto_node,
           agent_fmt_size(size, b, sizeof(b)), agent_fmt_size(d->policy->watermark, c, sizeof(c)));
    d->armed = threshold;
}

static void set_at_cap(struct disk_daemon *dm, struct disk *d, bool at_cap)
{
    if (d->metrics->at_cap == at_cap)
        return;
    d->metrics->at_cap = at_cap;
    agent_metrics_changed(dm->metrics);
}

/* Start req (its method, volume, sizes and reason set by the caller); what every extension of
 * d says of its disk and daemon is filled in here. */
static void start_extension(struct disk_daemon *dm, struct disk *d, struct extend_request *req)
{
    _cleanup_error_ struct error *err = NULL;

    req->self_exe = dm->self_exe;
    req->timeout_ns = dm->cfg->hook_timeout_ns;
    req->disk = d->name;
    req->daemon = dm->conf->name;
    req->socket = dm->conf->socket;
    req->device = d->device;
    req->node = d->proto_node ? d->proto_node : "";
    req->virtual_size = d->virtual_size;
    d->job = extend_start(dm->loop, req, extension_done, d, &err);
    if (!d->job) {
        log_error("%s: cannot extend %s: %s", d->name, req->volume, err->desc);
        extension_done(d, false, req->from, 0, err->desc);
        return;
    }
    d->waiting = "an extension is running";
    d->waiting_normal = true;
}

/* rbd_probe_fn: what Ceph says of the pool; a failure waits for the next poll. */
static void probe_done(void *opaque, bool ok, const struct rbd_pool_stat *st, const char *why)
{
    struct disk *d = opaque;
    char a[32], b[32];

    d->probe = NULL;
    if (!ok) {
        report(d, R_PROBE_FAILED, LOG_LEVEL_WARN, "cannot read the usage and quota of pool %s: "
               "%s; trying again at the next poll", d->rbd_pool, why);
        return;
    }
    if (d->reported == R_PROBE_FAILED)
        d->reported = NULL;
    d->pool = *st;
    d->pool_known = true;
    d->pool_wall_ns = d->probe_wall_ns;
    log_debug("%s: pool %s: usage %s, quota %s%s", d->name, d->rbd_pool,
              agent_fmt_size(st->used, a, sizeof(a)), agent_fmt_size(st->quota, b, sizeof(b)),
              st->full ? ", flagged full" : "");
    reconcile(d->dm);
}

/* Ask Ceph about the pool if what we know is older than half a poll interval, or than the
 * latest extension. Each answer reconciles: the rate limit keeps that from looping. */
static void probe_pool(struct disk_daemon *dm, struct disk *d)
{
    _cleanup_error_ struct error *err = NULL;
    uint64_t now = now_realtime_ns();

    if (d->probe || (d->probe_wall_ns > d->last_extended_wall_ns &&
                     now - d->probe_wall_ns < dm->cfg->poll_ns / 2))
        return;
    d->probe_wall_ns = now;
    d->probe = rbd_probe_start(dm->loop, dm->self_exe, d->rbd_conf, d->rbd_pool,
                               dm->cfg->hook_timeout_ns, probe_done, d, &err);
    if (!d->probe)
        report(d, R_PROBE_FAILED, LOG_LEVEL_WARN, "cannot read the usage of pool %s: %s",
               d->rbd_pool, err->desc);
}

/* Raise the quota of d's pool by its chunk (at least past the usage plus the watermark), up
 * to its cap; unhandled: because it stopped. */
static void raise_quota(struct disk_daemon *dm, struct disk *d, bool unhandled)
{
    const struct agent_disk_policy *p = d->policy;
    uint64_t size = d->pool.quota, used = d->pool.used;
    char a[32], reason[160];

    snprintf(reason, sizeof(reason), unhandled ? "stopped on no space (EDQUOT), pool usage %s"
             : "pool usage %s is within the watermark of its quota",
             agent_fmt_size(used, a, sizeof(a)));
    struct extend_request req = {
        .method = AGENT_METHOD_RBD,
        .volume = d->rbd_pool,
        .conf = d->rbd_conf,
        .from = size,
        .to = MIN(disk_cap(d), MAX(size + p->chunk, round_up(used + p->watermark, MiB))),
        .reason = reason,
    };
    start_extension(dm, d, &req);
}

/* check_disk() for a disk on rbd: the volume is the pool's quota, what fills it the pool's
 * usage (of every image in it, hence no write threshold: offsets in one image say nothing of
 * it). A stop is resumable once the quota was raised since and the monitor no longer flags
 * the pool full: a cont before that fails the retried write with EDQUOT again. */
static void check_rbd(struct disk_daemon *dm, struct disk *d, const struct stopped *st,
                      bool io_error)
{
    const struct agent_disk_policy *p = d->policy;
    uint64_t cap = disk_cap(d);
    char a[32], b[32], c[32];

    if (!d->rbd || !d->rbd_pool) {
        d->waiting = "its method does not fit its storage";
        report(d, R_RBD_MISMATCH, LOG_LEVEL_ERROR, "device %s: %s", d->device,
               !d->rbd ? "method rbd, but its protocol node is not rbd"
                       : "cannot tell the image's pool from its node (volume = POOL)");
        return;
    }
    probe_pool(dm, d);
    /* What a probe said before the latest extension is stale: it would raise again. */
    if (!d->pool_known || d->pool_wall_ns <= d->last_extended_wall_ns) {
        d->waiting = "the pool's usage is not known yet";
        d->waiting_normal = true;
        return;
    }
    uint64_t size = d->pool.quota, used = d->pool.used;
    bool stopped = io_error && d->nospace;
    bool unhandled = stopped && d->last_extended_wall_ns <= st->since_wall_ns;
    bool near = used + p->watermark > size;

    d->crossed_at = 0;  /* a threshold on an rbd node is not ours */
    if (d->job) {
        d->waiting = "an extension is running";
        d->waiting_normal = true;
        return;
    }
    if (!size) {
        d->waiting = "its pool has no quota to raise";
        report(d, R_NOQUOTA, stopped ? LOG_LEVEL_ERROR : LOG_LEVEL_INFO, "pool %s has no "
               "quota%s", d->rbd_pool, stopped ? ", but the device stopped on no space (the "
               "cluster full?): nothing to raise" : ": nothing to do until it has one");
        d->ready = !stopped;
        return;
    }
    if (!near && !unhandled) {
        set_at_cap(dm, d, false);
        report(d, R_WATCHING, LOG_LEVEL_INFO, "pool %s: usage %s, quota %s (watermark %s)",
               d->rbd_pool, agent_fmt_size(used, a, sizeof(a)), agent_fmt_size(size, b, sizeof(b)),
               agent_fmt_size(p->watermark, c, sizeof(c)));
        if (stopped && d->pool.full) {
            d->waiting = "waiting for the monitor to flag the pool not full";
            d->waiting_normal = true;
        } else {
            d->ready = true;
        }
        return;
    }
    set_at_cap(dm, d, size >= cap);
    if (size >= cap) {
        d->waiting = "at its cap";
        if (stopped)
            report(d, R_CAP_STOPPED, LOG_LEVEL_ERROR, "stopped on no space (EDQUOT) at its "
                   "cap: the quota of pool %s is %s, cap %s (usage %s); left stopped",
                   d->rbd_pool, agent_fmt_size(size, a, sizeof(a)),
                   agent_fmt_size(cap, b, sizeof(b)), agent_fmt_size(used, c, sizeof(c)));
        else
            report(d, R_CAP, LOG_LEVEL_WARN, "the usage %s of pool %s is within the watermark "
                   "of its quota, at its cap %s: not raised further",
                   agent_fmt_size(used, a, sizeof(a)), d->rbd_pool,
                   agent_fmt_size(cap, b, sizeof(b)));
        return;
    }
    if (d->retry_timer) {
        d->waiting = "an extension failed; waiting to retry";
        return;
    }
    raise_quota(dm, d, unhandled);
}

/* io_error: the disk's run state or group (st) is in io-error. */
static void check_disk(struct disk_daemon *dm, struct disk *d, const struct stopped *st,
                       bool io_error)
{
    const struct agent_disk_policy *p = d->policy;
    const char *volume = p->volume ? p->volume : d->filename;
    uint64_t size, cap = disk_cap(d);
    char a[32], b[32], c[32];

    d->ready = false;
    d->waiting = NULL;
    d->waiting_normal = false;
    /* A disk on rbd with another method is a volume as any: an image under qcow2 that a hook
     * grows (rbd resize), its size the node's. */
    if (p->method == AGENT_METHOD_RBD) {
        check_rbd(dm, d, st, io_error);
        return;
    }
    if (!volume || !*volume) {
        d->waiting = "no volume";
        report(d, R_NOVOLUME, LOG_LEVEL_ERROR, "device %s: no volume to extend (volume = ...)",
               d->device);
        return;
    }
    /* Ask the storage, not what we did last time: someone else may have extended it. */
    if (extend_volume_size(volume, &size) < 0)
        size = d->node_size;

    bool stopped = io_error && d->nospace;
    bool unhandled = stopped && d->last_extended_wall_ns <= st->since_wall_ns;
    bool near = d->highest + p->watermark > size;

    if (d->job) {
        d->waiting = "an extension is running";
        d->waiting_normal = true;
        return;
    }
    if (!near && !unhandled) {
        set_at_cap(dm, d, false);
        arm(dm, d, MAX(size - p->watermark, 1), size);
        d->ready = true;
        return;
    }
    set_at_cap(dm, d, size >= cap);
    if (size >= cap) {
        d->waiting = "at its cap";
        if (stopped)
            report(d, R_CAP_STOPPED, LOG_LEVEL_ERROR, "stopped on ENOSPC at its cap: volume "
                   "%s is %s, cap %s (virtual size %s); left stopped", volume,
                   agent_fmt_size(size, a, sizeof(a)), agent_fmt_size(cap, b, sizeof(b)),
                   agent_fmt_size(d->virtual_size, c, sizeof(c)));
        else
            report(d, R_CAP, LOG_LEVEL_WARN, "highest write at %s is within the watermark of "
                   "its cap %s (volume %s): not extended further",
                   agent_fmt_size(d->highest, a, sizeof(a)), agent_fmt_size(cap, b, sizeof(b)),
                   volume);
        return;
    }
    if (d->retry_timer) {
        d->waiting = "an extension failed; waiting to retry";
        return;
    }

    uint64_t to = MAX(size + p->chunk, round_up(d->highest + p->watermark, MiB));
    char reason[160];
    to = MIN(to, cap);
    if (d->crossed_at)
        snprintf(reason, sizeof(reason), "write threshold crossed at %s",
                 agent_fmt_size(d->crossed_at, a, sizeof(a)));
    else if (unhandled)
        snprintf(reason, sizeof(reason), "stopped on ENOSPC, highest write at %s",
                 agent_fmt_size(d->highest, a, sizeof(a)));
    else
        snprintf(reason, sizeof(reason), "highest write at %s is within the watermark "
                 "(found by a query)", agent_fmt_size(d->highest, a, sizeof(a)));
    d->crossed_at = 0;
    struct extend_request req = {
        .method = p->method,
        .hook = p->hook,
        .volume = volume,
        .from = size,
        .to = to,
        .reason = reason,
    };
    start_extension(dm, d, &req);
}

/* ---- the daemon and its groups -------------------------------------------------------- */

static void stopped_report(struct stopped *st, const char *what, enum log_level level,
                           const char *msg)
{
    if (st->reported == what)
        return;
    st->reported = what;
    log_msg(level, "%s: %s", st->what, msg);
}

static struct group *find_group(struct disk_daemon *dm, const char *name)
{
    for (struct group *g = dm->groups.head; g; g = g->next) {
        if (strcmp(g->name, name) == 0)
            return g;
    }
    return NULL;
}

/* Who stops the disk d: its group's state if it is in one we know, else the run state. */
static struct stopped *disk_stopped(struct disk_daemon *dm, struct disk *d, bool run_io_error,
                                    bool *io_error)
{
    struct group *g = d->group ? find_group(dm, d->group) : NULL;

    if (g && g->present) {
        *io_error = g->io_error;
        return &g->st;
    }
    *io_error = run_io_error;
    return &dm->run;
}

static void on_cont(struct mon *mon, json_t *ret, const char *cls, const char *desc, void *opaque)
{
    struct disk_daemon *dm = mon_opaque(mon);
    struct group *g = opaque;
    struct stopped *st = g ? &g->st : &dm->run;

    st->cont_in_flight = false;
    if (cls)
        log_error("%s: %s failed: %s", st->what, g ? "__org.thinblk_group-cont" : "cont", desc);
    reconcile(dm);
}

/* st (the run state, or the group g) is in io-error: resume it if every one of its devices
 * that stopped may be resumed now. Its devices: those of g, or those in no group. */
static void decide_cont(struct disk_daemon *dm, json_t *block, struct group *g)
{
    struct stopped *st = g ? &g->st : &dm->run;
    char why[256] = "";
    bool any = false, normal = false;
    size_t i;
    json_t *e;

    if (st->cont_in_flight)
        return;
    json_array_foreach(block, i, e) {
        const char *io = str(e, "io-status"), *device = block_device(e);
        const char *group = str(e, "__org.thinblk_group");
        if (!io || !device || strcmp(io, "ok") == 0)
            continue;
        if (g ? !group || strcmp(group, g->name) : group != NULL)
            continue;
        any = true;
        struct disk *d = find_disk(dm, device);
        if (d && d->present && strcmp(io, "nospace") == 0) {
            if (!d->ready) {
                snprintf(why, sizeof(why), "%s: %s", d->name, d->waiting ? d->waiting : "not ready");
                normal = d->waiting_normal;
            }
        } else if (strcmp(io, "nospace") == 0) {
            snprintf(why, sizeof(why), "device %s stopped on ENOSPC and has no policy", device);
        } else if (!dm->cfg->resume_on_other_errors) {
            snprintf(why, sizeof(why), "device %s stopped on an I/O error other than ENOSPC "
                     "(resume-on-other-errors is off)", device);
        }
        if (*why)
            break;
    }
    if (!any)
        snprintf(why, sizeof(why), "stopped on an I/O error, but no device says which");
    if (*why) {
        /* Once per distinct reason. */
        if (st->reported != R_WAITING || strcmp(st->waiting_text, why)) {
            snprintf(st->waiting_text, sizeof(st->waiting_text), "%s", why);
            st->reported = R_WAITING;
            /* Waiting for our own extension is the normal course; anything else is news. */
            log_msg(normal ? LOG_LEVEL_INFO : LOG_LEVEL_WARN,
                    "%s: stopped on an I/O error; not resuming yet: %s", st->what, why);
        }
        return;
    }
    uint64_t now = now_realtime_ns();
    double stopped_s = st->since_wall_ns && now > st->since_wall_ns
                           ? (double)(now - st->since_wall_ns) / 1e9 : 0;
    const char *cmd = g ? "__org.thinblk_group-cont" : "cont";
    char msg[160];
    snprintf(msg, sizeof(msg), "resuming (%s) after %.3f s stopped on ENOSPC", cmd, stopped_s);
    json_t *args = g ? json_pack("{s:s}", "name", g->name) : NULL;
    int r = mon_call(dm->mon, cmd, args, on_cont, g);
    json_decref(args);
    if (r == 0) {
        st->cont_in_flight = true;
        st->reported = NULL;
        /* A group seen in io-error again has stopped again (perhaps before we look): from
         * when we see it, until query-stop-reason says. */
        if (g) {
            st->since_wall_ns = 0;
            g->conts++;
        }
        stopped_report(st, R_CONT, LOG_LEVEL_INFO, msg);
        if (g)
            g->metrics->resumes++;
        else
            dm->run_metrics->resumes++;
        agent_metrics_changed(dm->metrics);
    }
}

/* The time of the io-error of a reply of __org.thinblk_query-stop-reason, or 0. */
static uint64_t stop_since(json_t *reason, const char *status)
{
    json_t *since = json_object_get(reason, "since");

    if (!json_is_object(since) || !str(reason, "status") || strcmp(str(reason, "status"), status))
        return 0;
    return u64(since, "seconds") * 1000000000ull + u64(since, "microseconds") * 1000ull;
}

static void on_group_since(struct mon *mon, json_t *ret, const char *cls, const char *desc,
                           void *opaque)
{
    struct group *g = opaque;
    uint64_t since = stop_since(ret, "io-error");

    g->since_in_flight = false;
    if (g->since_conts != g->conts)
        return;  /* asked before our group-cont: about a stop that has ended */
    /* Earlier than when we first saw it (an extension between the two counts), or a new
     * stop that came between two looks. */
    if (g->io_error && since && since != g->st.since_wall_ns) {
        g->st.since_wall_ns = since;
        reconcile(g->dm);
    }
}

static void group_free(struct group *g)
{
    free(g->name);
    free(g->label);
    free(g);
}

/* Take in __org.thinblk_query-groups (NULL or not an array: no groups). */
static void learn_groups(struct disk_daemon *dm, json_t *groups)
{
    size_t i;
    json_t *e;

    for (struct group *g = dm->groups.head; g; g = g->next)
        g->present = false;
    json_array_foreach(groups, i, e) {
        const char *name = str(e, "name"), *status = str(e, "status");
        if (!name || !status)
            continue;
        struct group *g = find_group(dm, name);
        if (!g) {
            g = xzalloc(sizeof(*g));
            g->dm = dm;
            g->name = xstrdup(name);
            g->label = xasprintf("daemon %s: group %s", dm->conf->name, name);
            g->st.what = g->label;
            g->metrics = agent_metrics_group(dm->metrics, dm->conf->name, name);
            group_queue_push_head(&dm->groups, g);
        }
        g->present = true;
        g->io_error = strcmp(status, "io-error") == 0;
        if (!g->io_error) {
            g->st.since_wall_ns = 0;
            continue;
        }
        /* When it stopped: when we first saw it, until query-stop-reason for the group says,
         * asked at every look as the run state's is (the group may have been resumed and
         * stopped again in between); its reply looks again if the time changed. */
        if (!g->st.since_wall_ns)
            g->st.since_wall_ns = now_realtime_ns();
        if (!g->since_in_flight) {
            json_t *args = json_pack("{s:s}", "group", name);
            if (mon_call(dm->mon, "__org.thinblk_query-stop-reason", args, on_group_since,
                         g) == 0) {
                g->since_in_flight = true;
                g->since_conts = g->conts;
            }
            json_decref(args);
        }
    }
    /* Forget the groups that are gone, unless a reply about one is still to come. */
    for (struct group *g = dm->groups.head, *next; g; g = next) {
        next = g->next;
        if (!g->present && !g->st.cont_in_flight && !g->since_in_flight) {
            group_queue_remove(&dm->groups, g);
            group_free(g);
        }
    }
}

static void process(struct disk_daemon *dm)
{
    json_t *status = dm->snap[SNAP_STATUS], *block = dm->snap[SNAP_BLOCK];
    json_t *stats = dm->snap[SNAP_STATS], *nodes = dm->snap[SNAP_NODES];
    json_t *reason = dm->snap[SNAP_STOP_REASON];
    const char *st = str(status, "status");
    size_t i;
    json_t *e;

    if (!st || !json_is_array(block) || !json_is_array(stats) || !json_is_array(nodes)) {
        log_warn("daemon %s: the queries did not all answer; trying again at the next poll",
                 dm->conf->name);
        return;
    }
    log_debug("daemon %s: reconciling: status %s", dm->conf->name, st);
    bool io_error = strcmp(st, "io-error") == 0;
    if (io_error) {
        /* When it stopped: an extension finished after that covers the stop. Without
         * thinblk's query-stop-reason (QEMU), when we first saw it. */
        uint64_t since = stop_since(reason, st);
        if (since)
            dm->run.since_wall_ns = since;
        else if (!dm->run.since_wall_ns)
            dm->run.since_wall_ns = now_realtime_ns();
    } else {
        dm->run.since_wall_ns = 0;
    }
    learn_groups(dm, dm->snap[SNAP_GROUPS]);

    for (struct disk *d = dm->disks.head; d; d = d->next)
        d->present = false;
    json_array_foreach(stats, i, e)
        learn(dm, e, block, nodes);
    for (struct disk *d = dm->disks.head; d; d = d->next) {
        bool stopped;
        if (!d->present)
            continue;
        struct stopped *by = disk_stopped(dm, d, io_error, &stopped);
        check_disk(dm, d, by, stopped);
    }

    if (strcmp(st, "running") == 0) {
        stopped_report(&dm->run, R_RUNNING, LOG_LEVEL_DEBUG, "running");
    } else if (io_error) {
        decide_cont(dm, block, NULL);
    } else if (strcmp(st, "paused") == 0 || strcmp(st, "prelaunch") == 0) {
        stopped_report(&dm->run, R_PAUSED, LOG_LEVEL_INFO, "paused by a stop command (or -S), "
                       "not by an I/O error: left alone");
    }
    /* Each group on its own. A group-cont while the run state is not running is still right:
     * the group's devices then wait for the run state's cont, which is not ours to give. */
    json_array_foreach(dm->snap[SNAP_GROUPS], i, e) {
        struct group *g = find_group(dm, str(e, "name") ? str(e, "name") : "");
        const char *gst = str(e, "status");
        if (!g || !gst)
            continue;
        if (g->io_error)
            decide_cont(dm, block, g);
        else if (strcmp(gst, "paused") == 0)
            stopped_report(&g->st, R_PAUSED, LOG_LEVEL_INFO, "paused by "
                           "__org.thinblk_group-stop, not by an I/O error: left alone");
        else if (strcmp(gst, "running") == 0)
            stopped_report(&g->st, R_RUNNING, LOG_LEVEL_DEBUG, "running");
    }
}

static void on_snap(struct mon *mon, json_t *ret, const char *cls, const char *desc, void *opaque)
{
    struct disk_daemon *dm = mon_opaque(mon);
    size_t idx = (size_t)(uintptr_t)opaque;

    json_decref(dm->snap[idx]);
    dm->snap[idx] = ret ? json_incref(ret) : NULL;
    /* thinblk's own queries may be missing: QEMU, or a thinblkd from before stop groups. */
    bool optional = idx == SNAP_STOP_REASON ||
                    (idx == SNAP_GROUPS && cls && strcmp(cls, "CommandNotFound") == 0);
    if (cls && !optional)
        log_warn("daemon %s: %s failed: %s", dm->conf->name, snap_commands[idx], desc);
    if (--dm->snap_pending)
        return;
    dm->reconciling = false;
    process(dm);
    if (dm->reconcile_again) {
        dm->reconcile_again = false;
        reconcile(dm);
    }
}

/* Query the daemon and act on the answers; calls made while one runs are coalesced into one
 * more run after it. No-op while disconnected. */
static void reconcile(struct disk_daemon *dm)
{
    if (!mon_ready(dm->mon))
        return;
    if (dm->reconciling) {
        dm->reconcile_again = true;
        return;
    }
    dm->reconciling = true;
    dm->snap_pending = SNAP_COUNT;
    for (size_t i = 0; i < SNAP_COUNT; i++) {
        if (mon_call(dm->mon, snap_commands[i], NULL, on_snap, (void *)(uintptr_t)i) < 0) {
            /* The connection is going: its EOF resets all this. */
            dm->snap_pending -= (unsigned)(SNAP_COUNT - i);
            if (!dm->snap_pending)
                dm->reconciling = false;
            return;
        }
    }
}

/* mon_ops: an event from the daemon asks for a reconcile, if it is one that matters. */
/* An event, live or read back from the journal: whether it asks for a reconcile. */
static bool take_event(struct disk_daemon *dm, const char *name, json_t *data)
{
    if (strcmp(name, "BLOCK_WRITE_THRESHOLD") == 0) {
        const char *node = str(data, "node-name");
        for (struct disk *d = dm->disks.head; d && node; d = d->next) {
            if (d->proto_node && strcmp(d->proto_node, node) == 0) {
                d->crossed_at = u64(data, "write-threshold") + u64(data, "amount-exceeded");
                d->armed = 0;
            }
        }
        log_debug("daemon %s: BLOCK_WRITE_THRESHOLD on %s", dm->conf->name, node ? node : "?");
    } else if (strcmp(name, "BLOCK_IO_ERROR") == 0) {
        log_debug("daemon %s: BLOCK_IO_ERROR on %s: %s", dm->conf->name, str(data, "device") ?: "?",
                  str(data, "reason") ?: "?");
    } else if (strcmp(name, "STOP") && strcmp(name, "RESUME") &&
               strcmp(name, "__org.thinblk_GROUP_STOP") &&
               strcmp(name, "__org.thinblk_GROUP_RESUME")) {
        return false;
    }
    return true;
}

static void on_event(void *opaque, const char *name, json_t *data, uint64_t seq)
{
    struct disk_daemon *dm = opaque;

    if (seq) {
        if (!dm->first_live_seq)
            dm->first_live_seq = seq;
        dm->journal_seq = seq;
    }
    if (take_event(dm, name, data))
        reconcile(dm);
}

/* The journal's answer after a (re)connect: the events missed since journal_seq (all of them
 * if the daemon is not the one seen before: restarted), except those that came live since. */
static void on_journal(struct mon *mon, json_t *ret, const char *cls, const char *desc,
                       void *opaque)
{
    struct disk_daemon *dm = mon_opaque(mon);
    const char *instance = str(ret, "instance");
    json_t *events = json_object_get(ret, "events"), *ev;
    bool first = !dm->journal_instance, restarted, again = false;
    uint64_t dropped = u64(ret, "dropped"), last = u64(ret, "last-seq"), missed = 0;
    uint64_t from = 0, to = 0;
    char names[256] = "";
    size_t i, len = 0;

    if (!ret || !instance || !json_is_array(events)) {
        /* QEMU has no journal (CommandNotFound): what was missed is only in the queries. */
        if (cls && strcmp(cls, "CommandNotFound"))
            log_warn("daemon %s: __org.thinblk_query-event-journal: %s", dm->conf->name,
                        desc ? desc : "an answer without its members");
        return;
    }
    restarted = !first && strcmp(instance, dm->journal_instance) != 0;
    set_str(&dm->journal_instance, instance);
    if (!first) {
        json_array_foreach(events, i, ev) {
            uint64_t seq = u64(ev, "__org.thinblk_seq");
            const char *name = str(ev, "event");
            if (!name || (dm->first_live_seq && seq >= dm->first_live_seq))
                continue;  /* seen live on this connection */
            missed++;
            from = from ? from : seq;
            to = seq;
            again |= take_event(dm, name, json_object_get(ev, "data"));
            if (len < sizeof(names) - 1)
                len += snprintf(names + len, sizeof(names) - len, "%s%s", len ? ", " : "", name);
        }
        if (len >= sizeof(names) - 1)
            strcpy(names + sizeof(names) - 5, "...");
        if (restarted && !missed)
            log_info("daemon %s: restarted while disconnected; no events since its start",
                     dm->conf->name);
        else if (missed)
            log_info("daemon %s: %s%" PRIu64 " events while disconnected (%" PRIu64 " to %" PRIu64
                     "): %s", dm->conf->name, restarted ? "restarted; " : "", missed, from, to,
                     names);
        if (dropped)
            log_warn("daemon %s: %" PRIu64 " more events while disconnected are no longer in "
                        "its journal (--event-journal size=N keeps the last N); what they "
                        "changed is read from the queries", dm->conf->name, dropped);
    }
    dm->journal_seq = last;  /* events after it come after this answer */
    if (again)
        reconcile(dm);
}

/* On a (re)connect: the journal from the last event seen, or its position the first time. */
static void read_journal(struct disk_daemon *dm)
{
    json_t *args = json_object();

    dm->first_live_seq = 0;
    if (dm->journal_instance)
        json_object_set_new(args, "instance", json_string(dm->journal_instance));
    if (dm->journal_instance && dm->journal_seq)
        json_object_set_new(args, "after", json_integer((json_int_t)dm->journal_seq));
    mon_call(dm->mon, "__org.thinblk_query-event-journal", args, on_journal, NULL);
    json_decref(args);
}

static void on_poll(struct loop *loop, void *opaque)
{
    struct disk_daemon *dm = opaque;

    dm->poll_timer = loop_add_timer(loop, dm->cfg->poll_ns, on_poll, dm);
    reconcile(dm);
}

/* mon_ops: (re)connected: poll from now on, and look at everything. */
static void on_connected(void *opaque)
{
    struct disk_daemon *dm = opaque;

    dm->poll_timer = loop_add_timer(dm->loop, dm->cfg->poll_ns, on_poll, dm);
    read_journal(dm);
    reconcile(dm);
}

/* mon_ops: the connection was lost: what was in flight is gone, what was armed or reported
 * is to be done again. */
static void on_disconnected(void *opaque)
{
    struct disk_daemon *dm = opaque;

    loop_del_timer(dm->loop, dm->poll_timer);
    dm->poll_timer = 0;
    dm->reconciling = false;
    dm->reconcile_again = false;
    dm->snap_pending = 0;
    dm->run.cont_in_flight = false;
    dm->run.reported = NULL;
    for (struct group *g = dm->groups.head; g; g = g->next) {
        g->st.cont_in_flight = false;
        g->st.reported = NULL;
        g->since_in_flight = false;
    }
    for (struct disk *d = dm->disks.head; d; d = d->next) {
        d->present = false;
        d->armed = 0;
        d->reported = NULL;
    }
}

static void on_retry(struct loop *loop, void *opaque)
{
    struct disk *d = opaque;

    d->retry_timer = 0;
    reconcile(d->dm);
}

/* extend_done_fn, and a start that failed: count it, back off after a failure, look again. */
static void extension_done(void *opaque, bool ok, uint64_t new_size, uint64_t duration_ns,
                           const char *why)
{
    struct disk *d = opaque;
    struct disk_daemon *dm = d->dm;

    d->job = NULL;
    if (ok) {
        d->metrics->extensions++;
        d->metrics->duration_ns += duration_ns;
    } else {
        d->metrics->failures++;
    }
    agent_metrics_changed(dm->metrics);

    if (ok) {
        d->failures = 0;
        d->backoff_ns = dm->cfg->retry_min_ns;
        d->last_extended_wall_ns = now_realtime_ns();
        d->reported = NULL;
    } else {
        d->failures++;
        log_warn("%s: retrying in %.1f s (failure %u)", d->name, (double)d->backoff_ns / 1e9,
                 d->failures);
        loop_del_timer(dm->loop, d->retry_timer);
        d->retry_timer = loop_add_timer(dm->loop, d->backoff_ns, on_retry, d);
        d->backoff_ns = MIN(d->backoff_ns * 2, dm->cfg->retry_max_ns);
    }
    reconcile(dm);
}

static const struct mon_ops disk_mon_ops = {
    .connected = on_connected,
    .event = on_event,
    .disconnected = on_disconnected,
};

struct disk_daemon *disk_daemon_new(struct loop *loop, const struct agent_config *cfg,
                                    const struct agent_daemon_conf *conf, const char *self_exe,
                                    struct agent_metrics *metrics)
{
    struct disk_daemon *dm = xzalloc(sizeof(*dm));

    dm->metrics = metrics;
    dm->loop = loop;
    dm->cfg = cfg;
    dm->conf = conf;
    dm->self_exe = self_exe;
    dm->run_label = xasprintf("daemon %s", conf->name);
    dm->run.what = dm->run_label;
    dm->run_metrics = agent_metrics_group(metrics, conf->name, NULL);
    dm->mon = mon_new(loop, conf, cfg->reconnect_max_ns, &disk_mon_ops, dm);
    return dm;
}

void disk_daemon_start(struct disk_daemon *dm)
{
    mon_start(dm->mon);
}

void disk_daemon_free(struct disk_daemon *dm)
{
    struct disk *d;
    struct group *g;

    if (!dm)
        return;
    mon_free(dm->mon);
    loop_del_timer(dm->loop, dm->poll_timer);
    while ((d = disk_queue_pop(&dm->disks))) {
        if (d->job)
            extend_abandon(d->job);
        loop_del_timer(dm->loop, d->retry_timer);
        free(d->name);
        free(d->device);
        free(d->group);
        free(d->format_node);
        free(d->proto_node);
        free(d->filename);
        free(d->format);
        free(d->rbd_pool);
        free(d->rbd_conf);
        rbd_probe_abandon(d->probe);
        free(d);
    }
    while ((g = group_queue_pop(&dm->groups)))
        group_free(g);
    free(dm->journal_instance);
    for (size_t i = 0; i < SNAP_COUNT; i++)
        json_decref(dm->snap[i]);
    free(dm->run_label);
    free(dm);
}
