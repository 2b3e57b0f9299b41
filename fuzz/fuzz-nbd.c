/* libFuzzer target: a client's byte stream through thinblkd's NBD server.
 *
 * The input is what a client sends, from the client flags on: it goes through the real
 * handshake and transmission code (src/nbd) into a real device over a "file" node on a small
 * temporary file with io_uring, as in the daemon. The server has no listener: the client is
 * one end of a socketpair handed to nbd_server_add_client(). Two exports: "disk" (writable,
 * with qemu:allocation-depth) and "ro" (read-only), on the same device; the file is sparse
 * with data in its second quarter, so block status finds holes and data.
 *
 * The first byte picks how the rest is cut into writes (1..255 bytes, or 0: all at once),
 * so message boundaries across reads are covered. Between writes the loop runs and the
 * server's output is drained and dropped. Then the client shuts its side and the loop runs
 * until the connection is gone and the device idle: every request must come back.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz-block.h"
#include "block/graph.h"
#include "common/log.h"
#include "common/util.h"
#include "device/device.h"
#include "io/uring.h"
#include "loop/loop.h"
#include "nbd/server.h"
#include "runstate/runstate.h"

#define IMAGE_SIZE (1024 * 1024)
#define MAX_ROUNDS 10000

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static struct {
    struct fuzz_block fb;
    struct runstate *runstate;
    struct dev_context *devs;
    struct device *dev;
} g;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    struct error *err = NULL;
    char path[] = "/tmp/fuzz-nbd-XXXXXX";
    int fd;

    fuzz_block_init(&g.fb, "fuzz-nbd");
    g.runstate = runstate_new(g.fb.loop, RUN_STATE_RUNNING, fuzz_drop_event, NULL);
    g.devs = dev_context_new(g.fb.loop, g.runstate, fuzz_drop_device_event, NULL);

    fd = mkstemp(path);
    if (fd < 0 || ftruncate(fd, IMAGE_SIZE) < 0)
        fuzz_die("temporary image", NULL);
    /* Data between holes, for block status to find (SEEK_DATA/SEEK_HOLE). */
    static const char data[65536] = { 1 };
    if (pwrite(fd, data, sizeof(data), IMAGE_SIZE / 4) != (ssize_t)sizeof(data))
        fuzz_die("temporary image", NULL);
    close(fd);
    json_t *opts = json_pack("{s:s,s:s,s:s,s:s}", "driver", "file", "node-name", "f0",
                             "filename", path, "discard", "unmap");
    struct block_node *node = block_node_create(g.fb.graph, opts, &err);
    json_decref(opts);
    unlink(path);  /* the node keeps it open */
    if (!node)
        fuzz_die("block_node_create", err);
    g.dev = device_new(g.devs, "e0", node, DEV_ACTION_REPORT, DEV_ACTION_REPORT, NULL, &err);
    if (!g.dev)
        fuzz_die("device_new", err);
    return 0;
}

/* Read and drop whatever the server sent. */
static void drain(int fd)
{
    char buf[65536];

    while (read(fd, buf, sizeof(buf)) > 0)
        ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct nbd_server *s = nbd_server_new(g.fb.loop, 0);
    size_t chunk, pos = 0;
    int sv[2];

    if (nbd_server_add_export(s, "disk", "fuzzed", g.dev, true, true, NULL) < 0 ||
        nbd_server_add_export(s, "ro", NULL, g.dev, false, false, NULL) < 0)
        abort();
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        fuzz_die("socketpair", NULL);
    if (nbd_server_add_client(s, sv[0], NULL) < 0)
        abort();

    chunk = size > 0 && data[0] ? data[0] : SIZE_MAX;
    if (size > 0)
        data++, size--;
    for (unsigned rounds = 0; pos < size && rounds < MAX_ROUNDS; rounds++) {
        ssize_t n = send(sv[1], data + pos, MIN(chunk, size - pos), MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN)
            break;  /* the server closed the connection */
        if (n > 0)
            pos += (size_t)n;
        loop_run_once(g.fb.loop, 0);
        drain(sv[1]);
    }
    shutdown(sv[1], SHUT_WR);
    /* Until the connection is gone (it closes itself after end of input) and the device
     * has answered every request. */
    for (unsigned rounds = 0; rounds < MAX_ROUNDS; rounds++) {
        if (nbd_server_clients(s) == 0 && !device_busy(g.dev) &&
            uring_in_flight(g.fb.uring) == 0)
            break;
        loop_run_once(g.fb.loop, 10);
        drain(sv[1]);
    }
    nbd_server_stop(s);
    while (device_busy(g.dev) || uring_in_flight(g.fb.uring) > 0)
        loop_run_once(g.fb.loop, 10);
    loop_run_once(g.fb.loop, 0);  /* deferred calls of closed connections */
    close(sv[1]);
    return 0;
}
