/* The block graph: block nodes, their drivers, and the requests that flow through them.
 *
 * A node is an instance of a driver: a protocol driver ("file": a regular file or a host block
 * device) or a filter/format driver over one child node ("raw", "fault"). Nodes are created by
 * --blockdev and blockdev-add from QEMU's BlockdevOptions, looked up by node name, and kept
 * alive by references: a parent node or a device (an export) holds one on its child.
 *
 * Requests are asynchronous: node_submit() queues one and its done() runs later on the loop
 * thread, never inside node_submit(). A request carries a plain errno in the data path:
 * done(req, 0) or done(req, -errno). What a client sends is validated where it enters (the
 * NBD transmission phase); node_submit() asserts the contract below (node_assert_req()), so a
 * driver's submit relies on it and does not check twice.
 *
 * Used from the loop thread only.
 */
#ifndef THINBLK_BLOCK_GRAPH_H
#define THINBLK_BLOCK_GRAPH_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <jansson.h>

#include "common/error.h"
#include "common/list.h"
#include "common/schema.h"
#include "loop/loop.h"

struct loop;
struct uring;
struct block_node;
struct secret;

enum block_op {
    BLOCK_OP_READ,
    BLOCK_OP_WRITE,
    BLOCK_OP_FLUSH,
    BLOCK_OP_DISCARD,
    BLOCK_OP_WRITE_ZEROES,
};

#define BLOCK_REQ_FUA 1u       /* WRITE, WRITE_ZEROES: durable when done */
#define BLOCK_REQ_MAY_UNMAP 2u /* WRITE_ZEROES: may deallocate */

/* A READ or WRITE carries its len bytes in one of two ways: niov == 0, one buffer buf; or
 * niov > 0, the vector iov[0..niov) (buf NULL), whose lengths add up to len and whose
 * segments have their address and length multiples of the node's alignment (O_DIRECT reads
 * and writes them as they are). Either is owned by the submitter and must stay valid, and
 * the vector unchanged, until done() (a parked request still points to it: its submitter
 * keeps it). Other operations carry no vector (niov 0); their buf means nothing. */
struct block_req {
    enum block_op op;
    unsigned flags;
    uint64_t offset;
    uint64_t len;
    void *buf;
    const struct iovec *iov;
    unsigned niov;
    void (*done)(struct block_req *req, int ret);
    void *opaque;  /* the submitter's */
};

/* Block status (QEMU's bdrv_block_status): what the bytes of a node are, extent by extent.
 * Answers, in struct block_status and in a driver's struct block_status_call: */
#define BLOCK_STATUS_DATA 1u        /* allocated data: read from storage */
#define BLOCK_STATUS_ZERO 2u        /* reads as zeroes */
#define BLOCK_STATUS_ALLOCATED 4u   /* this node says what it reads as, not a backing node */
/* A driver's call only: */
#define BLOCK_STATUS_OFFSET_VALID 8u  /* the bytes are at map of file */
#define BLOCK_STATUS_RECURSE 16u    /* with DATA and OFFSET_VALID: ask file whether it is a hole */
#define BLOCK_STATUS_RAW 32u        /* no answer here: it is file's at map (a filter) */

struct block_status;

/* One question to a driver: the first extent of [offset, offset + len) of its node. len > 0;
 * over a child (where the size is fixed) the range is within the node; a protocol node
 * answers past its end itself (a file grows under the format driver over it). */
struct block_status_call {
    uint64_t offset, len;
    bool want_zero;            /* ZERO as far as cheaply known; false: allocation only */
    struct block_status *st;   /* for block_status_resume() */
    /* The answer: */
    uint64_t pnum;             /* 1..len bytes with these flags */
    unsigned flags;            /* DATA, ZERO, OFFSET_VALID, RECURSE, RAW */
    uint64_t map;              /* OFFSET_VALID or RAW: the offset in file */
    struct block_node *file;
};

/* A block status query (node_block_status()). The caller fills offset, len, want_zero, done
 * and opaque, and keeps the struct until done(st, ret), ret 0 or -errno. */
struct block_status {
    uint64_t offset, len;
    bool want_zero;            /* as in struct block_status_call */
    void (*done)(struct block_status *st, int ret);
    void *opaque;              /* the caller's */
    /* The answer, QEMU's bdrv_block_status_above() with depth: */
    uint64_t pnum;             /* 1..len bytes from offset with these flags */
    unsigned flags;            /* DATA, ZERO, ALLOCATED */
    unsigned depth;            /* 1: allocated in the node, 2: in its backing, ...; 0: nowhere */
    /* The graph's: */
    struct block_node *node;
    int ret;
    struct loop_deferred done_call;
};

