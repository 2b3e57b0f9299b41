/* Inside the NBD server: the connection and its state machine, shared by server.c (listening,
 * exports), connection.c (socket I/O, lifetime), handshake.c and transmission.c (the two
 * protocol phases). Not for use outside src/nbd.
 *
 * A connection reads one message at a time: the state names the message expected next, and
 * nbd_conn_expect() says where its bytes go and how many there are. When they are all in, the
 * state's handler (one per state, see connection.c) runs and sets up the next message. The
 * states past the reading ones are TLS_HANDSHAKE (GnuTLS reads and writes the socket itself
 * until the session is up), DISCONNECTING (no more input; close once every reply is
 * out) and CLOSED (terminal: the socket is closed; the object lives on until the requests
 * still at the device have come back).
 *
 * Everything runs on the loop thread.
 */
#ifndef THINBLK_NBD_INTERNAL_H
#define THINBLK_NBD_INTERNAL_H

#include <stdbool.h>
#include <sys/types.h>
#include <stddef.h>
#include <stdint.h>

#include "common/list.h"
#include "common/unix-socket.h"
#include "common/util.h"
#include "device/device.h"
#include "loop/loop.h"
#include "nbd/protocol.h"
#include "nbd/server.h"
#include "tls/objects.h"
#include "tls/session.h"

/* Limits on what a client may make us hold. */
#define NBD_MAX_OPTION_LEN (64u * 1024)         /* option data; longer: hard disconnect */
#define NBD_MAX_OPTIONS 128u                    /* options per handshake; more: disconnect */
#define NBD_HANDSHAKE_TIMEOUT_NS (10ull * 1000 * 1000 * 1000)  /* QEMU's default too */
#define NBD_MAX_HANDSHAKE_OUT (1024u * 1024)    /* unsent option replies before we pause */
#define NBD_MAX_BLOCK (32u * 1024 * 1024)       /* maximum block size: READ/WRITE length */
#define NBD_PREFERRED_BLOCK 4096u
#define NBD_MAX_IN_FLIGHT 64u                   /* requests read whose reply is not out */
#define NBD_MAX_BUFFERED (64u * 1024 * 1024)    /* their data buffers, in bytes */
#define NBD_BUF_ALIGN 4096u                     /* data buffers, for O_DIRECT */
#define NBD_BUF_CLASSES 14u                     /* their sizes: 4 KiB << 0..13 (32 MiB) */
#define NBD_BUF_CACHE_MAX (16u * 1024 * 1024)   /* freed ones kept for reuse, in bytes */
#define NBD_BUF_CACHE_IDLE_NS (2ull * 1000 * 1000 * 1000)  /* idle this long: release */
#define NBD_STATUS_EXTENTS 1024u                /* block status descriptors per context */
#define NBD_STATUS_STEPS 512u                   /* block status queries per context and request */
#define NBD_IN_BUF_SIZE (16u * 1024)
#define NBD_RECV_BUDGET 16u                     /* recv() calls per wakeup, for fairness */

enum nbd_state {
    /* handshake.c */
    NBD_STATE_CLIENT_FLAGS,  /* 32 bits of client flags */
    NBD_STATE_OPT_HEADER,    /* an option header */
    NBD_STATE_OPT_DATA,      /* its data */
    /* transmission.c */
    NBD_STATE_REQ_HEADER,    /* a request header */
    NBD_STATE_REQ_PAYLOAD,   /* a valid write's data, into its buffer */
    NBD_STATE_REQ_DISCARD,   /* an invalid write's data, dropped */
    /* handshake.c, after NBD_OPT_STARTTLS: no message; the TLS handshake, then OPT_HEADER */
    NBD_STATE_TLS_HANDSHAKE,
    /* no more input */
    NBD_STATE_DISCONNECTING,
    NBD_STATE_CLOSED,        /* terminal */
};

/* Metadata contexts: context i is bit 1u << i of a selection, and has id i + 1 on the wire. */
enum nbd_context {
    NBD_CTX_BASE_ALLOCATION,
    NBD_CTX_ALLOCATION_DEPTH,
    NBD_CTX_COUNT,
};

/* Block status descriptors of one context (extents.c), in host byte order. */
struct nbd_extent {
    uint32_t length, flags;
};

struct nbd_extents {
    struct nbd_extent *e;  /* room for max */
    unsigned n, max;
};

