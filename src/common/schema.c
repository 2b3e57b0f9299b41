/* Checks from tables, QEMU's texts. See schema.h. */
#include "common/schema.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/qjson.h"
#include "common/util.h"

static const char *const type_names[] = {
    [SCHEMA_STR] = "string", [SCHEMA_INT] = "integer", [SCHEMA_BOOL] = "boolean",
    [SCHEMA_ENUM] = "string", [SCHEMA_OBJECT] = "object", [SCHEMA_ARRAY] = "array",
};

static const struct schema_member *member_in(const struct schema_member *members,
                                             const char *name)
{
    for (const struct schema_member *m = members; m && m->name; m++) {
        if (strcmp(m->name, name) == 0)
            return m;
    }
    return NULL;
}

static bool in_list(const char *const *list, const char *s)
{
    for (; list && *list; list++) {
        if (strcmp(*list, s) == 0)
            return true;
    }
    return false;
}

/* Whether s is a value of enum m: one of its values, or of its variants if it has none. */
static bool enum_has(const struct schema_member *m, const char *s)
{
    if (m->values)
        return in_list(m->values, s);
    for (const struct schema_variant *v = m->variants; v && v->value; v++) {
        if (strcmp(v->value, s) == 0)
            return true;
    }
    return false;
}

/* The variant obj's discriminator in members selects, or NULL. */
static const struct schema_variant *variant_of(const struct schema_member *members, json_t *obj)
{
    for (const struct schema_member *m = members; m && m->name; m++) {
        const char *value = json_string_value(json_object_get(obj, m->name));
        if (!m->variants || !value)
            continue;
        for (const struct schema_variant *v = m->variants; v->value; v++) {
            if (strcmp(v->value, value) == 0)
                return v;
        }
    }
    return NULL;
}

/* "path.name", or name at the top. Caller frees. */
static char *join(const char *path, const char *name)
{
    return *path ? xasprintf("%s.%s", path, name) : xstrdup(name);
}

static int check_object(const struct schema_member *members, json_t *obj, const char *path,
                        struct error **errp);

/* v against m; full is its path, bare its own name (NULL for a list element). */
static int check_value(const struct schema_member *m, json_t *v, const char *full,
                       const char *bare, struct error **errp)
{
    bool ok = false;

    switch (m->type) {
    case SCHEMA_STR: ok = json_is_string(v); break;
    case SCHEMA_BOOL: ok = json_is_boolean(v); break;
    case SCHEMA_ANY: return 0;
    case SCHEMA_INT:
        /* As QEMU: a number that is not an int64 (1.5, 2^63) is of the wrong type, too. */
        ok = json_is_integer(v);
        if (ok && m->range_name &&
            (json_integer_value(v) < m->min || json_integer_value(v) > m->max)) {
            error_setg(errp, "Parameter '%s' expects %s", full, m->range_name);
            return -1;
        }
        break;
    case SCHEMA_UINT64:
        /* QEMU reports every non-uint64 value this way, strings included. */
        if (qjson_is_uint64(v))
            return 0;
        error_setg(errp, "Parameter '%s' expects uint64", full);
        return -1;
    case SCHEMA_ENUM:
        ok = json_is_string(v);
        if (ok && !enum_has(m, json_string_value(v))) {
            json_t *s = qjson_string_sanitized(json_string_value(v));
            error_setg(errp, "Parameter '%s' does not accept value '%s'",
                       m->full_name ? full : bare ? bare : "null", json_string_value(s));
            json_decref(s);
            return -1;
        }
        break;
    case SCHEMA_OBJECT:
        if (!qjson_is_object(v))
            break;
        return m->members ? check_object(m->members, v, full, errp) : 0;
    case SCHEMA_ARRAY:
        if (!json_is_array(v))
            break;
        for (size_t i = 0; i < json_array_size(v); i++) {
            char *elem = xasprintf("%s[%zu]", full, i);
            int r = check_value(m->element, json_array_get(v, i), elem, NULL, errp);
            free(elem);
            if (r < 0)
                return -1;
        }
        return 0;
    case SCHEMA_ALT:
        if (qjson_is_object(v) && (m->alt & SCHEMA_ALT_OBJECT))
            return m->members ? check_object(m->members, v, full, errp) : 0;
        if ((json_is_string(v) && (m->alt & SCHEMA_ALT_STR)) ||
            (json_is_integer(v) && (m->alt & SCHEMA_ALT_INT)) ||
            (json_is_null(v) && (m->alt & SCHEMA_ALT_NULL)))
            return 0;
        /* QEMU's alternate visitor names neither the path nor a JSON type. */
        error_setg(errp, "Invalid parameter type for '%s', expected: %s",
                   m->full_name ? full : bare ? bare : "null", m->alt_name);
        return -1;
    default:
        abort();
    }
    if (!ok) {
        error_setg(errp, "Invalid parameter type for '%s', expected: %s", full,
                   type_names[m->type]);
        return -1;
    }
    return 0;
}

