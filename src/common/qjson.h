/* JSON as QEMU's QObject layer has it: its output, byte for byte as QEMU's monitor writes it,
 * and its reading of integers and strings (shared by qmp/, block/, export/ and daemon/).
 *
 * QEMU keeps objects in a hash table (qobject/qdict.c) and writes members in bucket order, so
 * the order of keys on its wire is a fixed function of the key names: "return" before "id",
 * "id" before "error", "timestamp" before "event" before "data". Clients should not care, but
 * some compare text; writing the same order costs little, so this writer does. Strings are
 * escaped as QEMU does (every non-ASCII character as \uXXXX), ", " and ": " separate, and the
 * pretty form indents by four and, as QEMU's monitor, ends lines with "\r\n".
 */
#ifndef THINBLK_COMMON_QJSON_H
#define THINBLK_COMMON_QJSON_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "common/util.h"

/* The keys of object obj in the order QEMU iterates them (its wire order): a new array of
 * *n borrowed key pointers, caller frees the array. QEMU checks a request's members in this
 * order too, which decides which error a request with several problems gets. */
const char **qjson_keys(json_t *obj, size_t *n);

/* Append v (borrowed) to out, compact or pretty. No line end is added. */
void qjson_write(struct buf *out, json_t *v, bool pretty);

/* A JSON string from s, with ill-formed UTF-8 replaced by U+FFFD (client input quoted back).
 * Returns a new reference. */
json_t *qjson_string_sanitized(const char *s);

/* Integers above INT64_MAX. jansson has no unsigned integer, and QEMU keeps them exactly (its
 * QNum has a uint64 kind): an id of 18446744073709551615 comes back as sent, a uint64 argument
 * takes its whole range. So such a value is boxed: a one-member object whose key holds a 0xFF
 * byte, which no JSON text the monitor reads can hold (its lexer rejects the byte), with the
 * bits in a json_integer. qjson_write() writes it as the number; every type test that reads
 * client JSON uses qjson_is_object() so that a box is a number there, never an object. */

/* A new reference: v as a json_integer when it fits in int64, boxed otherwise. */
json_t *qjson_uint64_new(uint64_t v);
/* Whether v is a boxed integer above INT64_MAX. */
bool qjson_is_big_uint64(const json_t *v);
/* Whether v is a JSON object (and not a boxed integer). */
bool qjson_is_object(const json_t *v);

/* Whether v is an integer QEMU would take as uint64: int64 values (negative ones wrap, for
 * backward compatibility, as QEMU says) and integers up to UINT64_MAX. Reals are not, as in
 * QEMU ("Parameter 'x' expects uint64"). */
bool qjson_is_uint64(const json_t *v);
/* The uint64 value of v, for which qjson_is_uint64() holds. */
uint64_t qjson_uint64(const json_t *v);

#endif
