/* ASSERT()'s failure path. See assert.h. */
#include "common/assert.h"

#include <stdlib.h>

#include "common/log.h"

void thinblk_assert_failed(const char *expr, const char *file, int line, const char *func)
{
    log_error("%s:%d: %s: assertion failed: %s", file, line, func, expr);
    abort();
}
