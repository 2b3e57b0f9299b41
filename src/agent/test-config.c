/* Unit tests of thinblk-agent's configuration: sizes, durations, the file format and its
 * errors (each with its file and line), the checks and the method defaults. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "agent/config.h"

static void test_sizes(void **state)
{
    uint64_t v;

    assert_int_equal(agent_parse_size("4096", &v), 0);
    assert_int_equal(v, 4096);
    assert_int_equal(agent_parse_size("512M", &v), 0);
    assert_int_equal(v, 512 * MiB);
    assert_int_equal(agent_parse_size("2.5GiB", &v), 0);
    assert_int_equal(v, 2560 * MiB);
    assert_int_equal(agent_parse_size("1 g", &v), 0);
    assert_int_equal(v, GiB);
    assert_int_equal(agent_parse_size("4k", &v), 0);
    assert_int_equal(v, 4096);
    assert_int_equal(agent_parse_size("", &v), -1);
    assert_int_equal(agent_parse_size("-1M", &v), -1);
    assert_int_equal(agent_parse_size("1X", &v), -1);
    assert_int_equal(agent_parse_size("0.3", &v), -1);  /* a fraction of a byte */
    assert_int_equal(agent_parse_size("99999999T", &v), -1);
}

static void test_durations(void **state)
{
    uint64_t ns;

    assert_int_equal(agent_parse_duration("2", &ns), 0);
    assert_int_equal(ns, 2000000000ull);
    assert_int_equal(agent_parse_duration("500ms", &ns), 0);
    assert_int_equal(ns, 500000000ull);
    assert_int_equal(agent_parse_duration("1.5s", &ns), 0);
    assert_int_equal(ns, 1500000000ull);
    assert_int_equal(agent_parse_duration("1m", &ns), 0);
    assert_int_equal(ns, 60000000000ull);
    assert_int_equal(agent_parse_duration("1h", &ns), -1);
    assert_int_equal(agent_parse_duration("s", &ns), -1);
}

static void test_fmt_size(void **state)
{
    char b[32];

    assert_string_equal(agent_fmt_size(576 * MiB, b, sizeof(b)), "576 MiB");
    assert_string_equal(agent_fmt_size(2 * GiB, b, sizeof(b)), "2 GiB");
    assert_string_equal(agent_fmt_size(4096, b, sizeof(b)), "4 KiB");
    assert_string_equal(agent_fmt_size(1000, b, sizeof(b)), "1000 B");
    assert_string_equal(agent_fmt_size(MiB + 512 * 1024, b, sizeof(b)), "1.5 MiB");
}

static const char full[] =
    "# a comment\n"
    "; another\n"
    "[agent]\n"
    "poll-interval = 500ms\n"
    "resume-on-other-errors = yes\n"
    "\n"
    "[daemon vm1]\n"
    "socket = /run/thinblk/vm1.sock   # a comment\n"
    "[daemon vm2]\n"
    "socket=/run/thinblk/vm2.sock\n"
    "[disk a]\n"
    "daemon = vm1\n"
    "device = disk0\n"
    "method = loop\n"
    "chunk = 64M\n"
    "[disk b]\n"
    "daemon = vm2\n"
    "node = proto0\n"
    "hook = /usr/libexec/extend\n"
    "cap = 120%\n";

static void test_file(void **state)
{
    struct agent_config cfg;
    struct error *err = NULL;

    agent_config_init(&cfg);
    assert_int_equal(agent_config_parse(&cfg, "t.conf", full, &err), 0);
    assert_int_equal(agent_config_check(&cfg, &err), 0);
    assert_int_equal(cfg.poll_ns, 500000000ull);
    assert_true(cfg.resume_on_other_errors);
    assert_int_equal(cfg.daemons.len, 2);
    assert_string_equal(cfg.daemons.ptr[0].socket, "/run/thinblk/vm1.sock");
    assert_string_equal(cfg.daemons.ptr[1].socket, "/run/thinblk/vm2.sock");
    assert_int_equal(cfg.disks.len, 2);
    assert_int_equal(cfg.disks.ptr[0].method, AGENT_METHOD_LOOP);
    assert_int_equal(cfg.disks.ptr[0].chunk, 64 * MiB);
    assert_int_equal(cfg.disks.ptr[0].watermark, AGENT_LOOP_WATERMARK);
    /* A hook without a method means method hook, with the hook defaults. */
    assert_int_equal(cfg.disks.ptr[1].method, AGENT_METHOD_HOOK);
    assert_int_equal(cfg.disks.ptr[1].chunk, AGENT_HOOK_CHUNK);
    assert_int_equal(cfg.disks.ptr[1].cap_percent, 120);
    assert_string_equal(cfg.disks.ptr[1].node, "proto0");
    agent_config_free(&cfg);
}

