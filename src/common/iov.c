/* I/O vector ranges. See iov.h. */
#include "common/iov.h"

#include <string.h>

#include "common/assert.h"
#include "common/util.h"

uint64_t iov_size(const struct iovec *iov, unsigned n)
{
    uint64_t total = 0;

    for (unsigned i = 0; i < n; i++)
        total += iov[i].iov_len;
    return total;
}

bool iov_aligned(const struct iovec *iov, unsigned n, uint64_t align)
{
    for (unsigned i = 0; i < n; i++) {
        if (((uintptr_t)iov[i].iov_base | iov[i].iov_len) & (align - 1))
            return false;
    }
    return true;
}

unsigned iov_slice(const struct iovec *iov, unsigned n, uint64_t off, uint64_t len,
                   struct iovec *out)
{
    unsigned count = 0;

    for (unsigned i = 0; i < n && len > 0; i++) {
        if (off >= iov[i].iov_len) {
            off -= iov[i].iov_len;
            continue;
        }
        uint64_t k = MIN(iov[i].iov_len - off, len);
        if (out)
            out[count] = (struct iovec){(char *)iov[i].iov_base + off, k};
        count++;
        len -= k;
        off = 0;
    }
    ASSERT(len == 0);
    return count;
}

/* Call fn on each piece of [off, off + len): the segment's bytes and where they are in the
 * range. The copies and the memset below differ only in it. */
static void each_piece(const struct iovec *iov, unsigned n, uint64_t off, uint64_t len,
                       void (*fn)(char *seg, uint64_t at, uint64_t k, void *opaque),
                       void *opaque)
{
    uint64_t at = 0;

    for (unsigned i = 0; i < n && at < len; i++) {
        if (off >= iov[i].iov_len) {
            off -= iov[i].iov_len;
            continue;
        }
        uint64_t k = MIN(iov[i].iov_len - off, len - at);
        fn((char *)iov[i].iov_base + off, at, k, opaque);
        at += k;
        off = 0;
    }
    ASSERT(at == len);
}

static void copy_in(char *seg, uint64_t at, uint64_t k, void *buf)
{
    memcpy(seg, (const char *)buf + at, k);
}

static void copy_out(char *seg, uint64_t at, uint64_t k, void *buf)
{
    memcpy((char *)buf + at, seg, k);
}

static void set(char *seg, uint64_t at, uint64_t k, void *c)
{
    memset(seg, *(int *)c, k);
}

void iov_from_buf(const struct iovec *iov, unsigned n, uint64_t off, const void *buf,
                  uint64_t len)
{
    each_piece(iov, n, off, len, copy_in, (void *)buf);
}

void iov_to_buf(const struct iovec *iov, unsigned n, uint64_t off, void *buf, uint64_t len)
{
    each_piece(iov, n, off, len, copy_out, buf);
}

void iov_memset(const struct iovec *iov, unsigned n, uint64_t off, int c, uint64_t len)
{
    each_piece(iov, n, off, len, set, &c);
}

/* A word that may alias the caller's bytes, whatever their type. */
typedef uint64_t __attribute__((may_alias)) zero_word;

bool buf_is_zero(const void *buf, uint64_t len)
{
    const unsigned char *p = buf;
    const zero_word *w;

    while (len > 0 && (uintptr_t)p % sizeof(zero_word)) {
        if (*p++)
            return false;
        len--;
    }
    /* Four words per test: the loads pipeline, the branch is taken once per 32 bytes. */
    for (w = (const zero_word *)p; len >= 4 * sizeof(*w); w += 4, len -= 4 * sizeof(*w)) {
        if (w[0] | w[1] | w[2] | w[3])
            return false;
    }
    for (p = (const unsigned char *)w; len > 0; len--) {
        if (*p++)
            return false;
    }
    return true;
}

bool iov_is_zero(const struct iovec *iov, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        if (!buf_is_zero(iov[i].iov_base, iov[i].iov_len))
            return false;
    }
    return true;
}
