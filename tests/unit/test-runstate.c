/* Unit tests of runstate/runstate.h: transitions, events and listeners, QEMU's semantics
 * (vm_stop(), vm_start(), qemu_system_vmstop_request()), over a real loop for deferred stops.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "common/util.h"
#include "loop/loop.h"
#include "common/qjson.h"
#include "runstate/runstate.h"

struct fx {
    struct loop *loop;
    struct runstate *rs;
    /* Events and listener calls in the order they happened: "STOP", "SHUTDOWN <data>",
     * "L1 running->paused" (listener 1 from running to paused; state as seen then). */
    char *log[32];
    size_t n;
    size_t nevents;
    bool busy;  /* the I/O's answer: I/O in flight */
    struct runstate_io io;
};

static void add_log(struct fx *f, char *s)
{
    assert_true(f->n < ARRAY_SIZE(f->log));
    f->log[f->n++] = s;
}

static void capture_event(void *opaque, const char *name, json_t *data)
{
    struct fx *f = opaque;

    f->nevents++;
    if (data) {
        struct buf out = { 0 };
        qjson_write(&out, data, false);
        buf_append(&out, "", 1);
        add_log(f, xasprintf("%s %s", name, out.data));
        buf_free(&out);
        json_decref(data);
    } else {
        add_log(f, xstrdup(name));
    }
}

static void listener(struct fx *f, const char *who, enum run_state old_state,
                     enum run_state new_state)
{
    /* The state is already the new one when listeners run. */
    assert_int_equal(runstate_get(f->rs), new_state);
    add_log(f, xasprintf("%s %s->%s", who, runstate_name(old_state), runstate_name(new_state)));
}

static void listener1(void *opaque, enum run_state old_state, enum run_state new_state)
{
    listener(opaque, "L1", old_state, new_state);
}

static void listener2(void *opaque, enum run_state old_state, enum run_state new_state)
{
    listener(opaque, "L2", old_state, new_state);
}

static bool io_busy(struct runstate_io *io)
{
    return container_of(io, struct fx, io)->busy;
}

static void io_released(struct runstate_io *io)
{
    add_log(container_of(io, struct fx, io), xstrdup("released"));
}

/* The machine's I/O is f's: busy while f->busy, logs "released". */
static void set_io(struct fx *f)
{
    f->io = (struct runstate_io){ io_busy, io_released };
    runstate_set_io(f->rs, &f->io);
}

static int setup_in(void **state, enum run_state initial)
{
    struct fx *f = xzalloc(sizeof(*f));

    f->loop = loop_new();
    assert_non_null(f->loop);
    f->rs = runstate_new(f->loop, initial, capture_event, f);
    runstate_add_listener(f->rs, listener1, f);
    *state = f;
    return 0;
}

static int setup_running(void **state)
{
    return setup_in(state, RUN_STATE_RUNNING);
}

static int setup_prelaunch(void **state)
{
    return setup_in(state, RUN_STATE_PRELAUNCH);
}

static int teardown(void **state)
{
    struct fx *f = *state;

    runstate_free(f->rs);  /* before its loop: it drops its deferred stop there */
    loop_free(f->loop);
    for (size_t i = 0; i < f->n; i++)
        free(f->log[i]);
    free(f);
    return 0;
}

#define F(state) ((struct fx *)*(state))

static void assert_log(struct fx *f, const char *const *expected, size_t n)
{
    for (size_t i = 0; i < f->n && i < n; i++)
        assert_string_equal(f->log[i], expected[i]);
    assert_int_equal(f->n, n);
}

#define ASSERT_LOG(f, ...)                                             \
    do {                                                               \
        static const char *const expected_[] = { __VA_ARGS__ };        \
        assert_log((f), expected_, ARRAY_SIZE(expected_));             \
    } while (0)

#define ASSERT_LOG_EMPTY(f) assert_int_equal((f)->n, 0)

/* Run the loop's deferred calls (one iteration, no waiting). */
static void run_loop(struct fx *f)
{
    assert_int_equal(loop_run_once(f->loop, 0), 0);
}