static int check_members(const struct schema_member *members, json_t *obj, const char *path,
                         struct error **errp)
{
    for (const struct schema_member *m = members; m && m->name; m++) {
        json_t *v = json_object_get(obj, m->name);
        char *full = join(path, m->name);
        int r = 0;
        if (v)
            r = check_value(m, v, full, m->name, errp);
        else if (!m->optional) {
            error_setg(errp, "Parameter '%s' is missing", full);
            r = -1;
        }
        free(full);
        if (r < 0)
            return -1;
    }
    return 0;
}

static int check_object(const struct schema_member *members, json_t *obj, const char *path,
                        struct error **errp)
{
    /* In schema order, as QEMU's visitor walks them: the base, then the variant. */
    if (check_members(members, obj, path, errp) < 0)
        return -1;
    const struct schema_variant *variant = variant_of(members, obj);
    if (variant && variant->open)
        return 0;
    if (variant && check_members(variant->members, obj, path, errp) < 0)
        return -1;

    size_t n;
    _cleanup_free_ const char **keys = qjson_keys(obj, &n);
    for (size_t i = 0; i < n; i++) {
        if (member_in(members, keys[i]) || (variant && member_in(variant->members, keys[i])))
            continue;
        json_t *key = qjson_string_sanitized(keys[i]);
        char *full = join(path, json_string_value(key));
        error_setg(errp, "Parameter '%s' is unexpected", full);
        free(full);
        json_decref(key);
        return -1;
    }
    return 0;
}

int schema_check(const struct schema_member *members, json_t *obj, struct error **errp)
{
    return check_object(members, obj, "", errp);
}

/* ---- key=value strings to types ---------------------------------------------------------- */

static int coerce_object(const struct schema_member *members, json_t *obj, const char *path,
                         struct error **errp);

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

/* The typed value of string s for m: a new reference, s's own if it stays a string, or NULL
 * with *errp set. */
static json_t *coerce_string(const struct schema_member *m, json_t *s, const char *full,
                             struct error **errp)
{
    const char *str = json_string_value(s);
    char *end;
    long long n;

    switch (m->type) {
    case SCHEMA_BOOL:
        /* The spellings QEMU's keyval visitor takes. */
        if (!strcmp(str, "on") || !strcmp(str, "yes") || !strcmp(str, "true"))
            return json_true();
        if (!strcmp(str, "off") || !strcmp(str, "no") || !strcmp(str, "false"))
            return json_false();
        error_setg(errp, "Parameter '%s' expects 'on' or 'off'", full);
        return NULL;
    case SCHEMA_INT:
    case SCHEMA_UINT64:
    case SCHEMA_ANY:
        errno = 0;
        n = strtoll(str, &end, 0);
        if (*str && !*end && errno == 0)
            return json_integer(n);
        if (m->type != SCHEMA_ANY) {
            error_setg(errp, "Parameter '%s' expects integer", full);
            return NULL;
        }
        return json_incref(s);
    default:
        return json_incref(s);
    }
}

/* Coerce v, member key of parent, in place. */
static int coerce_value(const struct schema_member *m, json_t *parent, const char *key,
                        json_t *v, const char *full, struct error **errp)
{
    if (json_is_string(v)) {
        json_t *typed = coerce_string(m, v, full, errp);
        if (!typed)
            return -1;
        json_object_set_new(parent, key, typed);
        return 0;
    }
    if (!qjson_is_object(v))
        return 0;
    if (m->type == SCHEMA_ARRAY) {
        json_t *list = as_list(v);
        if (!list)
            return 0;
        /* Set first: v goes with the replaced member, its elements stay in list. */
        json_object_set_new(parent, key, list);
        for (size_t i = 0; i < json_array_size(list); i++) {
            json_t *e = json_array_get(list, i);
            char *elem = xasprintf("%s[%zu]", full, i);
            int r = 0;
            if (json_is_string(e)) {
                json_t *typed = coerce_string(m->element, e, elem, errp);
                r = typed ? json_array_set_new(list, i, typed) : -1;
            } else if (qjson_is_object(e) && m->element->members) {
                r = coerce_object(m->element->members, e, elem, errp);
            }
            free(elem);
            if (r < 0)
                return -1;
        }
        return 0;
    }
    if ((m->type == SCHEMA_OBJECT || m->type == SCHEMA_ALT) && m->members)
        return coerce_object(m->members, v, full, errp);
    return 0;
}

static int coerce_object(const struct schema_member *members, json_t *obj, const char *path,
                         struct error **errp)
{
    const struct schema_variant *variant = variant_of(members, obj);
    const char *key;
    json_t *v;
    void *tmp;

    json_object_foreach_safe(obj, tmp, key, v) {
        const struct schema_member *m = member_in(members, key);
        if (!m && variant)
            m = member_in(variant->members, key);
        if (!m)
            continue;  /* unexpected: schema_check() says so */
        char *full = join(path, key);
        int r = coerce_value(m, obj, key, v, full, errp);
        free(full);
        if (r < 0)
            return -1;
    }
    return 0;
}

int schema_coerce(const struct schema_member *members, json_t *obj, struct error **errp)
{
    return coerce_object(members, obj, "", errp);
}
