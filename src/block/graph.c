/* The block graph. See graph.h. */
#include "block/graph.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "common/assert.h"
#include "common/iov.h"
#include "common/log.h"
#include "common/qjson.h"
#include "common/util.h"
#include "job/offload.h"
#include "tls/secret.h"

static const struct block_driver *const drivers[] = {
    &block_driver_file,
    &block_driver_host_device,
    &block_driver_raw,
    &block_driver_fault,
    &block_driver_qcow2,
#ifdef THINBLK_HAVE_RBD
    &block_driver_rbd,
#endif
};

struct block_graph *block_graph_new(struct loop *loop, struct uring *uring,
                                    void (*emit)(void *opaque, const char *name, json_t *data),
                                    void *emit_opaque)
{
    struct block_graph *g = xzalloc(sizeof(*g));

    g->loop = loop;
    g->uring = uring;
    g->emit = emit;
    g->emit_opaque = emit_opaque;
    return g;
}

static void graph_unlink(struct block_graph *g, struct block_node *n);

static void node_close(struct block_node *n)
{
    if (n->drv && n->drv->close)
        n->drv->close(n);
    if (n->file)
        block_node_unref(n->file);
    if (n->backing)
        block_node_unref(n->backing);
    free(n->node_name);
    free(n);
}

void block_node_ref(struct block_node *n)
{
    n->refs++;
}

void block_node_unref(struct block_node *n)
{
    if (--n->refs == 1 && n->implicit && n->in_graph) {
        graph_unlink(n->graph, n);  /* only the graph was left holding an implicit node */
        n->refs = 0;
    }
    if (n->refs == 0)
        node_close(n);
}

static void graph_unlink(struct block_graph *g, struct block_node *n)
{
    if (block_node_queue_remove(&g->nodes, n))
        n->in_graph = false;
}

void block_graph_free(struct block_graph *g)
{
    if (!g)
        return;
    ASSERT(g->offloaded == 0);
    g->freeing = true;
    /* Newest first: parents were created after their children and go before them. */
    while (!block_node_queue_empty(&g->nodes)) {
        struct block_node *last = g->nodes.last;
        graph_unlink(g, last);
        block_node_unref(last);
    }
    free(g);
}

struct block_node *block_graph_find(struct block_graph *g, const char *name)
{
    for (struct block_node *n = g->nodes.head; n; n = n->next) {
        if (strcmp(n->node_name, name) == 0)
            return n;
    }
    return NULL;
}

/* QEMU's BlockdevDiscardOptions: -drive's "on" and "off" are not --blockdev's. */
static const char *const discard_values[] = { "ignore", "unmap", NULL };
/* Indexed by enum block_detect_zeroes. */
static const char *const detect_zeroes_values[] = { "off", "on", "unmap", NULL };

static const struct schema_member cache_options[] = {
    { "direct", SCHEMA_BOOL, .optional = true },
    { "no-flush", SCHEMA_BOOL, .optional = true },
    { NULL },
};

/* The drivers' own members (QEMU's BlockdevOptions<Driver>), after the base's. */
static const struct schema_variant driver_variants[] = {
    { "file", block_file_options },
    { "host_device", block_file_options },
    { "raw", block_raw_options },
    { "fault", block_fault_options },
    { "qcow2", block_qcow2_options },
#ifdef THINBLK_HAVE_RBD
    { "rbd", block_rbd_options },
#endif
    { NULL },
};

/* QEMU's BlockdevOptions base, in its order. */
const struct schema_member block_options[] = {
    { "driver", SCHEMA_ENUM, .variants = driver_variants },
    { "node-name", SCHEMA_STR, .optional = true },
    { "discard", SCHEMA_ENUM, .optional = true, .values = discard_values },
    { "cache", SCHEMA_OBJECT, .optional = true, .members = cache_options },
    { "read-only", SCHEMA_BOOL, .optional = true },
    /* Accepted for compatibility with QEMU's command lines; thinblk always behaves so. */
    { "auto-read-only", SCHEMA_BOOL, .optional = true },
    { "force-share", SCHEMA_BOOL, .optional = true },
    { "detect-zeroes", SCHEMA_ENUM, .optional = true, .values = detect_zeroes_values },
    { NULL },
};

