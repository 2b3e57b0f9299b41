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
 *   - the daemon in io-error: cont once every device that stopped is a disk of ours that
 *     stopped on ENOSPC and has been extended past its writes (or, with
 *     resume-on-other-errors, any other error). Never cont a daemon in "paused": a person
 *     stopped it.
 */
#include "agent/agent.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"

enum {
    SNAP_STATUS,
    SNAP_BLOCK,
    SNAP_STATS,
    SNAP_NODES,
    SNAP_STOP_REASON,
    SNAP_COUNT,
};

static const char *const snap_commands[SNAP_COUNT] = {
    "query-status", "query-block", "query-blockstats", "query-named-block-nodes",
    "__org.thinblk_query-stop-reason",
};

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
                  R_PAUSED[] = "paused", R_CONT[] = "cont", R_WAITING[] = "waiting";

/* ---- learning the disks --------------------------------------------------------------- */

static const struct agent_disk_policy *find_policy(struct mon *m, const char *device,
                                                   const char *root, const char *proto)
{
    const struct agent_config *cfg = m->agent->cfg;

    /* A policy that names the device or a node wins over "device = *". */
    for (size_t i = 0; i < cfg->ndisks; i++) {
        const struct agent_disk_policy *p = &cfg->disks[i];
        if (strcmp(p->daemon, m->conf->name))
            continue;
        if (p->device && strcmp(p->device, "*") && strcmp(p->device, device) == 0)
            return p;
        if (p->node && (strcmp(p->node, root) == 0 || strcmp(p->node, proto) == 0))
            return p;
    }
    for (size_t i = 0; i < cfg->ndisks; i++) {
        const struct agent_disk_policy *p = &cfg->disks[i];
        if (strcmp(p->daemon, m->conf->name) == 0 && p->device && strcmp(p->device, "*") == 0)
            return p;
    }
    return NULL;
}

