/* TLS credentials, authorization and secret objects. See objects.h. */
#include "tls/objects.h"

#include <errno.h>
#include <fnmatch.h>
#include <string.h>
#include <unistd.h>

#include "common/list.h"
#include "common/util.h"
#include "tls/authz-listfile.h"
#include "tls/file.h"
#include "tls/secret.h"

enum object_kind { OBJ_CREDS, OBJ_AUTHZ, OBJ_SECRET };

struct object {
    struct object *next;
    char *id;
    enum object_kind kind;
    struct tls_creds *creds;  /* OBJ_CREDS: the table's reference */
    char *identity;           /* OBJ_AUTHZ of authz-simple */
    json_t *list;             /* OBJ_AUTHZ of authz-list: its options (policy, rules) */
    struct authz_listfile *listfile;  /* OBJ_AUTHZ of authz-listfile: the same, from a file */
    struct secret secret;     /* OBJ_SECRET: the bytes, decoded and decrypted */
};

DEFINE_QUEUE_TYPE(object_queue, struct object, next)

struct tls_objects {
    object_queue list;
    struct loop *loop;  /* authz-listfile's refresh */
};

static const char *const endpoints[] = { "client", "server", NULL };

/* QEMU's TlsCredsProperties, both credential types' base. dir is optional in the schema
 * because QEMU checks it later, with its own text. */
#define TLS_CREDS_MEMBERS                                                                     \
    { "dir", SCHEMA_STR, .optional = true },                                                  \
    { "endpoint", SCHEMA_ENUM, .optional = true, .values = endpoints },                       \
    { "verify-peer", SCHEMA_BOOL, .optional = true }

static const struct schema_member x509_members[] = {
    TLS_CREDS_MEMBERS,
    { NULL },
};

static const struct schema_member psk_members[] = {
    TLS_CREDS_MEMBERS,
    { "username", SCHEMA_STR, .optional = true },
    { NULL },
};

static const struct schema_member authz_simple_members[] = {
    { "identity", SCHEMA_STR },
    { NULL },
};

static const char *const authz_policies[] = { "deny", "allow", NULL };
static const char *const authz_formats[] = { "exact", "glob", NULL };

/* QAuthZListRule. */
static const struct schema_member authz_rule_members[] = {
    { "match", SCHEMA_STR },
    { "policy", SCHEMA_ENUM, .values = authz_policies },
    { "format", SCHEMA_ENUM, .optional = true, .values = authz_formats },
    { NULL },
};

static const struct schema_member authz_list_members[] = {
    { "policy", SCHEMA_ENUM, .optional = true, .values = authz_policies },
    { "rules", SCHEMA_ARRAY, .optional = true,
      .element = &(const struct schema_member){ NULL, SCHEMA_OBJECT,
                                                .members = authz_rule_members } },
    { NULL },
};

/* QEMU's AuthZListFileProperties; refresh defaults to on where QEMU has inotify (Linux). */
static const struct schema_member authz_listfile_members[] = {
    { "filename", SCHEMA_STR },
    { "refresh", SCHEMA_BOOL, .optional = true },
    { NULL },
};

static const char *const secret_formats[] = { "raw", "base64", NULL };

/* QEMU's SecretProperties (SecretCommonProperties' members first). */
static const struct schema_member secret_members[] = {
    { "loaded", SCHEMA_BOOL, .optional = true },
    { "format", SCHEMA_ENUM, .optional = true, .values = secret_formats },
    { "keyid", SCHEMA_STR, .optional = true },
    { "iv", SCHEMA_STR, .optional = true },
    { "data", SCHEMA_STR, .optional = true },
    { "file", SCHEMA_STR, .optional = true },
    { NULL },
};

static const struct schema_variant object_variants[] = {
    { "tls-creds-x509", x509_members },
    { "tls-creds-psk", psk_members },
    { "authz-simple", authz_simple_members },
    { "authz-list", authz_list_members },
    { "authz-listfile", authz_listfile_members },
    { "secret", secret_members },
    { NULL },
};

const struct schema_member tls_object_options[] = {
    { "qom-type", SCHEMA_ENUM, .full_name = true, .variants = object_variants },
    { "id", SCHEMA_STR },
    { NULL },
};

struct tls_objects *tls_objects_new(struct loop *loop)
{
    struct tls_objects *t = xzalloc(sizeof(struct tls_objects));

    t->loop = loop;
    return t;
}

void tls_creds_unref(struct tls_creds *c)
{
    if (!c || --c->refs > 0)
        return;
    if (c->x509)
        gnutls_certificate_free_credentials(c->x509);
    if (c->psk)
        gnutls_psk_free_server_credentials(c->psk);
    if (c->dh_params)
        gnutls_dh_params_deinit(c->dh_params);
    free(c);
}