/* The generic options, checked already. */
static int read_generic(struct block_node *n, json_t *opts, struct error **errp)
{
    const char *discard = json_string_value(json_object_get(opts, "discard"));
    json_t *cache = json_object_get(opts, "cache");
    const char *dz = json_string_value(json_object_get(opts, "detect-zeroes"));

    n->read_only = json_is_true(json_object_get(opts, "read-only"));
    n->discard_unmap = discard && strcmp(discard, "unmap") == 0;
    n->cache_direct = json_is_true(json_object_get(cache, "direct"));
    n->no_flush = json_is_true(json_object_get(cache, "no-flush"));
    for (size_t i = 0; dz && detect_zeroes_values[i]; i++) {
        if (strcmp(dz, detect_zeroes_values[i]) == 0)
            n->detect_zeroes = (enum block_detect_zeroes)i;
    }
    if (n->detect_zeroes == BLOCK_DETECT_ZEROES_UNMAP && !n->discard_unmap) {
        error_setg(errp, "setting detect-zeroes to unmap is not allowed without setting "
                   "discard operation to unmap");
        return -1;
    }
    return 0;
}

static const struct block_driver *find_driver(json_t *opts)
{
    const char *driver = json_string_value(json_object_get(opts, "driver"));

    for (size_t i = 0; i < ARRAY_SIZE(drivers); i++) {
        if (strcmp(drivers[i]->name, driver) == 0)
            return drivers[i];
    }
    abort();  /* opts did not pass block_options */
}

static int check_name(struct block_graph *g, const char *name, struct error **errp)
{
    if (!name)
        return 0;
    if (!id_wellformed(name)) {
        error_setg(errp, "Invalid node-name: '%s'", name);
        return -1;
    }
    if (strlen(name) >= 32) {
        error_setg(errp, "Node name too long");
        return -1;
    }
    if (block_graph_find(g, name)) {
        error_setg(errp, "Duplicate nodes with node-name='%s'", name);
        return -1;
    }
    return 0;
}

/* A node of opts' driver, its name checked and its generic options read; not opened. */
static struct block_node *node_new(struct block_graph *g, json_t *opts, struct error **errp)
{
    const char *name = json_string_value(json_object_get(opts, "node-name"));
    const struct block_driver *drv = find_driver(opts);
    struct block_node *n;

    if (check_name(g, name, errp) < 0)
        return NULL;
    n = xzalloc(sizeof(*n));
    n->graph = g;
    n->drv = drv;
    n->alignment = 1;
    n->node_name = name ? xstrdup(name) : xasprintf("#block%03u", ++g->anon_counter);
    if (read_generic(n, opts, errp) < 0) {
        n->drv = NULL;
        node_close(n);
        return NULL;
    }
    return n;
}

/* Open n (from node_new(); n->opaque may hold the driver's prepared handle) and list it. */
static struct block_node *node_open(struct block_node *n, json_t *opts, struct error **errp)
{
    struct block_graph *g = n->graph;
    const struct block_driver *drv = n->drv;

    /* Implicit children created by the driver inherit these options (block_node_open_child). */
    struct block_node *outer = g->opening;
    n->opener = outer;
    g->opening = n;
    int r = drv->open(n, opts, errp);
    g->opening = outer;
    if (r < 0)
        goto fail;

    n->refs = 1;
    n->in_graph = true;
    block_node_queue_push(&g->nodes, n);
    if (drv->open_backing) {
        /* After the node is listed: QEMU lists it before its backing chain. */
        g->opening = n;
        r = drv->open_backing(n, errp);
        g->opening = outer;
        if (r < 0) {
            graph_unlink(g, n);
            n->refs = 0;
            node_close(n);
            return NULL;
        }
    }
    n->opener = NULL;
    log_info("block node %s: driver %s, %" PRIu64 " bytes", n->node_name, drv->name, n->size);
    return n;

fail:
    n->drv = NULL;  /* the driver has nothing to close */
    node_close(n);
    return NULL;
}

/* A driver's prepare done on the offload thread for one options object of a
 * block_node_create_async() (the node itself or an inline child), waiting for the
 * synchronous open to reach the node of those options. */
struct prepared {
    json_t *opts;          /* the node's options as its open sees them (inherited ones set) */
    const struct block_driver *drv;
    bool read_only;
    struct secret secret;  /* the driver's secret_option's, wiped once prepare is done */
    void *handle;          /* prepare's answer, NULL once a node took it */
    struct error *err;     /* or its error (or the secret's), given to the node instead */
    bool taken;
};

