/* thinblkd's command line. See options.h. */
#include "daemon/options.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "block/graph.h"
#include "common/json-stream.h"
#include "common/keyval.h"
#include "common/qjson.h"
#include "common/schema.h"
#include "common/util.h"
#include "device/group.h"
#include "export/export.h"
#include "qmp/journal.h"
#include "tls/objects.h"

/* QEMU's boolean spellings (qapi_bool_parse). */
static int parse_bool(const char *opt, const char *key, const char *s, bool *out,
                      struct error **errp)
{
    if (!strcmp(s, "on") || !strcmp(s, "yes") || !strcmp(s, "true") || !strcmp(s, "y")) {
        *out = true;
        return 0;
    }
    if (!strcmp(s, "off") || !strcmp(s, "no") || !strcmp(s, "false") || !strcmp(s, "n")) {
        *out = false;
        return 0;
    }
    error_setg(errp, "%s: Parameter '%s' expects 'on' or 'off'", opt, key);
    return -1;
}

/* A byte count with an optional k/M/G/T suffix (powers of 1024), as QEMU's sizes. */
static int parse_size(const char *opt, const char *key, const char *s, size_t *out,
                      struct error **errp)
{
    char *end;
    unsigned long long v;
    unsigned shift = 0;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (end != s) {
        switch (*end) {
        case 'k': case 'K': shift = 10; end++; break;
        case 'm': case 'M': shift = 20; end++; break;
        case 'g': case 'G': shift = 30; end++; break;
        case 't': case 'T': shift = 40; end++; break;
        default: break;
        }
    }
    if (end == s || *end || errno || s[0] == '-' || v > (SIZE_MAX >> shift)) {
        error_setg(errp, "%s: Parameter '%s' expects a non-negative number below 2^64", opt, key);
        return -1;
    }
    *out = (size_t)(v << shift);
    return 0;
}

/* Take string member key of obj (removing it), or NULL. Nested objects are not strings. */
static char *take(json_t *obj, const char *opt, const char *key, struct error **errp)
{
    json_t *v = json_object_get(obj, key);
    char *s;

    if (!v)
        return NULL;
    if (!json_is_string(v)) {
        error_setg(errp, "%s: Invalid parameter '%s'", opt, key);
        return NULL;
    }
    s = xstrdup(json_string_value(v));
    json_object_del(obj, key);
    return s;
}

static int no_leftovers(json_t *obj, const char *opt, struct error **errp)
{
    const char *key;
    json_t *v;

    json_object_foreach(obj, key, v) {
        error_setg(errp, "%s: Invalid parameter '%s'", opt, key);
        return -1;
    }
    return 0;
}

static struct chardev_opt *find_chardev(struct daemon_options *o, const char *id)
{
    for (size_t i = 0; i < o->chardevs.len; i++) {
        if (!strcmp(o->chardevs.ptr[i].id, id))
            return &o->chardevs.ptr[i];
    }
    return NULL;
}

static int add_chardev(struct daemon_options *o, const char *id, const char *path,
                       struct error **errp)
{
    if (find_chardev(o, id)) {
        error_setg(errp, "--chardev: Duplicate chardev ID '%s'", id);
        return -1;
    }
    chardev_opt_vector_append(&o->chardevs,
                              (struct chardev_opt){ xstrdup(id), xstrdup(path), false });
    return 0;
}

/* server=on is required (a monitor listens); wait=on would block startup until a client
 * connects, which a daemon serving disks should not do, so only wait=off is taken. */
static int check_server_wait(const char *opt, json_t *obj, struct error **errp)
{
    _cleanup_free_ char *server = NULL, *wait = NULL;
    struct error *err = NULL;
    bool b;

    server = take(obj, opt, "server", &err);
    wait = take(obj, opt, "wait", &err);
    if (err) {
        error_propagate(errp, err);
        return -1;
    }
    if (server) {
        if (parse_bool(opt, "server", server, &b, errp) < 0)
            return -1;
        if (!b) {
            error_setg(errp, "%s: only server=on is supported (the monitor listens)", opt);
            return -1;
        }
    }
    if (wait) {
        if (parse_bool(opt, "wait", wait, &b, errp) < 0)
            return -1;
        if (b) {
            error_setg(errp, "%s: wait=on is not supported; use wait=off", opt);
            return -1;
        }
    }
    return 0;
}

