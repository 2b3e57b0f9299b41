/* blockdev-create: option checks, the driver switch, and the "file" driver. See create.h. */
#include "block/create.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "block/graph.h"
#include "common/qjson.h"
#include "common/schema.h"
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

static const struct schema_member file_create_opts[] = {
    { "filename", SCHEMA_STR },
    { "size", SCHEMA_UINT64 },
    { "preallocation", SCHEMA_ENUM, .optional = true, .values = block_prealloc_names },
    { "nocow", SCHEMA_BOOL, .optional = true },
    { "extent-size-hint", SCHEMA_UINT64, .optional = true },
    { NULL },
};

/* QEMU's BlockdevCreateOptions: a union on driver. QEMU's other drivers with a branch are not
 * built in here: their members are not checked, the driver is refused (block_create_prepare);
 * the drivers without one take no member but "driver". */
static const struct schema_variant create_variants[] = {
    { "file", file_create_opts },
    { "qcow2", qcow2_create_opts },
    { "gluster", .open = true }, { "luks", .open = true }, { "nfs", .open = true },
    { "parallels", .open = true }, { "qcow", .open = true }, { "qed", .open = true },
#ifdef THINBLK_HAVE_RBD
    { "rbd", rbd_create_opts },
#else
    { "rbd", .open = true },
#endif
    { "ssh", .open = true }, { "vdi", .open = true },
    { "vhdx", .open = true }, { "vmdk", .open = true }, { "vpc", .open = true },
    { NULL },
};

const struct schema_member block_create_options[] = {
    { "driver", SCHEMA_ENUM, .values = block_driver_names, .variants = create_variants },
    { NULL },
};

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
    const char *drv = json_string_value(json_object_get(options, "driver"));
    void (*run)(struct block_create *c);

    if (strcmp(drv, "file") == 0) {
        run = file_create_run;
    } else if (strcmp(drv, "qcow2") == 0) {
        run = qcow2_create_run;
#ifdef THINBLK_HAVE_RBD
    } else if (strcmp(drv, "rbd") == 0) {
        run = rbd_create_run;
#endif
    } else {
        const struct schema_variant *v = create_variants;
        while (v->value && strcmp(v->value, drv) != 0)
            v++;
        if (v->value)
            error_setg(errp, "Block driver '%s' not found or not supported", drv);
        else
            error_setg(errp, "Driver does not support blockdev-create");
        return NULL;
    }

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
