/* thinblk-agent's configuration file and values. The format (thinblk-agent(8), FILES):
 *
 *   # comment               ; comment too      key = value   # comment
 *   [agent]                 poll-interval, retry-min, retry-max, reconnect-max,
 *                           hook-timeout, resume-on-other-errors
 *   [daemon NAME]           socket
 *   [disk NAME]             daemon, device | node, method, volume, hook, chunk, watermark, cap
 *
 * one "key = value" a line, keys in any order, later values replacing earlier ones.
 */
#include "agent/config.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"

void agent_config_init(struct agent_config *cfg)
{
    *cfg = (struct agent_config){
        .poll_ns = 2000000000ull,
        .retry_min_ns = 1000000000ull,
        .retry_max_ns = 60000000000ull,
        .reconnect_max_ns = 5000000000ull,
        .hook_timeout_ns = 120000000000ull,
    };
}

/* Add err (consumed) to *errp, one line each, so that one run reports every mistake. */
static void add_error(struct error **errp, struct error *err)
{
    if (!errp || !*errp) {
        error_propagate(errp, err);
        return;
    }
    char *joined = xasprintf("%s\n%s", (*errp)->desc, err->desc);
    free((*errp)->desc);
    (*errp)->desc = joined;
    error_free(err);
}

/* add_error() of a new error, formatted as error_setg()'s. */
#define add_errorf(errp, ...)                                                                  \
    do {                                                                                       \
        struct error *new_ = NULL;                                                             \
        error_setg(&new_, __VA_ARGS__);                                                        \
        add_error(errp, new_);                                                                 \
    } while (0)

static void policy_free(struct agent_disk_policy *p)
{
    free(p->name);
    free(p->daemon);
    free(p->device);
    free(p->node);
    free(p->volume);
    free(p->hook);
}

void agent_config_free(struct agent_config *cfg)
{
    for (size_t i = 0; i < cfg->daemons.len; i++) {
        free(cfg->daemons.ptr[i].name);
        free(cfg->daemons.ptr[i].socket);
    }
    for (size_t i = 0; i < cfg->disks.len; i++)
        policy_free(&cfg->disks.ptr[i]);
    free(cfg->metrics_file);
    agent_daemon_conf_vector_reset(&cfg->daemons);
    agent_disk_policy_vector_reset(&cfg->disks);
}

struct agent_daemon_conf *agent_config_add_daemon(struct agent_config *cfg, const char *name)
{
    agent_daemon_conf_vector_append(&cfg->daemons,
                                    (struct agent_daemon_conf){.name = xstrdup(name)});
    return &cfg->daemons.ptr[cfg->daemons.len - 1];
}

struct agent_disk_policy *agent_config_add_disk(struct agent_config *cfg, const char *name)
{
    agent_disk_policy_vector_append(&cfg->disks,
                                    (struct agent_disk_policy){.name = xstrdup(name)});
    return &cfg->disks.ptr[cfg->disks.len - 1];
}

/* ---- values --------------------------------------------------------------------------- */

/* A non-negative decimal number and what follows it. */
static int parse_number(const char *s, double *v, const char **rest)
{
    char *end;

    while (isspace((unsigned char)*s))
        s++;
    if (!isdigit((unsigned char)*s) && *s != '.')
        return -1;
    errno = 0;
    *v = strtod(s, &end);
    if (errno || end == s || !isfinite(*v) || *v < 0)
        return -1;
    while (isspace((unsigned char)*end))
        end++;
    *rest = end;
    return 0;
}

int agent_parse_size(const char *s, uint64_t *out)
{
    static const struct { const char *suffix; double mult; } units[] = {
        {"", 1}, {"b", 1}, {"k", 1024.0}, {"kib", 1024.0}, {"m", 1024.0 * 1024},
        {"mib", 1024.0 * 1024}, {"g", 1024.0 * 1024 * 1024}, {"gib", 1024.0 * 1024 * 1024},
        {"t", 1024.0 * 1024 * 1024 * 1024}, {"tib", 1024.0 * 1024 * 1024 * 1024},
    };
    const char *rest;
    double v;

    if (parse_number(s, &v, &rest) < 0)
        return -1;
    for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
        if (strcasecmp(rest, units[i].suffix) == 0) {
            double bytes = v * units[i].mult;
            if (bytes >= 18446744073709551615.0 || bytes != floor(bytes))
                return -1;  /* too big, or a fraction of a byte */
            *out = (uint64_t)bytes;
            return 0;
        }
    }
    return -1;
}

