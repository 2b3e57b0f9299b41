/* Blocking work off the loop thread. See offload.h. */
#include "job/offload.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/util.h"
#include "loop/loop.h"

struct offload {
    struct loop *loop;
    pthread_t thread;
    int efd;  /* the thread writes it when work is done */
    void (*work)(void *opaque);
    void (*done)(void *opaque);
    void *opaque;
};

static void *thread_main(void *arg)
{
    struct offload *o = arg;
    uint64_t one = 1;

    o->work(o->opaque);
    while (write(o->efd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
    return NULL;
}

static void on_done(struct loop *loop, int fd, unsigned events, void *arg)
{
    struct offload *o = arg;
    uint64_t v;

    if (read(fd, &v, sizeof(v)) < 0 && errno == EAGAIN)
        return;  /* woken for nothing */
    loop_del_fd(loop, fd);
    pthread_join(o->thread, NULL);  /* it has written: it is returning */
    close(fd);
    o->done(o->opaque);
    free(o);
}

int offload_run(struct loop *loop, void (*work)(void *opaque), void (*done)(void *opaque),
                void *opaque, struct error **errp)
{
    struct offload *o = xzalloc(sizeof(*o));
    int r;

    o->loop = loop;
    o->work = work;
    o->done = done;
    o->opaque = opaque;
    o->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (o->efd < 0) {
        error_setg_errno(errp, errno, "Could not create an eventfd");
        free(o);
        return -1;
    }
    if (loop_add_fd(loop, o->efd, LOOP_READ, on_done, o) < 0) {
        error_setg_errno(errp, errno, "Could not watch an eventfd");
        goto fail;
    }
    r = pthread_create(&o->thread, NULL, thread_main, o);
    if (r != 0) {
        loop_del_fd(loop, o->efd);
        error_setg_errno(errp, r, "Could not start a thread");
        goto fail;
    }
    return 0;
fail:
    close(o->efd);
    free(o);
    return -1;
}
