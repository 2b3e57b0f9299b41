/* Block exports: QEMU's block-export-add/-del and nbd-server-start/-stop, over the devices.
 *
 * An export serves a node to clients through a device named by the export's id (the name in
 * BLOCK_IO_ERROR, query-block and query-blockstats); the device carries the error policy
 * (werror, rerror). Only NBD exports exist so far. As in QEMU, NBD exports need a running NBD
 * server, and stopping the server removes them.
 */
#ifndef THINBLK_EXPORT_H
#define THINBLK_EXPORT_H

#include <jansson.h>

#include "common/error.h"
#include "common/schema.h"

struct block_graph;
struct dev_context;
struct exports;

struct tls_objects;

/* tls: the objects nbd-server-start's tls-creds and tls-authz name (borrowed: must outlive
 * the exports). */
struct exports *exports_new(struct block_graph *graph, struct dev_context *devs,
                            struct tls_objects *tls);
/* Remove every export, stop the NBD server. In-flight requests are left to finish. */
void exports_shutdown(struct exports *x);
void exports_free(struct exports *x);

/* QEMU's NbdServerOptions with addr a flat SocketAddress (--nbd-server), and
 * nbd-server-start's arguments, the same with addr a SocketAddressLegacy. */
extern const struct schema_member nbd_server_options[];
extern const struct schema_member nbd_server_start_args[];
/* QEMU's BlockExportOptions (block-export-add, --export), with werror and rerror. */
extern const struct schema_member export_options[];

/* nbd-server-start with NbdServerOptions (borrowed, checked against nbd_server_options).
 * Returns 0 or -1 with *errp set. */
int exports_nbd_server_start(struct exports *x, json_t *opts, struct error **errp);
int exports_nbd_server_stop(struct exports *x, struct error **errp);

/* block-export-add with BlockExportOptions (borrowed, checked against export_options).
 * Returns 0 or -1 with *errp set. */
int exports_add(struct exports *x, json_t *opts, struct error **errp);
/* block-export-del: mode "safe" (fail while clients are connected) or "hard" (checked), or
 * NULL for "safe". */
int exports_del(struct exports *x, const char *id, const char *mode, struct error **errp);
/* query-block-exports. */
json_t *exports_query(struct exports *x);

#endif
