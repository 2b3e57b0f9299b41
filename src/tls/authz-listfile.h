/* authz-listfile: the options of an authz-list ({"policy": ..., "rules": [...]}) read from a
 * JSON file and, with refresh, read again whenever the file is written or replaced (inotify
 * on its directory, on the event loop), as QEMU's authz/listfile.c.
 *
 * As QEMU's: a file that cannot be loaded at creation fails the creation; one that cannot be
 * loaded on a refresh is logged and leaves no list at all, so nobody is authorized until the
 * file is fixed (fail closed; the old rules are not kept). Everything runs on the loop thread.
 */
#ifndef THINBLK_TLS_AUTHZ_LISTFILE_H
#define THINBLK_TLS_AUTHZ_LISTFILE_H

#include <stdbool.h>

#include <jansson.h>

#include "common/error.h"
#include "common/schema.h"
#include "loop/loop.h"

struct authz_listfile;

/* Load filename, its object checked against list_members (authz-list's, borrowed for the
 * object's life); with refresh, watch it on loop. Returns the object or NULL with *errp set,
 * QEMU's texts: "Unable to read 'FILE': ...", the JSON parser's, "File 'FILE' must contain a
 * JSON object", the members' checks, "Filename must be an absolute path" (refresh only).
 * Reads the file on the calling thread. */
struct authz_listfile *authz_listfile_new(struct loop *loop, const char *filename, bool refresh,
                                          const struct schema_member *list_members,
                                          struct error **errp);
/* Stop watching and free. NULL ignored. */
void authz_listfile_free(struct authz_listfile *f);

/* The list's options as last loaded (borrowed, valid until the next loop iteration), or NULL
 * when the last refresh failed: then nobody is allowed. */
json_t *authz_listfile_list(struct authz_listfile *f);

#endif
