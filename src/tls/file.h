/* Reading the small files TLS objects are configured with (dh-params.pem, an authz-listfile's
 * rules), whole, with the texts QEMU's g_file_get_contents() gives. These are control-plane
 * files an administrator names, read once at object-add or on a change: a read on the loop
 * thread, as GnuTLS's own loading of certificates at object-add is.
 */
#ifndef THINBLK_TLS_FILE_H
#define THINBLK_TLS_FILE_H

#include <stddef.h>

#include "common/error.h"

/* Bigger files are refused (thinblk's bound; QEMU has none). */
#define TLS_FILE_MAX (1u << 20)

/* The contents of path, NUL-terminated (*len without the NUL), to be freed by the caller; or
 * NULL with *errp set: "Failed to open file “PATH”: REASON", "Error reading file “PATH”:
 * REASON" (GLib's texts) or "File “PATH” is too large". May block on the file system. */
char *tls_file_read(const char *path, size_t *len, struct error **errp);

#endif
