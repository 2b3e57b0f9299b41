/* A server-side TLS session on a non-blocking socket (GnuTLS), for a protocol that upgrades
 * a plaintext connection (NBD_OPT_STARTTLS). The caller drives it from its event loop: each
 * call returns at once, TLS_AGAIN saying to wait for what tls_session_wants_write() says.
 */
#ifndef THINBLK_TLS_SESSION_H
#define THINBLK_TLS_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "common/error.h"
#include "tls/objects.h"

#define TLS_AGAIN (-2)

struct tls_session;

/* A session on fd (borrowed: the caller closes it after tls_session_free()) with creds (a
 * reference is taken). Returns NULL with *errp set. */
struct tls_session *tls_session_new(struct tls_creds *creds, int fd, struct error **errp);
void tls_session_free(struct tls_session *s);

/* Go on with the handshake. Returns 0 once done, TLS_AGAIN, or -1 with *errp set. */
int tls_session_handshake(struct tls_session *s, struct error **errp);
/* After the handshake: check the client against the credentials (verify-peer: its
 * certificate's chain and dates) and, if authz_id, against that object in objs. Returns 0 or
 * -1 with *errp set. */
int tls_session_check_peer(struct tls_session *s, struct tls_objects *objs,
                           const char *authz_id, struct error **errp);

/* Record I/O: bytes moved (recv: 0 at the peer's end), TLS_AGAIN, or -1 with *errp set. A
 * send that returned TLS_AGAIN has taken the data: call again with at least len bytes still
 * unsent at buf, as GnuTLS asks. */
ssize_t tls_session_recv(struct tls_session *s, void *buf, size_t len, struct error **errp);
ssize_t tls_session_send(struct tls_session *s, const void *buf, size_t len, struct error **errp);
/* Decrypted bytes are waiting: read on even though the socket is not readable. */
bool tls_session_pending(struct tls_session *s);
/* After TLS_AGAIN: whether the session waits to write (else to read). */
bool tls_session_wants_write(struct tls_session *s);

#endif
