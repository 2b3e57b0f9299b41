/* thinblk-agent's configuration: the daemons to watch, the disks' policies, the agent's own
 * timings. Read from an INI-like file (thinblk-agent(8), FILES) and/or the command line.
 *
 * Sizes are bytes ("1G", "512MiB", "4096"); durations seconds ("2s", "500ms", "1.5"). Nothing
 * here blocks but the file read.
 */
#ifndef THINBLK_AGENT_CONFIG_H
#define THINBLK_AGENT_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/vector.h"

#define MiB (1024ull * 1024)
#define GiB (1024ull * MiB)

enum agent_method {
    AGENT_METHOD_NONE,  /* not configured yet */
    AGENT_METHOD_LOOP,  /* built-in: grow a loop device's backing file and its capacity */
    AGENT_METHOD_HOOK,  /* a program: HOOK VOLUME CURRENT_SIZE NEW_SIZE */
    AGENT_METHOD_RBD,   /* built-in: raise the max_bytes quota of an RBD image's pool */
};

/* Defaults, chosen from measurement (see the DEFAULTS section of thinblk-agent(8)): the
 * watermark must cover what a writer can write while the extension runs. */
#define AGENT_LOOP_CHUNK (1 * GiB)
#define AGENT_LOOP_WATERMARK (512 * MiB)
#define AGENT_HOOK_CHUNK (2560 * MiB)    /* VDSM's, for LVM: lvextend takes 1-4 s */
#define AGENT_HOOK_WATERMARK (2 * GiB)
/* rbd: the pool's usage reaches the monitor up to ~5 s late and the agent looks every poll
 * interval, so the watermark covers ~8 s of writes; a quota reserves nothing (see DEFAULTS). */
#define AGENT_RBD_CHUNK (8 * GiB)
#define AGENT_RBD_WATERMARK (4 * GiB)
#define AGENT_CAP_PERCENT 110            /* of the virtual size, for qcow2 (metadata) */

/* A disk's policy: which device of which daemon, how to extend it, by how much, up to where.
 * Sizes of 0 mean "the method's default". */
struct agent_disk_policy {
    char *name;               /* the [disk NAME] section, or the device for the command line */
    char *daemon;             /* the [daemon NAME] it belongs to */
    char *device;             /* a device (export id) of that daemon, "*" for every device */
    char *node;               /* or a node: the device's root or the node under it */
    enum agent_method method;
    char *volume;             /* NULL: the file name of the disk's protocol node (rbd: the
                               * pool of the image) */
    char *hook;               /* AGENT_METHOD_HOOK: the program */
    uint64_t chunk;
    uint64_t watermark;       /* free space kept ahead of the highest write */
    uint64_t cap;             /* 0: cap_percent of the virtual size (rbd: required) */
    unsigned cap_percent;     /* 0: AGENT_CAP_PERCENT for qcow2, 100 for other formats */
};

struct agent_daemon_conf {
    char *name;
    char *socket;             /* the QMP monitor's Unix socket */
};

DEFINE_VECTOR_TYPE(agent_daemon_conf_vector, struct agent_daemon_conf)
DEFINE_VECTOR_TYPE(agent_disk_policy_vector, struct agent_disk_policy)

struct agent_config {
    agent_daemon_conf_vector daemons;
    agent_disk_policy_vector disks;
    uint64_t poll_ns;         /* the backstop: queries every this often (2 s) */
    uint64_t retry_min_ns;    /* first wait after a failed extension (1 s), doubling ... */
    uint64_t retry_max_ns;    /* ... up to this (60 s) */
    uint64_t reconnect_max_ns;/* longest wait between connection attempts (5 s) */
    uint64_t hook_timeout_ns; /* an extension still running after this is killed (120 s) */
    bool resume_on_other_errors; /* cont a daemon stopped by an error other than ENOSPC */
    char *metrics_file;       /* where to write the agent's metrics, or NULL */
};

/* An empty configuration with the agent's default timings. */
void agent_config_init(struct agent_config *cfg);
void agent_config_free(struct agent_config *cfg);

/* Parse the text of a configuration file (name for messages) into cfg, adding to what is
 * there. Returns 0, or -1 with *errp set ("FILE:LINE: ..."). */
int agent_config_parse(struct agent_config *cfg, const char *name, const char *text,
                       struct error **errp);

/* Read and parse a file. Returns 0 or -1 with *errp set. Blocks (reads the file). */
int agent_config_load(struct agent_config *cfg, const char *path, struct error **errp);

/* Set one [agent] or disk key (as in the file) on the policy p, or on cfg if p is NULL.
 * Returns 0, or -1 with *errp set. */
int agent_config_set(struct agent_config *cfg, struct agent_disk_policy *p, const char *key,
                     const char *value, struct error **errp);

/* Add a daemon or a disk policy (zeroed but for its names); returns it (owned by cfg, valid
 * until the next add). */
struct agent_daemon_conf *agent_config_add_daemon(struct agent_config *cfg, const char *name);
struct agent_disk_policy *agent_config_add_disk(struct agent_config *cfg, const char *name);

/* Check that everything refers to what exists and each disk has what its method needs;
 * fills the method defaults. Returns 0 or -1 with *errp set, one line per mistake. The
 * parse, likewise, reports every bad line. */
int agent_config_check(struct agent_config *cfg, struct error **errp);

/* Check that every hook of a checked cfg is an executable file, by its absolute path.
 * Returns 0 or -1 with *errp set, one line per hook. Blocks on a stat() each. */
int agent_config_check_hooks(const struct agent_config *cfg, struct error **errp);

/* "1G", "1GiB", "1.5g", "512M", "4k", "4096" (bytes). Returns 0 or -1. */
int agent_parse_size(const char *s, uint64_t *out);
/* "2s", "500ms", "1m", "1.5" (seconds). Returns 0 or -1. */
int agent_parse_duration(const char *s, uint64_t *ns);
/* A size for people, into buf: "576 MiB", "2.5 GiB", "4096 B". Returns buf. */
const char *agent_fmt_size(uint64_t bytes, char *buf, size_t len);

#endif
