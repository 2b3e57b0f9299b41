/* The NBD server: listening socket, accepting, the exports and the connection list.
 * See server.h; the connections themselves are in connection.c. */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/unix-socket.h"
#include "loop/loop.h"
#include "nbd/internal.h"

/* After accept() ran out of file descriptors, try again this much later. */
#define ACCEPT_RETRY_NS (100ull * 1000 * 1000)

struct nbd_server *nbd_server_new(struct loop *loop, uint32_t max_connections)
{
    struct nbd_server *s = xzalloc(sizeof(*s));

    s->loop = loop;
    s->listen_fd = -1;
    s->max_connections = max_connections;
    return s;
}

static bool at_limit(const struct nbd_server *s)
{
    return s->max_connections && s->nconns >= s->max_connections;
}

static void set_accepting(struct nbd_server *s, bool on)
{
    if (s->listen_fd < 0 || s->listen_paused == !on)
        return;
    if (loop_mod_fd(s->loop, s->listen_fd, on ? LOOP_READ : 0) == 0)
        s->listen_paused = !on;
}

static void on_accept_retry(struct loop *loop, void *opaque)
{
    struct nbd_server *s = opaque;

    s->accept_timer = 0;
    if (!at_limit(s))
        set_accepting(s, true);
}

static void on_listen(struct loop *loop, int fd, unsigned events, void *opaque)
{
    struct nbd_server *s = opaque;

    for (;;) {
        /* Over the limit, clients wait in the backlog, as with QEMU's max-connections. */
        if (at_limit(s)) {
            set_accepting(s, false);
            return;
        }
        int cfd = socket_accept(fd);
        if (cfd < 0) {
            if (socket_accept_starved(errno)) {
                log_warn("nbd: cannot accept a connection: %s", strerror(errno));
                set_accepting(s, false);
                if (!s->accept_timer)
                    s->accept_timer = loop_add_timer(loop, ACCEPT_RETRY_NS, on_accept_retry, s);
            } else if (errno != EAGAIN) {
                log_warn("nbd: accept: %s", strerror(errno));
            }
            return;
        }
        if (s->listen_inet) {
            int one = 1;
            setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        nbd_conn_new(s, cfd);
    }
}

int nbd_server_add_client(struct nbd_server *s, int fd, struct error **errp)
{
    if (at_limit(s)) {
        close(fd);
        error_setg(errp, "NBD server has reached its connection limit");
        return -1;
    }
    nbd_conn_new(s, fd);
    return 0;
}

void nbd_server_forget_conn(struct nbd_server *s, struct nbd_conn *c)
{
    nbd_conn_list_remove(&s->conns, c);
    s->nconns--;
    if (c->exp)
        c->exp->clients--;
    if (!at_limit(s) && !s->accept_timer)
        set_accepting(s, true);
}

/* ---- listening ---- */

static int listen_inet(struct nbd_server *s, const char *host, const char *port,
                       struct error **errp)
{
    struct addrinfo hints = {
        .ai_flags = AI_PASSIVE | AI_ADDRCONFIG,
        .ai_family = AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
    };
    struct addrinfo *res;
    int r, fd = -1, err = 0;

    r = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (r != 0) {
        error_setg(errp, "address resolution failed for %s:%s: %s", host, port,
                   gai_strerror(r));
        return -1;
    }
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int one = 1;
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0)
            break;
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        error_setg_errno(errp, err, "Failed to bind socket");
        return -1;
    }
    s->listen_inet = true;
    return fd;
}