struct block_driver {
    const char *name;
    /* Open n from opts (BlockdevOptions, checked against block_options: the driver reads
     * its members without checking them); sets n->size, may set n->file. Returns 0 or -1
     * with *errp set. */
    int (*open)(struct block_node *n, json_t *opts, struct error **errp);
    /* Optional: the part of open that blocks (connecting to a cluster, opening an image),
     * apart so that block_node_create_async() runs it on the offload thread. Runs on any
     * thread and touches nothing of the loop's; read_only is the node's. Returns the driver's
     * handle, which open then finds in n->opaque (and owns, even if it fails; with n->opaque
     * NULL, open does it all itself), or NULL with *errp set. drop_prepared: release a handle
     * no open took; blocks, any thread. secret: the bytes of the secret object named by the
     * member secret_option of opts, looked up on the loop thread (block_graph_secret()), or
     * NULL if opts names none; borrowed for the call. */
    void *(*prepare)(json_t *opts, bool read_only, const struct secret *secret,
                     struct error **errp);
    const char *secret_option;  /* e.g. rbd's "key-secret"; NULL: prepare gets no secret */
    void (*drop_prepared)(void *handle);
    void (*close)(struct block_node *n);
    void (*submit)(struct block_node *n, struct block_req *req);
    /* Bytes allocated on the host (QEMU's actual-size), or -1 if unknown. NULL in drivers
     * over a child: the child's answer is used (and its own child's, down to the file). */
    int64_t (*allocated)(struct block_node *n);
    /* The host file name for queries ("filename", "file"). NULL over a child, as above. */
    const char *(*filename)(struct block_node *n);
    /* Update n->size from the storage, whose size may change under the node (a host block
     * device that was extended: QEMU's host_device has a variable length too), through
     * block_node_set_size(). May be NULL. */
    void (*refresh_size)(struct block_node *n);
    /* block_resize (QEMU's bdrv_co_truncate): make n size bytes (checked by
     * block_node_resize()) and set it with block_node_set_size(). Returns 0 or -1 with *errp
     * set (QEMU's texts). NULL: the driver cannot resize. */
    int (*truncate)(struct block_node *n, uint64_t size, struct error **errp);
    /* Optional, beside truncate: its blocking part alone, for block_node_resize_async(),
     * which runs it on the offload thread (n's state stays while it runs; I/O goes on) and
     * sets the size itself. Returns 0 or -1 with *errp set. */
    int (*truncate_blocking)(struct block_node *n, uint64_t size, struct error **errp);
    /* Instead of truncate, for a node that resizes by resizing its file (raw): the size
     * n->file must take for n to be size bytes (*child_size), or -1 with *errp set (QEMU's
     * texts). The graph resizes the file (blocking or offloaded, as the file's driver does)
     * and n's size follows through child_resized. */
    int (*resize_child)(struct block_node *n, uint64_t size, uint64_t *child_size,
                        struct error **errp);
    /* Whether n needs n->file's size to stay as it is (QEMU: n does not share the resize
     * permission on it): a qcow2 node, a raw node with a fixed size. May be NULL: false. */
    bool (*keeps_child_size)(struct block_node *n);
    /* n->file's size changed: a node whose size follows its child's sets its own. May be
     * NULL (the node's size does not depend on its child's). */
    void (*child_resized)(struct block_node *n);
    /* Backing files (optional; qcow2). open_backing: attach n->backing once n is in the graph
     * (QEMU lists a node before its backing chain); runs with graph->opening == n. Returns 0
     * or -1 with *errp set, and the node is then removed. backing_overridden: whether the
     * backing differs from what the image names (QEMU then reports a "json:" filename).
     * query_image: add the driver's members to the node's ImageInfo. */
    int (*open_backing)(struct block_node *n, struct error **errp);
    bool (*backing_overridden)(struct block_node *n);
    void (*query_image)(struct block_node *n, json_t *image);
    /* Answer c (block_status_call above; may be NULL: a node over a child then passes the
     * question to it, RAW, and one without says DATA). Returns 0 with the answer in c,
     * -errno, or 1: the answer needs I/O, and block_status_resume(c->st, ret) follows (never
     * inside this call), after which the query asks again from its top. So an answer must not
     * change state, and a driver that waits must find what it waited for the next time. */
    int (*block_status)(struct block_node *n, struct block_status_call *c);
};

