/* thinblkctl's command arguments: KEY=VALUE pairs, typed as the value reads, or one JSON
 * object. Nothing here does I/O. */
#ifndef THINBLK_CTL_ARGS_H
#define THINBLK_CTL_ARGS_H

#include <jansson.h>

#include "common/error.h"

/* The JSON value KEY=VALUE gives: an integer (JSON's syntax, within int64), true, false,
 * null, a JSON object or array if s starts with '{' or '[', else the string s. Returns a new
 * reference, or NULL with *errp set (bad JSON, integer out of range). */
json_t *ctl_args_value(const char *s, struct error **errp);

/* The "arguments" object for argv[0..argc): either a single JSON object, or arguments each
 * KEY=VALUE (ctl_args_value()) or KEY:=JSON (raw JSON); dotted keys nest. Returns a new
 * object (empty when argc is 0), or NULL with *errp set. */
json_t *ctl_args_parse(int argc, char *const *argv, struct error **errp);

#endif
