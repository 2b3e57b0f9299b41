/* The vhost-user-blk export's socket: one frontend at a time. See server.h. */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "loop/loop.h"
#include "vhost-user-blk/internal.h"

/* After accept() ran out of file descriptors, try again this much later. */
#define ACCEPT_RETRY_NS 100000000ull

static void on_listen(struct loop *loop, int fd, unsigned events, void *opaque);

static void on_accept_retry(struct loop *loop, void *opaque)
{
    struct vub_export *exp = opaque;

    exp->accept_timer = 0;
    loop_mod_fd(loop, exp->listen_fd, LOOP_READ);
}

static void on_listen(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct vub_export *exp = opaque;

    for (;;) {
        int cfd = socket_accept(fd);
        if (cfd < 0) {
            if (socket_accept_starved(errno)) {
                log_warn("vhost-user-blk: %s: cannot accept a connection: %s", exp->id,
                         strerror(errno));
                loop_mod_fd(loop, fd, 0);
                if (!exp->accept_timer)
                    exp->accept_timer = loop_add_timer(loop, ACCEPT_RETRY_NS, on_accept_retry,
                                                       exp);
            } else if (errno != EAGAIN) {
                log_warn("vhost-user-blk: %s: accept: %s", exp->id, strerror(errno));
            }
            return;
        }
        if (exp->conn) {
            /* One frontend drives the device's rings; a second one would corrupt them. The
             * frontend sees the connection closed before its first reply. */
            log_warn("vhost-user-blk: %s: refusing a second frontend connection", exp->id);
            close(cfd);
            continue;
        }
        exp->conn = vub_conn_new(exp, cfd);
        if (exp->conn)
            log_info("vhost-user-blk: %s: frontend connected", exp->id);
    }
}

struct vub_export *vub_export_new(struct loop *loop, struct device *dev,
                                  const struct vub_export_config *cfg, struct error **errp)
{
    const struct block_node *root = device_root(dev);

    ASSERT(cfg->num_queues >= 1);
    /* A guest may send any request aligned to its logical block; one the node cannot take
     * (an O_DIRECT file on a 4096-byte device) would fail. QEMU's block layer would read,
     * modify and write around it; we do not, so it is refused here, with the way out. */
    if (cfg->logical_block_size < root->alignment) {
        error_setg(errp, "logical-block-size %" PRIu32 " is smaller than the request "
                   "alignment %" PRIu32 " of node '%s'; use logical-block-size=%" PRIu32,
                   cfg->logical_block_size, root->alignment, root->node_name, root->alignment);
        return NULL;
    }
    struct vub_export *exp = xzalloc(sizeof(*exp));
    exp->loop = loop;
    exp->dev = dev;
    exp->id = xstrdup(cfg->id);
    exp->writable = cfg->writable;
    exp->num_queues = cfg->num_queues;
    exp->blk_size = cfg->logical_block_size;
    exp->listen_fd = unix_listen(cfg->path, &exp->listener, errp);
    if (exp->listen_fd < 0) {
        free(exp->id);
        free(exp);
        return NULL;
    }
    if (loop_add_fd(loop, exp->listen_fd, LOOP_READ, on_listen, exp) < 0) {
        error_setg_errno(errp, errno, "Failed to watch socket %s", cfg->path);
        unix_listener_remove(&exp->listener);
        close(exp->listen_fd);
        free(exp->id);
        free(exp);
        return NULL;
    }
    return exp;
}

bool vub_export_connected(const struct vub_export *exp)
{
    return exp->conn != NULL;
}

void vub_export_size_changed(struct vub_export *exp)
{
    if (exp->conn)
        vub_conn_config_changed(exp->conn);
}

void vub_export_conn_gone(struct vub_export *exp, struct vub_conn *c)
{
    if (exp->conn == c)
        exp->conn = NULL;
}

void vub_export_free(struct vub_export *exp)
{
    if (!exp)
        return;
    if (exp->conn)
        vub_conn_close(exp->conn, "the export is removed");
    if (exp->accept_timer)
        loop_del_timer(exp->loop, exp->accept_timer);
    loop_del_fd(exp->loop, exp->listen_fd);
    close(exp->listen_fd);
    unix_listener_remove(&exp->listener);
    free(exp->id);
    free(exp);
}
