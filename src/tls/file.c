/* Whole small files. See file.h. */
#include "tls/file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/util.h"

char *tls_file_read(const char *path, size_t *len, struct error **errp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t used = 0, cap = 4096;
    char *buf;

    if (fd < 0) {
        error_setg_errno(errp, errno, "Failed to open file “%s”", path);
        return NULL;
    }
    buf = xmalloc(cap);
    for (;;) {
        ssize_t n;

        if (used + 1 == cap) {
            if (cap > TLS_FILE_MAX) {
                error_setg(errp, "File “%s” is too large", path);
                goto fail;
            }
            cap *= 2;
            buf = xrealloc(buf, cap);
        }
        n = read(fd, buf + used, cap - used - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            error_setg_errno(errp, errno, "Error reading file “%s”", path);
            goto fail;
        }
        if (n == 0)
            break;
        used += (size_t)n;
    }
    close(fd);
    buf[used] = '\0';
    *len = used;
    return buf;
fail:
    close(fd);
    free(buf);
    return NULL;
}
