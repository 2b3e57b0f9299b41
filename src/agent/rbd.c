/* thinblk-agent's rbd method: probes of a pool and raises of its quota, in child processes.
 *
 * The quota that counts is the pool's max_bytes against its current_num_bytes, as the monitor
 * sees them (osd pool get-quota); the monitor flags the pool full (full_quota) a few seconds
 * after the usage passes the quota, and from then on a write that grows the pool fails with
 * EDQUOT (thinblkd: nospace). Raising the quota clears the flag only at the monitor's next look,
 * so the extension waits for that: a cont before it would fail the retried write again.
 */
#include "agent/rbd.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#ifdef HAVE_RADOS
#include <rados/librados.h>
#endif

#include "agent/config.h"
#include "agent/extend.h"
#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"

extern char **environ;

/* ---- the node's file name ------------------------------------------------------------- */

int rbd_parse_filename(const char *filename, char **pool, char **image, char **conf)
{
    *pool = *image = *conf = NULL;
    if (!filename)
        return -1;
    if (strncmp(filename, "json:", 5) == 0) {
        json_t *o = json_loads(filename + 5, 0, NULL);
        json_t *file = json_object_get(o, "file");  /* a json: of a format node over rbd */
        if (json_is_object(file)) {
            json_t *f = json_incref(file);
            json_decref(o);
            o = f;
        }
        const char *p = json_string_value(json_object_get(o, "pool"));
        const char *i = json_string_value(json_object_get(o, "image"));
        const char *c = json_string_value(json_object_get(o, "conf"));
        const char *drv = json_string_value(json_object_get(o, "driver"));
        int r = -1;
        if (p && i && (!drv || strcmp(drv, "rbd") == 0)) {
            *pool = xstrdup(p);
            *image = xstrdup(i);
            *conf = c ? xstrdup(c) : NULL;
            r = 0;
        }
        json_decref(o);
        return r;
    }
    /* rbd:POOL/IMAGE[@SNAP][:key=value...] (no escapes: enough for the names we make) */
    if (strncmp(filename, "rbd:", 4))
        return -1;
    const char *s = filename + 4, *slash = strchr(s, '/');
    if (!slash || slash == s)
        return -1;
    size_t ilen = strcspn(slash + 1, "@:");
    if (!ilen)
        return -1;
    *pool = xasprintf("%.*s", (int)((size_t)(slash - s)), s);
    *image = xasprintf("%.*s", (int)(ilen), slash + 1);
    const char *c = strstr(slash + 1, ":conf=");
    if (c)
        *conf = xasprintf("%.*s", (int)(strcspn(c + 6, ":")), c + 6);
    return 0;
}

/* ---- probes (in the agent) ------------------------------------------------------------ */

struct rbd_probe {
    struct loop *loop;
    rbd_probe_fn *done;
    void *opaque;
    pid_t pid;
    int pidfd;
    int out;                /* the read end of the child's standard output */
    uint64_t timer;
    bool timed_out;
};

static void probe_free(struct rbd_probe *pr)
{
    loop_del_timer(pr->loop, pr->timer);
    if (pr->pidfd >= 0) {
        loop_del_fd(pr->loop, pr->pidfd);
        close(pr->pidfd);
    }
    if (pr->out >= 0)
        close(pr->out);
    free(pr);
}

void rbd_probe_abandon(struct rbd_probe *pr)
{
    if (!pr)
        return;
    /* A probe changes nothing: kill it rather than leave it. Reaped by nobody but init once
     * the agent exits; the agent only abandons on its way out. */
    kill(-pr->pid, SIGKILL);
    probe_free(pr);
}

static void on_probe_exit(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct rbd_probe *pr = opaque;
    rbd_probe_fn *done = pr->done;
    void *done_opaque = pr->opaque;
    struct rbd_pool_stat st = {0};
    char buf[4096], why[256] = "";
    int status;
    pid_t r = waitpid(pr->pid, &status, WNOHANG);

    if (r == 0 || (r < 0 && errno == EINTR))
        return;
    /* The child has exited: all it wrote (one short line) is in the pipe. */
    ssize_t n = read(pr->out, buf, sizeof(buf) - 1);
    buf[n > 0 ? n : 0] = '\0';
    buf[strcspn(buf, "\n")] = '\0';  /* its first line: the answer, or why it failed */
    if (r < 0)
        snprintf(why, sizeof(why), "waitpid: %s", strerror(errno));
    else if (pr->timed_out)
        snprintf(why, sizeof(why), "killed after the hook timeout");
    else if (WIFSIGNALED(status))
        snprintf(why, sizeof(why), "killed by signal %d", WTERMSIG(status));
    else if (WEXITSTATUS(status))
        snprintf(why, sizeof(why), "exit status %d: %.200s", WEXITSTATUS(status), buf);
    if (!why[0]) {
        json_t *o = json_loads(buf, 0, NULL);
        json_t *used = json_object_get(o, "used"), *quota = json_object_get(o, "quota");
        json_t *full = json_object_get(o, "full");
        if (json_is_integer(used) && json_is_integer(quota) && json_is_boolean(full)) {
            st.used = (uint64_t)MAX(json_integer_value(used), 0);
            st.quota = (uint64_t)MAX(json_integer_value(quota), 0);
            st.full = json_is_true(full);
        } else {
            snprintf(why, sizeof(why), "unexpected output: %.100s", buf);
        }
        json_decref(o);
    }
    probe_free(pr);
    done(done_opaque, !why[0], &st, why);
}