/* detect-zeroes (QEMU's BlockdevDetectZeroesOptions), in the order of its names. */
enum block_detect_zeroes {
    BLOCK_DETECT_ZEROES_OFF,
    BLOCK_DETECT_ZEROES_ON,     /* a write of zeroes becomes a write-zeroes */
    BLOCK_DETECT_ZEROES_UNMAP,  /* ... that may deallocate (requires discard=unmap) */
};

DECLARE_LIST_HEAD(block_node_queue, struct block_node)

/* Told when a node's size changes (block_resize, a host device found extended), after
 * n->size has the new value. The listener is the caller's; it must stay valid while added. */
struct block_size_listener {
    struct block_size_listener *next;
    void (*changed)(struct block_size_listener *l, struct block_node *n);
};
DEFINE_QUEUE_TYPE(block_size_listeners, struct block_size_listener, next)

struct block_graph {
    block_node_queue nodes;    /* in creation order */
    struct loop *loop;
    struct uring *uring;
    /* BLOCK_WRITE_THRESHOLD and other node events: name and data (stolen). */
    void (*emit)(void *opaque, const char *name, json_t *data);
    void *emit_opaque;
    unsigned anon_counter;     /* for generated node names, "#block123" as QEMU */
    struct block_node *opening;  /* the node whose driver is opening (for its children) */
    unsigned offloaded;        /* prepares and closes running on the offload thread */
    /* While a block_node_create_async() opens its node: what was prepared for it and its
     * inline children (graph.c). NULL otherwise. */
    struct prepared *prepared;
    size_t nprepared;
    bool freeing;              /* block_graph_free(): closes run here, not offloaded */
    /* QEMU's secret objects, for drivers' secret options (block_graph_secret()): a copy of
     * secret id's bytes into *out, or -1 with *errp set (QEMU's texts). Set by the daemon
     * after block_graph_new(); NULL: there are no secrets. Loop thread. */
    int (*get_secret)(void *opaque, const char *id, struct secret *out, struct error **errp);
    void *secret_opaque;
};

struct block_node {
    struct block_node *next;   /* graph->nodes */
    struct block_graph *graph;
    char *node_name;
    const struct block_driver *drv;
    void *opaque;              /* the driver's state */
    struct block_node *file;   /* the child, for filter and format drivers; a reference */
    struct block_node *backing; /* the backing (copy-on-write) child, a reference, or NULL */
    struct block_node *opener; /* while this node opens: the node whose open created it */
    unsigned refs;             /* parents and devices using this node, +1 while in the graph */
    bool in_graph;             /* listed in graph->nodes (false once blockdev-del took it) */
    bool implicit;             /* created inline as a child: goes with its last parent */
    uint64_t size;             /* bytes; changed only by block_node_set_size() */
    block_size_listeners size_listeners;
    uint32_t alignment;        /* bytes every request's offset and length must be multiple of */
    bool read_only;
    bool discard_unmap;        /* discard=unmap: discards reach the storage */
    enum block_detect_zeroes detect_zeroes;
    bool cache_direct;         /* cache.direct as asked for (QEMU reports the option) */
    bool no_flush;             /* cache.no-flush */
    /* Write threshold (QEMU's block-set-write-threshold): armed while not 0; one-shot. */
    uint64_t write_threshold;
    uint64_t wr_highest_offset;  /* the highest byte written + 1 */
};

DEFINE_QUEUE_FUNCTIONS(block_node_queue, struct block_node, next)

/* A new, empty graph; file I/O goes to uring, events to emit. */
struct block_graph *block_graph_new(struct loop *loop, struct uring *uring,
                                    void (*emit)(void *opaque, const char *name, json_t *data),
                                    void *emit_opaque);
/* Free the graph and every node in it. Nothing may be in flight. */
void block_graph_free(struct block_graph *g);

/* The node named name, or NULL. */
struct block_node *block_graph_find(struct block_graph *g, const char *name);

/* QEMU's BDRV_MAX_LENGTH: no node may be larger. */
#define BLOCK_MAX_LENGTH 9223372035781033984ULL

