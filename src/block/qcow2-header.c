/* qcow2 open: the header, its extensions, the backing file name, the snapshot table, the L1
 * and refcount tables. See qcow2-header.h.
 *
 * The checks and their texts are QEMU 7.2's (qcow2_do_open(), qcow2_read_extensions(),
 * qcow2_validate_table(), qcow2_read_snapshots()), checked against it by the tests, with a
 * few of our own where QEMU lets an image through that this driver would act on wrongly
 * (tables overlapping each other or the header).
 */
#include <endian.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "block/qcow2-header.h"

#include "block/qcow2.h"
#include "block/sync-io.h"
#include "common/log.h"
#include "common/util.h"

#define V2_HEADER_LENGTH 72u
#define V3_MIN_HEADER_LENGTH 104u
#define MAX_BITMAPS 65535u
#define MAX_BITMAP_DIRECTORY (1024u * 65535u)

/* ---- unsupported features ---------------------------------------------------------------- */

/* The name of incompatible feature bit in the image's feature name table: true if found. */
static bool feature_name(const uint8_t *c0, uint32_t ext_start, uint32_t cs, unsigned bit,
                         char *out, size_t outlen)
{
    uint32_t off = ext_start;

    while (off + 8 <= cs) {
        uint32_t type = qcow2_be32(c0 + off), len = qcow2_be32(c0 + off + 4);
        if (type == QCOW2_EXT_END || len > cs - off - 8)
            return false;
        if (type == QCOW2_EXT_FEATURE_NAMES) {
            for (uint32_t i = 0; i + 48 <= len; i += 48) {
                const uint8_t *f = c0 + off + 8 + i;
                if (f[0] == 0 && f[1] == bit) {
                    snprintf(out, outlen, "%.46s", (const char *)f + 2);
                    return true;
                }
            }
        }
        off += 8 + ((len + 7) & ~7u);
    }
    return false;
}

/* QEMU's wording: "Unsupported qcow2 feature(s): NAME, NAME, Unknown incompatible feature:
 * HEXMASK", names from the image's feature name table. */
static void report_unsupported(const uint8_t *c0, uint32_t ext_start, uint32_t cs,
                               uint64_t mask, struct error **errp)
{
    char list[1024] = "", name[64];
    size_t used = 0;
    uint64_t unknown = 0;

    for (unsigned bit = 0; bit < 64; bit++) {
        if (!(mask & (1ULL << bit)))
            continue;
        if (!feature_name(c0, ext_start, cs, bit, name, sizeof(name))) {
            unknown |= 1ULL << bit;
            continue;
        }
        int w = snprintf(list + used, sizeof(list) - used, "%s%s", used ? ", " : "", name);
        if (w < 0 || (size_t)w >= sizeof(list) - used)
            break;
        used += (size_t)w;
    }
    if (unknown)
        snprintf(list + used, sizeof(list) - used, "%sUnknown incompatible feature: %" PRIx64,
                 used ? ", " : "", unknown);
    error_setg(errp, "Unsupported qcow2 feature(s): %s", list);
}

/* ---- header extensions ------------------------------------------------------------------- */

/* What the extensions say that open needs. */
struct exts {
    bool bitmaps;            /* a bitmaps extension */
    bool data_file;          /* an external data file name */
};

/* The bitmaps extension (24 bytes: count, reserved, directory size and offset), checked as
 * QEMU checks it, whether the autoclear bit says the bitmaps are valid or not. */
