#include "common/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((format(printf, 4, 0)))
static void error_vset(struct error **errp, enum error_class cls, const char *suffix,
                       const char *fmt, va_list ap)
{
    if (!errp || *errp)
        return;
    char *msg = NULL;
    if (vasprintf(&msg, fmt, ap) < 0)
        abort();
    if (suffix) {
        char *full = NULL;
        if (asprintf(&full, "%s: %s", msg, suffix) < 0)
            abort();
        free(msg);
        msg = full;
    }
    struct error *err = malloc(sizeof(*err));
    if (!err)
        abort();
    err->cls = cls;
    err->desc = msg;
    *errp = err;
}

void error_set(struct error **errp, enum error_class cls, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(errp, cls, NULL, fmt, ap);
    va_end(ap);
}

void error_setg(struct error **errp, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(errp, ERROR_CLASS_GENERIC, NULL, fmt, ap);
    va_end(ap);
}

void error_setg_errno(struct error **errp, int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(errp, ERROR_CLASS_GENERIC, strerror(errnum), fmt, ap);
    va_end(ap);
}

void error_prepend(struct error **errp, const char *fmt, ...)
{
    if (!errp || !*errp)
        return;
    char *prefix = NULL, *full = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&prefix, fmt, ap) < 0)
        abort();
    va_end(ap);
    if (asprintf(&full, "%s%s", prefix, (*errp)->desc) < 0)
        abort();
    free(prefix);
    free((*errp)->desc);
    (*errp)->desc = full;
}

void error_propagate(struct error **dst, struct error *src)
{
    if (!src)
        return;
    if (dst && !*dst)
        *dst = src;
    else
        error_free(src);
}

const char *error_class_name(enum error_class cls)
{
    switch (cls) {
    case ERROR_CLASS_COMMAND_NOT_FOUND:
        return "CommandNotFound";
    case ERROR_CLASS_DEVICE_NOT_ACTIVE:
        return "DeviceNotActive";
    case ERROR_CLASS_DEVICE_NOT_FOUND:
        return "DeviceNotFound";
    case ERROR_CLASS_GENERIC:
        break;
    }
    return "GenericError";
}

void error_free(struct error *err)
{
    if (!err)
        return;
    free(err->desc);
    free(err);
}
