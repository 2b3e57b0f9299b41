/* The fixed newstyle handshake: greeting, client flags, then options until NBD_OPT_GO or
 * NBD_OPT_EXPORT_NAME enters transmission (doc/proto.md, "Handshake").
 *
 * States: CLIENT_FLAGS -> OPT_HEADER <-> OPT_DATA -> REQ_HEADER (transmission.c), or
 * DISCONNECTING after NBD_OPT_ABORT, or CLOSED on a breach the protocol cannot answer (bad
 * magic, unknown client flags, an option too long to skip, too many options, an unknown
 * export with NBD_OPT_EXPORT_NAME). Every other problem gets an NBD_REP_ERR_* reply and the
 * client may go on.
 *
 * TLS: a server without credentials refuses NBD_OPT_STARTTLS with NBD_REP_ERR_POLICY. One with
 * them serves nothing in plaintext: every option before STARTTLS but ABORT gets
 * NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which has no error reply, closes). STARTTLS's ACK goes
 * out, then TLS_HANDSHAKE runs the TLS handshake and checks the client (certificate,
 * authorization); the options start again inside the session.
 */
#include <endian.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "common/error.h"
#include "common/log.h"
#include "loop/loop.h"
#include "nbd/internal.h"

static const char zeroes[124];

/* ---- replies ---- */

static void reply_header(struct nbd_conn *c, uint32_t reply, size_t len)
{
    struct nbd_fixed_new_option_reply r = {
        .magic = htobe64(NBD_REP_MAGIC),
        .option = htobe32(c->opt),
        .reply = htobe32(reply),
        .replylen = htobe32((uint32_t)len),
    };
    buf_append(&c->out, &r, sizeof(r));
}

static void reply_ack(struct nbd_conn *c)
{
    reply_header(c, NBD_REP_ACK, 0);
}

/* An error reply, with msg for a human. */
static void reply_error(struct nbd_conn *c, uint32_t reply, const char *msg)
{
    size_t len = strlen(msg);

    log_debug("nbd: client %" PRIu64 ": option %" PRIu32 ": %s", c->id, c->opt, msg);
    reply_header(c, reply, len);
    buf_append(&c->out, msg, len);
}

static void reply_info(struct nbd_conn *c, uint16_t type, const void *data, size_t len)
{
    uint16_t t = htobe16(type);

    reply_header(c, NBD_REP_INFO, sizeof(t) + len);
    buf_append(&c->out, &t, sizeof(t));
    buf_append(&c->out, data, len);
}

/* ---- reading option data ---- */

/* A cursor over option data: every read checks the bounds. */
struct cursor {
    const unsigned char *p;
    size_t left;
};

static bool take_u32(struct cursor *cur, uint32_t *v)
{
    if (cur->left < 4)
        return false;
    memcpy(v, cur->p, 4);
    *v = be32toh(*v);
    cur->p += 4, cur->left -= 4;
    return true;
}

static bool take_u16(struct cursor *cur, uint16_t *v)
{
    if (cur->left < 2)
        return false;
    memcpy(v, cur->p, 2);
    *v = be16toh(*v);
    cur->p += 2, cur->left -= 2;
    return true;
}

/* A string of len bytes; false if it runs past the end or over NBD_MAX_STRING. */
static bool take_string(struct cursor *cur, uint32_t len, const char **s)
{
    if (len > cur->left || len > NBD_MAX_STRING)
        return false;
    *s = (const char *)cur->p;
    cur->p += len, cur->left -= len;
    return true;
}

/* ---- options ---- */

/* Enter transmission on e. */
static void attach(struct nbd_conn *c, struct nbd_export *e)
{
    c->exp = e;
    c->dev = e->dev;
    c->eflags = nbd_export_flags(c, e);
    c->size = device_root(e->dev)->size;  /* as just sent: nothing ran in between */
    e->clients++;
    /* Contexts count only for the export they were selected on. */
    if (c->meta &&
        (c->meta_export_len != e->name_len || memcmp(c->meta_export, e->name, e->name_len)))
        c->meta = 0;
    if (c->handshake_timer) {
        loop_del_timer(c->loop, c->handshake_timer);
        c->handshake_timer = 0;
    }
    free(c->opt_data);
    c->opt_data = NULL;
    log_debug("nbd: client %" PRIu64 ": export '%s'%s", c->id, e->name,
              c->structured ? ", structured replies" : "");
    nbd_transmission_start(c);
}