static int check_bitmaps(const struct qcow2_state *s, const uint8_t *e, uint32_t len,
                         struct error **errp)
{
    if (len != 24) {
        error_setg(errp, "bitmaps_ext: Invalid extension length");
        return -1;
    }
    if (!(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;  /* QEMU: stale bitmaps, ignored (their clusters are leaks) */
    uint32_t n = qcow2_be32(e), reserved = qcow2_be32(e + 4);
    uint64_t dir_size = qcow2_be64(e + 8), dir_off = qcow2_be64(e + 16);
    if (reserved) {
        error_setg(errp, "bitmaps_ext: Reserved field is not zero");
        return -1;
    }
    if (n > MAX_BITMAPS) {
        error_setg(errp, "bitmaps_ext: Image has %" PRIu32 " bitmaps, exceeding the QEMU "
                   "supported maximum of %u", n, MAX_BITMAPS);
        return -1;
    }
    if (n == 0) {
        error_setg(errp, "found bitmaps extension with zero bitmaps");
        return -1;
    }
    if (dir_off & (s->cluster_size - 1)) {
        error_setg(errp, "bitmaps_ext: invalid bitmap directory offset");
        return -1;
    }
    if (dir_size > MAX_BITMAP_DIRECTORY) {
        error_setg(errp, "bitmaps_ext: bitmap directory size (%" PRIu64 ") exceeds the maximum "
                   "supported size (%u)", dir_size, MAX_BITMAP_DIRECTORY);
        return -1;
    }
    return 0;
}

/* Walk the extensions from ext_start to end: type, length, data padded to 8; type 0 ends
 * them. Fills x and the backing format. */
static int read_extensions(struct qcow2_state *s, const uint8_t *c0, uint64_t ext_start,
                           uint64_t end, uint32_t crypt_method, struct exts *x,
                           struct error **errp)
{
    for (uint64_t pos = ext_start; pos + 8 <= end;) {
        uint32_t type = qcow2_be32(c0 + pos), len = qcow2_be32(c0 + pos + 4);
        const uint8_t *data = c0 + pos + 8;
        if (type == QCOW2_EXT_END)
            break;
        if (len > end - pos - 8) {
            error_setg(errp, "Header extension too large");
            return -1;
        }
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (len > QCOW2_MAX_BACKING_FORMAT) {
                error_setg(errp, "ERROR: ext_backing_format: len=%" PRIu32 " too large "
                           "(>=%u)", len, QCOW2_MAX_BACKING_FORMAT + 1);
                return -1;
            }
            free(s->bk.fmt);
            s->bk.fmt = xmalloc(len + 1);
            memcpy(s->bk.fmt, data, len);
            s->bk.fmt[len] = '\0';
            break;
        case QCOW2_EXT_CRYPTO:
            if (crypt_method != 2) {
                error_setg(errp, "CRYPTO header extension only expected with LUKS encryption "
                           "method");
                return -1;
            }
            break;
        case QCOW2_EXT_BITMAPS:
            if (check_bitmaps(s, data, len, errp) < 0)
                return -1;
            x->bitmaps = true;
            break;
        case QCOW2_EXT_DATA_FILE:
            x->data_file = true;  /* used only with the incompatible bit, refused below */
            break;
        default:
            break;  /* feature names (read by report_unsupported()), unknown ones */
        }
        pos += 8 + (((uint64_t)len + 7) & ~7ULL);
    }
    return 0;
}

/* The backing file name: where the header says, inside cluster 0, after the header. */
static int read_backing_name(struct qcow2_state *s, const uint8_t *c0, uint32_t header_length,
                             struct error **errp)
{
    uint64_t off = qcow2_be64(c0 + 8);
    uint32_t len = qcow2_be32(c0 + 16), cs = s->cluster_size;

    if (!off)
        return 0;
    /* QEMU does not refuse a name inside the header fields; its bytes would be read as both. */
    if (off > cs || off < header_length) {
        error_setg(errp, "Invalid backing file offset");
        return -1;
    }
    if (len > MIN(QCOW2_MAX_BACKING_NAME, cs - off)) {
        error_setg(errp, "Backing file name too long");
        return -1;
    }
    s->bk.name = xmalloc(len + 1);
    memcpy(s->bk.name, c0 + off, len);
    s->bk.name[len] = '\0';  /* a NUL inside ends the name, as in QEMU */
    return 0;
}

int qcow2_header_parse(struct qcow2_state *s, const uint8_t *c0, uint64_t *size,
                       struct error **errp)
{
    uint32_t cs = s->cluster_size, header_length = V2_HEADER_LENGTH;
    uint32_t crypt_method = qcow2_be32(c0 + 32);
    struct exts x = {0};

