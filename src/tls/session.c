/* Server-side TLS sessions. See session.h. */
#include "tls/session.h"

#include <gnutls/x509.h>

#include "common/util.h"

struct tls_session {
    gnutls_session_t gs;
    struct tls_creds *creds;  /* a reference */
};

/* QEMU's priorities: its default, with the PSK key exchanges for PSK credentials. */
#define PRIORITY_X509 "NORMAL"
#define PRIORITY_PSK "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"

struct tls_session *tls_session_new(struct tls_creds *creds, int fd, struct error **errp)
{
    struct tls_session *s = xzalloc(sizeof(*s));
    bool psk = creds->kind == TLS_CREDS_PSK;
    int r;

    r = gnutls_init(&s->gs, GNUTLS_SERVER | GNUTLS_NONBLOCK);
    if (r < 0) {
        error_setg(errp, "Cannot initialize TLS session: %s", gnutls_strerror(r));
        free(s);
        return NULL;
    }
    s->creds = creds;
    creds->refs++;
    r = gnutls_priority_set_direct(s->gs, psk ? PRIORITY_PSK : PRIORITY_X509, NULL);
    if (r >= 0)
        r = psk ? gnutls_credentials_set(s->gs, GNUTLS_CRD_PSK, creds->psk)
                : gnutls_credentials_set(s->gs, GNUTLS_CRD_CERTIFICATE, creds->x509);
    if (r < 0) {
        error_setg(errp, "Cannot set TLS session credentials: %s", gnutls_strerror(r));
        tls_session_free(s);
        return NULL;
    }
    if (!psk)
        gnutls_certificate_server_set_request(s->gs, creds->verify_peer ? GNUTLS_CERT_REQUIRE
                                                                        : GNUTLS_CERT_IGNORE);
    gnutls_transport_set_int(s->gs, fd);
    return s;
}

void tls_session_free(struct tls_session *s)
{
    if (!s)
        return;
    gnutls_deinit(s->gs);
    tls_creds_unref(s->creds);
    free(s);
}

/* GnuTLS's result as ours: EAGAIN and EINTR are TLS_AGAIN, other errors -1. */
static ssize_t result(ssize_t r, const char *what, struct error **errp)
{
    if (r >= 0)
        return r;
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
        return TLS_AGAIN;
    error_setg(errp, "%s: %s", what, gnutls_strerror((int)r));
    return -1;
}

int tls_session_handshake(struct tls_session *s, struct error **errp)
{
    return (int)result(gnutls_handshake(s->gs), "TLS handshake failed", errp);
}

/* The client's certificate, verified against the CA and the clock; its distinguished name
 * into *dn (to be freed with gnutls_free). */
static int check_certificate(struct tls_session *s, gnutls_datum_t *dn, struct error **errp)
{
    const gnutls_datum_t *certs;
    unsigned status, ncerts;
    gnutls_x509_crt_t crt;
    int r;

    r = gnutls_certificate_verify_peers2(s->gs, &status);
    if (r < 0) {
        error_setg(errp, "Verify failed: %s", gnutls_strerror(r));
        return -1;
    }
    if (status) {
        gnutls_datum_t text;
        gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &text, 0);
        error_setg(errp, "Certificate is not valid: %s", (const char *)text.data);
        gnutls_free(text.data);
        return -1;
    }
    certs = gnutls_certificate_get_peers(s->gs, &ncerts);
    if (!certs || ncerts == 0) {
        error_setg(errp, "No certificate peers");
        return -1;
    }
    gnutls_x509_crt_init(&crt);
    r = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER);
    if (r >= 0)
        r = gnutls_x509_crt_get_dn2(crt, dn);
    gnutls_x509_crt_deinit(crt);
    if (r < 0) {
        error_setg(errp, "Cannot read the client certificate: %s", gnutls_strerror(r));
        return -1;
    }
    return 0;
}

int tls_session_check_peer(struct tls_session *s, struct tls_objects *objs,
                           const char *authz_id, struct error **errp)
{
    gnutls_datum_t dn = { NULL, 0 };
    const char *identity = NULL;
    int ok;

    if (s->creds->kind == TLS_CREDS_PSK) {
        identity = gnutls_psk_server_get_username(s->gs);
    } else if (s->creds->verify_peer) {
        if (check_certificate(s, &dn, errp) < 0)
            return -1;
        identity = (const char *)dn.data;
    }
    if (!authz_id) {
        gnutls_free(dn.data);
        return 0;
    }
    /* Without an identity (x509 with verify-peer=off) nobody can be authorized, as QEMU. */
    if (!identity) {
        error_setg(errp, "Cannot get the client's identity for authorization");
        return -1;
    }
    ok = tls_objects_authorized(objs, authz_id, identity, errp);
    gnutls_free(dn.data);
    return ok ? 0 : -1;
}

ssize_t tls_session_recv(struct tls_session *s, void *buf, size_t len, struct error **errp)
{
    return result(gnutls_record_recv(s->gs, buf, len), "TLS read failed", errp);
}

ssize_t tls_session_send(struct tls_session *s, const void *buf, size_t len, struct error **errp)
{
    return result(gnutls_record_send(s->gs, buf, len), "TLS write failed", errp);
}

bool tls_session_pending(struct tls_session *s)
{
    return gnutls_record_check_pending(s->gs) > 0;
}

bool tls_session_wants_write(struct tls_session *s)
{
    return gnutls_record_get_direction(s->gs) == 1;
}
