/* The transmission phase: requests to the device, replies back (doc/proto.md, "Transmission").
 *
 * States: REQ_HEADER -> (a write) REQ_PAYLOAD or REQ_DISCARD -> REQ_HEADER; NBD_CMD_DISC and
 * end of input lead to DISCONNECTING, where the requests in flight finish and their replies
 * go out before the connection closes. A bad request magic, or a write too large to take,
 * closes the connection at once: the byte stream can no longer be trusted or followed.
 *
 * Every other invalid request gets an error reply (the "Error values" section: EINVAL for an
 * unknown command or flag, EPERM for a write to a read-only export, ENOSPC for a write past
 * the end, EINVAL for any other request past it) and the connection goes on; an invalid
 * write's payload is read and dropped first. Valid requests go to the device; their replies
 * are sent in completion order, simple or structured as negotiated.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "common/log.h"
#include "loop/loop.h"
#include "nbd/internal.h"

#define KNOWN_CMD_FLAGS (NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF | \
                         NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO)

/* errno -> NBD error: the one mapping (the spec's "Error values"). flags are the request's:
 * EOVERFLOW and ENOTSUP only go on the wire where the spec allows them (NBD_CMD_FLAG_DF,
 * NBD_CMD_FLAG_FAST_ZERO); elsewhere they become EINVAL, as the spec asks. */
static uint32_t errno_to_nbd(int err, uint16_t flags)
{
    switch (err) {
    case 0:
        return NBD_SUCCESS;
    case EPERM:
    case EROFS:
        return NBD_EPERM;
    case EIO:
        return NBD_EIO;
    case ENOMEM:
        return NBD_ENOMEM;
    case EINVAL:
        return NBD_EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return flags & NBD_CMD_FLAG_DF ? NBD_EOVERFLOW : NBD_EINVAL;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
        return flags & NBD_CMD_FLAG_FAST_ZERO ? NBD_ENOTSUP : NBD_EINVAL;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        return NBD_EIO;
    }
}

static const char *cmd_name(uint16_t type)
{
    static const char *const names[] = {
        [NBD_CMD_READ] = "read", [NBD_CMD_WRITE] = "write", [NBD_CMD_DISC] = "disc",
        [NBD_CMD_FLUSH] = "flush", [NBD_CMD_TRIM] = "trim", [NBD_CMD_CACHE] = "cache",
        [NBD_CMD_WRITE_ZEROES] = "write-zeroes", [NBD_CMD_BLOCK_STATUS] = "block-status",
    };
    return type < ARRAY_SIZE(names) ? names[type] : "unknown";
}

uint16_t nbd_export_flags(const struct nbd_conn *c, const struct nbd_export *e)
{
    /* Every connection goes through the one device, and a flush covers what any of them
     * wrote (the device orders flushes after earlier writes): multi-conn is safe. */
    uint16_t flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;

    /* As QEMU: a server limited to one connection does not invite more. */
    if (!c->server || c->server->max_connections != 1)
        flags |= NBD_FLAG_CAN_MULTI_CONN;

    if (!e->writable || device_root(e->dev)->read_only)
        flags |= NBD_FLAG_READ_ONLY;
    else
        flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    /* One data chunk per read, always: "don't fragment" holds by construction. */
    if (c->structured)
        flags |= NBD_FLAG_SEND_DF;
    return flags;
}

/* ---- data buffers ----
 *
 * Reused within a connection: a fresh buffer of this size costs an mmap(), a page fault per
 * page and a munmap(), about as much as the I/O itself. Sizes are rounded up to a power of
 * two; up to NBD_BUF_CACHE_MAX bytes of freed ones are kept, and all are released once the
 * connection has had nothing in flight for NBD_BUF_CACHE_IDLE_NS. */

static unsigned buf_class(size_t count)
{
    unsigned cls = 0;

    while (((size_t)NBD_BUF_ALIGN << cls) < count)
        cls++;
    return cls;
}

static bool alloc_data(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    unsigned cls = buf_class(cmd->count);
    size_t cap = (size_t)NBD_BUF_ALIGN << cls;
    void *p = c->buf_cache[cls];

    if (p) {
        c->buf_cache[cls] = *(void **)p;
        c->buf_cache_bytes -= cap;
    } else if (posix_memalign(&p, NBD_BUF_ALIGN, cap) != 0) {
        return false;
    }
    cmd->data = p;
    cmd->data_cap = cap;
    c->buffered += cap;
    return true;
}

