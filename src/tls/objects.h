/* User-creatable objects, as QEMU's --object / object-add / object-del make them:
 * tls-creds-x509, tls-creds-psk (credentials loaded from a directory with QEMU's file names),
 * authz-simple (one allowed identity), authz-list (rules) and secret (bytes for drivers that
 * authenticate: rbd's key-secret; see secret.h). The module kept its first users' name.
 *
 *   tls-creds-x509: DIR/ca-cert.pem, DIR/server-cert.pem, DIR/server-key.pem; verify-peer
 *                   (default on, as QEMU) asks the client for a certificate signed by the CA
 *                   and not revoked by DIR/ca-crl.pem (optional)
 *   tls-creds-psk:  DIR/keys.psk, lines "username:hexkey" (GnuTLS's and QEMU's format)
 *   both:           DIR/dh-params.pem (optional, PKCS#3): the DHE parameters
 *   authz-simple:   identity: a client certificate's distinguished name or a PSK username
 *   authz-list:     rules (match, policy allow|deny, format exact|glob) tried in order, the
 *                   first match's policy wins, else policy (default deny)
 *   authz-listfile: the same options read from filename, re-read on changes with refresh
 *                   (default on), see authz-listfile.h
 *   secret:         data or file, format raw|base64; keyid and iv: AES-256-CBC ciphertext
 *                   under the key secret keyid holds. Loaded (read, decoded, decrypted) at
 *                   creation, as QEMU; the bytes are never shown and are wiped when freed.
 *
 * Credentials are reference-counted: object-del removes the id at once (QEMU 7.2 does not
 * refuse to delete credentials in use), and a server holding them keeps them until it stops.
 * Only server endpoints are usable here; client ones are accepted, as QEMU does, and refused
 * where a server is asked to use them. Secrets are copied out when used (a driver's open, a
 * secret decrypted with a key), so object-del never refuses them either (QEMU 7.2 neither).
 * Everything runs on the loop thread.
 */
#ifndef THINBLK_TLS_OBJECTS_H
#define THINBLK_TLS_OBJECTS_H

#include <stdbool.h>

#include <gnutls/gnutls.h>
#include <jansson.h>

#include "common/error.h"
#include "common/schema.h"
#include "tls/secret.h"

enum tls_creds_kind { TLS_CREDS_X509, TLS_CREDS_PSK };

struct tls_creds {
    unsigned refs;
    enum tls_creds_kind kind;
    bool server;                 /* endpoint=server */
    bool verify_peer;            /* x509: ask for and check the client's certificate */
    gnutls_certificate_credentials_t x509;  /* kind X509 */
    gnutls_psk_server_credentials_t psk;    /* kind PSK */
    gnutls_dh_params_t dh_params;           /* DIR/dh-params.pem if present, else NULL */
};

struct tls_objects;
struct loop;

/* QEMU's ObjectOptions for the types above: qom-type, id, then the type's members. */
extern const struct schema_member tls_object_options[];

/* A table whose authz-listfile objects watch their files on loop (borrowed). */
struct tls_objects *tls_objects_new(struct loop *loop);
/* Free the table; credentials still held elsewhere live on until released. NULL ignored. */
void tls_objects_free(struct tls_objects *t);

/* object-add with opts (borrowed, checked against tls_object_options): loads credentials
 * now, with QEMU's texts. Returns 0 or -1 with *errp set. */
int tls_objects_add(struct tls_objects *t, json_t *opts, struct error **errp);
/* object-del. Returns 0 or -1 with *errp set ("object 'ID' not found"). */
int tls_objects_del(struct tls_objects *t, const char *id, struct error **errp);

/* Server credentials id, a new reference, or NULL with *errp set (QEMU's texts: no such id,
 * not credentials, not a server endpoint). */
struct tls_creds *tls_objects_server_creds(struct tls_objects *t, const char *id,
                                           struct error **errp);
void tls_creds_unref(struct tls_creds *c);

/* A copy of the bytes of secret object id into *out (the caller clears it: secret_clear()),
 * or -1 with *errp set (QEMU's texts: "No secret with id 'ID'", "Object with id 'ID' is not
 * a secret"). */
int tls_objects_secret(struct tls_objects *t, const char *id, struct secret *out,
                       struct error **errp);

/* Whether authz object id (authz-simple, authz-list, authz-listfile) lets identity in.
 * Returns 1, or 0 with *errp saying why (no such object, not an authz object, identity not allowed). */
int tls_objects_authorized(struct tls_objects *t, const char *id, const char *identity,
                           struct error **errp);

#endif
