/* thinblk-agent's state: the daemons it watches, their disks, the extensions in flight.
 *
 * One thread, one event loop (loop/loop.h). Each daemon's monitor is a non-blocking QMP
 * connection; what the agent knows of a daemon comes from a "reconcile", a batch of queries
 * whose answers are looked at together (disk.c), run after every (re)connect, on every event
 * that matters, after every extension and every poll interval. Extensions run as child
 * processes (extend.c), so nothing slow runs on the loop.
 *
 * Everything here is used from the loop thread only.
 */
#ifndef THINBLK_AGENT_H
#define THINBLK_AGENT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

#include "agent/config.h"
#include "common/list.h"

struct loop;
struct qmpc;
struct mon;
struct disk;

struct agent {
    struct loop *loop;
    struct agent_config *cfg;
    struct mon **mons;
    size_t nmons;
    const char *self_exe;  /* for the built-in methods' child: /proc/self/exe */
};

/* An extension in flight: one child process. */
struct extend_job {
    struct disk *disk;
    pid_t pid;
    int pidfd;
    uint64_t timer;         /* the hook timeout */
    uint64_t start_ns;      /* monotonic */
    uint64_t from, to;      /* bytes */
    char *volume;
    char *reason;
    bool timed_out;
};

/* A device of a daemon that has a policy. Kept across reconnects (keyed by device name), so
 * back-off and what was reported survive them. */
struct disk {
    struct disk *next;
    struct mon *mon;
    const struct agent_disk_policy *policy;
    char *name;             /* the policy's, or the device's for "device = *" */
    char *device;
    /* From the latest reconcile: */
    bool present;
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
    struct extend_job *job;
    uint64_t retry_timer;   /* waiting to try again after a failure */
    uint64_t backoff_ns;
    unsigned failures;
    uint64_t last_extended_wall_ns; /* when the latest extension succeeded (realtime) */
    uint64_t extensions;    /* how many succeeded */
    const char *reported;   /* the last state logged, so each is logged once */
    /* Set by the reconcile, read by the cont decision: */
    bool ready;             /* nothing to wait for before cont */
    const char *waiting;    /* why not, for the log */
};

DEFINE_QUEUE_TYPE(disk_queue, struct disk, next)
DECLARE_LIST_HEAD(mon_call_queue, struct mon_call)

/* A watched daemon: its connection and its disks. */
struct mon {
    struct agent *agent;
    const struct agent_daemon_conf *conf;
    struct qmpc *c;         /* NULL while disconnected */
    bool ready;             /* capabilities negotiated */
    uint64_t connect_timer;
    uint64_t backoff_ns;
    uint64_t poll_timer;
    uint64_t connected_ns;  /* monotonic, for the log */
    bool ever_connected;
    char *last_connect_error; /* said once, not at every attempt */
    /* Replies expected: id -> callback. */
    mon_call_queue calls;
    /* Reconcile: */
    bool reconciling;
    bool reconcile_again;
    json_t *snap[5];        /* the replies of one reconcile (see disk.c) */
    unsigned snap_pending;
    bool cont_in_flight;
    uint64_t stopped_since_wall_ns; /* the current io-error's start (0: running) */
    const char *reported;   /* the daemon's last logged state */
    char waiting_text[256]; /* the last reason logged for not resuming */
    disk_queue disks;
};

typedef void mon_reply_fn(struct mon *m, json_t *ret, const char *error_class,
                          const char *error_desc, void *opaque);

/* monitor.c: connections. */
struct mon *mon_new(struct agent *a, const struct agent_daemon_conf *conf);
void mon_free(struct mon *m);
/* Start connecting (now). */
void mon_start(struct mon *m);
/* Send a command; fn (may be NULL) gets its reply, or is dropped with the connection.
 * args borrowed. Returns 0, or -1 if not connected. */
int mon_call(struct mon *m, const char *name, json_t *args, mon_reply_fn *fn, void *opaque);

/* disk.c: what the agent does. */
/* Query the daemon and act on the answers; calls made while one runs are coalesced into one
 * more run after it. No-op while disconnected. */
void disk_reconcile(struct mon *m);
/* An event from m's daemon. */
void disk_on_event(struct mon *m, const char *name, json_t *data);
/* The connection to m's daemon was lost. */
void disk_on_disconnect(struct mon *m);
/* An extension ended: ok, or failed with why (a message). Frees nothing. */
void disk_extension_done(struct disk *d, bool ok, uint64_t new_size, const char *why);
void disk_free_all(struct mon *m);

/* extend.c: the methods. */
/* Start extending d's volume from `from` to `to` bytes. Returns the job (d->job), or NULL
 * with *errp set if it could not even start. Never blocks. */
struct extend_job *extend_start(struct agent *a, struct disk *d, const char *volume,
                                uint64_t from, uint64_t to, const char *reason,
                                struct error **errp);
/* The volume's current size: a block device's capacity or a regular file's size. Returns 0
 * or -1 (errno) if the volume is not a local path or cannot be read. Does not block for long
 * (a stat or an ioctl). */
int extend_volume_size(const char *volume, uint64_t *size);
/* The built-in loop method, run in the child: grow the loop device's backing file to size
 * and have the kernel take the new capacity. Returns 0, or -1 with a message on stderr. */
int extend_loop_device(const char *dev, uint64_t size);
/* Drop a job whose disk goes away (the child is left to finish). */
void extend_abandon(struct agent *a, struct extend_job *job);

#endif