static void object_free(struct object *o)
{
    tls_creds_unref(o->creds);
    free(o->identity);
    json_decref(o->list);
    authz_listfile_free(o->listfile);
    secret_clear(&o->secret);
    free(o->id);
    free(o);
}

void tls_objects_free(struct tls_objects *t)
{
    struct object *o;

    if (!t)
        return;
    while ((o = object_queue_pop(&t->list)))
        object_free(o);
    free(t);
}

static struct object *find(struct tls_objects *t, const char *id)
{
    for (struct object *o = t->list.head; o; o = o->next) {
        if (strcmp(o->id, id) == 0)
            return o;
    }
    return NULL;
}

/* DIR/name, which must be readable: QEMU's check and text. NULL with *errp set. */
static char *creds_file(const char *dir, const char *name, struct error **errp)
{
    char *path = xasprintf("%s/%s", dir, name);

    if (access(path, R_OK) < 0) {
        error_setg_errno(errp, errno, "Unable to access credentials %s", path);
        free(path);
        return NULL;
    }
    return path;
}

/* QEMU's optional credential files (ca-crl.pem, dh-params.pem): *path is DIR/name, or NULL
 * when there is no such file; any other failure to access it is an error, with QEMU's text.
 * Returns 0 or -1 with *errp set. */
static int optional_creds_file(const char *dir, const char *name, char **path,
                               struct error **errp)
{
    char *p = xasprintf("%s/%s", dir, name);

    *path = NULL;
    if (access(p, R_OK) < 0) {
        int e = errno;
        if (e != ENOENT)
            error_setg_errno(errp, e, "Unable to access credentials %s", p);
        free(p);
        return e == ENOENT ? 0 : -1;
    }
    *path = p;
    return 0;
}

/* DIR/ca-crl.pem, when present: GnuTLS then refuses the certificates it revokes in
 * gnutls_certificate_verify_peers2(). crl NULL: nothing to load. */
static int load_crl(struct tls_creds *c, const char *crl, struct error **errp)
{
    int r;

    if (!crl)
        return 0;
    r = gnutls_certificate_set_x509_crl_file(c->x509, crl, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        error_setg(errp, "Cannot load CRL '%s': %s", crl, gnutls_strerror(r));
        return -1;
    }
    return 0;
}

/* DIR/dh-params.pem (PKCS#3) at path into c->dh_params; path NULL (no such file): nothing is
 * set, as QEMU 7.2 does not generate parameters then, and GnuTLS picks the RFC 7919 groups for
 * DHE. The caller gives them to its credentials. */
static int load_dh_params(struct tls_creds *c, const char *path, struct error **errp)
{
    _cleanup_free_ char *pem = NULL;
    gnutls_datum_t data;
    size_t len;
    int r;

    if (!path)
        return 0;
    pem = tls_file_read(path, &len, errp);
    if (!pem)
        return -1;
    data = (gnutls_datum_t){ (unsigned char *)pem, (unsigned)len };
    gnutls_dh_params_init(&c->dh_params);
    r = gnutls_dh_params_import_pkcs3(c->dh_params, &data, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        error_setg(errp, "Unable to load DH parameters from %s: %s", path, gnutls_strerror(r));
        return -1;
    }
    return 0;
}

static int load_x509(struct tls_creds *c, const char *dir, struct error **errp)
{
    _cleanup_free_ char *ca = creds_file(dir, "ca-cert.pem", errp);
    _cleanup_free_ char *crl = NULL;
    _cleanup_free_ char *cert = NULL;
    _cleanup_free_ char *key = NULL;
    _cleanup_free_ char *dh = NULL;
    int r;

    /* QEMU's order: every path is checked before anything is loaded. */
    if (!ca || optional_creds_file(dir, "ca-crl.pem", &crl, errp) < 0 ||
        !(cert = creds_file(dir, "server-cert.pem", errp)) ||
        !(key = creds_file(dir, "server-key.pem", errp)) ||
        optional_creds_file(dir, "dh-params.pem", &dh, errp) < 0)
        return -1;
    gnutls_certificate_allocate_credentials(&c->x509);
    r = gnutls_certificate_set_x509_trust_file(c->x509, ca, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        error_setg(errp, "Cannot load CA certificate '%s': %s", ca, gnutls_strerror(r));
        return -1;
    }
    r = gnutls_certificate_set_x509_key_file(c->x509, cert, key, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        error_setg(errp, "Cannot load certificate '%s' & key '%s': %s", cert, key,
                   gnutls_strerror(r));
        return -1;
    }
    if (load_crl(c, crl, errp) < 0 || load_dh_params(c, dh, errp) < 0)
        return -1;
    if (c->dh_params)
        gnutls_certificate_set_dh_params(c->x509, c->dh_params);
    return 0;
}