static void expect_error(const char *text, const char *want)
{
    struct agent_config cfg;
    struct error *err = NULL;

    agent_config_init(&cfg);
    if (agent_config_parse(&cfg, "t.conf", text, &err) == 0)
        assert_int_equal(agent_config_check(&cfg, &err), -1);
    assert_non_null(err);
    assert_string_equal(err->desc, want);
    error_free(err);
    agent_config_free(&cfg);
}

static void test_errors(void **state)
{
    expect_error("socket = x\n", "t.conf:1: 'socket' outside any section");
    expect_error("[daemon a]\nsocket = x\n[daemon a]\n", "t.conf:3: daemon 'a' is defined twice");
    expect_error("[box a]\n", "t.conf:1: unknown section '[box]': expected [agent], "
                 "[daemon NAME] or [disk NAME]");
    expect_error("[disk]\n", "t.conf:1: [disk] needs a name of letters, digits, '-', '_' and '.'");
    expect_error("[disk a\n", "t.conf:1: a section header ends with ']'");
    expect_error("[daemon a]\nsocket\n", "t.conf:2: expected 'key = value' or a [section]");
    expect_error("[daemon a]\nsocket =\n", "t.conf:2: 'socket' has no value");
    expect_error("[daemon a]\nport = 1\n", "t.conf:2: unknown key 'port' in a [daemon] section");
    expect_error("[agent]\npoll-interval = soon\n", "t.conf:2: 'poll-interval' expects a "
                 "duration of at least 1ms, such as '2s' or '500ms', not 'soon'");
    expect_error("[disk a]\nchunk = 1.5M\n", "t.conf:2: 'chunk' must be a whole number of "
                 "MiB, not '1.5M'");
    expect_error("[disk a]\nchunk = lots\n", "t.conf:2: 'chunk' expects a size such as '512M' "
                 "or '2G', not 'lots'");
    expect_error("[disk a]\nmethod = dd\n", "t.conf:2: 'method' expects 'loop', 'hook' or 'rbd', not "
                 "'dd'");
    expect_error("[disk a]\ncap = 50%\n", "t.conf:2: 'cap' as a percentage of the virtual size "
                 "must be 100% to 1000%, not '50%'");
    expect_error("[daemon a]\n", "daemon 'a' has no socket");
    expect_error("[daemon a]\nsocket = s\n[disk d]\ndaemon = b\ndevice = x\nmethod = loop\n",
                 "disk 'd': no such daemon");
    expect_error("[daemon a]\nsocket = s\n[disk d]\nmethod = loop\n",
                 "disk 'd': give either device or node");
    expect_error("[daemon a]\nsocket = s\n[disk d]\ndevice = x\n",
                 "disk 'd': no method (method = loop, hook or rbd)");
    expect_error("[daemon a]\nsocket = s\n[disk d]\ndevice = x\nmethod = hook\n",
                 "disk 'd': method hook needs hook = PROGRAM");
    expect_error("[daemon a]\nsocket = s\n[disk d]\ndevice = x\nmethod = rbd\ncap = 200%\n",
                 "disk 'd': method rbd needs cap = SIZE (the largest quota the agent may set "
                 "on the pool)");
    expect_error("[daemon a]\nsocket = s\n[disk d]\ndevice = x\nmethod = rbd\ncap = 1G\n"
                 "hook = /bin/true\n", "disk 'd': a hook is for method hook, not rbd");
}

/* method rbd: its own defaults, and a cap given as a size. */
static void test_rbd(void **state)
{
    struct agent_config cfg;
    struct error *err = NULL;

    agent_config_init(&cfg);
    assert_int_equal(agent_config_parse(&cfg, "t.conf", "[daemon a]\nsocket = s\n[disk d]\n"
                                        "device = x\nmethod = rbd\ncap = 100G\n", &err), 0);
    assert_int_equal(agent_config_check(&cfg, &err), 0);
    assert_int_equal(cfg.disks.ptr[0].method, AGENT_METHOD_RBD);
    assert_int_equal(cfg.disks.ptr[0].chunk, AGENT_RBD_CHUNK);
    assert_int_equal(cfg.disks.ptr[0].watermark, AGENT_RBD_WATERMARK);
    assert_int_equal(cfg.disks.ptr[0].cap, 100 * GiB);
    agent_config_free(&cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_durations),
        cmocka_unit_test(test_fmt_size),
        cmocka_unit_test(test_file),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_rbd),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
