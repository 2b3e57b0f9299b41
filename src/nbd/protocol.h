/* NBD wire constants and message layouts, from doc/proto.md of NetworkBlockDevice/nbd.
 *
 * Everything on the wire is big-endian. The structs are packed so they can be read from and
 * written to the socket as they are; their integer fields hold wire (big-endian) values.
 */
#ifndef THINBLK_NBD_PROTOCOL_H
#define THINBLK_NBD_PROTOCOL_H

#include <stdint.h>

/* ---- handshake ---- */

#define NBD_MAGIC 0x4e42444d41474943ull          /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC 0x49484156454F5054ull     /* "IHAVEOPT" */
#define NBD_REP_MAGIC 0x0003e889045565a9ull      /* option replies */

/* Handshake flags (server, 16 bits). */
#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES (1u << 1)

/* Client flags (32 bits). */
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES (1u << 1)

/* Transmission flags (16 bits). */
#define NBD_FLAG_HAS_FLAGS (1u << 0)
#define NBD_FLAG_READ_ONLY (1u << 1)
#define NBD_FLAG_SEND_FLUSH (1u << 2)
#define NBD_FLAG_SEND_FUA (1u << 3)
#define NBD_FLAG_ROTATIONAL (1u << 4)
#define NBD_FLAG_SEND_TRIM (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN (1u << 8)
#define NBD_FLAG_SEND_RESIZE (1u << 9)
#define NBD_FLAG_SEND_CACHE (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO (1u << 11)

/* Options. */
#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_LIST 3
#define NBD_OPT_PEEK_EXPORT 4
#define NBD_OPT_STARTTLS 5
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT 10
#define NBD_OPT_EXTENDED_HEADERS 11

/* Option replies; errors have bit 31 set. */
#define NBD_REP_ACK 1u
#define NBD_REP_SERVER 2u
#define NBD_REP_INFO 3u
#define NBD_REP_META_CONTEXT 4u
#define NBD_REP_FLAG_ERROR (1u << 31)
#define NBD_REP_ERR_UNSUP (NBD_REP_FLAG_ERROR | 1u)
#define NBD_REP_ERR_POLICY (NBD_REP_FLAG_ERROR | 2u)
#define NBD_REP_ERR_INVALID (NBD_REP_FLAG_ERROR | 3u)
#define NBD_REP_ERR_PLATFORM (NBD_REP_FLAG_ERROR | 4u)
#define NBD_REP_ERR_TLS_REQD (NBD_REP_FLAG_ERROR | 5u)
#define NBD_REP_ERR_UNKNOWN (NBD_REP_FLAG_ERROR | 6u)
#define NBD_REP_ERR_SHUTDOWN (NBD_REP_FLAG_ERROR | 7u)
#define NBD_REP_ERR_BLOCK_SIZE_REQD (NBD_REP_FLAG_ERROR | 8u)
#define NBD_REP_ERR_TOO_BIG (NBD_REP_FLAG_ERROR | 9u)

/* NBD_REP_INFO types. */
#define NBD_INFO_EXPORT 0
#define NBD_INFO_NAME 1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE 3

/* Strings (export names, queries, messages) MUST be no longer than this. */
#define NBD_MAX_STRING 4096

/* The metadata contexts we serve: the spec's, and QEMU's allocation depth (its
 * docs/interop/nbd.txt: 0 unallocated in the whole chain, 1 the export's node, 2+ the
 * backing node that depth down). */
#define NBD_META_BASE_ALLOCATION "base:allocation"
#define NBD_META_ALLOCATION_DEPTH "qemu:allocation-depth"
#define NBD_STATE_HOLE (1u << 0)
#define NBD_STATE_ZERO (1u << 1)

struct nbd_new_handshake {
    uint64_t nbdmagic;  /* NBD_MAGIC */
    uint64_t version;   /* NBD_OPTS_MAGIC */
    uint16_t gflags;    /* handshake flags */
} __attribute__((packed));

struct nbd_option_header {
    uint64_t magic;   /* NBD_OPTS_MAGIC */
    uint32_t option;
    uint32_t optlen;  /* bytes of option data that follow */
} __attribute__((packed));

struct nbd_fixed_new_option_reply {
    uint64_t magic;   /* NBD_REP_MAGIC */
    uint32_t option;  /* the option replied to */
    uint32_t reply;   /* NBD_REP_* */
    uint32_t replylen;
} __attribute__((packed));

/* Reply to NBD_OPT_EXPORT_NAME (followed by 124 zeroes unless NO_ZEROES was negotiated). */
struct nbd_export_name_reply {
    uint64_t exportsize;
    uint16_t eflags;
} __attribute__((packed));

struct nbd_info_export {
    uint16_t info;  /* NBD_INFO_EXPORT */
    uint64_t exportsize;
    uint16_t eflags;
} __attribute__((packed));

struct nbd_info_block_size {
    uint16_t info;  /* NBD_INFO_BLOCK_SIZE */
    uint32_t minimum;
    uint32_t preferred;
    uint32_t maximum;
} __attribute__((packed));

/* ---- transmission ---- */

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

/* Commands. */
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_CACHE 5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

/* Command flags. */
#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_DF (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

/* Structured reply flags and types; error types have bit 15 set. */
#define NBD_REPLY_FLAG_DONE (1u << 0)
#define NBD_REPLY_TYPE_NONE 0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR ((1u << 15) | 1u)
#define NBD_REPLY_TYPE_ERROR_OFFSET ((1u << 15) | 2u)

/* Error values ("Error values" in the spec): the only ones that may go on the wire. */
#define NBD_SUCCESS 0
#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95
#define NBD_ESHUTDOWN 108

struct nbd_request {
    uint32_t magic;  /* NBD_REQUEST_MAGIC */
    uint16_t flags;  /* NBD_CMD_FLAG_* */
    uint16_t type;   /* NBD_CMD_* */
    uint64_t handle;
    uint64_t offset;
    uint32_t count;
} __attribute__((packed));

struct nbd_simple_reply {
    uint32_t magic;  /* NBD_SIMPLE_REPLY_MAGIC */
    uint32_t error;  /* NBD_E* */
    uint64_t handle;
} __attribute__((packed));

struct nbd_structured_reply {
    uint32_t magic;  /* NBD_STRUCTURED_REPLY_MAGIC */
    uint16_t flags;  /* NBD_REPLY_FLAG_* */
    uint16_t type;   /* NBD_REPLY_TYPE_* */
    uint64_t handle;
    uint32_t length; /* payload bytes that follow */
} __attribute__((packed));

struct nbd_structured_reply_offset_data {
    uint64_t offset;  /* followed by the data */
} __attribute__((packed));

struct nbd_structured_reply_error {
    uint32_t error;   /* NBD_E*, not 0 */
    uint16_t len;     /* message bytes that follow */
} __attribute__((packed));

struct nbd_block_descriptor {
    uint32_t length;
    uint32_t status_flags;
} __attribute__((packed));

struct nbd_structured_reply_block_status {
    uint32_t context_id;  /* followed by one or more struct nbd_block_descriptor */
} __attribute__((packed));

#endif