static int load_psk(struct tls_creds *c, const char *dir, struct error **errp)
{
    _cleanup_free_ char *dh = NULL;
    _cleanup_free_ char *keys = NULL;
    int r;

    /* QEMU's order: both paths are checked, then the DH parameters loaded. */
    if (optional_creds_file(dir, "dh-params.pem", &dh, errp) < 0 ||
        !(keys = creds_file(dir, "keys.psk", errp)) || load_dh_params(c, dh, errp) < 0)
        return -1;
    gnutls_psk_allocate_server_credentials(&c->psk);
    if (c->dh_params)
        gnutls_psk_set_server_dh_params(c->psk, c->dh_params);
    r = gnutls_psk_set_server_credentials_file(c->psk, keys);
    if (r < 0) {
        error_setg(errp, "Cannot set PSK server credentials: %s", gnutls_strerror(r));
        return -1;
    }
    return 0;
}

/* Credentials from opts. Client endpoints load nothing: nothing here can use them, and
 * QEMU's client files (client-cert.pem) are not the server's. */
static struct tls_creds *creds_new(json_t *opts, bool psk, struct error **errp)
{
    const char *dir = json_string_value(json_object_get(opts, "dir"));
    const char *endpoint = json_string_value(json_object_get(opts, "endpoint"));
    json_t *verify = json_object_get(opts, "verify-peer");
    struct tls_creds *c = xzalloc(sizeof(*c));

    c->refs = 1;
    c->kind = psk ? TLS_CREDS_PSK : TLS_CREDS_X509;
    c->server = endpoint && strcmp(endpoint, "server") == 0;
    c->verify_peer = !psk && (!verify || json_is_true(verify));
    if (!dir) {
        error_setg(errp, "Missing 'dir' property value");
        goto fail;
    }
    if (c->server && (psk ? load_psk(c, dir, errp) : load_x509(c, dir, errp)) < 0)
        goto fail;
    return c;
fail:
    tls_creds_unref(c);
    return NULL;
}

static struct authz_listfile *listfile_new(struct tls_objects *t, json_t *opts,
                                           struct error **errp)
{
    json_t *refresh = json_object_get(opts, "refresh");

    return authz_listfile_new(t->loop, json_string_value(json_object_get(opts, "filename")),
                              !refresh || json_is_true(refresh), authz_list_members, errp);
}

/* A copy of secret id's bytes into *out, or -1 with *errp set (QEMU's texts). */
static int lookup_secret(struct tls_objects *t, const char *id, struct secret *out,
                         struct error **errp)
{
    struct object *o = find(t, id);

    if (!o) {
        error_setg(errp, "No secret with id '%s'", id);
        return -1;
    }
    if (o->kind != OBJ_SECRET) {
        error_setg(errp, "Object with id '%s' is not a secret", id);
        return -1;
    }
    secret_set(out, o->secret.data, o->secret.len);
    return 0;
}

/* QEMU's secret loading (its "loaded" property set at creation): the data or the file's
 * bytes; with keyid, decrypted with that secret's key; else with format=base64, decoded. */
static int load_secret(struct tls_objects *t, json_t *opts, struct secret *out,
                       struct error **errp)
{
    const char *id = json_string_value(json_object_get(opts, "id"));
    const char *data = json_string_value(json_object_get(opts, "data"));
    const char *file = json_string_value(json_object_get(opts, "file"));
    const char *format = json_string_value(json_object_get(opts, "format"));
    const char *keyid = json_string_value(json_object_get(opts, "keyid"));
    const char *iv = json_string_value(json_object_get(opts, "iv"));
    bool base64 = format && strcmp(format, "base64") == 0;
    struct secret in = { NULL, 0 }, key = { NULL, 0 };
    int r;

    if (json_object_get(opts, "loaded")) {
        error_setg(errp, "Property 'secret.loaded' is not writable");
        return -1;
    }
    if (file && data) {
        error_setg(errp, "'file' and 'data' are mutually exclusive");
        return -1;
    }
    if (file) {
        if (secret_read_file(file, &in, errp) < 0)
            return -1;
    } else if (data) {
        secret_set(&in, data, strlen(data));
    } else {
        error_setg(errp, "Either 'file' or 'data' must be provided");
        return -1;
    }
    if (keyid && strcmp(keyid, id) == 0) {
        /* QEMU lists the object before loading it: it finds itself, still empty. */
        error_setg(errp, "Secret with id '%s' has no data", id);
        r = -1;
    } else if (keyid) {
        r = lookup_secret(t, keyid, &key, errp);
        if (r == 0)
            r = secret_decrypt(&key, iv, in.data, in.len, base64, out, errp);
        secret_clear(&key);
    } else if (base64) {
        r = secret_base64_decode((const char *)in.data, in.len, out, errp);
    } else {
        *out = in;
        in.data = NULL;
        r = 0;
    }
    secret_clear(&in);
    return r;
}

