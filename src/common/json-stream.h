/* QMP's JSON input: a byte stream in, one JSON value (or one error) per message out.
 *
 * The monitor's input is a sequence of JSON texts with no framing: a message ends where its
 * top-level value ends. Like QEMU's (qobject/json-lexer.c, json-streamer.c, json-parser.c), this
 * is done in three steps: a lexer turns bytes into tokens, a streamer collects tokens until the
 * brackets balance, and a recursive-descent parser turns one message's tokens into a value.
 * Errors carry QEMU's wording ("JSON parse error, expecting value", "... stray '%s'", ...), and
 * the lexer recovers as QEMU's does: after a bad byte it skips to the next structural character,
 * control character or 0xFE/0xFF, so a client can always get back in step.
 *
 * Limits (QEMU's): a message of more than JSON_STREAM_MAX_SIZE bytes of tokens, more than
 * JSON_STREAM_MAX_TOKENS tokens or more than JSON_STREAM_MAX_DEPTH nested arrays and objects
 * gets one error, "JSON token size limit exceeded", "JSON token count limit exceeded" or
 * "JSON nesting depth limit exceeded", and the rest of that message is skipped, so memory stays
 * bounded by the limits. (QEMU resets instead, and then answers every leftover closing bracket
 * with its own "expecting value" error; one error per message is kinder to the client.)
 *
 * Values are jansson values, numbers as QEMU's parser reads them: an integer that fits in
 * int64 becomes a json_integer, one up to UINT64_MAX the exact boxed value of
 * qjson_uint64_new() (common/qjson.h), any other number a json_real. Used by the monitor, by
 * thinblkd's command line and by the QMP client library. Nothing here blocks or does I/O.
 */
#ifndef THINBLK_COMMON_JSON_STREAM_H
#define THINBLK_COMMON_JSON_STREAM_H

#include <stddef.h>

#include <jansson.h>

#include "common/error.h"

#define JSON_STREAM_MAX_SIZE (64u << 20)
#define JSON_STREAM_MAX_TOKENS (2u << 20)
#define JSON_STREAM_MAX_DEPTH 1024

struct json_stream;

struct json_stream *json_stream_new(void);
void json_stream_free(struct json_stream *js);

/* Queue len bytes of input. They are lexed by json_stream_next(), not here. */
void json_stream_feed(struct json_stream *js, const void *data, size_t len);

/* Take the next message from the input queued so far. Returns 1 with either *value (a new
 * reference, any JSON type) or *err (a parse or limit error) set, or 0 if the queued input
 * holds no complete message yet. */
int json_stream_next(struct json_stream *js, json_t **value, struct error **err);

/* Bytes queued and not yet lexed, plus those held for an unfinished message. */
size_t json_stream_pending(const struct json_stream *js);

/* Parse one complete JSON text of len bytes, as the monitor would (trailing data is an error:
 * "JSON parse error, expected end of input"). Returns a new reference, or NULL with *errp set. */
json_t *json_stream_parse(const char *text, size_t len, struct error **errp);

#endif
