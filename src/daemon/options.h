/* thinblkd's command line, in qemu-storage-daemon's shape.
 *
 *   --chardev socket,id=ID,path=PATH,server=on[,wait=off]
 *   --monitor [chardev=]ID[,mode=control][,pretty=on|off][,x-output-limit=SIZE]
 *   --qmp [unix:]PATH[,server=on][,wait=off]      (shorthand for the two above)
 *   --blockdev OPTIONS                    (BlockdevOptions: key=value or a JSON object)
 *   --nbd-server addr.type=unix,addr.path=PATH | addr.type=inet,addr.host=H,addr.port=P
 *                [,max-connections=N][,tls-creds=ID][,tls-authz=ID]
 *   --object tls-creds-x509|tls-creds-psk|authz-simple|authz-list,id=ID,...   (object-add's arguments)
 *   --export [type=]nbd,id=ID,node-name=NODE[,name=NAME][,writable=on|off]
 *            [,description=TEXT][,werror=ACTION][,rerror=ACTION]
 *   --event-journal size=N                 (thinblk: events kept for a client that missed them)
 *   -S, --pidfile PATH, -v/--verbose, -h/--help, -V/--version
 *
 * Option values use QEMU's key=value syntax (common/keyval.h).
 */
#ifndef THINBLK_DAEMON_OPTIONS_H
#define THINBLK_DAEMON_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "common/error.h"
#include "common/schema.h"
#include "common/vector.h"
#include "qmp/server.h"

struct chardev_opt {
    char *id;
    char *path;
    bool used;  /* by a monitor */
};

/* --object, --blockdev, --nbd-server and --export, applied in the order given, as
 * qemu-storage-daemon does (an export needs its node and the NBD server before it, the NBD
 * server its TLS credentials), and thinblk's --group (before the exports that join it). */
enum cli_object_kind { CLI_BLOCKDEV, CLI_NBD_SERVER, CLI_EXPORT, CLI_OBJECT, CLI_GROUP };

struct cli_object {
    enum cli_object_kind kind;
    json_t *opts;  /* the QMP arguments, typed (not checked yet) */
};

/* The table an object's options are typed and checked with: the one of blockdev-add,
 * nbd-server-start (with the flat SocketAddress), block-export-add, object-add or
 * __org.thinblk_group-add. */
const struct schema_member *cli_object_schema(enum cli_object_kind kind);

DEFINE_VECTOR_TYPE(cli_object_vector, struct cli_object)
DEFINE_VECTOR_TYPE(chardev_opt_vector, struct chardev_opt)
DEFINE_VECTOR_TYPE(qmp_monitor_config_vector, struct qmp_monitor_config)

struct daemon_options {
    cli_object_vector objects;
    chardev_opt_vector chardevs;
    qmp_monitor_config_vector monitors;  /* path borrowed from its chardev */
    size_t event_journal_size;  /* --event-journal size=N; QMP_JOURNAL_DEFAULT_SIZE if not given */
    bool prelaunch;   /* -S: start in prelaunch, like QEMU */
    char *pidfile;
    int verbose;
    bool help, version;
};

/* Parse argv into opts (zeroed first). Returns 0, or -1 with *errp set (a usage error). */
int daemon_options_parse(struct daemon_options *opts, int argc, char **argv, struct error **errp);
void daemon_options_free(struct daemon_options *opts);
/* Print --help text to stdout. */
void daemon_options_usage(const char *prog);

#endif
