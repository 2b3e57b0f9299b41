/* thinblk-vhost-io's probe mode: one malformed request or message, built with the raw API,
 * and what the backend did about it, as one JSON line. A well-behaved backend never writes
 * an OK status for a malformed request and survives the attempt (tests check the latter by
 * connecting again). Each run uses a connection of its own, as a backend may reasonably
 * drop a driver that broke the protocol. */
#include <endian.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include "common/util.h"
#include "vhost-io/cli.h"

struct probe {
    struct vio_vq *vq;
    struct vio_blk_outhdr *hdr;
    uint8_t *status, *data;
    struct vio_desc *table;   /* room for an indirect table of vq->size + 2 entries */
    uint64_t hdr_gpa, status_gpa, data_gpa, table_gpa, mem_end;
};

/* A read of 512 bytes at sector 0 in descriptors 0 (header), 1 (data), 2 (status). */
static void probe_valid_chain(struct probe *p)
{
    vio_desc_set(vio_vq_desc(p->vq, 0), p->hdr_gpa, sizeof(*p->hdr), VIO_DESC_F_NEXT, 1);
    vio_desc_set(vio_vq_desc(p->vq, 1), p->data_gpa, 512, VIO_DESC_F_NEXT | VIO_DESC_F_WRITE,
                 2);
    vio_desc_set(vio_vq_desc(p->vq, 2), p->status_gpa, 1, VIO_DESC_F_WRITE, 0);
}

/* Each case writes its descriptors and returns the head to publish. */
static unsigned case_valid(struct probe *p) { probe_valid_chain(p); return 0; }

static unsigned case_data_outside_memory(struct probe *p)
{
    probe_valid_chain(p);
    vio_vq_desc(p->vq, 1)->addr = htole64(p->mem_end + (1ull << 30));
    return 0;
}

static unsigned case_data_straddles_end(struct probe *p)
{
    probe_valid_chain(p);
    vio_vq_desc(p->vq, 1)->addr = htole64(p->mem_end - 256);
    return 0;
}

static unsigned case_desc_loop(struct probe *p)
{
    probe_valid_chain(p);
    vio_desc_set(vio_vq_desc(p->vq, 1), p->data_gpa, 512, VIO_DESC_F_NEXT | VIO_DESC_F_WRITE,
                 0);
    return 0;
}

static unsigned case_next_out_of_range(struct probe *p)
{
    probe_valid_chain(p);
    vio_vq_desc(p->vq, 1)->next = htole16((uint16_t)p->vq->size);
    return 0;
}

static unsigned case_head_out_of_range(struct probe *p)
{
    probe_valid_chain(p);
    return p->vq->size + 5;
}

static unsigned case_short_header(struct probe *p)
{
    probe_valid_chain(p);
    vio_vq_desc(p->vq, 0)->len = htole32(8);
    return 0;
}

static unsigned case_readonly_status(struct probe *p)
{
    probe_valid_chain(p);
    vio_vq_desc(p->vq, 2)->flags = 0;
    return 0;
}

static unsigned case_no_status(struct probe *p)
{
    probe_valid_chain(p);
    vio_desc_set(vio_vq_desc(p->vq, 0), p->hdr_gpa, sizeof(*p->hdr), 0, 0);
    return 0;
}

static unsigned case_readonly_data(struct probe *p)
{
    probe_valid_chain(p);
    vio_vq_desc(p->vq, 1)->flags = htole16(VIO_DESC_F_NEXT);
    return 0;
}

static unsigned case_zero_length_data(struct probe *p)
{
    probe_valid_chain(p);
    vio_vq_desc(p->vq, 1)->len = 0;
    return 0;
}

/* An indirect table of n entries: header, n - 2 data descriptors of 512 bytes, status. */
static unsigned indirect_chain(struct probe *p, unsigned n, uint16_t data_flags)
{
    for (unsigned i = 0; i < n; i++) {
        uint16_t next = (uint16_t)(i + 1);
        if (i == 0)
            vio_desc_set(&p->table[i], p->hdr_gpa, sizeof(*p->hdr), VIO_DESC_F_NEXT, next);
        else if (i + 1 == n)
            vio_desc_set(&p->table[i], p->status_gpa, 1, VIO_DESC_F_WRITE, 0);
        else
            vio_desc_set(&p->table[i], p->data_gpa, 512, data_flags, next);
    }
    vio_desc_set(vio_vq_desc(p->vq, 0), p->table_gpa, n * 16, VIO_DESC_F_INDIRECT, 0);
    return 0;
}

static unsigned case_indirect_valid(struct probe *p)
{
    return indirect_chain(p, 3, VIO_DESC_F_NEXT | VIO_DESC_F_WRITE);
}

