/* QMP command dispatch: the command table, argument checks, and turning one request into one
 * response, as QEMU's qapi/qmp-dispatch.c and monitor/qmp.c do.
 *
 * Commands come in tables (one per cmd-<group>.c), each entry naming its handler and its
 * arguments' table (common/schema.h); the dispatcher checks a request's shape and arguments
 * before a handler runs, so handlers see only well-typed arguments. Error texts are QEMU's, word for word.
 */
#ifndef THINBLK_QMP_DISPATCH_H
#define THINBLK_QMP_DISPATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "common/error.h"
#include "common/qjson.h"
#include "common/schema.h"

struct qmp_pending;

/* What a client session looks like to the dispatcher (owned by the monitor server). */
struct qmp_session {
    bool negotiated;  /* capabilities negotiation done: the full command table applies */
    bool oob;         /* the client enabled the "oob" capability */
    /* The deferred command not answered yet (at most one: QMP answers a session's in-band
     * commands in order, so its owner dispatches nothing more until deliver ran). */
    struct qmp_pending *pending;
    /* Takes a deferred command's response (stolen), on the loop thread; set by the owner.
     * NULL: such responses are dropped. */
    void (*deliver)(struct qmp_session *s, json_t *rsp);
};

struct qmp_call {
    struct qmp_session *session;
    void *opaque;                     /* the opaque registered with the command's table */
    struct qmp_dispatcher *dispatcher;
    json_t *id;                       /* the request's "id" (borrowed), or NULL */
    struct qmp_pending *deferred;     /* set by qmp_call_defer() */
};

/* Run a command. args is the checked "arguments" object (borrowed; empty if none was given).
 * Returns the "return" value (new reference; json_object() for none), or NULL with *errp set,
 * or QMP_DEFERRED after qmp_call_defer(). Runs on the loop thread and must not block. */
typedef json_t *qmp_handler_fn(struct qmp_call *call, json_t *args, struct error **errp);

/* What a handler that answers later returns (after qmp_call_defer()). */
extern char qmp_deferred_marker;
#define QMP_DEFERRED ((json_t *)(void *)&qmp_deferred_marker)

/* Answer call later (QEMU has no such thing: its blocking commands run in coroutines). The
 * handler then returns QMP_DEFERRED, and the command is answered once, on the loop thread, by
 * qmp_pending_return() or qmp_pending_error(), which may come before the handler returns.
 * Until then the session dispatches nothing more. If the session goes first
 * (qmp_session_detach()), the answer is dropped; the operation itself is the handler's. */
struct qmp_pending *qmp_call_defer(struct qmp_call *call);
/* Answer p with ret (stolen; json_object() for none) or err (borrowed); frees p. */
void qmp_pending_return(struct qmp_pending *p, json_t *ret);
void qmp_pending_error(struct qmp_pending *p, const struct error *err);

/* s goes away: its pending command, if any, is answered into nothing. */
void qmp_session_detach(struct qmp_session *s);

#define QMP_CMD_PRECAP 1u     /* may run before capabilities negotiation (qmp_capabilities) */

struct qmp_command {
    const char *name;
    qmp_handler_fn *fn;
    /* The arguments (common/schema.h), a union for boxed ones (blockdev-add); NULL for none.
     * The dispatcher checks them: handlers read them without checking again. */
    const struct schema_member *args;
    unsigned flags;
};

struct qmp_dispatcher;

struct qmp_dispatcher *qmp_dispatcher_new(void);
void qmp_dispatcher_free(struct qmp_dispatcher *d);

/* Add n commands (the table must outlive d) whose handlers get opaque. Names must be unique. */
void qmp_dispatcher_add(struct qmp_dispatcher *d, const struct qmp_command *cmds, size_t n,
                        void *opaque);

/* Call fn for every command, in the order added. */
void qmp_dispatcher_foreach(struct qmp_dispatcher *d,
                            void (*fn)(const struct qmp_command *cmd, void *opaque), void *opaque);

/* Handle one message of a session (that has no command pending): request is the parsed
 * message (borrowed, any JSON type), or NULL if parsing failed with parse_err (borrowed).
 * Returns the response object (new reference): {"return": ..., "id": ...} or {"error":
 * {"class", "desc"}, "id": ...}; or NULL if the command deferred its answer: s->deliver gets
 * it (s->pending is set until then, unless it was answered already). */
json_t *qmp_dispatch(struct qmp_dispatcher *d, struct qmp_session *session, json_t *request,
                     const struct error *parse_err);

/* The response for an error (err borrowed) or a return value (ret stolen); id borrowed, may
 * be NULL. */
json_t *qmp_error_response(const struct error *err, json_t *id);
json_t *qmp_return_response(json_t *ret, json_t *id);

#endif
