/* Metrics in Prometheus' text format, from query-status, query-block, query-blockstats and
 * query-named-block-nodes. Every sample of a family is printed together, after its HELP and
 * TYPE lines, as the format requires; so each family walks all the devices. */
#include "ctl/metrics.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "common/qjson.h"
#include "common/util.h"

/* A family, with one line of help. */
static void family(const char *name, const char *type, const char *help)
{
    printf("# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value, escaped as the format wants: backslash, double quote and newline. */
static void print_label_value(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            printf("\\%c", *s);
        else if (*s == '\n')
            fputs("\\n", stdout);
        else
            putchar(*s);
    }
    putchar('"');
}

/* "name{device="..",node=".."[,extra="value"]} " */
static void sample_start(const char *name, const char *device, const char *node,
                         const char *extra, const char *value)
{
    printf("%s{device=", name);
    print_label_value(device);
    printf(",node=");
    print_label_value(node);
    if (extra) {
        printf(",%s=", extra);
        print_label_value(value);
    }
    printf("} ");
}

static const char *str_member(json_t *obj, const char *key)
{
    const char *s = json_string_value(json_object_get(obj, key));
    return s ? s : "";
}

/* An unsigned integer member: 1 and *v set, 0 if absent or not one. Boxed values above
 * INT64_MAX (common/qjson.h) included. */
static int uint_member(json_t *obj, const char *key, uint64_t *v)
{
    json_t *m = json_object_get(obj, key);
    if (m && qjson_is_big_uint64(m)) {
        *v = qjson_uint64(m);
        return 1;
    }
    if (!json_is_integer(m) || json_integer_value(m) < 0)
        return 0;
    *v = (uint64_t)json_integer_value(m);
    return 1;
}

/* ---- per device, from query-blockstats -------------------------------------------------- */

/* A counter taken as is from a device's stats; op, if set, is its "op" label. */
struct stat_sample {
    const char *member;
    const char *op;
};

static void stat_family(json_t *blockstats, const char *name, const char *help,
                        const struct stat_sample *samples, size_t n)
{
    size_t i;
    json_t *e;
    bool titled = false;

    json_array_foreach(blockstats, i, e) {
        json_t *stats = json_object_get(e, "stats");
        for (size_t k = 0; k < n; k++) {
            uint64_t v;
            if (!uint_member(stats, samples[k].member, &v))
                continue;
            if (!titled)
                family(name, "counter", help);
            titled = true;
            sample_start(name, str_member(e, "device"), str_member(e, "node-name"),
                         samples[k].op ? "op" : NULL, samples[k].op);
            printf("%" PRIu64 "\n", v);
        }
    }
}

static void print_stats(json_t *blockstats)
{
    static const struct stat_sample rd[] = {{"rd_bytes", NULL}}, wr[] = {{"wr_bytes", NULL}},
        unmap[] = {{"unmap_bytes", NULL}},
        ops[] = {{"rd_operations", "read"}, {"wr_operations", "write"},
                 {"flush_operations", "flush"}, {"unmap_operations", "unmap"}},
        failed[] = {{"failed_rd_operations", "read"}, {"failed_wr_operations", "write"},
                    {"failed_flush_operations", "flush"}, {"failed_unmap_operations", "unmap"}},
        stops[] = {{"__org.thinblk_stopped-count", NULL}},
        parked[] = {{"__org.thinblk_parked-requests", NULL}},
        held[] = {{"__org.thinblk_held-requests", NULL}};

    stat_family(blockstats, "thinblk_device_read_bytes_total", "Bytes read by the device's "
                "clients.", rd, 1);
    stat_family(blockstats, "thinblk_device_written_bytes_total", "Bytes written by the "
                "device's clients.", wr, 1);
    stat_family(blockstats, "thinblk_device_unmapped_bytes_total", "Bytes discarded by the "
                "device's clients.", unmap, 1);
    stat_family(blockstats, "thinblk_device_operations_total", "Requests that succeeded, by "
                "operation.", ops, ARRAY_SIZE(ops));
    stat_family(blockstats, "thinblk_device_failed_operations_total", "Requests whose error "
                "went to the client, by operation.", failed, ARRAY_SIZE(failed));
    stat_family(blockstats, "thinblk_device_stops_total", "Times the device's run state (the "
                "daemon's, or its group's) left running since it was created.", stops, 1);
    stat_family(blockstats, "thinblk_device_parked_requests_total", "Requests parked by an "
                "error with action stop, to be retried on cont.", parked, 1);
    stat_family(blockstats, "thinblk_device_held_requests_total", "Requests that came while the "
                "device was stopped and waited for cont.", held, 1);
}

/* A member of the stats in nanoseconds, as a family in seconds as Prometheus wants times. */
static void print_seconds(json_t *blockstats, const char *name, const char *type,
                          const char *help, const char *member)
{
    size_t i;
    json_t *e;
    bool titled = false;

    json_array_foreach(blockstats, i, e) {
        uint64_t ns;
        if (!uint_member(json_object_get(e, "stats"), member, &ns))
            continue;
        if (!titled)
            family(name, type, help);
        titled = true;
        sample_start(name, str_member(e, "device"), str_member(e, "node-name"), NULL, NULL);
        printf("%" PRIu64 ".%09" PRIu64 "\n", ns / 1000000000, ns % 1000000000);
    }
}

/* ---- per node of each device's chain ---------------------------------------------------- */

static json_t *named_node(json_t *nodes, const char *name)
{
    size_t i;
    json_t *n;

    json_array_foreach(nodes, i, n) {
        if (strcmp(str_member(n, "node-name"), name) == 0)
            return n;
    }
    return NULL;
}

enum node_value { NODE_HIGHEST, NODE_SIZE, NODE_ALLOCATED };

/* The value of one node of a chain: 1 and *v set, or 0 if the server does not say. */
static int node_value(json_t *nodes, json_t *entry, enum node_value what, uint64_t *v)
{
    if (what == NODE_HIGHEST)
        return uint_member(json_object_get(entry, "stats"), "wr_highest_offset", v);
    json_t *image = json_object_get(named_node(nodes, str_member(entry, "node-name")), "image");
    return uint_member(image, what == NODE_SIZE ? "virtual-size" : "actual-size", v);
}

/* One gauge for every node from each device's root down its "parent" chain (the file the
 * format writes into is the parent's stats in query-blockstats). */
static void node_family(const struct ctl_metrics_input *in, enum node_value what,
                        const char *name, const char *help)
{
    size_t i;
    json_t *e;

    family(name, "gauge", help);
    json_array_foreach(in->blockstats, i, e) {
        const char *device = str_member(e, "device");
        for (json_t *n = e; json_is_object(n); n = json_object_get(n, "parent")) {
            uint64_t v;
            if (!node_value(in->nodes, n, what, &v))
                continue;
            sample_start(name, device, str_member(n, "node-name"), NULL, NULL);
            printf("%" PRIu64 "\n", v);
        }
    }
}

/* ---- run state and io-status ------------------------------------------------------------- */

static void print_io_status(json_t *block)
{
    static const char *const states[] = {"ok", "failed", "nospace"};
    static const char name[] = "thinblk_device_io_status";
    size_t i;
    json_t *d;

    family(name, "gauge", "1 for the device's io-status (nospace: stopped on ENOSPC), 0 for "
           "the others.");
    json_array_foreach(block, i, d) {
        const char *io = str_member(d, "io-status");
        if (!*io)
            continue;  /* a device that does not stop on errors has none */
        const char *node = str_member(json_object_get(d, "inserted"), "node-name");
        for (size_t k = 0; k < ARRAY_SIZE(states); k++) {
            sample_start(name, str_member(d, "device"), node, "status", states[k]);
            printf("%d\n", strcmp(io, states[k]) == 0);
        }
    }
}

static void print_run_state(json_t *status)
{
    family("thinblk_running", "gauge", "1 if the daemon is running, 0 if stopped.");
    printf("thinblk_running %d\n", json_is_true(json_object_get(status, "running")));
    family("thinblk_run_state", "gauge", "1 for the daemon's run state (query-status).");
    printf("thinblk_run_state{status=");
    print_label_value(str_member(status, "status"));
    printf("} 1\n");
}

void ctl_metrics_print(const struct ctl_metrics_input *in)
{
    print_run_state(in->status);
    print_io_status(in->block);
    print_stats(in->blockstats);
    print_seconds(in->blockstats, "thinblk_device_stopped_seconds_total", "counter",
                  "Time the device's run state was not running since it was created.",
                  "__org.thinblk_stopped-time-ns");
    print_seconds(in->blockstats, "thinblk_device_longest_stall_seconds", "gauge",
                  "The longest a request of the device has waited for cont, parked or held.",
                  "__org.thinblk_longest-stall-ns");
    node_family(in, NODE_HIGHEST, "thinblk_node_highest_written_offset_bytes",
                "The end of the furthest write into the node (wr_highest_offset).");
    node_family(in, NODE_SIZE, "thinblk_node_size_bytes",
                "The node's size: for a file or host_device node, the volume's.");
    node_family(in, NODE_ALLOCATED, "thinblk_node_allocated_bytes",
                "Bytes the node's file takes on its storage (actual-size; 0 for a block "
                "device).");
}
