/* thinblk-agent's extension methods: a hook program or the built-in loop method, each run as
 * a child process watched through a pidfd, so nothing slow runs on the loop.
 *
 * The bottom of the agent with monitor.h: it knows nothing of disks or daemons beyond the
 * strings of a struct extend_request. A job reports its end to whoever started it through the
 * extend_done_fn it was given. Loop thread only.
 */
#ifndef THINBLK_AGENT_EXTEND_H
#define THINBLK_AGENT_EXTEND_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "agent/config.h"
#include "common/error.h"

struct loop;
struct extend_job;

/* What to extend and how. The strings are borrowed for the extend_start() call only. */
struct extend_request {
    enum agent_method method;
    const char *hook;         /* AGENT_METHOD_HOOK: the program */
    const char *self_exe;     /* AGENT_METHOD_LOOP: this program, run with --extend-loop */
    const char *volume;       /* AGENT_METHOD_RBD: the pool */
    const char *conf;         /* AGENT_METHOD_RBD: the Ceph configuration file, or NULL */
    uint64_t from, to;        /* bytes (AGENT_METHOD_RBD: the pool's max_bytes quota) */
    const char *reason;       /* for the log and THINBLK_REASON */
    uint64_t timeout_ns;      /* kill the child (its process group) after this */
    /* Who asks, for the log and the hook's THINBLK_* environment: */
    const char *disk;
    const char *daemon;
    const char *socket;
    const char *device;
    const char *node;         /* the protocol node, or "" */
    uint64_t virtual_size;
};

/* A job ended: ok, or failed with why (a message, borrowed); new_size is what the volume is
 * now, duration_ns how long it took from the spawn. The job is already freed when this is
 * called. */
typedef void extend_done_fn(void *opaque, bool ok, uint64_t new_size, uint64_t duration_ns,
                            const char *why);

/* Start the extension req asks for on loop; done(opaque, ...) is called once when it ends,
 * unless abandoned. Returns the job (owned by extend.c until done or extend_abandon()), or
 * NULL with *errp set if it could not even start (done is not called). Never blocks. */
struct extend_job *extend_start(struct loop *loop, const struct extend_request *req,
                                extend_done_fn *done, void *opaque, struct error **errp);
/* Forget a job whose requester goes away: frees it, the child is left to finish and done is
 * never called. */
void extend_abandon(struct extend_job *job);
/* The volume's current size: a block device's capacity or a regular file's size. Returns 0
 * or -1 (errno) if the volume is not a local path or cannot be read. Does not block for long
 * (a stat or an ioctl). */
int extend_volume_size(const char *volume, uint64_t *size);
/* Spawn argv[0] (a path) with env, standard input from /dev/null, standard output and error
 * to out_fd (-1: both to our standard error, the log), in its own process group. Returns the pid, or -1
 * with *errp set. Never blocks. */
pid_t extend_spawn(char *const argv[], char **env, int out_fd, struct error **errp);
/* The built-in loop method, run in the child: grow the loop device's backing file to size
 * and have the kernel take the new capacity. Returns 0, or -1 with a message on stderr.
 * Blocks (it is the child's whole work). */
int extend_loop_device(const char *dev, uint64_t size);

#endif
