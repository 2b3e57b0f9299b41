/* Block exports. See export.h. */
#include "export/export.h"

#include <inttypes.h>
#include <string.h>

#include "block/graph.h"
#include "common/list.h"
#include "common/log.h"
#include "common/util.h"
#include "device/device.h"
#include "device/group.h"
#include "nbd/server.h"
#include "tls/objects.h"
#include "vhost-user-blk/server.h"

enum export_type {
    EXPORT_NBD,
    EXPORT_VHOST_USER_BLK,
};

struct export {
    struct export *next;
    enum export_type type;
    char *id;
    char *name;   /* NBD: the NBD export name */
    struct vub_export *vub;  /* vhost-user-blk: its socket and frontend */
    struct device *dev;
    /* vhost-user-blk: the root's size changes, told to the frontend. NBD needs none: a
     * client reads the size when it connects. */
    struct block_size_listener resized;
};

DEFINE_QUEUE_TYPE(export_queue, struct export, next)

struct exports {
    struct block_graph *graph;
    struct dev_context *devs;
    struct tls_objects *tls;
    struct nbd_server *nbd;
    export_queue list;
};

struct exports *exports_new(struct block_graph *graph, struct dev_context *devs,
                            struct tls_objects *tls)
{
    struct exports *x = xzalloc(sizeof(*x));

    x->tls = tls;
    x->graph = graph;
    x->devs = devs;
    return x;
}

static struct export *find(struct exports *x, const char *id)
{
    for (struct export *e = x->list.head; e; e = e->next) {
        if (strcmp(e->id, id) == 0)
            return e;
    }
    return NULL;
}

static void export_free(struct exports *x, struct export *e)
{
    export_queue_remove(&x->list, e);
    device_free(e->dev);
    free(e->id);
    free(e->name);
    free(e);
}

/* Remove e from the NBD server and the list; BLOCK_EXPORT_DELETED as QEMU sends it. */
static void export_remove(struct exports *x, struct export *e)
{
    char *id = xstrdup(e->id);

    if (e->type == EXPORT_NBD && x->nbd)
        nbd_server_remove_export(x->nbd, e->name, true, NULL);
    if (e->vub)
        block_node_remove_size_listener(device_root(e->dev), &e->resized);
    vub_export_free(e->vub);
    /* Requests the clients left behind (held or parked) have nobody to answer to. */
    device_abort(e->dev);
    export_free(x, e);
    dev_context_emit(x->devs, "BLOCK_EXPORT_DELETED", json_pack("{s:s}", "id", id));
    free(id);
}

void exports_shutdown(struct exports *x)
{
    while (!export_queue_empty(&x->list))
        export_remove(x, x->list.head);
    if (x->nbd) {
        nbd_server_stop(x->nbd);
        x->nbd = NULL;
    }
}

void exports_free(struct exports *x)
{
    if (!x)
        return;
    exports_shutdown(x);
    free(x);
}

static const struct schema_member unix_address[] = {
    { "path", SCHEMA_STR },
    { NULL },
};

static const struct schema_member inet_address[] = {
    { "host", SCHEMA_STR },
    /* QEMU's port is a string; a number is taken too. */
    { "port", SCHEMA_ALT, .full_name = true, .alt = SCHEMA_ALT_STR | SCHEMA_ALT_INT,
      .alt_name = "string" },
    { NULL },
};

static const char *const address_types[] = { "inet", "unix", NULL };

static const struct schema_variant flat_address_variants[] = {
    { "inet", inet_address },
    { "unix", unix_address },
    { NULL },
};

static const struct schema_member flat_address[] = {
    { "type", SCHEMA_ENUM, .full_name = true, .values = address_types,
      .variants = flat_address_variants },
    { NULL },
};

static const struct schema_member inet_wrapper[] = {
    { "data", SCHEMA_OBJECT, .members = inet_address },
    { NULL },
};

static const struct schema_member unix_wrapper[] = {
    { "data", SCHEMA_OBJECT, .members = unix_address },
    { NULL },
};