static struct disk *find_disk(struct mon *m, const char *device)
{
    for (struct disk *d = m->disks.head; d; d = d->next) {
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

/* One entry of query-blockstats: the device, its root node and the chain of "parent"s down
 * to the protocol node, whose wr_highest_offset is how far the image reaches. */
static void learn(struct mon *m, json_t *entry, json_t *block, json_t *nodes)
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

    const struct agent_disk_policy *p = find_policy(m, device, root, proto);
    if (!p)
        return;
    struct disk *d = find_disk(m, device);
    if (!d) {
        d = xzalloc(sizeof(*d));
        d->mon = m;
        d->device = xstrdup(device);
        d->name = xstrdup(strcmp(p->device ? p->device : "", "*") ? p->name : device);
        d->backoff_ns = m->agent->cfg->retry_min_ns;
        disk_queue_push_head(&m->disks, d);
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
    d->virtual_size = u64(rimage, "virtual-size");

    const char *io = str(find_by(block, "device", device), "io-status");
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

static void arm(struct mon *m, struct disk *d, uint64_t threshold, uint64_t size)
{
    char a[32], b[32], c[32];

    if (d->armed == threshold)
        return;
    json_t *args = json_pack("{s:s,s:I}", "node-name", d->proto_node, "write-threshold",
                             (json_int_t)threshold);
    int r = mon_call(m, "block-set-write-threshold", args, NULL, NULL);
    json_decref(args);
    if (r < 0)
        return;
    /* Said once per volume size: a re-arm after a reconnect is not news. */
    report(d, R_ARMED, LOG_LEVEL_INFO, "write threshold at %s on node %s (volume %s, "
           "watermark %s)", agent_fmt_size(threshold, a, sizeof(a)), d->proto_node,
           agent_fmt_size(size, b, sizeof(b)), agent_fmt_size(d->policy->watermark, c, sizeof(c)));
    d->armed = threshold;
}

static void check_disk(struct mon *m, struct disk *d, bool io_error)
{
    const struct agent_disk_policy *p = d->policy;
    const char *volume = p->volume ? p->volume : d->filename;
    uint64_t size, cap = disk_cap(d);
    char a[32], b[32], c[32];
    _cleanup_error_ struct error *err = NULL;

    d->ready = false;
    d->waiting = NULL;
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
    bool unhandled = stopped && d->last_extended_wall_ns <= m->stopped_since_wall_ns;
    bool near = d->highest + p->watermark > size;

    if (d->job) {
        d->waiting = "an extension is running";
        return;
    }
    if (!near && !unhandled) {
        arm(m, d, MAX(size - p->watermark, 1), size);
        d->ready = true;
        return;
    }
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
    if (!extend_start(m->agent, d, volume, size, to, reason, &err)) {
        log_error("%s: cannot extend %s: %s", d->name, volume, err->desc);
        disk_extension_done(d, false, size, err->desc);
        return;
    }
    d->waiting = "an extension is running";
}

/* ---- the daemon ----------------------------------------------------------------------- */

static void mon_report(struct mon *m, const char *what, enum log_level level, const char *msg)
{
    if (m->reported == what)
        return;
    m->reported = what;
    log_msg(level, "daemon %s: %s", m->conf->name, msg);
}

static void on_cont(struct mon *m, json_t *ret, const char *cls, const char *desc, void *opaque)
{
    m->cont_in_flight = false;
    if (cls)
        log_error("daemon %s: cont failed: %s", m->conf->name, desc);
    disk_reconcile(m);
}

/* In io-error: cont if every device that stopped may be resumed now. */
static void decide_cont(struct mon *m, json_t *block)
{
    char why[256] = "";
    bool any = false;
    size_t i;
    json_t *e;

    if (m->cont_in_flight)
        return;
    json_array_foreach(block, i, e) {
        const char *io = str(e, "io-status"), *device = str(e, "device");
        if (!io || !device || strcmp(io, "ok") == 0)
            continue;
        any = true;
        struct disk *d = find_disk(m, device);
        if (d && d->present && strcmp(io, "nospace") == 0) {
            if (!d->ready)
                snprintf(why, sizeof(why), "%s: %s", d->name, d->waiting ? d->waiting : "not ready");
        } else if (strcmp(io, "nospace") == 0) {
            snprintf(why, sizeof(why), "device %s stopped on ENOSPC and has no policy", device);
        } else if (!m->agent->cfg->resume_on_other_errors) {
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
        if (m->reported != R_WAITING || strcmp(m->waiting_text, why)) {
            snprintf(m->waiting_text, sizeof(m->waiting_text), "%s", why);
            m->reported = R_WAITING;
            /* Waiting for our own extension is the normal course; anything else is news. */
            log_msg(strstr(why, "an extension is running") ? LOG_LEVEL_INFO : LOG_LEVEL_WARN,
                    "daemon %s: stopped on an I/O error; not resuming yet: %s", m->conf->name,
                    why);
        }
        return;
    }
    uint64_t now = now_realtime_ns();
    double stopped_s = m->stopped_since_wall_ns && now > m->stopped_since_wall_ns
                           ? (double)(now - m->stopped_since_wall_ns) / 1e9 : 0;
    char msg[160];
    snprintf(msg, sizeof(msg), "resuming (cont) after %.3f s stopped on ENOSPC", stopped_s);
    if (mon_call(m, "cont", NULL, on_cont, NULL) == 0) {
        m->cont_in_flight = true;
        m->reported = NULL;
        mon_report(m, R_CONT, LOG_LEVEL_INFO, msg);
    }
}

static void process(struct mon *m)
{
    json_t *status = m->snap[SNAP_STATUS], *block = m->snap[SNAP_BLOCK];
    json_t *stats = m->snap[SNAP_STATS], *nodes = m->snap[SNAP_NODES];
    json_t *reason = m->snap[SNAP_STOP_REASON];
    const char *st = str(status, "status");
    size_t i;
    json_t *e;

    if (!st || !json_is_array(block) || !json_is_array(stats) || !json_is_array(nodes)) {
        log_warn("daemon %s: the queries did not all answer; trying again at the next poll",
                 m->conf->name);
        return;
    }
    log_debug("daemon %s: reconciling: status %s", m->conf->name, st);
    bool io_error = strcmp(st, "io-error") == 0;
    if (io_error) {
        /* When it stopped: an extension finished after that covers the stop. Without
         * thinblk's query-stop-reason (QEMU), when we first saw it. */
        json_t *since = json_object_get(reason, "since");
        if (json_is_object(since) && str(reason, "status") && strcmp(str(reason, "status"), st) == 0)
            m->stopped_since_wall_ns = u64(since, "seconds") * 1000000000ull +
                                       u64(since, "microseconds") * 1000ull;
        else if (!m->stopped_since_wall_ns)
            m->stopped_since_wall_ns = now_realtime_ns();
    } else {
        m->stopped_since_wall_ns = 0;
    }

    for (struct disk *d = m->disks.head; d; d = d->next)
        d->present = false;
    json_array_foreach(stats, i, e)
        learn(m, e, block, nodes);
    for (struct disk *d = m->disks.head; d; d = d->next) {
        if (d->present)
            check_disk(m, d, io_error);
    }

    if (strcmp(st, "running") == 0) {
        mon_report(m, R_RUNNING, LOG_LEVEL_DEBUG, "running");
    } else if (io_error) {
        decide_cont(m, block);
    } else if (strcmp(st, "paused") == 0 || strcmp(st, "prelaunch") == 0) {
        mon_report(m, R_PAUSED, LOG_LEVEL_INFO, "paused by a stop command (or -S), not by an "
                   "I/O error: left alone");
    }
}

static void on_snap(struct mon *m, json_t *ret, const char *cls, const char *desc, void *opaque)
{
    size_t idx = (size_t)(uintptr_t)opaque;

    json_decref(m->snap[idx]);
    m->snap[idx] = ret ? json_incref(ret) : NULL;
    if (cls && idx != SNAP_STOP_REASON)
        log_warn("daemon %s: %s failed: %s", m->conf->name, snap_commands[idx], desc);
    if (--m->snap_pending)
        return;
    m->reconciling = false;
    process(m);
    if (m->reconcile_again) {
        m->reconcile_again = false;
        disk_reconcile(m);
    }
}

void disk_reconcile(struct mon *m)
{
    if (!m->ready)
        return;
    if (m->reconciling) {
        m->reconcile_again = true;
        return;
    }
    m->reconciling = true;
    m->snap_pending = SNAP_COUNT;
    for (size_t i = 0; i < SNAP_COUNT; i++) {
        if (mon_call(m, snap_commands[i], NULL, on_snap, (void *)(uintptr_t)i) < 0) {
            /* The connection is going: its EOF resets all this. */
            m->snap_pending -= (unsigned)(SNAP_COUNT - i);
            if (!m->snap_pending)
                m->reconciling = false;
            return;
        }
    }
}

void disk_on_event(struct mon *m, const char *name, json_t *data)
{
    if (strcmp(name, "BLOCK_WRITE_THRESHOLD") == 0) {
        const char *node = str(data, "node-name");
        for (struct disk *d = m->disks.head; d && node; d = d->next) {
            if (d->proto_node && strcmp(d->proto_node, node) == 0) {
                d->crossed_at = u64(data, "write-threshold") + u64(data, "amount-exceeded");
                d->armed = 0;
            }
        }
        log_debug("daemon %s: BLOCK_WRITE_THRESHOLD on %s", m->conf->name, node ? node : "?");
    } else if (strcmp(name, "BLOCK_IO_ERROR") == 0) {
        log_debug("daemon %s: BLOCK_IO_ERROR on %s: %s", m->conf->name, str(data, "device") ?: "?",
                  str(data, "reason") ?: "?");
    } else if (strcmp(name, "STOP") && strcmp(name, "RESUME")) {
        return;
    }
    disk_reconcile(m);
}

void disk_on_disconnect(struct mon *m)
{
    m->reconciling = false;
    m->reconcile_again = false;
    m->snap_pending = 0;
    m->cont_in_flight = false;
    m->reported = NULL;
    for (struct disk *d = m->disks.head; d; d = d->next) {
        d->present = false;
        d->armed = 0;
        d->reported = NULL;
    }
}

static void on_retry(struct loop *loop, void *opaque)
{
    struct disk *d = opaque;

    d->retry_timer = 0;
    disk_reconcile(d->mon);
}

void disk_extension_done(struct disk *d, bool ok, uint64_t new_size, const char *why)
{
    struct agent *a = d->mon->agent;

    if (ok) {
        d->extensions++;
        d->failures = 0;
        d->backoff_ns = a->cfg->retry_min_ns;
        d->last_extended_wall_ns = now_realtime_ns();
        d->reported = NULL;
    } else {
        d->failures++;
        log_warn("%s: retrying in %.1f s (failure %u)", d->name, (double)d->backoff_ns / 1e9,
                 d->failures);
        loop_del_timer(a->loop, d->retry_timer);
        d->retry_timer = loop_add_timer(a->loop, d->backoff_ns, on_retry, d);
        d->backoff_ns = MIN(d->backoff_ns * 2, a->cfg->retry_max_ns);
    }
    disk_reconcile(d->mon);
}

void disk_free_all(struct mon *m)
{
    struct disk *d;

    while ((d = disk_queue_pop(&m->disks))) {
        if (d->job)
            extend_abandon(m->agent, d->job);
        loop_del_timer(m->agent->loop, d->retry_timer);
        free(d->name);
        free(d->device);
        free(d->format_node);
        free(d->proto_node);
        free(d->filename);
        free(d->format);
        free(d);
    }
}