static void opt_export_name(struct nbd_conn *c)
{
    struct nbd_export *e;
    struct nbd_export_name_reply r;

    /* This option has no error reply: anything wrong ends the session. */
    if (c->optlen > NBD_MAX_STRING) {
        nbd_conn_close(c, "export name too long");
        return;
    }
    e = nbd_server_find_export(c->server, c->opt_data, c->optlen);
    if (!e) {
        nbd_conn_close(c, "NBD_OPT_EXPORT_NAME: no such export");
        return;
    }
    r.exportsize = htobe64(device_root(e->dev)->size);
    r.eflags = htobe16(nbd_export_flags(c, e));
    buf_append(&c->out, &r, sizeof(r));
    if (!c->no_zeroes)
        buf_append(&c->out, zeroes, sizeof(zeroes));
    attach(c, e);
}

static void opt_abort(struct nbd_conn *c)
{
    /* Data, if any, is ignored, as the spec asks. */
    reply_ack(c);
    c->state = NBD_STATE_DISCONNECTING;
}

static void opt_list(struct nbd_conn *c)
{
    if (c->optlen != 0) {
        reply_error(c, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        return;
    }
    for (struct nbd_export *e = c->server->exports.head; e; e = e->next) {
        size_t dlen = e->description ? strlen(e->description) : 0;
        uint32_t nlen = htobe32((uint32_t)e->name_len);
        reply_header(c, NBD_REP_SERVER, sizeof(nlen) + e->name_len + dlen);
        buf_append(&c->out, &nlen, sizeof(nlen));
        buf_append(&c->out, e->name, e->name_len);
        if (dlen)
            buf_append(&c->out, e->description, dlen);
    }
    reply_ack(c);
}

static void opt_starttls(struct nbd_conn *c)
{
    struct error *err = NULL;

    if (!c->server->tls_creds) {
        reply_error(c, NBD_REP_ERR_POLICY, "TLS is not supported by this server");
        return;
    }
    if (c->tls) {
        reply_error(c, NBD_REP_ERR_INVALID, "TLS already enabled");
        return;
    }
    if (c->optlen != 0) {
        reply_error(c, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        return;
    }
    /* Bytes already here came in plaintext before our reply: whatever they are, taking them
     * as if from inside the session would let a man in the middle inject them. */
    if (c->in_pos < c->in_len) {
        nbd_conn_close(c, "data after NBD_OPT_STARTTLS before its reply");
        return;
    }
    c->tls = tls_session_new(c->server->tls_creds, c->fd, &err);
    if (!c->tls) {
        nbd_conn_close(c, "%s", err->desc);
        error_free(err);
        return;
    }
    reply_ack(c);
    nbd_conn_expect(c, NBD_STATE_TLS_HANDSHAKE, NULL, 0);
}

void nbd_handshake_tls(struct nbd_conn *c)
{
    struct nbd_server *s = c->server;
    struct error *err = NULL;
    int r = tls_session_handshake(c->tls, &err);

    if (r == TLS_AGAIN)
        return;
    if (r == 0)
        r = tls_session_check_peer(c->tls, s->tls_objects, s->tls_authz, &err);
    if (r < 0) {
        log_info("nbd: client %" PRIu64 " refused: %s", c->id, err->desc);
        nbd_conn_close(c, "%s", err->desc);
        error_free(err);
        return;
    }
    c->tls_up = true;
    log_debug("nbd: client %" PRIu64 ": TLS session up", c->id);
    nbd_conn_expect(c, NBD_STATE_OPT_HEADER, c->hdr, sizeof(struct nbd_option_header));
}

/* Whether the option may run now: with TLS required, only ABORT and STARTTLS before the
 * session is up. Otherwise refuses it (EXPORT_NAME: closes) and returns false. */
static bool tls_allows(struct nbd_conn *c)
{
    if (!c->server->tls_creds || c->tls_up || c->opt == NBD_OPT_ABORT ||
        c->opt == NBD_OPT_STARTTLS)
        return true;
    if (c->opt == NBD_OPT_EXPORT_NAME) {
        nbd_conn_close(c, "NBD_OPT_EXPORT_NAME without TLS");
        return false;
    }
    char msg[64];
    snprintf(msg, sizeof(msg), "Option 0x%" PRIx32 " not permitted before TLS", c->opt);
    reply_error(c, NBD_REP_ERR_TLS_REQD, msg);
    return false;
}

/* NBD_OPT_INFO and NBD_OPT_GO: the same request and replies; GO then enters transmission. */
static void opt_info_go(struct nbd_conn *c)
{
    struct cursor cur = { (const unsigned char *)c->opt_data, c->optlen };
    bool want_name = false, want_description = false;
    uint32_t name_len;
    uint16_t nreqs;
    const char *name;
    struct nbd_export *e;

    if (!take_u32(&cur, &name_len) || name_len > cur.left) {
        reply_error(c, NBD_REP_ERR_INVALID, "malformed request: bad name length");
        return;
    }
    if (!take_string(&cur, name_len, &name)) {
        reply_error(c, NBD_REP_ERR_INVALID, "export name too long");
        return;
    }
    if (!take_u16(&cur, &nreqs) || cur.left != 2u * nreqs) {
        reply_error(c, NBD_REP_ERR_INVALID, "malformed request: bad information requests");
        return;
    }
    for (uint16_t i = 0; i < nreqs; i++) {
        uint16_t type = 0;
        take_u16(&cur, &type);
        if (type == NBD_INFO_NAME)
            want_name = true;
        else if (type == NBD_INFO_DESCRIPTION)
            want_description = true;
        /* NBD_INFO_BLOCK_SIZE is always sent; unknown requests are ignored. */
    }
    e = nbd_server_find_export(c->server, name, name_len);
    if (!e) {
        reply_error(c, NBD_REP_ERR_UNKNOWN, "export not found");
        return;
    }

    struct block_node *root = device_root(e->dev);
    struct {
        uint64_t size;
        uint16_t flags;
    } __attribute__((packed)) info_export = {
        htobe64(root->size), htobe16(nbd_export_flags(c, e)),
    };
    reply_info(c, NBD_INFO_EXPORT, &info_export, sizeof(info_export));
    if (want_name)
        reply_info(c, NBD_INFO_NAME, e->name, e->name_len);
    if (want_description && e->description)
        reply_info(c, NBD_INFO_DESCRIPTION, e->description, strlen(e->description));
    /* The root node's alignment is the smallest request it takes (O_DIRECT). */
    struct {
        uint32_t minimum, preferred, maximum;
    } __attribute__((packed)) info_bs = {
        htobe32(MAX(root->alignment, 1u)),
        htobe32(MAX(NBD_PREFERRED_BLOCK, root->alignment)),
        htobe32(NBD_MAX_BLOCK),
    };
    reply_info(c, NBD_INFO_BLOCK_SIZE, &info_bs, sizeof(info_bs));
    reply_ack(c);
    if (c->opt == NBD_OPT_GO)
        attach(c, e);
}

static void opt_structured_reply(struct nbd_conn *c)
{
    if (c->optlen != 0) {
        reply_error(c, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
        return;
    }
    if (c->structured) {
        reply_error(c, NBD_REP_ERR_INVALID, "structured replies already negotiated");
        return;
    }
    c->structured = true;
    reply_ack(c);
}

/* Our contexts by enum nbd_context, and the length of their namespace ("base:"). */
static const struct {
    const char *name;
    size_t ns_len;
} contexts[NBD_CTX_COUNT] = {
    [NBD_CTX_BASE_ALLOCATION] = { NBD_META_BASE_ALLOCATION, 5 },
    [NBD_CTX_ALLOCATION_DEPTH] = { NBD_META_ALLOCATION_DEPTH, 5 },
};

/* The contexts export e serves (bits of enum nbd_context). */
static unsigned export_contexts(const struct nbd_export *e)
{
    return 1u << NBD_CTX_BASE_ALLOCATION |
           (e->allocation_depth ? 1u << NBD_CTX_ALLOCATION_DEPTH : 0);
}

/* Which of e's contexts query selects, as QEMU 7.2: a full name; for LIST also a namespace
 * alone ("base:", "qemu:"), a wildcard for its contexts. Unknown namespaces and leaf names
 * select nothing, without error. */
static unsigned query_selects(const char *q, uint32_t len, bool list, const struct nbd_export *e)
{
    unsigned bits = 0;

    for (unsigned i = 0; i < NBD_CTX_COUNT; i++) {
        size_t ns = contexts[i].ns_len, full = strlen(contexts[i].name);
        if (len < ns || memcmp(q, contexts[i].name, ns) != 0)
            continue;
        if ((len == ns && list) || (len == full && memcmp(q, contexts[i].name, len) == 0))
            bits |= 1u << i;
    }
    return bits & export_contexts(e);
}

/* The NBD_REP_META_CONTEXT replies for the contexts selected; LIST's ids are reserved and
 * zero. */
static void reply_contexts(struct nbd_conn *c, unsigned selected, bool list)
{
    for (unsigned i = 0; i < NBD_CTX_COUNT; i++) {
        if (!(selected & 1u << i))
            continue;
        uint32_t id = htobe32(list ? 0 : i + 1);
        size_t len = strlen(contexts[i].name);
        reply_header(c, NBD_REP_META_CONTEXT, sizeof(id) + len);
        buf_append(&c->out, &id, sizeof(id));
        buf_append(&c->out, contexts[i].name, len);
    }
}

/* NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
static void opt_meta_context(struct nbd_conn *c)
{
    bool list = c->opt == NBD_OPT_LIST_META_CONTEXT;
    struct cursor cur = { (const unsigned char *)c->opt_data, c->optlen };
    uint32_t name_len, nqueries;
    const char *name;
    struct nbd_export *e;
    unsigned selected = 0;

    if (!list) {
        /* SET replaces the selection, even when it fails. */
        c->meta = 0;
        free(c->meta_export);
        c->meta_export = NULL;
        c->meta_export_len = 0;
    }
    if (!c->structured) {
        reply_error(c, NBD_REP_ERR_INVALID, "structured replies not negotiated");
        return;
    }
    if (!take_u32(&cur, &name_len) || !take_string(&cur, name_len, &name) ||
        !take_u32(&cur, &nqueries)) {
        reply_error(c, NBD_REP_ERR_INVALID, "malformed request");
        return;
    }
    /* Check every query before replying anything. */
    struct cursor queries = cur;
    for (uint32_t i = 0; i < nqueries; i++) {
        uint32_t qlen;
        const char *q;
        if (!take_u32(&cur, &qlen) || !take_string(&cur, qlen, &q)) {
            reply_error(c, NBD_REP_ERR_INVALID, "malformed query");
            return;
        }
    }
    if (cur.left != 0) {
        reply_error(c, NBD_REP_ERR_INVALID, "trailing data after the queries");
        return;
    }
    e = nbd_server_find_export(c->server, name, name_len);
    if (!e) {
        reply_error(c, NBD_REP_ERR_UNKNOWN, "export not found");
        return;
    }
    if (list && nqueries == 0)
        selected = export_contexts(e);
    for (uint32_t i = 0; i < nqueries; i++) {
        uint32_t qlen = 0;
        const char *q = NULL;
        take_u32(&queries, &qlen);
        take_string(&queries, qlen, &q);
        selected |= query_selects(q, qlen, list, e);
    }
    reply_contexts(c, selected, list);
    reply_ack(c);
    if (!list && selected) {
        c->meta = selected;
        c->meta_export = xmalloc(name_len + 1);
        memcpy(c->meta_export, name, name_len);
        c->meta_export[name_len] = '\0';
        c->meta_export_len = name_len;
    }
}

static const struct {
    uint32_t option;
    void (*fn)(struct nbd_conn *c);
} options[] = {
    { NBD_OPT_EXPORT_NAME, opt_export_name },
    { NBD_OPT_ABORT, opt_abort },
    { NBD_OPT_LIST, opt_list },
    { NBD_OPT_STARTTLS, opt_starttls },
    { NBD_OPT_INFO, opt_info_go },
    { NBD_OPT_GO, opt_info_go },
    { NBD_OPT_STRUCTURED_REPLY, opt_structured_reply },
    { NBD_OPT_LIST_META_CONTEXT, opt_meta_context },
    { NBD_OPT_SET_META_CONTEXT, opt_meta_context },
};

/* ---- state handlers ---- */

void nbd_handshake_start(struct nbd_conn *c)
{
    struct nbd_new_handshake hs = {
        .nbdmagic = htobe64(NBD_MAGIC),
        .version = htobe64(NBD_OPTS_MAGIC),
        .gflags = htobe16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES),
    };

    buf_append(&c->out, &hs, sizeof(hs));
    nbd_conn_expect(c, NBD_STATE_CLIENT_FLAGS, c->hdr, sizeof(uint32_t));
}