void nbd_transmission_release_buffers(struct nbd_conn *c)
{
    for (unsigned i = 0; i < NBD_BUF_CLASSES; i++) {
        while (c->buf_cache[i]) {
            void *p = c->buf_cache[i];
            c->buf_cache[i] = *(void **)p;
            free(p);
        }
    }
    c->buf_cache_bytes = 0;
    if (c->buf_cache_timer) {
        loop_del_timer(c->loop, c->buf_cache_timer);
        c->buf_cache_timer = 0;
    }
}

static void on_buffers_idle(struct loop *loop, void *opaque)
{
    struct nbd_conn *c = opaque;

    c->buf_cache_timer = 0;
    if (c->in_flight == 0)
        nbd_transmission_release_buffers(c);
}

static void free_data(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    c->buffered -= cmd->data_cap;
    if (c->state != NBD_STATE_CLOSED && c->buf_cache_bytes + cmd->data_cap <= NBD_BUF_CACHE_MAX) {
        unsigned cls = buf_class(cmd->data_cap);
        *(void **)cmd->data = c->buf_cache[cls];
        c->buf_cache[cls] = cmd->data;
        c->buf_cache_bytes += cmd->data_cap;
    } else {
        free(cmd->data);
    }
    cmd->data = NULL;
}

void nbd_cmd_free(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    if (cmd->data)
        free_data(c, cmd);
    if (cmd->status) {
        free(cmd->status->reply);
        free(cmd->status);
    }
    c->in_flight--;
    free(cmd);
    if (c->in_flight == 0 && c->buf_cache_bytes > 0 && !c->buf_cache_timer &&
        c->state != NBD_STATE_CLOSED)
        c->buf_cache_timer = loop_add_timer(c->loop, NBD_BUF_CACHE_IDLE_NS, on_buffers_idle, c);
}

/* ---- replies ---- */

static void put_simple(struct nbd_cmd *cmd, uint32_t error)
{
    struct nbd_simple_reply r = {
        .magic = htobe32(NBD_SIMPLE_REPLY_MAGIC),
        .error = htobe32(error),
        .handle = cmd->handle,  /* opaque: as the client sent it */
    };
    memcpy(cmd->reply, &r, sizeof(r));
    cmd->reply_len = sizeof(r);
}

/* A structured chunk header for cmd into p. */
static void chunk_header(void *p, const struct nbd_cmd *cmd, uint16_t flags, uint16_t type,
                         uint32_t length)
{
    struct nbd_structured_reply r = {
        .magic = htobe32(NBD_STRUCTURED_REPLY_MAGIC),
        .flags = htobe16(flags),
        .type = htobe16(type),
        .handle = cmd->handle,
        .length = htobe32(length),
    };
    memcpy(p, &r, sizeof(r));
}

/* A structured chunk header with the done flag, then extra (part of the payload). */
static void put_chunk(struct nbd_cmd *cmd, uint16_t type, uint32_t length, const void *extra,
                      size_t extra_len)
{
    size_t hlen = sizeof(struct nbd_structured_reply);

    chunk_header(cmd->reply, cmd, NBD_REPLY_FLAG_DONE, type, length);
    if (extra_len)
        memcpy(cmd->reply + hlen, extra, extra_len);
    cmd->reply_len = hlen + extra_len;
}

static void reply_error(struct nbd_conn *c, struct nbd_cmd *cmd, uint32_t error,
                        const char *msg)
{
    log_debug("nbd: client %" PRIu64 ": %s at %" PRIu64 " (+%" PRIu32 "): error %" PRIu32
              ": %s", c->id, cmd_name(cmd->type), cmd->offset, cmd->count, error, msg);
    cmd->payload_len = 0;
    if (c->structured) {
        /* Room for the message in cmd->reply; these are ours and short. */
        unsigned char body[sizeof(cmd->reply) - sizeof(struct nbd_structured_reply)];
        struct nbd_structured_reply_error e;
        size_t len = MIN(strlen(msg), sizeof(body) - sizeof(e));
        e.error = htobe32(error);
        e.len = htobe16((uint16_t)len);
        memcpy(body, &e, sizeof(e));
        memcpy(body + sizeof(e), msg, len);
        put_chunk(cmd, NBD_REPLY_TYPE_ERROR, (uint32_t)(sizeof(e) + len), body, sizeof(e) + len);
    } else {
        put_simple(cmd, error);
    }
    nbd_conn_queue_reply(c, cmd);
}

