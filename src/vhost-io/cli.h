/* thinblk-vhost-io's internals, shared by main.c (options, info) and run.c (the I/O loop). */
#ifndef THINBLK_VHOST_IO_CLI_H
#define THINBLK_VHOST_IO_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "vhost-io/blk.h"

enum {
    VIO_EXIT_OK = 0,
    VIO_EXIT_IO = 1,        /* a request failed or the data did not match */
    VIO_EXIT_USAGE = 2,
    VIO_EXIT_CONNECTION = 3,
};

struct vio_cli {
    /* Options. */
    const char *socket;
    uint64_t offset, length;    /* bytes; length 0: to the end of the disk */
    bool have_length;
    uint32_t block_size;        /* bytes per request */
    unsigned depth, queues;
    unsigned segments;          /* data descriptors per read or write */
    int pattern;                /* -P, or -1 */
    bool unmap, random, write, use_indirect;
    double seconds;             /* bench */
    const char *output;         /* read: write the data to this file */
    const char *probe;          /* probe: the case */
    int timeout_ms;
    /* The connection. */
    struct vio_dev *dev;
    struct vio_blk_queue *qs;   /* queues of them */
    struct vio_blk_queue **qps; /* pointers to the same, for vio_blk_wait() */
};

/* Run an I/O mode (read, write, verify, discard, write-zeroes) over [offset, offset+length)
 * split in requests, on all queues at the depth given. Returns an exit status. */
int vio_cli_transfer(struct vio_cli *c, uint32_t type, bool check);

/* The bench mode. Returns an exit status. */
int vio_cli_bench(struct vio_cli *c);

/* The probe mode (probe.c): case is a malformed request ("desc-loop", ...), run on queue 0
 * of the started device, or a malformed message ("msg-..."), sent before it starts. Prints
 * one JSON line with the outcome. Returns an exit status. */
int vio_cli_probe(struct vio_cli *c, const char *name);
bool vio_cli_probe_is_msg(const char *name);
int vio_cli_probe_msg(struct vio_cli *c, const char *name);
/* Print the names of the cases, one a line. */
void vio_cli_probe_list(void);
void vio_cli_probe_list_msgs(void);

#endif