/* A block status request's answer in the making (transmission.c). */
struct nbd_status {
    struct dev_status ds;
    unsigned ctx;              /* enum nbd_context being answered */
    uint64_t pos;              /* where its next query starts */
    unsigned steps;            /* its queries so far */
    struct nbd_extents ext[NBD_CTX_COUNT];
    void *reply;               /* the chunks, once built */
};

struct nbd_export {
    struct nbd_export *next;  /* server->exports */
    char *name;
    size_t name_len;
    char *description;        /* NULL if none */
    struct device *dev;       /* not a reference: see nbd_server_add_export() */
    bool writable;
    bool allocation_depth;    /* serves qemu:allocation-depth */
    unsigned clients;         /* connections in transmission on it */
};

DEFINE_QUEUE_TYPE(nbd_export_queue, struct nbd_export, next)

/* One request from reading its header to having sent its reply. */
struct nbd_cmd {
    struct dev_req dreq;     /* while at the device: the device's */
    struct nbd_conn *conn;
    struct nbd_cmd *next;    /* conn->replies */
    uint16_t type, flags;
    uint64_t handle;
    uint64_t offset;
    uint32_t count;
    void *data;              /* READ/WRITE: count bytes, NBD_BUF_ALIGN-aligned */
    size_t data_cap;         /* its size: a power of two */
    uint32_t error;          /* NBD_E* found while reading it (an invalid write) */
    const char *error_msg;
    bool flush_after;        /* TRIM with FUA: a flush follows the discard */
    struct nbd_status *status;  /* BLOCK_STATUS */
    /* The reply: header bytes, then payload (a read's data). */
    unsigned char reply[128];
    size_t reply_len;
    const void *payload;
    size_t payload_len;
    size_t sent;             /* of reply_len + payload_len */
};

DEFINE_QUEUE_TYPE(nbd_cmd_queue, struct nbd_cmd, next)

struct nbd_conn {
    struct nbd_conn *prev, *next;  /* server->conns, while open */
    struct nbd_server *server;     /* NULL once closed */
    struct loop *loop;
    uint64_t id;                   /* for the log */
    int fd;                        /* -1 once closed */
    unsigned refs;                 /* open + requests at the device + pending calls */
    enum nbd_state state;
    unsigned watched;              /* LOOP_* registered with the loop */
    bool eof;                      /* the client shut its side */
    bool paused;                   /* back-pressure: not starting a new message */
    bool running, rerun;
    struct loop_deferred run_call; /* on_deferred_run(), while queued (holds a reference) */
    uint64_t handshake_timer;
    /* TLS: the session from NBD_OPT_STARTTLS on; once tls_up (handshake done, client
     * accepted), every byte in and out goes through it. */
    struct tls_session *tls;
    bool tls_up;
    /* What conn_send() gathers into one TLS record (allocated on the first use). */
    char *tls_record;

    /* Input: bytes read ahead, and the message being assembled. */
    char in[NBD_IN_BUF_SIZE];
    size_t in_pos, in_len;
    void *dst;                     /* NULL: drop the bytes */
    size_t need, got;
    unsigned char hdr[32];         /* headers land here */

    /* Handshake. */
    bool no_zeroes;
    unsigned noptions;
    uint32_t opt;                  /* the option being handled */
    uint32_t optlen;
    char *opt_data;
    bool structured;               /* structured replies negotiated */
    unsigned meta;                 /* contexts selected (bits of enum nbd_context) ... */
    char *meta_export;             /* ... for this export name */
    size_t meta_export_len;

    /* Transmission. */
    struct nbd_export *exp;        /* NULL until GO, and once closed */
    struct device *dev;
    uint16_t eflags;
    /* The export's size the client was told. NBD has no resize notice: a node that grew
     * since serves the new size to clients that connect again, not to this one. */
    uint64_t size;
    struct dev_waiter waiter;
    bool waiting;                  /* waiter registered with dev */
    struct nbd_cmd *cur;           /* the request whose payload is being read */
    unsigned in_flight;            /* requests read whose reply is not fully sent */
    unsigned in_device;            /* of which at the device */
    size_t buffered;               /* bytes of their data buffers */
    void *buf_cache[NBD_BUF_CLASSES];  /* freed buffers by size class, linked through */
    size_t buf_cache_bytes;
    uint64_t buf_cache_timer;      /* releases the cache once idle */

    /* Output: option replies first, then request replies in completion order. */
    struct buf out;
    nbd_cmd_queue replies;
};

