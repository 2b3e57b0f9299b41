/* The event loop's deferred calls: order, no allocation, re-queueing, cancelling. */
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/util.h"
#include "loop/loop.h"

/* A deferred call that records its number in the log. */
struct call {
    struct loop_deferred d;
    int id;
    int *log;
    size_t *n;
    int requeue;               /* times left to queue itself again from its own call */
    struct loop_deferred *also; /* queued from inside the call, if set */
};

static void record(struct loop *loop, void *opaque)
{
    struct call *c = opaque;

    assert_false(loop_deferred_queued(&c->d));  /* off the queue before its call */
    c->log[(*c->n)++] = c->id;
    if (c->requeue > 0) {
        c->requeue--;
        loop_defer(loop, &c->d);
    }
    if (c->also)
        loop_defer(loop, c->also);
}

static void init_calls(struct call *c, size_t n, int *log, size_t *len)
{
    for (size_t i = 0; i < n; i++) {
        c[i] = (struct call){.id = (int)i, .log = log, .n = len};
        c[i].d = LOOP_DEFERRED_INIT(record, &c[i]);
    }
}

/* A loop and five calls, c[i] logging i into log[0..n). */
struct fx {
    struct loop *loop;
    struct call c[5];
    int log[16];
    size_t n;
};

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));

    f->loop = loop_new();
    init_calls(f->c, 5, f->log, &f->n);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;

    loop_free(f->loop);
    free(f);
    return 0;
}

/* The log so far, as a number (digits). */
static int logged(const struct fx *f)
{
    int d = 0;

    for (size_t i = 0; i < f->n; i++)
        d = d * 10 + f->log[i];
    return d;
}

static void test_runs_in_order_queued(void **state)
{
    struct fx *f = *state;

    for (int i = 0; i < 5; i++)
        loop_defer(f->loop, &f->c[i].d);
    assert_int_equal(f->n, 0);  /* never inside loop_defer() */
    assert_int_equal(loop_run_once(f->loop, 0), 0);
    assert_int_equal(logged(f), 1234);  /* 01234 */
    assert_int_equal(f->n, 5);
}

static void test_runs_once(void **state)
{
    struct fx *f = *state;

    loop_defer(f->loop, &f->c[1].d);
    assert_true(loop_deferred_queued(&f->c[1].d));
    loop_run_deferred(f->loop);
    loop_run_deferred(f->loop);
    assert_int_equal(loop_run_once(f->loop, 0), 0);
    assert_int_equal(logged(f), 1);
    assert_false(loop_deferred_queued(&f->c[1].d));
}

/* Counts allocations made while it is set; the loop must make none to defer a call. The
 * test is linked with --wrap=malloc,--wrap=calloc (tests/unit/meson.build). */
static size_t allocations;
static int counting;

void *__real_malloc(size_t size);
void *__wrap_malloc(size_t size);
void *__real_calloc(size_t n, size_t size);
void *__wrap_calloc(size_t n, size_t size);

void *__wrap_malloc(size_t size)
{
    if (counting)
        allocations++;
    return __real_malloc(size);
}

void *__wrap_calloc(size_t n, size_t size)
{
    if (counting)
        allocations++;
    return __real_calloc(n, size);
}

static void test_defer_does_not_allocate(void **state)
{
    enum { N = 1000 };
    struct loop *loop = loop_new();
    struct call *c = calloc(N, sizeof(*c));
    int *log = calloc(N, sizeof(*log));
    size_t n = 0;

    init_calls(c, N, log, &n);
    counting = 1;
    free(xmalloc(1));  /* the wrap is in effect for the library: this one is counted */
    counting = 0;
    assert_int_equal(allocations, 1);
    allocations = 0;
    counting = 1;
    for (int i = 0; i < N; i++)
        loop_defer(loop, &c[i].d);
    loop_run_deferred(loop);
    counting = 0;
    assert_int_equal(allocations, 0);
    assert_int_equal(n, N);
    free(c);
    free(log);
    loop_free(loop);
}