/* Get to io-error the way the I/O path does, and forget the log of it. */
static void enter_io_error(struct fx *f)
{
    runstate_request_stop(f->rs, RUN_STATE_IO_ERROR);
    run_loop(f);
    assert_int_equal(runstate_get(f->rs), RUN_STATE_IO_ERROR);
    for (size_t i = 0; i < f->n; i++)
        free(f->log[i]);
    f->n = 0;
    f->nevents = 0;
}

static void cont_ok(struct fx *f)
{
    struct error *err = NULL;

    assert_int_equal(runstate_cont(f->rs, &err), 0);
    assert_null(err);
}

/* ---- names and initial states ---- */

static void test_names(void **state)
{
    assert_string_equal(runstate_name(RUN_STATE_PRELAUNCH), "prelaunch");
    assert_string_equal(runstate_name(RUN_STATE_RUNNING), "running");
    assert_string_equal(runstate_name(RUN_STATE_PAUSED), "paused");
    assert_string_equal(runstate_name(RUN_STATE_IO_ERROR), "io-error");
    assert_string_equal(runstate_name(RUN_STATE_SHUTDOWN), "shutdown");
}

static void test_initial_prelaunch(void **state)
{
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_PRELAUNCH);
    assert_false(runstate_is_running(F(state)->rs));
    ASSERT_LOG_EMPTY(F(state));
}

static void test_initial_running(void **state)
{
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_RUNNING);
    assert_true(runstate_is_running(F(state)->rs));
    ASSERT_LOG_EMPTY(F(state));
}

/* ---- stop ---- */

static void test_stop_in_prelaunch_is_noop(void **state)
{
    runstate_stop(F(state)->rs);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_PRELAUNCH);
    ASSERT_LOG_EMPTY(F(state));
}

static void test_stop_when_running(void **state)
{
    runstate_stop(F(state)->rs);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_PAUSED);
    assert_false(runstate_is_running(F(state)->rs));
    /* QEMU's do_vm_stop(): state change (and its notifiers), then STOP. */
    ASSERT_LOG(F(state), "L1 running->paused", "STOP");
}

static void test_stop_when_paused_no_event(void **state)
{
    runstate_stop(F(state)->rs);
    runstate_stop(F(state)->rs);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_PAUSED);
    ASSERT_LOG(F(state), "L1 running->paused", "STOP");
}

static void test_stop_when_io_error_no_event(void **state)
{
    enter_io_error(F(state));
    runstate_stop(F(state)->rs);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_IO_ERROR);
    ASSERT_LOG_EMPTY(F(state));
}

/* ---- cont ---- */

static void test_cont_from_prelaunch(void **state)
{
    cont_ok(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_RUNNING);
    assert_true(runstate_is_running(F(state)->rs));
    /* QEMU's vm_start(): RESUME, then the state change. */
    ASSERT_LOG(F(state), "RESUME", "L1 prelaunch->running");
}

static void test_cont_from_paused(void **state)
{
    runstate_stop(F(state)->rs);
    cont_ok(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_RUNNING);
    ASSERT_LOG(F(state), "L1 running->paused", "STOP", "RESUME", "L1 paused->running");
}

static void test_cont_from_io_error(void **state)
{
    enter_io_error(F(state));
    cont_ok(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_RUNNING);
    ASSERT_LOG(F(state), "RESUME", "L1 io-error->running");
}

static void test_cont_when_running_no_event(void **state)
{
    cont_ok(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_RUNNING);
    ASSERT_LOG_EMPTY(F(state));
}

static void test_cont_after_stop_in_prelaunch(void **state)
{
    runstate_stop(F(state)->rs);
    cont_ok(F(state));
    ASSERT_LOG(F(state), "RESUME", "L1 prelaunch->running");
}

/* ---- deferred stop (I/O errors) ---- */

static void test_request_stop_is_deferred(void **state)
{
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_RUNNING);
    ASSERT_LOG_EMPTY(F(state));
}

static void test_request_stop_happens_in_loop(void **state)
{
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_IO_ERROR);
    assert_false(runstate_is_running(F(state)->rs));
    ASSERT_LOG(F(state), "L1 running->io-error", "STOP");
}

static void test_several_requests_one_stop(void **state)
{
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    run_loop(F(state));
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_IO_ERROR);
    ASSERT_LOG(F(state), "L1 running->io-error", "STOP");
}

