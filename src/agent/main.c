/* thinblk-agent: keeps thin disks of thinblkd (or QEMU) ahead of their writers, and resumes a
 * daemon stopped on ENOSPC once its disks are extended. See thinblk-agent(8).
 *
 * One thread, one event loop (loop/loop.h). Calls go one way, down:
 *
 *     main.c  -> disk.c  -> monitor.c   (a non-blocking QMP connection per daemon)
 *                        -> extend.c    (extensions, as child processes)
 *     all of them -> config.c
 *
 * monitor.c and extend.c report back up only through the mon_ops and extend_done_fn they are
 * given; disk.c decides (disk.h). main.c also calls extend_loop_device() directly, for the
 * built-in loop method's child (--extend-loop).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "agent/config.h"
#include "agent/disk.h"
#include "agent/extend.h"
#include "agent/rbd.h"
#include "common/log.h"
#include "common/service.h"
#include "common/util.h"
#include "common/vector.h"
#include "loop/loop.h"

static const char usage_text[] =
    "Usage: thinblk-agent [OPTIONS]\n"
    "Extend thin disks of thinblkd before they run out, and resume a daemon stopped on ENOSPC.\n"
    "\n"
    "  -c, --config FILE          daemons and disks from FILE (see thinblk-agent(8))\n"
    "  -s, --socket PATH          watch the daemon whose QMP monitor is at PATH\n"
    "  -d, --device NAME          ... and manage its device NAME (repeatable; '*': every\n"
    "                             device, the default when no --device or --node is given)\n"
    "  -n, --node NAME            ... or the device whose root node or protocol node is NAME\n"
    "  -m, --method loop|hook|rbd how to extend (default: hook if --hook is given, else loop)\n"
    "      --hook PROGRAM         run PROGRAM VOLUME CURRENT_SIZE NEW_SIZE to extend\n"
    "      --volume PATH          the volume to extend (default: the protocol node's file;\n"
    "                             rbd: the pool whose quota to raise, default the image's)\n"
    "      --chunk SIZE           extend by SIZE (loop: 1G, hook: 2560M)\n"
    "      --watermark SIZE       keep SIZE free past the highest write (loop: 512M, hook: 2G)\n"
    "      --cap SIZE|PERCENT%    never beyond (default: 110% of the virtual size for qcow2,\n"
    "                             100% otherwise)\n"
    "      --poll-interval TIME   query every TIME as a backstop (default 2s)\n"
    "      --retry-min TIME       first wait after a failed extension (default 1s)\n"
    "      --retry-max TIME       longest wait between retries (default 60s)\n"
    "      --hook-timeout TIME    kill an extension running longer (default 120s)\n"
    "      --reconnect-max TIME   longest wait between connection attempts (default 5s)\n"
    "      --resume-on-other-errors  also cont after I/O errors other than ENOSPC\n"
    "      --metrics-file PATH    write the agent's metrics to PATH (Prometheus' format)\n"
    "      --check                check the configuration and exit\n"
    "  -v, --verbose              log more (debug)\n"
    "  -q, --quiet                log only warnings and errors\n"
    "      --log-timestamps       start each log line with the UTC time\n"
    "  -h, --help                 this help\n"
    "  -V, --version              the version\n";

enum {
    OPT_HOOK = 256,
    OPT_VOLUME,
    OPT_CHUNK,
    OPT_WATERMARK,
    OPT_CAP,
    OPT_POLL,
    OPT_RETRY_MIN,
    OPT_RETRY_MAX,
    OPT_HOOK_TIMEOUT,
    OPT_RESUME_OTHER,
    OPT_CHECK,
    OPT_EXTEND_LOOP,
    OPT_METRICS_FILE,
    OPT_RECONNECT_MAX,
    OPT_LOG_TIMESTAMPS,
};

static const struct option long_options[] = {
    {"config", required_argument, NULL, 'c'},
    {"socket", required_argument, NULL, 's'},
    {"device", required_argument, NULL, 'd'},
    {"node", required_argument, NULL, 'n'},
    {"method", required_argument, NULL, 'm'},
    {"hook", required_argument, NULL, OPT_HOOK},
    {"volume", required_argument, NULL, OPT_VOLUME},
    {"chunk", required_argument, NULL, OPT_CHUNK},
    {"watermark", required_argument, NULL, OPT_WATERMARK},
    {"cap", required_argument, NULL, OPT_CAP},
    {"poll-interval", required_argument, NULL, OPT_POLL},
    {"retry-min", required_argument, NULL, OPT_RETRY_MIN},
    {"retry-max", required_argument, NULL, OPT_RETRY_MAX},
    {"hook-timeout", required_argument, NULL, OPT_HOOK_TIMEOUT},
    {"resume-on-other-errors", no_argument, NULL, OPT_RESUME_OTHER},
    {"check", no_argument, NULL, OPT_CHECK},
    {"extend-loop", no_argument, NULL, OPT_EXTEND_LOOP},
    {"metrics-file", required_argument, NULL, OPT_METRICS_FILE},
    {"reconnect-max", required_argument, NULL, OPT_RECONNECT_MAX},
    {"log-timestamps", no_argument, NULL, OPT_LOG_TIMESTAMPS},
    {"verbose", no_argument, NULL, 'v'},
    {"quiet", no_argument, NULL, 'q'},
    {"help", no_argument, NULL, 'h'},
    {"version", no_argument, NULL, 'V'},
    {NULL, 0, NULL, 0},
};

/* What the command line says about its one daemon and its disks. */
DEFINE_VECTOR_TYPE(string_vector, const char *)

