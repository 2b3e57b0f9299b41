/* Types for options given on the command line in key=value form.
 *
 * keyval_parse() makes every value a string; QMP carries typed JSON. This converts, for the
 * members of BlockdevOptions, BlockExportOptions and NbdServerOptions that are not strings,
 * "on"/"off" (and QEMU's other boolean spellings) to booleans, decimal numbers to integers,
 * and objects keyed "0", "1", ... to lists, as QEMU's keyval visitor does with its schema. The
 * one table below is shared by --blockdev/--export/--nbd-server and, through them, means the
 * same options reach blockdev-add/block-export-add/nbd-server-start either way.
 */
#ifndef THINBLK_QMP_KEYVAL_TYPES_H
#define THINBLK_QMP_KEYVAL_TYPES_H

#include <jansson.h>

#include "common/error.h"

/* Convert obj's members in place (recursively). Returns 0, or -1 with *errp set if a value
 * does not parse as its type ("Parameter 'x' expects 'on' or 'off'" / "... expects integer"). */
int qmp_keyval_coerce(json_t *obj, struct error **errp);

#endif