static unsigned case_indirect_too_long(struct probe *p)
{
    return indirect_chain(p, p->vq->size + 2, VIO_DESC_F_NEXT | VIO_DESC_F_WRITE);
}

static unsigned case_indirect_nested(struct probe *p)
{
    indirect_chain(p, 3, VIO_DESC_F_NEXT | VIO_DESC_F_WRITE);
    vio_desc_set(&p->table[1], p->table_gpa, 3 * 16, VIO_DESC_F_INDIRECT | VIO_DESC_F_NEXT, 2);
    return 0;
}

static unsigned case_indirect_bad_len(struct probe *p)
{
    indirect_chain(p, 3, VIO_DESC_F_NEXT | VIO_DESC_F_WRITE);
    vio_vq_desc(p->vq, 0)->len = htole32(3 * 16 + 3);
    return 0;
}

static unsigned case_indirect_loop(struct probe *p)
{
    indirect_chain(p, 3, VIO_DESC_F_NEXT | VIO_DESC_F_WRITE);
    p->table[1].next = 0;
    return 0;
}

static unsigned case_sector_past_end(struct probe *p)
{
    probe_valid_chain(p);
    p->hdr->sector = htole64(UINT64_MAX / 1024);
    return 0;
}

static unsigned case_unknown_type(struct probe *p)
{
    probe_valid_chain(p);
    p->hdr->type = htole32(0x7777);
    return 0;
}

static const struct {
    const char *name;
    unsigned (*build)(struct probe *p);
} probe_cases[] = {
    {"valid", case_valid},
    {"data-outside-memory", case_data_outside_memory},
    {"data-straddles-end", case_data_straddles_end},
    {"desc-loop", case_desc_loop},
    {"next-out-of-range", case_next_out_of_range},
    {"head-out-of-range", case_head_out_of_range},
    {"short-header", case_short_header},
    {"readonly-status", case_readonly_status},
    {"no-status", case_no_status},
    {"readonly-data", case_readonly_data},
    {"zero-length-data", case_zero_length_data},
    {"indirect-valid", case_indirect_valid},
    {"indirect-too-long", case_indirect_too_long},
    {"indirect-nested", case_indirect_nested},
    {"indirect-bad-len", case_indirect_bad_len},
    {"indirect-loop", case_indirect_loop},
    {"sector-past-end", case_sector_past_end},
    {"unknown-type", case_unknown_type},
};

/* Wait for the used index to move or the backend to hang up. Returns 1 (moved), 0 (time
 * out), -1 (hung up first). */
static int probe_wait(struct vio_dev *d, struct vio_vq *vq, int timeout_ms)
{
    uint64_t deadline = now_monotonic_ns() + (uint64_t)timeout_ms * 1000000;
    for (;;) {
        if (vio_vq_enable_cb(vq))
            return 1;
        struct pollfd p[2] = {{.fd = vq->call_fd, .events = POLLIN},
                              {.fd = d->sock, .events = POLLRDHUP}};
        uint64_t now = now_monotonic_ns();
        if (now >= deadline)
            return 0;
        int r = poll(p, 2, (int)((deadline - now) / 1000000) + 1);
        if (r > 0 && (p[0].revents & POLLIN))
            vio_vq_drain_call(vq);
        if (r > 0 && p[1].revents && vio_vq_used_idx(vq) == vq->last_used)
            return -1;
    }
}

void vio_cli_probe_list(void)
{
    for (size_t i = 0; i < ARRAY_SIZE(probe_cases); i++)
        printf("%s\n", probe_cases[i].name);
}

int vio_cli_probe(struct vio_cli *c, const char *name)
{
    unsigned (*build)(struct probe *) = NULL;
    for (size_t i = 0; i < ARRAY_SIZE(probe_cases); i++) {
        if (strcmp(name, probe_cases[i].name) == 0)
            build = probe_cases[i].build;
    }
    if (!build) {
        fprintf(stderr, "thinblk-vhost-io: unknown probe case '%s'\n", name);
        return VIO_EXIT_USAGE;
    }
    struct vio_dev *d = c->dev;
    struct probe p = {.vq = &d->vqs[0]};
    p.hdr = vio_mem_alloc(&d->mem, sizeof(*p.hdr), 16, &p.hdr_gpa);
    p.status = vio_mem_alloc(&d->mem, 1, 1, &p.status_gpa);
    p.data = vio_mem_alloc(&d->mem, 4096, 4096, &p.data_gpa);
    p.table = vio_mem_alloc(&d->mem, 16ull * (p.vq->size + 2), 16, &p.table_gpa);
    if (!p.hdr || !p.status || !p.data || !p.table) {
        fprintf(stderr, "thinblk-vhost-io: guest memory too small for the probe\n");
        return VIO_EXIT_CONNECTION;
    }
    p.mem_end = d->mem.gpa + d->mem.size;
    p.hdr->type = htole32(VIO_BLK_T_IN);
    *p.status = VIO_BLK_S_UNWRITTEN;

    vio_vq_publish(p.vq, (uint16_t)build(&p));
    vio_vq_kick(p.vq, true);
    int r = probe_wait(d, p.vq, c->timeout_ms);
    uint32_t id = 0, len = 0;
    bool completed = r == 1 && vio_vq_get_used(p.vq, &id, &len) == 1;
    bool written = *p.status != VIO_BLK_S_UNWRITTEN;
    char status[16] = "null";
    if (written)
        snprintf(status, sizeof(status), "%d", *p.status);
    printf("{\"case\": \"%s\", \"completed\": %s, \"status\": %s, \"used_id\": %u, "
           "\"used_len\": %u, \"hung_up\": %s}\n",
           name, completed ? "true" : "false", status, id, len,
           r < 0 || vio_dev_hung_up(d) ? "true" : "false");
    return VIO_EXIT_OK;
}

