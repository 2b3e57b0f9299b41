#include "common/keyval.h"

#include <string.h>

#include "common/util.h"

static bool is_rfqdn_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.';
}

/* The length of the key fragment at s (len characters left): up to the next '.' or the end.
 * As in QEMU (parse_qapi_name()), a downstream name "__RFQDN_name" is one fragment though its
 * RFQDN has dots: "__org.thinblk_group" is one key, not "__org" holding "thinblk_group". */
static size_t fragment_len(const char *s, size_t len)
{
    size_t i = 0;

    if (len > 2 && s[0] == '_' && s[1] == '_') {
        for (i = 2; i < len && is_rfqdn_char(s[i]); i++)
            ;
        i = i < len && s[i] == '_' ? i + 1 : 0;
    }
    while (i < len && s[i] != '.')
        i++;
    return i;
}

/* Store value at the dotted path key inside obj, creating intermediate objects. */
static int keyval_store(json_t *obj, const char *key, const char *value, struct error **errp)
{
    size_t len = strlen(key);

    for (size_t pos = 0;;) {
        size_t n = fragment_len(key + pos, len - pos);
        if (n == 0) {
            error_setg(errp, "Invalid parameter '%s'", key);
            return -1;
        }
        _cleanup_free_ char *part = xasprintf("%.*s", (int)n, key + pos);
        json_t *cur = json_object_get(obj, part);
        if (pos + n == len) {
            if (cur && json_is_object(cur)) {
                error_setg(errp, "Parameters '%s.*' used inconsistently", key);
                return -1;
            }
            json_object_set_new(obj, part, json_string(value));
            return 0;
        }
        if (!cur) {
            cur = json_object();
            json_object_set_new(obj, part, cur);
        } else if (!json_is_object(cur)) {
            error_setg(errp, "Parameters '%.*s.*' used inconsistently", (int)(pos + n), key);
            return -1;
        }
        obj = cur;
        pos += n + 1;
    }
}

/* QEMU's keyval.c: a key is dot-separated names of letters, digits, '-' and '_', each at
 * most 127 characters (a downstream name's RFQDN, dots and all, counts in its fragment). */
static int check_key(const char *key, size_t len, struct error **errp)
{
    if (len == 0) {
        error_setg(errp, "Invalid parameter ''");
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        char c = key[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.')) {
            error_setg(errp, "Invalid parameter '%.*s'", (int)len, key);
            return -1;
        }
    }
    for (size_t pos = 0; pos < len;) {
        size_t n = fragment_len(key + pos, len - pos);
        if (n > 127) {
            error_setg(errp, "Parameter '%.*s' is too long", (int)len, key);
            return -1;
        }
        pos += n + 1;
    }
    return 0;
}

json_t *keyval_parse(const char *s, const char *implied_key, struct error **errp)
{
    json_t *obj = json_object();
    struct buf key = {0}, val = {0};
    const char *p = s;
    bool first = true;

    while (*p) {
        buf_reset(&key);
        buf_reset(&val);
        /* Key: up to '=' or ','. */
        const char *k = p;
        while (*p && *p != '=' && *p != ',')
            p++;
        bool has_eq = *p == '=';
        if (!has_eq && first && implied_key && p > k) {
            /* The implied key's value ends at the first comma: no ",," escape there. */
            buf_append(&key, implied_key, strlen(implied_key));
            buf_append(&val, k, (size_t)(p - k));
        } else {
            if (check_key(k, (size_t)(p - k), errp) < 0)
                goto fail;
            if (!has_eq) {
                error_setg(errp, "Expected '=' after parameter '%.*s'", (int)(p - k), k);
                goto fail;
            }
            buf_append(&key, k, (size_t)(p - k));
            p++;
            /* Value: up to a single ','; ",," is a literal comma. */
            for (;;) {
                if (*p == ',' && p[1] == ',') {
                    buf_append(&val, ",", 1);
                    p += 2;
                } else if (*p == ',' || !*p) {
                    break;
                } else {
                    buf_append(&val, p++, 1);
                }
            }
        }
        buf_append(&key, "", 1);
        buf_append(&val, "", 1);
        if (keyval_store(obj, key.data, val.data, errp) < 0)
            goto fail;
        if (*p == ',')
            p++;
        first = false;
    }
    buf_free(&key);
    buf_free(&val);
    return obj;

fail:
    buf_free(&key);
    buf_free(&val);
    json_decref(obj);
    return NULL;
}