static void test_requeue_from_its_own_call(void **state)
{
    struct fx *f = *state;

    f->c[1].requeue = 2;
    loop_defer(f->loop, &f->c[1].d);
    loop_defer(f->loop, &f->c[2].d);
    loop_run_deferred(f->loop);
    /* Queued again at the end, in the same round: after the calls already queued. */
    assert_int_equal(logged(f), 1211);
}

static void test_queued_from_a_call_runs_in_the_same_round(void **state)
{
    struct fx *f = *state;

    f->c[1].also = &f->c[3].d;
    loop_defer(f->loop, &f->c[1].d);
    loop_defer(f->loop, &f->c[2].d);
    loop_run_deferred(f->loop);
    assert_int_equal(logged(f), 123);
}

static void test_cancel(void **state)
{
    struct fx *f = *state;

    for (int i = 1; i < 5; i++)
        loop_defer(f->loop, &f->c[i].d);
    loop_cancel_deferred(f->loop, &f->c[4].d);  /* the last */
    loop_cancel_deferred(f->loop, &f->c[1].d);  /* the first */
    loop_cancel_deferred(f->loop, &f->c[1].d);  /* not queued: nothing */
    assert_false(loop_deferred_queued(&f->c[1].d));
    /* The queue stays whole: one queued after the cancelled last one still runs. */
    loop_defer(f->loop, &f->c[4].d);
    loop_run_deferred(f->loop);
    assert_int_equal(logged(f), 234);
}

static void test_cancel_the_only_one_then_queue(void **state)
{
    struct fx *f = *state;

    loop_defer(f->loop, &f->c[1].d);
    loop_cancel_deferred(f->loop, &f->c[1].d);
    loop_defer(f->loop, &f->c[2].d);
    loop_run_deferred(f->loop);
    assert_int_equal(logged(f), 2);
}

/* A call that cancels the one queued after it (its object going away). */
static void cancel_next(struct loop *loop, void *opaque)
{
    struct call *c = opaque;

    c->log[(*c->n)++] = c->id;
    loop_cancel_deferred(loop, &c[1].d);
}

static void test_cancel_from_a_call(void **state)
{
    struct fx *f = *state;

    f->c[1].d.fn = cancel_next;
    for (int i = 1; i < 4; i++)
        loop_defer(f->loop, &f->c[i].d);
    loop_run_deferred(f->loop);
    assert_int_equal(logged(f), 13);
}

static void test_queued_twice_aborts(void **state)
{
    struct fx *f = *state;
    pid_t pid = fork();
    int status;

    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(open("/dev/null", O_WRONLY), 2);  /* the check's message */
        loop_defer(f->loop, &f->c[0].d);
        loop_defer(f->loop, &f->c[0].d);
        _exit(0);  /* not reached: the second loop_defer() aborts */
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGABRT);
}

static void test_free_drops_queued_calls(void **state)
{
    struct fx *f = *state;

    loop_defer(f->loop, &f->c[0].d);
    loop_defer(f->loop, &f->c[1].d);
    loop_free(f->loop);
    f->loop = loop_new();  /* for teardown */
    assert_int_equal(f->n, 0);
}

#define WITH_FX(test) cmocka_unit_test_setup_teardown(test, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        WITH_FX(test_runs_in_order_queued),
        WITH_FX(test_runs_once),
        cmocka_unit_test(test_defer_does_not_allocate),  /* its own loop */
        WITH_FX(test_requeue_from_its_own_call),
        WITH_FX(test_queued_from_a_call_runs_in_the_same_round),
        WITH_FX(test_cancel),
        WITH_FX(test_cancel_the_only_one_then_queue),
        WITH_FX(test_cancel_from_a_call),
        WITH_FX(test_queued_twice_aborts),
        WITH_FX(test_free_drops_queued_calls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
