/* The event journal. See journal.h. */
#include "qmp/journal.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "common/assert.h"
#include "common/util.h"

struct qmp_journal {
    json_t **ring;      /* size slots; ring[(first + i) % size] is the i-th oldest kept */
    size_t size;
    size_t first;
    size_t count;       /* kept: the events last_seq - count + 1 .. last_seq */
    uint64_t last_seq;  /* 0: none yet */
    char instance[37];
};

/* A random (version 4) UUID. getrandom() without blocking: at early boot, before the pool is
 * ready, the clock and the pid are enough to tell two daemons' cursors apart. */
static void make_instance(char out[37])
{
    uint8_t b[16];

    if (getrandom(b, sizeof(b), GRND_NONBLOCK) != (ssize_t)sizeof(b)) {
        uint64_t t = now_realtime_ns() ^ now_monotonic_ns(), p = (uint64_t)getpid();
        for (size_t i = 0; i < 8; i++) {
            b[i] = (uint8_t)(t >> (8 * i));
            b[8 + i] = (uint8_t)((p * 0x9e3779b97f4a7c15ull) >> (8 * i));
        }
    }
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12],
             b[13], b[14], b[15]);
}

struct qmp_journal *qmp_journal_new(size_t size)
{
    struct qmp_journal *j = xzalloc(sizeof(*j));

    ASSERT(size <= QMP_JOURNAL_MAX_SIZE);
    j->size = size;
    if (size)
        j->ring = xzalloc(size * sizeof(*j->ring));
    make_instance(j->instance);
    return j;
}

void qmp_journal_free(struct qmp_journal *j)
{
    if (!j)
        return;
    for (size_t i = 0; i < j->count; i++)
        json_decref(j->ring[(j->first + i) % j->size]);
    free(j->ring);
    free(j);
}

uint64_t qmp_journal_record(struct qmp_journal *j, json_t *ev)
{
    uint64_t seq = ++j->last_seq;

    json_object_set_new(ev, QMP_EVENT_SEQ, json_integer((json_int_t)seq));
    if (j->size == 0)
        return seq;
    if (j->count == j->size) {
        json_decref(j->ring[j->first]);
        j->first = (j->first + 1) % j->size;
        j->count--;
    }
    j->ring[(j->first + j->count) % j->size] = json_incref(ev);
    j->count++;
    return seq;
}

const char *qmp_journal_instance(const struct qmp_journal *j)
{
    return j->instance;
}

json_t *qmp_journal_query(const struct qmp_journal *j, uint64_t after, const char *instance,
                          struct error **errp)
{
    uint64_t first_kept = j->last_seq - j->count + 1;  /* last_seq + 1 if none is kept */
    uint64_t suppressed = 0;
    json_t *events = json_array();

    if (instance && strcmp(instance, j->instance) != 0)
        after = 0;  /* a cursor of another daemon (or of this one's previous run) */
    if (after > j->last_seq) {
        json_decref(events);
        error_setg(errp, "Parameter 'after' is ahead of the journal: the last event is %" PRIu64,
                   j->last_seq);
        return NULL;
    }
    for (uint64_t seq = MAX(after + 1, first_kept); seq <= j->last_seq; seq++) {
        json_t *ev = j->ring[(j->first + (size_t)(seq - first_kept)) % j->size];
        json_t *k = json_object_get(ev, QMP_EVENT_SUPPRESSED);
        if (k)
            suppressed += (uint64_t)json_integer_value(k);
        json_array_append(events, ev);
    }
    return json_pack("{s:s,s:I,s:I,s:I,s:o}", "instance", j->instance, "last-seq",
                     (json_int_t)j->last_seq, "dropped",
                     (json_int_t)(first_kept > after + 1 ? first_kept - after - 1 : 0),
                     "suppressed", (json_int_t)suppressed, "events", events);
}
