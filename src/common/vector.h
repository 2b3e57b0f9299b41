/* A typed, growable array (nbdkit's common/utils/vector.h is the model):
 *
 *     DEFINE_VECTOR_TYPE(u64_vector, uint64_t)
 *     u64_vector v = {0};
 *     u64_vector_append(&v, 42);       // aborts if memory runs out, as xmalloc()
 *     for (size_t i = 0; i < v.len; i++) ... v.ptr[i] ...
 *     u64_vector_grow_to(&v, 100);     // len 100 at least, the new elements zeroed
 *     u64_vector_reset(&v);            // frees the storage, back to {0}
 *
 * ptr[0..len) are the elements; the vector owns ptr. Nothing here blocks.
 */
#ifndef THINBLK_VECTOR_H
#define THINBLK_VECTOR_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Make room for at least n more elements of size elem in *ptr (capacity *cap). */
void vector_reserve(void **ptr, size_t *cap, size_t len, size_t n, size_t elem);

#define DEFINE_VECTOR_TYPE(name, type)                                                     \
    typedef struct {                                                                       \
        type *ptr;                                                                         \
        size_t len, cap;                                                                   \
    } name;                                                                                \
    static inline __attribute__((unused)) void name##_reserve(name *v, size_t n)           \
    {                                                                                      \
        if (v->cap - v->len < n)                                                           \
            vector_reserve((void **)&v->ptr, &v->cap, v->len, n, sizeof(type));            \
    }                                                                                      \
    static inline __attribute__((unused)) void name##_append(name *v, type x)              \
    {                                                                                      \
        name##_reserve(v, 1);                                                              \
        v->ptr[v->len++] = x;                                                              \
    }                                                                                      \
    static inline __attribute__((unused)) void name##_grow_to(name *v, size_t n)           \
    {                                                                                      \
        if (n <= v->len)                                                                   \
            return;                                                                        \
        name##_reserve(v, n - v->len);                                                     \
        memset(v->ptr + v->len, 0, (n - v->len) * sizeof(type));                           \
        v->len = n;                                                                        \
    }                                                                                      \
    static inline __attribute__((unused)) void name##_reset(name *v)                       \
    {                                                                                      \
        free(v->ptr);                                                                      \
        v->ptr = NULL;                                                                     \
        v->len = v->cap = 0;                                                               \
    }

DEFINE_VECTOR_TYPE(u64_vector, uint64_t)

#endif