DEFINE_LIST_TYPE(nbd_conn_list, struct nbd_conn, prev, next)

struct nbd_server {
    struct loop *loop;
    int listen_fd;             /* -1 for a server without a listener (tests, fuzzing) */
    bool listen_inet;          /* TCP: set TCP_NODELAY on clients */
    bool listen_paused;        /* not accepting: max_connections reached or out of fds */
    uint64_t accept_timer;     /* resumes accepting after running out of fds */
    struct unix_listener unix_sock;  /* removed at stop (if still ours) */
    uint32_t max_connections;  /* 0: no limit */
    nbd_export_queue exports;  /* in creation order */
    nbd_conn_list conns;       /* open connections */
    unsigned nconns;
    uint64_t next_conn_id;
    /* TLS required (nbd_server_set_tls()): creds a reference, authz_id checked against
     * objects at each client's handshake, as QEMU looks its authz object up then. */
    struct tls_creds *tls_creds;
    struct tls_objects *tls_objects;
    char *tls_authz;
};

/* ---- connection.c ---- */

/* A connection on fd (owned from now on), in server s's list; starts the handshake. It may
 * be closed (and gone) by the time this returns. */
void nbd_conn_new(struct nbd_server *s, int fd);
/* Expect the next message: state, need bytes into dst (NULL: drop them). */
void nbd_conn_expect(struct nbd_conn *c, enum nbd_state state, void *dst, size_t need);
/* Hard disconnect: close the socket, drop queued replies; fmt says why (for the log). */
void nbd_conn_close(struct nbd_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void nbd_conn_ref(struct nbd_conn *c);
/* Drop a reference; the last frees a closed connection. */
void nbd_conn_unref(struct nbd_conn *c);
/* Run the connection (send, read, handle) later in this loop iteration. */
void nbd_conn_schedule(struct nbd_conn *c);
/* Queue cmd's reply (built in cmd->reply/payload) to be sent. */
void nbd_conn_queue_reply(struct nbd_conn *c, struct nbd_cmd *cmd);

/* ---- handshake.c ---- */

/* Queue the greeting and expect the client's flags. */
void nbd_handshake_start(struct nbd_conn *c);
/* The handlers of the handshake's states, run when the state's message is complete. */
void nbd_handshake_client_flags(struct nbd_conn *c);
void nbd_handshake_opt_header(struct nbd_conn *c);
void nbd_handshake_opt_data(struct nbd_conn *c);
/* TLS_HANDSHAKE: go on with the TLS handshake (its first step once the STARTTLS reply is
 * out); once done and the client accepted, expect the next option. */
void nbd_handshake_tls(struct nbd_conn *c);
/* Whether to read more options: not while many replies are unsent. */
bool nbd_handshake_may_read(struct nbd_conn *c);

/* ---- transmission.c ---- */

/* Enter transmission on c->exp. */
void nbd_transmission_start(struct nbd_conn *c);
/* The handlers of the transmission's states, run when the state's message is complete. */
void nbd_transmission_req_header(struct nbd_conn *c);
void nbd_transmission_req_payload(struct nbd_conn *c);
void nbd_transmission_req_discard(struct nbd_conn *c);
/* Whether a new request may be read now (limits, device accepting; may register a waiter). */
bool nbd_transmission_may_read(struct nbd_conn *c);
/* The transmission flags c gets for export e. */
uint16_t nbd_export_flags(const struct nbd_conn *c, const struct nbd_export *e);
/* Free cmd (its buffer to c's cache), and account for it in c. */
void nbd_cmd_free(struct nbd_conn *c, struct nbd_cmd *cmd);
/* Release c's cache of data buffers (and its timer). */
void nbd_transmission_release_buffers(struct nbd_conn *c);

/* ---- extents.c ---- */

/* Add len bytes of status flags after x's extents: merged into the last one when its flags
 * are the same (up to 2^32 - 1 bytes), else as a new one. Returns the bytes taken: len, or
 * less once x holds max extents. */
uint64_t nbd_extents_add(struct nbd_extents *x, uint64_t len, uint32_t flags);

/* ---- server.c ---- */

/* The export named name (name_len bytes, not NUL-terminated), or NULL. */
struct nbd_export *nbd_server_find_export(struct nbd_server *s, const char *name,
                                          size_t name_len);
/* c closed: take it off the list, count it off its export, accept again if we stopped. */
void nbd_server_forget_conn(struct nbd_server *s, struct nbd_conn *c);

#endif