static void test_cont_with_request_pending(void **state)
{
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    cont_ok(F(state));
    /* QEMU's vm_prepare_start(): the STOP/RESUME pair, no state change. */
    ASSERT_LOG(F(state), "STOP", "RESUME");
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_RUNNING);
    /* The request was dropped: the loop stops nothing. */
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_RUNNING);
    ASSERT_LOG(F(state), "STOP", "RESUME");
}

static void test_request_after_dropped_request(void **state)
{
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    cont_ok(F(state));
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_IO_ERROR);
    ASSERT_LOG(F(state), "STOP", "RESUME", "L1 running->io-error", "STOP");
}

static void test_stop_command_before_deferred_stop(void **state)
{
    /* The stop command wins; the deferred stop then finds nothing running (QEMU stays
     * paused, not io-error). */
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    runstate_stop(F(state)->rs);
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_PAUSED);
    ASSERT_LOG(F(state), "L1 running->paused", "STOP");
}

static void test_request_when_paused_does_nothing(void **state)
{
    runstate_stop(F(state)->rs);
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_PAUSED);
    ASSERT_LOG(F(state), "L1 running->paused", "STOP");
}

static void test_request_in_prelaunch_does_nothing(void **state)
{
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_PRELAUNCH);
    ASSERT_LOG_EMPTY(F(state));
}

static void test_request_again_after_cont_from_io_error(void **state)
{
    enter_io_error(F(state));
    cont_ok(F(state));
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_IO_ERROR);
    ASSERT_LOG(F(state), "RESUME", "L1 io-error->running", "L1 running->io-error", "STOP");
}

/* ---- shutdown ---- */

static void test_shutdown_qmp_quit(void **state)
{
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_SHUTDOWN);
    assert_false(runstate_is_running(F(state)->rs));
    ASSERT_LOG(F(state), "SHUTDOWN {\"guest\": false, \"reason\": \"host-qmp-quit\"}",
               "L1 running->shutdown");
}

static void test_shutdown_signal(void **state)
{
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_SIGNAL);
    ASSERT_LOG(F(state), "SHUTDOWN {\"guest\": false, \"reason\": \"host-signal\"}",
               "L1 running->shutdown");
}

static void test_second_shutdown_is_noop(void **state)
{
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_SIGNAL);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_SHUTDOWN);
    ASSERT_LOG(F(state), "SHUTDOWN {\"guest\": false, \"reason\": \"host-qmp-quit\"}",
               "L1 running->shutdown");
}

static void test_shutdown_from_paused_no_stop(void **state)
{
    runstate_stop(F(state)->rs);
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    ASSERT_LOG(F(state), "L1 running->paused", "STOP",
               "SHUTDOWN {\"guest\": false, \"reason\": \"host-qmp-quit\"}",
               "L1 paused->shutdown");
}

static void test_shutdown_from_prelaunch(void **state)
{
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    ASSERT_LOG(F(state), "SHUTDOWN {\"guest\": false, \"reason\": \"host-qmp-quit\"}",
               "L1 prelaunch->shutdown");
}

static void test_cont_after_shutdown_fails(void **state)
{
    struct error *err = NULL;

    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    assert_int_equal(runstate_cont(F(state)->rs, &err), -1);
    assert_non_null(err);
    assert_int_equal(err->cls, ERROR_CLASS_GENERIC);
    assert_string_equal(err->desc, "Resetting the Virtual Machine is required");
    error_free(err);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_SHUTDOWN);
    assert_int_equal(F(state)->nevents, 1);
}

static void test_cont_after_shutdown_null_errp(void **state)
{
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    assert_int_equal(runstate_cont(F(state)->rs, NULL), -1);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_SHUTDOWN);
}

static void test_stop_after_shutdown_is_noop(void **state)
{
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    runstate_stop(F(state)->rs);
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_SHUTDOWN);
    assert_int_equal(F(state)->nevents, 1);
}

static void test_shutdown_drops_pending_request(void **state)
{
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_SHUTDOWN);
    ASSERT_LOG(F(state), "SHUTDOWN {\"guest\": false, \"reason\": \"host-qmp-quit\"}",
               "L1 running->shutdown");
}