/* Open n (from node_new()), with the handle prepared for opts if g holds one: the node gets
 * the handle, or fails with the error prepare gave. */
static struct block_node *node_open_prepared(struct block_node *n, json_t *opts,
                                             struct error **errp)
{
    struct block_graph *g = n->graph;

    for (size_t i = 0; i < g->nprepared; i++) {
        struct prepared *e = &g->prepared[i];
        if (e->taken || e->drv != n->drv || !json_equal(e->opts, opts))
            continue;
        e->taken = true;
        if (e->err) {
            error_propagate(errp, e->err);
            e->err = NULL;
            n->drv = NULL;
            node_close(n);
            return NULL;
        }
        n->opaque = e->handle;  /* open owns it now, even if it fails */
        e->handle = NULL;
        break;
    }
    return node_open(n, opts, errp);
}

struct block_node *block_node_create(struct block_graph *g, json_t *opts, struct error **errp)
{
    struct block_node *n = node_new(g, opts, errp);

    return n ? node_open_prepared(n, opts, errp) : NULL;
}

/* What an inline child inherits from its parent (QEMU's bdrv_inherited_options). */
struct inherited {
    bool read_only, discard_unmap, cache_direct, no_flush;
};

/* The options an inline child (ref, an object) opens with: ref's, and from parent (NULL:
 * nothing) the read-only, discard and cache options ref does not set. A new object. */
static json_t *child_options(const struct inherited *parent, json_t *ref)
{
    json_t *opts = json_deep_copy(ref);

    if (!parent)
        return opts;
    if (!json_object_get(opts, "read-only"))
        json_object_set_new(opts, "read-only", json_boolean(parent->read_only));
    if (!json_object_get(opts, "discard"))
        json_object_set_new(opts, "discard",
                            json_string(parent->discard_unmap ? "unmap" : "ignore"));
    if (!json_object_get(opts, "cache"))
        json_object_set_new(opts, "cache", json_pack("{s:b,s:b}", "direct",
                                                     parent->cache_direct, "no-flush",
                                                     parent->no_flush));
    return opts;
}

static const struct schema_member *driver_members(const char *driver)
{
    for (const struct schema_variant *v = driver_variants; v->value; v++) {
        if (strcmp(v->value, driver) == 0)
            return v->members;
    }
    return NULL;
}

/* Call fn for opts (checked; the options a node opens with) and, depth first, the options
 * each inline child (a BlockdevRef given as an object) will open with, as the drivers' opens
 * and block_node_open_child() make them. */
static void walk_options(json_t *opts, void (*fn)(json_t *opts, void *arg), void *arg)
{
    const struct schema_member *m = driver_members(json_string_value(json_object_get(opts,
                                                                                    "driver")));
    json_t *cache = json_object_get(opts, "cache");
    const char *discard = json_string_value(json_object_get(opts, "discard"));
    struct inherited parent = {
        .read_only = json_is_true(json_object_get(opts, "read-only")),
        .discard_unmap = discard && strcmp(discard, "unmap") == 0,
        .cache_direct = json_is_true(json_object_get(cache, "direct")),
        .no_flush = json_is_true(json_object_get(cache, "no-flush")),
    };

    fn(opts, arg);
    for (; m && m->name; m++) {
        json_t *ref = json_object_get(opts, m->name);
        if (m->type != SCHEMA_ALT || m->members != block_options || !json_is_object(ref))
            continue;
        json_t *child = child_options(&parent, ref);
        /* QEMU's bdrv_backing_options(), which qcow2-backing.c applies: a backing node is
         * read-only unless asked otherwise. */
        if (strcmp(m->name, "backing") == 0 && !json_object_get(ref, "read-only"))
            json_object_set_new(child, "read-only", json_true());
        walk_options(child, fn, arg);
        json_decref(child);
    }
}

static void find_prepare(json_t *opts, void *arg)
{
    bool *found = arg;

    *found = *found || find_driver(opts)->prepare;
}

bool block_node_opens_later(json_t *opts)
{
    bool found = false;

    walk_options(opts, find_prepare, &found);
    return found;
}

int block_graph_secret(struct block_graph *g, json_t *opts, const char *member,
                       struct secret *out, struct error **errp)
{
    const char *id = json_string_value(json_object_get(opts, member));

