/* thinblkctl: run one QMP command, or follow events, on a QMP monitor socket.
 *
 * Exit status: 0 success, 1 the server answered with an error, 2 usage error, 3 connection or
 * protocol failure (see docs/thinblkctl.1.scd).
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "client/qmp-client.h"
#include "common/util.h"
#include "ctl/args.h"
#include "ctl/metrics.h"
#include "ctl/output.h"

enum {
    CTL_EXIT_OK = 0,
    CTL_EXIT_QMP_ERROR = 1,
    CTL_EXIT_USAGE = 2,
    CTL_EXIT_CONNECTION = 3,
};

enum { CTL_DEFAULT_TIMEOUT_MS = 30000 };

struct ctl_options {
    const char *socket;     /* the monitor's path */
    enum ctl_format format;
    int timeout_ms;         /* for connecting, the greeting and each reply; -1: no limit */
    int event_timeout_ms;   /* events: for each event; -1 (the default): no limit */
    bool verbose;           /* trace the traffic to stderr */
    long count;             /* events: exit after this many; 0: no limit */
};

static const char usage_text[] =
    "Usage: thinblkctl [OPTIONS] COMMAND [KEY=VALUE | KEY:=JSON]...\n"
    "       thinblkctl [OPTIONS] COMMAND JSON-OBJECT\n"
    "       thinblkctl [OPTIONS] events [-c N] [EVENT-NAME]...\n"
    "       thinblkctl [OPTIONS] metrics\n"
    "Run a QMP command on a thinblkd (or QEMU) monitor and print its result, follow events, or\n"
    "print the daemon's metrics in Prometheus' text format.\n"
    "\n"
    "Options:\n"
    "  -s, --socket PATH      the monitor's Unix socket (default: $THINBLK_SOCKET)\n"
    "  -r, --raw              print the server's messages exactly as received\n"
    "  -p, --pretty           print the server's whole messages as indented JSON\n"
    "  -t, --timeout SECONDS  give up waiting to connect, for a reply, or for an event\n"
    "                         (default 30; 0: wait as long as it takes)\n"
    "  -c, --count N          events: exit after N events\n"
    "  -v, --verbose          trace the QMP traffic to stderr\n"
    "  -h, --help             show this help and exit\n"
    "  -V, --version          show the version and exit\n"
    "\n"
    "Arguments: KEY=VALUE makes VALUE an integer, true, false, null, a JSON object or array\n"
    "(when it starts with { or [), else a string; KEY:=JSON takes JSON as is (KEY:='\"123\"'\n"
    "for a string of digits); a.b=1 nests as {\"a\": {\"b\": 1}}.\n"
    "\n"
    "Exit status: 0 success; 1 the server answered with an error; 2 usage error;\n"
    "3 connection or protocol failure (cannot connect, timeout, connection closed before\n"
    "the reply, malformed message). events exits 0 when the server closes the connection\n"
    "or on SIGINT or SIGTERM.\n";

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("thinblkctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry 'thinblkctl --help' for more information.\n", stderr);
    return CTL_EXIT_USAGE;
}

/* The usage error for what getopt_long() (with opterr 0 and ':' in the option string)
 * returned for a bad option. */
static int option_error(int opt, char **argv)
{
    if (opt == ':')
        return usage_error("Option '%s' needs an argument", argv[optind - 1]);
    if (optopt)
        return usage_error("Invalid option '-%c'", optopt);
    return usage_error("Invalid option '%s'", argv[optind - 1]);
}

/* Whether a -s argument is a command given by mistake (thinblkctl -s query-status): it
 * does not exist and is a bare word of the letters QMP names are made of, which a socket's
 * path ("qmp.sock", "/run/...") hardly is. */
static bool looks_like_command(const char *s)
{
    return access(s, F_OK) < 0 && *s &&
           strspn(s, "abcdefghijklmnopqrstuvwxyz0123456789_-") == strlen(s);
}

/* Report err (consumed) and return the exit status of a connection failure. */
static int connection_error(struct error *err)
{
    fflush(stdout);
    fprintf(stderr, "thinblkctl: %s\n", err->desc);
    error_free(err);
    return CTL_EXIT_CONNECTION;
}