static int opt_chardev(struct daemon_options *o, const char *arg, struct error **errp)
{
    const char *opt = "--chardev";
    json_t *obj = keyval_parse(arg, "backend", errp);
    _cleanup_free_ char *backend = NULL, *id = NULL, *path = NULL;
    struct error *err = NULL;
    int ret = -1;

    if (!obj)
        return -1;
    backend = take(obj, opt, "backend", &err);
    id = take(obj, opt, "id", &err);
    path = take(obj, opt, "path", &err);
    if (err) {
        error_propagate(errp, err);
        goto out;
    }
    if (!backend || strcmp(backend, "socket") != 0) {
        error_setg(errp, "%s: only the 'socket' backend is supported", opt);
        goto out;
    }
    if (!id) {
        error_setg(errp, "%s: Parameter 'id' is missing", opt);
        goto out;
    }
    if (!path) {
        error_setg(errp, "%s: Parameter 'path' is missing (only Unix sockets are supported)", opt);
        goto out;
    }
    if (check_server_wait(opt, obj, errp) < 0 || no_leftovers(obj, opt, errp) < 0)
        goto out;
    ret = add_chardev(o, id, path, errp);
out:
    json_decref(obj);
    return ret;
}

static void add_monitor(struct daemon_options *o, const char *path, bool pretty, size_t limit)
{
    qmp_monitor_config_vector_append(&o->monitors,
                                     (struct qmp_monitor_config){ path, pretty, limit });
}

static int opt_monitor(struct daemon_options *o, const char *arg, struct error **errp)
{
    const char *opt = "--monitor";
    json_t *obj = keyval_parse(arg, "chardev", errp);
    _cleanup_free_ char *chardev = NULL, *mode = NULL, *pretty = NULL, *limit = NULL,
                        *id = NULL;
    struct error *err = NULL;
    bool pretty_on = false;
    size_t limit_bytes = 0;
    int ret = -1;

    if (!obj)
        return -1;
    chardev = take(obj, opt, "chardev", &err);
    mode = take(obj, opt, "mode", &err);
    pretty = take(obj, opt, "pretty", &err);
    limit = take(obj, opt, "x-output-limit", &err);
    id = take(obj, opt, "id", &err);
    if (err) {
        error_propagate(errp, err);
        goto out;
    }
    if (no_leftovers(obj, opt, errp) < 0)
        goto out;
    if (!chardev) {
        error_setg(errp, "%s: Parameter 'chardev' is missing", opt);
        goto out;
    }
    if (mode && strcmp(mode, "control") != 0) {
        error_setg(errp, "%s: Only QMP monitors are supported (mode=control)", opt);
        goto out;
    }
    if (pretty && parse_bool(opt, "pretty", pretty, &pretty_on, errp) < 0)
        goto out;
    if (limit && parse_size(opt, "x-output-limit", limit, &limit_bytes, errp) < 0)
        goto out;
    if (limit && limit_bytes < QMP_SERVER_SOFT_LIMIT) {
        error_setg(errp, "%s: x-output-limit must be at least %u", opt, QMP_SERVER_SOFT_LIMIT);
        goto out;
    }
    struct chardev_opt *c = find_chardev(o, chardev);
    if (!c) {
        error_setg(errp, "%s: chardev \"%s\" not found", opt, chardev);
        goto out;
    }
    if (c->used) {
        error_setg(errp, "%s: chardev \"%s\" is already used by a monitor", opt, chardev);
        goto out;
    }
    c->used = true;
    add_monitor(o, c->path, pretty_on, limit_bytes);
    ret = 0;
out:
    json_decref(obj);
    return ret;
}

/* --qmp [unix:]PATH[,server=on][,wait=off]: a chardev and a monitor in one. */
static int opt_qmp(struct daemon_options *o, const char *arg, struct error **errp)
{
    const char *opt = "--qmp";
    const char *spec = strncmp(arg, "unix:", 5) == 0 ? arg + 5 : arg;
    const char *colon = strchr(arg, ':');

    /* QEMU's other chardev shorthands (tcp:, telnet:, stdio, ...) are not monitors we offer. */
    if (spec == arg && colon && (!strchr(arg, '/') || colon < strchr(arg, '/'))) {
        error_setg(errp, "%s: only Unix sockets are supported ('unix:PATH' or 'PATH')", opt);
        return -1;
    }
    const char *comma = strchr(spec, ',');
    _cleanup_free_ char *path = comma ? strndup(spec, (size_t)(comma - spec)) : xstrdup(spec);
    _cleanup_free_ char *id = xasprintf("qmp%zu", o->chardevs.len);

    if (!path || !*path) {
        error_setg(errp, "%s: a socket path is required", opt);
        return -1;
    }
    if (comma) {
        json_t *obj = keyval_parse(comma + 1, NULL, errp);
        if (!obj)
            return -1;
        int r = check_server_wait(opt, obj, errp);
        if (r == 0)
            r = no_leftovers(obj, opt, errp);
        json_decref(obj);
        if (r < 0)
            return -1;
    }
    if (add_chardev(o, id, path, errp) < 0)
        return -1;
    o->chardevs.ptr[o->chardevs.len - 1].used = true;
    add_monitor(o, o->chardevs.ptr[o->chardevs.len - 1].path, false, 0);
    return 0;
}

