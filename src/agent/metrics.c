/* thinblk-agent's metrics file. Rewritten whole after every change: a few lines per disk, and
 * changes come at the pace of extensions, so there is nothing to gain from anything finer. */
#include "agent/metrics.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"

struct metrics_entry {
    struct metrics_entry *next;
    char *daemon;
    char *disk;
    struct agent_disk_metrics m;
};

/* A daemon's run state (group NULL) or one of its groups. */
struct metrics_group {
    struct metrics_group *next;
    char *daemon;
    char *group;
    struct agent_group_metrics m;
};

struct agent_metrics {
    const char *path;
    char *tmp_path;               /* path + ".tmp", in the same directory for rename() */
    struct metrics_entry *first;  /* in the order the disks were found */
    struct metrics_entry **last;
    struct metrics_group *groups; /* the newest first */
    int logged_errno;             /* the last failure logged, so each is logged once */
};

struct agent_metrics *agent_metrics_new(const char *path)
{
    struct agent_metrics *m = xzalloc(sizeof(*m));

    m->path = path;
    m->last = &m->first;
    if (path)
        m->tmp_path = xasprintf("%s.tmp", path);
    agent_metrics_changed(m);
    return m;
}

void agent_metrics_free(struct agent_metrics *m)
{
    struct metrics_entry *e, *next;

    if (!m)
        return;
    for (e = m->first; e; e = next) {
        next = e->next;
        free(e->daemon);
        free(e->disk);
        free(e);
    }
    for (struct metrics_group *g = m->groups, *gnext; g; g = gnext) {
        gnext = g->next;
        free(g->daemon);
        free(g->group);
        free(g);
    }
    free(m->tmp_path);
    free(m);
}

struct agent_disk_metrics *agent_metrics_disk(struct agent_metrics *m, const char *daemon,
                                              const char *disk)
{
    struct metrics_entry *e;

    for (e = m->first; e; e = e->next) {
        if (strcmp(e->daemon, daemon) == 0 && strcmp(e->disk, disk) == 0)
            return &e->m;
    }
    e = xzalloc(sizeof(*e));
    e->daemon = xstrdup(daemon);
    e->disk = xstrdup(disk);
    *m->last = e;
    m->last = &e->next;
    return &e->m;
}

struct agent_group_metrics *agent_metrics_group(struct agent_metrics *m, const char *daemon,
                                                const char *group)
{
    struct metrics_group *g;

    for (g = m->groups; g; g = g->next) {
        if (strcmp(g->daemon, daemon) == 0 &&
            (group ? g->group && strcmp(g->group, group) == 0 : !g->group))
            return &g->m;
    }
    g = xzalloc(sizeof(*g));
    g->daemon = xstrdup(daemon);
    g->group = group ? xstrdup(group) : NULL;
    g->next = m->groups;
    m->groups = g;
    return &g->m;
}

/* A label value, escaped as the format wants. */
static void put_label(FILE *f, const char *key, const char *s)
{
    fprintf(f, "%s=\"", key);
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            fprintf(f, "\\%c", *s);
        else if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

/* One sample line of e: "name{daemon="..",disk=".."} value". */
static void put_sample(FILE *f, const char *name, const struct metrics_entry *e,
                       const char *value)
{
    fprintf(f, "%s{", name);
    put_label(f, "daemon", e->daemon);
    fputc(',', f);
    put_label(f, "disk", e->disk);
    fprintf(f, "} %s\n", value);
}

enum metric { M_EXTENSIONS, M_FAILURES, M_AT_CAP, M_DURATION, M_RESUMES };

static const struct {
    const char *name, *type, *help;
} metrics[] = {
    [M_EXTENSIONS] = {"thinblk_agent_extensions_total", "counter", "Extensions that succeeded."},
    [M_FAILURES] = {"thinblk_agent_extension_failures_total", "counter",
                    "Extensions that failed or could not start."},
    [M_AT_CAP] = {"thinblk_agent_disk_at_cap", "gauge",
                  "1 if the disk needs room but its volume is at its cap."},
    [M_DURATION] = {"thinblk_agent_extension_duration_seconds", "summary",
                    "How long the extensions that succeeded took."},
    [M_RESUMES] = {"thinblk_agent_resumes_total", "counter",
                   "Resumes sent: cont, or __org.thinblk_group-cont for a group."},
};

static void put_family(FILE *f, const struct agent_metrics *m, enum metric which)
{
    char v[48];

    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", metrics[which].name, metrics[which].help,
            metrics[which].name, metrics[which].type);
    if (which == M_RESUMES) {
        /* Labels daemon, and group for a group's (none for the run state's). */
        for (const struct metrics_group *g = m->groups; g; g = g->next) {
            fprintf(f, "%s{", metrics[which].name);
            put_label(f, "daemon", g->daemon);
            if (g->group) {
                fputc(',', f);
                put_label(f, "group", g->group);
            }
            fprintf(f, "} %" PRIu64 "\n", g->m.resumes);
        }
        return;
    }
    for (const struct metrics_entry *e = m->first; e; e = e->next) {
        switch (which) {
        case M_EXTENSIONS:
        case M_FAILURES:
            snprintf(v, sizeof(v), "%" PRIu64,
                     which == M_EXTENSIONS ? e->m.extensions : e->m.failures);
            put_sample(f, metrics[which].name, e, v);
            break;
        case M_AT_CAP:
            put_sample(f, metrics[which].name, e, e->m.at_cap ? "1" : "0");
            break;
        case M_DURATION: {
            _cleanup_free_ char *sum = xasprintf("%s_sum", metrics[which].name);
            _cleanup_free_ char *count = xasprintf("%s_count", metrics[which].name);
            snprintf(v, sizeof(v), "%" PRIu64 ".%09" PRIu64, e->m.duration_ns / 1000000000,
                     e->m.duration_ns % 1000000000);
            put_sample(f, sum, e, v);
            snprintf(v, sizeof(v), "%" PRIu64, e->m.extensions);
            put_sample(f, count, e, v);
            break;
        }
        case M_RESUMES:
            break;  /* above */
        }
    }
}

static void log_failure(struct agent_metrics *m, const char *what)
{
    if (errno != m->logged_errno)
        log_error("metrics file %s: %s: %s", m->path, what, strerror(errno));
    m->logged_errno = errno;
}

void agent_metrics_changed(struct agent_metrics *m)
{
    if (!m->path)
        return;
    FILE *f = fopen(m->tmp_path, "we");
    if (!f) {
        log_failure(m, "cannot create its temporary file");
        return;
    }
    for (enum metric i = 0; i < ARRAY_SIZE(metrics); i++)
        put_family(f, m, i);
    bool failed = ferror(f);
    if (fclose(f) != 0 || failed) {
        log_failure(m, "cannot write its temporary file");
        unlink(m->tmp_path);
        return;
    }
    if (rename(m->tmp_path, m->path) < 0) {
        log_failure(m, "cannot rename its temporary file over it");
        unlink(m->tmp_path);
        return;
    }
    m->logged_errno = 0;
}