static void reply_ok(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    cmd->payload_len = 0;
    if (cmd->type == NBD_CMD_READ && c->structured) {
        if (cmd->count == 0) {
            put_chunk(cmd, NBD_REPLY_TYPE_NONE, 0, NULL, 0);
        } else {
            /* The read is over: no error can follow, so this chunk is the last. */
            struct nbd_structured_reply_offset_data d = { htobe64(cmd->offset) };
            put_chunk(cmd, NBD_REPLY_TYPE_OFFSET_DATA, (uint32_t)sizeof(d) + cmd->count, &d,
                      sizeof(d));
            cmd->payload = cmd->data;
            cmd->payload_len = cmd->count;
        }
    } else {
        put_simple(cmd, NBD_SUCCESS);
        if (cmd->type == NBD_CMD_READ) {
            cmd->payload = cmd->data;
            cmd->payload_len = cmd->count;
        }
    }
    nbd_conn_queue_reply(c, cmd);
}

/* ---- the device ---- */

static void on_device_done(struct dev_req *dreq, int ret)
{
    struct nbd_cmd *cmd = container_of(dreq, struct nbd_cmd, dreq);
    struct nbd_conn *c = cmd->conn;

    /* TRIM with FUA: the discard is durable once a flush after it is. */
    if (ret == 0 && cmd->flush_after && c->state != NBD_STATE_CLOSED) {
        cmd->flush_after = false;
        cmd->dreq.breq = (struct block_req){ .op = BLOCK_OP_FLUSH };
        device_submit(c->dev, &cmd->dreq);
        return;
    }
    c->in_device--;
    if (c->state == NBD_STATE_CLOSED)
        nbd_cmd_free(c, cmd);
    else if (ret < 0)
        reply_error(c, cmd, errno_to_nbd(-ret, cmd->flags), strerror(-ret));
    else
        reply_ok(c, cmd);
    nbd_conn_unref(c);
}

static void submit(struct nbd_conn *c, struct nbd_cmd *cmd, enum block_op op, unsigned flags,
                   uint64_t offset, uint64_t len)
{
    cmd->dreq.breq = (struct block_req){
        .op = op, .flags = flags, .offset = offset, .len = len, .buf = cmd->data,
    };
    cmd->dreq.done = on_device_done;
    cmd->dreq.opaque = cmd;
    c->in_device++;
    nbd_conn_ref(c);
    device_submit(c->dev, &cmd->dreq);
}

static void on_device_accepting(struct dev_waiter *w)
{
    struct nbd_conn *c = container_of(w, struct nbd_conn, waiter);

    c->waiting = false;
    nbd_conn_schedule(c);
}

/* ---- block status ----
 *
 * For each context selected, in the order of enum nbd_context, queries to the device from
 * the request's offset, their answers merged into descriptors, until the request is covered,
 * NBD_STATUS_EXTENTS descriptors are there (one with NBD_CMD_FLAG_REQ_ONE: as QEMU, equal
 * extents after it still merge into it), or NBD_STATUS_STEPS queries were made: the spec
 * lets a server answer less than the whole range where that would cost too much, and a
 * query may read an L2 table. Then one chunk per context, the last one done. */

static void status_ask(struct nbd_conn *c, struct nbd_cmd *cmd);

/* NBD's flags for what the block layer said. */
static uint32_t status_flags(unsigned ctx, const struct block_status *st)
{
    if (ctx == NBD_CTX_ALLOCATION_DEPTH)
        return st->depth;
    return (st->flags & BLOCK_STATUS_DATA ? 0 : NBD_STATE_HOLE) |
           (st->flags & BLOCK_STATUS_ZERO ? NBD_STATE_ZERO : 0);
}