/* --event-journal size=N: how many events the journal keeps (qmp/journal.h). A count, not a
 * byte size: no suffixes. */
static int opt_event_journal(struct daemon_options *o, const char *arg, struct error **errp)
{
    const char *opt = "--event-journal";
    json_t *obj = keyval_parse(arg, NULL, errp);
    _cleanup_free_ char *size = NULL;
    struct error *err = NULL;
    unsigned long long v;
    char *end;
    int ret = -1;

    if (!obj)
        return -1;
    size = take(obj, opt, "size", &err);
    if (err) {
        error_propagate(errp, err);
        goto out;
    }
    if (no_leftovers(obj, opt, errp) < 0)
        goto out;
    if (!size) {
        error_setg(errp, "%s: Parameter 'size' is missing", opt);
        goto out;
    }
    errno = 0;
    v = strtoull(size, &end, 10);
    if (end == size || *end || errno || size[0] == '-') {
        error_setg(errp, "%s: Parameter 'size' expects a number of events", opt);
        goto out;
    }
    if (v > QMP_JOURNAL_MAX_SIZE) {
        error_setg(errp, "%s: Parameter 'size' must be at most %u events", opt,
                   QMP_JOURNAL_MAX_SIZE);
        goto out;
    }
    o->event_journal_size = (size_t)v;
    ret = 0;
out:
    json_decref(obj);
    return ret;
}

const struct schema_member *cli_object_schema(enum cli_object_kind kind)
{
    switch (kind) {
    case CLI_BLOCKDEV: return block_options;
    case CLI_NBD_SERVER: return nbd_server_options;
    case CLI_EXPORT: return export_options;
    case CLI_OBJECT: return tls_object_options;
    case CLI_GROUP: return dev_group_options;
    }
    abort();
}

/* A JSON object if arg starts with '{' (as qemu-storage-daemon allows), else key=value (its
 * strings typed as the object's table says). */
static int opt_object(struct daemon_options *o, enum cli_object_kind kind, const char *opt,
                      const char *arg, const char *implied, struct error **errp)
{
    json_t *obj;

    if (arg[0] == '{') {
        obj = json_stream_parse(arg, strlen(arg), errp);
        if (obj && !qjson_is_object(obj)) {
            json_decref(obj);
            obj = NULL;
            error_setg(errp, "expected a JSON object");
        }
    } else {
        obj = keyval_parse(arg, implied, errp);
        if (obj && schema_coerce(cli_object_schema(kind), obj, errp) < 0) {
            json_decref(obj);
            obj = NULL;
        }
    }
    if (!obj) {
        error_prepend(errp, "%s: ", opt);
        return -1;
    }
    cli_object_vector_append(&o->objects, (struct cli_object){ kind, obj });
    return 0;
}

enum { OPT_CHARDEV = 256, OPT_MONITOR, OPT_QMP, OPT_PIDFILE, OPT_BLOCKDEV, OPT_NBD_SERVER,
       OPT_EXPORT, OPT_OBJECT, OPT_GROUP, OPT_EVENT_JOURNAL };

int daemon_options_parse(struct daemon_options *o, int argc, char **argv, struct error **errp)
{
    static const struct option longopts[] = {
        { "chardev", required_argument, NULL, OPT_CHARDEV },
        { "monitor", required_argument, NULL, OPT_MONITOR },
        { "qmp", required_argument, NULL, OPT_QMP },
        { "pidfile", required_argument, NULL, OPT_PIDFILE },
        { "blockdev", required_argument, NULL, OPT_BLOCKDEV },
        { "nbd-server", required_argument, NULL, OPT_NBD_SERVER },
        { "export", required_argument, NULL, OPT_EXPORT },
        { "object", required_argument, NULL, OPT_OBJECT },
        { "group", required_argument, NULL, OPT_GROUP },
        { "event-journal", required_argument, NULL, OPT_EVENT_JOURNAL },
        { "verbose", no_argument, NULL, 'v' },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    int c;

    memset(o, 0, sizeof(*o));
    o->event_journal_size = QMP_JOURNAL_DEFAULT_SIZE;
    opterr = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":hVvS", longopts, NULL)) != -1) {
        int r = 0;
        switch (c) {
        case OPT_CHARDEV: r = opt_chardev(o, optarg, errp); break;
        case OPT_MONITOR: r = opt_monitor(o, optarg, errp); break;
        case OPT_QMP: r = opt_qmp(o, optarg, errp); break;
        case OPT_BLOCKDEV:
            r = opt_object(o, CLI_BLOCKDEV, "--blockdev", optarg, NULL, errp);
            break;
        case OPT_NBD_SERVER:
            r = opt_object(o, CLI_NBD_SERVER, "--nbd-server", optarg, NULL, errp);
            break;
        case OPT_EXPORT:
            r = opt_object(o, CLI_EXPORT, "--export", optarg, "type", errp);
            break;
        case OPT_OBJECT:
            r = opt_object(o, CLI_OBJECT, "--object", optarg, "qom-type", errp);
            break;
        case OPT_GROUP:
            r = opt_object(o, CLI_GROUP, "--group", optarg, "name", errp);
            break;
        case OPT_EVENT_JOURNAL: r = opt_event_journal(o, optarg, errp); break;
        case OPT_PIDFILE:
            free(o->pidfile);
            o->pidfile = xstrdup(optarg);
            break;
        case 'S': o->prelaunch = true; break;
        case 'v': o->verbose++; break;
        case 'h': o->help = true; break;
        case 'V': o->version = true; break;
        case ':':
            error_setg(errp, "option '%s' requires an argument", argv[optind - 1]);
            return -1;
        default:
            error_setg(errp, "unrecognized option '%s'", argv[optind - 1]);
            return -1;
        }
        if (r < 0)
            return -1;
    }
    if (optind < argc) {
        error_setg(errp, "unexpected argument '%s'", argv[optind]);
        return -1;
    }
    return 0;
}