struct cli {
    const char *socket;
    string_vector devices;
    const char *node;
    /* Policy keys and values, applied to every disk of the command line. */
    const char *keys[16];
    const char *values[16];
    size_t nkeys;
    bool policy_given;
};

static void cli_policy(struct cli *cli, const char *key, const char *value)
{
    if (cli->nkeys == ARRAY_SIZE(cli->keys)) {
        fprintf(stderr, "thinblk-agent: too many options\n");
        exit(2);
    }
    cli->keys[cli->nkeys] = key;
    cli->values[cli->nkeys++] = value;
    cli->policy_given = true;
}

static int cli_disk(struct agent_config *cfg, struct cli *cli, const char *device,
                    const char *node, struct error **errp)
{
    struct agent_disk_policy *p = agent_config_add_disk(
        cfg, device ? (strcmp(device, "*") ? device : "(every device)") : node);

    p->daemon = xstrdup("default");
    if (device)
        p->device = xstrdup(device);
    else
        p->node = xstrdup(node);
    for (size_t i = 0; i < cli->nkeys; i++) {
        if (agent_config_set(cfg, p, cli->keys[i], cli->values[i], errp) < 0) {
            error_prepend(errp, "--%s: ", cli->keys[i]);
            return -1;
        }
    }
    return 0;
}

static int cli_apply(struct agent_config *cfg, struct cli *cli, struct error **errp)
{
    if (!cli->socket) {
        if (cli->devices.len || cli->node || cli->policy_given) {
            error_setg(errp, "--device, --node and the policy options need --socket");
            return -1;
        }
        return 0;
    }
    for (size_t i = 0; i < cfg->daemons.len; i++) {
        if (strcmp(cfg->daemons.ptr[i].name, "default") == 0) {
            error_setg(errp, "--socket: the configuration file has a daemon named 'default'");
            return -1;
        }
    }
    agent_config_add_daemon(cfg, "default")->socket = xstrdup(cli->socket);
    if (cli->node)
        return cli_disk(cfg, cli, NULL, cli->node, errp);
    if (!cli->devices.len)
        return cli_disk(cfg, cli, "*", NULL, errp);
    for (size_t i = 0; i < cli->devices.len; i++) {
        if (cli_disk(cfg, cli, cli->devices.ptr[i], NULL, errp) < 0)
            return -1;
    }
    return 0;
}

static int set_global(struct agent_config *cfg, const char *key, const char *value)
{
    _cleanup_error_ struct error *err = NULL;

    if (agent_config_set(cfg, NULL, key, value, &err) < 0) {
        fprintf(stderr, "thinblk-agent: --%s: %s\n", key, err->desc);
        return -1;
    }
    return 0;
}

