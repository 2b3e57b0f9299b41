/* QMP's JSON output, byte for byte as QEMU's monitor writes it.
 *
 * QEMU keeps objects in a hash table (qobject/qdict.c) and writes members in bucket order, so
 * the order of keys on its wire is a fixed function of the key names: "return" before "id",
 * "id" before "error", "timestamp" before "event" before "data". Clients should not care, but
 * some compare text; writing the same order costs little, so this writer does. Strings are
 * escaped as QEMU does (every non-ASCII character as \uXXXX), ", " and ": " separate, and the
 * pretty form indents by four and, as QEMU's monitor, ends lines with "\r\n".
 */
#ifndef THINBLK_QMP_JSON_WRITER_H
#define THINBLK_QMP_JSON_WRITER_H

#include <stdbool.h>

#include <jansson.h>

#include "common/util.h"

/* The keys of object obj in the order QEMU iterates them (its wire order): a new array of
 * *n borrowed key pointers, caller frees the array. QEMU checks a request's members in this
 * order too, which decides which error a request with several problems gets. */
const char **qmp_json_keys(json_t *obj, size_t *n);

/* Append v (borrowed) to out, compact or pretty. No line end is added. */
void qmp_json_write(struct buf *out, json_t *v, bool pretty);

#endif