void daemon_options_free(struct daemon_options *o)
{
    for (size_t i = 0; i < o->chardevs.len; i++) {
        free(o->chardevs.ptr[i].id);
        free(o->chardevs.ptr[i].path);
    }
    chardev_opt_vector_reset(&o->chardevs);
    qmp_monitor_config_vector_reset(&o->monitors);
    for (size_t i = 0; i < o->objects.len; i++)
        json_decref(o->objects.ptr[i].opts);
    cli_object_vector_reset(&o->objects);
    free(o->pidfile);
}

void daemon_options_usage(const char *prog)
{
    printf("Usage: %s [OPTIONS]\n"
           "thin-provisioning block storage daemon, driven by QMP\n"
           "\n"
           "  --chardev socket,id=ID,path=PATH,server=on[,wait=off]\n"
           "                         a Unix socket for a monitor (created mode 0600)\n"
           "  --monitor [chardev=]ID[,mode=control][,pretty=on|off][,x-output-limit=SIZE]\n"
           "                         a QMP monitor on chardev ID\n"
           "  --qmp [unix:]PATH      shorthand for a --chardev and --monitor pair\n"
           "  --blockdev OPTIONS     a block node (BlockdevOptions: key=value or JSON);\n"
#ifdef THINBLK_HAVE_RBD
           "                         drivers: file, host_device, raw, qcow2, fault, rbd\n"
#else
           "                         drivers: file, host_device, raw, qcow2, fault\n"
#endif
           "  --nbd-server addr.type=unix,addr.path=PATH|addr.type=inet,addr.host=H,addr.port=P\n"
           "                         [,max-connections=N][,tls-creds=ID][,tls-authz=ID]\n"
           "                         start the NBD server (TLS: with these credentials)\n"
           "  --object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]\n"
           "  --object tls-creds-psk,id=ID,dir=DIR,endpoint=server\n"
           "  --object authz-simple,id=ID,identity=NAME\n"
           "  --object authz-list,id=ID[,policy=deny|allow][,rules.N.match=M,rules.N.policy=P]\n"
           "  --object authz-listfile,id=ID,filename=FILE[,refresh=on|off]\n"
           "                         TLS credentials, a client allowed by tls-authz\n"
           "  --group [name=]NAME    a stop group, for exports' __org.thinblk_group=NAME\n"
           "  --export [type=]nbd,id=ID,node-name=NODE[,name=NAME][,writable=on|off]\n"
           "           [,description=TEXT][,werror=ACTION][,rerror=ACTION]\n"
           "           [,__org.thinblk_group=NAME]\n"
           "                         export a node; ACTION: report, ignore, stop, enospc\n"
           "  --export type=vhost-user-blk,id=ID,node-name=NODE,addr.type=unix,addr.path=PATH\n"
           "           [,writable=on|off][,num-queues=N][,logical-block-size=N]\n"
           "           [,werror=ACTION][,rerror=ACTION][,__org.thinblk_group=NAME]\n"
           "                         export a node to a vhost-user frontend\n"
           "  --event-journal size=N keep the last N events (default 1024, 0: none, at most\n"
           "                         1048576) for __org.thinblk_query-event-journal\n"
           "  -S                     start in run state 'prelaunch' (no I/O until 'cont')\n"
           "  --pidfile PATH         write the process ID to PATH (removed at exit)\n"
           "  -v, --verbose          log more (repeat for debug)\n"
           "  -h, --help             show this help\n"
           "  -V, --version          show the version\n"
           "\n"
           "See thinblkd(1).\n", prog);
}
