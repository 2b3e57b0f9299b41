/* Unit tests of tls/secret.h and the secret objects of tls/objects.h: base64 as QEMU's
 * qbase64_decode() checks it, AES-256-CBC decryption of ciphertexts made here (GnuTLS's
 * encryption with PKCS#7 padding added by the test, and openssl enc when it is installed),
 * QEMU's padding rule and texts, and the bytes a secret object ends up holding. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "common/util.h"
#include "tls/objects.h"
#include "tls/secret.h"

static void assert_error(struct error *err, const char *desc)
{
    assert_non_null(err);
    assert_string_equal(err->desc, desc);
    error_free(err);
}

static void random_bytes(uint8_t *p, size_t len)
{
    assert_int_equal(gnutls_rnd(GNUTLS_RND_NONCE, p, len), 0);
}

/* AES-256-CBC of pt (len bytes) with PKCS#7 padding (pad: add it) into a new buffer. */
static uint8_t *encrypt(const uint8_t key[32], const uint8_t iv[16], const uint8_t *pt,
                        size_t len, bool pad, size_t *ct_len)
{
    size_t n = pad ? (len / 16 + 1) * 16 : len;
    uint8_t *buf = xmalloc(n);
    gnutls_datum_t k = { (unsigned char *)key, 32 }, v = { (unsigned char *)iv, 16 };
    gnutls_cipher_hd_t h;

    memcpy(buf, pt, len);
    memset(buf + len, (int)(n - len), n - len);
    assert_int_equal(gnutls_cipher_init(&h, GNUTLS_CIPHER_AES_256_CBC, &k, &v), 0);
    assert_int_equal(gnutls_cipher_encrypt(h, buf, n), 0);
    gnutls_cipher_deinit(h);
    *ct_len = n;
    return buf;
}

/* ---- base64 ------------------------------------------------------------------------------ */

static void decode_ok(const char *in, const void *want, size_t want_len)
{
    struct secret s;
    struct error *err = NULL;

    assert_int_equal(secret_base64_decode(in, strlen(in), &s, &err), 0);
    assert_null(err);
    assert_int_equal(s.len, want_len);
    assert_memory_equal(s.data, want, want_len);
    assert_int_equal(s.data[s.len], 0);
    secret_clear(&s);
    assert_null(s.data);
}

static void decode_fails(const char *in, size_t len, const char *desc)
{
    struct secret s = { NULL, 0 };
    struct error *err = NULL;

    assert_int_equal(secret_base64_decode(in, len, &s, &err), -1);
    assert_null(s.data);
    assert_error(err, desc);
}

static void test_base64(void **state)
{
    decode_ok("", "", 0);
    decode_ok("YWJj", "abc", 3);
    decode_ok("YQ==", "a", 1);
    decode_ok("AP8A/w==", "\x00\xff\x00\xff", 4);
    decode_ok("YW\nJj\n", "abc", 3);  /* QEMU allows newlines */
    decode_fails("a*b", 3, "Base64 data contains invalid characters");
    decode_fails("YW Jj", 5, "Base64 data contains invalid characters");
    decode_fails("YW\0j", 4, "Base64 data contains embedded NUL characters");
    decode_fails("YWJjYQ", 4, "Base64 data is not NUL terminated");
    decode_fails("YWJ", 3, "Base64 data is malformed: Base64 decoding error.");
}

static void test_base64_encode(void **state)
{
    uint8_t bytes[61];

    for (size_t len = 0; len <= sizeof(bytes); len++) {
        random_bytes(bytes, sizeof(bytes));
        char *b64 = secret_base64_encode(bytes, len);
        assert_int_equal(strlen(b64), (len + 2) / 3 * 4);
        decode_ok(b64, bytes, len);
        free(b64);
    }
    char *s = secret_base64_encode((const uint8_t *)"abc", 3);
    assert_string_equal(s, "YWJj");
    free(s);
}

/* ---- decryption -------------------------------------------------------------------------- */