static void trace_to_stderr(void *opaque, bool outgoing, const char *text, size_t len)
{
    fprintf(stderr, "%s %.*s\n", outgoing ? "->" : "<-", (int)MIN(len, (size_t)INT_MAX), text);
}

/* Seconds into *ms; 0 is no limit (-1). */
static int parse_timeout(const char *s, int *ms)
{
    char *end;
    errno = 0;
    double secs = strtod(s, &end);
    /* Written so that NaN fails too. */
    if (errno || end == s || *end || !(secs >= 0 && secs <= INT_MAX / 1000))
        return -1;
    if (secs == 0) {
        *ms = -1;
        return 0;
    }
    double exact = secs * 1000;
    *ms = (int)exact;
    if (*ms < exact)
        (*ms)++;
    return 0;
}

static int parse_count(const char *s, long *count)
{
    char *end;
    errno = 0;
    *count = strtol(s, &end, 10);
    return errno || end == s || *end || *count <= 0 ? -1 : 0;
}

/* Connect, and trace from the greeting on if asked. */
static struct qmpc *ctl_open(const struct ctl_options *o, struct error **errp)
{
    struct qmpc *c = qmpc_open(o->socket, o->timeout_ms, errp);
    if (c && o->verbose)
        qmpc_set_trace(c, trace_to_stderr, NULL);
    return c;
}

/* ---- one command ---------------------------------------------------------------------- */

static int run_command(const struct ctl_options *o, const char *name, int argc, char **argv)
{
    struct error *err = NULL;
    json_t *args = ctl_args_parse(argc, argv, &err);
    if (!args) {
        int ret = usage_error("%s", err->desc);
        error_free(err);
        return ret;
    }
    if (json_object_size(args) == 0) {
        json_decref(args);
        args = NULL;
    }
    /* qmp_capabilities is sent as given: thinblkctl negotiates with it instead of its own. */
    bool negotiating = strcmp(name, "qmp_capabilities") == 0;

    _cleanup_qmpc_ struct qmpc *c = ctl_open(o, &err);
    _cleanup_qmpc_message_ struct qmpc_message *reply = NULL;
    if (c && (negotiating || qmpc_negotiate(c, NULL, o->timeout_ms, &err) == 0))
        reply = qmpc_execute(c, name, args, o->timeout_ms, &err);
    json_decref(args);
    if (!reply)
        return connection_error(err);

    if (!negotiating || reply->kind == QMPC_MSG_ERROR)
        ctl_print_reply(reply, o->format);
    return reply->kind == QMPC_MSG_ERROR ? CTL_EXIT_QMP_ERROR : CTL_EXIT_OK;
}

/* ---- metrics ------------------------------------------------------------------------- */

/* Run the queries a metrics page is made of, on one connection, and print it. A refused
 * query is reported as any refused command. */
static int run_metrics(const struct ctl_options *o)
{
    static const char *const queries[] = {"query-status", "query-block", "query-blockstats",
                                          "query-named-block-nodes"};
    struct qmpc_message *replies[ARRAY_SIZE(queries)] = {NULL};
    struct error *err = NULL;
    int ret = CTL_EXIT_OK;

    _cleanup_qmpc_ struct qmpc *c = ctl_open(o, &err);
    if (!c || qmpc_negotiate(c, NULL, o->timeout_ms, &err) < 0)
        return connection_error(err);
    for (size_t i = 0; i < ARRAY_SIZE(queries) && ret == CTL_EXIT_OK; i++) {
        replies[i] = qmpc_execute(c, queries[i], NULL, o->timeout_ms, &err);
        if (!replies[i]) {
            ret = connection_error(err);
        } else if (replies[i]->kind == QMPC_MSG_ERROR) {
            ctl_print_reply(replies[i], o->format);
            ret = CTL_EXIT_QMP_ERROR;
        }
    }
    if (ret == CTL_EXIT_OK) {
        struct ctl_metrics_input in = {replies[0]->ret, replies[1]->ret, replies[2]->ret,
                                       replies[3]->ret};
        ctl_metrics_print(&in);
    }
    for (size_t i = 0; i < ARRAY_SIZE(queries); i++)
        qmpc_message_free(replies[i]);
    return ret;
}

