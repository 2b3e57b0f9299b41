/* UTF-8 checks for text that comes from clients and goes back out in JSON strings. */
#ifndef THINBLK_UTF8_H
#define THINBLK_UTF8_H

#include <stddef.h>

/* Length of the well-formed UTF-8 sequence starting at s (n bytes available), 1 to 4, or 0
 * if it is not one (overlong forms, surrogates and code points past U+10FFFF included). */
size_t utf8_seq_len(const unsigned char *s, size_t n);

/* A copy of the NUL-terminated s with every ill-formed sequence replaced by U+FFFD, as QEMU
 * does when it quotes client input back. Caller frees. */
char *utf8_sanitize(const char *s);

#endif
