/* thinblk-agent's connection to one daemon's QMP monitor: non-blocking, reconnecting with
 * back-off, replies matched to their commands.
 *
 * The bottom of the agent with extend.h: it knows nothing of disks or policies. It tells its
 * owner what happens through the struct mon_ops it was given, and the owner talks to the
 * daemon through mon_call(). Loop thread only; nothing here blocks.
 */
#ifndef THINBLK_AGENT_MONITOR_H
#define THINBLK_AGENT_MONITOR_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "agent/config.h"

struct loop;
struct mon;

/* What the monitor reports to its owner; opaque is the one given to mon_new(). Each may call
 * mon_call(); none may free the monitor. */
struct mon_ops {
    /* Capabilities negotiated: commands can be sent. */
    void (*connected)(void *opaque);
    /* An event (name and data borrowed, valid during the call), with its number in the
     * daemon's event journal (__org.thinblk_seq; 0 from a server without one, QEMU). Only once
     * connected. */
    void (*event)(void *opaque, const char *name, json_t *data, uint64_t seq);
    /* A connection that had been negotiated was lost; replies still expected are dropped. */
    void (*disconnected)(void *opaque);
};

/* A reply: ret on success (borrowed), or error_class and error_desc. opaque is mon_call()'s. */
typedef void mon_reply_fn(struct mon *m, json_t *ret, const char *error_class,
                          const char *error_desc, void *opaque);

/* A monitor for the daemon conf (borrowed, must outlive it), on loop, waiting at most
 * reconnect_max_ns between attempts. Does not connect yet. Free with mon_free(). */
struct mon *mon_new(struct loop *loop, const struct agent_daemon_conf *conf,
                    uint64_t reconnect_max_ns, const struct mon_ops *ops, void *opaque);
/* Close the connection (no ops called) and free m. NULL is allowed. */
void mon_free(struct mon *m);
/* Start connecting (now). */
void mon_start(struct mon *m);
/* Whether commands can be sent (connected and negotiated). */
bool mon_ready(const struct mon *m);
/* The opaque given to mon_new(), for reply callbacks. */
void *mon_opaque(const struct mon *m);
/* Send a command; fn (may be NULL) gets its reply, or is dropped with the connection.
 * args borrowed. Returns 0, or -1 if not connected. */
int mon_call(struct mon *m, const char *name, json_t *args, mon_reply_fn *fn, void *opaque);

#endif