/* ---- events --------------------------------------------------------------------------- */

static bool event_wanted(const char *event, int n_names, char **names)
{
    if (n_names == 0)
        return true;
    for (int i = 0; i < n_names; i++) {
        if (strcmp(event, names[i]) == 0)
            return true;
    }
    return false;
}

/* Milliseconds to the deadline (ms since an arbitrary start, or -1 for none), for poll(). */
static int ms_until(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t now = (int64_t)(now_monotonic_ns() / 1000000);
    return deadline <= now ? 0 : (int)MIN(deadline - now, INT_MAX);
}

static int64_t deadline_after(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : (int64_t)(now_monotonic_ns() / 1000000) + timeout_ms;
}

/* What thinblkctl was waiting for when the deadline passed. */
static const char *timeout_text(const struct qmpc *c)
{
    switch (qmpc_state(c)) {
    case QMPC_STATE_GREETING:
        return "Timed out waiting for the QMP greeting";
    case QMPC_STATE_CAPABILITIES:
        return "Timed out waiting for a reply from the QMP monitor";
    default:
        return "Timed out waiting for an event";
    }
}

/* Handle one message. Returns 1 if it was a wanted event (printed), 0 if not, -1 on
 * failure with *errp set. Negotiation happens here, not in qmpc_negotiate(), so that the
 * caller can wait for the socket and the signals at once from the very start. */
static int on_message(const struct ctl_options *o, struct qmpc *c, struct qmpc_message *msg,
                      int n_names, char **names, struct error **errp)
{
    switch (msg->kind) {
    case QMPC_MSG_GREETING:
        return qmpc_send_command(c, "qmp_capabilities", NULL, errp) < 0 ? -1 : 0;
    case QMPC_MSG_ERROR:
        if (qmpc_state(c) != QMPC_STATE_COMMAND) {
            error_setg(errp, "Capabilities negotiation failed: %s: %s", msg->error_class,
                       msg->error_desc);
            return -1;
        }
        return 0;
    case QMPC_MSG_RETURN:
        return 0;
    case QMPC_MSG_EVENT:
        if (!event_wanted(msg->event, n_names, names))
            return 0;
        ctl_print_event(msg, o->format);
        return 1;
    }
    return 0;
}

/* Negotiate, then print the wanted events until the count is reached, the server closes the
 * connection or a signal arrives on sfd. */
static int follow_events(const struct ctl_options *o, struct qmpc *c, int sfd, int n_names,
                         char **names)
{
    _cleanup_error_ struct error *read_err = NULL;
    int64_t deadline = deadline_after(o->timeout_ms);
    bool negotiated = false;
    long printed = 0;
    for (;;) {
        struct qmpc_message *msg;
        struct error *err = NULL;
        int r;
        while ((r = qmpc_pop(c, &msg, &err)) == 1) {
            r = on_message(o, c, msg, n_names, names, &err);
            qmpc_message_free(msg);
            if (r < 0)
                return connection_error(err);
            if (!negotiated && qmpc_state(c) == QMPC_STATE_COMMAND) {
                /* From now on it waits for events, which may take as long as they take. */
                negotiated = true;
                deadline = deadline_after(o->event_timeout_ms);
            }
            if (r > 0) {
                deadline = deadline_after(o->event_timeout_ms);
                if (++printed == o->count)
                    return CTL_EXIT_OK;
            }
        }
        if (r < 0)
            return connection_error(err);
        if (qmpc_state(c) == QMPC_STATE_CLOSED) {
            if (qmpc_eof(c))
                return CTL_EXIT_OK;
            if (!read_err)
                error_setg(&read_err, "Connection closed");
            struct error *e = read_err;
            read_err = NULL;
            return connection_error(e);
        }

        struct pollfd pfd[2] = {
            {.fd = qmpc_fd(c), .events = POLLIN},
            {.fd = sfd, .events = POLLIN},
        };
        r = poll(pfd, 2, ms_until(deadline));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            error_setg_errno(&err, errno, "poll");
            return connection_error(err);
        }
        if (r == 0) {
            error_setg(&err, "%s", timeout_text(c));
            return connection_error(err);
        }
        if (pfd[1].revents)
            return CTL_EXIT_OK;
        if (pfd[0].revents && !read_err)
            qmpc_read(c, &read_err);
    }
}

