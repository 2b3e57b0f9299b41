/* authz-listfile. See authz-listfile.h. */
#include "tls/authz-listfile.h"

#include <errno.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "common/json-stream.h"
#include "common/log.h"
#include "common/util.h"
#include "tls/file.h"

struct authz_listfile {
    struct loop *loop;
    char *filename;
    char *basename;                       /* refresh: the name inotify reports */
    const struct schema_member *members;  /* authz-list's options */
    json_t *list;                         /* NULL after a failed refresh */
    int inotify_fd;                       /* refresh, else -1 */
};

/* The file's list, checked; NULL with *errp set. */
static json_t *load(struct authz_listfile *f, struct error **errp)
{
    struct error *err = NULL;
    _cleanup_free_ char *text = NULL;
    size_t len;
    json_t *obj;

    text = tls_file_read(f->filename, &len, &err);
    if (!text) {
        error_setg(errp, "Unable to read '%s': %s", f->filename, err->desc);
        error_free(err);
        return NULL;
    }
    obj = json_stream_parse(text, len, errp);
    if (!obj)
        return NULL;
    if (!json_is_object(obj)) {
        error_setg(errp, "File '%s' must contain a JSON object", f->filename);
        json_decref(obj);
        return NULL;
    }
    if (schema_check(f->members, obj, errp) < 0) {
        json_decref(obj);
        return NULL;
    }
    return obj;
}

static void refresh(struct authz_listfile *f)
{
    struct error *err = NULL;

    json_decref(f->list);
    f->list = load(f, &err);
    if (!f->list) {
        log_error("%s", err->desc);
        error_free(err);
    } else {
        log_info("authz-listfile: reloaded '%s'", f->filename);
    }
}

/* Events of the directory: reload once for all those that wrote or (re)created our file, as
 * QEMU's reload on MODIFIED and CREATED (IN_MOVED_TO included: a rename into place). When the
 * kernel's queue overflowed, events were lost: reload too (QEMU does not). */
static void on_inotify(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct authz_listfile *f = opaque;
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    bool changed = false;
    ssize_t n;

    (void)loop, (void)events;
    while ((n = read(fd, buf, sizeof(buf))) > 0) {
        for (ssize_t used = 0; used < n;) {
            const struct inotify_event *ev = (const void *)(buf + used);
            used += (ssize_t)(sizeof(*ev) + ev->len);
            if ((ev->mask & IN_Q_OVERFLOW) ||
                (ev->len && strcmp(ev->name, f->basename) == 0 &&
                 (ev->mask & (IN_CREATE | IN_MODIFY | IN_MOVED_TO))))
                changed = true;
        }
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
        log_error("authz-listfile '%s': cannot read inotify events, no more refreshes: %s",
                  f->filename, strerror(errno));
        loop_del_fd(f->loop, fd);
        close(fd);
        f->inotify_fd = -1;
    }
    if (changed)
        refresh(f);
}

static int watch(struct authz_listfile *f, struct error **errp)
{
    _cleanup_free_ char *d = xstrdup(f->filename);
    _cleanup_free_ char *b = xstrdup(f->filename);
    const char *dir = dirname(d);

    if (strcmp(dir, ".") == 0) {
        error_setg(errp, "Filename must be an absolute path");
        return -1;
    }
    f->basename = xstrdup(basename(b));
    f->inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (f->inotify_fd < 0) {
        error_setg_errno(errp, errno, "Unable to initialize inotify");
        return -1;
    }
    if (inotify_add_watch(f->inotify_fd, dir, IN_CREATE | IN_MODIFY | IN_MOVED_TO) < 0 ||
        loop_add_fd(f->loop, f->inotify_fd, LOOP_READ, on_inotify, f) < 0) {
        error_setg_errno(errp, errno, "Unable to watch '%s'", dir);
        close(f->inotify_fd);
        f->inotify_fd = -1;
        return -1;
    }
    return 0;
}

struct authz_listfile *authz_listfile_new(struct loop *loop, const char *filename, bool refresh,
                                          const struct schema_member *list_members,
                                          struct error **errp)
{
    struct authz_listfile *f = xzalloc(sizeof(*f));

    f->loop = loop;
    f->filename = xstrdup(filename);
    f->members = list_members;
    f->inotify_fd = -1;
    f->list = load(f, errp);
    if (!f->list || (refresh && watch(f, errp) < 0)) {
        authz_listfile_free(f);
        return NULL;
    }
    return f;
}

void authz_listfile_free(struct authz_listfile *f)
{
    if (!f)
        return;
    if (f->inotify_fd >= 0) {
        loop_del_fd(f->loop, f->inotify_fd);
        close(f->inotify_fd);
    }
    json_decref(f->list);
    free(f->basename);
    free(f->filename);
    free(f);
}

json_t *authz_listfile_list(struct authz_listfile *f)
{
    return f->list;
}
