/* thinblk-agent: the extension methods, each run as a child process.
 *
 * A hook is the program of the disk's policy, run as
 *     HOOK VOLUME CURRENT_SIZE NEW_SIZE
 * with THINBLK_* variables in its environment (thinblk-agent(8), HOOKS); the built-in loop
 * method is this program run as "thinblk-agent --extend-loop DEVICE NEW_SIZE". Either way the
 * loop only spawns it and watches a pidfd: a slow lvextend delays nothing but its own disk.
 * A child still running after hook-timeout is killed with its process group.
 */
#include "agent/extend.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <signal.h>
#include <stdarg.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"

extern char **environ;

/* An extension in flight: one child process. */
struct extend_job {
    struct loop *loop;
    extend_done_fn *done;
    void *opaque;           /* done's */
    char *disk;             /* the requester's name, for the log */
    pid_t pid;
    int pidfd;
    uint64_t timer;         /* the hook timeout */
    uint64_t start_ns;      /* monotonic */
    uint64_t from, to;      /* bytes */
    char *volume;
    char *reason;
    bool timed_out;
    enum agent_method method;
};

int extend_volume_size(const char *volume, uint64_t *size)
{
    struct stat sb;

    if (!volume || volume[0] != '/' || stat(volume, &sb) < 0)
        return -1;
    if (S_ISREG(sb.st_mode)) {
        *size = (uint64_t)sb.st_size;
        return 0;
    }
    if (!S_ISBLK(sb.st_mode)) {
        errno = EINVAL;
        return -1;
    }
    int fd = open(volume, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -1;
    int r = ioctl(fd, BLKGETSIZE64, size);
    close(fd);
    return r < 0 ? -1 : 0;
}

/* ---- the built-in loop method (in the child) ------------------------------------------ */

/* The first line of /sys/dev/block/MAJ:MIN/loop/NAME into buf. */
static int read_loop_attr(dev_t rdev, const char *name, char *buf, size_t len)
{
    char path[128];
    snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/loop/%s", major(rdev), minor(rdev), name);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    bool ok = fgets(buf, (int)len, f) != NULL;
    fclose(f);
    if (!ok)
        return -1;
    buf[strcspn(buf, "\n")] = '\0';
    return 0;
}

int extend_loop_device(const char *dev, uint64_t size)
{
    _cleanup_close_ int fd = open(dev, O_RDONLY | O_CLOEXEC);
    _cleanup_close_ int bfd = -1;
    char backing[4096], offset_s[32] = "0";
    struct stat sb, bsb;
    uint64_t before, after;

    if (fd < 0 || fstat(fd, &sb) < 0) {
        fprintf(stderr, "%s: %s\n", dev, strerror(errno));
        return -1;
    }
    if (!S_ISBLK(sb.st_mode) || read_loop_attr(sb.st_rdev, "backing_file", backing,
                                                sizeof(backing)) < 0) {
        fprintf(stderr, "%s: not a loop device with a backing file\n", dev);
        return -1;
    }
    read_loop_attr(sb.st_rdev, "offset", offset_s, sizeof(offset_s));
    uint64_t offset = strtoull(offset_s, NULL, 10);
    if (ioctl(fd, BLKGETSIZE64, &before) < 0) {
        fprintf(stderr, "%s: cannot read its size: %s\n", dev, strerror(errno));
        return -1;
    }
    if (before >= size)
        return 0;  /* someone did it already */
    bfd = open(backing, O_WRONLY | O_CLOEXEC);
    if (bfd < 0 || fstat(bfd, &bsb) < 0 || !S_ISREG(bsb.st_mode)) {
        fprintf(stderr, "%s: cannot open its backing file %s: %s\n", dev, backing,
                bfd < 0 ? strerror(errno) : "not a regular file");
        return -1;
    }
    /* Grow only: the file may already be longer (a loop device with a sizelimit). */
    if ((uint64_t)bsb.st_size < offset + size && ftruncate(bfd, (off_t)(offset + size)) < 0) {
        fprintf(stderr, "%s: cannot grow %s to %" PRIu64 " bytes: %s\n", dev, backing,
                offset + size, strerror(errno));
        return -1;
    }
    if (ioctl(fd, LOOP_SET_CAPACITY, 0) < 0) {
        fprintf(stderr, "%s: LOOP_SET_CAPACITY: %s\n", dev, strerror(errno));
        return -1;
    }
    if (ioctl(fd, BLKGETSIZE64, &after) < 0 || after < size) {
        fprintf(stderr, "%s: the capacity is %" PRIu64 " bytes after the update, not %" PRIu64
                " (a sizelimit?)\n", dev, after, size);
        return -1;
    }
    return 0;
}

/* ---- jobs ----------------------------------------------------------------------------- */

static void job_free(struct extend_job *job)
{
    loop_del_timer(job->loop, job->timer);
    if (job->pidfd >= 0) {
        loop_del_fd(job->loop, job->pidfd);
        close(job->pidfd);
    }
    free(job->disk);
    free(job->volume);
    free(job->reason);
    free(job);
}

void extend_abandon(struct extend_job *job)
{
    log_warn("%s: leaving the extension of %s (pid %d) to finish on its own",
             job->disk, job->volume, (int)job->pid);
    job_free(job);
}

static void on_exit_of_child(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct extend_job *job = opaque;
    extend_done_fn *done = job->done;
    void *done_opaque = job->opaque;
    int status;
    pid_t r = waitpid(job->pid, &status, WNOHANG);
    char from[32], to[32], now_s[32], why[128];
    uint64_t now;

    if (r == 0 || (r < 0 && errno == EINTR))
        return;
    uint64_t duration_ns = now_monotonic_ns() - job->start_ns;
    double ms = (double)duration_ns / 1e6;
    if (r < 0)
        snprintf(why, sizeof(why), "waitpid: %s", strerror(errno));
    else if (job->timed_out)
        snprintf(why, sizeof(why), "killed after the hook timeout");
    else if (WIFSIGNALED(status))
        snprintf(why, sizeof(why), "killed by signal %d", WTERMSIG(status));
    else if (WEXITSTATUS(status))
        snprintf(why, sizeof(why), "exit status %d", WEXITSTATUS(status));
    else
        why[0] = '\0';

    /* What the storage says now, not what was asked for: lvextend rounds up, a hook may do
     * more or less than asked. */
    if (job->method == AGENT_METHOD_RBD || extend_volume_size(job->volume, &now) < 0)
        now = why[0] ? job->from : job->to;
    if (!why[0] && now <= job->from)
        snprintf(why, sizeof(why), "succeeded, but the volume is still %s",
                 agent_fmt_size(now, now_s, sizeof(now_s)));

    agent_fmt_size(job->from, from, sizeof(from));
    agent_fmt_size(job->to, to, sizeof(to));
    if (why[0])
        log_error("%s: extending %s from %s to %s failed in %.1f ms (%s): %s", job->disk,
                  job->volume, from, to, ms, job->reason, why);
    else
        log_info("%s: extended %s from %s to %s in %.1f ms (%s)", job->disk, job->volume, from,
                 agent_fmt_size(now, now_s, sizeof(now_s)), ms, job->reason);
    job_free(job);
    done(done_opaque, !why[0], now, duration_ns, why);
}

static void on_timeout(struct loop *loop, void *opaque)
{
    struct extend_job *job = opaque;

    job->timer = 0;
    job->timed_out = true;
    log_error("%s: the extension of %s is still running after the hook timeout; killing it",
              job->disk, job->volume);
    kill(-job->pid, SIGKILL);  /* its process group: lvextend's children too */
}

static char *env_var(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static char *env_var(const char *name, const char *fmt, ...)
{
    char value[4096];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(value, sizeof(value), fmt, ap);
    va_end(ap);
    return xasprintf("%s=%s", name, value);
}

/* environ plus the THINBLK_* variables the hook gets; freed by free_env. */
static char **hook_env(const struct extend_request *req)
{
    size_t n = 0, k = 0;

    while (environ[n])
        n++;
    char **env = xzalloc((n + 16) * sizeof(*env));
    for (size_t i = 0; i < n; i++) {
        if (strncmp(environ[i], "THINBLK_", 8))
            env[k++] = xstrdup(environ[i]);
    }
    env[k++] = env_var("THINBLK_DISK", "%s", req->disk);
    env[k++] = env_var("THINBLK_DAEMON", "%s", req->daemon);
    env[k++] = env_var("THINBLK_SOCKET", "%s", req->socket);
    env[k++] = env_var("THINBLK_DEVICE", "%s", req->device);
    env[k++] = env_var("THINBLK_NODE", "%s", req->node);
    env[k++] = env_var("THINBLK_VOLUME", "%s", req->volume);
    env[k++] = env_var("THINBLK_CURRENT_SIZE", "%" PRIu64, req->from);
    env[k++] = env_var("THINBLK_NEW_SIZE", "%" PRIu64, req->to);
    env[k++] = env_var("THINBLK_VIRTUAL_SIZE", "%" PRIu64, req->virtual_size);
    env[k++] = env_var("THINBLK_REASON", "%s", req->reason);
    return env;
}

static void free_env(char **env)
{
    for (char **e = env; e && *e; e++)
        free(*e);
    free(env);
}

pid_t extend_spawn(char *const argv[], char **env, int out_fd, struct error **errp)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    sigset_t none, deflt;
    pid_t pid;

    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (out_fd >= 0) {
        posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
        posix_spawn_file_actions_adddup2(&fa, out_fd, 2);
    } else {
        posix_spawn_file_actions_adddup2(&fa, 2, 1);  /* what it prints goes to our log */
    }
    posix_spawnattr_init(&attr);
    sigemptyset(&none);
    sigemptyset(&deflt);
    sigaddset(&deflt, SIGPIPE);
    sigaddset(&deflt, SIGTERM);
    sigaddset(&deflt, SIGINT);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &deflt);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                        POSIX_SPAWN_SETPGROUP);
    int r = posix_spawn(&pid, argv[0], &fa, &attr, argv, env);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (r) {
        error_setg_errno(errp, r, "Could not run '%s'", argv[0]);
        return -1;
    }
    return pid;
}