static void test_request_after_shutdown_does_nothing(void **state)
{
    runstate_shutdown(F(state)->rs, RUNSTATE_SHUTDOWN_HOST_QMP_QUIT);
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    run_loop(F(state));
    assert_int_equal(runstate_get(F(state)->rs), RUN_STATE_SHUTDOWN);
    assert_int_equal(F(state)->nevents, 1);
}

/* ---- listeners ---- */

static void test_listeners_in_order_added(void **state)
{
    runstate_add_listener(F(state)->rs, listener2, F(state));
    runstate_stop(F(state)->rs);
    ASSERT_LOG(F(state), "L1 running->paused", "L2 running->paused", "STOP");
}

static void test_listeners_not_called_without_change(void **state)
{
    runstate_add_listener(F(state)->rs, listener2, F(state));
    cont_ok(F(state));
    runstate_request_stop(F(state)->rs, RUN_STATE_IO_ERROR);
    cont_ok(F(state));
    run_loop(F(state));
    ASSERT_LOG(F(state), "STOP", "RESUME");
}

static void test_remove_listener(void **state)
{
    runstate_add_listener(F(state)->rs, listener2, F(state));
    runstate_remove_listener(F(state)->rs, listener1, F(state));
    runstate_stop(F(state)->rs);
    ASSERT_LOG(F(state), "L2 running->paused", "STOP");
}

static void test_remove_listener_other_opaque_kept(void **state)
{
    /* Only the exact (fn, opaque) pair goes. */
    runstate_remove_listener(F(state)->rs, listener1, NULL);
    runstate_stop(F(state)->rs);
    ASSERT_LOG(F(state), "L1 running->paused", "STOP");
}

/* ---- since ---- */

static void test_since_set_at_creation(void **state)
{
    uint64_t before = now_realtime_ns();
    struct runstate *rs = runstate_new(F(state)->loop, RUN_STATE_PRELAUNCH, capture_event,
                                       F(state));
    uint64_t after = now_realtime_ns();

    assert_true(runstate_since_ns(rs) >= before);
    assert_true(runstate_since_ns(rs) <= after);
    runstate_free(rs);
}

static void test_since_updated_on_change(void **state)
{
    struct timespec ts = { 0, 2000000 };
    uint64_t created = runstate_since_ns(F(state)->rs);

    nanosleep(&ts, NULL);
    uint64_t before = now_realtime_ns();
    runstate_stop(F(state)->rs);
    uint64_t after = now_realtime_ns();
    assert_true(runstate_since_ns(F(state)->rs) >= before);
    assert_true(runstate_since_ns(F(state)->rs) <= after);
    assert_true(runstate_since_ns(F(state)->rs) > created);
}

static void test_since_kept_without_change(void **state)
{
    uint64_t created = runstate_since_ns(F(state)->rs);
    struct timespec ts = { 0, 2000000 };

    nanosleep(&ts, NULL);
    runstate_stop(F(state)->rs);  /* prelaunch: no change */
    cont_ok(F(state));
    uint64_t resumed = runstate_since_ns(F(state)->rs);
    assert_true(resumed > created);
    nanosleep(&ts, NULL);
    cont_ok(F(state));  /* running already: no change */
    assert_true(runstate_since_ns(F(state)->rs) == resumed);
}

#define T(fn, setup) cmocka_unit_test_setup_teardown(fn, setup, teardown)

/* ---- the stop waits for the I/O in flight (runstate_set_io()) ---- */

static void test_stop_waits_while_busy(void **state)
{
    struct fx *f = F(state);

    set_io(f);
    f->busy = true;
    runstate_request_stop(f->rs, RUN_STATE_IO_ERROR);
    run_loop(f);
    /* Still running, nothing sent; the stop is pending (devices hold new requests). */
    assert_int_equal(runstate_get(f->rs), RUN_STATE_RUNNING);
    assert_true(runstate_stop_pending(f->rs));
    ASSERT_LOG_EMPTY(f);
    runstate_poke(f->rs);  /* still busy: nothing */
    run_loop(f);
    ASSERT_LOG_EMPTY(f);
    f->busy = false;
    runstate_poke(f->rs);
    runstate_poke(f->rs);  /* twice: one stop */
    run_loop(f);
    assert_int_equal(runstate_get(f->rs), RUN_STATE_IO_ERROR);
    assert_false(runstate_stop_pending(f->rs));
    ASSERT_LOG(f, "L1 running->io-error", "STOP");
}

