/* Secret decoding and decryption. See secret.h. */
#include "tls/secret.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "common/assert.h"
#include "common/util.h"

#define AES_BLOCK 16

void secret_clear(struct secret *s)
{
    if (s->data) {
        explicit_bzero(s->data, s->len + 1);
        free(s->data);
    }
    s->data = NULL;
    s->len = 0;
}

void secret_set(struct secret *out, const void *data, size_t len)
{
    out->data = xmalloc(len + 1);
    if (len)
        memcpy(out->data, data, len);
    out->data[len] = '\0';
    out->len = len;
}

/* gnutls's datum, wiped and freed. */
static void datum_clear(gnutls_datum_t *d)
{
    if (d->data) {
        explicit_bzero(d->data, d->size);
        gnutls_free(d->data);
    }
    d->data = NULL;
    d->size = 0;
}

int secret_base64_decode(const char *in, size_t len, struct secret *out, struct error **errp)
{
    static const char valid[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n";
    gnutls_datum_t b64 = { (unsigned char *)in, (unsigned)len }, raw = { NULL, 0 };

    if (in[len] != '\0') {
        error_setg(errp, "Base64 data is not NUL terminated");
        return -1;
    }
    if (memchr(in, '\0', len)) {
        error_setg(errp, "Base64 data contains embedded NUL characters");
        return -1;
    }
    if (strspn(in, valid) != len) {
        error_setg(errp, "Base64 data contains invalid characters");
        return -1;
    }
    if (len > UINT32_MAX) {
        error_setg(errp, "Base64 data is too long");
        return -1;
    }
    /* Stricter than GLib's decoder under QEMU, which decodes a truncated last group (and
     * '=' anywhere) as best it can: GnuTLS wants whole, correctly padded groups. */
    int r = gnutls_base64_decode2(&b64, &raw);
    if (r < 0) {
        error_setg(errp, "Base64 data is malformed: %s", gnutls_strerror(r));
        return -1;
    }
    secret_set(out, raw.data, raw.size);
    datum_clear(&raw);
    return 0;
}

char *secret_base64_encode(const uint8_t *data, size_t len)
{
    gnutls_datum_t raw = { (unsigned char *)data, (unsigned)len }, b64 = { NULL, 0 };
    char *s;

    ASSERT(len <= UINT32_MAX / 2);
    if (len == 0)
        return xstrdup("");
    if (gnutls_base64_encode2(&raw, &b64) < 0)
        abort();  /* only on allocation failure */
    s = xmalloc(b64.size + 1);
    memcpy(s, b64.data, b64.size);
    s[b64.size] = '\0';
    datum_clear(&b64);
    return s;
}

int secret_read_file(const char *path, struct secret *out, struct error **errp)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct secret s = { NULL, 0 };
    size_t cap = 0;

    if (fd < 0) {
        error_setg(errp, "Unable to read %s: Failed to open file “%s”: %s", path, path,
                   strerror(errno));
        return -1;
    }
    for (;;) {
        if (s.len == cap) {
            /* Grown by copying, so that no secret bytes are left behind in freed memory. */
            struct secret bigger;
            cap = cap ? 2 * cap : 4096;
            bigger.data = xmalloc(cap + 1);
            bigger.len = s.len;
            if (s.len)
                memcpy(bigger.data, s.data, s.len);
            secret_clear(&s);
            s = bigger;
        }
        ssize_t n = read(fd, s.data + s.len, cap - s.len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            error_setg(errp, "Unable to read %s: Error reading file “%s”: %s", path,
                       path, strerror(errno));
            secret_clear(&s);
            return -1;
        }
        if (n == 0)
            break;
        s.len += (size_t)n;
        if (s.len > SECRET_FILE_MAX) {
            error_setg(errp, "Unable to read %s: %s", path, strerror(EFBIG));
            secret_clear(&s);
            return -1;
        }
    }
    s.data[s.len] = '\0';
    *out = s;
    return 0;
}

int secret_decrypt(const struct secret *key, const char *iv_b64, const uint8_t *in, size_t len,
                   bool base64, struct secret *out, struct error **errp)
{
    struct secret iv = { NULL, 0 }, ct = { NULL, 0 }, pt = { NULL, 0 };
    gnutls_cipher_hd_t aes = NULL;
    int ret = -1, r;

    if (key->len != 32) {
        error_setg(errp, "Key should be 32 bytes in length");
        return -1;
    }
    if (!iv_b64) {
        error_setg(errp, "IV is required to decrypt secret");
        return -1;
    }
    if (secret_base64_decode(iv_b64, strlen(iv_b64), &iv, errp) < 0)
        return -1;
    if (iv.len != AES_BLOCK) {
        error_setg(errp, "IV should be 16 bytes in length not %zu", iv.len);
        goto out;
    }
    if (base64) {
        if (secret_base64_decode((const char *)in, len, &ct, errp) < 0)
            goto out;
    } else {
        secret_set(&ct, in, len);
    }
    if (ct.len % AES_BLOCK != 0) {
        error_setg(errp, "Length %zu must be a multiple of block size %d", ct.len, AES_BLOCK);
        goto out;
    }
    if (ct.len == 0) {
        /* QEMU reads the padding byte before the buffer here. */
        error_setg(errp, "Encrypted secret data is empty");
        goto out;
    }
    gnutls_datum_t k = { key->data, 32 }, v = { iv.data, AES_BLOCK };
    r = gnutls_cipher_init(&aes, GNUTLS_CIPHER_AES_256_CBC, &k, &v);
    if (r < 0) {
        aes = NULL;
        error_setg(errp, "Cannot initialize cipher: %s", gnutls_strerror(r));
        goto out;
    }
    pt.data = xzalloc(ct.len + 1);
    pt.len = ct.len;
    r = gnutls_cipher_decrypt2(aes, ct.data, ct.len, pt.data, pt.len);
    if (r < 0) {
        error_setg(errp, "Cannot decrypt data: %s", gnutls_strerror(r));
        goto out;
    }
    /* QEMU's check, no more: the last byte counts the padding; the padding's other bytes
     * are not looked at, and 0 removes nothing. */
    uint8_t pad = pt.data[pt.len - 1];
    if (pad > AES_BLOCK || pad > pt.len) {
        error_setg(errp, "Incorrect number of padding bytes (%d) found on decrypted data", pad);
        goto out;
    }
    explicit_bzero(pt.data + pt.len - pad, pad);
    pt.len -= pad;
    *out = pt;
    pt.data = NULL;
    ret = 0;
out:
    if (aes)
        gnutls_cipher_deinit(aes);
    secret_clear(&pt);
    secret_clear(&ct);
    secret_clear(&iv);
    return ret;
}