/* ---- malformed messages, sent after negotiation and before the queues start ---- */

static const struct {
    const char *name;
    uint32_t request, flags, size;
    struct vio_vring_state payload;
} probe_msgs[] = {
    /* A request number nobody defines. */
    {"msg-unknown-request", 999, VIO_MSG_VERSION | VIO_MSG_NEED_REPLY, 0, {0, 0}},
    /* Version 2 in the flags. */
    {"msg-bad-version", VIO_REQ_GET_FEATURES, 0x2, 0, {0, 0}},
    /* A queue the device does not have. */
    {"msg-vring-index-out-of-range", VIO_REQ_SET_VRING_NUM,
     VIO_MSG_VERSION | VIO_MSG_NEED_REPLY, 8, {1000, 128}},
    /* A queue size that is not a power of two. */
    {"msg-vring-num-not-power-of-two", VIO_REQ_SET_VRING_NUM,
     VIO_MSG_VERSION | VIO_MSG_NEED_REPLY, 8, {0, 100}},
    /* A header announcing 1 MiB of payload that never comes. */
    {"msg-oversized", VIO_REQ_SET_MEM_TABLE, VIO_MSG_VERSION | VIO_MSG_NEED_REPLY, 1u << 20,
     {0, 0}},
    /* SET_MEM_TABLE without its fd. */
    {"msg-mem-table-no-fd", VIO_REQ_SET_MEM_TABLE, VIO_MSG_VERSION | VIO_MSG_NEED_REPLY, 8,
     {0, 0}},
};

bool vio_cli_probe_is_msg(const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(probe_msgs); i++) {
        if (strcmp(name, probe_msgs[i].name) == 0)
            return true;
    }
    return false;
}

int vio_cli_probe_msg(struct vio_cli *c, const char *name)
{
    size_t i = 0;
    while (strcmp(name, probe_msgs[i].name) != 0)
        i++;
    struct vio_dev *d = c->dev;
    struct error *err = NULL;
    /* A size beyond the 8 bytes of a vring state is a claim only: the header goes alone. */
    const void *payload = probe_msgs[i].size <= sizeof(probe_msgs[i].payload)
                              ? (const void *)&probe_msgs[i].payload : NULL;
    if (vio_msg_send(d->sock, probe_msgs[i].request, probe_msgs[i].flags, payload,
                     probe_msgs[i].size, NULL, 0, &err) < 0)
        error_free(err); /* the backend may have hung up already: reported below */
    struct pollfd p = {.fd = d->sock, .events = POLLIN | POLLRDHUP};
    bool reply = false, hung_up = false;
    uint64_t value = 0;
    if (poll(&p, 1, c->timeout_ms) > 0) {
        hung_up = vio_dev_hung_up(d);
        struct vio_msg *msg = xmalloc(sizeof(*msg));
        if (!hung_up && vio_msg_recv(d->sock, msg, &err) == 0) {
            reply = true;
            if (msg->hdr.size == 8)
                value = msg->payload.u64;
            vio_msg_close_fds(msg);
        } else {
            error_free(err);
            hung_up = true;
        }
        free(msg);
    }
    printf("{\"case\": \"%s\", \"reply\": %s, \"reply_u64\": %" PRIu64 ", \"hung_up\": %s}\n",
           name, reply ? "true" : "false", value, hung_up ? "true" : "false");
    return VIO_EXIT_OK;
}

void vio_cli_probe_list_msgs(void)
{
    for (size_t i = 0; i < ARRAY_SIZE(probe_msgs); i++)
        printf("%s\n", probe_msgs[i].name);
}
