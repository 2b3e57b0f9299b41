/* See u64map.h. */
#include "common/u64map.h"

#include <stdlib.h>

#include "common/util.h"

static size_t slot(const struct u64map *m, uint64_t key)
{
    size_t i = (size_t)((key * 0x9e3779b97f4a7c15ULL) >> 17) & (m->cap - 1);

    while (m->keys[i] && m->keys[i] != key + 1)
        i = (i + 1) & (m->cap - 1);
    return i;
}

uint32_t *u64map_get(const struct u64map *m, uint64_t key)
{
    if (!m->len)
        return NULL;
    size_t i = slot(m, key);
    return m->keys[i] ? &m->vals[i] : NULL;
}

static void grow(struct u64map *m)
{
    struct u64map old = *m;

    m->cap = m->cap ? 2 * m->cap : 64;
    m->keys = xzalloc(m->cap * sizeof(*m->keys));
    m->vals = xmalloc(m->cap * sizeof(*m->vals));
    for (size_t i = 0; i < old.cap; i++) {
        if (old.keys[i]) {
            size_t j = slot(m, old.keys[i] - 1);
            m->keys[j] = old.keys[i];
            m->vals[j] = old.vals[i];
        }
    }
    free(old.keys);
    free(old.vals);
}

uint32_t *u64map_put(struct u64map *m, uint64_t key)
{
    if (2 * (m->len + 1) > m->cap)
        grow(m);
    size_t i = slot(m, key);
    if (!m->keys[i]) {
        m->keys[i] = key + 1;
        m->vals[i] = 0;
        m->len++;
    }
    return &m->vals[i];
}

int u64map_next(const struct u64map *m, size_t *pos, uint64_t *key, uint32_t *val)
{
    for (; *pos < m->cap; (*pos)++) {
        if (m->keys[*pos]) {
            *key = m->keys[*pos] - 1;
            *val = m->vals[*pos];
            (*pos)++;
            return 1;
        }
    }
    return 0;
}

void u64map_reset(struct u64map *m)
{
    free(m->keys);
    free(m->vals);
    *m = (struct u64map){0};
}
