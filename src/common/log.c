#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

enum log_level log_max_level = LOG_LEVEL_INFO;
const char *log_program = "thinblk";
bool log_timestamps;

/* "2026-12-04T11:20:01.123Z " into buf (at least 32 bytes), or "" without timestamps. */
static const char *timestamp(char *buf, size_t len)
{
    struct timespec ts;
    struct tm tm;

    buf[0] = '\0';
    if (!log_timestamps)
        return buf;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, len - n, ".%03ldZ ", ts.tv_nsec / 1000000);
    return buf;
}

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
    char ts[40];
    fprintf(stderr, "%s%s: %s: %s\n", timestamp(ts, sizeof(ts)), log_program, names[level],
            line);
}