    out->data = NULL;
    out->len = 0;
    if (!id)
        return 0;
    if (!g->get_secret) {
        error_setg(errp, "No secret with id '%s'", id);
        return -1;
    }
    return g->get_secret(g->secret_opaque, id, out, errp);
}

/* A block_node_create_async() on its way. */
struct node_prepare {
    struct block_node *n;  /* from node_new(), not listed */
    json_t *opts;          /* a copy */
    struct prepared *prepared;  /* the prepares of n and its inline children */
    size_t nprepared;
    void (*done)(struct block_node *n, const struct error *err, void *opaque);
    void *opaque;
};

static void add_prepare(json_t *opts, void *arg)
{
    struct node_prepare *p = arg;
    const struct block_driver *drv = find_driver(opts);
    struct block_graph *g = p->n->graph;

    if (!drv->prepare)
        return;
    p->prepared = xrealloc(p->prepared, (p->nprepared + 1) * sizeof(*p->prepared));
    struct prepared *e = &p->prepared[p->nprepared++];
    *e = (struct prepared){
        .opts = json_incref(opts),
        .drv = drv,
        .read_only = json_is_true(json_object_get(opts, "read-only")),
    };
    if (drv->secret_option)
        block_graph_secret(g, opts, drv->secret_option, &e->secret, &e->err);
}

/* On the offload thread: every prepare, one after the other. */
static void prepare_work(void *opaque)
{
    struct node_prepare *p = opaque;

    for (size_t i = 0; i < p->nprepared; i++) {
        struct prepared *e = &p->prepared[i];
        if (!e->err)
            e->handle = e->drv->prepare(e->opts, e->read_only,
                                        e->secret.data ? &e->secret : NULL, &e->err);
        secret_clear(&e->secret);
    }
}

/* A handle no node took. */
struct unused_handle {
    const struct block_driver *drv;
    void *handle;
};

static void drop_work(void *opaque)
{
    struct unused_handle *u = opaque;

    u->drv->drop_prepared(u->handle);
    free(u);
}

/* Free the prepares, dropping (offloaded) the handles no node took. */
static void prepared_free(struct block_graph *g, struct prepared *list, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        struct prepared *e = &list[i];
        if (e->handle) {
            struct unused_handle *u = xmalloc(sizeof(*u));
            *u = (struct unused_handle){e->drv, e->handle};
            block_graph_offload_close(g, drop_work, u);
        }
        secret_clear(&e->secret);
        error_free(e->err);
        json_decref(e->opts);
    }
    free(list);
}

static void prepare_done(void *opaque)
{
    struct node_prepare *p = opaque;
    struct block_graph *g = p->n->graph;
    struct block_node *n = p->n, *res = NULL;
    struct error *err = NULL;
    const char *name = json_string_value(json_object_get(p->opts, "node-name"));

    g->offloaded--;
    if (name && block_graph_find(g, name)) {
        /* Taken while we connected. */
        error_setg(&err, "Duplicate nodes with node-name='%s'", name);
        n->drv = NULL;
        node_close(n);
    } else {
        /* Synchronous from here: the opens reaching the prepared options take their handles. */
        g->prepared = p->prepared;
        g->nprepared = p->nprepared;
        res = node_open_prepared(n, p->opts, &err);
        g->prepared = NULL;
        g->nprepared = 0;
    }
    prepared_free(g, p->prepared, p->nprepared);
    p->done(res, err, p->opaque);
    error_free(err);
    json_decref(p->opts);
    free(p);
}

int block_node_create_async(struct block_graph *g, json_t *opts,
                            void (*done)(struct block_node *n, const struct error *err,
                                         void *opaque),
                            void *opaque, struct error **errp)
{
    struct block_node *n = node_new(g, opts, errp);

    if (!n)
        return -1;
    struct node_prepare *p = xzalloc(sizeof(*p));
    p->n = n;
    p->opts = json_deep_copy(opts);
    p->done = done;
    p->opaque = opaque;
    walk_options(p->opts, add_prepare, p);
    ASSERT(p->nprepared > 0);  /* block_node_opens_later(opts) */
    if (offload_run(g->loop, prepare_work, prepare_done, p, errp) < 0) {
        prepared_free(g, p->prepared, p->nprepared);  /* no handles yet */
        json_decref(p->opts);
        free(p);
        n->drv = NULL;
        node_close(n);
        return -1;
    }
    g->offloaded++;
    return 0;
}