int tls_objects_add(struct tls_objects *t, json_t *opts, struct error **errp)
{
    const char *type = json_string_value(json_object_get(opts, "qom-type"));
    const char *id = json_string_value(json_object_get(opts, "id"));
    struct object *o;

    if (!id_wellformed(id)) {
        error_setg(errp, "Parameter 'id' expects an identifier");
        return -1;
    }
    if (find(t, id)) {
        error_setg(errp, "attempt to add duplicate property '%s' to object (type 'container')",
                   id);
        return -1;
    }
    o = xzalloc(sizeof(*o));
    o->id = xstrdup(id);
    if (strcmp(type, "authz-simple") == 0) {
        o->kind = OBJ_AUTHZ;
        o->identity = xstrdup(json_string_value(json_object_get(opts, "identity")));
    } else if (strcmp(type, "authz-list") == 0) {
        o->kind = OBJ_AUTHZ;
        o->list = json_incref(opts);
    } else if (strcmp(type, "authz-listfile") == 0) {
        o->kind = OBJ_AUTHZ;
        if (!(o->listfile = listfile_new(t, opts, errp))) {
            object_free(o);
            return -1;
        }
    } else if (strcmp(type, "secret") == 0) {
        o->kind = OBJ_SECRET;
        if (load_secret(t, opts, &o->secret, errp) < 0) {
            object_free(o);
            return -1;
        }
    } else {
        o->kind = OBJ_CREDS;
        o->creds = creds_new(opts, strcmp(type, "tls-creds-psk") == 0, errp);
        if (!o->creds) {
            object_free(o);
            return -1;
        }
    }
    object_queue_push(&t->list, o);
    return 0;
}

int tls_objects_del(struct tls_objects *t, const char *id, struct error **errp)
{
    struct object *o = find(t, id);

    if (!o) {
        error_setg(errp, "object '%s' not found", id);
        return -1;
    }
    object_queue_remove(&t->list, o);
    object_free(o);
    return 0;
}

int tls_objects_secret(struct tls_objects *t, const char *id, struct secret *out,
                       struct error **errp)
{
    return lookup_secret(t, id, out, errp);
}

struct tls_creds *tls_objects_server_creds(struct tls_objects *t, const char *id,
                                           struct error **errp)
{
    struct object *o = find(t, id);

    if (!o) {
        error_setg(errp, "No TLS credentials with id '%s'", id);
        return NULL;
    }
    if (o->kind != OBJ_CREDS) {
        error_setg(errp, "Object with id '%s' is not TLS credentials", id);
        return NULL;
    }
    if (!o->creds->server) {
        error_setg(errp, "Expected TLS credentials for a server endpoint");
        return NULL;
    }
    o->creds->refs++;
    return o->creds;
}

/* authz-list's answer, as QEMU's: the policy of the first rule that matches (exactly, or as
 * an fnmatch() pattern), else the list's policy (default deny). */
static bool list_allows(json_t *list, const char *identity)
{
    const char *policy = json_string_value(json_object_get(list, "policy"));
    json_t *rule;
    size_t i;

    json_array_foreach(json_object_get(list, "rules"), i, rule) {
        const char *match = json_string_value(json_object_get(rule, "match"));
        const char *format = json_string_value(json_object_get(rule, "format"));
        bool glob = format && strcmp(format, "glob") == 0;
        if (glob ? fnmatch(match, identity, 0) == 0 : strcmp(match, identity) == 0) {
            policy = json_string_value(json_object_get(rule, "policy"));
            break;
        }
    }
    return policy && strcmp(policy, "allow") == 0;
}

/* Whether authz object o lets identity in. An authz-listfile whose last refresh failed has no
 * list and lets nobody in, as QEMU's. */
static bool authz_allows(struct object *o, const char *identity)
{
    if (o->listfile) {
        json_t *list = authz_listfile_list(o->listfile);
        return list && list_allows(list, identity);
    }
    return o->list ? list_allows(o->list, identity) : strcmp(o->identity, identity) == 0;
}

int tls_objects_authorized(struct tls_objects *t, const char *id, const char *identity,
                           struct error **errp)
{
    struct object *o = find(t, id);

    if (!o || o->kind != OBJ_AUTHZ) {
        error_setg(errp, "No authorization object with id '%s'", id);
        return 0;
    }
    if (!authz_allows(o, identity)) {
        error_setg(errp, "Identity '%s' is not authorized", identity);
        return 0;
    }
    return 1;
}
