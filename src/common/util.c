#include "common/util.h"
#include "common/vector.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        abort();
    return p;
}

void *xzalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p)
        abort();
    return p;
}

void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        abort();
    return p;
}

char *xstrdup(const char *s)
{
    char *p = strdup(s);
    if (!p)
        abort();
    return p;
}

char *xasprintf(const char *fmt, ...)
{
    char *s;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        abort();
    va_end(ap);
    return s;
}

void buf_append(struct buf *b, const void *data, size_t len)
{
    if (len == 0)
        return;  /* memcpy() into a NULL buffer is undefined even for 0 bytes */
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len)
            cap *= 2;
        b->data = xrealloc(b->data, cap);
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

void buf_consume(struct buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->data, b->data + n, b->len - n);
        b->len -= n;
    }
    /* Give memory back after a burst, so an idle client costs little. */
    if (b->len == 0 && b->cap > 64 * 1024) {
        free(b->data);
        b->data = NULL;
        b->cap = 0;
    }
}

void buf_reset(struct buf *b) { buf_consume(b, b->len); }

void buf_free(struct buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

static uint64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t now_monotonic_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
uint64_t now_realtime_ns(void) { return clock_ns(CLOCK_REALTIME); }

bool id_wellformed(const char *s)
{
    if (!isalpha((unsigned char)s[0]))
        return false;
    for (; *s; s++) {
        if (!isalnum((unsigned char)*s) && !strchr("-._", *s))
            return false;
    }
    return true;
}

void vector_reserve(void **ptr, size_t *cap, size_t len, size_t n, size_t elem)
{
    size_t want = len + n, c = *cap ? *cap : 8;

    if (want < len || want > SIZE_MAX / elem)
        abort();
    while (c < want)
        c = c > SIZE_MAX / 2 ? want : 2 * c;
    *ptr = xrealloc(*ptr, c * elem);
    *cap = c;
}
