/* thinblkd: the block storage daemon. Wires the layers together and runs the loop. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "block/graph.h"
#include "io/uring.h"
#include "job/job.h"
#include "common/log.h"
#include "common/service.h"
#include "device/device.h"
#include "device/group.h"
#include "export/export.h"
#include "common/util.h"
#include "daemon/options.h"
#include "loop/loop.h"
#include "qmp/commands.h"
#include "qmp/journal.h"
#include "qmp/server.h"
#include "runstate/runstate.h"
#include "tls/objects.h"

/* After a shutdown, the time clients get to take their last messages before we exit anyway. */
#define EXIT_FLUSH_TIMEOUT_NS (2000 * 1000 * 1000ull)

struct daemon {
    struct loop *loop;
    struct qmp_dispatcher *dispatcher;
    struct qmp_server *server;
    struct qmp_journal *journal;
    struct runstate *runstate;
    struct uring *uring;
    struct block_graph *graph;
    struct dev_context *devs;
    struct exports *exports;
    struct job_list *jobs;
    struct tls_objects *tls;
    struct qmp_services services;
    json_t *version;
    int sigfd;
    struct service_notifier notifier;
};

static void emit_event(void *opaque, const char *name, json_t *data)
{
    struct daemon *d = opaque;

    qmp_server_emit(d->server, name, data);
}

static void emit_device_event(void *opaque, const char *name, json_t *data, json_t *extra)
{
    struct daemon *d = opaque;

    qmp_server_emit_with(d->server, name, data, extra);
}