static const struct schema_variant legacy_address_variants[] = {
    { "inet", inet_wrapper },
    { "unix", unix_wrapper },
    { NULL },
};

static const struct schema_member legacy_address[] = {
    { "type", SCHEMA_ENUM, .full_name = true, .values = address_types,
      .variants = legacy_address_variants },
    { NULL },
};

/* NbdServerOptions after addr, in the command line's table and nbd-server-start's. */
#define NBD_SERVER_MEMBERS                                                                    \
    { "tls-creds", SCHEMA_STR, .optional = true },                                           \
    { "tls-authz", SCHEMA_STR, .optional = true },                                           \
    { "max-connections", SCHEMA_INT, .optional = true, .min = 0, .max = UINT32_MAX,          \
      .range_name = "uint32" },                                                              \
    { NULL }

const struct schema_member nbd_server_options[] = {
    { "addr", SCHEMA_OBJECT, .members = flat_address },
    NBD_SERVER_MEMBERS,
};

const struct schema_member nbd_server_start_args[] = {
    { "addr", SCHEMA_OBJECT, .members = legacy_address },
    NBD_SERVER_MEMBERS,
};

int exports_nbd_server_start(struct exports *x, json_t *opts, struct error **errp)
{
    json_t *addr = json_object_get(opts, "addr");
    json_t *maxc = json_object_get(opts, "max-connections");
    const char *creds_id = json_string_value(json_object_get(opts, "tls-creds"));
    const char *authz_id = json_string_value(json_object_get(opts, "tls-authz"));
    struct tls_creds *creds = NULL;

    if (x->nbd) {
        error_setg(errp, "NBD server already running");
        return -1;
    }
    if (creds_id) {
        creds = tls_objects_server_creds(x->tls, creds_id, errp);
        if (!creds)
            return -1;
    } else if (authz_id) {
        /* QEMU 7.2 takes tls-authz without tls-creds and never uses it. */
        log_warn("NBD server: tls-authz without tls-creds is ignored: clients are not checked");
    }
    x->nbd = nbd_server_start(dev_context_loop(x->devs), addr, (uint32_t)json_integer_value(maxc),
                              errp);
    if (!x->nbd) {
        tls_creds_unref(creds);
        return -1;
    }
    if (creds)
        nbd_server_set_tls(x->nbd, creds, x->tls, authz_id);
    return 0;
}

int exports_nbd_server_stop(struct exports *x, struct error **errp)
{
    if (!x->nbd) {
        error_setg(errp, "NBD server not running");
        return -1;
    }
    /* As QEMU: the NBD exports go with their server; the others stay. */
    for (struct export *e = x->list.head, *next; e; e = next) {
        next = e->next;
        if (e->type == EXPORT_NBD)
            export_remove(x, e);
    }
    nbd_server_stop(x->nbd);
    x->nbd = NULL;
    return 0;
}

static const char *const export_types[] = { "nbd", "vhost-user-blk", NULL };

/* BlockExportOptionsNbd's own members. */
static const struct schema_member nbd_export_options[] = {
    { "name", SCHEMA_STR, .optional = true },
    { "description", SCHEMA_STR, .optional = true },
    { "bitmaps", SCHEMA_ARRAY, .optional = true,
      .element = &(const struct schema_member){ NULL, SCHEMA_STR } },
    { "allocation-depth", SCHEMA_BOOL, .optional = true },
    { NULL },
};

/* BlockExportOptionsVhostUserBlk. */
static const struct schema_member vub_export_options[] = {
    { "addr", SCHEMA_OBJECT, .members = flat_address },
    /* QEMU's size: negative numbers wrap, and its check reports them as negative. */
    { "logical-block-size", SCHEMA_UINT64, .optional = true },
    { "num-queues", SCHEMA_INT, .optional = true, .min = 0, .max = UINT16_MAX,
      .range_name = "uint16_t" },
    { NULL },
};

