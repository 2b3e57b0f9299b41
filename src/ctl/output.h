/* How thinblkctl prints what the server sent. Writes to stdout and stderr only. */
#ifndef THINBLK_CTL_OUTPUT_H
#define THINBLK_CTL_OUTPUT_H

#include "client/qmp-client.h"

enum ctl_format {
    CTL_FORMAT_READABLE,  /* the return value indented; events one per line */
    CTL_FORMAT_RAW,       /* each message exactly as received */
    CTL_FORMAT_PRETTY,    /* each whole message, indented */
};

/* Print a reply: RETURN to stdout; ERROR as "thinblkctl: CLASS: desc" to stderr (and, in
 * the raw and pretty formats, the message to stdout too). */
void ctl_print_reply(const struct qmpc_message *reply, enum ctl_format fmt);

/* Print an event and flush stdout, so a reader of a pipe sees it at once. */
void ctl_print_event(const struct qmpc_message *ev, enum ctl_format fmt);

#endif
