/* blockdev-create: option checks, the driver switch, and the "file" driver. See create.h. */
#include "block/create.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "block/graph.h"
#include "common/qjson.h"
#include "common/util.h"
#include "job/job.h"
#include "job/offload.h"

const char *const block_driver_names[] = {
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
    "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc",
    "vvfat", NULL,
};

const char *const block_prealloc_names[] = { "off", "metadata", "falloc", "full", NULL };

/* QEMU's other drivers with a BlockdevCreateOptions branch: not built in here. */
static const char *const other_create_drivers[] = {
    "gluster", "luks", "nfs", "parallels", "qcow", "qed", "rbd", "ssh", "vdi", "vhdx", "vmdk",
    "vpc", NULL,
};

static const struct create_opt file_create_opts[] = {
    { "filename", CREATE_OPT_STR },
    { "size", CREATE_OPT_SIZE },
    { "preallocation", CREATE_OPT_ENUM, .optional = true, .values = block_prealloc_names },
    { "nocow", CREATE_OPT_BOOL, .optional = true },
    { "extent-size-hint", CREATE_OPT_SIZE, .optional = true },
    { NULL },
};

static bool in_list(const char *const *list, const char *s)
{
    for (; *list; list++) {
        if (strcmp(*list, s) == 0)
            return true;
    }
    return false;
}

static int check_opt(const struct create_opt *o, json_t *v, struct error **errp)
{
    static const char *const type_names[] = {
        [CREATE_OPT_STR] = "string", [CREATE_OPT_INT] = "integer",
        [CREATE_OPT_BOOL] = "boolean", [CREATE_OPT_ENUM] = "string",
        [CREATE_OPT_OBJECT] = "object",
    };
    bool ok = false;

    switch (o->type) {
    case CREATE_OPT_STR: ok = json_is_string(v); break;
    case CREATE_OPT_INT: ok = json_is_integer(v); break;
    case CREATE_OPT_BOOL: ok = json_is_boolean(v); break;
    case CREATE_OPT_OBJECT: ok = json_is_object(v); break;
    case CREATE_OPT_SIZE:
        if (qjson_is_uint64(v))
            return 0;
        error_setg(errp, "Parameter 'options.%s' expects uint64", o->name);
        return -1;
    case CREATE_OPT_REF:
        /* QEMU names neither the path nor a type here: its alternate visitor's wording. */
        if (json_is_string(v) || json_is_object(v))
            return 0;
        error_setg(errp, "Invalid parameter type for '%s', expected: BlockdevRef", o->name);
        return -1;
    case CREATE_OPT_ENUM:
        ok = json_is_string(v);
        if (ok && !in_list(o->values, json_string_value(v))) {
            error_setg(errp, "Parameter '%s' does not accept value '%s'", o->name,
                       json_string_value(v));
            return -1;
        }
        break;
    }
    if (!ok) {
        error_setg(errp, "Invalid parameter type for 'options.%s', expected: %s", o->name,
                   type_names[o->type]);
        return -1;
    }
    return 0;
}

/* Check opts (with "driver" taken as checked) against spec, in QEMU's order: members in
 * schema order, then the first unexpected one in QEMU's key order. */
static int check_opts(const struct create_opt *spec, json_t *opts, struct error **errp)
{
    for (const struct create_opt *o = spec; o && o->name; o++) {
        json_t *v = json_object_get(opts, o->name);
        if (!v) {
            if (o->optional)
                continue;
            error_setg(errp, "Parameter 'options.%s' is missing", o->name);
            return -1;
        }
        if (check_opt(o, v, errp) < 0)
            return -1;
    }
    size_t n;
    _cleanup_free_ const char **keys = qjson_keys(opts, &n);
    for (size_t i = 0; i < n; i++) {
        const struct create_opt *o = spec;
        while (o && o->name && strcmp(o->name, keys[i]) != 0)
            o++;
        if (strcmp(keys[i], "driver") != 0 && (!o || !o->name)) {
            error_setg(errp, "Parameter 'options.%s' is unexpected", keys[i]);
            return -1;
        }
    }
    return 0;
}

