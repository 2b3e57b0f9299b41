/* sd_notify(3) by hand rather than through libsystemd: the protocol is one datagram, which
 * systemd documents as stable and meant to be reimplemented, and a library would add a
 * dependency to every program that links this for about fifty lines. */
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/service.h"
#include "loop/loop.h"

static void watchdog_ping(struct loop *loop, void *opaque)
{
    struct service_notifier *n = opaque;

    service_notify(n, "WATCHDOG=1");
    n->watchdog_timer = loop_add_timer(loop, n->watchdog_ns / 2, watchdog_ping, n);
}

/* The manager's socket address from NOTIFY_SOCKET; false (logged) if it cannot be one. */
static bool parse_address(struct service_notifier *n, const char *name)
{
    size_t len = strlen(name);

    if ((name[0] != '/' && name[0] != '@') || len < 2 || len >= sizeof(n->addr.sun_path)) {
        log_warn("NOTIFY_SOCKET=%s: not a Unix socket path or abstract name; not notifying",
                 name);
        return false;
    }
    n->addr.sun_family = AF_UNIX;
    memcpy(n->addr.sun_path, name, len);
    /* An abstract name is its bytes after the NUL, with no terminating NUL of its own. */
    if (name[0] == '@') {
        n->addr.sun_path[0] = '\0';
        n->addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    } else {
        n->addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
    }
    return true;
}

/* WATCHDOG_USEC in ns if the pings are asked of us (WATCHDOG_PID unset or ours), else 0. */
static uint64_t watchdog_interval(const char *usec, const char *pid)
{
    char *end;
    unsigned long long v;

    if (!usec)
        return 0;
    if (pid && strtoll(pid, NULL, 10) != (long long)getpid())
        return 0;
    errno = 0;
    v = strtoull(usec, &end, 10);
    if (errno || end == usec || *end || v == 0 || v > UINT64_MAX / 1000) {
        log_warn("WATCHDOG_USEC=%s: not a positive number of microseconds; no pings", usec);
        return 0;
    }
    return v * 1000;
}

void service_notifier_init(struct service_notifier *n, struct loop *loop)
{
    const char *name = getenv("NOTIFY_SOCKET");

    *n = (struct service_notifier){ .fd = -1, .loop = loop };
    if (name && parse_address(n, name)) {
        n->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (n->fd < 0)
            log_warn("cannot notify the service manager: socket: %s", strerror(errno));
        else
            n->watchdog_ns = watchdog_interval(getenv("WATCHDOG_USEC"), getenv("WATCHDOG_PID"));
    }
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    if (n->watchdog_ns)
        n->watchdog_timer = loop_add_timer(loop, n->watchdog_ns / 2, watchdog_ping, n);
}

void service_notify(struct service_notifier *n, const char *state)
{
    if (n->fd < 0)
        return;
    if (sendto(n->fd, state, strlen(state), MSG_DONTWAIT | MSG_NOSIGNAL,
               (struct sockaddr *)&n->addr, n->addr_len) < 0 && !n->warned) {
        log_warn("cannot notify the service manager: %s", strerror(errno));
        n->warned = true;
    }
}

void service_notifier_close(struct service_notifier *n)
{
    if (n->watchdog_timer)
        loop_del_timer(n->loop, n->watchdog_timer);
    n->watchdog_timer = 0;
    if (n->fd >= 0)
        close(n->fd);
    n->fd = -1;
}
