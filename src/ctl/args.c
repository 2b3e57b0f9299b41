/* Turning the command line into QMP arguments. The typing is a guess by design: a value is
 * what it looks like, and KEY:=JSON is the way out when the guess is wrong. */
#include "ctl/args.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

/* Whether s is an integer in JSON's syntax: -?(0|[1-9][0-9]*). "007" is not, so it stays
 * a string, like any identifier made of digits with a leading zero. */
static bool is_json_integer(const char *s)
{
    if (*s == '-')
        s++;
    if (*s == '0')
        return s[1] == '\0';
    if (*s < '1' || *s > '9')
        return false;
    while (*s >= '0' && *s <= '9')
        s++;
    return *s == '\0';
}

json_t *ctl_args_value(const char *s, struct error **errp)
{
    if (is_json_integer(s)) {
        errno = 0;
        long long v = strtoll(s, NULL, 10);
        if (errno == ERANGE) {
            error_setg(errp, "Integer '%s' is out of range", s);
            return NULL;
        }
        return json_integer(v);
    }
    if (strcmp(s, "true") == 0)
        return json_true();
    if (strcmp(s, "false") == 0)
        return json_false();
    if (strcmp(s, "null") == 0)
        return json_null();
    if (s[0] == '{' || s[0] == '[') {
        json_error_t jerr;
        json_t *v = json_loads(s, 0, &jerr);
        if (!v)
            error_setg(errp, "Invalid JSON '%s': %s", s, jerr.text);
        return v;
    }
    return json_string(s);
}

/* Set the member of obj that the dotted key names to value (a reference taken over), making
 * the objects on the way. */
static int set_dotted(json_t *obj, const char *key, json_t *value, struct error **errp)
{
    _cleanup_free_ char *copy = xstrdup(key);
    char *part = copy;
    for (;;) {
        char *dot = strchr(part, '.');
        if (dot)
            *dot = '\0';
        if (*part == '\0') {
            error_setg(errp, "Invalid parameter name '%s'", key);
            goto fail;
        }
        json_t *member = json_object_get(obj, part);
        if (!dot) {
            if (member) {
                error_setg(errp, "Parameter '%s' is given twice", key);
                goto fail;
            }
            json_object_set_new(obj, part, value);
            return 0;
        }
        if (!member) {
            member = json_object();
            json_object_set_new(obj, part, member);
        } else if (!json_is_object(member)) {
            error_setg(errp, "Parameter '%s' conflicts with '%.*s'", key,
                       (int)(dot - copy), key);
            goto fail;
        }
        obj = member;
        part = dot + 1;
    }
fail:
    json_decref(value);
    return -1;
}

/* One KEY=VALUE or KEY:=JSON argument into obj. */
static int add_pair(json_t *obj, const char *arg, struct error **errp)
{
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg) {
        error_setg(errp, "Invalid argument '%s': expected KEY=VALUE, KEY:=JSON or one JSON "
                         "object", arg);
        return -1;
    }
    bool raw = eq[-1] == ':';
    _cleanup_free_ char *key = strndup(arg, (size_t)(eq - arg) - raw);
    if (!key)
        abort();
    json_t *value;
    if (raw) {
        json_error_t jerr;
        value = json_loads(eq + 1, JSON_DECODE_ANY, &jerr);
        if (!value) {
            error_setg(errp, "Invalid JSON for parameter '%s': %s", key, jerr.text);
            return -1;
        }
    } else {
        struct error *err = NULL;
        value = ctl_args_value(eq + 1, &err);
        if (!value) {
            error_propagate(errp, err);
            error_prepend(errp, "Parameter '%s': ", key);
            return -1;
        }
    }
    return set_dotted(obj, key, value, errp);
}

json_t *ctl_args_parse(int argc, char *const *argv, struct error **errp)
{
    if (argc == 1 && argv[0][0] == '{') {
        json_error_t jerr;
        json_t *obj = json_loads(argv[0], 0, &jerr);
        if (!obj) {
            error_setg(errp, "Invalid JSON arguments: %s", jerr.text);
            return NULL;
        }
        return obj;
    }
    json_t *obj = json_object();
    for (int i = 0; i < argc; i++) {
        if (add_pair(obj, argv[i], errp) < 0) {
            json_decref(obj);
            return NULL;
        }
    }
    return obj;
}
