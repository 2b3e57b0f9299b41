#include "common/keyval.h"

#include <string.h>

#include "common/util.h"

/* Store value at the dotted path key inside obj, creating intermediate objects. */
static int keyval_store(json_t *obj, const char *key, const char *value, struct error **errp)
{
    _cleanup_free_ char *copy = xstrdup(key);
    char *save = NULL;
    char *part = strtok_r(copy, ".", &save);
    if (!part || key[0] == '.' || key[strlen(key) - 1] == '.' || strstr(key, "..")) {
        error_setg(errp, "Invalid parameter '%s'", key);
        return -1;
    }
    for (;;) {
        char *next = strtok_r(NULL, ".", &save);
        json_t *cur = json_object_get(obj, part);
        if (!next) {
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
            error_setg(errp, "Parameters '%.*s.*' used inconsistently",
                       (int)(next - copy - 1), key);
            return -1;
        }
        obj = cur;
        part = next;
    }
}

/* QEMU's keyval.c: a key is dot-separated names of letters, digits, '-' and '_', each at
 * most 127 characters. */
static int check_key(const char *key, size_t len, struct error **errp)
{
    size_t frag = 0;

    if (len == 0) {
        error_setg(errp, "Invalid parameter ''");
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        char c = key[i];
        if (c == '.') {
            frag = 0;
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_')) {
            error_setg(errp, "Invalid parameter '%.*s'", (int)len, key);
            return -1;
        }
        if (++frag > 127) {
            error_setg(errp, "Parameter '%.*s' is too long", (int)len, key);
            return -1;
        }
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