static void on_probe_timeout(struct loop *loop, void *opaque)
{
    struct rbd_probe *pr = opaque;

    pr->timer = 0;
    pr->timed_out = true;
    kill(-pr->pid, SIGKILL);
}

struct rbd_probe *rbd_probe_start(struct loop *loop, const char *self_exe, const char *conf,
                                  const char *pool, uint64_t timeout_ns, rbd_probe_fn *done,
                                  void *opaque, struct error **errp)
{
    int pipefd[2];

    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        error_setg_errno(errp, errno, "pipe");
        return NULL;
    }
    char *argv[] = {(char *)self_exe, "--rbd-pool-stat", (char *)(conf ? conf : ""),
                    (char *)pool, NULL};
    pid_t pid = extend_spawn(argv, environ, pipefd[1], errp);
    close(pipefd[1]);
    if (pid < 0) {
        close(pipefd[0]);
        return NULL;
    }
    struct rbd_probe *pr = xzalloc(sizeof(*pr));
    pr->loop = loop;
    pr->done = done;
    pr->opaque = opaque;
    pr->pid = pid;
    pr->out = pipefd[0];
    fcntl(pr->out, F_SETFL, O_NONBLOCK);
    pr->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pr->pidfd < 0 || loop_add_fd(loop, pr->pidfd, LOOP_READ, on_probe_exit, pr) < 0) {
        error_setg_errno(errp, errno, "pidfd_open");
        kill(-pid, SIGKILL);
        waitpid(pid, NULL, 0);
        if (pr->pidfd >= 0)
            close(pr->pidfd);
        pr->pidfd = -1;
        probe_free(pr);
        return NULL;
    }
    pr->timer = loop_add_timer(loop, timeout_ns, on_probe_timeout, pr);
    return pr;
}

/* ---- the children --------------------------------------------------------------------- */

#ifdef HAVE_RADOS

/* A monitor command's JSON answer (an empty object if it has none), or NULL with a message
 * on stderr. */
static json_t *mon_json(rados_t cluster, const char *cmd)
{
    /* The command's prefix, for messages: "osd pool get-quota". */
    const char *p = strstr(cmd, "\"prefix\": \"");
    int plen = p ? (int)strcspn(p + 11, "\"") : 0;
    const char *cmds[] = {cmd};
    char *out = NULL, *outs = NULL;
    size_t outlen = 0, outslen = 0;
    json_t *o = NULL;

    int r = rados_mon_command(cluster, cmds, 1, "", 0, &out, &outlen, &outs, &outslen);
    if (r < 0)
        fprintf(stderr, "%.*s: %s%s%.*s\n", plen, p ? p + 11 : "", strerror(-r),
                outslen ? ": " : "", (int)outslen, outs ? outs : "");
    else if (!outlen)
        o = json_object();
    else if (!(o = json_loadb(out, outlen, 0, NULL)))
        fprintf(stderr, "%.*s: an answer that is not JSON\n", plen, p ? p + 11 : "");
    rados_buffer_free(out);
    rados_buffer_free(outs);
    return o;
}

static int connect_cluster(const char *conf, rados_t *cluster)
{
    int r = rados_create(cluster, NULL);
    if (r < 0) {
        fprintf(stderr, "rados_create: %s\n", strerror(-r));
        return -1;
    }
    r = rados_conf_read_file(*cluster, conf && *conf ? conf : NULL);
    /* A monitor that does not answer must not hold a probe for librados' 300 s. */
    rados_conf_set(*cluster, "client_mount_timeout", "10");
    rados_conf_set(*cluster, "rados_mon_op_timeout", "10");
    if (r >= 0)
        r = rados_connect(*cluster);
    if (r < 0) {
        fprintf(stderr, "cannot connect to the Ceph cluster of %s: %s\n",
                conf && *conf ? conf : "the default configuration", strerror(-r));
        rados_shutdown(*cluster);
        return -1;
    }
    return 0;
}

