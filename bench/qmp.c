/* bench-qmp: latency of a QMP monitor on a Unix socket, against any server (thinblkd, QEMU).
 *
 * Two measurements, each printed as key=value lines on stdout (times in microseconds):
 *   connect: N fresh connections, each connect() + greeting + qmp_capabilities + close();
 *   rtt:     on one negotiated connection, N x {"execute":"query-status"} + its reply line.
 *
 * Deliberately libc only, with blocking sockets and a plain line buffer: the client should cost
 * the same against every server and stay out of the numbers as much as possible. It does not
 * parse JSON; a reply is the first line holding "return", skipping events; anything else fails.
 */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BENCH_LINE_MAX (64 * 1024)
#define BENCH_WARMUP 200

static const char bench_cmd_caps[] = "{\"execute\":\"qmp_capabilities\"}\r\n";
static const char bench_cmd_status[] = "{\"execute\":\"query-status\"}\r\n";
static const char bench_cmd_quit[] = "{\"execute\":\"quit\"}\r\n";

/* A connection and its receive buffer; bytes [start, end) of buf are read but not consumed. */
struct bench_conn {
    int fd;
    size_t start, end;
    char buf[BENCH_LINE_MAX];
};

static void __attribute__((format(printf, 1, 2), noreturn)) bench_die(const char *fmt, ...)
{
    va_list ap;

    fputs("bench-qmp: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static double bench_now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

/* Connects to the Unix socket at path. Returns the fd, or -1 with errno set. */
static int bench_connect_fd(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(sa.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* Returns the next line of c (NUL-terminated, "\r\n" stripped; valid until the next call), or
 * NULL on EOF or error (errno is 0 on EOF). Blocks. */
static char *bench_read_line(struct bench_conn *c)
{
    for (;;) {
        char *nl = memchr(c->buf + c->start, '\n', c->end - c->start);
        if (nl) {
            char *line = c->buf + c->start;
            c->start = (size_t)(nl - c->buf) + 1;
            *nl = '\0';
            if (nl > line && nl[-1] == '\r')
                nl[-1] = '\0';
            return line;
        }
        if (c->start > 0) {
            memmove(c->buf, c->buf + c->start, c->end - c->start);
            c->end -= c->start;
            c->start = 0;
        }
        if (c->end == sizeof(c->buf) - 1) {
            errno = EMSGSIZE;
            return NULL;
        }
        ssize_t n = read(c->fd, c->buf + c->end, sizeof(c->buf) - 1 - c->end);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n == 0)
                errno = 0;
            return NULL;
        }
        c->end += (size_t)n;
    }
}

/* Writes all len bytes of msg to c; dies on failure. Blocks. */
static void bench_send(struct bench_conn *c, const char *msg, size_t len)
{
    while (len > 0) {
        ssize_t n = send(c->fd, msg, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            bench_die("send: %s", strerror(errno));
        msg += n;
        len -= (size_t)n;
    }
}

/* Reads the reply to the last command, skipping events; dies unless it is a "return". */
static void bench_expect_return(struct bench_conn *c, const char *what)
{
    for (;;) {
        char *line = bench_read_line(c);
        if (!line)
            bench_die("%s: %s", what, errno ? strerror(errno) : "connection closed");
        if (strstr(line, "\"return\""))
            return;
        /* QEMU puts "timestamp" before "event", so look for the key anywhere. */
        if (strstr(line, "\"event\"") && !strstr(line, "\"error\""))
            continue;
        bench_die("%s: unexpected reply: %.200s", what, line);
    }
}

/* Waits for the reply to quit or for EOF, whichever comes first: QEMU may exit before it
 * answers. */
static void bench_expect_reply_or_eof(struct bench_conn *c)
{
    char *line;

    while ((line = bench_read_line(c)) && !strstr(line, "\"return\"")) {
        if (strstr(line, "\"error\""))
            bench_die("quit: %.200s", line);
    }
}

/* Opens c to path, reads the greeting and, if negotiate, runs qmp_capabilities. Dies on
 * failure. */
static void bench_open(struct bench_conn *c, const char *path, bool negotiate)
{
    c->fd = bench_connect_fd(path);
    if (c->fd < 0)
        bench_die("connect %s: %s", path, strerror(errno));
    c->start = c->end = 0;
    char *line = bench_read_line(c);
    if (!line)
        bench_die("greeting: %s", errno ? strerror(errno) : "connection closed");
    if (strncmp(line, "{\"QMP\"", 6) != 0)
        bench_die("not a QMP greeting: %.200s", line);
    if (negotiate) {
        bench_send(c, bench_cmd_caps, sizeof(bench_cmd_caps) - 1);
        bench_expect_return(c, "qmp_capabilities");
    }
}

static void bench_close(struct bench_conn *c)
{
    close(c->fd);
    c->fd = -1;
}

/* Retries connecting to path until a QMP greeting arrives or timeout_s passes. Returns 0 when
 * the server answered, -1 on timeout. Blocks up to timeout_s seconds. */
static int bench_wait(const char *path, double timeout_s)
{
    double deadline = bench_now_us() + timeout_s * 1e6;
    struct timespec pause = { .tv_sec = 0, .tv_nsec = 10 * 1000 * 1000 };

    for (;;) {
        int fd = bench_connect_fd(path);
        if (fd >= 0) {
            struct bench_conn *c = malloc(sizeof(*c));
            if (!c)
                bench_die("out of memory");
            c->fd = fd;
            c->start = c->end = 0;
            char *line = bench_read_line(c);
            bool ok = line && strncmp(line, "{\"QMP\"", 6) == 0;
            close(fd);
            free(c);
            if (ok)
                return 0;
        }
        if (bench_now_us() >= deadline)
            return -1;
        nanosleep(&pause, NULL);
    }
}

static int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

/* Nearest-rank percentile p (0 < p <= 100) of the n sorted samples. */
static double bench_percentile(const double *sorted, size_t n, double p)
{
    size_t rank = (size_t)(p / 100.0 * (double)n + 0.999999);

    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return sorted[rank - 1];
}

static double *bench_alloc_samples(size_t n)
{
    double *s = calloc(n, sizeof(*s));

    if (!s)
        bench_die("out of memory");
    return s;
}

static void bench_run_connect(const char *path, size_t iter)
{
    struct bench_conn *c = malloc(sizeof(*c));
    double *s = bench_alloc_samples(iter);

    if (!c)
        bench_die("out of memory");
    for (size_t i = 0; i < iter; i++) {
        double t0 = bench_now_us();
        bench_open(c, path, true);
        bench_close(c);
        s[i] = bench_now_us() - t0;
    }
    qsort(s, iter, sizeof(*s), bench_cmp_double);
    printf("connect_iter=%zu\n", iter);
    printf("connect_median_us=%.1f\n", bench_percentile(s, iter, 50));
    printf("connect_p99_us=%.1f\n", bench_percentile(s, iter, 99));
    free(s);
    free(c);
}

/* Runs the query-status loop on c, already negotiated. */
static void bench_run_rtt(struct bench_conn *c, size_t iter)
{
    double *s = bench_alloc_samples(iter);
    double sum = 0;

    for (size_t i = 0; i < BENCH_WARMUP; i++) {
        bench_send(c, bench_cmd_status, sizeof(bench_cmd_status) - 1);
        bench_expect_return(c, "query-status");
    }
    for (size_t i = 0; i < iter; i++) {
        double t0 = bench_now_us();
        bench_send(c, bench_cmd_status, sizeof(bench_cmd_status) - 1);
        bench_expect_return(c, "query-status");
        s[i] = bench_now_us() - t0;
        sum += s[i];
    }
    qsort(s, iter, sizeof(*s), bench_cmp_double);
    printf("rtt_iter=%zu\n", iter);
    printf("rtt_median_us=%.1f\n", bench_percentile(s, iter, 50));
    printf("rtt_p99_us=%.1f\n", bench_percentile(s, iter, 99));
    printf("rtt_mean_us=%.1f\n", sum / (double)iter);
    free(s);
}

static void bench_usage(FILE *f)
{
    fputs("usage: bench-qmp [-n ITER] [-c CONNECT_ITER] [-w SECONDS] [-q] SOCKET\n"
          "  -n ITER          query-status round trips (default 20000; 0 skips)\n"
          "  -c CONNECT_ITER  connect+greeting+qmp_capabilities cycles (default 200; 0 skips)\n"
          "  -w, --wait SECS  first retry connecting until a greeting arrives, up to SECS\n"
          "                   (exit 2 on timeout); with -n 0 -c 0 only waits\n"
          "  -q, --quit       send \"quit\" to the server at the end\n"
          "  -h, --help       this help\n"
          "Prints key=value lines, times in microseconds.\n", f);
}

static size_t bench_parse_count(const char *arg, const char *opt)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(arg, &end, 10);

    if (errno || end == arg || *end || arg[0] == '-' || v > 100000000ULL)
        bench_die("bad %s: %s", opt, arg);
    return (size_t)v;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "wait", required_argument, NULL, 'w' },
        { "quit", no_argument, NULL, 'q' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    size_t rtt_iter = 20000, connect_iter = 200;
    double wait_s = -1;
    bool quit = false;
    int opt;

    while ((opt = getopt_long(argc, argv, "n:c:w:qh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'n':
            rtt_iter = bench_parse_count(optarg, "-n");
            break;
        case 'c':
            connect_iter = bench_parse_count(optarg, "-c");
            break;
        case 'w': {
            char *end;
            wait_s = strtod(optarg, &end);
            if (end == optarg || *end || wait_s < 0)
                bench_die("bad -w: %s", optarg);
            break;
        }
        case 'q':
            quit = true;
            break;
        case 'h':
            bench_usage(stdout);
            return 0;
        default:
            bench_usage(stderr);
            return 1;
        }
    }
    if (optind != argc - 1) {
        bench_usage(stderr);
        return 1;
    }
    const char *path = argv[optind];

    if (wait_s >= 0 && bench_wait(path, wait_s) < 0) {
        fprintf(stderr, "bench-qmp: %s: no QMP server after %g s\n", path, wait_s);
        return 2;
    }
    if (connect_iter > 0)
        bench_run_connect(path, connect_iter);
    if (rtt_iter > 0 || quit) {
        struct bench_conn *c = malloc(sizeof(*c));
        if (!c)
            bench_die("out of memory");
        bench_open(c, path, true);
        if (rtt_iter > 0)
            bench_run_rtt(c, rtt_iter);
        if (quit) {
            /* Wait for the reply: a server may drop a command whose client already left. */
            bench_send(c, bench_cmd_quit, sizeof(bench_cmd_quit) - 1);
            bench_expect_reply_or_eof(c);
        }
        bench_close(c);
        free(c);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
