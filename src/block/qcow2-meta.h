/* qcow2 metadata: lookups, and the checks every piece of it passes before it is acted on.
 *
 * Nothing the image says is trusted. An L1 entry, an L2 entry, a compressed cluster
 * descriptor or a refcount table entry is checked where it is read, before the data path
 * reads, writes or frees anything it names: no reserved bits, aligned, inside the file, not
 * overlapping the header, a table or another mapping it must not share, and (for a write in
 * place or a free) not one of the host clusters the open-time check (qcow2-check.c) found in
 * conflict. A failed check signals corruption as QEMU's qcow2_signal_corruption() does: on a
 * writable image the corrupt bit is set on disk, BLOCK_IMAGE_CORRUPTED goes out with
 * "fatal": true and every later write fails; on a read-only one the event says "fatal":
 * false. The request fails with EIO; nothing is written.
 *
 * Calls only qcow2-format.h, qcow2-cache.h and the graph. Loop thread only.
 */
#ifndef THINBLK_BLOCK_QCOW2_META_H
#define THINBLK_BLOCK_QCOW2_META_H

#include <stdbool.h>
#include <stdint.h>

#include "block/qcow2-format.h"
#include "common/u64map.h"

struct qcow2_state;
struct qcow2_waiter;

/* Kinds of cluster in the metadata map (bits: a cluster claimed twice has two). */
#define QCOW2_META_L2 1u         /* an L2 table in use (active L1) */
#define QCOW2_META_RB 2u         /* a refcount block in use */
#define QCOW2_META_SHARED 4u     /* claimed by two references where one must be the only */
#define QCOW2_META_UNCOUNTED 8u  /* more references than its refcount (the open-time check) */
#define QCOW2_META_CONFLICT (QCOW2_META_SHARED | QCOW2_META_UNCOUNTED)

/* Owned by qcow2-meta.c; others read corrupt and hwm. */
struct qcow2_meta {
    struct u64map map;  /* cluster -> QCOW2_META_* */
    /* No host byte from hwm on was in the file at open or has been written since: the file's
     * extent as far as this driver knows (a multiple of the cluster size). */
    uint64_t hwm;
    bool corrupt;       /* marked corrupt (fatal): every write fails with EIO */
    bool signalled;     /* a corruption event went out: later non-fatal ones are not sent */
};

/* What the data path is about to do with the clusters of an L2 entry. */
enum qcow2_use {
    QCOW2_USE_READ,     /* read its data (also as a copy-on-write source) */
    QCOW2_USE_WRITE,    /* write to its host cluster in place */
    QCOW2_USE_FREE,     /* unlink it and release its host clusters */
};

/* Build the map from the L1 and refcount tables in memory (at open, after they are read):
 * clusters claimed by two structures are marked so that lookups through them fail. */
void qcow2_meta_init(struct qcow2_state *s);
void qcow2_meta_cleanup(struct qcow2_state *s);
/* Cluster cl now holds a new L2 table (QCOW2_META_L2) or refcount block (QCOW2_META_RB). */
void qcow2_meta_add(struct qcow2_state *s, uint64_t cl, unsigned kind);
/* The open-time check found host cluster cl in conflict: QCOW2_META_SHARED or
 * QCOW2_META_UNCOUNTED. */
void qcow2_meta_conflict(struct qcow2_state *s, uint64_t cl, unsigned why);
/* What metadata in use cluster cl holds, in QEMU's overlap-check names ("qcow2_header",
 * "active L1 table", "active L2 table", "refcount table", "refcount block"), or NULL. */
const char *qcow2_meta_overlap(const struct qcow2_state *s, uint64_t cl);

/* Bytes of the L1 table in memory and on the wire: l1_size entries rounded up to meta_align. */
uint64_t qcow2_l1_bytes(const struct qcow2_state *s);

/* The L2 table of L1 index l1_idx, checked (for reading it only, or also for changing it:
 * then no other L1 entry nor a data mapping may claim it): 0 with *l2_off (0 if none), or
 * -EIO (corruption signalled). */
int qcow2_l2_table(struct qcow2_state *s, uint64_t l1_idx, bool reading, uint64_t *l2_off);
/* The L2 entry for guest offset voff in *l2e (0 if no L2 table), its table checked as
 * qcow2_l2_table() does and the entry for every use (kind, alignment, inside the file):
 * returns 0, 1 if w waits for the L2 table to load (w->cb later, never inside this call), or
 * -errno (-EIO: corruption signalled). */
int qcow2_lookup(struct qcow2_state *s, uint64_t voff, bool reading, struct qcow2_waiter *w,
                 uint64_t *l2e);
/* The further checks of entry l2e of voff (from qcow2_lookup()) for use: 0, or -EIO with
 * corruption signalled. READ needs none beyond the lookup's. */
int qcow2_check_use(struct qcow2_state *s, uint64_t voff, uint64_t l2e, enum qcow2_use use);
/* The refcount block for clusters [b << rb_bits, (b + 1) << rb_bits), checked: 0 with *off
 * (0 if none), or -EIO (corruption signalled). */
int qcow2_refblock(struct qcow2_state *s, uint64_t b, uint64_t *off);
/* The refcount block offset at index b as the table says, unchecked (0 past its end), for
 * open-time code that validates it itself. */
uint64_t qcow2_rt_entry(const struct qcow2_state *s, uint64_t b);

/* Before writing [off, off+len) of the file: 0, or -EIO if the image is corrupt or (for data,
 * !meta) the range overlaps metadata in use, which signals corruption ("Preventing invalid
 * write on metadata"). Keeps hwm. */
int qcow2_pre_write(struct qcow2_state *s, uint64_t off, uint64_t len, bool meta);

/* QEMU's qcow2_signal_corruption(): fatal on a writable image (the corrupt bit is written,
 * every later write fails), not on a read-only one; BLOCK_IMAGE_CORRUPTED with offset and
 * size when they are >= 0; one event, and only a fatal one after a non-fatal one. */
void qcow2_signal_corruption(struct qcow2_state *s, int64_t off, int64_t size,
                             const char *fmt, ...) __attribute__((format(printf, 4, 5)));

#endif