/* QEMU's BlockdevOptions: the base ("driver", "node-name", "discard", "cache": {"direct",
 * "no-flush"}, "read-only", ...) and, by "driver", the driver's own members (each driver's
 * table below). Children given as objects are BlockdevOptions too, checked with their
 * parent. blockdev-add, --blockdev and the backing files an image names are checked against
 * it before block_node_create(). */
extern const struct schema_member block_options[];
extern const struct schema_member block_file_options[];   /* file.c (and host_device) */
extern const struct schema_member block_raw_options[];    /* raw.c */
extern const struct schema_member block_fault_options[];  /* fault.c */
extern const struct schema_member block_qcow2_options[];  /* qcow2.c */
#ifdef THINBLK_HAVE_RBD
extern const struct schema_member block_rbd_options[];    /* rbd.c */
#endif

/* A member that is QEMU's BlockdevRef: a node name, or BlockdevOptions for a new node. */
#define BLOCK_REF_MEMBER(name_, ...)                                                       \
    { name_, SCHEMA_ALT, .alt = SCHEMA_ALT_STR | SCHEMA_ALT_OBJECT, .alt_name = "BlockdevRef", \
      .members = block_options, __VA_ARGS__ }

/* Create a node from BlockdevOptions opts (borrowed, checked against block_options). Checks
 * what the schema cannot (the node name) and opens it; children given as an object are
 * created too (anonymous ones get a "#blockN" name). Returns the node, with one reference
 * held by the graph, or NULL with *errp set (QEMU's texts). */
struct block_node *block_node_create(struct block_graph *g, json_t *opts, struct error **errp);

/* Whether creating a node from opts (checked) may block: its driver, or that of one of its
 * inline children (at any depth), has prepare. Then blockdev-add uses
 * block_node_create_async(). --blockdev opens synchronously, blocking in the prepares. */
bool block_node_opens_later(json_t *opts);
/* block_node_create() with the prepares of the node and its inline children on the offload
 * thread (one after the other; the secrets looked up first): the node name is checked now,
 * the node created on the loop thread once they are done (its name checked again: another
 * node may have taken it meanwhile), each node whose options are those of a prepare taking
 * its handle, or failing with its error, when the open reaches it (handles left over are
 * dropped). opts is borrowed (copied). Returns 0 and
 * done(node or NULL, err or NULL, opaque) follows, never inside this call; or -1 with *errp
 * set. The node, if any, has the graph's one reference, whether or not done's caller is still
 * interested. */
int block_node_create_async(struct block_graph *g, json_t *opts,
                            void (*done)(struct block_node *n, const struct error *err,
                                         void *opaque),
                            void *opaque, struct error **errp);
/* For a driver's close: run work(opaque) on the offload thread, counted in
 * block_graph_busy(); at block_graph_free() (the loop is not run again) or if no thread can
 * be started, here. work must free what it is given. */
void block_graph_offload_close(struct block_graph *g, void (*work)(void *opaque),
                               void *opaque);
/* The secret object that opts' member (a string naming its id) names, for a driver: a copy
 * of its bytes into *out (the caller clears it with secret_clear()), or out->data NULL if opts
 * has no such member. Loop thread. Returns 0, or -1 with *errp set ("No secret with id"). */
int block_graph_secret(struct block_graph *g, json_t *opts, const char *member,
                       struct secret *out, struct error **errp);
/* Whether a prepare or a close runs on the offload thread: the graph must not be freed. */
bool block_graph_busy(const struct block_graph *g);

/* blockdev-del: remove a node nobody uses. Returns 0 or -1 with *errp set. */
int block_node_delete(struct block_graph *g, const char *name, struct error **errp);

/* Resolve a child reference (a checked BlockdevRef): a node name (string) or options for a
 * new node (object). Returns the node with a new reference for the caller, or NULL with
 * *errp set. */
struct block_node *block_node_open_child(struct block_graph *g, json_t *ref,
                                         struct error **errp);

void block_node_ref(struct block_node *n);
/* Drop a reference; the last one closes the node and drops its child's reference. */
void block_node_unref(struct block_node *n);

/* QEMU's block_resize on n: refused where QEMU refuses it (a backing node, a file that a
 * qcow2 node or a fixed-size raw node sits on, a size past QEMU's maximum, a read-only node),
 * else the driver's truncate. device names the device the node was found by, for QEMU's "in
 * use" text (NULL: none). May block briefly (qcow2 metadata writes, as at open). Returns 0
 * or -1 with *errp set. */
