#include "loop/loop.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "common/assert.h"
#include "common/list.h"
#include "common/util.h"
#include "common/vector.h"

struct fd_reg {
    loop_fd_fn *fn;
    void *opaque;
    uint32_t gen;   /* bumped on every add, so a stale epoll event is recognised */
    bool active;
};

DEFINE_VECTOR_TYPE(fd_reg_vector, struct fd_reg)

struct timer {
    struct timer *next;
    uint64_t id;
    uint64_t deadline_ns;
    loop_fn *fn;
    void *opaque;
};

DEFINE_QUEUE_TYPE(timer_queue, struct timer, next)
DEFINE_QUEUE_TYPE(deferred_queue, struct loop_deferred, next)

struct loop {
    int epfd;
    fd_reg_vector fds;      /* indexed by fd */
    timer_queue timers;     /* sorted by deadline */
    uint64_t next_timer_id;
    deferred_queue deferred;  /* the callers' nodes, in the order queued */
    bool running_deferred;    /* inside run_deferred() */
    bool stop;
};

struct loop *loop_new(void)
{
    struct loop *loop = xzalloc(sizeof(*loop));
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (loop->epfd < 0) {
        free(loop);
        return NULL;
    }
    return loop;
}

void loop_free(struct loop *loop)
{
    struct timer *t;

    if (!loop)
        return;
    while ((t = timer_queue_pop(&loop->timers)))
        free(t);
    close(loop->epfd);
    fd_reg_vector_reset(&loop->fds);
    free(loop);
}

static uint32_t to_epoll(unsigned events)
{
    return (events & LOOP_READ ? EPOLLIN : 0) | (events & LOOP_WRITE ? EPOLLOUT : 0) |
           (events & LOOP_PEER_SHUTDOWN ? EPOLLRDHUP : 0);
}

int loop_add_fd(struct loop *loop, int fd, unsigned events, loop_fd_fn *fn, void *opaque)
{
    ASSERT(fd >= 0);
    ASSERT(fn != NULL);
    if ((size_t)fd >= loop->fds.len)
        fd_reg_vector_grow_to(&loop->fds, (size_t)fd + 1);
    struct fd_reg *reg = &loop->fds.ptr[fd];
    if (reg->active) {
        errno = EEXIST;
        return -1;
    }
    uint32_t gen = reg->gen + 1;
    struct epoll_event ev = {.events = to_epoll(events),
                             .data.u64 = (uint64_t)gen << 32 | (uint32_t)fd};
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return -1;
    *reg = (struct fd_reg){.fn = fn, .opaque = opaque, .gen = gen, .active = true};
    return 0;
}

int loop_mod_fd(struct loop *loop, int fd, unsigned events)
{
    if (fd < 0 || (size_t)fd >= loop->fds.len || !loop->fds.ptr[fd].active) {
        errno = ENOENT;
        return -1;
    }
    struct epoll_event ev = {.events = to_epoll(events),
                             .data.u64 = (uint64_t)loop->fds.ptr[fd].gen << 32 | (uint32_t)fd};
    return epoll_ctl(loop->epfd, EPOLL_CTL_MOD, fd, &ev);
}

void loop_del_fd(struct loop *loop, int fd)
{
    if (fd < 0 || (size_t)fd >= loop->fds.len || !loop->fds.ptr[fd].active)
        return;
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, fd, NULL);
    loop->fds.ptr[fd].active = false;
}

uint64_t loop_add_timer(struct loop *loop, uint64_t delay_ns, loop_fn *fn, void *opaque)
{
    struct timer *t = xzalloc(sizeof(*t)), *after = NULL;

    ASSERT(fn != NULL);
    t->id = ++loop->next_timer_id;
    t->deadline_ns = now_monotonic_ns() + delay_ns;
    t->fn = fn;
    t->opaque = opaque;
    /* After the timers due no later: equal deadlines fire in the order they were added. */
    for (struct timer *x = loop->timers.head; x && x->deadline_ns <= t->deadline_ns; x = x->next)
        after = x;
    timer_queue_insert_after(&loop->timers, after, t);
    return t->id;
}

void loop_del_timer(struct loop *loop, uint64_t id)
{
    for (struct timer *t = loop->timers.head; t; t = t->next) {
        if (t->id == id) {
            timer_queue_remove(&loop->timers, t);
            free(t);
            return;
        }
    }
}

void loop_defer(struct loop *loop, struct loop_deferred *d)
{
    ASSERT(d->fn != NULL);
    ASSERT(!d->queued);  /* queued twice would make the queue a cycle */
    d->queued = true;
    deferred_queue_push(&loop->deferred, d);
}

void loop_cancel_deferred(struct loop *loop, struct loop_deferred *d)
{
    if (!d->queued)
        return;
    ASSERT(deferred_queue_remove(&loop->deferred, d));  /* else queued on another loop */
    d->queued = false;
}

static void run_deferred(struct loop *loop)
{
    struct loop_deferred *d;

    /* Calls deferred by these calls run too, in order, before we wait again. d is off the
     * queue before its call: the call may queue it again, or free it. */
    loop->running_deferred = true;
    while ((d = deferred_queue_pop(&loop->deferred))) {
        d->queued = false;
        d->fn(loop, d->opaque);
    }
    loop->running_deferred = false;
}

static void run_timers(struct loop *loop)
{
    uint64_t now = now_monotonic_ns();
    while (loop->timers.head && loop->timers.head->deadline_ns <= now) {
        struct timer *t = timer_queue_pop(&loop->timers);
        loop_fn *fn = t->fn;
        void *opaque = t->opaque;
        free(t);
        fn(loop, opaque);
        run_deferred(loop);
    }
}

static int wait_timeout_ms(struct loop *loop, int timeout_ms)
{
    if (!deferred_queue_empty(&loop->deferred))
        return 0;
    if (timer_queue_empty(&loop->timers))
        return timeout_ms;
    uint64_t now = now_monotonic_ns();
    uint64_t deadline = loop->timers.head->deadline_ns;
    int t = deadline <= now ? 0 : (int)MIN((deadline - now + 999999) / 1000000, 60000u);
    return timeout_ms < 0 ? t : MIN(t, timeout_ms);
}

int loop_run_once(struct loop *loop, int timeout_ms)
{
    struct epoll_event evs[64];
    run_deferred(loop);
    int n = epoll_wait(loop->epfd, evs, ARRAY_SIZE(evs), wait_timeout_ms(loop, timeout_ms));
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        return -1;
    }
    for (int i = 0; i < n; i++) {
        int fd = (int)(uint32_t)evs[i].data.u64;
        uint32_t gen = (uint32_t)(evs[i].data.u64 >> 32);
        if ((size_t)fd >= loop->fds.len)
            continue;
        struct fd_reg *reg = &loop->fds.ptr[fd];
        if (!reg->active || reg->gen != gen)
            continue; /* removed (or replaced) by an earlier callback in this batch */
        unsigned events = 0;
        if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
            events |= LOOP_READ;
        if (evs[i].events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
            events |= LOOP_WRITE;
        reg->fn(loop, fd, events, reg->opaque);
        run_deferred(loop);
    }
    run_timers(loop);
    return 0;
}

int loop_run(struct loop *loop)
{
    loop->stop = false;
    while (!loop->stop) {
        if (loop_run_once(loop, -1) < 0)
            return -1;
    }
    run_deferred(loop);
    return 0;
}

void loop_stop(struct loop *loop) { loop->stop = true; }

void loop_run_deferred(struct loop *loop)
{
    /* From inside a deferred call, the calls after it would run on its stack. */
    ASSERT(!loop->running_deferred);
    run_deferred(loop);
}
