/* The file driver's vectored reads and writes (block/file.c): each segment gets its own
 * bytes, a transfer the kernel completes short goes on from the right segment and offset,
 * and a read past the end of the file is zero-filled across segments. A real file, a real
 * io_uring and the loop. */
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "block/graph.h"
#include "common/util.h"
#include "io/uring.h"
#include "loop/loop.h"

struct fixture {
    struct loop *loop;
    struct uring *uring;
    struct block_graph *g;
    struct block_node *n;
    char path[64];
    int fd;             /* the same file, for the test's own reads and writes */
};

static void drop_event(void *opaque, const char *name, json_t *data)
{
    json_decref(data);
}

static int setup(void **state)
{
    struct fixture *f = xzalloc(sizeof(*f));
    struct error *err = NULL;

    f->loop = loop_new();
    f->uring = uring_new(f->loop, 64, &err);
    assert_non_null(f->uring);
    f->g = block_graph_new(f->loop, f->uring, drop_event, NULL);
    strcpy(f->path, "/tmp/test-file-iov.XXXXXX");
    f->fd = mkstemp(f->path);
    assert_true(f->fd >= 0);
    assert_int_equal(ftruncate(f->fd, 65536), 0);
    json_t *opts = json_pack("{s:s,s:s,s:s}", "driver", "file", "node-name", "f0",
                             "filename", f->path);
    f->n = block_node_create(f->g, opts, &err);
    json_decref(opts);
    if (!f->n)
        fail_msg("block_node_create: %s", err->desc);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;

    block_graph_free(f->g);
    uring_free(f->uring);
    loop_free(f->loop);
    close(f->fd);
    unlink(f->path);
    free(f);
    return 0;
}

static void done(struct block_req *req, int ret)
{
    *(int *)req->opaque = ret;
}

/* Submit op over iov[0..n) at offset, run the loop until it is done; returns its ret. */
static int run(struct fixture *f, enum block_op op, uint64_t offset, const struct iovec *iov,
               unsigned n)
{
    int ret = 1;
    uint64_t len = 0;

    for (unsigned i = 0; i < n; i++)
        len += iov[i].iov_len;
    struct block_req req = {.op = op, .offset = offset, .len = len, .iov = iov, .niov = n,
                            .done = done, .opaque = &ret};
    node_submit(f->n, &req);
    assert_int_equal(ret, 1);  /* never inside node_submit() */
    for (int i = 0; i < 1000 && ret == 1; i++)
        assert_int_equal(loop_run_once(f->loop, 100), 0);
    return ret;
}

static void fill_random(char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (char)random();
}

/* Segments of 4096, 512 and 1536 bytes, lying in memory in reverse order: written, they are
 * on the file in vector order; read back in two other segments, the same bytes. */
static void test_write_then_read_back(void **state)
{
    struct fixture *f = *state;
    char mem[6144], data[6144], back[6144] = {0}, file[6144];

    fill_random(mem, sizeof(mem));
    const struct iovec w[] = { {mem + 2048, 4096}, {mem + 1536, 512}, {mem, 1536} };
    memcpy(data, w[0].iov_base, 4096);
    memcpy(data + 4096, w[1].iov_base, 512);
    memcpy(data + 4608, w[2].iov_base, 1536);
    assert_int_equal(run(f, BLOCK_OP_WRITE, 8192, w, 3), 0);
    assert_int_equal(pread(f->fd, file, sizeof(file), 8192), sizeof(file));
    assert_memory_equal(file, data, sizeof(data));

    const struct iovec r[] = { {back + 5000, 1144}, {back, 5000} };
    assert_int_equal(run(f, BLOCK_OP_READ, 8192, r, 2), 0);
    assert_memory_equal(back + 5000, data, 1144);
    assert_memory_equal(back, data + 1144, 5000);
}

/* A read across the end of the file: the kernel stops short inside the second of four
 * segments, the next read returns 0, and the rest (the tail of that segment and the two
 * after it) reads as zeroes. */
static void test_read_past_eof_zero_fills_across_segments(void **state)
{
    struct fixture *f = *state;
    char data[3000], seg[4][2048];

    fill_random(data, sizeof(data));
    assert_int_equal(ftruncate(f->fd, sizeof(data)), 0);
    assert_int_equal(pwrite(f->fd, data, sizeof(data), 0), sizeof(data));
    memset(seg, 0xff, sizeof(seg));
    const struct iovec r[] = { {seg[2], 2048}, {seg[0], 2048}, {seg[3], 2048}, {seg[1], 2048} };
    assert_int_equal(run(f, BLOCK_OP_READ, 0, r, 4), 0);
    assert_memory_equal(seg[2], data, 2048);
    assert_memory_equal(seg[0], data + 2048, 952);
    for (size_t i = 952; i < 2048; i++)
        assert_int_equal(seg[0][i], 0);
    for (size_t i = 0; i < 2048; i++)
        assert_true(seg[3][i] == 0 && seg[1][i] == 0);
}

/* More segments than one readv or writev takes (IOV_MAX): the transfer goes on from the
 * first segment not sent. */
static void test_more_segments_than_iov_max(void **state)
{
    struct fixture *f = *state;
    enum { N = IOV_MAX + 500, SEG = 8 };
    char *mem = xmalloc(N * SEG), *back = xzalloc(N * SEG), *file = xmalloc(N * SEG);
    struct iovec *v = xmalloc(N * sizeof(*v));

    fill_random(mem, N * SEG);
    for (unsigned i = 0; i < N; i++)
        v[i] = (struct iovec){mem + i * SEG, SEG};
    assert_int_equal(run(f, BLOCK_OP_WRITE, 0, v, N), 0);
    assert_int_equal(pread(f->fd, file, N * SEG, 0), N * SEG);
    assert_memory_equal(file, mem, N * SEG);
    for (unsigned i = 0; i < N; i++)
        v[i] = (struct iovec){back + i * SEG, SEG};
    assert_int_equal(run(f, BLOCK_OP_READ, 0, v, N), 0);
    assert_memory_equal(back, mem, N * SEG);
    free(mem);
    free(back);
    free(file);
    free(v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_write_then_read_back, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_past_eof_zero_fills_across_segments, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_more_segments_than_iov_max, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
