/* Byte ranges of an I/O vector (struct iovec, as readv(2)): slicing one into a sub-vector,
 * copying between one and a flat buffer, zeroing part of one, testing for zeroes. Offsets
 * count bytes from the vector's start, across segments. Nothing here allocates or blocks.
 */
#ifndef THINBLK_COMMON_IOV_H
#define THINBLK_COMMON_IOV_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

/* Total bytes of iov[0..n). */
uint64_t iov_size(const struct iovec *iov, unsigned n);
/* Whether every segment's address and length are multiples of align (a power of two). */
bool iov_aligned(const struct iovec *iov, unsigned n, uint64_t align);
/* The segments covering bytes [off, off + len) of iov[0..n), the first and last cut to the
 * range, into out (which the caller sizes: NULL only counts). Returns how many; the range
 * must lie within the vector. The bytes stay the vector's memory: nothing is copied. */
unsigned iov_slice(const struct iovec *iov, unsigned n, uint64_t off, uint64_t len,
                   struct iovec *out);
/* Copy len bytes from buf to the vector's bytes at off (within the vector). */
void iov_from_buf(const struct iovec *iov, unsigned n, uint64_t off, const void *buf,
                  uint64_t len);
/* Copy len bytes of the vector at off (within the vector) to buf. */
void iov_to_buf(const struct iovec *iov, unsigned n, uint64_t off, void *buf, uint64_t len);
/* Set len bytes of the vector at off (within the vector) to c. */
void iov_memset(const struct iovec *iov, unsigned n, uint64_t off, int c, uint64_t len);
/* Whether the len bytes at buf, or every byte of iov[0..n), are all zero. Stops at the first
 * non-zero word, so data that is not zero costs a few loads (detect-zeroes on every write). */
bool buf_is_zero(const void *buf, uint64_t len);
bool iov_is_zero(const struct iovec *iov, unsigned n);

#endif
