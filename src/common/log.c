#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>

enum log_level log_max_level = LOG_LEVEL_INFO;
const char *log_program = "thinblk";

void log_msg(enum log_level level, const char *fmt, ...)
{
    static const char *const names[] = {"error", "warning", "info", "debug"};
    if (level > log_max_level)
        return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s: %s: %s\n", log_program, names[level], line);
}
