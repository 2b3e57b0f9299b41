/* Listening Unix sockets, made the same way by every server of the daemon (QMP monitors, NBD).
 *
 * The socket file is created mode 0600 (the umask at bind(), so nobody else can connect at any
 * moment), under a temporary name renamed into place once listening (a client that sees the
 * file can connect). A socket file already at the path is replaced, as QEMU does; any other
 * file is left alone and is an error. At the end, the file is removed only if it is still the
 * one we made: another daemon may have taken the path over since.
 */
#ifndef THINBLK_UNIX_SOCKET_H
#define THINBLK_UNIX_SOCKET_H

#include <stdbool.h>
#include <sys/types.h>

#include "common/error.h"

struct unix_listener {
    char *path;  /* owned */
    dev_t dev;   /* the socket file we made */
    ino_t ino;
};

/* Listen on path (non-blocking, close-on-exec). Returns the fd and fills l, or -1 with *errp
 * set. */
int unix_listen(const char *path, struct unix_listener *l, struct error **errp);

/* Remove l's socket file if it is still ours, and free l's path. Does not close the fd. */
void unix_listener_remove(struct unix_listener *l);

/* Accept one connection on a listening socket fd (Unix or TCP), non-blocking and
 * close-on-exec, past EINTR and ECONNABORTED. Returns its fd, or -1 with errno EAGAIN (none
 * waiting), a starved errno (socket_accept_starved(): stop accepting for a while rather than
 * spin on a listener that stays readable), or another error. */
int socket_accept(int fd);
bool socket_accept_starved(int err);

#endif
