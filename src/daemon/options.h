/* thinblkd's command line, in qemu-storage-daemon's shape.
 *
 *   --chardev socket,id=ID,path=PATH,server=on[,wait=off]
 *   --monitor [chardev=]ID[,mode=control][,pretty=on|off][,x-output-limit=SIZE]
 *   --qmp [unix:]PATH[,server=on][,wait=off]      (shorthand for the two above)
 *   -S, --pidfile PATH, -v/--verbose, -h/--help, -V/--version
 *
 * Option values use QEMU's key=value syntax (common/keyval.h).
 */
#ifndef THINBLK_DAEMON_OPTIONS_H
#define THINBLK_DAEMON_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"
#include "qmp/server.h"

struct chardev_opt {
    char *id;
    char *path;
    bool used;  /* by a monitor */
};

struct daemon_options {
    struct chardev_opt *chardevs;
    size_t nchardevs;
    struct qmp_monitor_config *monitors;  /* path borrowed from its chardev */
    size_t nmonitors;
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
