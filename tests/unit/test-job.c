/* Unit tests of job/job.h: QEMU's job status sequence, its verb table and texts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/util.h"
#include "job/job.h"

/* Events as "ID:STATUS", in order. */
static char events[64][64];
static size_t nevents;

static void capture(void *opaque, const char *name, json_t *data)
{
    assert_string_equal(name, "JOB_STATUS_CHANGE");
    assert_int_equal(json_object_size(data), 2);
    assert_true(nevents < ARRAY_SIZE(events));
    snprintf(events[nevents++], sizeof(events[0]), "%s:%s",
             json_string_value(json_object_get(data, "id")),
             json_string_value(json_object_get(data, "status")));
    json_decref(data);
}

static void expect_events(const char *const *want, size_t n)
{
    assert_int_equal(nevents, n);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(events[i], want[i]);
    nevents = 0;
}

static int setup(void **state)
{
    nevents = 0;
    *state = job_list_new(capture, NULL);
    return 0;
}

static int teardown(void **state)
{
    job_list_free(*state);
    return 0;
}

static void expect_error(int r, struct error *err, const char *desc)
{
    assert_int_equal(r, -1);
    assert_non_null(err);
    assert_string_equal(err->desc, desc);
    error_free(err);
}

static void test_success_sequence(void **state)
{
    struct job_list *l = *state;
    struct job *job = job_new(l, "j1", "create", NULL);

    assert_non_null(job);
    job_start(job);
    assert_true(job_list_busy(l));
    expect_events((const char *[]){ "j1:created", "j1:running" }, 2);
    job_finish(job, NULL);
    assert_false(job_list_busy(l));
    expect_events((const char *[]){ "j1:waiting", "j1:pending", "j1:concluded" }, 3);
    assert_int_equal(job_status(job), JOB_STATUS_CONCLUDED);

    json_t *q = job_list_query(l);
    json_t *want = json_pack("[{s:s,s:s,s:s,s:i,s:i}]", "id", "j1", "type", "create",
                             "status", "concluded", "current-progress", 1,
                             "total-progress", 1);
    assert_true(json_equal(q, want));
    json_decref(q);
    json_decref(want);

    assert_int_equal(job_apply_verb(l, "j1", JOB_VERB_DISMISS, NULL), 0);
    expect_events((const char *[]){ "j1:null" }, 1);
    assert_null(job_find(l, "j1"));
}

static void test_failure_keeps_error(void **state)
{
    struct job_list *l = *state;
    struct job *job = job_new(l, "j2", "create", NULL);
    struct error *err = NULL;

    job_start(job);
    error_setg(&err, "it broke");
    job_finish(job, err);
    expect_events((const char *[]){ "j2:created", "j2:running", "j2:aborting",
                                    "j2:concluded" }, 4);
    json_t *q = job_list_query(l);
    assert_string_equal(json_string_value(json_object_get(json_array_get(q, 0), "error")),
                        "it broke");
    json_decref(q);
}

static void test_cancel_while_running(void **state)
{
    struct job_list *l = *state;
    struct job *job = job_new(l, "j3", "create", NULL);

    job_start(job);
    assert_int_equal(job_apply_verb(l, "j3", JOB_VERB_CANCEL, NULL), 0);
    assert_true(job_is_cancelled(job));
    assert_int_equal(job_apply_verb(l, "j3", JOB_VERB_CANCEL, NULL), 0);  /* again: fine */
    job_finish(job, NULL);
    expect_events((const char *[]){ "j3:created", "j3:running", "j3:aborting",
                                    "j3:concluded" }, 4);
    json_t *q = job_list_query(l);
    assert_string_equal(json_string_value(json_object_get(json_array_get(q, 0), "error")),
                        "Operation canceled");
    json_decref(q);
}

static void test_verbs_by_status(void **state)
{
    struct job_list *l = *state;
    struct job *job = job_new(l, "j4", "create", NULL);
    struct error *err = NULL;
    int r;

    job_start(job);
    r = job_apply_verb(l, "j4", JOB_VERB_DISMISS, &err);
    expect_error(r, err,
                 "Job 'j4' in state 'running' cannot accept command verb 'dismiss'");
    err = NULL;
    r = job_apply_verb(l, "j4", JOB_VERB_FINALIZE, &err);
    expect_error(r, err,
                 "Job 'j4' in state 'running' cannot accept command verb 'finalize'");
    err = NULL;
    r = job_apply_verb(l, "j4", JOB_VERB_COMPLETE, &err);
    expect_error(r, err,
                 "Job 'j4' in state 'running' cannot accept command verb 'complete'");
    job_finish(job, NULL);
    err = NULL;
    r = job_apply_verb(l, "j4", JOB_VERB_CANCEL, &err);
    expect_error(r, err,
                 "Job 'j4' in state 'concluded' cannot accept command verb 'cancel'");
    err = NULL;
    r = job_apply_verb(l, "nope", JOB_VERB_CANCEL, &err);
    expect_error(r, err, "Job not found");
}

static void test_ids(void **state)
{
    struct job_list *l = *state;
    struct error *err = NULL;
    int r;

    assert_non_null(job_new(l, "a.b-c_1", "create", NULL));
    r = job_new(l, "a.b-c_1", "create", &err) ? 0 : -1;
    expect_error(r, err,
                 "Job ID 'a.b-c_1' already in use");
    err = NULL;
    r = job_new(l, "1a", "create", &err) ? 0 : -1;
    expect_error(r, err, "Invalid job ID '1a'");
    err = NULL;
    r = job_new(l, "", "create", &err) ? 0 : -1;
    expect_error(r, err, "Invalid job ID ''");
    err = NULL;
    r = job_new(l, "a b", "create", &err) ? 0 : -1;
    expect_error(r, err, "Invalid job ID 'a b'");
}

static void test_query_newest_first(void **state)
{
    struct job_list *l = *state;

    job_new(l, "first", "create", NULL);
    job_new(l, "second", "create", NULL);
    json_t *q = job_list_query(l);
    assert_int_equal(json_array_size(q), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(q, 0), "id")),
                        "second");
    json_decref(q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_success_sequence, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failure_keeps_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_while_running, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verbs_by_status, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ids, setup, teardown),
        cmocka_unit_test_setup_teardown(test_query_newest_first, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
