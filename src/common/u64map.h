/* A hash map from 64-bit keys (any value) to 32-bit values: open addressing, linear
 * probing, grown at half full. For sets of clusters, offsets, ids. Nothing here blocks;
 * allocation failures abort, as xmalloc().
 */
#ifndef THINBLK_U64MAP_H
#define THINBLK_U64MAP_H

#include <stddef.h>
#include <stdint.h>

struct u64map {
    uint64_t *keys;   /* key + 1; 0 marks an empty slot */
    uint32_t *vals;
    size_t cap;       /* 0 or a power of two */
    size_t len;       /* keys present */
};

/* The value of key, or NULL if absent. Valid until the next put. */
uint32_t *u64map_get(const struct u64map *m, uint64_t key);
/* The value of key, inserted as 0 if absent. Valid until the next put. */
uint32_t *u64map_put(struct u64map *m, uint64_t key);
/* Iterate: *pos starts at 0; returns 1 with *key and *val of the next entry, 0 at the end.
 * The map must not change meanwhile. */
int u64map_next(const struct u64map *m, size_t *pos, uint64_t *key, uint32_t *val);
/* Free the storage, back to {0}. */
void u64map_reset(struct u64map *m);

#endif
