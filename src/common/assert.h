/* Contracts between layers, checked in every build.
 *
 * Input is validated where it enters (the NBD transmission phase, QMP dispatch) and turned
 * into a clear error there; ASSERT() states what the next layer may then rely on. A failed
 * ASSERT() is a bug in the caller, never bad input: it logs the expression with file:line and
 * aborts. Unlike assert(3) it does not depend on NDEBUG, because these guard memory safety
 * (a range past a buffer, a request past a node) in release builds too; keep the expressions
 * cheap and free of side effects all the same.
 */
#ifndef THINBLK_ASSERT_H
#define THINBLK_ASSERT_H

/* Log "assertion failed: expr" with where it failed, then abort(). */
_Noreturn void thinblk_assert_failed(const char *expr, const char *file, int line,
                                     const char *func);

#define ASSERT(expr)                                                                     \
    ((expr) ? (void)0 : thinblk_assert_failed(#expr, __FILE__, __LINE__, __func__))

#endif