/* "thinblk-agent --extend-loop DEVICE SIZE": the built-in loop method, run by the agent. */
static int extend_loop_main(int argc, char **argv)
{
    uint64_t size;

    if (argc != 2 || agent_parse_size(argv[1], &size) < 0) {
        fprintf(stderr, "Usage: thinblk-agent --extend-loop DEVICE SIZE\n");
        return 2;
    }
    return extend_loop_device(argv[0], size) < 0 ? 1 : 0;
}

static void on_signal(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct service_notifier *notifier = opaque;
    struct signalfd_siginfo si;

    if (read(fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
        log_info("terminating on signal %u", si.ssi_signo);
        service_notify(notifier, "STOPPING=1");
        loop_stop(loop);
    }
}

static void log_config(const struct agent_config *cfg)
{
    char a[32], b[32], c[64];

    for (size_t i = 0; i < cfg->disks.len; i++) {
        const struct agent_disk_policy *p = &cfg->disks.ptr[i];
        if (p->cap)
            agent_fmt_size(p->cap, c, sizeof(c));
        else if (p->cap_percent)
            snprintf(c, sizeof(c), "%u%% of the virtual size", p->cap_percent);
        else
            snprintf(c, sizeof(c), "%d%% of the virtual size for qcow2", AGENT_CAP_PERCENT);
        log_info("disk %s: daemon %s, %s %s, method %s%s%s, chunk %s, watermark %s, cap %s",
                 p->name, p->daemon, p->device ? "device" : "node", p->device ? p->device : p->node,
                 p->method == AGENT_METHOD_LOOP ? "loop" : p->method == AGENT_METHOD_RBD ? "rbd"
                                                                         : "hook", p->hook ? " " : "",
                 p->hook ? p->hook : "", agent_fmt_size(p->chunk, a, sizeof(a)),
                 agent_fmt_size(p->watermark, b, sizeof(b)), c);
    }
}

int main(int argc, char **argv)
{
    struct agent_config cfg;
    struct cli cli = {0};
    const char *config_path = NULL, *method = NULL, *hook = NULL;
    bool check = false;
    int opt, ret = 1;
    _cleanup_error_ struct error *err = NULL;

    log_program = "thinblk-agent";
    agent_config_init(&cfg);
    if (argc > 1 && strcmp(argv[1], "--extend-loop") == 0)
        return extend_loop_main(argc - 2, argv + 2);
    if (argc > 1 && strcmp(argv[1], "--extend-rbd") == 0)
        return rbd_extend_main(argc - 2, argv + 2);
    if (argc > 1 && strcmp(argv[1], "--rbd-pool-stat") == 0)
        return rbd_pool_stat_main(argc - 2, argv + 2);

    while ((opt = getopt_long(argc, argv, "c:s:d:n:m:vqhV", long_options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 's':
            cli.socket = optarg;
            break;
        case 'd':
            string_vector_append(&cli.devices, optarg);
            break;
        case 'n':
            cli.node = optarg;
            break;
        case 'm':
            method = optarg;
            cli_policy(&cli, "method", optarg);
            break;
        case OPT_HOOK:
            hook = optarg;
            cli_policy(&cli, "hook", optarg);
            break;
        case OPT_VOLUME:
            cli_policy(&cli, "volume", optarg);
            break;
        case OPT_CHUNK:
            cli_policy(&cli, "chunk", optarg);
            break;
        case OPT_WATERMARK:
            cli_policy(&cli, "watermark", optarg);
            break;
        case OPT_CAP:
            cli_policy(&cli, "cap", optarg);
            break;
        case OPT_POLL:
        case OPT_RETRY_MIN:
        case OPT_RETRY_MAX:
        case OPT_HOOK_TIMEOUT: {
            static const char *const keys[] = {"poll-interval", "retry-min", "retry-max",
                                               "hook-timeout"};
            if (set_global(&cfg, keys[opt - OPT_POLL], optarg) < 0)
                goto out;
            break;
        }
        case OPT_RECONNECT_MAX:
            if (set_global(&cfg, "reconnect-max", optarg) < 0)
                goto out;
            break;
        case OPT_LOG_TIMESTAMPS:
            log_timestamps = true;
            break;
        case OPT_METRICS_FILE:
            if (set_global(&cfg, "metrics-file", optarg) < 0)
                goto out;
            break;
        case OPT_RESUME_OTHER:
            cfg.resume_on_other_errors = true;
            break;
        case OPT_CHECK:
            check = true;
            break;
        case 'v':
            log_max_level = LOG_LEVEL_DEBUG;
            break;
        case 'q':
            log_max_level = LOG_LEVEL_WARN;
            break;
        case 'h':
            fputs(usage_text, stdout);
            ret = 0;
            goto out;
        case 'V':
            printf("thinblk-agent %s\n", THINBLK_VERSION);
            ret = 0;
            goto out;
        default:
            fputs(usage_text, stderr);
            ret = 2;
            goto out;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "thinblk-agent: unexpected argument '%s'\n", argv[optind]);
        ret = 2;
        goto out;
    }
    if (!config_path && !cli.socket && !cli.devices.len && !cli.node && !cli.policy_given) {
        fprintf(stderr, "thinblk-agent: nothing to watch: give --socket or a configuration "
                "file (--config)\n");
        fputs(usage_text, stderr);
        ret = 2;
        goto out;
    }
    if (cli.devices.len && cli.node) {
        fprintf(stderr, "thinblk-agent: give --device or --node, not both\n");
        ret = 2;
        goto out;
    }
    if (!method && !hook && cli.socket)
        cli_policy(&cli, "method", "loop");
    if (config_path && agent_config_load(&cfg, config_path, &err) < 0)
        goto fail;
    if (cli_apply(&cfg, &cli, &err) < 0 || agent_config_check(&cfg, &err) < 0 ||
        agent_config_check_hooks(&cfg, &err) < 0)
        goto fail;
    if (!cfg.daemons.len) {
        error_setg(&err, "nothing to watch: give --socket or a configuration file (--config)");
        goto fail;
    }
    if (check) {
        log_config(&cfg);
        ret = 0;
        goto out;
    }

    const char *self_exe = "/proc/self/exe";
    /* /proc/self/exe names this program for its children only while we run; resolve it. */
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) {
        self[n] = '\0';
        self_exe = self;
    }
    struct loop *loop = loop_new();
    if (!loop) {
        error_setg_errno(&err, errno, "epoll");
        goto fail;
    }
    struct service_notifier notifier;
    service_notifier_init(&notifier, loop);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0 || loop_add_fd(loop, sfd, LOOP_READ, on_signal, &notifier) < 0) {
        error_setg_errno(&err, errno, "signalfd");
        service_notifier_close(&notifier);
        loop_free(loop);
        goto fail;
    }

    log_config(&cfg);
    struct agent_metrics *metrics = agent_metrics_new(cfg.metrics_file);
    size_t ndaemons = cfg.daemons.len;
    struct disk_daemon **daemons = xzalloc(ndaemons * sizeof(*daemons));
    for (size_t i = 0; i < ndaemons; i++) {
        daemons[i] = disk_daemon_new(loop, &cfg, &cfg.daemons.ptr[i], self_exe, metrics);
        disk_daemon_start(daemons[i]);
    }
    /* Ready once every daemon's first connection attempt is under way, not once connected:
     * a daemon that starts later (or never) must not hold up the boot; the agent keeps
     * trying. */
    service_notify(&notifier, "READY=1");
    ret = loop_run(loop) < 0 ? 1 : 0;
    for (size_t i = 0; i < ndaemons; i++)
        disk_daemon_free(daemons[i]);
    free(daemons);
    agent_metrics_free(metrics);
    loop_del_fd(loop, sfd);
    close(sfd);
    service_notifier_close(&notifier);
    loop_free(loop);
    goto out;

fail:
    /* One line per mistake: the configuration's checks report them all at once. */
    for (const char *line = err->desc; *line;) {
        size_t len = strcspn(line, "\n");
        fprintf(stderr, "thinblk-agent: %.*s\n", (int)len, line);
        line += len + (line[len] == '\n');
    }
    ret = 1;
out:
    string_vector_reset(&cli.devices);
    agent_config_free(&cfg);
    return ret;
}