static const struct schema_variant export_variants[] = {
    { "nbd", nbd_export_options },
    { "vhost-user-blk", vub_export_options },
    { NULL },
};

/* QEMU's BlockExportOptions base, werror and rerror (thinblk's: the device's error policy)
 * and the stop group added. */
const struct schema_member export_options[] = {
    { "type", SCHEMA_ENUM, .values = export_types, .variants = export_variants },
    { "id", SCHEMA_STR },
    { "fixed-iothread", SCHEMA_BOOL, .optional = true },
    { "iothread", SCHEMA_STR, .optional = true },
    { "node-name", SCHEMA_STR },
    { "writable", SCHEMA_BOOL, .optional = true },
    { "writethrough", SCHEMA_BOOL, .optional = true },
    { "werror", SCHEMA_ENUM, .optional = true, .values = dev_error_action_names },
    { "rerror", SCHEMA_ENUM, .optional = true, .values = dev_error_action_names },
    { "__org.thinblk_group", SCHEMA_STR, .optional = true },
    { NULL },
};

static enum dev_error_action action(json_t *opts, const char *key, enum dev_error_action dflt)
{
    const char *s = json_string_value(json_object_get(opts, key));

    return s ? (enum dev_error_action)dev_error_action_parse(s) : dflt;
}

/* vhost-user-blk's own options, with qemu-storage-daemon 7.2's texts. Fills *cfg. */
static int vub_options(json_t *opts, const char *id, struct vub_export_config *cfg,
                       struct error **errp)
{
    json_t *addr = json_object_get(opts, "addr");
    json_t *lbs = json_object_get(opts, "logical-block-size");
    json_t *nq = json_object_get(opts, "num-queues");

    if (strcmp(json_string_value(json_object_get(addr, "type")), "unix") != 0) {
        error_setg(errp, "Only socket address types 'unix' and 'fd' are supported");
        return -1;
    }
    cfg->path = json_string_value(json_object_get(addr, "path"));
    cfg->logical_block_size = 512;
    if (lbs && json_integer_value(lbs) != 0) {
        int64_t v = json_integer_value(lbs);
        if (v < 512 || v > 2 * 1024 * 1024) {
            error_setg(errp, "Property %s.logical-block-size doesn't take value %" PRId64
                       " (minimum: 512, maximum: 2097152)", id, v);
            return -1;
        }
        if (v & (v - 1)) {
            error_setg(errp, "Property %s.logical-block-size doesn't take value '%" PRId64
                       "', it's not a power of 2", id, v);
            return -1;
        }
        cfg->logical_block_size = (uint32_t)v;
    }
    cfg->num_queues = 1;
    if (nq) {
        if (json_integer_value(nq) == 0) {
            error_setg(errp, "num-queues must be greater than 0");
            return -1;
        }
        cfg->num_queues = (uint16_t)json_integer_value(nq);
    }
    return 0;
}

static void on_root_resized(struct block_size_listener *l, struct block_node *n)
{
    vub_export_size_changed(container_of(l, struct export, resized)->vub);
}