int agent_parse_duration(const char *s, uint64_t *ns)
{
    static const struct { const char *suffix; double mult; } units[] = {
        {"", 1e9}, {"s", 1e9}, {"ms", 1e6}, {"m", 60e9}, {"min", 60e9},
    };
    const char *rest;
    double v;

    if (parse_number(s, &v, &rest) < 0)
        return -1;
    for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
        if (strcmp(rest, units[i].suffix) == 0) {
            if (v * units[i].mult > 1e18)
                return -1;
            *ns = (uint64_t)(v * units[i].mult);
            return 0;
        }
    }
    return -1;
}

const char *agent_fmt_size(uint64_t bytes, char *buf, size_t len)
{
    if (bytes >= GiB && bytes % (GiB / 10) == 0 && bytes % GiB)
        snprintf(buf, len, "%.1f GiB", (double)bytes / GiB);
    else if (bytes >= GiB && bytes % GiB == 0)
        snprintf(buf, len, "%llu GiB", (unsigned long long)(bytes / GiB));
    else if (bytes >= MiB && bytes % MiB == 0)
        snprintf(buf, len, "%llu MiB", (unsigned long long)(bytes / MiB));
    else if (bytes >= MiB)
        snprintf(buf, len, "%.1f MiB", (double)bytes / MiB);
    else if (bytes >= 1024 && bytes % 1024 == 0)
        snprintf(buf, len, "%llu KiB", (unsigned long long)(bytes / 1024));
    else
        snprintf(buf, len, "%llu B", (unsigned long long)bytes);
    return buf;
}

static int parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"yes", "on", "true", "1"};
    static const char *const no[] = {"no", "off", "false", "0"};

    for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -1;
}

/* ---- keys ----------------------------------------------------------------------------- */

static void replace(char **field, const char *value)
{
    free(*field);
    *field = xstrdup(value);
}

static int set_agent_key(struct agent_config *cfg, const char *key, const char *value,
                         struct error **errp)
{
    static const struct { const char *key; size_t off; } durations[] = {
        {"poll-interval", offsetof(struct agent_config, poll_ns)},
        {"retry-min", offsetof(struct agent_config, retry_min_ns)},
        {"retry-max", offsetof(struct agent_config, retry_max_ns)},
        {"reconnect-max", offsetof(struct agent_config, reconnect_max_ns)},
        {"hook-timeout", offsetof(struct agent_config, hook_timeout_ns)},
    };

    for (size_t i = 0; i < ARRAY_SIZE(durations); i++) {
        if (strcmp(key, durations[i].key))
            continue;
        uint64_t ns;
        if (agent_parse_duration(value, &ns) < 0 || ns < 1000000) {
            error_setg(errp, "'%s' expects a duration of at least 1ms, such as '2s' or "
                       "'500ms', not '%s'", key, value);
            return -1;
        }
        *(uint64_t *)((char *)cfg + durations[i].off) = ns;
        return 0;
    }
    if (strcmp(key, "resume-on-other-errors") == 0) {
        if (parse_bool(value, &cfg->resume_on_other_errors) < 0) {
            error_setg(errp, "'%s' expects yes or no, not '%s'", key, value);
            return -1;
        }
        return 0;
    }
    if (strcmp(key, "metrics-file") == 0) {
        replace(&cfg->metrics_file, value);
        return 0;
    }
    error_setg(errp, "unknown key '%s' in [agent]", key);
    return -1;
}

static int set_disk_key(struct agent_disk_policy *p, const char *key, const char *value,
                        struct error **errp)
{
    uint64_t *size = NULL;

