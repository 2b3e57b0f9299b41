/* Splitting the server's byte stream into messages (internal to the client library).
 *
 * QEMU ends each message with "\r\n", but a pretty-printing monitor spreads one over many
 * lines, so messages are delimited by JSON structure instead: a top-level object, from its
 * '{' to the matching '}', outside strings. Whitespace between objects is skipped; anything
 * else there is a protocol error. Nothing here blocks or parses values.
 */
#ifndef THINBLK_QMP_FRAMER_H
#define THINBLK_QMP_FRAMER_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"
#include "common/util.h"

/* A peer that sends more than this without closing an object is broken or hostile. */
#define QMPC_MAX_MESSAGE (64u * 1024 * 1024)

/* Offsets are into in.data. Taken bytes are dropped lazily (see compact()), so taking a
 * message costs no copy of the rest of the buffer. */
struct qmpc_framer {
    struct buf in;   /* bytes received; in.data[start..in.len) not yet taken */
    size_t start;    /* first byte not taken */
    size_t scan;     /* in.data[start..scan) has been scanned */
    size_t ready;    /* if not 0, in.data[start..start+ready) is a complete object */
    size_t depth;    /* nesting of {} and [] at scan */
    bool in_string;  /* scan is inside a string ... */
    bool escape;     /* ... right after a backslash */
};

/* An empty framer (owns no memory yet). */
void qmpc_framer_init(struct qmpc_framer *f);
/* Release the buffer; f is empty again. */
void qmpc_framer_free(struct qmpc_framer *f);
/* Forget everything buffered (after a protocol error). */
void qmpc_framer_reset(struct qmpc_framer *f);
/* Append received bytes (copied). Invalidates a pointer returned by qmpc_framer_next(). */
void qmpc_framer_feed(struct qmpc_framer *f, const void *data, size_t len);

/* Find the next complete object: returns 1 with *msg, *len (borrowed, valid until the next
 * feed or consume; found again until qmpc_framer_consume()), 0 if more bytes are needed, or
 * -1 on a byte that cannot start a message or an object past QMPC_MAX_MESSAGE. */
int qmpc_framer_next(struct qmpc_framer *f, const char **msg, size_t *len, struct error **errp);

/* Take the object qmpc_framer_next() returned. */
void qmpc_framer_consume(struct qmpc_framer *f);

/* After qmpc_framer_next() returned 0: whether the start of an unfinished object is
 * buffered (for reporting EOF in mid-message). */
bool qmpc_framer_partial(const struct qmpc_framer *f);

#endif
