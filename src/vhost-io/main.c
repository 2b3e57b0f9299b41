/* thinblk-vhost-io: a vhost-user-blk frontend on the command line, to check an export by
 * hand and to measure its data path (docs/thinblk-vhost-io.1.scd).
 *
 * Exit status: 0 success, 1 a request failed or data did not match, 2 usage error,
 * 3 connection or protocol failure.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "vhost-io/cli.h"

static const char usage_text[] =
    "Usage: thinblk-vhost-io [OPTIONS] -s SOCKET MODE\n"
    "       thinblk-vhost-io [OPTIONS] -s SOCKET probe CASE | probe list\n"
    "Talk to a vhost-user-blk backend as a virtio driver would, from guest memory of its own.\n"
    "\n"
    "Modes: info, read, write, verify, discard, write-zeroes, flush, get-id, bench\n"
    "\n"
    "Options:\n"
    "  -s, --socket PATH        the backend's vhost-user socket\n"
    "  -o, --offset BYTES       where to start (default 0; suffixes k, M, G)\n"
    "  -l, --length BYTES       how much (default: to the end of the disk)\n"
    "  -P, --pattern BYTE       write this byte; read, verify: check for it (default 0xcd)\n"
    "  -b, --block-size BYTES   bytes per request (default 65536; bench 4096)\n"
    "  -d, --depth N            requests in flight per queue (default 1; bench 32)\n"
    "  -q, --queues N           queues to use (default 1)\n"
    "      --segments N         split each read's or write's data in N descriptors (default 1,\n"
    "                           at most 126), laid out in reverse order in memory\n"
    "      --output FILE        read: write the data read to FILE\n"
    "      --unmap              write-zeroes: allow the device to unmap\n"
    "      --random             bench: random offsets (default sequential)\n"
    "  -w, --write              bench: write instead of read\n"
    "  -t, --time SECONDS       bench: how long (default 5)\n"
    "      --no-event-idx       do not negotiate VIRTIO_RING_F_EVENT_IDX\n"
    "      --no-indirect        do not negotiate or use indirect descriptors\n"
    "      --indirect           put each request in an indirect table\n"
    "  -T, --timeout SECONDS    give up on a reply or completion after this (default 30)\n"
    "  -v, --verbose            trace the vhost-user messages to stderr\n"
    "  -h, --help               show this help and exit\n"
    "  -V, --version            show the version and exit\n"
    "\n"
    "Exit status: 0 success; 1 a request failed or the data did not match; 2 usage error;\n"
    "3 connection or protocol failure.\n";

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("thinblk-vhost-io: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry 'thinblk-vhost-io --help' for more information.\n", stderr);
    return VIO_EXIT_USAGE;
}

/* A size with an optional k/M/G/T suffix (powers of 1024). */
static int parse_size(const char *s, uint64_t *v)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-')
        return -1;
    unsigned shift = 0;
    switch (*end) {
    case 'k': case 'K': shift = 10; end++; break;
    case 'M': shift = 20; end++; break;
    case 'G': shift = 30; end++; break;
    case 'T': shift = 40; end++; break;
    default: break;
    }
    if (*end || (shift && n > (UINT64_MAX >> shift)))
        return -1;
    *v = (uint64_t)n << shift;
    return 0;
}

static int parse_uint(const char *s, unsigned max, unsigned *v)
{
    uint64_t n;
    if (parse_size(s, &n) < 0 || n == 0 || n > max)
        return -1;
    *v = (unsigned)n;
    return 0;
}

enum {
    OPT_OUTPUT = 256,
    OPT_UNMAP,
    OPT_RANDOM,
    OPT_NO_EVENT_IDX,
    OPT_NO_INDIRECT,
    OPT_INDIRECT,
    OPT_SEGMENTS,
};

static const struct option long_options[] = {
    {"socket", required_argument, NULL, 's'},
    {"offset", required_argument, NULL, 'o'},
    {"length", required_argument, NULL, 'l'},
    {"pattern", required_argument, NULL, 'P'},
    {"block-size", required_argument, NULL, 'b'},
    {"depth", required_argument, NULL, 'd'},
    {"queues", required_argument, NULL, 'q'},
    {"segments", required_argument, NULL, OPT_SEGMENTS},
    {"output", required_argument, NULL, OPT_OUTPUT},
    {"unmap", no_argument, NULL, OPT_UNMAP},
    {"random", no_argument, NULL, OPT_RANDOM},
    {"write", no_argument, NULL, 'w'},
    {"time", required_argument, NULL, 't'},
    {"no-event-idx", no_argument, NULL, OPT_NO_EVENT_IDX},
    {"no-indirect", no_argument, NULL, OPT_NO_INDIRECT},
    {"indirect", no_argument, NULL, OPT_INDIRECT},
    {"timeout", required_argument, NULL, 'T'},
    {"verbose", no_argument, NULL, 'v'},
    {"help", no_argument, NULL, 'h'},
    {"version", no_argument, NULL, 'V'},
    {NULL, 0, NULL, 0},
};