/* ---- the "file" driver ------------------------------------------------------------------ */

struct file_create {
    struct block_create *c;
    const char *filename;  /* in c->opts */
    uint64_t size;
    int errnum;            /* set by the thread */
    bool created;          /* open() succeeded, so errnum is about the size */
};

/* On the offload thread: QEMU's raw_co_create(): create, empty, then size the file. */
static void file_create_work(void *opaque)
{
    struct file_create *f = opaque;
    int fd = open(f->filename, O_RDWR | O_CREAT | O_CLOEXEC, 0644);

    if (fd < 0) {
        f->errnum = errno;
        return;
    }
    f->created = true;
    /* (off_t) of a size past INT64_MAX is negative: EINVAL, as QEMU reports. */
    if (ftruncate(fd, 0) < 0 || ftruncate(fd, (off_t)f->size) < 0)
        f->errnum = errno;
    close(fd);
}

static void file_create_done(void *opaque)
{
    struct file_create *f = opaque;
    struct error *err = NULL;

    if (f->errnum && !f->created)
        error_setg_errno(&err, f->errnum, "Could not create '%s'", f->filename);
    else if (f->errnum)
        error_setg_errno(&err, f->errnum, "Could not resize file");
    struct block_create *c = f->c;
    free(f);
    block_create_finish(c, err);
}

static void file_create_run(struct block_create *c)
{
    struct error *err = NULL;
    const char *prealloc = json_string_value(json_object_get(c->opts, "preallocation"));

    if (prealloc && strcmp(prealloc, "off") != 0) {
        /* QEMU's file-posix text for a mode it cannot do. */
        error_setg(&err, "Unsupported preallocation mode: %s", prealloc);
        block_create_finish(c, err);
        return;
    }
    struct file_create *f = xzalloc(sizeof(*f));
    f->c = c;
    f->filename = json_string_value(json_object_get(c->opts, "filename"));
    f->size = qjson_uint64(json_object_get(c->opts, "size"));
    if (offload_run(c->graph->loop, file_create_work, file_create_done, f, &err) < 0) {
        free(f);
        block_create_finish(c, err);
    }
}

/* ---- the driver switch ------------------------------------------------------------------ */

struct block_create *block_create_prepare(struct block_graph *g, json_t *options,
                                          struct error **errp)
{
    json_t *v = json_object_get(options, "driver");
    const struct create_opt *spec;
    void (*run)(struct block_create *c);

    if (!v) {
        error_setg(errp, "Parameter 'options.driver' is missing");
        return NULL;
    }
    if (!json_is_string(v)) {
        error_setg(errp, "Invalid parameter type for 'options.driver', expected: string");
        return NULL;
    }
    const char *drv = json_string_value(v);
    if (!in_list(block_driver_names, drv)) {
        error_setg(errp, "Parameter 'driver' does not accept value '%s'", drv);
        return NULL;
    }
    if (strcmp(drv, "file") == 0) {
        spec = file_create_opts;
        run = file_create_run;
    } else if (strcmp(drv, "qcow2") == 0) {
        spec = qcow2_create_opts;
        run = qcow2_create_run;
    } else if (in_list(other_create_drivers, drv)) {
        error_setg(errp, "Block driver '%s' not found or not supported", drv);
        return NULL;
    } else {
        /* A driver without a creation branch in QEMU's schema: nothing but "driver" fits. */
        if (check_opts(NULL, options, errp) < 0)
            return NULL;
        error_setg(errp, "Driver does not support blockdev-create");
        return NULL;
    }
    if (check_opts(spec, options, errp) < 0)
        return NULL;

    struct block_create *c = xzalloc(sizeof(*c));
    c->graph = g;
    c->opts = json_deep_copy(options);
    c->run = run;
    return c;
}

void block_create_run(struct block_create *c, struct job *job)
{
    c->job = job;
    c->run(c);
}

void block_create_free(struct block_create *c)
{
    if (!c)
        return;
    json_decref(c->opts);
    free(c);
}

void block_create_finish(struct block_create *c, struct error *err)
{
    struct job *job = c->job;

    block_create_free(c);
    job_finish(job, err);
}