    if (strcmp(key, "daemon") == 0)
        replace(&p->daemon, value);
    else if (strcmp(key, "device") == 0)
        replace(&p->device, value);
    else if (strcmp(key, "node") == 0)
        replace(&p->node, value);
    else if (strcmp(key, "volume") == 0)
        replace(&p->volume, value);
    else if (strcmp(key, "hook") == 0)
        replace(&p->hook, value);
    else if (strcmp(key, "method") == 0) {
        if (strcmp(value, "loop") == 0)
            p->method = AGENT_METHOD_LOOP;
        else if (strcmp(value, "hook") == 0)
            p->method = AGENT_METHOD_HOOK;
        else if (strcmp(value, "rbd") == 0)
            p->method = AGENT_METHOD_RBD;
        else {
            error_setg(errp, "'method' expects 'loop', 'hook' or 'rbd', not '%s'", value);
            return -1;
        }
    } else if (strcmp(key, "chunk") == 0)
        size = &p->chunk;
    else if (strcmp(key, "watermark") == 0)
        size = &p->watermark;
    else if (strcmp(key, "cap") == 0) {
        size_t len = strlen(value);
        if (len > 1 && value[len - 1] == '%') {
            char *num = strndup(value, len - 1);
            char *end;
            unsigned long pct = strtoul(num, &end, 10);
            bool ok = *num && !*end && pct >= 100 && pct <= 1000;
            free(num);
            if (!ok) {
                error_setg(errp, "'cap' as a percentage of the virtual size must be 100%% to "
                           "1000%%, not '%s'", value);
                return -1;
            }
            p->cap_percent = (unsigned)pct;
            p->cap = 0;
            return 0;
        }
        size = &p->cap;
    } else {
        error_setg(errp, "unknown key '%s' in a [disk] section", key);
        return -1;
    }
    if (size) {
        if (agent_parse_size(value, size) < 0 || *size == 0) {
            error_setg(errp, "'%s' expects a size such as '512M' or '2G', not '%s'", key,
                       value);
            return -1;
        }
        /* Volumes grow in whole MiB: every kind of volume takes that (loop: 512 B, LVM:
         * its extents, which lvextend rounds to itself). */
        if (strcmp(key, "cap") && *size % MiB) {
            error_setg(errp, "'%s' must be a whole number of MiB, not '%s'", key, value);
            return -1;
        }
    }
    return 0;
}

int agent_config_set(struct agent_config *cfg, struct agent_disk_policy *p, const char *key,
                     const char *value, struct error **errp)
{
    return p ? set_disk_key(p, key, value, errp) : set_agent_key(cfg, key, value, errp);
}

/* ---- the file ------------------------------------------------------------------------- */

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

static bool valid_name(const char *s)
{
    if (!*s)
        return false;
    for (; *s; s++) {
        if (!isalnum((unsigned char)*s) && !strchr("-_.", *s))
            return false;
    }
    return true;
}

enum section {
    SECTION_NONE,
    SECTION_AGENT,
    SECTION_DAEMON,
    SECTION_DISK,
    SECTION_SKIP,   /* after a bad header: its keys are not checked */
};

/* A "[kind NAME]" header: sets *sec and the index of the daemon or disk. */
static int parse_header(struct agent_config *cfg, char *line, enum section *sec, size_t *idx,
                        struct error **errp)
{
    size_t len = strlen(line);
    if (line[len - 1] != ']') {
        error_setg(errp, "a section header ends with ']'");
        return -1;
    }
    line[len - 1] = '\0';
    char *body = trim(line + 1);
    char *name = body + strcspn(body, " \t");
    if (*name)
        *name++ = '\0';
    name = trim(name);

