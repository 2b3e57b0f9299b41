/* Types for key=value options. See keyval-types.h. */
#include "qmp/keyval-types.h"

#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "common/util.h"

enum kv_type { KV_BOOL, KV_INT, KV_INT_OR_STRING };

static const struct {
    const char *key;
    enum kv_type type;
} kv_types[] = {
    /* BlockdevOptions and its drivers' */
    { "read-only", KV_BOOL }, { "auto-read-only", KV_BOOL }, { "force-share", KV_BOOL },
    { "direct", KV_BOOL }, { "no-flush", KV_BOOL }, { "lazy-refcounts", KV_BOOL },
    { "offset", KV_INT }, { "size", KV_INT },
    { "l2-cache-size", KV_INT }, { "refcount-cache-size", KV_INT },
    /* the fault driver's rules */
    { "after", KV_INT }, { "length", KV_INT }, { "once", KV_BOOL },
    { "errno", KV_INT_OR_STRING },
    /* BlockExportOptions */
    { "writable", KV_BOOL }, { "writethrough", KV_BOOL },
    /* NbdServerOptions */
    { "max-connections", KV_INT },
};

static int coerce_value(json_t *parent, const char *key, json_t *v, struct error **errp)
{
    const char *s = json_string_value(v);

    for (size_t i = 0; i < ARRAY_SIZE(kv_types); i++) {
        if (strcmp(kv_types[i].key, key) != 0)
            continue;
        if (kv_types[i].type == KV_BOOL) {
            if (!strcmp(s, "on") || !strcmp(s, "yes") || !strcmp(s, "true")) {
                json_object_set_new(parent, key, json_true());
            } else if (!strcmp(s, "off") || !strcmp(s, "no") || !strcmp(s, "false")) {
                json_object_set_new(parent, key, json_false());
            } else {
                error_setg(errp, "Parameter '%s' expects 'on' or 'off'", key);
                return -1;
            }
            return 0;
        }
        char *end;
        errno = 0;
        long long n = strtoll(s, &end, 0);
        if (*s && !*end && errno == 0) {
            json_object_set_new(parent, key, json_integer(n));
        } else if (kv_types[i].type == KV_INT) {
            error_setg(errp, "Parameter '%s' expects integer", key);
            return -1;
        }
        return 0;
    }
    return 0;
}

/* An object whose keys are exactly "0".."n-1" is a list, as keyval's "rules.0.op=...". */
static json_t *as_list(json_t *obj)
{
    size_t n = json_object_size(obj);
    char idx[24];

    if (n == 0)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        snprintf(idx, sizeof(idx), "%zu", i);
        if (!json_object_get(obj, idx))
            return NULL;
    }
    json_t *list = json_array();
    for (size_t i = 0; i < n; i++) {
        snprintf(idx, sizeof(idx), "%zu", i);
        json_array_append(list, json_object_get(obj, idx));
    }
    return list;
}

int qmp_keyval_coerce(json_t *obj, struct error **errp)
{
    const char *key;
    json_t *v;
    void *tmp;

    json_object_foreach_safe(obj, tmp, key, v) {
        if (json_is_object(v)) {
            if (qmp_keyval_coerce(v, errp) < 0)
                return -1;
            json_t *list = as_list(v);
            if (list)
                json_object_set_new(obj, key, list);
        } else if (json_is_string(v)) {
            if (coerce_value(obj, key, v, errp) < 0)
                return -1;
        }
    }
    return 0;
}