/* Features by name, for info. */
static const struct {
    unsigned bit;
    const char *name;
} feature_names[] = {
    {VIO_BLK_F_SIZE_MAX, "SIZE_MAX"},   {VIO_BLK_F_SEG_MAX, "SEG_MAX"},
    {VIO_BLK_F_GEOMETRY, "GEOMETRY"},   {VIO_BLK_F_RO, "RO"},
    {VIO_BLK_F_BLK_SIZE, "BLK_SIZE"},   {VIO_BLK_F_FLUSH, "FLUSH"},
    {VIO_BLK_F_TOPOLOGY, "TOPOLOGY"},   {VIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"},
    {VIO_BLK_F_MQ, "MQ"},               {VIO_BLK_F_DISCARD, "DISCARD"},
    {VIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"},
    {VIO_F_INDIRECT_DESC, "RING_INDIRECT_DESC"}, {VIO_F_EVENT_IDX, "RING_EVENT_IDX"},
    {VIO_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"}, {VIO_F_VERSION_1, "VERSION_1"},
};

static void print_features(const char *label, uint64_t f)
{
    printf("%s: 0x%016" PRIx64, label, f);
    for (size_t i = 0; i < ARRAY_SIZE(feature_names); i++) {
        if (f & (1ull << feature_names[i].bit))
            printf(" %s", feature_names[i].name);
    }
    putchar('\n');
}

static int mode_info(const struct vio_dev *d)
{
    const struct vio_blk_config *c = &d->config;
    print_features("device-features", d->device_features);
    print_features("features", d->features);
    printf("protocol-features: 0x%016" PRIx64 "\n", d->device_protocol);
    printf("acked-protocol-features: 0x%016" PRIx64 "\n", d->protocol);
    printf("max-queues: %u\n", d->max_queues);
    if (!d->have_config) {
        printf("config: none (no CONFIG protocol feature)\n");
        return VIO_EXIT_OK;
    }
    printf("capacity: %" PRIu64 " sectors (%" PRIu64 " bytes)\n", c->capacity,
           c->capacity * VIO_BLK_SECTOR);
    printf("size-max: %u\nseg-max: %u\nblk-size: %u\n", c->size_max, c->seg_max, c->blk_size);
    printf("physical-block-exp: %u\nmin-io-size: %u\nopt-io-size: %u\n",
           c->physical_block_exp, c->min_io_size, c->opt_io_size);
    printf("writeback: %u\nnum-queues: %u\n", c->writeback, c->num_queues);
    printf("max-discard-sectors: %u\nmax-discard-seg: %u\ndiscard-sector-alignment: %u\n",
           c->max_discard_sectors, c->max_discard_seg, c->discard_sector_alignment);
    printf("max-write-zeroes-sectors: %u\nmax-write-zeroes-seg: %u\n"
           "write-zeroes-may-unmap: %u\n",
           c->max_write_zeroes_sectors, c->max_write_zeroes_seg, c->write_zeroes_may_unmap);
    printf("read-only: %s\n", vio_dev_has(d, VIO_BLK_F_RO) ? "yes" : "no");
    return VIO_EXIT_OK;
}

/* flush and get-id: one request on the first queue. */
static int mode_single(struct vio_cli *c, uint32_t type)
{
    struct error *err = NULL;
    struct vio_blk_req *r = vio_blk_req_get(&c->qs[0]);
    int status = vio_blk_run(r, type, 0, 0, 0, c->timeout_ms, &err);
    if (status < 0) {
        fprintf(stderr, "thinblk-vhost-io: %s\n", err->desc);
        error_free(err);
        return VIO_EXIT_CONNECTION;
    }
    if (status != VIO_BLK_S_OK) {
        fprintf(stderr, "thinblk-vhost-io: %s failed: %s (%d)\n",
                type == VIO_BLK_T_FLUSH ? "flush" : "get-id", vio_blk_status_name(status),
                status);
        return VIO_EXIT_IO;
    }
    if (type == VIO_BLK_T_GET_ID)
        printf("%.*s\n", (int)strnlen((char *)r->data, VIO_BLK_ID_BYTES), (char *)r->data);
    return VIO_EXIT_OK;
}

static const struct {
    const char *name;
    int type;      /* the request type, or -1 */
    bool check;    /* compare what is read with the pattern */
} modes[] = {
    {"info", -1, false},
    {"read", VIO_BLK_T_IN, false},
    {"write", VIO_BLK_T_OUT, false},
    {"verify", VIO_BLK_T_IN, true},
    {"discard", VIO_BLK_T_DISCARD, false},
    {"write-zeroes", VIO_BLK_T_WRITE_ZEROES, false},
    {"flush", VIO_BLK_T_FLUSH, false},
    {"get-id", VIO_BLK_T_GET_ID, false},
    {"bench", -2, false},
    {"probe", -3, false},
};

/* Check the range against the disk and the sector size. */
static int check_range(struct vio_cli *c, bool bench)
{
    uint64_t size = c->dev->config.capacity * VIO_BLK_SECTOR;
    if (c->offset > size)
        return usage_error("offset %" PRIu64 " is past the end of the disk (%" PRIu64 ")",
                           c->offset, size);
    if (!c->have_length)
        c->length = size - c->offset;
    if (c->length > size - c->offset)
        return usage_error("offset + length is past the end of the disk (%" PRIu64 ")", size);
    if (c->offset % VIO_BLK_SECTOR || c->length % VIO_BLK_SECTOR ||
        c->block_size % VIO_BLK_SECTOR)
        return usage_error("offset, length and block size must be multiples of %d",
                           VIO_BLK_SECTOR);
    if (bench && c->length < c->block_size)
        return usage_error("the range is smaller than one block");
    return 0;
}

/* Connect, start the queues, run the mode. */
static int run_mode(struct vio_cli *c, struct vio_options *o, int type, bool check)
{
    struct error *err = NULL;
    int ret = VIO_EXIT_CONNECTION;
    bool bench = type == -2;

    o->num_queues = c->queues;
    unsigned per_req = c->use_indirect ? 1 : c->segments + 2;
    o->queue_size = 128;
    while (o->queue_size < c->depth * per_req)
        o->queue_size *= 2;
    o->mem_size = (1u << 20) + (uint64_t)c->queues *
                                   vio_blk_queue_mem(o->queue_size, c->depth, c->block_size,
                                                     c->segments);
    if (type == -3) /* the probe's own buffers and indirect table */
        o->mem_size += 16ull * (o->queue_size + 2) + 3 * 4096;

    c->dev = vio_dev_connect(c->socket, o, &err);
    if (!c->dev)
        goto fail;
    if (type == -1) {
        ret = mode_info(c->dev);
        goto out;
    }
    if (type == -3 && vio_cli_probe_is_msg(c->probe)) {
        ret = vio_cli_probe_msg(c, c->probe);
        goto out;
    }
    bool ranged = type >= 0 && type != VIO_BLK_T_FLUSH && type != VIO_BLK_T_GET_ID;
    if (ranged && !c->dev->have_config) {
        fprintf(stderr, "thinblk-vhost-io: the backend has no config space to read the "
                        "capacity from\n");
        goto out;
    }
    if ((ranged || bench) && (ret = check_range(c, bench)))
        goto out;
    ret = VIO_EXIT_CONNECTION;
    if (vio_dev_start(c->dev, &err) < 0)
        goto fail;
    c->qs = xzalloc(sizeof(*c->qs) * c->queues);
    c->qps = xzalloc(sizeof(*c->qps) * c->queues);
    for (unsigned i = 0; i < c->queues; i++) {
        c->qps[i] = &c->qs[i];
        if (vio_blk_queue_init(&c->qs[i], c->dev, i, c->depth, c->block_size, c->segments,
                               c->use_indirect, &err) < 0)
            goto fail;
    }
    if (type == -3)
        ret = vio_cli_probe(c, c->probe);
    else if (type == VIO_BLK_T_FLUSH || type == VIO_BLK_T_GET_ID)
        ret = mode_single(c, (uint32_t)type);
    else if (bench)
        ret = vio_cli_bench(c);
    else
        ret = vio_cli_transfer(c, (uint32_t)type, check);
    /* A probe may well have made the backend hang up: that is its result, not an error. */
    if (!(type == -3 && vio_dev_hung_up(c->dev)) && vio_dev_stop(c->dev, &err) < 0) {
        ret = VIO_EXIT_CONNECTION;
        goto fail;
    }
    goto out;

fail:
    fprintf(stderr, "thinblk-vhost-io: %s\n", err->desc);
    error_free(err);
out:
    if (c->qs) {
        for (unsigned i = 0; i < c->queues; i++)
            vio_blk_queue_destroy(&c->qs[i]);
    }
    free(c->qs);
    free(c->qps);
    vio_dev_free(c->dev);
    return ret;
}

int main(int argc, char **argv)
{
    struct vio_cli c = {.pattern = -1, .timeout_ms = 30000};
    struct vio_options o = {.event_idx = true, .indirect = true};
    bool bench_defaults[2] = {true, true}; /* block size, depth not given */
    int opt;
    uint64_t v;

    log_program = "thinblk-vhost-io";
    opterr = 0;
    while ((opt = getopt_long(argc, argv, "+:s:o:l:P:b:d:q:wt:T:vhV", long_options, NULL)) !=
           -1) {
        switch (opt) {
        case 's':
            c.socket = optarg;
            break;
        case 'o':
            if (parse_size(optarg, &c.offset) < 0)
                return usage_error("Invalid offset '%s'", optarg);
            break;
        case 'l':
            if (parse_size(optarg, &c.length) < 0)
                return usage_error("Invalid length '%s'", optarg);
            c.have_length = true;
            break;
        case 'P':
            if (parse_size(optarg, &v) < 0 || v > 255)
                return usage_error("Invalid pattern '%s' (a byte: 0 to 255)", optarg);
            c.pattern = (int)v;
            break;
        case 'b':
            if (parse_size(optarg, &v) < 0 || v == 0 || v > (64u << 20))
                return usage_error("Invalid block size '%s'", optarg);
            c.block_size = (uint32_t)v;
            bench_defaults[0] = false;
            break;
        case 'd':
            if (parse_uint(optarg, 4096, &c.depth) < 0)
                return usage_error("Invalid depth '%s'", optarg);
            bench_defaults[1] = false;
            break;
        case 'q':
            if (parse_uint(optarg, 64, &c.queues) < 0)
                return usage_error("Invalid number of queues '%s' (1 to 64)", optarg);
            break;
        case OPT_SEGMENTS:
            if (parse_uint(optarg, VIO_BLK_MAX_DATA_SEGS, &c.segments) < 0)
                return usage_error("Invalid number of segments '%s' (1 to %d)", optarg,
                                   VIO_BLK_MAX_DATA_SEGS);
            break;
        case OPT_OUTPUT:
            c.output = optarg;
            break;
        case OPT_UNMAP:
            c.unmap = true;
            break;
        case OPT_RANDOM:
            c.random = true;
            break;
        case 'w':
            c.write = true;
            break;
        case 't': {
            char *end;
            c.seconds = strtod(optarg, &end);
            if (end == optarg || *end || !(c.seconds > 0 && c.seconds < 1e6))
                return usage_error("Invalid time '%s'", optarg);
            break;
        }
        case 'T': {
            char *end;
            double secs = strtod(optarg, &end);
            if (end == optarg || *end || !(secs > 0 && secs < 1e6))
                return usage_error("Invalid timeout '%s'", optarg);
            c.timeout_ms = (int)(secs * 1000) + 1;
            break;
        }
        case OPT_NO_EVENT_IDX:
            o.event_idx = false;
            break;
        case OPT_NO_INDIRECT:
            o.indirect = false;
            break;
        case OPT_INDIRECT:
            c.use_indirect = true;
            break;
        case 'v':
            o.trace = true;
            break;
        case 'h':
            fputs(usage_text, stdout);
            return VIO_EXIT_OK;
        case 'V':
            printf("thinblk-vhost-io %s\n", THINBLK_VERSION);
            return VIO_EXIT_OK;
        case ':':
            return usage_error("Option '%s' needs an argument", argv[optind - 1]);
        default:
            if (optopt)
                return usage_error("Invalid option '-%c'", optopt);
            return usage_error("Invalid option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc)
        return usage_error("No mode given");
    const char *mode = argv[optind];
    if (strcmp(mode, "probe") == 0) {
        if (optind + 2 != argc)
            return usage_error("probe needs one CASE (or list)");
        c.probe = argv[optind + 1];
        if (strcmp(c.probe, "list") == 0) {
            vio_cli_probe_list();
            vio_cli_probe_list_msgs();
            return VIO_EXIT_OK;
        }
    } else if (optind + 1 < argc) {
        return usage_error("Unexpected argument '%s'", argv[optind + 1]);
    }
    if (!c.socket)
        return usage_error("No socket given (-s)");
    if (c.use_indirect && !o.indirect)
        return usage_error("--indirect and --no-indirect contradict each other");
    o.timeout_ms = c.timeout_ms;

    for (size_t i = 0; i < ARRAY_SIZE(modes); i++) {
        if (strcmp(mode, modes[i].name) != 0)
            continue;
        bool bench = modes[i].type == -2;
        if (!c.block_size)
            c.block_size = bench && bench_defaults[0] ? 4096 : 65536;
        if (!c.depth)
            c.depth = bench && bench_defaults[1] ? 32 : 1;
        if (!c.queues)
            c.queues = 1;
        if (!c.segments)
            c.segments = 1;
        if (c.seconds == 0)
            c.seconds = 5;
        bool check = modes[i].check || (modes[i].type == VIO_BLK_T_IN && c.pattern >= 0);
        return run_mode(&c, &o, modes[i].type, check);
    }
    return usage_error("Unknown mode '%s'", mode);
}
