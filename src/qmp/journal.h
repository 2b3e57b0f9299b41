/* The event journal: the last events the daemon sent, numbered, for a client that was not
 * listening (docs/qmp.md, "Event journal").
 *
 * Every event gets "__org.thinblk_seq": one counter for the daemon, from 1, so the same event
 * has the same number on every monitor, and events are numbered and kept whether or not a
 * client listens. The journal keeps the last `size` events as sent (references to the very
 * objects written to the monitors) in a ring; older ones are dropped and counted as such when
 * a client asks from before them. `instance` is a random id made at start, so that a client
 * can tell its cursor belongs to a daemon that has since restarted.
 *
 * Used from the loop thread only.
 */
#ifndef THINBLK_QMP_JOURNAL_H
#define THINBLK_QMP_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "common/error.h"

#define QMP_JOURNAL_DEFAULT_SIZE 1024
#define QMP_JOURNAL_MAX_SIZE (1024 * 1024)

/* The downstream members an event may carry beside "event", "data" and "timestamp". */
#define QMP_EVENT_SEQ "__org.thinblk_seq"
#define QMP_EVENT_SUPPRESSED "__org.thinblk_suppressed"

struct qmp_journal;

/* A journal keeping the last size events (0: none, only numbering; at most
 * QMP_JOURNAL_MAX_SIZE), with a new random instance id. Never fails. */
struct qmp_journal *qmp_journal_new(size_t size);
/* Free j and its references. NULL does nothing. */
void qmp_journal_free(struct qmp_journal *j);

/* Number event ev (an object, borrowed) with the next seq (set as QMP_EVENT_SEQ in it) and
 * keep a reference to it, dropping the oldest if full. ev must not change afterwards.
 * Returns the seq. */
uint64_t qmp_journal_record(struct qmp_journal *j, json_t *ev);

/* The instance id (a UUID's text), valid as long as j. */
const char *qmp_journal_instance(const struct qmp_journal *j);

/* __org.thinblk_query-event-journal's answer (a new reference): the kept events with seq >
 * after, oldest first, and the counts of docs/qmp.md. An instance other than j's (NULL: j's)
 * reads after as 0. Returns NULL with *errp set if after is beyond the last seq. */
json_t *qmp_journal_query(const struct qmp_journal *j, uint64_t after, const char *instance,
                          struct error **errp);

#endif
