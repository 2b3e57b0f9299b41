/* Logging to stderr: one line per message, with level. Never blocks for long (stderr). */
#ifndef THINBLK_LOG_H
#define THINBLK_LOG_H

#include <stdbool.h>

enum log_level { LOG_LEVEL_ERROR, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };

extern enum log_level log_max_level; /* set once at startup, before any other thread */
extern const char *log_program;       /* prefix, e.g. "thinblkd" */
extern bool log_timestamps;           /* start each line with the UTC time (ISO 8601, ms) */

void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)

#endif