struct vec {
    struct secret key;
    uint8_t iv[16];
    char *iv_b64;
};

static void vec_init(struct vec *v)
{
    uint8_t key[32];

    random_bytes(key, sizeof(key));
    secret_set(&v->key, key, sizeof(key));
    random_bytes(v->iv, sizeof(v->iv));
    v->iv_b64 = secret_base64_encode(v->iv, sizeof(v->iv));
}

static void vec_free(struct vec *v)
{
    secret_clear(&v->key);
    free(v->iv_b64);
}

/* Every plaintext length from 0 to 48 (so a whole block of padding too), given raw and as
 * base64 text. */
static void test_decrypt_round_trip(void **state)
{
    struct vec v;
    uint8_t pt[48];

    vec_init(&v);
    for (size_t len = 0; len <= sizeof(pt); len++) {
        random_bytes(pt, sizeof(pt));
        size_t ct_len;
        uint8_t *ct = encrypt(v.key.data, v.iv, pt, len, true, &ct_len);
        uint8_t *raw = xmalloc(ct_len + 1);
        memcpy(raw, ct, ct_len);
        raw[ct_len] = 0;
        char *b64 = secret_base64_encode(ct, ct_len);
        for (int base64 = 0; base64 <= 1; base64++) {
            struct secret out;
            struct error *err = NULL;
            int r = secret_decrypt(&v.key, v.iv_b64, base64 ? (uint8_t *)b64 : raw,
                                   base64 ? strlen(b64) : ct_len, base64, &out, &err);
            if (r != 0)
                fail_msg("len %zu base64 %d: %s", len, base64, err->desc);
            assert_int_equal(out.len, len);
            assert_memory_equal(out.data, pt, len);
            assert_int_equal(out.data[len], 0);
            secret_clear(&out);
        }
        free(b64);
        free(raw);
        free(ct);
    }
    vec_free(&v);
}

static void decrypt_fails(const struct secret *key, const char *iv, const uint8_t *in,
                          size_t len, bool base64, const char *desc)
{
    struct secret out = { NULL, 0 };
    struct error *err = NULL;

    assert_int_equal(secret_decrypt(key, iv, in, len, base64, &out, &err), -1);
    assert_null(out.data);
    assert_error(err, desc);
}

static void test_decrypt_errors(void **state)
{
    struct vec v;
    struct secret short_key;
    uint8_t block[32] = {0};

    vec_init(&v);
    secret_set(&short_key, "0123456789abcdef", 16);
    decrypt_fails(&short_key, v.iv_b64, block, 16, false, "Key should be 32 bytes in length");
    decrypt_fails(&v.key, NULL, block, 16, false, "IV is required to decrypt secret");
    decrypt_fails(&v.key, "AAAA", block, 16, false, "IV should be 16 bytes in length not 3");
    decrypt_fails(&v.key, "A*AA", block, 16, false, "Base64 data contains invalid characters");
    decrypt_fails(&v.key, v.iv_b64, block, 20, false,
                  "Length 20 must be a multiple of block size 16");
    decrypt_fails(&v.key, v.iv_b64, (const uint8_t *)"YWJj", 4, true,
                  "Length 3 must be a multiple of block size 16");
    decrypt_fails(&v.key, v.iv_b64, (const uint8_t *)"*", 1, true,
                  "Base64 data contains invalid characters");
    decrypt_fails(&v.key, v.iv_b64, (const uint8_t *)"", 0, false,
                  "Encrypted secret data is empty");

    /* QEMU's padding rule: the last byte, 17 or more, is an error. */
    size_t ct_len;
    memset(block, 'x', sizeof(block));
    block[31] = 17;
    uint8_t *ct = encrypt(v.key.data, v.iv, block, 32, false, &ct_len);
    decrypt_fails(&v.key, v.iv_b64, ct, ct_len, false,
                  "Incorrect number of padding bytes (17) found on decrypted data");
    free(ct);

    /* ... and anything up to 16 is taken, unchecked; 0 removes nothing. */
    struct secret out;
    struct error *err = NULL;
    block[31] = 0;
    ct = encrypt(v.key.data, v.iv, block, 32, false, &ct_len);
    assert_int_equal(secret_decrypt(&v.key, v.iv_b64, ct, ct_len, false, &out, &err), 0);
    assert_int_equal(out.len, 32);
    secret_clear(&out);
    free(ct);
    block[31] = 16;
    ct = encrypt(v.key.data, v.iv, block, 32, false, &ct_len);
    assert_int_equal(secret_decrypt(&v.key, v.iv_b64, ct, ct_len, false, &out, &err), 0);
    assert_int_equal(out.len, 16);
    assert_memory_equal(out.data, block, 16);
    secret_clear(&out);
    free(ct);

    secret_clear(&short_key);
    vec_free(&v);
}