    if (strcmp(body, "agent") == 0 && !*name) {
        *sec = SECTION_AGENT;
        return 0;
    }
    if (strcmp(body, "daemon") && strcmp(body, "disk")) {
        error_setg(errp, "unknown section '[%s]': expected [agent], [daemon NAME] or "
                   "[disk NAME]", body);
        return -1;
    }
    if (!valid_name(name)) {
        error_setg(errp, "[%s] needs a name of letters, digits, '-', '_' and '.'", body);
        return -1;
    }
    if (strcmp(body, "daemon") == 0) {
        for (size_t i = 0; i < cfg->daemons.len; i++) {
            if (strcmp(cfg->daemons.ptr[i].name, name) == 0) {
                error_setg(errp, "daemon '%s' is defined twice", name);
                return -1;
            }
        }
        agent_config_add_daemon(cfg, name);
        *sec = SECTION_DAEMON;
        *idx = cfg->daemons.len - 1;
    } else {
        for (size_t i = 0; i < cfg->disks.len; i++) {
            if (strcmp(cfg->disks.ptr[i].name, name) == 0) {
                error_setg(errp, "disk '%s' is defined twice", name);
                return -1;
            }
        }
        agent_config_add_disk(cfg, name);
        *sec = SECTION_DISK;
        *idx = cfg->disks.len - 1;
    }
    return 0;
}

static int parse_line(struct agent_config *cfg, char *line, enum section *sec, size_t *idx,
                      struct error **errp)
{
    /* A '#' after white space starts a comment too ("device = vda   # the root disk"). */
    for (char *h = strchr(line, '#'); h; h = strchr(h + 1, '#')) {
        if (h > line && isspace((unsigned char)h[-1])) {
            *h = '\0';
            break;
        }
    }
    line = trim(line);
    if (!*line || *line == '#' || *line == ';')
        return 0;
    if (*line == '[')
        return parse_header(cfg, line, sec, idx, errp);

    char *eq = strchr(line, '=');
    if (!eq) {
        error_setg(errp, "expected 'key = value' or a [section]");
        return -1;
    }
    *eq = '\0';
    char *key = trim(line), *value = trim(eq + 1);
    if (!*value) {
        error_setg(errp, "'%s' has no value", key);
        return -1;
    }
    switch (*sec) {
    case SECTION_NONE:
        error_setg(errp, "'%s' outside any section", key);
        return -1;
    case SECTION_AGENT:
        return set_agent_key(cfg, key, value, errp);
    case SECTION_DAEMON:
        if (strcmp(key, "socket")) {
            error_setg(errp, "unknown key '%s' in a [daemon] section", key);
            return -1;
        }
        replace(&cfg->daemons.ptr[*idx].socket, value);
        return 0;
    case SECTION_DISK:
        return set_disk_key(&cfg->disks.ptr[*idx], key, value, errp);
    case SECTION_SKIP:
        return 0;
    }
    return -1;
}

int agent_config_parse(struct agent_config *cfg, const char *name, const char *text,
                       struct error **errp)
{
    enum section sec = SECTION_NONE;
    size_t idx = 0;
    unsigned lineno = 0;
    const char *p = text;
    int ret = 0;

    while (*p) {
        size_t len = strcspn(p, "\n");
        _cleanup_free_ char *line = strndup(p, len);
        struct error *err = NULL;

        lineno++;
        if (!line)
            abort();
        if (strlen(line) != len)
            error_setg(&err, "a NUL byte in the line");
        else if (parse_line(cfg, line, &sec, &idx, &err) < 0 && *line == '[')
            sec = SECTION_SKIP;  /* its keys would only add errors about the wrong section */
        if (err) {
            error_prepend(&err, "%s:%u: ", name, lineno);
            add_error(errp, err);
            ret = -1;
        }
        p += len;
        if (*p == '\n')
            p++;
    }
    return ret;
}

int agent_config_load(struct agent_config *cfg, const char *path, struct error **errp)
{
    FILE *f = fopen(path, "re");
    struct buf b = {0};
    char chunk[4096];
    size_t n;

    if (!f) {
        error_setg_errno(errp, errno, "Could not open '%s'", path);
        return -1;
    }
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        buf_append(&b, chunk, n);
        if (b.len > 1024 * 1024) {
            fclose(f);
            buf_free(&b);
            error_setg(errp, "'%s' is larger than 1 MiB: not a configuration file", path);
            return -1;
        }
    }
    bool failed = ferror(f);
    fclose(f);
    if (failed) {
        buf_free(&b);
        error_setg(errp, "Could not read '%s'", path);
        return -1;
    }
    buf_append(&b, "", 1);
    int r = agent_config_parse(cfg, path, b.data, errp);
    buf_free(&b);
    return r;
}

