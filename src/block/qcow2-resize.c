/* qcow2 block_resize. See qcow2-resize.h.
 *
 * The texts are QEMU 7.2's qcow2_co_truncate() and qcow2_grow_l1_table() where QEMU has them.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "block/qcow2-resize.h"

#include "block/qcow2.h"
#include "block/qcow2-alloc.h"
#include "block/qcow2-cache.h"
#include "block/qcow2-check.h"
#include "block/sync-io.h"
#include "common/log.h"
#include "common/util.h"

/* Change cluster cl's refcount from `from` to `to` on disk (its refcount block's chunk read,
 * checked, patched, written and synced), and in the refcount block cache. Returns 0 or -1
 * with *errp set. */
static int set_refcount(struct qcow2_state *s, uint64_t cl, uint64_t from, uint64_t to,
                        struct error **errp)
{
    uint32_t order = s->refcount_order, a = s->meta_align;
    uint64_t block, idx = cl & ((1ULL << s->rb_bits) - 1);
    uint32_t pos = (uint32_t)(qcow2_refcount_byte(order, idx) & ~(uint64_t)(a - 1));
    uint64_t first = ((uint64_t)pos * 8) >> order;  /* the chunk's first entry */
    _cleanup_free_ void *chunk = qcow2_alloc_buf(a);

    if (qcow2_refblock(s, cl >> s->rb_bits, &block) < 0 || !block) {
        error_setg(errp, "No refcount block for cluster %#" PRIx64, cl << s->cluster_bits);
        return -1;
    }
    if (node_pread_sync(s->file, chunk, a, block + pos, errp) < 0)
        return -1;
    uint64_t old = qcow2_refcount_get(order, chunk, idx - first);
    if (old != from) {
        error_setg(errp, "Refcount of cluster %#" PRIx64 " is %" PRIu64 ", not %" PRIu64,
                   cl << s->cluster_bits, old, from);
        return -1;
    }
    qcow2_refcount_set(order, chunk, idx - first, to);
    if (qcow2_write_sync(s, chunk, a, block + pos, errp) < 0)
        return -1;
    qcow2_cache_patch(s->rb_cache, block, pos, chunk, a);
    return 0;
}

/* Write the header with its bytes [pos, pos + len) replaced by data; memory follows once
 * the write succeeded. */
static int patch_header(struct qcow2_state *s, uint32_t pos, const void *data, uint32_t len,
                        struct error **errp)
{
    _cleanup_free_ uint8_t *old = xmalloc(len);

    memcpy(old, (uint8_t *)s->header + pos, len);
    memcpy((uint8_t *)s->header + pos, data, len);
    if (qcow2_write_header(s, errp) < 0) {
        memcpy((uint8_t *)s->header + pos, old, len);
        return -1;
    }
    return 0;
}

/* Clusters [c, c + n) at the end of the image, counted (refcount 1, synced), or -1 with
 * *errp set (nothing taken). */
static int take_run(struct qcow2_state *s, uint64_t n, uint64_t *c, struct error **errp)
{
    uint64_t first = s->rsv.next_free, off;

    /* Growing the refcount structures is the allocator's (asynchronous) job. */
    for (uint64_t b = first >> s->rb_bits; b <= (first + n - 1) >> s->rb_bits; b++) {
        if (qcow2_refblock(s, b, &off) < 0 || !off) {
            error_setg(errp, "the refcount structures must grow first (not supported here)");
            return -1;
        }
    }
    qcow2_reserve_skip_to(s, first + n);
    for (uint64_t i = 0; i < n; i++) {
        if (set_refcount(s, first + i, 0, 1, errp) < 0) {
            for (uint64_t j = 0; j < i; j++)
                qcow2_reserve_put_spare(s, first + j);
            qcow2_reserve_put_free(s, first + i, n - i);
            return -1;
        }
    }
    *c = first;
    return 0;
}

/* The old table's clusters [c, c + n), no longer linked: refcount 0, free for reuse. A
 * failure leaks them until the next writable open. */
static void free_run(struct qcow2_state *s, uint64_t c, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        _cleanup_error_ struct error *err = NULL;
        if (set_refcount(s, c + i, 1, 0, &err) < 0) {
            log_warn("qcow2 %s: the old L1 table's cluster %#" PRIx64 " leaks: %s",
                     s->node->node_name, (c + i) << s->cluster_bits, err->desc);
            continue;
        }
        qcow2_reserve_put_free(s, c + i, 1);
    }
}

/* QEMU's qcow2_grow_l1_table() with exact_size: a new table of l1_size entries. */
static int grow_l1(struct qcow2_state *s, uint32_t l1_size, struct error **errp)
{
    uint64_t cs = s->cluster_size;
    uint64_t n = ((uint64_t)l1_size * 8 + cs - 1) / cs, c;
    uint64_t old_c = s->l1_offset / cs, old_n = ((uint64_t)s->l1_size * 8 + cs - 1) / cs;
    uint8_t link[12];

    if (take_run(s, n, &c, errp) < 0)
        return -1;
    /* Entries past the old table's end are zero (no L2 table): memory as on disk, as the
     * table's buffer is at least qcow2_l1_bytes() long once l1_size grows. */
    uint64_t *table = qcow2_alloc_buf(n * cs);
    memcpy(table, s->l1, (size_t)s->l1_size * 8);
    qcow2_put_be32(link, l1_size);
    qcow2_put_be64(link + 4, c * cs);
    if (qcow2_write_sync(s, table, n * cs, c * cs, errp) < 0 ||
        patch_header(s, 36, link, sizeof(link), errp) < 0) {
        for (uint64_t i = 0; i < n; i++)
            qcow2_reserve_put_spare(s, c + i);
        free(table);
        return -1;
    }
    free(s->l1);
    s->l1 = table;
    s->l1_offset = c * cs;
    uint32_t old_size = s->l1_size;
    s->l1_size = l1_size;
    if (old_size)
        free_run(s, old_c, old_n);
    return 0;
}

int qcow2_truncate(struct block_node *n, uint64_t size, struct error **errp)
{
    struct qcow2_state *s = n->opaque;
    uint64_t per_l1 = (uint64_t)s->cluster_size * (s->cluster_size / 8);
    uint64_t l1_size = size / per_l1 + (size % per_l1 != 0);
    uint8_t be_size[8];

    if (size % 512) {
        error_setg(errp, "The new size must be a multiple of 512");
        return -1;
    }
    if (size < n->size) {
        error_setg(errp, "qcow2: shrinking an image is not supported");
        return -1;
    }
    if (size == n->size)
        return 0;
    if (l1_size > QCOW2_MAX_L1_TABLE_BYTES / 8) {
        error_setg(errp, "Failed to grow the L1 table: %s", strerror(EFBIG));
        return -1;
    }
    if (s->meta.corrupt) {
        error_setg(errp, "qcow2: the image is corrupt; it cannot be resized");
        return -1;
    }
    if (!qcow2_alloc_idle(s)) {
        error_setg(errp, "qcow2: clusters are being allocated; try again");
        return -1;
    }
    if (l1_size > s->l1_size && grow_l1(s, (uint32_t)l1_size, errp) < 0) {
        error_prepend(errp, "Failed to grow the L1 table: ");
        return -1;
    }
    qcow2_put_be64(be_size, size);
    if (patch_header(s, 24, be_size, sizeof(be_size), errp) < 0) {
        error_prepend(errp, "Failed to update the image size: ");
        return -1;
    }
    block_node_set_size(n, size);
    return 0;
}
