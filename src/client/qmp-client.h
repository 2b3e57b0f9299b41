/* A small QMP client: one connection to a QMP monitor on a Unix socket.
 *
 * Two ways to drive it, which may be mixed on one connection:
 *
 * - Synchronous: qmpc_connect() (socket + greeting), qmpc_negotiate(), qmpc_execute() (send a
 *   command, wait for its reply), qmpc_next_event(). They block, each up to a timeout in
 *   milliseconds (-1: no limit, 0: do not wait). Events that arrive while a call waits for a
 *   reply are queued, in order, for qmpc_next_event() and qmpc_pop().
 *
 * - Event-driven: poll qmpc_fd() for reading; when readable, qmpc_read() (never blocks), then
 *   qmpc_pop() until it returns 0. qmpc_send() / qmpc_send_command() write a command; its reply
 *   comes back through qmpc_pop() carrying the same id. A program that also makes synchronous
 *   calls must drain qmpc_pop() after each (see qmpc_pending()): what they queued does not make
 *   the fd readable. Writes may block while the server does not read (commands are small).
 *
 * Errors: functions return -1 or NULL and set *errp (common/error.h). That always means the
 * connection or the protocol failed: cannot connect, timeout, EOF, a malformed or unexpected
 * message. After EOF or a protocol error the client is in QMPC_STATE_CLOSED and every further
 * call fails. A command the server rejects is not a failure of the client: qmpc_execute()
 * returns the reply, of kind QMPC_MSG_ERROR, with the server's class and desc.
 *
 * Not thread-safe: one thread uses a struct qmpc at a time.
 */
#ifndef THINBLK_QMP_CLIENT_H
#define THINBLK_QMP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

#include "common/error.h"

/* The protocol phases of a connection. Transitions happen as messages are taken from the
 * stream (by any of the calls above), in this order only. */
enum qmpc_state {
    QMPC_STATE_GREETING,      /* connected, waiting for {"QMP": ...} */
    QMPC_STATE_CAPABILITIES,  /* greeting received, qmp_capabilities not yet accepted */
    QMPC_STATE_COMMAND,       /* negotiated: commands and events */
    QMPC_STATE_CLOSED,        /* terminal: EOF, I/O or protocol error, or no fd at all */
};

enum qmpc_msg_kind {
    QMPC_MSG_GREETING,  /* {"QMP": {"version": ..., "capabilities": [...]}} */
    QMPC_MSG_RETURN,    /* {"return": VALUE, "id"?: ID} */
    QMPC_MSG_ERROR,     /* {"error": {"class": ..., "desc": ...}, "id"?: ID} */
    QMPC_MSG_EVENT,     /* {"event": NAME, "data"?: ..., "timestamp": {...}} */
};

/* One message from the server. Everything is owned by the message; the borrowed views point
 * into json and live as long as it. Read-only for users. */
struct qmpc_message {
    enum qmpc_msg_kind kind;
    json_t *json;             /* the whole object */
    char *text;               /* the bytes as received, without the "\r\n"; NUL-terminated */
    size_t text_len;
    json_t *id;               /* RETURN, ERROR: the "id" echoed by the server, or NULL */
    json_t *ret;              /* RETURN: the "return" value */
    const char *error_class;  /* ERROR: e.g. "GenericError", "CommandNotFound" */
    const char *error_desc;   /* ERROR: the human-readable text */
    const char *event;        /* EVENT: its name, e.g. "STOP" */
    json_t *data;             /* EVENT: "data", or NULL when the event has none */
    int64_t seconds;          /* EVENT: timestamp */
    int64_t microseconds;
};

struct qmpc;

/* Called with every message sent (outgoing true) or taken from the stream, as its bytes. */
typedef void qmpc_trace_fn(void *opaque, bool outgoing, const char *text, size_t len);

/* Connect to the monitor at path and wait for its greeting, both within timeout_ms.
 * Returns a new client in QMPC_STATE_CAPABILITIES, or NULL. Blocks. */
struct qmpc *qmpc_connect(const char *path, int timeout_ms, struct error **errp);

/* Connect to the monitor at path within timeout_ms, without waiting for the greeting.
 * Returns a new client in QMPC_STATE_GREETING (a trace set now sees the greeting; the next
 * call taking messages waits for it), or NULL. Blocks. */
struct qmpc *qmpc_open(const char *path, int timeout_ms, struct error **errp);

/* Wrap fd, a connected stream socket (ownership passes; it is made non-blocking), in
 * QMPC_STATE_GREETING. fd -1 makes a client with no connection, fed by qmpc_feed() only.
 * Never fails. */
struct qmpc *qmpc_new(int fd);

/* Close the connection and free everything, queued messages included. NULL is ignored. */
void qmpc_free(struct qmpc *c);

