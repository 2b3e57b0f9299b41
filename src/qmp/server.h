/* The QMP monitor server: Unix-socket monitors, their clients, responses and events.
 *
 * Each monitor listens on a socket (created mode 0600; a stale file at the path is replaced,
 * as QEMU does) and takes any number of clients. A client gets the greeting, negotiates
 * capabilities, and then gets responses in request order and every event, each message one
 * line ending in "\r\n" (or QEMU's pretty form if the monitor has pretty=on).
 *
 * Flow control: a client's requests are read and dispatched only while its unsent output is
 * under QMP_SERVER_SOFT_LIMIT, so a client that does not read its responses stops being read
 * (its socket buffer fills and its writes block: back-pressure, no memory growth). Events
 * cannot wait like that, so a client whose unsent output passes the monitor's output_limit is
 * disconnected; the others do not notice.
 *
 * A command that answers later (qmp_call_defer(), dispatch.h: blockdev-add of an rbd node,
 * which connects on the offload thread) holds its client: nothing more of that client is
 * read or dispatched until the answer is queued, as QMP answers in-band commands in order;
 * the other clients go on. A client that hangs up meanwhile is closed (its socket's hangup
 * wakes us) and the late answer dropped; the command completes all the same.
 *
 * Everything runs on the loop thread; nothing blocks.
 */
#ifndef THINBLK_QMP_SERVER_H
#define THINBLK_QMP_SERVER_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "common/error.h"

struct loop;
struct qmp_dispatcher;
struct qmp_journal;

#define QMP_SERVER_SOFT_LIMIT (64u * 1024)
#define QMP_SERVER_DEFAULT_OUTPUT_LIMIT (8u * 1024 * 1024)

struct qmp_monitor_config {
    const char *path;     /* Unix socket path */
    bool pretty;          /* QEMU's pretty=on */
    size_t output_limit;  /* bytes of unsent output before a client is dropped; 0: default */
};

struct qmp_server;

/* A server whose greeting carries version (borrowed; {"qemu": {...}, "package": ...}), whose
 * clients' requests go to d and whose events are numbered and kept in journal (both borrowed;
 * they must outlive the server). */
struct qmp_server *qmp_server_new(struct loop *loop, struct qmp_dispatcher *d,
                                  struct qmp_journal *journal, json_t *version);

/* Close every socket, remove the monitors' socket files, free everything. */
void qmp_server_free(struct qmp_server *srv);

/* Create a monitor listening as cfg says. Returns 0, or -1 with *errp set. */
int qmp_server_add_monitor(struct qmp_server *srv, const struct qmp_monitor_config *cfg,
                           struct error **errp);

/* Send event name with data (stolen, may be NULL) and the current time to every negotiated
 * client of every monitor. */
void qmp_server_emit(struct qmp_server *srv, const char *name, json_t *data);
/* The same with extra top-level members (stolen, may be NULL): downstream ones such as
 * "__org.thinblk_suppressed" (qmp/journal.h). Every event gets "__org.thinblk_seq" and goes
 * to the journal, whether or not a client is connected. */
void qmp_server_emit_with(struct qmp_server *srv, const char *name, json_t *data, json_t *extra);

/* Stop taking connections and requests (at shutdown); remove the socket files. Output already
 * queued is still sent. */
void qmp_server_close(struct qmp_server *srv);

/* Whether every client's output has been sent (or the client is gone). */
bool qmp_server_flushed(const struct qmp_server *srv);

/* Call fn once, when qmp_server_flushed() becomes true (at once if it is). */
void qmp_server_notify_flushed(struct qmp_server *srv, void (*fn)(void *opaque), void *opaque);

#endif