/* A ciphertext made by another implementation: openssl enc (skipped without it). */
static void test_decrypt_openssl(void **state)
{
    static const char plain[] = "AQBk+BJrDWnVBxAAC7qpby+D9vy4FwpVdw8pLw==";
    char dir[] = "/tmp/test-secret-XXXXXX", cmd[512], khex[65], ivhex[33], pt_path[64];
    struct vec v;

    if (system("openssl version >/dev/null 2>&1") != 0)
        skip();
    vec_init(&v);
    for (int i = 0; i < 32; i++)
        snprintf(khex + 2 * i, 3, "%02x", v.key.data[i]);
    for (int i = 0; i < 16; i++)
        snprintf(ivhex + 2 * i, 3, "%02x", v.iv[i]);
    assert_non_null(mkdtemp(dir));
    snprintf(pt_path, sizeof(pt_path), "%s/pt", dir);
    FILE *f = fopen(pt_path, "w");
    assert_non_null(f);
    fputs(plain, f);
    fclose(f);
    snprintf(cmd, sizeof(cmd), "openssl enc -aes-256-cbc -a -A -K %s -iv %s -in %s", khex, ivhex,
             pt_path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char b64[256] = "";
    assert_non_null(fgets(b64, sizeof(b64), p));
    assert_int_equal(pclose(p), 0);
    unlink(pt_path);
    rmdir(dir);

    struct secret out;
    struct error *err = NULL;
    if (secret_decrypt(&v.key, v.iv_b64, (uint8_t *)b64, strlen(b64), true, &out, &err) != 0)
        fail_msg("%s", err->desc);
    assert_int_equal(out.len, strlen(plain));
    assert_memory_equal(out.data, plain, out.len);
    secret_clear(&out);
    vec_free(&v);
}

/* ---- files ----------------------------------------------------------------------------- */

static void test_read_file(void **state)
{
    char path[] = "/tmp/test-secret-XXXXXX";
    int fd = mkstemp(path);
    uint8_t bytes[10000];
    struct secret s;
    struct error *err = NULL;

    assert_true(fd >= 0);
    random_bytes(bytes, sizeof(bytes));
    assert_int_equal(write(fd, bytes, sizeof(bytes)), (ssize_t)sizeof(bytes));
    close(fd);
    assert_int_equal(secret_read_file(path, &s, &err), 0);
    assert_int_equal(s.len, sizeof(bytes));
    assert_memory_equal(s.data, bytes, sizeof(bytes));
    secret_clear(&s);
    unlink(path);

    assert_int_equal(secret_read_file(path, &s, &err), -1);
    char want[200];
    snprintf(want, sizeof(want), "Unable to read %s: Failed to open file \u201c%s\u201d: "
             "No such file or directory", path, path);
    assert_error(err, want);
    err = NULL;
    assert_int_equal(secret_read_file("/", &s, &err), -1);
    assert_error(err, "Unable to read /: Error reading file \u201c/\u201d: Is a directory");
}

/* ---- objects --------------------------------------------------------------------------- */

static int add(struct tls_objects *t, const char *json, struct error **errp)
{
    json_error_t jerr;
    json_t *opts = json_loads(json, 0, &jerr);

    if (!opts)
        fail_msg("bad test JSON %s: %s", json, jerr.text);
    int r = schema_check(tls_object_options, opts, errp);
    if (r == 0)
        r = tls_objects_add(t, opts, errp);
    json_decref(opts);
    return r;
}

static void test_objects(void **state)
{
    struct tls_objects *t = tls_objects_new(NULL);
    struct vec v;
    struct secret got;
    struct error *err = NULL;
    char json[512];
    static const uint8_t disk_key[] = "\x01\x02 the disk's key \x00\xff";

    /* libvirt's: the master key (base64 here), the disk's key encrypted with it. */
    vec_init(&v);
    char *key_b64 = secret_base64_encode(v.key.data, 32);
    snprintf(json, sizeof(json), "{\"qom-type\": \"secret\", \"id\": \"master\", "
             "\"data\": \"%s\", \"format\": \"base64\"}", key_b64);
    assert_int_equal(add(t, json, &err), 0);
    size_t ct_len;
    uint8_t *ct = encrypt(v.key.data, v.iv, disk_key, sizeof(disk_key) - 1, true, &ct_len);
    char *ct_b64 = secret_base64_encode(ct, ct_len);
    snprintf(json, sizeof(json), "{\"qom-type\": \"secret\", \"id\": \"disk\", \"data\": \"%s\", "
             "\"keyid\": \"master\", \"iv\": \"%s\", \"format\": \"base64\"}", ct_b64, v.iv_b64);
    assert_int_equal(add(t, json, &err), 0);
    assert_int_equal(tls_objects_secret(t, "disk", &got, &err), 0);
    assert_int_equal(got.len, sizeof(disk_key) - 1);
    assert_memory_equal(got.data, disk_key, got.len);
    secret_clear(&got);

    /* The master key can go; what it decrypted stays. */
    assert_int_equal(tls_objects_del(t, "master", &err), 0);
    assert_int_equal(tls_objects_secret(t, "disk", &got, &err), 0);
    secret_clear(&got);
    assert_int_equal(add(t, json, &err), -1);
    assert_error(err, "attempt to add duplicate property 'disk' to object (type 'container')");
    err = NULL;
    snprintf(json, sizeof(json), "{\"qom-type\": \"secret\", \"id\": \"disk2\", \"data\": \"%s\", "
             "\"keyid\": \"master\", \"iv\": \"%s\", \"format\": \"base64\"}", ct_b64, v.iv_b64);
    assert_int_equal(add(t, json, &err), -1);
    assert_error(err, "No secret with id 'master'");
    err = NULL;

    /* raw is the default: the data's bytes as they are. */
    assert_int_equal(add(t, "{\"qom-type\": \"secret\", \"id\": \"pw\", \"data\": \"YWJj\"}",
                         &err), 0);
    assert_int_equal(tls_objects_secret(t, "pw", &got, &err), 0);
    assert_int_equal(got.len, 4);
    assert_memory_equal(got.data, "YWJj", 4);
    secret_clear(&got);

    assert_int_equal(tls_objects_secret(t, "nope", &got, &err), -1);
    assert_error(err, "No secret with id 'nope'");
    err = NULL;
    assert_int_equal(add(t, "{\"qom-type\": \"authz-simple\", \"id\": \"a\", "
                         "\"identity\": \"x\"}", &err), 0);
    assert_int_equal(tls_objects_secret(t, "a", &got, &err), -1);
    assert_error(err, "Object with id 'a' is not a secret");

    free(ct_b64);
    free(ct);
    free(key_b64);
    vec_free(&v);
    tls_objects_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_base64),
        cmocka_unit_test(test_base64_encode),
        cmocka_unit_test(test_decrypt_round_trip),
        cmocka_unit_test(test_decrypt_errors),
        cmocka_unit_test(test_decrypt_openssl),
        cmocka_unit_test(test_read_file),
        cmocka_unit_test(test_objects),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