static void test_stop_not_busy_is_immediate(void **state)
{
    struct fx *f = F(state);

    set_io(f);
    runstate_request_stop(f->rs, RUN_STATE_IO_ERROR);
    run_loop(f);
    assert_int_equal(runstate_get(f->rs), RUN_STATE_IO_ERROR);
    ASSERT_LOG(f, "L1 running->io-error", "STOP");
}

static void test_cont_while_waiting_releases(void **state)
{
    struct fx *f = F(state);

    set_io(f);
    f->busy = true;
    runstate_request_stop(f->rs, RUN_STATE_IO_ERROR);
    run_loop(f);
    cont_ok(f);
    /* QEMU's pair, no state change, and what was held for the stop is released. */
    ASSERT_LOG(f, "STOP", "RESUME", "released");
    assert_false(runstate_stop_pending(f->rs));
    f->busy = false;
    runstate_poke(f->rs);
    run_loop(f);
    assert_int_equal(runstate_get(f->rs), RUN_STATE_RUNNING);
    ASSERT_LOG(f, "STOP", "RESUME", "released");
}

static void test_stop_command_while_waiting(void **state)
{
    struct fx *f = F(state);

    /* A person's stop wins over the pending one, as before the deferred stop ran. */
    set_io(f);
    f->busy = true;
    runstate_request_stop(f->rs, RUN_STATE_IO_ERROR);
    run_loop(f);
    runstate_stop(f->rs);
    assert_false(runstate_stop_pending(f->rs));
    f->busy = false;
    runstate_poke(f->rs);
    run_loop(f);
    assert_int_equal(runstate_get(f->rs), RUN_STATE_PAUSED);
    ASSERT_LOG(f, "L1 running->paused", "STOP");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_names, setup_running),
        T(test_initial_prelaunch, setup_prelaunch),
        T(test_initial_running, setup_running),
        T(test_stop_in_prelaunch_is_noop, setup_prelaunch),
        T(test_stop_when_running, setup_running),
        T(test_stop_when_paused_no_event, setup_running),
        T(test_stop_when_io_error_no_event, setup_running),
        T(test_cont_from_prelaunch, setup_prelaunch),
        T(test_cont_from_paused, setup_running),
        T(test_cont_from_io_error, setup_running),
        T(test_cont_when_running_no_event, setup_running),
        T(test_cont_after_stop_in_prelaunch, setup_prelaunch),
        T(test_request_stop_is_deferred, setup_running),
        T(test_request_stop_happens_in_loop, setup_running),
        T(test_several_requests_one_stop, setup_running),
        T(test_cont_with_request_pending, setup_running),
        T(test_stop_waits_while_busy, setup_running),
        T(test_stop_not_busy_is_immediate, setup_running),
        T(test_cont_while_waiting_releases, setup_running),
        T(test_stop_command_while_waiting, setup_running),
        T(test_request_after_dropped_request, setup_running),
        T(test_stop_command_before_deferred_stop, setup_running),
        T(test_request_when_paused_does_nothing, setup_running),
        T(test_request_in_prelaunch_does_nothing, setup_prelaunch),
        T(test_request_again_after_cont_from_io_error, setup_running),
        T(test_shutdown_qmp_quit, setup_running),
        T(test_shutdown_signal, setup_running),
        T(test_second_shutdown_is_noop, setup_running),
        T(test_shutdown_from_paused_no_stop, setup_running),
        T(test_shutdown_from_prelaunch, setup_prelaunch),
        T(test_cont_after_shutdown_fails, setup_running),
        T(test_cont_after_shutdown_null_errp, setup_running),
        T(test_stop_after_shutdown_is_noop, setup_running),
        T(test_shutdown_drops_pending_request, setup_running),
        T(test_request_after_shutdown_does_nothing, setup_running),
        T(test_listeners_in_order_added, setup_running),
        T(test_listeners_not_called_without_change, setup_running),
        T(test_remove_listener, setup_running),
        T(test_remove_listener_other_opaque_kept, setup_running),
        T(test_since_set_at_creation, setup_running),
        T(test_since_updated_on_change, setup_running),
        T(test_since_kept_without_change, setup_prelaunch),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