/* The next selected context from ctx on, or NBD_CTX_COUNT. */
static unsigned next_context(const struct nbd_conn *c, unsigned ctx)
{
    while (ctx < NBD_CTX_COUNT && !(c->meta & 1u << ctx))
        ctx++;
    return ctx;
}

static void reply_status(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    struct nbd_status *ns = cmd->status;
    size_t len = 0, pos = 0;
    unsigned last = 0;

    for (unsigned i = 0; i < NBD_CTX_COUNT; i++) {
        if (ns->ext[i].n) {
            len += sizeof(struct nbd_structured_reply) + sizeof(uint32_t) +
                   ns->ext[i].n * sizeof(struct nbd_block_descriptor);
            last = i;
        }
    }
    unsigned char *p = ns->reply = xmalloc(len);
    for (unsigned i = 0; i < NBD_CTX_COUNT; i++) {
        const struct nbd_extents *x = &ns->ext[i];
        uint32_t id = htobe32(i + 1);
        if (!x->n)
            continue;
        chunk_header(p + pos, cmd, i == last ? NBD_REPLY_FLAG_DONE : 0,
                     NBD_REPLY_TYPE_BLOCK_STATUS,
                     (uint32_t)(sizeof(id) + x->n * sizeof(struct nbd_block_descriptor)));
        pos += sizeof(struct nbd_structured_reply);
        memcpy(p + pos, &id, sizeof(id));
        pos += sizeof(id);
        for (unsigned k = 0; k < x->n; k++) {
            struct nbd_block_descriptor d = { htobe32(x->e[k].length), htobe32(x->e[k].flags) };
            memcpy(p + pos, &d, sizeof(d));
            pos += sizeof(d);
        }
    }
    cmd->reply_len = 0;
    cmd->payload = ns->reply;
    cmd->payload_len = len;
    nbd_conn_queue_reply(c, cmd);
}

static void on_status_done(struct dev_status *ds, int ret)
{
    struct nbd_cmd *cmd = ds->opaque;
    struct nbd_conn *c = cmd->conn;
    struct nbd_status *ns = cmd->status;
    uint64_t end = cmd->offset + cmd->count;

    c->in_device--;
    if (c->state == NBD_STATE_CLOSED) {
        nbd_cmd_free(c, cmd);
    } else if (ret < 0) {
        reply_error(c, cmd, errno_to_nbd(-ret, cmd->flags), strerror(-ret));
    } else {
        uint64_t taken = nbd_extents_add(&ns->ext[ns->ctx], ds->st.pnum,
                                         status_flags(ns->ctx, &ds->st));
        ns->pos += taken;
        if (taken < ds->st.pnum || ns->pos == end || ++ns->steps == NBD_STATUS_STEPS) {
            ns->ctx = next_context(c, ns->ctx + 1);
            ns->pos = cmd->offset;
            ns->steps = 0;
        }
        if (ns->ctx < NBD_CTX_COUNT)
            status_ask(c, cmd);
        else
            reply_status(c, cmd);
    }
    nbd_conn_unref(c);
}

static void status_ask(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    struct nbd_status *ns = cmd->status;

    ns->ds.st = (struct block_status){
        .offset = ns->pos, .len = cmd->offset + cmd->count - ns->pos,
        .want_zero = ns->ctx == NBD_CTX_BASE_ALLOCATION,
    };
    ns->ds.done = on_status_done;
    ns->ds.opaque = cmd;
    c->in_device++;
    nbd_conn_ref(c);
    device_block_status(c->dev, &ns->ds);
}

static void status_start(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    unsigned max = cmd->flags & NBD_CMD_FLAG_REQ_ONE ? 1 : NBD_STATUS_EXTENTS;
    struct nbd_status *ns = cmd->status = xzalloc(sizeof(*ns) + NBD_CTX_COUNT * max *
                                                                sizeof(struct nbd_extent));
    struct nbd_extent *e = (struct nbd_extent *)(ns + 1);

    for (unsigned i = 0; i < NBD_CTX_COUNT; i++)
        ns->ext[i] = (struct nbd_extents){ .e = e + i * max, .max = max };
    ns->ctx = next_context(c, 0);
    ns->pos = cmd->offset;
    status_ask(c, cmd);
}

/* ---- requests ---- */