/* The graph's get_secret: drivers' secret options name secret objects. */
static int get_secret(void *opaque, const char *id, struct secret *out, struct error **errp)
{
    return tls_objects_secret(opaque, id, out, errp);
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
    char status[64];
    snprintf(status, sizeof(status), "%sSTATUS=%s",
             new_state == RUN_STATE_SHUTDOWN ? "STOPPING=1\n" : "", runstate_name(new_state));
    service_notify(&d->notifier, status);
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

/* Open and lock the pid file, as QEMU does: a second daemon given the same file fails here,
 * before it touches any socket of the first. Returns the fd or -1. */
static int lock_pidfile(const char *path, struct error **errp)
{
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    struct flock lock = { .l_type = F_WRLCK, .l_whence = SEEK_SET };

    if (fd < 0) {
        error_setg_errno(errp, errno, "Cannot open pid file %s", path);
        return -1;
    }
    if (fcntl(fd, F_SETLK, &lock) < 0) {
        error_setg_errno(errp, errno, "Cannot lock pid file %s", path);
        close(fd);
        return -1;
    }
    return fd;
}

/* Write our PID into the locked pid file; done once every socket listens. */
static int write_pid(int fd, const char *path, struct error **errp)
{
    char text[32];
    int len = snprintf(text, sizeof(text), "%d\n", (int)getpid());

    if (ftruncate(fd, 0) < 0 || pwrite(fd, text, (size_t)len, 0) != len) {
        error_setg_errno(errp, errno, "Cannot write pid file %s", path);
        return -1;
    }
    return 0;
}

/* Apply --object, --blockdev, --nbd-server, --group and --export in the order given. */
static int apply_cli_objects(struct daemon *d, const struct daemon_options *opts,
                             struct error **errp)
{
    static const char *const opt_names[] = {
        [CLI_BLOCKDEV] = "--blockdev", [CLI_NBD_SERVER] = "--nbd-server",
        [CLI_EXPORT] = "--export", [CLI_OBJECT] = "--object", [CLI_GROUP] = "--group",
    };

    for (size_t i = 0; i < opts->objects.len; i++) {
        const struct cli_object *o = &opts->objects.ptr[i];
        /* The tables blockdev-add, nbd-server-start and block-export-add are checked with. */
        int r = schema_check(cli_object_schema(o->kind), o->opts, errp);
        if (r < 0) {
            error_prepend(errp, "%s: ", opt_names[o->kind]);
            return -1;
        }
        switch (o->kind) {
        case CLI_BLOCKDEV:
            if (!json_object_get(o->opts, "node-name")) {
                error_setg(errp, "'node-name' must be specified for the root node");
                r = -1;
            } else if (!block_node_create(d->graph, o->opts, errp)) {
                r = -1;
            }
            break;
        case CLI_NBD_SERVER:
            r = exports_nbd_server_start(d->exports, o->opts, errp);
            break;
        case CLI_EXPORT:
            r = exports_add(d->exports, o->opts, errp);
            break;
        case CLI_OBJECT:
            r = tls_objects_add(d->tls, o->opts, errp);
            break;
        case CLI_GROUP:
            if (!dev_group_add(d->devs, json_string_value(json_object_get(o->opts, "name")),
                               errp))
                r = -1;
            break;
        }
        if (r < 0) {
            error_prepend(errp, "%s: ", opt_names[o->kind]);
            return -1;
        }
    }
    return 0;
}

/* After the loop: no more clients; let I/O already at the kernel finish, so nothing is freed
 * under it, for at most a few seconds. */
static void drain_io(struct daemon *d)
{
    uint64_t deadline = now_monotonic_ns() + EXIT_FLUSH_TIMEOUT_NS;

    if (d->exports)
        exports_shutdown(d->exports);
    /* Requests with nothing to do complete by a deferred call, not counted in flight. */
    if (d->loop)
        loop_run_deferred(d->loop);
    while (((d->uring && uring_in_flight(d->uring) > 0) || job_list_busy(d->jobs) ||
            block_graph_busy(d->graph)) &&
           now_monotonic_ns() < deadline)
        loop_run_once(d->loop, 100);
}

static void daemon_free(struct daemon *d)
{
    if (d->loop)
        loop_run_deferred(d->loop);  /* frees of closed clients, and the like */
    drain_io(d);
    exports_free(d->exports);
    tls_objects_free(d->tls);
    if (!job_list_busy(d->jobs))
        job_list_free(d->jobs);  /* else a job's work still refers to it: leave it */
    dev_context_free(d->devs);
    qmp_server_free(d->server);  /* removes the socket files */
    qmp_journal_free(d->journal);
    runstate_free(d->runstate);
    if (!block_graph_busy(d->graph))
        block_graph_free(d->graph);  /* else an rbd connect still runs: leave it */
    uring_free(d->uring);
    qmp_dispatcher_free(d->dispatcher);
    json_decref(d->version);
    service_notifier_close(&d->notifier);
    if (d->sigfd >= 0)
        close(d->sigfd);
    loop_free(d->loop);
}

int main(int argc, char **argv)
{
    struct daemon_options opts;
    struct daemon d = { .sigfd = -1, .notifier = { .fd = -1 } };
    struct error *err = NULL;
    int pidfile_fd = -1;
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
    service_notifier_init(&d.notifier, d.loop);
    d.version = qmp_version_info(THINBLK_VERSION);
    d.dispatcher = qmp_dispatcher_new();
    d.journal = qmp_journal_new(opts.event_journal_size);
    d.server = qmp_server_new(d.loop, d.dispatcher, d.journal, d.version);
    d.uring = uring_new(d.loop, 256, &err);
    if (!d.uring) {
        log_error("%s", err->desc);
        goto out;
    }
    d.graph = block_graph_new(d.loop, d.uring, emit_event, &d);
    d.runstate = runstate_new(d.loop, opts.prelaunch ? RUN_STATE_PRELAUNCH : RUN_STATE_RUNNING,
                              emit_event, &d);
    runstate_add_listener(d.runstate, on_state_change, &d);
    d.devs = dev_context_new(d.loop, d.runstate, emit_device_event, &d);
    d.tls = tls_objects_new(d.loop);
    d.graph->get_secret = get_secret;
    d.graph->secret_opaque = d.tls;
    d.exports = exports_new(d.graph, d.devs, d.tls);
    d.jobs = job_list_new(emit_event, &d);
    d.services = (struct qmp_services){ .runstate = d.runstate, .graph = d.graph,
                                        .devs = d.devs, .exports = d.exports,
                                        .jobs = d.jobs, .tls = d.tls, .journal = d.journal };

    qmp_register_control(d.dispatcher, d.version);
    qmp_register_run(d.dispatcher, &d.services);
    qmp_register_block(d.dispatcher, &d.services);
    qmp_register_export(d.dispatcher, &d.services);
    qmp_register_job(d.dispatcher, &d.services);
    qmp_register_object(d.dispatcher, &d.services);
    qmp_register_event(d.dispatcher, &d.services);

    if (setup_signals(&d) < 0) {
        log_error("cannot set up signal handling: %s", strerror(errno));
        goto out;
    }
    if (opts.pidfile) {
        pidfile_fd = lock_pidfile(opts.pidfile, &err);
        if (pidfile_fd < 0) {
            log_error("%s", err->desc);
            goto out;
        }
    }
    for (size_t i = 0; i < opts.monitors.len; i++) {
        if (qmp_server_add_monitor(d.server, &opts.monitors.ptr[i], &err) < 0) {
            log_error("%s", err->desc);
            goto out;
        }
    }
    if (apply_cli_objects(&d, &opts, &err) < 0) {
        log_error("%s", err->desc);
        goto out;
    }
    /* The PID goes in last: once the file holds it, every socket is listening. */
    if (pidfile_fd >= 0 && write_pid(pidfile_fd, opts.pidfile, &err) < 0) {
        log_error("%s", err->desc);
        goto out;
    }
    /* The same promise to systemd (Type=notify): units ordered after us can connect. */
    char ready[64];
    snprintf(ready, sizeof(ready), "READY=1\nSTATUS=%s", runstate_name(runstate_get(d.runstate)));
    service_notify(&d.notifier, ready);

    if (loop_run(d.loop) < 0) {
        log_error("event loop failed: %s", strerror(errno));
        goto out;
    }
    ret = 0;
out:
    error_free(err);
    if (pidfile_fd >= 0) {
        unlink(opts.pidfile);  /* as qemu-storage-daemon does */
        close(pidfile_fd);
    }
    daemon_free(&d);
    daemon_options_free(&opts);
    return ret;
}
