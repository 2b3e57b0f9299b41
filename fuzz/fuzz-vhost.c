/* libFuzzer target: a vhost-user frontend and its guest, played by fuzz bytes against
 * thinblkd's vhost-user-blk export (src/vhost-user-blk: message.c, memory.c, virtqueue.c,
 * blk.c) over a real device on a "file" node on a 1 MiB temporary file with io_uring.
 *
 * Two exports are made once per process, each on a Unix socket in a temporary directory:
 * "vdisk" (writable) and "vro" (read-only), 2 queues each, logical block size 512. Each input
 * connects to one of them (a real accept() through the export's listener), so no hook into
 * the module is needed. The guest's memory is a memfd of GUEST_SIZE bytes, mapped here too
 * and zeroed at the start of each input: the harness writes descriptors, rings and requests
 * into it directly, and hands dups of its fd to the export with SET_MEM_TABLE.
 *
 * Input: one byte of set-up, then operations until the input ends.
 *   set-up byte: bit 0 connects to "vro" instead of "vdisk"; bit 7 sends each message in two
 *     pieces, the first of bits 1..6 + 1 bytes (1..64), with the loop run in between, so that
 *     headers, payloads and fds split across reads (two pieces, not many: a loop run costs
 *     a handful of syscalls, and libFuzzer would favour the slowest inputs).
 *   0x00 MSG   fdsel:u8 request:u32 flags:u32 size:u32 payload[min(size, left)]
 *              a raw vhost-user message (little-endian); fdsel (mod 8) picks the ancillary
 *              fds: 0 none, 1 the guest memfd, 2 kick eventfd of queue 0, 3 of queue 1,
 *              4 a fresh eventfd, 5 the memfd twice, 6 nine memfds (more than a message may
 *              carry), 7 a pipe (not mappable).
 *   0x01 MEM   off:u16 len:u8 bytes[len]   write guest memory at off mod GUEST_SIZE (clipped)
 *   0x02 KICK  q:u8                        signal queue q mod 2's kick eventfd
 *   0x03 RUN                               run the loop until the device is idle
 *   0x04 SETUP sel:u8 lognum:u8            a whole well-formed set-up of queue sel&1:
 *              GET_FEATURES, SET_FEATURES (the offer, without INDIRECT if sel&2, without
 *              EVENT_IDX if sel&4, without PROTOCOL_FEATURES if sel&8), protocol features
 *              and SET_VRING_ENABLE if negotiated, GET_INFLIGHT_FD and SET_INFLIGHT_FD with
 *              the harness's inflight region if sel&16, SET_MEM_TABLE (gpa 0, qva QVA_BASE),
 *              SET_VRING_NUM 1 << (lognum mod 7), SET_VRING_BASE 0, SET_VRING_ADDR (the
 *              layout below), SET_VRING_CALL, SET_VRING_ERR and SET_VRING_KICK
 *   0x05 DESC  i:u8 desc[16]               write descriptor i mod 64 of queue 0's table
 *   0x06 AVAIL q:u8 head:u16               append head to queue q&1's avail ring, bump idx
 *   0x07 INFL  off:u16 len:u8 bytes[len]   write the inflight region at off mod its size
 *   other opcodes are taken mod 8.
 * The inflight region is a sealed memfd (as thinblkd's own), for NQ queues of 64 entries;
 * at the start of each input every queue's part is a fresh one (version 1, 64 entries, no
 * head in flight), which SETUP's SET_INFLIGHT_FD describes for its ring size: a ring of 64
 * takes it as is, a smaller one finds it "not ours" and resets it.
 * Queue q's rings (SETUP's layout, up to 64 entries): descriptors at gpa q*0x800, avail ring
 * at q*0x800 + 0x400, used ring at q*0x800 + 0x600; pages 1.. are for buffers.
 * After MSG, KICK and SETUP (and, in pieces, after each piece) the loop runs once without
 * waiting and replies are read and dropped.
 * At the end the frontend's socket is closed and the loop runs until the connection is gone
 * and every request is back. Errors are fine; crashes, leaks, hangs and sanitizer reports are
 * not. Seeds: fuzz/make-vhost-seeds.py. FUZZ_VHOST_LOG=1 in the environment logs what the
 * export does (debug level) and, at the end, each queue's used index and the status byte at
 * 0x3f00, to check what an input reaches.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "fuzz-block.h"
#include "block/graph.h"
#include "common/log.h"
#include "common/util.h"
#include "device/device.h"
#include "io/uring.h"
#include "loop/loop.h"
#include "runstate/runstate.h"
#include "vhost-user-blk/protocol.h"
#include "vhost-user-blk/server.h"

#define IMAGE_SIZE (1024 * 1024)
#define GUEST_SIZE (4 * 4096)
#define QVA_BASE 0x7f0000000000ull
#define NQ 2
#define MAX_ROUNDS 10000
#define INFLIGHT_ENTRIES 64u
/* One queue's part: the 16-byte header and its entries, padded to 64 bytes (inflight.c). */
#define INFLIGHT_QUEUE_SIZE(n) ((16u + 16u * (n) + 63u) / 64u * 64u)
#define INFLIGHT_SIZE (NQ * INFLIGHT_QUEUE_SIZE(INFLIGHT_ENTRIES))

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static struct {
    struct fuzz_block fb;
    struct runstate *runstate;
    struct dev_context *devs;
    struct device *dev;
    struct vub_export *exp[2];
    char dir[64];
    char path[2][96];
    int memfd;
    uint8_t *guest;
    int inflight_fd;
    uint8_t *inflight;
} g;

