/* Listening Unix sockets. See unix-socket.h. */
#include "common/unix-socket.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/util.h"

int unix_listen(const char *path, struct unix_listener *l, struct error **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    _cleanup_free_ char *tmp = xasprintf("%s.%d.tmp", path, (int)getpid());
    struct stat st;
    const char *bind_path;
    int fd, r;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        error_setg(errp, "UNIX socket path '%s' is too long", path);
        return -1;
    }
    /* A path too long for the temporary name is bound in place. */
    bind_path = strlen(tmp) < sizeof(sa.sun_path) ? tmp : path;
    memcpy(sa.sun_path, bind_path, strlen(bind_path) + 1);
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            error_setg(errp, "Failed to bind socket to %s: File exists and is not a socket",
                       path);
            return -1;
        }
        unlink(path);
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        error_setg_errno(errp, errno, "Failed to create Unix socket");
        return -1;
    }
    if (bind_path == tmp)
        unlink(tmp);
    mode_t old_umask = umask(0177);
    r = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    umask(old_umask);
    if (r < 0) {
        error_setg_errno(errp, errno, "Failed to bind socket to %s", path);
        close(fd);
        return -1;
    }
    if (listen(fd, SOMAXCONN) < 0 || (bind_path == tmp && rename(tmp, path) < 0) ||
        lstat(path, &st) < 0) {
        error_setg_errno(errp, errno, "Failed to listen on socket %s", path);
        unlink(bind_path);
        close(fd);
        return -1;
    }
    l->path = xstrdup(path);
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    return fd;
}

void unix_listener_remove(struct unix_listener *l)
{
    struct stat st;

    if (!l->path)
        return;
    if (lstat(l->path, &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino)
        unlink(l->path);
    free(l->path);
    l->path = NULL;
}

int socket_accept(int fd)
{
    for (;;) {
        int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd >= 0 || (errno != EINTR && errno != ECONNABORTED)) {
            if (cfd < 0 && errno == EWOULDBLOCK)
                errno = EAGAIN;
            return cfd;
        }
    }
}

bool socket_accept_starved(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}