static int pool_stat(rados_t cluster, const char *pool, struct rbd_pool_stat *st)
{
    char cmd[512];
    json_t *q, *ls, *p;
    size_t i;
    int r = -1;

    snprintf(cmd, sizeof(cmd), "{\"prefix\": \"osd pool get-quota\", \"pool\": \"%s\", "
             "\"format\": \"json\"}", pool);
    if (!(q = mon_json(cluster, cmd)))
        return -1;
    ls = mon_json(cluster, "{\"prefix\": \"osd pool ls\", \"detail\": \"detail\", "
                  "\"format\": \"json\"}");
    st->quota = (uint64_t)json_integer_value(json_object_get(q, "quota_max_bytes"));
    st->used = (uint64_t)json_integer_value(json_object_get(q, "current_num_bytes"));
    json_array_foreach(ls, i, p) {
        const char *name = json_string_value(json_object_get(p, "pool_name"));
        const char *flags = json_string_value(json_object_get(p, "flags_names"));
        if (!name || strcmp(name, pool))
            continue;
        /* "hashpspool,full_quota": one of a comma-separated list. */
        char *list = xstrdup(flags ? flags : ""), *save = NULL;
        st->full = false;
        for (char *f = strtok_r(list, ",", &save); f; f = strtok_r(NULL, ",", &save))
            st->full |= strcmp(f, "full") == 0 || strcmp(f, "full_quota") == 0;
        free(list);
        r = 0;
    }
    if (r < 0 && ls)
        fprintf(stderr, "pool %s: not in osd pool ls\n", pool);
    json_decref(q);
    json_decref(ls);
    return r;
}

static void print_stat(const struct rbd_pool_stat *st)
{
    printf("{\"used\": %" PRIu64 ", \"quota\": %" PRIu64 ", \"full\": %s}\n", st->used,
           st->quota, st->full ? "true" : "false");
    fflush(stdout);
}

int rbd_pool_stat_main(int argc, char **argv)
{
    rados_t cluster;
    struct rbd_pool_stat st = {0};

    if (argc != 2) {
        fprintf(stderr, "Usage: thinblk-agent --rbd-pool-stat CONF POOL\n");
        return 2;
    }
    if (connect_cluster(argv[0], &cluster) < 0)
        return 1;
    int r = pool_stat(cluster, argv[1], &st);
    rados_shutdown(cluster);
    if (r < 0)
        return 1;
    print_stat(&st);
    return 0;
}

int rbd_extend_main(int argc, char **argv)
{
    const char *pool = argc == 3 ? argv[1] : NULL;
    rados_t cluster;
    struct rbd_pool_stat st = {0};
    uint64_t quota;
    char cmd[512];
    int ret = 1;

    if (argc != 3 || agent_parse_size(argv[2], &quota) < 0 || !quota) {
        fprintf(stderr, "Usage: thinblk-agent --extend-rbd CONF POOL QUOTA\n");
        return 2;
    }
    if (connect_cluster(argv[0], &cluster) < 0)
        return 1;
    if (pool_stat(cluster, pool, &st) < 0)
        goto out;
    /* Raise only: another agent (or a person) may have raised it further already. */
    if (st.quota && st.quota < quota) {
        snprintf(cmd, sizeof(cmd), "{\"prefix\": \"osd pool set-quota\", \"pool\": \"%s\", "
                 "\"field\": \"max_bytes\", \"val\": \"%" PRIu64 "\"}", pool, quota);
        json_t *o = mon_json(cluster, cmd);
        if (!o)
            goto out;
        json_decref(o);
        if (pool_stat(cluster, pool, &st) < 0)
            goto out;
        if (st.quota < quota) {
            fprintf(stderr, "pool %s: its quota is still %" PRIu64 " after set-quota\n",
                    pool, st.quota);
            goto out;
        }
    }
    /* The monitor clears the flag at its next look at the pool's usage; the agent kills us
     * after hook-timeout if it never does. */
    while (st.full) {
        if (st.quota && st.used >= st.quota) {
            fprintf(stderr, "pool %s: its usage %" PRIu64 " is past its new quota %" PRIu64
                    "; it stays full\n", pool, st.used, st.quota);
            goto out;
        }
        nanosleep(&(struct timespec){.tv_nsec = 100 * 1000 * 1000}, NULL);
        if (pool_stat(cluster, pool, &st) < 0)
            goto out;
    }
    ret = 0;
out:
    rados_shutdown(cluster);
    return ret;
}

#else

int rbd_pool_stat_main(int argc, char **argv)
{
    fprintf(stderr, "thinblk-agent was built without librados: no method rbd\n");
    return 1;
}

int rbd_extend_main(int argc, char **argv)
{
    return rbd_pool_stat_main(argc, argv);
}

#endif
