/* UTF-8 checks. See utf8.h. */
#include "common/utf8.h"

#include <stdint.h>
#include <string.h>

#include "common/util.h"

size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    uint32_t cp;
    size_t len;

    if (n == 0)
        return 0;
    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xC2 && s[0] <= 0xDF)
        len = 2, cp = s[0] & 0x1F;
    else if (s[0] >= 0xE0 && s[0] <= 0xEF)
        len = 3, cp = s[0] & 0x0F;
    else if (s[0] >= 0xF0 && s[0] <= 0xF4)
        len = 4, cp = s[0] & 0x07;
    else
        return 0;
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

char *utf8_sanitize(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    struct buf out = { 0 };

    while (n > 0) {
        size_t len = utf8_seq_len(p, n);
        if (len == 0) {
            buf_append(&out, "\xEF\xBF\xBD", 3);
            len = 1;
        } else {
            buf_append(&out, p, len);
        }
        p += len;
        n -= len;
    }
    buf_append(&out, "", 1);
    return out.data;
}
