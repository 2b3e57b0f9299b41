/* Message boundaries in the QMP byte stream: a scanner that tracks string and nesting state
 * across reads, so each byte is looked at once however the stream is split. */
#include "client/qmp-framer.h"

#include <string.h>

void qmpc_framer_init(struct qmpc_framer *f)
{
    memset(f, 0, sizeof(*f));
}

void qmpc_framer_free(struct qmpc_framer *f)
{
    buf_free(&f->in);
    qmpc_framer_init(f);
}

void qmpc_framer_reset(struct qmpc_framer *f)
{
    buf_reset(&f->in);
    f->start = f->scan = f->ready = f->depth = 0;
    f->in_string = f->escape = false;
}

void qmpc_framer_feed(struct qmpc_framer *f, const void *data, size_t len)
{
    buf_append(&f->in, data, len);
}

static bool is_json_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/* Scan one byte inside an object; returns true when it closes the top-level object. */
static bool scan_byte(struct qmpc_framer *f, char ch)
{
    if (f->in_string) {
        if (f->escape)
            f->escape = false;
        else if (ch == '\\')
            f->escape = true;
        else if (ch == '"')
            f->in_string = false;
        return false;
    }
    switch (ch) {
    case '"':
        f->in_string = true;
        break;
    case '{':
    case '[':
        f->depth++;
        break;
    case '}':
    case ']':
        /* A mismatched bracket still ends the object; the JSON parser then rejects it. */
        return --f->depth == 0;
    }
    return false;
}

/* Drop the taken bytes once they are at least half the buffer: amortised O(1) per byte,
 * where moving the rest down after every message would be quadratic in a burst. */
static void compact(struct qmpc_framer *f)
{
    if (f->start == 0 || f->start < f->in.len - f->start)
        return;
    buf_consume(&f->in, f->start);
    f->scan -= f->start;
    f->start = 0;
}

int qmpc_framer_next(struct qmpc_framer *f, const char **msg, size_t *len, struct error **errp)
{
    if (!f->ready) {
        compact(f);
        while (f->scan < f->in.len) {
            char ch = f->in.data[f->scan];
            if (f->depth == 0) {
                /* Between messages: skip whitespace, so the object starts at start. */
                if (is_json_space(ch)) {
                    f->start = ++f->scan;
                    continue;
                }
                if (ch != '{') {
                    error_setg(errp, "Unexpected byte 0x%02x between QMP messages",
                               (unsigned char)ch);
                    return -1;
                }
            }
            f->scan++;
            if (scan_byte(f, ch)) {
                f->ready = f->scan - f->start;
                break;
            }
        }
    }
    if (f->ready) {
        *msg = f->in.data + f->start;
        *len = f->ready;
        return 1;
    }
    if (f->in.len - f->start > QMPC_MAX_MESSAGE) {
        error_setg(errp, "QMP message longer than %u bytes", QMPC_MAX_MESSAGE);
        return -1;
    }
    return 0;
}

void qmpc_framer_consume(struct qmpc_framer *f)
{
    f->start += f->ready;
    f->ready = 0;
    if (f->start == f->in.len) {
        /* Nothing left: cheap to reset, and lets buf_consume() give memory back. */
        buf_reset(&f->in);
        f->start = f->scan = 0;
    }
}

bool qmpc_framer_partial(const struct qmpc_framer *f)
{
    return f->in.len > f->start;
}
