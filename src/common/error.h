/* Errors: the one mechanism.
 *
 * A function that can fail returns -1 (or NULL) and, if errp is not NULL, stores a newly
 * allocated struct error there. The caller owns it and frees it with error_free(). The class
 * and wording follow QMP's (docs/interop/qmp-spec.rst, and QEMU's texts in shared/reference):
 * the QMP layer sends class and desc to the client unchanged. The data path does not use this:
 * it carries a plain errno.
 */
#ifndef THINBLK_ERROR_H
#define THINBLK_ERROR_H

#include <stdarg.h>

enum error_class {
    ERROR_CLASS_GENERIC,            /* "GenericError" */
    ERROR_CLASS_COMMAND_NOT_FOUND,  /* "CommandNotFound" */
    ERROR_CLASS_DEVICE_NOT_ACTIVE,  /* "DeviceNotActive" */
    ERROR_CLASS_DEVICE_NOT_FOUND,   /* "DeviceNotFound" */
};

struct error {
    enum error_class cls;
    char *desc;
};

/* Set *errp (if errp is not NULL and *errp is NULL) to a new error of class cls. */
void error_set(struct error **errp, enum error_class cls, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* error_set() with ERROR_CLASS_GENERIC, the class of nearly every QMP error. */
void error_setg(struct error **errp, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* error_setg() with ": strerror(errnum)" appended, as QEMU's error_setg_errno(). */
void error_setg_errno(struct error **errp, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepend the formatted text to the description of *errp, if set (add ": " yourself). */
void error_prepend(struct error **errp, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Move src into *dst (freeing src if *dst is already set or dst is NULL). */
void error_propagate(struct error **dst, struct error *src);

/* The QMP name of a class: "GenericError", ... */
const char *error_class_name(enum error_class cls);

void error_free(struct error *err);

static inline void error_freep(struct error **errp) { error_free(*errp); }
#define _cleanup_error_ __attribute__((cleanup(error_freep)))

#endif