struct close_work {
    struct block_graph *g;
    void (*work)(void *opaque);
    void *opaque;
};

static void close_work_run(void *opaque)
{
    struct close_work *w = opaque;

    w->work(w->opaque);
}

static void close_work_done(void *opaque)
{
    struct close_work *w = opaque;

    w->g->offloaded--;
    free(w);
}

void block_graph_offload_close(struct block_graph *g, void (*work)(void *opaque),
                               void *opaque)
{
    struct close_work *w;
    struct error *err = NULL;

    if (g->freeing) {
        work(opaque);
        return;
    }
    w = xzalloc(sizeof(*w));
    w->g = g;
    w->work = work;
    w->opaque = opaque;
    if (offload_run(g->loop, close_work_run, close_work_done, w, &err) < 0) {
        log_warn("%s: closing on the loop thread", err->desc);
        error_free(err);
        free(w);
        work(opaque);
        return;
    }
    g->offloaded++;
}

bool block_graph_busy(const struct block_graph *g)
{
    return g && g->offloaded > 0;
}

struct block_node *block_node_open_child(struct block_graph *g, json_t *ref, struct error **errp)
{
    struct block_node *child;

    if (json_is_string(ref)) {
        child = block_graph_find(g, json_string_value(ref));
        if (!child) {
            error_setg(errp, "Cannot find device='' nor node-name='%s'", json_string_value(ref));
            return NULL;
        }
        block_node_ref(child);
        return child;
    }
    /* As in QEMU, an implicit child takes its parent's read-only, discard and cache options
     * unless it sets its own. */
    struct block_node *p = g->opening;
    json_t *opts = child_options(p ? &(struct inherited){p->read_only, p->discard_unmap,
                                                         p->cache_direct, p->no_flush}
                                   : NULL, ref);
    child = block_node_create(g, opts, errp);
    json_decref(opts);
    if (!child)
        return NULL;
    /* Listed in the graph as QEMU lists implicit nodes, and gone with its last parent. */
    child->implicit = true;
    child->refs++;
    return child;
}

int block_node_delete(struct block_graph *g, const char *name, struct error **errp)
{
    struct block_node *n = block_graph_find(g, name);

    if (!n) {
        error_setg(errp, "Failed to find node with node-name='%s'", name);
        return -1;
    }
    for (struct block_node *p = g->nodes.head; p; p = p->next) {
        if (p->backing == n) {
            error_setg(errp, "Node '%s' is busy: node is used as backing hd of '%s'", name,
                       p->node_name);
            return -1;
        }
    }
    if (n->refs > 1) {
        error_setg(errp, "Node '%s' is busy: node is used as root of a block device or as a "
                   "child of another node", name);
        return -1;
    }
    graph_unlink(g, n);
    block_node_unref(n);
    return 0;
}

void block_node_add_size_listener(struct block_node *n, struct block_size_listener *l)
{
    block_size_listeners_push(&n->size_listeners, l);
}

void block_node_remove_size_listener(struct block_node *n, struct block_size_listener *l)
{
    block_size_listeners_remove(&n->size_listeners, l);
}

void block_node_set_size(struct block_node *n, uint64_t size)
{
    if (size == n->size)
        return;
    log_info("block node %s: size %" PRIu64 " -> %" PRIu64 " bytes", n->node_name, n->size, size);
    n->size = size;
    for (struct block_size_listener *l = n->size_listeners.head, *next; l; l = next) {
        next = l->next;  /* a listener may remove itself */
        l->changed(l, n);
    }
    for (struct block_node *p = n->graph->nodes.head; p; p = p->next) {
        if (p->file == n && p->drv->child_resized)
            p->drv->child_resized(p);
    }
}

static bool keeps_child_size(struct block_node *p)
{
    return p->drv->keeps_child_size && p->drv->keeps_child_size(p);
}

/* QEMU's permission check of block_resize: resizing n needs its resize permission, and a node
 * whose size follows its child's (raw) needs its child's too; a parent that keeps its
 * child's size (qcow2's file) does not share it. QEMU names the newest such parent. */