struct extend_job *extend_start(struct loop *loop, const struct extend_request *req,
                                extend_done_fn *done, void *opaque, struct error **errp)
{
    const char *volume = req->volume;
    uint64_t from = req->from, to = req->to;
    char from_s[24], to_s[24];
    pid_t pid;

    uint64_t start_ns = now_monotonic_ns();  /* the spawn is part of what it costs */

    snprintf(from_s, sizeof(from_s), "%" PRIu64, from);
    snprintf(to_s, sizeof(to_s), "%" PRIu64, to);
    if (req->method == AGENT_METHOD_LOOP) {
        char *argv[] = {(char *)req->self_exe, "--extend-loop", (char *)volume, to_s, NULL};
        pid = extend_spawn(argv, environ, -1, errp);
    } else if (req->method == AGENT_METHOD_RBD) {
        char *argv[] = {(char *)req->self_exe, "--extend-rbd", (char *)(req->conf ? req->conf : ""),
                        (char *)volume, to_s, NULL};
        pid = extend_spawn(argv, environ, -1, errp);
    } else {
        char *argv[] = {(char *)req->hook, (char *)volume, from_s, to_s, NULL};
        char **env = hook_env(req);
        pid = extend_spawn(argv, env, -1, errp);
        free_env(env);
    }
    if (pid < 0)
        return NULL;

    struct extend_job *job = xzalloc(sizeof(*job));
    job->loop = loop;
    job->done = done;
    job->opaque = opaque;
    job->disk = xstrdup(req->disk);
    job->pid = pid;
    job->start_ns = start_ns;
    job->from = from;
    job->to = to;
    /* For the log: "extended the quota of pool p1 from 64 MiB to 128 MiB". */
    job->volume = req->method == AGENT_METHOD_RBD ? xasprintf("the quota of pool %s", volume)
                                                  : xstrdup(volume);
    job->reason = xstrdup(req->reason);
    job->method = req->method;
    job->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (job->pidfd < 0 || loop_add_fd(loop, job->pidfd, LOOP_READ, on_exit_of_child, job) < 0) {
        /* Without a pidfd (Linux < 5.3) there is no way to wait here without blocking. */
        error_setg_errno(errp, errno, "pidfd_open");
        kill(-pid, SIGKILL);
        waitpid(pid, NULL, 0);
        if (job->pidfd >= 0)
            close(job->pidfd);
        job->pidfd = -1;
        job_free(job);
        return NULL;
    }
    job->timer = loop_add_timer(loop, req->timeout_ns, on_timeout, job);
    log_debug("%s: extending %s from %" PRIu64 " to %" PRIu64 " (pid %d)", job->disk, volume,
              from, to, (int)pid);
    return job;
}
