/* QEMU's secret object (QCryptoSecret, 7.2): the bytes of a password or key, given inline
 * (data) or in a file, as raw bytes or base64, optionally AES-256-CBC encrypted with the key
 * another secret holds (keyid, iv): what libvirt passes (a master key in a file, each disk's
 * password encrypted with it).
 *
 * These are the pure steps, with QEMU's error texts; the object registry (objects.h) keeps
 * the secrets and looks them up. Every buffer here that held secret bytes is wiped before it
 * is freed; none of it is ever logged. GnuTLS does the base64 and the cipher.
 */
#ifndef THINBLK_TLS_SECRET_H
#define THINBLK_TLS_SECRET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

/* A secret file larger than this is refused ("File too large"); QEMU reads any size. */
#define SECRET_FILE_MAX (1u << 20)

/* Secret bytes: data has len bytes and a NUL after them (QEMU's, for string users). */
struct secret {
    uint8_t *data;
    size_t len;
};

/* Wipe and free s's bytes (explicit_bzero); s itself is the caller's. NULL data ignored. */
void secret_clear(struct secret *s);
/* A copy of len bytes of data (plus a NUL) into *out. Never fails. */
void secret_set(struct secret *out, const void *data, size_t len);

/* QEMU's qbase64_decode(): in (len bytes, which must be followed by a NUL and contain none)
 * of base64 characters and newlines, decoded into *out. Returns 0 or -1 with *errp set. */
int secret_base64_decode(const char *in, size_t len, struct secret *out, struct error **errp);
/* The base64 text of len bytes of data: a new NUL-terminated string the caller wipes
 * (explicit_bzero) and frees. */
char *secret_base64_encode(const uint8_t *data, size_t len);

/* Read the whole of path into *out (QEMU's load_data with file=, GLib's texts). Blocks on
 * the file (a small local file: read where QEMU reads it, at object creation). Returns 0 or
 * -1 with *errp set. */
int secret_read_file(const char *path, struct secret *out, struct error **errp);

/* QEMU's qcrypto_secret_decrypt(): key (32 bytes), iv_b64 (base64 of 16 bytes, NULL if not
 * given), in (len bytes followed by a NUL: the ciphertext, base64 text if base64) decrypted
 * with AES-256-CBC and its padding removed as QEMU does (the last byte counts the padding,
 * at most 16, not checked further). Returns 0 with the plaintext in *out, or -1 with *errp
 * set. */
int secret_decrypt(const struct secret *key, const char *iv_b64, const uint8_t *in, size_t len,
                   bool base64, struct secret *out, struct error **errp);

#endif
