/* Block status descriptors: extents merged as they come (see internal.h). Pure: unit-tested
 * in tests/unit/test-nbd-extents.c. */
#include "nbd/internal.h"

uint64_t nbd_extents_add(struct nbd_extents *x, uint64_t len, uint32_t flags)
{
    uint64_t taken = 0;

    while (taken < len) {
        struct nbd_extent *last = x->n ? &x->e[x->n - 1] : NULL;
        if (last && last->flags == flags && last->length < UINT32_MAX) {
            uint32_t k = (uint32_t)MIN(len - taken, (uint64_t)(UINT32_MAX - last->length));
            last->length += k;
            taken += k;
        } else if (x->n < x->max) {
            x->e[x->n++] = (struct nbd_extent){ 0, flags };
        } else {
            break;
        }
    }
    return taken;
}