int block_node_resize(struct block_node *n, uint64_t size, const char *device,
                      struct error **errp);
/* Whether resizing n (or the file under it and its raw nodes over it, resize_child) runs on
 * the offload thread: then block_resize uses this: */
bool block_node_resizes_later(const struct block_node *n);
/* block_node_resize() with the driver's truncate_blocking on the offload thread (that of n,
 * or of the file under n's raw nodes, whose sizes follow on the loop thread once it is done).
 * Returns 0 and done(err or NULL, opaque) follows, never inside this call (n and the resized
 * node hold a reference meanwhile: blockdev-del finds them busy); or -1 with *errp set. */
int block_node_resize_async(struct block_node *n, uint64_t size, const char *device,
                            void (*done)(const struct error *err, void *opaque), void *opaque,
                            struct error **errp);
/* Set n's size; if it changed, tell its listeners and the parents whose size follows it. */
void block_node_set_size(struct block_node *n, uint64_t size);
/* Add or remove a listener of n's size changes. */
void block_node_add_size_listener(struct block_node *n, struct block_size_listener *l);
void block_node_remove_size_listener(struct block_node *n, struct block_size_listener *l);

/* Submit req to n. Writes update the write threshold bookkeeping; with detect-zeroes, a write
 * whose data is all zero goes to the driver as a write-zeroes (req itself is not changed).
 * req must keep the contract of node_assert_req(); a request that does not is a bug in the
 * caller, and aborts. */
void node_submit(struct block_node *n, struct block_req *req);
/* Assert (in every build, common/assert.h) that req may go to n: done is set; op and flags
 * are known ones; a request other than a flush has len > 0, offset + len without overflow,
 * both multiples of n's alignment; a read or a write has a buf (of len bytes: the submitter's
 * word) or a vector as struct block_req says (its lengths and alignment checked), other
 * operations no vector; no write, write-zeroes or discard goes to a read-only node. A flush's
 * offset and len mean nothing. Not the range: below a format, a node's end is not fixed (qcow2 allocates past
 * the end of its file, through a filter too); a driver with a fixed end asserts it (qcow2: its
 * virtual size). */
void node_assert_req(const struct block_node *n, const struct block_req *req);
/* The data of req (a READ or a WRITE) as a vector: req->iov, or req->buf as the one segment
 * *one (the caller's storage). Sets *n to the number of segments. */
const struct iovec *block_req_iov(const struct block_req *req, struct iovec *one, unsigned *n);

/* Block status of n (status.c): the first extent of [st->offset, st->offset + st->len)
 * (within n's size, len > 0), through n's backing chain as QEMU's bdrv_block_status_above():
 * where n leaves a range unallocated, its backing (and its backing's...) answers, with depth.
 * st->done(st, ret) runs later, never inside this call. */
void node_block_status(struct block_node *n, struct block_status *st);
/* A filter driver's answer: ask child at map instead (RAW), for all of c's range. */
void block_status_pass(struct block_status_call *c, struct block_node *child, uint64_t map);
/* A driver that returned 1 from block_status: the I/O it waited for is done (ret 0) or
 * failed (-errno). */
void block_status_resume(struct block_status *st, int ret);

/* The node's entry of query-named-block-nodes (QEMU's BlockDeviceInfo), with the backing
 * chain's images nested (flat=false, as query-block) or not. The size of a node that can
 * change under it (a host block device) is read again first. */
json_t *block_node_info(struct block_node *n);
json_t *block_node_info_flat(struct block_node *n, bool flat);
/* The node's filename as QEMU reports it: its file's name, or "json:{...}" where options
 * (an overridden backing) make the file name alone not describe it. Caller frees. */
char *block_node_filename(struct block_node *n);

/* Driver tables. */
extern const struct block_driver block_driver_file;
extern const struct block_driver block_driver_host_device; /* QEMU's name for "file" on a device */
extern const struct block_driver block_driver_raw;
extern const struct block_driver block_driver_fault;
extern const struct block_driver block_driver_qcow2;
#ifdef THINBLK_HAVE_RBD
extern const struct block_driver block_driver_rbd;  /* built with librbd and librados */
#endif

/* Re-read the size of a "file"/"host_device" node n from the kernel (after blockdev-create
 * wrote past the end of its file). Does not block on I/O. */
void file_node_refresh_size(struct block_node *n);

#endif