static int check_resize_permission(struct block_node *n, struct error **errp)
{
    struct block_node *user = NULL;  /* who needs x resized: NULL for the command itself */

    for (struct block_node *x = n; x; user = x,
         x = x->drv->child_resized && !keeps_child_size(x) ? x->file : NULL) {
        struct block_node *holder = NULL;
        for (struct block_node *p = n->graph->nodes.head; p; p = p->next) {
            if (p->file == x && p != user && keeps_child_size(p))
                holder = p;
        }
        if (!holder)
            continue;
        char *who = user ? xasprintf("node '%s' (uses node '%s' as 'file' child)",
                                     user->node_name, x->node_name)
                         : xasprintf("an unnamed block device (uses node '%s' as 'root' child)",
                                     x->node_name);
        error_setg(errp, "Permission conflict on node '%s': permissions 'resize' are both "
                   "required by %s and unshared by node '%s' (uses node '%s' as 'file' "
                   "child).", x->node_name, who, holder->node_name, x->node_name);
        free(who);
        return -1;
    }
    return 0;
}

/* QEMU's refusals of a block_resize. */
static int resize_check(struct block_node *n, uint64_t size, const char *device,
                        struct error **errp)
{
    for (struct block_node *p = n->graph->nodes.head; p; p = p->next) {
        if (p->backing == n) {
            /* QEMU's op blocker on a backing node; its text names the device argument. */
            error_setg(errp, "Device '%s' is in use", device ? device : "(null)");
            return -1;
        }
    }
    if (check_resize_permission(n, errp) < 0)
        return -1;
    if (size > BLOCK_MAX_LENGTH) {
        error_setg(errp, "offset(%" PRIu64 ") exceeds maximum(%" PRIu64 ")", size,
                   (uint64_t)BLOCK_MAX_LENGTH);
        return -1;
    }
    if (n->read_only) {
        error_setg(errp, "Image is read-only");
        return -1;
    }
    if (!n->drv->truncate && !n->drv->resize_child) {
        error_setg(errp, "Image format driver does not support resize");
        return -1;
    }
    return 0;
}

/* The node whose truncate a block_resize of n to *size runs: n, or down the files of nodes
 * that resize through theirs (raw), each checked in turn as QEMU's raw_co_truncate() goes
 * down; *size becomes that node's new size. NULL with *errp set. */
static struct block_node *resize_target(struct block_node *n, uint64_t *size,
                                        const char *device, struct error **errp)
{
    if (resize_check(n, *size, device, errp) < 0)
        return NULL;
    while (n->drv->resize_child) {
        if (n->drv->resize_child(n, *size, size, errp) < 0)
            return NULL;
        n = n->file;
        if (resize_check(n, *size, NULL, errp) < 0)
            return NULL;
    }
    return n;
}

int block_node_resize(struct block_node *n, uint64_t size, const char *device,
                      struct error **errp)
{
    struct block_node *t = resize_target(n, &size, device, errp);

    return t ? t->drv->truncate(t, size, errp) : -1;
}

bool block_node_resizes_later(const struct block_node *n)
{
    while (n->drv->resize_child)
        n = n->file;
    return n->drv->truncate_blocking != NULL;
}

/* A block_node_resize_async() on its way; holds a reference on top and n. */
struct node_resize {
    struct block_node *top;  /* the node block_resize named */
    struct block_node *n;    /* the one resized: top, or the file under top's raw nodes */
    uint64_t size;
    struct error *err;  /* the thread's */
    void (*done)(const struct error *err, void *opaque);
    void *opaque;
};

static void resize_work(void *opaque)
{
    struct node_resize *r = opaque;

    r->n->drv->truncate_blocking(r->n, r->size, &r->err);
}

static void resize_done(void *opaque)
{
    struct node_resize *r = opaque;
    struct block_node *n = r->n;

    n->graph->offloaded--;
    if (!r->err)
        block_node_set_size(n, r->size);  /* and so the raw nodes' above it */
    r->done(r->err, r->opaque);
    error_free(r->err);
    block_node_unref(n);
    block_node_unref(r->top);
    free(r);
}

int block_node_resize_async(struct block_node *n, uint64_t size, const char *device,
                            void (*done)(const struct error *err, void *opaque), void *opaque,
                            struct error **errp)
{
    struct node_resize *r;
    struct block_node *t = resize_target(n, &size, device, errp);