    s->version = qcow2_be32(c0 + 4);
    s->refcount_order = 4;
    *size = qcow2_be64(c0 + 24);
    s->l1_size = qcow2_be32(c0 + 36);
    s->l1_offset = qcow2_be64(c0 + 40);
    s->rt_offset = qcow2_be64(c0 + 48);
    s->rt_clusters = qcow2_be32(c0 + 56);
    s->nb_snapshots = qcow2_be32(c0 + 60);
    if (s->version >= 3) {
        s->incompat = qcow2_be64(c0 + QCOW2_HDR_INCOMPAT);
        s->compat = qcow2_be64(c0 + 80);
        s->autoclear = qcow2_be64(c0 + 88);
        s->refcount_order = qcow2_be32(c0 + 96);
        header_length = qcow2_be32(c0 + 100);
        if (header_length < V3_MIN_HEADER_LENGTH) {
            error_setg(errp, "qcow2 header too short");
            return -1;
        }
        if (header_length > cs) {
            error_setg(errp, "qcow2 header exceeds cluster size");
            return -1;
        }
    }
    if (qcow2_be64(c0 + 8) > cs) {
        error_setg(errp, "Invalid backing file offset");
        return -1;
    }
    uint64_t unsupported = s->incompat &
        ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_COMPRESSION);
    if (unsupported) {
        report_unsupported(c0, header_length, cs, unsupported, errp);
        return -1;
    }
    if ((s->incompat & QCOW2_INCOMPAT_COMPRESSION) && header_length > 104 && c0[104] != 0) {
        error_setg(errp, "Unsupported qcow2 compression type %u: only zlib (0) is supported",
                   c0[104]);
        return -1;
    }
    if (s->writable && (s->incompat & QCOW2_INCOMPAT_CORRUPT)) {
        error_setg(errp, "qcow2: Image is corrupt; cannot be opened read/write");
        return -1;
    }
    if (s->refcount_order > 6) {
        error_setg(errp, "Reference count entry width too large; may not exceed 64 bits");
        return -1;
    }
    if (crypt_method != 0) {
        error_setg(errp, "Encrypted qcow2 images are not supported");
        return -1;
    }
    uint64_t backing_off = qcow2_be64(c0 + 8);
    if (read_extensions(s, c0, header_length, backing_off ? backing_off : cs, crypt_method, &x,
                        errp) < 0)
        return -1;
    if ((s->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW) &&
        !(s->incompat & QCOW2_INCOMPAT_DATA_FILE)) {
        error_setg(errp, "data-file-raw requires a data file");
        return -1;
    }
    if (read_backing_name(s, c0, header_length, errp) < 0)
        return -1;
    if (s->bk.fmt && !s->bk.name) {
        free(s->bk.fmt);  /* QEMU ignores a format without a name */
        s->bk.fmt = NULL;
    }
    if ((s->incompat & QCOW2_INCOMPAT_DIRTY) && !s->writable) {
        /* Reads do not need the refcounts; a writable open repairs them (qcow2-check.c). */
        log_warn("qcow2 %s: the image is dirty; its refcounts need 'qemu-img check -r all'",
                 s->node->node_name);
    }
    return 0;
}

/* ---- tables ------------------------------------------------------------------------------ */

/* QEMU's qcow2_validate_table(): the table's size and alignment. */
static int validate_table(const struct qcow2_state *s, uint64_t offset, uint64_t entries,
                          uint64_t entry_len, uint64_t max_bytes, const char *name,
                          struct error **errp)
{
    if (entries > max_bytes / entry_len) {
        error_setg(errp, "%s too large", name);
        return -1;
    }
    if (INT64_MAX - entries * entry_len < offset || (offset & (s->cluster_size - 1))) {
        error_setg(errp, "%s offset invalid", name);
        return -1;
    }
    return 0;
}

/* Clusters [a, a + an) and [b, b + bn) overlap. */
static bool overlap(uint64_t a, uint64_t an, uint64_t b, uint64_t bn)
{
    return an && bn && a < b + bn && b < a + an;
}

/* The snapshot table: QEMU's checks of its entries (read-only opens only: a writable open of
 * an image with snapshots is refused). Nothing else of the snapshots is used. */
