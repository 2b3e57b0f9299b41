/* io_uring on the event loop: completions are delivered once each, in any number. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/util.h"
#include "io/uring.h"
#include "loop/loop.h"

struct counted {
    struct uring_op op;
    unsigned *done;
    int res;
};

static void count_done(struct uring_op *op, int res)
{
    struct counted *c = container_of(op, struct counted, op);

    (*c->done)++;
    c->res = res;
}

/* One byte, read by every operation of these tests: an operation that completes at once,
 * with res 1. */
static int one_byte_file(void)
{
    int fd = memfd_create("test-uring", MFD_CLOEXEC);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, "x", 1), 1);
    return fd;
}

static char sink[1];

static void queue_read(struct uring *u, struct uring_op *op, int fd)
{
    uring_read(u, op, fd, sink, 1, 0);
}

/* Run the loop until want completions came, or give up after a bounded number of turns. */
static void run_until(struct loop *loop, unsigned *done, unsigned want)
{
    for (int i = 0; i < 1000 && *done < want; i++)
        assert_int_equal(loop_run_once(loop, 100), 0);
}

static void test_completes_later_not_inline(void **state)
{
    struct loop *loop = loop_new();
    struct uring *u = uring_new(loop, 8, NULL);
    unsigned done = 0;
    struct counted c = { .op.done = count_done, .done = &done, .res = -1 };
    int fd = one_byte_file();

    assert_non_null(u);
    queue_read(u, &c.op, fd);
    assert_int_equal(done, 0);  /* never inside the call that queued it */
    assert_int_equal(uring_in_flight(u), 1);
    run_until(loop, &done, 1);
    assert_int_equal(done, 1);
    assert_int_equal(c.res, 1);
    assert_int_equal(uring_in_flight(u), 0);
    uring_free(u);
    loop_free(loop);
    close(fd);
}

static void test_more_completions_than_the_queue_holds(void **state)
{
    /* 8 submission slots, 32 completion slots: 1000 operations queued in one iteration fill
     * the submission queue many times over and overflow the completion queue. Every one
     * must complete exactly once (overflowed completions do not signal the eventfd). */
    enum { N = 1000 };
    struct loop *loop = loop_new();
    struct uring *u = uring_new(loop, 8, NULL);
    struct counted *ops = xzalloc(N * sizeof(*ops));
    unsigned done = 0;
    int fd = one_byte_file();

    assert_non_null(u);
    for (int i = 0; i < N; i++) {
        ops[i] = (struct counted){ .op.done = count_done, .done = &done, .res = -1 };
        queue_read(u, &ops[i].op, fd);
    }
    run_until(loop, &done, N);
    assert_int_equal(done, N);
    for (int i = 0; i < N; i++)
        assert_int_equal(ops[i].res, 1);
    assert_int_equal(uring_in_flight(u), 0);
    free(ops);
    uring_free(u);
    loop_free(loop);
    close(fd);
}

struct chain {
    struct uring *u;
    struct counted *ops;
    unsigned next, n, fanout;
    int fd;
    unsigned done;
};

static struct chain *the_chain;

/* Each completion queues fanout more, from inside the completion: with a tiny ring the
 * submission queue fills while completions are being reaped. */
static void chain_done(struct uring_op *op, int res)
{
    struct chain *ch = the_chain;

    count_done(op, res);
    for (unsigned i = 0; i < ch->fanout && ch->next < ch->n; i++) {
        struct counted *c = &ch->ops[ch->next++];
        *c = (struct counted){ .op.done = chain_done, .done = &ch->done, .res = -1 };
        queue_read(ch->u, &c->op, ch->fd);
    }
}

static void test_operations_queued_from_completions_with_a_full_ring(void **state)
{
    enum { N = 20000 };
    struct loop *loop = loop_new();
    struct chain ch = { .u = uring_new(loop, 2, NULL), .n = N, .fanout = 7,
                        .fd = one_byte_file() };

    assert_non_null(ch.u);
    ch.ops = xzalloc(N * sizeof(*ch.ops));
    the_chain = &ch;
    for (; ch.next < 4; ch.next++) {
        ch.ops[ch.next] = (struct counted){ .op.done = chain_done, .done = &ch.done, .res = -1 };
        queue_read(ch.u, &ch.ops[ch.next].op, ch.fd);
    }
    for (int i = 0; i < 100000 && ch.done < N; i++)
        assert_int_equal(loop_run_once(loop, 100), 0);
    assert_int_equal(ch.next, N);
    assert_int_equal(ch.done, N);
    for (int i = 0; i < N; i++)
        assert_int_equal(ch.ops[i].res, 1);
    assert_int_equal(uring_in_flight(ch.u), 0);
    free(ch.ops);
    uring_free(ch.u);
    loop_free(loop);
    close(ch.fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_completes_later_not_inline),
        cmocka_unit_test(test_more_completions_than_the_queue_holds),
        cmocka_unit_test(test_operations_queued_from_completions_with_a_full_ring),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
