/* libFuzzer target: the qcow2 driver opening, reading and writing a fuzzed image.
 *
 * The input is the whole image file. It is written to a temporary file in /tmp, opened
 * through blockdev-add's path (block_node_create: a "qcow2" node over an inline "file" node)
 * with a real loop and io_uring, as in the daemon. Writable when the input's last byte is
 * odd or the header's dirty bit is set, so that the open-time check (qcow2-check.c: every
 * reference counted, leaks reclaimed, a dirty image repaired) and the allocator run on it,
 * with discard=unmap; read-only otherwise. If it opens, a few reads go through node_submit()
 * (the start, the middle and the end of the virtual disk), and writable, a write, a
 * write-zeroes with unmap and a discard at the same places and a flush, one after the other;
 * the loop runs until each is done. Then the node is deleted (a clean close: the clusters
 * reserved ahead given back). Errors are fine; crashes, leaks, hangs and sanitizer reports
 * are not. The seeds include images with each kind of bad metadata
 * (fuzz/make-qcow2-seeds.py).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz-block.h"
#include "block/graph.h"
#include "common/log.h"
#include "common/util.h"
#include "io/uring.h"
#include "loop/loop.h"

#define READ_LEN (64 * 1024)
#define NREADS 3
#define MAX_ROUNDS 100000

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static struct {
    struct fuzz_block fb;
} g;

struct rd {
    struct block_req req;
    bool done;
};

static const enum block_op write_ops[] = {BLOCK_OP_WRITE, BLOCK_OP_WRITE_ZEROES,
                                          BLOCK_OP_DISCARD};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_block_init(&g.fb, "fuzz-qcow2");
    return 0;
}

static void read_done(struct block_req *req, int ret)
{
    container_of(req, struct rd, req)->done = true;
}

/* Requests of op at the start, the middle and the end; the loop runs until they are done. */
static void run_some(struct block_node *n, enum block_op op)
{
    uint64_t align = n->alignment ? n->alignment : 1, len, offs[NREADS];
    struct rd rds[NREADS];
    void *bufs[NREADS];

    len = MIN(n->size, (uint64_t)READ_LEN) / align * align;
    if (len == 0)
        return;
    offs[0] = 0;
    offs[1] = (n->size / 2) / align * align;
    offs[2] = (n->size - len) / align * align;
    for (int i = 0; i < NREADS; i++) {
        uint64_t l = MIN(len, (n->size - offs[i]) / align * align);
        if (posix_memalign(&bufs[i], 4096, READ_LEN) != 0)
            abort();
        memset(bufs[i], 0x5a, READ_LEN);
        rds[i] = (struct rd){.req = {.op = op, .offset = offs[i], .len = l,
                                     .flags = op == BLOCK_OP_WRITE_ZEROES ? BLOCK_REQ_MAY_UNMAP
                                                                          : 0,
                                     .buf = op == BLOCK_OP_READ || op == BLOCK_OP_WRITE
                                                ? bufs[i] : NULL,
                                     .done = read_done}};
        if (l == 0)
            rds[i].done = true;
        else
            node_submit(n, &rds[i].req);
    }
    for (unsigned rounds = 0;; rounds++) {
        bool all = true;
        for (int i = 0; i < NREADS; i++)
            all = all && rds[i].done;
        if (all && uring_in_flight(g.fb.uring) == 0)
            break;
        if (rounds == MAX_ROUNDS) {
            fprintf(stderr, "fuzz-qcow2: requests did not complete\n");
            abort();
        }
        loop_run_once(g.fb.loop, 10);
    }
    for (int i = 0; i < NREADS; i++)
        free(bufs[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* tmpfs where there is one: the writable runs' open-time check and close fdatasync(). */
    char path[] = "/dev/shm/fuzz-qcow2-XXXXXX";
    struct error *err = NULL;
    int fd = access("/dev/shm", W_OK) == 0 ? mkstemp(path) : -1;
    size_t done = 0;

    if (fd < 0) {
        memcpy(path, "/tmp/fuzz-qcow2-XXXXXX", sizeof("/tmp/fuzz-qcow2-XXXXXX"));
        fd = mkstemp(path);
    }
    if (fd < 0)
        fuzz_die("mkstemp", NULL);
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0)
            fuzz_die("write", NULL);
        done += (size_t)w;
    }
    close(fd);

    /* backing=null: the header's backing file name is still parsed and checked, but a fuzzed
     * name must not make the target open arbitrary host files (a FIFO would block it). */
    int ro = !((size >= 80 && (data[79] & 1)) || (size && (data[size - 1] & 1)));
    json_t *opts = json_pack("{s:s,s:s,s:b,s:s,s:n,s:{s:s,s:s,s:b}}", "driver", "qcow2",
                             "node-name", "q0", "read-only", ro, "discard", "unmap", "backing",
                             "file", "driver", "file", "filename", path, "read-only", ro);
    struct block_node *n = block_node_create(g.fb.graph, opts, &err);
    json_decref(opts);
    unlink(path);  /* the file node keeps it open; open() has read the metadata */
    if (!n) {
        error_free(err);
        return 0;
    }
    run_some(n, BLOCK_OP_READ);
    for (size_t i = 0; !ro && i < sizeof(write_ops) / sizeof(write_ops[0]); i++)
        run_some(n, write_ops[i]);
    if (block_node_delete(g.fb.graph, "q0", &err) < 0)
        fuzz_die("block_node_delete", err);
    loop_run_once(g.fb.loop, 0);
    return 0;
}
