#include "loop/loop.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "common/util.h"

struct fd_reg {
    loop_fd_fn *fn;
    void *opaque;
    uint32_t gen;   /* bumped on every add, so a stale epoll event is recognised */
    bool active;
};

struct timer {
    struct timer *next;
    uint64_t id;
    uint64_t deadline_ns;
    loop_fn *fn;
    void *opaque;
};

struct deferred {
    struct deferred *next;
    loop_fn *fn;
    void *opaque;
};

struct loop {
    int epfd;
    struct fd_reg *fds;     /* indexed by fd */
    int nfds;
    struct timer *timers;   /* sorted by deadline */
    uint64_t next_timer_id;
    struct deferred *defer_head, **defer_tail;
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
    loop->defer_tail = &loop->defer_head;
    return loop;
}

void loop_free(struct loop *loop)
{
    if (!loop)
        return;
    while (loop->timers) {
        struct timer *t = loop->timers;
        loop->timers = t->next;
        free(t);
    }
    while (loop->defer_head) {
        struct deferred *d = loop->defer_head;
        loop->defer_head = d->next;
        free(d);
    }
    close(loop->epfd);
    free(loop->fds);
    free(loop);
}

static uint32_t to_epoll(unsigned events)
{
    return (events & LOOP_READ ? EPOLLIN : 0) | (events & LOOP_WRITE ? EPOLLOUT : 0);
}

int loop_add_fd(struct loop *loop, int fd, unsigned events, loop_fd_fn *fn, void *opaque)
{
    if (fd < 0) {
        errno = EBADF;
        return -1;
    }
    if (fd >= loop->nfds) {
        int n = MAX(fd + 1, loop->nfds * 2);
        loop->fds = xrealloc(loop->fds, sizeof(*loop->fds) * n);
        memset(loop->fds + loop->nfds, 0, sizeof(*loop->fds) * (n - loop->nfds));
        loop->nfds = n;
    }
    struct fd_reg *reg = &loop->fds[fd];
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
    if (fd < 0 || fd >= loop->nfds || !loop->fds[fd].active) {
        errno = ENOENT;
        return -1;
    }
    struct epoll_event ev = {.events = to_epoll(events),
                             .data.u64 = (uint64_t)loop->fds[fd].gen << 32 | (uint32_t)fd};
    return epoll_ctl(loop->epfd, EPOLL_CTL_MOD, fd, &ev);
}

void loop_del_fd(struct loop *loop, int fd)
{
    if (fd < 0 || fd >= loop->nfds || !loop->fds[fd].active)
        return;
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, fd, NULL);
    loop->fds[fd].active = false;
}

uint64_t loop_add_timer(struct loop *loop, uint64_t delay_ns, loop_fn *fn, void *opaque)
{
    struct timer *t = xzalloc(sizeof(*t));
    t->id = ++loop->next_timer_id;
    t->deadline_ns = now_monotonic_ns() + delay_ns;
    t->fn = fn;
    t->opaque = opaque;
    struct timer **p = &loop->timers;
    while (*p && (*p)->deadline_ns <= t->deadline_ns)
        p = &(*p)->next;
    t->next = *p;
    *p = t;
    return t->id;
}

void loop_del_timer(struct loop *loop, uint64_t id)
{
    for (struct timer **p = &loop->timers; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            struct timer *t = *p;
            *p = t->next;
            free(t);
            return;
        }
    }
}

void loop_defer(struct loop *loop, loop_fn *fn, void *opaque)
{
    struct deferred *d = xmalloc(sizeof(*d));
    d->next = NULL;
    d->fn = fn;
    d->opaque = opaque;
    *loop->defer_tail = d;
    loop->defer_tail = &d->next;
}

static void run_deferred(struct loop *loop)
{
    /* Calls deferred by these calls run too, in order, before we wait again. */
    while (loop->defer_head) {
        struct deferred *d = loop->defer_head;
        loop->defer_head = d->next;
        if (!loop->defer_head)
            loop->defer_tail = &loop->defer_head;
        d->fn(loop, d->opaque);
        free(d);
    }
}

static void run_timers(struct loop *loop)
{
    uint64_t now = now_monotonic_ns();
    while (loop->timers && loop->timers->deadline_ns <= now) {
        struct timer *t = loop->timers;
        loop->timers = t->next;
        loop_fn *fn = t->fn;
        void *opaque = t->opaque;
        free(t);
        fn(loop, opaque);
        run_deferred(loop);
    }
}

static int wait_timeout_ms(struct loop *loop, int timeout_ms)
{
    if (loop->defer_head)
        return 0;
    if (!loop->timers)
        return timeout_ms;
    uint64_t now = now_monotonic_ns();
    uint64_t deadline = loop->timers->deadline_ns;
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
        if (fd >= loop->nfds)
            continue;
        struct fd_reg *reg = &loop->fds[fd];
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

void loop_run_deferred(struct loop *loop) { run_deferred(loop); }
