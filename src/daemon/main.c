/* thinblkd: the block storage daemon. Wires the layers together and runs the loop. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "block/graph.h"
#include "common/log.h"
#include "common/util.h"
#include "daemon/options.h"
#include "loop/loop.h"
#include "qmp/commands.h"
#include "qmp/server.h"
#include "runstate/runstate.h"

/* After a shutdown, the time clients get to take their last messages before we exit anyway. */
#define EXIT_FLUSH_TIMEOUT_NS (2000 * 1000 * 1000ull)

struct daemon {
    struct loop *loop;
    struct qmp_dispatcher *dispatcher;
    struct qmp_server *server;
    struct runstate *runstate;
    struct block_graph *graph;
    json_t *version;
    int sigfd;
};

static void emit_event(void *opaque, const char *name, json_t *data)
{
    struct daemon *d = opaque;

    qmp_server_emit(d->server, name, data);
}

static void exit_now(void *opaque)
{
    struct daemon *d = opaque;

    loop_stop(d->loop);
}

static void exit_timeout(struct loop *loop, void *opaque)
{
    log_warn("monitor clients did not take their last messages in time; exiting anyway");
    loop_stop(loop);
}

static void on_state_change(void *opaque, enum run_state old_state, enum run_state new_state)
{
    struct daemon *d = opaque;

    log_debug("run state %s -> %s", runstate_name(old_state), runstate_name(new_state));
    if (new_state != RUN_STATE_SHUTDOWN)
        return;
    /* No new connections or requests; exit once SHUTDOWN and the last responses are out. */
    qmp_server_close(d->server);
    loop_add_timer(d->loop, EXIT_FLUSH_TIMEOUT_NS, exit_timeout, d);
    qmp_server_notify_flushed(d->server, exit_now, d);
}

static void on_signal(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct daemon *d = opaque;
    struct signalfd_siginfo si;

    while (read(fd, &si, sizeof(si)) == sizeof(si)) {
        log_info("terminating on signal %u", si.ssi_signo);
        runstate_shutdown(d->runstate, RUNSTATE_SHUTDOWN_HOST_SIGNAL);
    }
}

static int setup_signals(struct daemon *d)
{
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
        return -1;
    signal(SIGPIPE, SIG_IGN);
    d->sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (d->sigfd < 0)
        return -1;
    return loop_add_fd(d->loop, d->sigfd, LOOP_READ, on_signal, d);
}

static int write_pidfile(const char *path, struct error **errp)
{
    _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    char text[32];
    int len;

    if (fd < 0) {
        error_setg_errno(errp, errno, "Cannot open pid file %s", path);
        return -1;
    }
    len = snprintf(text, sizeof(text), "%d\n", (int)getpid());
    if (write(fd, text, (size_t)len) != len) {
        error_setg_errno(errp, errno, "Cannot write pid file %s", path);
        return -1;
    }
    return 0;
}

static void daemon_free(struct daemon *d)
{
    qmp_server_free(d->server);  /* removes the socket files */
    runstate_free(d->runstate);
    block_graph_free(d->graph);
    qmp_dispatcher_free(d->dispatcher);
    json_decref(d->version);
    if (d->sigfd >= 0)
        close(d->sigfd);
    loop_free(d->loop);
}

int main(int argc, char **argv)
{
    struct daemon_options opts;
    struct daemon d = { .sigfd = -1 };
    struct error *err = NULL;
    bool pidfile_written = false;
    int ret = 1;

    log_program = "thinblkd";
    if (daemon_options_parse(&opts, argc, argv, &err) < 0) {
        fprintf(stderr, "thinblkd: %s\nTry 'thinblkd --help' for more information.\n", err->desc);
        error_free(err);
        daemon_options_free(&opts);
        return 1;
    }
    if (opts.help) {
        daemon_options_usage(argv[0]);
        daemon_options_free(&opts);
        return 0;
    }
    if (opts.version) {
        printf("thinblkd " THINBLK_VERSION "\n");
        daemon_options_free(&opts);
        return 0;
    }
    log_max_level = opts.verbose >= 2 ? LOG_LEVEL_DEBUG
                  : opts.verbose == 1 ? LOG_LEVEL_INFO : LOG_LEVEL_WARN;

    d.loop = loop_new();
    if (!d.loop) {
        log_error("cannot create the event loop: %s", strerror(errno));
        goto out;
    }
    d.version = qmp_version_info(THINBLK_VERSION);
    d.dispatcher = qmp_dispatcher_new();
    d.server = qmp_server_new(d.loop, d.dispatcher, d.version);
    d.graph = block_graph_new();
    d.runstate = runstate_new(d.loop, opts.prelaunch ? RUN_STATE_PRELAUNCH : RUN_STATE_RUNNING,
                              emit_event, &d);
    runstate_add_listener(d.runstate, on_state_change, &d);

    qmp_register_control(d.dispatcher, d.version);
    qmp_register_run(d.dispatcher, d.runstate);
    qmp_register_block(d.dispatcher, d.graph);

    if (setup_signals(&d) < 0) {
        log_error("cannot set up signal handling: %s", strerror(errno));
        goto out;
    }
    for (size_t i = 0; i < opts.nmonitors; i++) {
        if (qmp_server_add_monitor(d.server, &opts.monitors[i], &err) < 0) {
            log_error("%s", err->desc);
            goto out;
        }
    }
    /* Written last: once it exists, every socket is listening. */
    if (opts.pidfile) {
        if (write_pidfile(opts.pidfile, &err) < 0) {
            log_error("%s", err->desc);
            goto out;
        }
        pidfile_written = true;
    }

    if (loop_run(d.loop) < 0) {
        log_error("event loop failed: %s", strerror(errno));
        goto out;
    }
    ret = 0;
out:
    error_free(err);
    if (pidfile_written)
        unlink(opts.pidfile);  /* as qemu-storage-daemon does */
    daemon_free(&d);
    daemon_options_free(&opts);
    return ret;
}
