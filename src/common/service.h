/* Telling the service manager (systemd, or anything that speaks its protocol) how we are:
 * sd_notify(3)'s protocol, one datagram per message to the AF_UNIX socket $NOTIFY_SOCKET names
 * (abstract when the name starts with '@'), and sd_watchdog_enabled(3)'s WATCHDOG_USEC and
 * WATCHDOG_PID. Without a manager every call does nothing, so callers need not check.
 */
#ifndef THINBLK_SERVICE_H
#define THINBLK_SERVICE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>

struct loop;

struct service_notifier {
    int fd;                   /* our datagram socket; -1 when no manager listens */
    struct sockaddr_un addr;  /* the manager's socket */
    socklen_t addr_len;
    struct loop *loop;
    uint64_t watchdog_ns;     /* the manager's watchdog interval; 0: none */
    uint64_t watchdog_timer;  /* the next WATCHDOG=1 ping, 0 when none is armed */
    bool warned;              /* a failed send was logged: one line, not one per ping */
};

/* Take the manager's socket and watchdog interval from the environment and remove
 * NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from it, so that our child processes (the
 * agent's hooks) cannot speak in our name. If the manager wants pings, send WATCHDOG=1 from a
 * loop timer at half its interval until service_notifier_close(): a loop that hangs stops
 * them. Call before any thread starts (it changes the environment). Never fails: a value it
 * cannot use is logged and ignored, as a daemon without a manager must still run. */
void service_notifier_init(struct service_notifier *n, struct loop *loop);

/* Send state, one or more newline-separated assignments ("READY=1", "STATUS=running").
 * Never blocks; a failure is logged (once) and otherwise ignored. */
void service_notify(struct service_notifier *n, const char *state);

/* Stop the pings and close the socket. */
void service_notifier_close(struct service_notifier *n);

#endif
