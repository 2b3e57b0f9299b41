/* QEMU's "key=value,key2=value2" option syntax, as --blockdev, --export, --monitor take it.
 *
 * ",," in a value stands for a comma. Dotted keys build nested objects ("addr.type=unix" is
 * {"addr": {"type": "unix"}}). If the first element has no '=' and implied_key is not NULL,
 * it is the value of implied_key ("nbd" in "--export nbd,..." means type=nbd). Every value is
 * a JSON string: the schema check (common/schema.h) converts them to the types it expects.
 */
#ifndef THINBLK_KEYVAL_H
#define THINBLK_KEYVAL_H

#include <jansson.h>

#include "common/error.h"

/* Parse s into a new JSON object (caller owns it), or return NULL with *errp set. */
json_t *keyval_parse(const char *s, const char *implied_key, struct error **errp);

#endif
