/* The NBD server: listening sockets, the fixed newstyle handshake and the transmission phase
 * (doc/proto.md of NetworkBlockDevice/nbd), in front of devices.
 *
 * One server at a time (QEMU's nbd-server-start/nbd-server-stop), any number of exports, each
 * serving one device under a name; several clients per export. Requests go to the device
 * (device/device.h) and their replies go back in completion order (simple or structured
 * replies). While the device does not accept requests (the daemon is stopped), a connection
 * stops reading its socket: back-pressure, never an error. A malformed handshake or request
 * closes that one connection at worst; the server and other connections go on.
 *
 * Everything runs on the loop thread; nothing blocks.
 */
#ifndef THINBLK_NBD_SERVER_H
#define THINBLK_NBD_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "common/error.h"

struct loop;
struct device;
struct nbd_server;
struct tls_creds;
struct tls_objects;

/* Start listening on addr, QEMU's SocketAddress as a JSON object (borrowed, checked: see
 * nbd_server_options in export/export.h):
 *   {"type": "unix", "path": P}                (socket created mode 0600; stale file replaced)
 *   {"type": "inet", "host": H, "port": "N"}   (port a string, as QEMU's; binds only there)
 * max_connections 0 means no limit. Returns the server or NULL with *errp set. */
struct nbd_server *nbd_server_start(struct loop *loop, json_t *addr, uint32_t max_connections,
                                    struct error **errp);

/* Require TLS of every client (NBD_OPT_STARTTLS before any other option but ABORT) with
 * server credentials creds (the reference is taken over); if authz_id, clients must pass
 * that authz object of objs (borrowed, must outlive s), looked up at each handshake. */
void nbd_server_set_tls(struct nbd_server *s, struct tls_creds *creds, struct tls_objects *objs,
                        const char *authz_id);

/* Close the listening socket and every connection (requests in flight at a device finish
 * and are dropped), remove a Unix socket file, free the server and its export table (the
 * devices are not touched). NULL is ignored. */
void nbd_server_stop(struct nbd_server *s);

/* A server with no listening socket, for tests and fuzzing: clients come through
 * nbd_server_add_client(). nbd_server_stop() frees it. */
struct nbd_server *nbd_server_new(struct loop *loop, uint32_t max_connections);

/* Serve a connected stream socket fd (non-blocking; owned from now on, closed on failure)
 * as a new client, from the handshake on. Returns 0, or -1 with *errp set if the server is
 * at max_connections. */
int nbd_server_add_client(struct nbd_server *s, int fd, struct error **errp);

/* Make dev available as export name (with description, may be NULL), writable or read-only,
 * serving the metadata context qemu:allocation-depth too if allocation_depth.
 * The export keeps no reference: nbd_server_remove_export() must come before the device goes.
 * Returns 0 or -1 with *errp set (duplicate name). */
int nbd_server_add_export(struct nbd_server *s, const char *name, const char *description,
                          struct device *dev, bool writable, bool allocation_depth,
                          struct error **errp);

/* Remove export name. hard: close its connections; otherwise fail with *errp set if it has any
 * ("export 'NAME' still in use"). Returns 0 or -1. Requests of closed connections may still
 * be in the device (or parked there): wait for !device_busy() before device_free(). */
int nbd_server_remove_export(struct nbd_server *s, const char *name, bool hard,
                             struct error **errp);

/* Connections currently open to export name (0 if there is no such export). */
unsigned nbd_server_export_clients(struct nbd_server *s, const char *name);

/* Connections currently open, in the handshake or on an export. */
unsigned nbd_server_clients(struct nbd_server *s);

#endif