static int check_snapshots(struct qcow2_state *s, struct error **errp)
{
    uint64_t off = qcow2_be64((const uint8_t *)s->header + 64), cs = s->cluster_size;
    uint64_t pos = off, total = 0;
    uint8_t h[QCOW2_SNAPSHOT_HEADER_BYTES];

    if (validate_table(s, off, s->nb_snapshots, QCOW2_SNAPSHOT_HEADER_BYTES,
                       (uint64_t)QCOW2_SNAPSHOT_HEADER_BYTES * QCOW2_MAX_SNAPSHOTS,
                       "Snapshot table", errp) < 0)
        return -1;
    if (overlap(off / cs, 1, 0, 1)) {
        error_setg(errp, "Snapshot table offset invalid");
        return -1;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        pos = (pos + 7) & ~7ULL;
        if (node_pread_sync(s->file, h, sizeof(h), pos, errp) < 0) {
            error_prepend(errp, "Failed to read snapshot table: ");
            return -1;
        }
        uint32_t extra = qcow2_be32(h + 36);
        uint64_t l1_off = qcow2_be64(h);
        uint32_t l1_size = qcow2_be32(h + 8);
        if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
            error_setg(errp, "Too much extra metadata in snapshot table entry %" PRIu32, i);
            return -1;
        }
        if (validate_table(s, l1_off, l1_size, 8, QCOW2_MAX_L1_TABLE_BYTES,
                           "Snapshot L1 table", errp) < 0)
            return -1;
        uint64_t len = QCOW2_SNAPSHOT_HEADER_BYTES + (uint64_t)extra + qcow2_be16(h + 12) +
                       qcow2_be16(h + 14);
        total += (len + 7) & ~7ULL;
        if (total > QCOW2_MAX_SNAPSHOT_TABLE_BYTES) {
            error_setg(errp, "Snapshot table is too big");
            return -1;
        }
        pos += len;
    }
    return 0;
}

int qcow2_tables_load(struct qcow2_state *s, uint64_t size, struct error **errp)
{
    uint64_t cs = s->cluster_size;
    uint64_t per_l1 = cs * (cs / 8);  /* guest bytes one L2 table maps */
    uint64_t l1_needed = size / per_l1 + (size % per_l1 != 0);

    if (s->rt_clusters == 0) {
        error_setg(errp, "Image does not contain a reference count table");
        return -1;
    }
    if (validate_table(s, s->rt_offset, s->rt_clusters, cs, QCOW2_MAX_RT_BYTES,
                       "Reference count table", errp) < 0 ||
        (s->nb_snapshots && check_snapshots(s, errp) < 0) ||
        validate_table(s, s->l1_offset, s->l1_size, 8, QCOW2_MAX_L1_TABLE_BYTES,
                       "Active L1 table", errp) < 0)
        return -1;
    if (s->l1_size < l1_needed) {
        error_setg(errp, "L1 table is too small");
        return -1;
    }
    /* Not QEMU's checks: tables over the header or each other would be overwritten by
     * updates of the other. */
    uint64_t l1_first = s->l1_offset / cs, l1_n = ((uint64_t)s->l1_size * 8 + cs - 1) / cs;
    uint64_t rt_first = s->rt_offset / cs;
    if (overlap(l1_first, l1_n, 0, 1) || overlap(l1_first, l1_n, rt_first, s->rt_clusters)) {
        error_setg(errp, "Active L1 table offset invalid: the table overlaps the %s",
                   overlap(l1_first, l1_n, 0, 1) ? "header" : "reference count table");
        return -1;
    }
    if (overlap(rt_first, s->rt_clusters, 0, 1)) {
        error_setg(errp, "Reference count table offset invalid: the table overlaps the header");
        return -1;
    }
    uint64_t l1_len = qcow2_l1_bytes(s);
    s->l1 = qcow2_alloc_buf(l1_len);
    if (l1_len && node_pread_sync(s->file, s->l1, l1_len, s->l1_offset, errp) < 0)
        return -1;
    s->rt_entries = (uint64_t)s->rt_clusters * cs / 8;
    s->rt = qcow2_alloc_buf((uint64_t)s->rt_clusters * cs);
    if (node_pread_sync(s->file, s->rt, (size_t)s->rt_clusters * cs, s->rt_offset, errp) < 0)
        return -1;
    if (s->writable && s->nb_snapshots) {
        error_setg(errp, "qcow2: images with internal snapshots are not supported read/write "
                   "yet");
        return -1;
    }
    return 0;
}