/* Check a request against the spec and the export. Returns 0 or an NBD error, with *msg. */
static uint32_t validate(struct nbd_conn *c, const struct nbd_cmd *cmd, const char **msg)
{
    const struct block_node *root = device_root(c->dev);
    uint64_t size = MIN(c->size, root->size);  /* the node may have shrunk since */
    uint32_t align = MAX(root->alignment, 1u);
    uint16_t type = cmd->type, flags = cmd->flags;
    bool writes = type == NBD_CMD_WRITE || type == NBD_CMD_TRIM ||
                  type == NBD_CMD_WRITE_ZEROES;

    switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
        break;
    default:
        *msg = "unknown command";
        return NBD_EINVAL;
    }
    if (flags & ~KNOWN_CMD_FLAGS) {
        *msg = "unknown command flags";
        return NBD_EINVAL;
    }
    if (((flags & (NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)) &&
         type != NBD_CMD_WRITE_ZEROES) ||
        ((flags & NBD_CMD_FLAG_DF) && (type != NBD_CMD_READ || !c->structured)) ||
        ((flags & NBD_CMD_FLAG_REQ_ONE) && type != NBD_CMD_BLOCK_STATUS)) {
        *msg = "command flag not valid for this command";
        return NBD_EINVAL;
    }
    if (writes && (c->eflags & NBD_FLAG_READ_ONLY)) {
        *msg = "export is read-only";
        return NBD_EPERM;
    }
    if (type == NBD_CMD_FLUSH) {
        if (cmd->offset != 0 || cmd->count != 0) {
            *msg = "flush with an offset or a length";
            return NBD_EINVAL;
        }
        return 0;
    }
    if (cmd->offset > size || cmd->count > size - cmd->offset) {
        *msg = "request past the end of the export";
        return type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    }
    /* A trim may be rounded in instead (see execute()). */
    if (type != NBD_CMD_TRIM && (cmd->offset % align || cmd->count % align)) {
        *msg = "request not aligned to the minimum block size";
        return NBD_EINVAL;
    }
    if (type == NBD_CMD_READ && cmd->count > NBD_MAX_BLOCK) {
        *msg = "request larger than the maximum block size";
        return NBD_EINVAL;
    }
    if (type == NBD_CMD_BLOCK_STATUS) {
        if (!c->structured) {
            *msg = "block status needs structured replies";
            return NBD_EINVAL;
        }
        if (!c->meta) {
            *msg = "no metadata context was negotiated";
            return NBD_EINVAL;
        }
        if (cmd->count == 0) {
            *msg = "block status of zero bytes";
            return NBD_EINVAL;
        }
    }
    return 0;
}

/* Carry out a valid request: to the device, or answered here. */
static void execute(struct nbd_conn *c, struct nbd_cmd *cmd)
{
    unsigned fua = cmd->flags & NBD_CMD_FLAG_FUA ? BLOCK_REQ_FUA : 0;

    switch (cmd->type) {
    case NBD_CMD_READ:
        if (cmd->count == 0) {
            reply_ok(c, cmd);
        } else if (!alloc_data(c, cmd)) {
            reply_error(c, cmd, NBD_ENOMEM, "out of memory");
        } else {
            submit(c, cmd, BLOCK_OP_READ, 0, cmd->offset, cmd->count);
        }
        break;
    case NBD_CMD_WRITE:
        if (cmd->count == 0)
            reply_ok(c, cmd);
        else
            submit(c, cmd, BLOCK_OP_WRITE, fua, cmd->offset, cmd->count);
        break;
    case NBD_CMD_FLUSH:
        submit(c, cmd, BLOCK_OP_FLUSH, 0, 0, 0);
        break;
    case NBD_CMD_TRIM: {
        /* The spec lets a server round a trim in to its alignment; nothing left is done. */
        uint64_t align = MAX(device_root(c->dev)->alignment, 1u);
        uint64_t start = (cmd->offset + align - 1) / align * align;
        uint64_t end = (cmd->offset + cmd->count) / align * align;
        if (end <= start) {
            reply_ok(c, cmd);
            break;
        }
        cmd->flush_after = fua != 0;
        submit(c, cmd, BLOCK_OP_DISCARD, 0, start, end - start);
        break;
    }
    case NBD_CMD_WRITE_ZEROES:
        /* Zeroing may come down to writing zeroes (see block/file.c): never "fast". */
        if (cmd->flags & NBD_CMD_FLAG_FAST_ZERO)
            reply_error(c, cmd, NBD_ENOTSUP, "fast zeroing is not supported");
        else if (cmd->count == 0)
            reply_ok(c, cmd);
        else
            submit(c, cmd, BLOCK_OP_WRITE_ZEROES,
                   fua | (cmd->flags & NBD_CMD_FLAG_NO_HOLE ? 0 : BLOCK_REQ_MAY_UNMAP),
                   cmd->offset, cmd->count);
        break;
    case NBD_CMD_BLOCK_STATUS:
        status_start(c, cmd);
        break;
    }
}