static int run_events(struct ctl_options *o, int argc, char **argv)
{
    static const struct option long_options[] = {
        {"count", required_argument, NULL, 'c'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    optind = 0; /* glibc: start over, on the arguments after "events" */
    while ((opt = getopt_long(argc, argv, "+:c:", long_options, NULL)) != -1) {
        if (opt != 'c')
            return option_error(opt, argv);
        if (parse_count(optarg, &o->count) < 0)
            return usage_error("Invalid count '%s': expected a positive integer", optarg);
    }

    struct error *err = NULL;
    _cleanup_qmpc_ struct qmpc *c = ctl_open(o, &err);
    if (!c)
        return connection_error(err);

    /* From here on SIGINT and SIGTERM end thinblkctl cleanly, with status 0. Blocked before
     * any message is taken, so once the negotiation shows in the trace, a signal is caught;
     * until then it keeps its default action. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    _cleanup_close_ int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sfd < 0) {
        error_setg_errno(&err, errno, "signalfd");
        return connection_error(err);
    }
    return follow_events(o, c, sfd, argc - optind, argv + optind);
}

/* ---- main ----------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    static const struct option long_options[] = {
        {"socket", required_argument, NULL, 's'},
        {"raw", no_argument, NULL, 'r'},
        {"pretty", no_argument, NULL, 'p'},
        {"timeout", required_argument, NULL, 't'},
        {"count", required_argument, NULL, 'c'},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    /* A default limit, so that a monitor another client holds (QEMU serves one client per
     * monitor) or a hung daemon fails a script instead of hanging it. */
    struct ctl_options o = {.socket = NULL, .format = CTL_FORMAT_READABLE,
                            .timeout_ms = CTL_DEFAULT_TIMEOUT_MS, .event_timeout_ms = -1};
    bool raw = false, pretty = false;
    int opt;

    /* '+': options end at COMMAND, whose arguments are never taken for options. */
    opterr = 0;
    while ((opt = getopt_long(argc, argv, "+:s:rpt:c:vhV", long_options, NULL)) != -1) {
        switch (opt) {
        case 's':
            if (looks_like_command(optarg))
                return usage_error("-s expects a socket path; '%s' looks like a command",
                                   optarg);
            o.socket = optarg;
            break;
        case 'r':
            raw = true;
            break;
        case 'p':
            pretty = true;
            break;
        case 't':
            if (parse_timeout(optarg, &o.timeout_ms) < 0)
                return usage_error("Invalid timeout '%s': expected a number of seconds "
                                   "(0: no limit)", optarg);
            o.event_timeout_ms = o.timeout_ms;
            break;
        case 'c':
            if (parse_count(optarg, &o.count) < 0)
                return usage_error("Invalid count '%s': expected a positive integer", optarg);
            break;
        case 'v':
            o.verbose = true;
            break;
        case 'h':
            fputs(usage_text, stdout);
            return CTL_EXIT_OK;
        case 'V':
            printf("thinblkctl %s\n", THINBLK_VERSION);
            return CTL_EXIT_OK;
        default:
            return option_error(opt, argv);
        }
    }
    if (raw && pretty)
        return usage_error("--raw and --pretty exclude each other");
    o.format = raw ? CTL_FORMAT_RAW : pretty ? CTL_FORMAT_PRETTY : CTL_FORMAT_READABLE;
    if (optind >= argc)
        return usage_error("Missing COMMAND");
    if (!o.socket) {
        const char *env = getenv("THINBLK_SOCKET");
        if (!env || !*env)
            return usage_error("No monitor socket: use --socket PATH or set THINBLK_SOCKET");
        o.socket = env;
    }

    const char *command = argv[optind];
    if (strcmp(command, "events") == 0)
        return run_events(&o, argc - optind, argv + optind);
    if (o.count)
        return usage_error("--count is only for events");
    if (strcmp(command, "metrics") == 0) {
        if (optind + 1 < argc)
            return usage_error("metrics takes no arguments");
        return run_metrics(&o);
    }
    return run_command(&o, command, argc - optind - 1, argv + optind + 1);
}