/* The state of one input. */
struct run {
    int fd;              /* the frontend's end */
    size_t chunk;        /* bytes per send() */
    int kick[NQ];
    const uint8_t *p;    /* the input left */
    size_t left;
};

static void cleanup(void)
{
    for (int i = 0; i < 2; i++)
        vub_export_free(g.exp[i]);
    rmdir(g.dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    struct error *err = NULL;
    char path[] = "/tmp/fuzz-vhost-XXXXXX";
    int fd;

    fuzz_block_init(&g.fb, "fuzz-vhost");
    g.runstate = runstate_new(g.fb.loop, RUN_STATE_RUNNING, fuzz_drop_event, NULL);
    g.devs = dev_context_new(g.fb.loop, g.runstate, fuzz_drop_device_event, NULL);

    fd = mkstemp(path);
    if (fd < 0 || ftruncate(fd, IMAGE_SIZE) < 0)
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

    snprintf(g.dir, sizeof(g.dir), "/tmp/fuzz-vhost-XXXXXX");
    if (!mkdtemp(g.dir))
        fuzz_die("mkdtemp", NULL);
    for (int i = 0; i < 2; i++) {
        snprintf(g.path[i], sizeof(g.path[i]), "%s/%d.sock", g.dir, i);
        struct vub_export_config cfg = {
            .id = i ? "vro" : "vdisk", .path = g.path[i], .writable = i == 0,
            .num_queues = NQ, .logical_block_size = 512,
        };
        g.exp[i] = vub_export_new(g.fb.loop, g.dev, &cfg, &err);
        if (!g.exp[i])
            fuzz_die("vub_export_new", err);
    }
    atexit(cleanup);
    if (getenv("FUZZ_VHOST_LOG"))
        log_max_level = LOG_LEVEL_DEBUG;

    g.memfd = memfd_create("fuzz-vhost-guest", MFD_CLOEXEC);
    if (g.memfd < 0 || ftruncate(g.memfd, GUEST_SIZE) < 0)
        fuzz_die("memfd", NULL);
    g.guest = mmap(NULL, GUEST_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g.memfd, 0);
    if (g.guest == MAP_FAILED)
        fuzz_die("mmap", NULL);
    g.inflight_fd = memfd_create("fuzz-vhost-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (g.inflight_fd < 0 || ftruncate(g.inflight_fd, INFLIGHT_SIZE) < 0 ||
        fcntl(g.inflight_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0)
        fuzz_die("inflight memfd", NULL);
    g.inflight = mmap(NULL, INFLIGHT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g.inflight_fd, 0);
    if (g.inflight == MAP_FAILED)
        fuzz_die("mmap", NULL);
    return 0;
}

/* Every queue's part of the inflight region fresh, as GET_INFLIGHT_FD makes it. */
static void reset_inflight(void)
{
    memset(g.inflight, 0, INFLIGHT_SIZE);
    for (unsigned q = 0; q < NQ; q++) {
        struct vhost_inflight_queue *f =
            (void *)(g.inflight + q * INFLIGHT_QUEUE_SIZE(INFLIGHT_ENTRIES));
        f->version = 1;
        f->desc_num = INFLIGHT_ENTRIES;
    }
}

/* Read and drop the export's replies. */
static void drain(int fd)
{
    char buf[4096];

    while (read(fd, buf, sizeof(buf)) > 0)
        ;
}

static void run_once(struct run *r)
{
    loop_run_once(g.fb.loop, 0);
    drain(r->fd);
}

static bool idle(void)
{
    return !device_busy(g.dev) && uring_in_flight(g.fb.uring) == 0;
}

static void run_until_idle(struct run *r)
{
    for (unsigned rounds = 0; rounds < MAX_ROUNDS; rounds++) {
        loop_run_once(g.fb.loop, 0);
        drain(r->fd);
        if (idle())
            break;
        loop_run_once(g.fb.loop, 10);
    }
    run_once(r);
}

/* Send buf (the first part with fds) in r->chunk pieces, running the loop in between. */
static void send_all(struct run *r, const void *buf, size_t len, const int *fds, unsigned nfds)
{
    const uint8_t *p = buf;

    for (unsigned rounds = 0; len > 0 && rounds < MAX_ROUNDS; rounds++) {
        union {
            char buf[CMSG_SPACE(sizeof(int) * 16)];
            struct cmsghdr align;
        } control;
        struct iovec iov = { (void *)p, rounds ? len : MIN(r->chunk, len) };
        struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
        if (nfds) {
            m.msg_control = control.buf;
            m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
            struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
            memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
        }
        ssize_t n = sendmsg(r->fd, &m, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN)
            return;  /* the export closed the connection */
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            nfds = 0;  /* sent with the first bytes (and the receiver holds them) */
        }
        /* Whole messages pile up in the socket until the operation is done (the export reads
         * until EAGAIN): a loop run per message would cost more than the rest together. */
        if (len > 0 || r->chunk != SIZE_MAX)
            run_once(r);
    }
}

/* Send the message in buf with fdsel's fds (see the header comment). */
static void send_raw(struct run *r, const uint8_t *buf, size_t len, unsigned fdsel)
{
    int fds[16], pipefd[2] = {-1, -1}, fresh = -1;
    unsigned nfds = 0;

    switch (fdsel) {
    case 1: fds[nfds++] = g.memfd; break;
    case 2: fds[nfds++] = r->kick[0]; break;
    case 3: fds[nfds++] = r->kick[1]; break;
    case 4:
        fresh = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (fresh >= 0)
            fds[nfds++] = fresh;
        break;
    case 5: fds[nfds++] = g.memfd; fds[nfds++] = g.memfd; break;
    case 6:
        while (nfds < 9)
            fds[nfds++] = g.memfd;
        break;
    case 7:
        if (pipe2(pipefd, O_CLOEXEC) == 0)
            fds[nfds++] = pipefd[0];
        break;
    case 8: fds[nfds++] = g.inflight_fd; break;  /* SETUP's SET_INFLIGHT_FD only */
    }
    send_all(r, buf, len, fds, nfds);
    if (fresh >= 0)
        close(fresh);
    if (pipefd[0] >= 0) {
        close(pipefd[0]);
        close(pipefd[1]);
    }
}

static void send_msg(struct run *r, uint32_t request, uint32_t flags, const void *payload,
                     uint32_t size, unsigned fdsel)
{
    uint8_t buf[12 + 512];
    struct vhost_user_header h = { request, flags, size };

    memcpy(buf, &h, 12);
    if (size)
        memcpy(buf + 12, payload, size);
    send_raw(r, buf, 12 + size, fdsel);
}

static void send_u64(struct run *r, uint32_t request, uint64_t v, unsigned fdsel)
{
    send_msg(r, request, VHOST_USER_VERSION, &v, 8, fdsel);
}

static void send_state(struct run *r, uint32_t request, uint32_t index, uint32_t num)
{
    struct vhost_vring_state st = { index, num };
    send_msg(r, request, VHOST_USER_VERSION, &st, sizeof(st), 0);
}

static bool take(struct run *r, void *dst, size_t n)
{
    if (r->left < n)
        return false;
    memcpy(dst, r->p, n);
    r->p += n;
    r->left -= n;
    return true;
}

static uint64_t ring_gpa(unsigned q)
{
    return (uint64_t)q * 0x800;
}

static void op_msg(struct run *r)
{
    uint8_t fdsel;
    uint32_t hdr[3];

    if (!take(r, &fdsel, 1) || !take(r, hdr, sizeof(hdr)))
        return;
    fdsel %= 8;
    /* The header's size is sent as is; the payload is what the input has left of it. */
    size_t n = MIN(MIN((size_t)hdr[2], r->left), (size_t)512);
    uint8_t buf[12 + 512];
    memcpy(buf, hdr, 12);
    memcpy(buf + 12, r->p, n);
    r->p += n;
    r->left -= n;
    send_raw(r, buf, 12 + n, fdsel);
}

static void op_setup(struct run *r)
{
    uint8_t sel, lognum;

    if (!take(r, &sel, 1) || !take(r, &lognum, 1))
        return;
    unsigned q = sel & 1;
    uint64_t features = 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_RING_F_INDIRECT_DESC |
                        1ull << VIRTIO_RING_F_EVENT_IDX | 1ull << VHOST_USER_F_PROTOCOL_FEATURES |
                        1ull << VIRTIO_BLK_F_SEG_MAX | 1ull << VIRTIO_BLK_F_BLK_SIZE |
                        1ull << VIRTIO_BLK_F_FLUSH | 1ull << VIRTIO_BLK_F_MQ |
                        1ull << VIRTIO_BLK_F_DISCARD | 1ull << VIRTIO_BLK_F_WRITE_ZEROES;
    if (sel & 2)
        features &= ~(1ull << VIRTIO_RING_F_INDIRECT_DESC);
    if (sel & 4)
        features &= ~(1ull << VIRTIO_RING_F_EVENT_IDX);
    if (sel & 8)
        features &= ~(1ull << VHOST_USER_F_PROTOCOL_FEATURES);

    send_msg(r, VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, NULL, 0, 0);
    send_u64(r, VHOST_USER_SET_FEATURES, features, 0);
    if (!(sel & 8)) {
        send_msg(r, VHOST_USER_GET_PROTOCOL_FEATURES, VHOST_USER_VERSION, NULL, 0, 0);
        send_u64(r, VHOST_USER_SET_PROTOCOL_FEATURES,
                 1ull << VHOST_USER_PROTOCOL_F_MQ | 1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK |
                 1ull << VHOST_USER_PROTOCOL_F_CONFIG |
                 1ull << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, 0);
    }
    if (sel & 16) {
        uint16_t n = (uint16_t)(1u << (lognum % 7));
        struct vhost_user_inflight in = { .num_queues = NQ, .queue_size = n };
        send_msg(r, VHOST_USER_GET_INFLIGHT_FD, VHOST_USER_VERSION, &in, sizeof(in), 0);
        in.mmap_size = NQ * INFLIGHT_QUEUE_SIZE(n);
        send_msg(r, VHOST_USER_SET_INFLIGHT_FD, VHOST_USER_VERSION, &in, sizeof(in), 8);
    }
    send_msg(r, VHOST_USER_SET_OWNER, VHOST_USER_VERSION, NULL, 0, 0);
    struct vhost_user_memory mem = { .nregions = 1 };
    mem.regions[0] = (struct vhost_user_memory_region){
        .guest_phys_addr = 0, .memory_size = GUEST_SIZE, .userspace_addr = QVA_BASE,
    };
    send_msg(r, VHOST_USER_SET_MEM_TABLE, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
             &mem, 8 + sizeof(mem.regions[0]), 1);
    send_state(r, VHOST_USER_SET_VRING_NUM, q, 1u << (lognum % 7));
    send_state(r, VHOST_USER_SET_VRING_BASE, q, 0);
    struct vhost_vring_addr a = {
        .index = q, .desc_user_addr = QVA_BASE + ring_gpa(q),
        .avail_user_addr = QVA_BASE + ring_gpa(q) + 0x400,
        .used_user_addr = QVA_BASE + ring_gpa(q) + 0x600,
    };
    send_msg(r, VHOST_USER_SET_VRING_ADDR, VHOST_USER_VERSION, &a, sizeof(a), 0);
    send_u64(r, VHOST_USER_SET_VRING_CALL, q, 4);
    send_u64(r, VHOST_USER_SET_VRING_ERR, q, 4);
    send_u64(r, VHOST_USER_SET_VRING_KICK, q, 2 + q);
    if (!(sel & 8))
        send_state(r, VHOST_USER_SET_VRING_ENABLE, q, 1);
}

static void op_mem(struct run *r)
{
    uint16_t off;
    uint8_t len;

    if (!take(r, &off, 2) || !take(r, &len, 1))
        return;
    size_t o = off % GUEST_SIZE, n = MIN(MIN((size_t)len, r->left), GUEST_SIZE - o);
    memcpy(g.guest + o, r->p, n);
    r->p += n;
    r->left -= n;
}

static void op_desc(struct run *r)
{
    uint8_t i;

    if (take(r, &i, 1) && r->left >= 16)
        take(r, g.guest + ring_gpa(0) + (i % 64u) * 16, 16);
}

static void op_avail(struct run *r)
{
    uint8_t q;
    uint16_t head;

    if (!take(r, &q, 1) || !take(r, &head, 2))
        return;
    uint16_t *avail = (uint16_t *)(g.guest + ring_gpa(q & 1) + 0x400);
    uint16_t idx = avail[1];
    avail[2 + idx % 64] = head;
    __atomic_store_n(&avail[1], (uint16_t)(idx + 1), __ATOMIC_RELEASE);
}

static void op_inflight(struct run *r)
{
    uint16_t off;
    uint8_t len;

    if (!take(r, &off, 2) || !take(r, &len, 1))
        return;
    size_t o = off % INFLIGHT_SIZE, n = MIN(MIN((size_t)len, r->left), INFLIGHT_SIZE - o);
    memcpy(g.inflight + o, r->p, n);
    r->p += n;
    r->left -= n;
}

static void op_kick(struct run *r)
{
    uint8_t q;
    uint64_t one = 1;

    if (take(r, &q, 1) && write(r->kick[q % NQ], &one, sizeof(one)) < 0) {
        /* a full counter still kicks */
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct run r = { .p = data, .left = size };
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    uint8_t setup = 0;

    if (!take(&r, &setup, 1))
        return 0;
    memset(g.guest, 0, GUEST_SIZE);
    reset_inflight();
    r.chunk = setup & 0x80 ? ((setup >> 1) & 0x3f) + 1u : SIZE_MAX;
    strcpy(sa.sun_path, g.path[setup & 1]);
    r.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (r.fd < 0 || connect(r.fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        fcntl(r.fd, F_SETFL, O_NONBLOCK) < 0)
        fuzz_die("connect", NULL);
    for (int i = 0; i < NQ; i++) {
        r.kick[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (r.kick[i] < 0)
            fuzz_die("eventfd", NULL);
    }
    run_once(&r);  /* accept */
    if (!vub_export_connected(g.exp[setup & 1]))
        fuzz_die("the export did not accept the connection", NULL);

    while (r.left > 0) {
        uint8_t op;
        take(&r, &op, 1);
        switch (op % 8) {
        case 0: op_msg(&r); break;
        case 1: op_mem(&r); break;
        case 2: op_kick(&r); break;
        case 3: run_until_idle(&r); break;
        case 4: op_setup(&r); break;
        case 5: op_desc(&r); break;
        case 6: op_avail(&r); break;
        case 7: op_inflight(&r); break;
        }
        if (op % 8 == 0 || op % 8 == 2 || op % 8 == 4)
            run_once(&r);
    }

    close(r.fd);
    for (unsigned rounds = 0; rounds < MAX_ROUNDS; rounds++) {
        loop_run_once(g.fb.loop, 0);
        if (!vub_export_connected(g.exp[setup & 1]) && idle())
            break;
        loop_run_once(g.fb.loop, 10);
    }
    if (vub_export_connected(g.exp[setup & 1]))
        fuzz_die("the connection outlived its frontend", NULL);
    while (!idle())
        loop_run_once(g.fb.loop, 10);
    loop_run_once(g.fb.loop, 0);  /* deferred calls */
    for (int i = 0; i < NQ; i++) {
        if (log_max_level == LOG_LEVEL_DEBUG)
            fprintf(stderr, "fuzz-vhost: queue %d: used idx %u, status byte %u\n", i,
                    *(uint16_t *)(g.guest + ring_gpa(i) + 0x602), g.guest[0x3f00]);
        close(r.kick[i]);
    }
    return 0;
}