int exports_add(struct exports *x, json_t *opts, struct error **errp)
{
    const char *type = json_string_value(json_object_get(opts, "type"));
    enum export_type t = strcmp(type, "nbd") == 0 ? EXPORT_NBD : EXPORT_VHOST_USER_BLK;
    const char *id = json_string_value(json_object_get(opts, "id"));
    const char *node_name = json_string_value(json_object_get(opts, "node-name"));
    bool writable = json_is_true(json_object_get(opts, "writable"));
    bool writethrough = json_is_true(json_object_get(opts, "writethrough"));
    const char *name = json_string_value(json_object_get(opts, "name"));
    const char *desc = json_string_value(json_object_get(opts, "description"));
    enum dev_error_action werror = action(opts, "werror", DEV_ACTION_ENOSPC);
    enum dev_error_action rerror = action(opts, "rerror", DEV_ACTION_REPORT);
    const char *group_name = json_string_value(json_object_get(opts, "__org.thinblk_group"));
    struct dev_group *group = NULL;
    struct vub_export_config vcfg = { .id = id, .writable = writable };

    if (json_object_get(opts, "bitmaps") || json_object_get(opts, "iothread")) {
        error_setg(errp, "bitmaps and iothread are not supported");
        return -1;
    }
    if (find(x, id)) {
        error_setg(errp, "Block export id '%s' is already in use", id);
        return -1;
    }
    if (t == EXPORT_NBD && !x->nbd) {
        error_setg(errp, "NBD server not running");
        return -1;
    }
    struct block_node *root = block_graph_find(x->graph, node_name);
    if (!root) {
        error_setg(errp, "Cannot find device='' nor node-name='%s'", node_name);
        return -1;
    }
    if (writable && root->read_only) {
        error_setg(errp, "Cannot export read-only node '%s' as writable", node_name);
        return -1;
    }
    if (t == EXPORT_VHOST_USER_BLK && vub_options(opts, id, &vcfg, errp) < 0)
        return -1;
    if (group_name && !(group = dev_group_find(x->devs, group_name, errp)))
        return -1;
    if (!name)
        name = node_name;
    if (t == EXPORT_NBD && strlen(name) > 4096) {
        error_setg(errp, "export name '%s' too long", name);
        return -1;
    }

    struct device *dev = device_new(x->devs, id, root, werror, rerror, group, errp);
    if (!dev)
        return -1;
    device_set_writethrough(dev, writethrough);
    struct vub_export *vub = NULL;
    if (t == EXPORT_NBD) {
        if (nbd_server_add_export(x->nbd, name, desc, dev, writable,
                                  json_is_true(json_object_get(opts, "allocation-depth")),
                                  errp) < 0) {
            device_free(dev);
            return -1;
        }
    } else {
        vub = vub_export_new(dev_context_loop(x->devs), dev, &vcfg, errp);
        if (!vub) {
            device_free(dev);
            return -1;
        }
    }
    struct export *e = xzalloc(sizeof(*e));
    e->type = t;
    e->id = xstrdup(id);
    e->name = t == EXPORT_NBD ? xstrdup(name) : NULL;
    e->vub = vub;
    e->dev = dev;
    if (vub) {
        e->resized.changed = on_root_resized;
        block_node_add_size_listener(root, &e->resized);
    }
    export_queue_push(&x->list, e);
    if (t == EXPORT_NBD)
        log_info("export %s: node %s as NBD export '%s'%s", id, node_name, name,
                 writable ? ", writable" : "");
    else
        log_info("export %s: node %s as vhost-user-blk on %s, %u queue(s)%s", id, node_name,
                 vcfg.path, vcfg.num_queues, writable ? ", writable" : "");
    return 0;
}

int exports_del(struct exports *x, const char *id, const char *mode, struct error **errp)
{
    struct export *e = find(x, id);
    bool hard = mode && strcmp(mode, "hard") == 0;

    if (!e) {
        error_setg(errp, "Export '%s' is not found", id);
        return -1;
    }
    if (!hard && ((e->type == EXPORT_NBD && x->nbd &&
                   nbd_server_export_clients(x->nbd, e->name) > 0) ||
                  (e->vub && vub_export_connected(e->vub)))) {
        error_setg(errp, "export '%s' still in use", id);
        return -1;
    }
    export_remove(x, e);
    return 0;
}

json_t *exports_query(struct exports *x)
{
    json_t *list = json_array();

    for (struct export *e = x->list.head; e; e = e->next) {
        json_t *info = json_pack("{s:s,s:s,s:s,s:b}", "type",
                                 e->type == EXPORT_NBD ? "nbd" : "vhost-user-blk", "id", e->id,
                                 "node-name", device_root(e->dev)->node_name, "shutting-down", 0);
        dev_group_tag(info, e->dev);
        json_array_append_new(list, info);
    }
    return list;
}