static void expect_header(struct nbd_conn *c)
{
    nbd_conn_expect(c, NBD_STATE_REQ_HEADER, c->hdr, sizeof(struct nbd_request));
}

void nbd_transmission_start(struct nbd_conn *c)
{
    c->waiter.fn = on_device_accepting;
    expect_header(c);
}

bool nbd_transmission_may_read(struct nbd_conn *c)
{
    if (c->in_flight >= NBD_MAX_IN_FLIGHT || c->buffered >= NBD_MAX_BUFFERED)
        return false;
    if (!device_accepting(c->dev)) {
        /* Stopped: hold the client back until the device takes requests again. */
        if (!c->waiting) {
            c->waiting = true;
            device_wait(c->dev, &c->waiter);
        }
        return false;
    }
    return true;
}

void nbd_transmission_req_header(struct nbd_conn *c)
{
    struct nbd_request r;
    struct nbd_cmd *cmd;
    const char *msg = NULL;
    uint32_t err;

    memcpy(&r, c->hdr, sizeof(r));
    if (be32toh(r.magic) != NBD_REQUEST_MAGIC) {
        nbd_conn_close(c, "bad request magic 0x%08" PRIx32, be32toh(r.magic));
        return;
    }
    cmd = xzalloc(sizeof(*cmd));
    cmd->conn = c;
    cmd->type = be16toh(r.type);
    cmd->flags = be16toh(r.flags);
    cmd->handle = r.handle;
    cmd->offset = be64toh(r.offset);
    cmd->count = be32toh(r.count);
    c->in_flight++;

    if (cmd->type == NBD_CMD_DISC) {
        /* No reply; the requests in flight finish first. */
        nbd_cmd_free(c, cmd);
        c->state = NBD_STATE_DISCONNECTING;
        return;
    }
    if (cmd->type == NBD_CMD_WRITE && cmd->count > NBD_MAX_BLOCK) {
        /* Past the advertised maximum, a payload this size may be treated as an attack
         * (the spec's "Block size constraints"): we neither buffer nor skip it. */
        nbd_cmd_free(c, cmd);
        nbd_conn_close(c, "write of %" PRIu32 " bytes is over the maximum block size",
                       be32toh(r.count));
        return;
    }
    err = validate(c, cmd, &msg);
    if (cmd->type == NBD_CMD_WRITE && cmd->count > 0) {
        c->cur = cmd;
        if (!err && !alloc_data(c, cmd)) {
            err = NBD_ENOMEM;
            msg = "out of memory";
        }
        if (err) {
            cmd->error = err;
            cmd->error_msg = msg;
            nbd_conn_expect(c, NBD_STATE_REQ_DISCARD, NULL, cmd->count);
        } else {
            nbd_conn_expect(c, NBD_STATE_REQ_PAYLOAD, cmd->data, cmd->count);
        }
        return;
    }
    expect_header(c);
    if (err)
        reply_error(c, cmd, err, msg);
    else
        execute(c, cmd);
}

void nbd_transmission_req_payload(struct nbd_conn *c)
{
    struct nbd_cmd *cmd = c->cur;

    c->cur = NULL;
    expect_header(c);
    execute(c, cmd);
}

void nbd_transmission_req_discard(struct nbd_conn *c)
{
    struct nbd_cmd *cmd = c->cur;

    c->cur = NULL;
    expect_header(c);
    reply_error(c, cmd, cmd->error, cmd->error_msg);
}
