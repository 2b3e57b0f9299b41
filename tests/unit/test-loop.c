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

static void test_runs_in_order_queued(void **state)
{
    struct loop *loop = loop_new();
    struct call c[5];
    int log[8];
    size_t n = 0;

    init_calls(c, 5, log, &n);
    for (int i = 0; i < 5; i++)
        loop_defer(loop, &c[i].d);
    assert_int_equal(n, 0);  /* never inside loop_defer() */
    assert_int_equal(loop_run_once(loop, 0), 0);
    assert_int_equal(n, 5);
    for (int i = 0; i < 5; i++)
        assert_int_equal(log[i], i);
    loop_free(loop);
}

static void test_runs_once(void **state)
{
    struct loop *loop = loop_new();
    struct call c[1];
    int log[4];
    size_t n = 0;

    init_calls(c, 1, log, &n);
    loop_defer(loop, &c[0].d);
    assert_true(loop_deferred_queued(&c[0].d));
    loop_run_deferred(loop);
    loop_run_deferred(loop);
    assert_int_equal(loop_run_once(loop, 0), 0);
    assert_int_equal(n, 1);
    assert_false(loop_deferred_queued(&c[0].d));
    loop_free(loop);
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
    struct loop *loop = loop_new();
    struct call c[2];
    int log[8];
    size_t n = 0;

    init_calls(c, 2, log, &n);
    c[0].requeue = 2;
    loop_defer(loop, &c[0].d);
    loop_defer(loop, &c[1].d);
    loop_run_deferred(loop);
    /* Queued again at the end, in the same round: after the calls already queued. */
    assert_int_equal(n, 4);
    assert_int_equal(log[0], 0);
    assert_int_equal(log[1], 1);
    assert_int_equal(log[2], 0);
    assert_int_equal(log[3], 0);
    loop_free(loop);
}

static void test_queued_from_a_call_runs_in_the_same_round(void **state)
{
    struct loop *loop = loop_new();
    struct call c[3];
    int log[8];
    size_t n = 0;

    init_calls(c, 3, log, &n);
    c[0].also = &c[2].d;
    loop_defer(loop, &c[0].d);
    loop_defer(loop, &c[1].d);
    loop_run_deferred(loop);
    assert_int_equal(n, 3);
    assert_int_equal(log[0], 0);
    assert_int_equal(log[1], 1);
    assert_int_equal(log[2], 2);
    loop_free(loop);
}

static void test_cancel(void **state)
{
    struct loop *loop = loop_new();
    struct call c[4];
    int log[8];
    size_t n = 0;

    init_calls(c, 4, log, &n);
    for (int i = 0; i < 4; i++)
        loop_defer(loop, &c[i].d);
    loop_cancel_deferred(loop, &c[3].d);  /* the last */
    loop_cancel_deferred(loop, &c[0].d);  /* the first */
    loop_cancel_deferred(loop, &c[0].d);  /* not queued: nothing */
    assert_false(loop_deferred_queued(&c[0].d));
    /* The queue stays whole: one queued after the cancelled last one still runs. */
    loop_defer(loop, &c[3].d);
    loop_run_deferred(loop);
    assert_int_equal(n, 3);
    assert_int_equal(log[0], 1);
    assert_int_equal(log[1], 2);
    assert_int_equal(log[2], 3);
    loop_free(loop);
}

static void test_cancel_the_only_one_then_queue(void **state)
{
    struct loop *loop = loop_new();
    struct call c[2];
    int log[4];
    size_t n = 0;

    init_calls(c, 2, log, &n);
    loop_defer(loop, &c[0].d);
    loop_cancel_deferred(loop, &c[0].d);
    loop_defer(loop, &c[1].d);
    loop_run_deferred(loop);
    assert_int_equal(n, 1);
    assert_int_equal(log[0], 1);
    loop_free(loop);
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
    struct loop *loop = loop_new();
    struct call c[3];
    int log[4];
    size_t n = 0;

    init_calls(c, 3, log, &n);
    c[0].d.fn = cancel_next;
    for (int i = 0; i < 3; i++)
        loop_defer(loop, &c[i].d);
    loop_run_deferred(loop);
    assert_int_equal(n, 2);
    assert_int_equal(log[0], 0);
    assert_int_equal(log[1], 2);
    loop_free(loop);
}

static void test_queued_twice_aborts(void **state)
{
    pid_t pid = fork();
    int status;

    assert_true(pid >= 0);
    if (pid == 0) {
        struct loop *loop = loop_new();
        struct call c[1];
        int log[2];
        size_t n = 0;

        init_calls(c, 1, log, &n);
        dup2(open("/dev/null", O_WRONLY), 2);  /* the check's message */
        loop_defer(loop, &c[0].d);
        loop_defer(loop, &c[0].d);
        _exit(0);  /* not reached: the second loop_defer() aborts */
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGABRT);
}

static void test_free_drops_queued_calls(void **state)
{
    struct loop *loop = loop_new();
    struct call c[2];
    int log[4];
    size_t n = 0;

    init_calls(c, 2, log, &n);
    loop_defer(loop, &c[0].d);
    loop_defer(loop, &c[1].d);
    loop_free(loop);
    assert_int_equal(n, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_runs_in_order_queued),
        cmocka_unit_test(test_runs_once),
        cmocka_unit_test(test_defer_does_not_allocate),
        cmocka_unit_test(test_requeue_from_its_own_call),
        cmocka_unit_test(test_queued_from_a_call_runs_in_the_same_round),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_cancel_the_only_one_then_queue),
        cmocka_unit_test(test_cancel_from_a_call),
        cmocka_unit_test(test_queued_twice_aborts),
        cmocka_unit_test(test_free_drops_queued_calls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