bool nbd_handshake_may_read(struct nbd_conn *c)
{
    return c->out.len < NBD_MAX_HANDSHAKE_OUT;
}

void nbd_handshake_client_flags(struct nbd_conn *c)
{
    uint32_t flags;

    memcpy(&flags, c->hdr, sizeof(flags));
    flags = be32toh(flags);
    /* The server MUST drop the connection on flags it does not know. A client without
     * NBD_FLAG_C_FIXED_NEWSTYLE gets fixed newstyle anyway, as the spec allows. */
    if (flags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        nbd_conn_close(c, "unknown client flags 0x%" PRIx32, flags);
        return;
    }
    c->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
    nbd_conn_expect(c, NBD_STATE_OPT_HEADER, c->hdr, sizeof(struct nbd_option_header));
}

void nbd_handshake_opt_header(struct nbd_conn *c)
{
    struct nbd_option_header h;

    memcpy(&h, c->hdr, sizeof(h));
    if (be64toh(h.magic) != NBD_OPTS_MAGIC) {
        nbd_conn_close(c, "bad option magic");
        return;
    }
    if (++c->noptions > NBD_MAX_OPTIONS) {
        nbd_conn_close(c, "too many options");
        return;
    }
    c->opt = be32toh(h.option);
    c->optlen = be32toh(h.optlen);
    if (c->optlen > NBD_MAX_OPTION_LEN) {
        nbd_conn_close(c, "option %" PRIu32 " too long (%" PRIu32 " bytes)", c->opt, c->optlen);
        return;
    }
    free(c->opt_data);
    /* One more byte, so names can be NUL-terminated for the log. */
    c->opt_data = xmalloc(c->optlen + 1);
    nbd_conn_expect(c, NBD_STATE_OPT_DATA, c->opt_data, c->optlen);
}

void nbd_handshake_opt_data(struct nbd_conn *c)
{
    c->opt_data[c->optlen] = '\0';
    if (!tls_allows(c))
        goto done;
    for (size_t i = 0; i < ARRAY_SIZE(options); i++) {
        if (options[i].option == c->opt) {
            options[i].fn(c);
            goto done;
        }
    }
    reply_error(c, NBD_REP_ERR_UNSUP, "option not supported");
done:
    /* Unless the option ended the handshake, the next one comes. */
    if (c->state == NBD_STATE_OPT_DATA)
        nbd_conn_expect(c, NBD_STATE_OPT_HEADER, c->hdr, sizeof(struct nbd_option_header));
}