int agent_config_check(struct agent_config *cfg, struct error **errp)
{
    struct error *errors = NULL;

    if (cfg->retry_max_ns < cfg->retry_min_ns)
        cfg->retry_max_ns = cfg->retry_min_ns;
    for (size_t i = 0; i < cfg->daemons.len; i++) {
        if (!cfg->daemons.ptr[i].socket) {
            add_errorf(&errors, "daemon '%s' has no socket", cfg->daemons.ptr[i].name);
        }
    }
    for (size_t i = 0; i < cfg->disks.len; i++) {
        struct agent_disk_policy *p = &cfg->disks.ptr[i];
        bool found = false;

        if (!p->daemon && cfg->daemons.len == 1)
            p->daemon = xstrdup(cfg->daemons.ptr[0].name);
        for (size_t j = 0; p->daemon && j < cfg->daemons.len; j++)
            found |= strcmp(cfg->daemons.ptr[j].name, p->daemon) == 0;
        if (!found) {
            add_errorf(&errors, "disk '%s': %s", p->name,
                       p->daemon ? "no such daemon" : "which daemon? (daemon = NAME)");
        }
        if (!p->device == !p->node) {
            add_errorf(&errors, "disk '%s': give either device or node", p->name);
        }
        if (p->method == AGENT_METHOD_NONE) {
            if (!p->hook) {
                add_errorf(&errors, "disk '%s': no method (method = loop, hook or rbd)", p->name);
                continue;
            }
            p->method = AGENT_METHOD_HOOK;
        }
        if (p->method == AGENT_METHOD_HOOK && !p->hook) {
            add_errorf(&errors, "disk '%s': method hook needs hook = PROGRAM", p->name);
        }
        if (p->method != AGENT_METHOD_HOOK && p->hook) {
            add_errorf(&errors, "disk '%s': a hook is for method hook, not %s", p->name,
                       p->method == AGENT_METHOD_LOOP ? "loop" : "rbd");
        }
        /* A pool is shared by images: no share of one image's size makes a sane quota. */
        if (p->method == AGENT_METHOD_RBD && !p->cap) {
            add_errorf(&errors, "disk '%s': method rbd needs cap = SIZE (the largest quota "
                       "the agent may set on the pool)", p->name);
        }
        static const uint64_t chunks[] = {
            [AGENT_METHOD_LOOP] = AGENT_LOOP_CHUNK, [AGENT_METHOD_HOOK] = AGENT_HOOK_CHUNK,
            [AGENT_METHOD_RBD] = AGENT_RBD_CHUNK,
        };
        static const uint64_t watermarks[] = {
            [AGENT_METHOD_LOOP] = AGENT_LOOP_WATERMARK, [AGENT_METHOD_HOOK] = AGENT_HOOK_WATERMARK,
            [AGENT_METHOD_RBD] = AGENT_RBD_WATERMARK,
        };
        if (!p->chunk)
            p->chunk = chunks[p->method];
        if (!p->watermark)
            p->watermark = watermarks[p->method];
    }
    if (errors) {
        error_propagate(errp, errors);
        return -1;
    }
    return 0;
}

int agent_config_check_hooks(const struct agent_config *cfg, struct error **errp)
{
    struct error *errors = NULL;

    for (size_t i = 0; i < cfg->disks.len; i++) {
        const struct agent_disk_policy *p = &cfg->disks.ptr[i];
        struct stat sb;

        if (p->method != AGENT_METHOD_HOOK)
            continue;
        /* It is run by its path (posix_spawn, not a search of PATH). */
        if (p->hook[0] != '/')
            add_errorf(&errors, "disk '%s': hook '%s' is not an absolute path", p->name,
                       p->hook);
        else if (stat(p->hook, &sb) < 0)
            add_errorf(&errors, "disk '%s': hook '%s': %s", p->name, p->hook, strerror(errno));
        else if (!S_ISREG(sb.st_mode) || access(p->hook, X_OK) < 0)
            add_errorf(&errors, "disk '%s': hook '%s' is not an executable file", p->name,
                       p->hook);
    }
    if (errors) {
        error_propagate(errp, errors);
        return -1;
    }
    return 0;
}