    if (!t)
        return -1;
    ASSERT(t->drv->truncate_blocking);
    r = xzalloc(sizeof(*r));
    r->top = n;
    r->n = t;
    r->size = size;
    r->done = done;
    r->opaque = opaque;
    if (offload_run(n->graph->loop, resize_work, resize_done, r, errp) < 0) {
        free(r);
        return -1;
    }
    block_node_ref(n);  /* blockdev-del waits (refuses: busy) */
    block_node_ref(t);
    n->graph->offloaded++;
    return 0;
}

static void check_write_threshold(struct block_node *n, const struct block_req *req)
{
    uint64_t end = req->offset + req->len;

    if (n->write_threshold == 0 || end <= n->write_threshold)
        return;
    /* QEMU's: one shot, sent before the write is done, with how far it goes past. */
    uint64_t threshold = n->write_threshold;
    n->write_threshold = 0;
    n->graph->emit(n->graph->emit_opaque, "BLOCK_WRITE_THRESHOLD",
                   json_pack("{s:s,s:I,s:I}", "node-name", n->node_name,
                             "amount-exceeded", (json_int_t)(end - threshold),
                             "write-threshold", (json_int_t)threshold));
}

void node_assert_req(const struct block_node *n, const struct block_req *req)
{
    uint64_t align = MAX(n->alignment, 1u);

    ASSERT(req->done);
    ASSERT(req->op <= BLOCK_OP_WRITE_ZEROES);
    ASSERT(!(req->flags & ~(BLOCK_REQ_FUA | BLOCK_REQ_MAY_UNMAP)));
    if (req->op == BLOCK_OP_FLUSH)
        return;  /* its offset and len mean nothing (raw shifts them by its window's offset) */
    ASSERT(req->len > 0 && req->len <= UINT64_MAX - req->offset);
    ASSERT(req->offset % align == 0 && req->len % align == 0);
    if (req->op == BLOCK_OP_READ || req->op == BLOCK_OP_WRITE) {
        if (req->niov == 0) {
            ASSERT(req->buf);
        } else {
            ASSERT(req->iov && !req->buf);
            ASSERT(iov_size(req->iov, req->niov) == req->len);
            ASSERT(iov_aligned(req->iov, req->niov, align));
        }
    } else {
        ASSERT(req->niov == 0);
    }
    if (req->op != BLOCK_OP_READ)
        ASSERT(!n->read_only);
}

const struct iovec *block_req_iov(const struct block_req *req, struct iovec *one, unsigned *n)
{
    if (req->niov > 0) {
        *n = req->niov;
        return req->iov;
    }
    *one = (struct iovec){req->buf, req->len};
    *n = 1;
    return one;
}

/* detect-zeroes, as QEMU's bdrv_aligned_pwritev(): at the node that has the option, a write
 * whose data is all zero. Checked on the data itself, word by word, stopping at the first
 * non-zero one: far cheaper than the write it may save. */
static bool write_is_zero(const struct block_node *n, const struct block_req *req)
{
    struct iovec one;
    unsigned niov;
    const struct iovec *iov;

    if (n->detect_zeroes == BLOCK_DETECT_ZEROES_OFF || req->op != BLOCK_OP_WRITE)
        return false;
    iov = block_req_iov(req, &one, &niov);
    return iov_is_zero(iov, niov);
}

static void zero_write_done(struct block_req *zreq, int ret)
{
    struct block_req *req = zreq->opaque;

    free(zreq);
    req->done(req, ret);
}

/* Submit write req to n as a write-zeroes of its own: req stays a write for its submitter
 * (which counts it, parks it, resubmits it as one), done when the write-zeroes is. */
static void submit_as_zeroes(struct block_node *n, struct block_req *req)
{
    struct block_req *zreq = xmalloc(sizeof(*zreq));

    *zreq = (struct block_req){
        .op = BLOCK_OP_WRITE_ZEROES,
        .flags = (req->flags & BLOCK_REQ_FUA) |
                 (n->detect_zeroes == BLOCK_DETECT_ZEROES_UNMAP ? BLOCK_REQ_MAY_UNMAP : 0),
        .offset = req->offset,
        .len = req->len,
        .done = zero_write_done,
        .opaque = req,
    };
    n->drv->submit(n, zreq);
}

