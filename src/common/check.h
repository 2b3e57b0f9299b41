/* CHECK(cond): an invariant at a module boundary (a caller's contract), checked in every build.
 *
 * Unlike assert(), CHECK does not depend on NDEBUG: it guards memory safety (a node queued
 * twice corrupts the loop's list, a negative fd or a NULL buffer reaches the kernel), so it
 * must stay on when meson's b_ndebug=true (or -Db_ndebug=if-release with a release build)
 * defines NDEBUG. A failed check prints where and aborts: the program's state is already
 * wrong, and carrying on would turn a caller's bug into corrupted data.
 */
#ifndef THINBLK_CHECK_H
#define THINBLK_CHECK_H

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (__builtin_expect(!(cond), 0))                                                  \
            check_failed(#cond, __FILE__, __LINE__, __func__);                             \
    } while (0)

/* Report a failed CHECK on stderr and abort(). */
void check_failed(const char *cond, const char *file, int line, const char *func)
    __attribute__((noreturn, cold));

#endif