/* addr's port (checked): a string, or a number. */
static const char *addr_port(json_t *addr, char *num, size_t num_size)
{
    json_t *v = json_object_get(addr, "port");

    if (json_is_integer(v)) {
        snprintf(num, num_size, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return num;
    }
    return json_string_value(v);
}

struct nbd_server *nbd_server_start(struct loop *loop, json_t *addr, uint32_t max_connections,
                                    struct error **errp)
{
    const char *type = json_string_value(json_object_get(addr, "type"));
    struct nbd_server *s = nbd_server_new(loop, max_connections);
    char num[32];
    int fd;

    if (strcmp(type, "unix") == 0)
        fd = unix_listen(json_string_value(json_object_get(addr, "path")), &s->unix_sock, errp);
    else
        fd = listen_inet(s, json_string_value(json_object_get(addr, "host")),
                         addr_port(addr, num, sizeof(num)), errp);
    if (fd < 0)
        goto fail;
    s->listen_fd = fd;
    if (loop_add_fd(loop, fd, LOOP_READ, on_listen, s) < 0) {
        error_setg_errno(errp, errno, "Cannot watch the NBD server socket");
        goto fail;
    }
    return s;
fail:
    nbd_server_stop(s);
    return NULL;
}

void nbd_server_stop(struct nbd_server *s)
{
    struct nbd_export *e;

    if (!s)
        return;
    if (s->listen_fd >= 0) {
        loop_del_fd(s->loop, s->listen_fd);
        close(s->listen_fd);
        s->listen_fd = -1;
    }
    unix_listener_remove(&s->unix_sock);
    if (s->accept_timer) {
        loop_del_timer(s->loop, s->accept_timer);
        s->accept_timer = 0;
    }
    while (!nbd_conn_list_empty(&s->conns))
        nbd_conn_close(s->conns.head, "server stopped");
    while ((e = nbd_export_queue_pop(&s->exports))) {
        free(e->name);
        free(e->description);
        free(e);
    }
    tls_creds_unref(s->tls_creds);
    free(s->tls_authz);
    free(s);
}

void nbd_server_set_tls(struct nbd_server *s, struct tls_creds *creds, struct tls_objects *objs,
                        const char *authz_id)
{
    s->tls_creds = creds;
    s->tls_objects = objs;
    s->tls_authz = authz_id ? xstrdup(authz_id) : NULL;
}

/* ---- exports ---- */

struct nbd_export *nbd_server_find_export(struct nbd_server *s, const char *name,
                                          size_t name_len)
{
    for (struct nbd_export *e = s->exports.head; e; e = e->next) {
        if (e->name_len == name_len && memcmp(e->name, name, name_len) == 0)
            return e;
    }
    return NULL;
}

int nbd_server_add_export(struct nbd_server *s, const char *name, const char *description,
                          struct device *dev, bool writable, bool allocation_depth,
                          struct error **errp)
{
    struct nbd_export *e;

    if (strlen(name) > NBD_MAX_STRING) {
        error_setg(errp, "export name '%.64s...' too long", name);
        return -1;
    }
    if (description && strlen(description) > NBD_MAX_STRING) {
        error_setg(errp, "description '%.64s...' too long", description);
        return -1;
    }
    if (nbd_server_find_export(s, name, strlen(name))) {
        error_setg(errp, "NBD server already has export named '%s'", name);
        return -1;
    }
    e = xzalloc(sizeof(*e));
    e->name = xstrdup(name);
    e->name_len = strlen(name);
    e->description = description ? xstrdup(description) : NULL;
    e->dev = dev;
    e->writable = writable;
    e->allocation_depth = allocation_depth;
    /* In creation order, so NBD_OPT_LIST lists them so. */
    nbd_export_queue_push(&s->exports, e);
    return 0;
}

int nbd_server_remove_export(struct nbd_server *s, const char *name, bool hard,
                             struct error **errp)
{
    struct nbd_export *e = nbd_server_find_export(s, name, strlen(name));

    if (!e) {
        error_setg(errp, "Export '%s' is not found", name);
        return -1;
    }
    if (e->clients > 0 && !hard) {
        error_setg(errp, "export '%s' still in use", name);
        return -1;
    }
    for (struct nbd_conn *c = s->conns.head, *next; c; c = next) {
        next = c->next;
        if (c->exp == e)
            nbd_conn_close(c, "export removed");
    }
    nbd_export_queue_remove(&s->exports, e);
    free(e->name);
    free(e->description);
    free(e);
    return 0;
}

unsigned nbd_server_export_clients(struct nbd_server *s, const char *name)
{
    struct nbd_export *e = nbd_server_find_export(s, name, strlen(name));

    return e ? e->clients : 0;
}

unsigned nbd_server_clients(struct nbd_server *s)
{
    return s->nconns;
}