void node_submit(struct block_node *n, struct block_req *req)
{
    node_assert_req(n, req);
    if (req->op == BLOCK_OP_WRITE || req->op == BLOCK_OP_WRITE_ZEROES) {
        check_write_threshold(n, req);
        if (req->offset + req->len > n->wr_highest_offset)
            n->wr_highest_offset = req->offset + req->len;
    }
    if (write_is_zero(n, req))
        submit_as_zeroes(n, req);
    else
        n->drv->submit(n, req);
}

/* The file under n, whose name and allocation the queries report for every node above it. */
static struct block_node *host_file_node(struct block_node *n)
{
    while (!n->drv->filename && n->file)
        n = n->file;
    return n;
}

/* QEMU's full_open_options: what opens the node again, for "json:" filenames. */
static json_t *open_options(struct block_node *n)
{
    struct block_node *f = host_file_node(n);
    json_t *o = json_pack("{s:s}", "driver", n->drv->name);

    if (n == f || !n->file) {
        json_object_set_new(o, "filename", json_string(f->drv->filename ? f->drv->filename(f)
                                                                        : ""));
        return o;
    }
    json_object_set_new(o, "file", open_options(n->file));
    if (n->drv->backing_overridden && n->drv->backing_overridden(n))
        json_object_set_new(o, "backing", n->backing ? open_options(n->backing) : json_null());
    return o;
}

char *block_node_filename(struct block_node *n)
{
    struct block_node *f = host_file_node(n);

    if (n->drv->backing_overridden && n->drv->backing_overridden(n)) {
        json_t *o = open_options(n);
        struct buf b = {0};
        buf_append(&b, "json:", 5);
        qjson_write(&b, o, false);  /* QEMU's qobject_to_json(), key order included */
        buf_append(&b, "", 1);
        json_decref(o);
        return b.data;
    }
    return xstrdup(f->drv->filename ? f->drv->filename(f) : "");
}

/* QEMU's ImageInfo of one node. */
static json_t *image_info(struct block_node *n)
{
    struct block_node *f = host_file_node(n);
    char *filename = block_node_filename(n);
    int64_t allocated = f->drv->allocated ? f->drv->allocated(f) : -1;
    json_t *image = json_pack("{s:s,s:s,s:b}", "filename", filename, "format", n->drv->name,
                              "dirty-flag", 0);

    /* The storage's size, which nodes following it (raw) take on (block_node_set_size()). */
    if (f->drv->refresh_size)
        f->drv->refresh_size(f);
    free(filename);
    if (allocated >= 0)
        json_object_set_new(image, "actual-size", json_integer(allocated));
    json_object_set_new(image, "virtual-size", json_integer((json_int_t)n->size));
    if (n->drv->query_image)
        n->drv->query_image(n, image);
    return image;
}

json_t *block_node_info(struct block_node *n)
{
    return block_node_info_flat(n, false);
}

json_t *block_node_info_flat(struct block_node *n, bool flat)
{
    char *filename = block_node_filename(n);
    json_t *image = image_info(n);
    json_t *info;
    int depth = 0;

    /* As QEMU: backing images nested, and their count, only when not flat. */
    if (!flat) {
        json_t *img = image;
        for (struct block_node *b = n->backing; b; b = b->backing) {
            json_t *bi = image_info(b);
            json_object_set_new(img, "backing-image", bi);
            img = bi;
            depth++;
        }
    }
    /* Members in QEMU's schema order (BlockDeviceInfo); see common/qjson.h. */
    info = json_pack("{s:s,s:s,s:b,s:s,s:i,s:b,s:s,s:i,s:i,s:i,s:i,s:i,s:i}",
                     "file", filename, "node-name", n->node_name, "ro", n->read_only,
                     "drv", n->drv->name, "backing_file_depth", depth, "encrypted", 0,
                     "detect_zeroes", detect_zeroes_values[n->detect_zeroes], "bps", 0,
                     "bps_rd", 0, "bps_wr", 0, "iops", 0, "iops_rd", 0, "iops_wr", 0);
    free(filename);
    if (n->backing) {
        filename = block_node_filename(n->backing);
        json_object_set_new(info, "backing_file", json_string(filename));
        free(filename);
    }
    json_object_set_new(info, "image", image);
    json_object_set_new(info, "cache", json_pack("{s:b,s:b,s:b}", "writeback", 1, "direct",
                                                 n->cache_direct, "no-flush", n->no_flush));
    json_object_set_new(info, "write_threshold", json_integer((json_int_t)n->write_threshold));
    return info;
}