/* The socket, to poll for reading, or -1. Owned by the client: do not close or read it. */
int qmpc_fd(const struct qmpc *c);

enum qmpc_state qmpc_state(const struct qmpc *c);

/* Log every message in both directions through fn (NULL turns it off). */
void qmpc_set_trace(struct qmpc *c, qmpc_trace_fn *fn, void *opaque);

/* The greeting's "QMP" object (borrowed, valid until qmpc_free), or NULL before it came. */
json_t *qmpc_greeting(const struct qmpc *c);

/* The server's version from the greeting ("qemu": major, minor, micro; any pointer may be
 * NULL). Returns 0, or -1 if there is no greeting or it has no usable version. */
int qmpc_server_version(const struct qmpc *c, int *major, int *minor, int *micro);

/* Whether the greeting offers capability name (e.g. "oob"). */
bool qmpc_has_capability(const struct qmpc *c, const char *name);

/* Send qmp_capabilities (with "enable": enable if not NULL; borrowed) and wait for the reply,
 * first for the greeting if it has not come yet. Returns 0 in QMPC_STATE_COMMAND, or -1; a
 * refusal by the server is reported as an error with its class and desc in the text. Blocks. */
int qmpc_negotiate(struct qmpc *c, json_t *enable, int timeout_ms, struct error **errp);

/* Run command name with args (a JSON object, or NULL for none; borrowed) and wait for its
 * reply, queuing events. Returns the reply (caller frees), of kind QMPC_MSG_RETURN or
 * QMPC_MSG_ERROR, or NULL if the connection failed or timed out. Blocks. */
struct qmpc_message *qmpc_execute(struct qmpc *c, const char *name, json_t *args, int timeout_ms,
                                  struct error **errp);

/* Send command name with args (borrowed, may be NULL) and a fresh numeric id, without waiting.
 * Returns the id (> 0) that its reply will carry, or -1. May block on a full socket. */
int64_t qmpc_send_command(struct qmpc *c, const char *name, json_t *args, struct error **errp);

/* Send msg (a JSON object, borrowed) exactly as given: no id is added. Returns 0 or -1.
 * May block on a full socket. */
int qmpc_send(struct qmpc *c, json_t *msg, struct error **errp);

/* Wait for the reply carrying id (borrowed; NULL: the next reply without an id), queuing
 * events and other replies. A reply without an id also matches: the server sends one when it
 * could not read the request's. Returns it (caller frees), or NULL. Blocks. */
struct qmpc_message *qmpc_wait_reply(struct qmpc *c, json_t *id, int timeout_ms,
                                     struct error **errp);

/* Take the next event: the oldest queued one, else wait up to timeout_ms for one, queuing
 * replies that arrive first. Returns 1 with *ev (caller frees), 0 on timeout, -1 on failure
 * (EOF included: events that came before it are returned first). */
int qmpc_next_event(struct qmpc *c, int timeout_ms, struct qmpc_message **ev,
                    struct error **errp);

/* Read what the socket has, without blocking, into the client's buffer. Returns the number
 * of bytes read, 0 if none were available, or -1 on EOF or error (QMPC_STATE_CLOSED; messages
 * received before it can still be popped). */
ssize_t qmpc_read(struct qmpc *c, struct error **errp);

/* Append bytes received by other means to the client's buffer. */
void qmpc_feed(struct qmpc *c, const void *data, size_t len);

/* Take the next message, in the order received: queued ones first, then complete ones in the
 * buffer. Never reads or blocks. Returns 1 with *msg (caller frees), 0 if there is none yet,
 * or -1 if the stream is malformed (QMPC_STATE_CLOSED). */
int qmpc_pop(struct qmpc *c, struct qmpc_message **msg, struct error **errp);

/* Whether qmpc_pop() has a message to return right now. */
bool qmpc_pending(struct qmpc *c);

/* Whether the connection ended cleanly: the server closed it between messages and every
 * message before that has been taken. False while connected and after an I/O or protocol
 * error, so a program can tell "server went away" from a failure. */
bool qmpc_eof(const struct qmpc *c);

/* Parse and check one message from its text (len bytes, one JSON object). Returns a new
 * message, or NULL if it is not valid JSON or not a QMP server message. */
struct qmpc_message *qmpc_message_parse(const char *text, size_t len, struct error **errp);

/* Free a message. NULL is ignored. */
void qmpc_message_free(struct qmpc_message *msg);

static inline void qmpc_freep(struct qmpc **c) { qmpc_free(*c); }
static inline void qmpc_message_freep(struct qmpc_message **m) { qmpc_message_free(*m); }
#define _cleanup_qmpc_ __attribute__((cleanup(qmpc_freep)))
#define _cleanup_qmpc_message_ __attribute__((cleanup(qmpc_message_freep)))

#endif
