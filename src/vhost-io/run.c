/* thinblk-vhost-io's I/O loop: keep depth requests in flight on each queue, check each
 * completion, until the range is done (transfer) or the time is up (bench). One thread,
 * waiting in poll() on the call eventfds of all queues. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "vhost-io/cli.h"

static int report_error(struct error *err)
{
    fprintf(stderr, "thinblk-vhost-io: %s\n", err->desc);
    error_free(err);
    return VIO_EXIT_CONNECTION;
}

static const char *type_name(uint32_t type)
{
    switch (type) {
    case VIO_BLK_T_IN: return "read";
    case VIO_BLK_T_OUT: return "write";
    case VIO_BLK_T_DISCARD: return "discard";
    case VIO_BLK_T_WRITE_ZEROES: return "write-zeroes";
    default: return "request";
    }
}

/* Bytes per request of a type: the block size, or for discard and write-zeroes what the
 * device allows in one segment (capped so the length fits our 32-bit field). */
static uint64_t chunk_size(const struct vio_cli *c, uint32_t type)
{
    uint64_t max = 0;
    if (type == VIO_BLK_T_DISCARD)
        max = c->dev->config.max_discard_sectors;
    else if (type == VIO_BLK_T_WRITE_ZEROES)
        max = c->dev->config.max_write_zeroes_sectors;
    else
        return c->block_size;
    max = max ? max * VIO_BLK_SECTOR : 1ull << 30;
    return MIN(max, 1ull << 30);
}

/* Write the data of completed read r to fd at its place in the range, segment by segment
 * (they lie in r->data in reverse order). Returns false on an error. */
static bool output(const struct vio_cli *c, const struct vio_blk_req *r, int fd)
{
    uint32_t at, mem, k;

    for (unsigned i = 0; (k = vio_blk_seg(r->len, r->q->segs, i, &at, &mem)) > 0; i++) {
        if (pwrite(fd, r->data + mem, k, (off_t)(r->offset - c->offset + at)) != (ssize_t)k) {
            fprintf(stderr, "thinblk-vhost-io: %s: %s\n", c->output, strerror(errno));
            return false;
        }
    }
    return true;
}

/* Check a completed read against the pattern; report the first byte that differs (in the
 * first segment that has one). */
static bool check_pattern(const struct vio_blk_req *r, int pattern)
{
    uint32_t at, mem, k;

    for (unsigned s = 0; (k = vio_blk_seg(r->len, r->q->segs, s, &at, &mem)) > 0; s++) {
        for (uint32_t i = 0; i < k; i++) {
            if (r->data[mem + i] != (uint8_t)pattern) {
                fprintf(stderr, "thinblk-vhost-io: mismatch at offset %" PRIu64
                                ": 0x%02x, expected 0x%02x\n",
                        r->offset + at + i, r->data[mem + i], (uint8_t)pattern);
                return false;
            }
        }
    }
    return true;
}

int vio_cli_transfer(struct vio_cli *c, uint32_t type, bool check)
{
    uint64_t end = c->offset + c->length, next = c->offset, chunk = chunk_size(c, type);
    int out_fd = -1, ret = VIO_EXIT_OK;
    uint8_t pattern = c->pattern < 0 ? 0xcd : (uint8_t)c->pattern;
    struct error *err = NULL;

    if (c->output && type == VIO_BLK_T_IN) {
        out_fd = open(c->output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (out_fd < 0) {
            fprintf(stderr, "thinblk-vhost-io: %s: %s\n", c->output, strerror(errno));
            return VIO_EXIT_IO;
        }
    }
    unsigned inflight = 0;
    while (next < end || inflight) {
        /* Fill every queue up to its depth, a request at a time, round robin. */
        for (unsigned qi = 0; qi < c->queues; qi++) {
            struct vio_blk_queue *q = &c->qs[qi];
            bool added = false;
            struct vio_blk_req *r;
            while (next < end && ret == VIO_EXIT_OK && (r = vio_blk_req_get(q))) {
                uint32_t len = (uint32_t)MIN(chunk, end - next);
                if (type == VIO_BLK_T_OUT)
                    memset(r->data, pattern, len);
                if (vio_blk_submit(r, type, next, len, c->unmap ? VIO_BLK_WZ_F_UNMAP : 0) < 0) {
                    vio_blk_req_put(r);
                    break;
                }
                next += len;
                inflight++;
                added = true;
            }
            if (added)
                vio_blk_kick(q);
        }
        bool any = false;
        for (unsigned qi = 0; qi < c->queues; qi++) {
            struct vio_blk_req *r;
            while ((r = vio_blk_poll(&c->qs[qi]))) {
                any = true;
                inflight--;
                int status = *r->status;
                if (status != VIO_BLK_S_OK) {
                    fprintf(stderr, "thinblk-vhost-io: %s of %u bytes at %" PRIu64
                            " failed: %s (%d)\n", type_name(type), r->len, r->offset,
                            vio_blk_status_name(status), status);
                    ret = VIO_EXIT_IO;
                } else if (type == VIO_BLK_T_IN && check && !check_pattern(r, pattern)) {
                    ret = VIO_EXIT_IO;
                } else if (out_fd >= 0 && !output(c, r, out_fd)) {
                    ret = VIO_EXIT_IO;
                }
                vio_blk_req_put(r);
            }
        }
        /* After a failure, stop submitting and only drain what is in flight. */
        if (ret != VIO_EXIT_OK)
            next = end;
        if (!any && inflight && vio_blk_wait(c->qps, c->queues, c->timeout_ms, &err) < 0) {
            if (out_fd >= 0)
                close(out_fd);
            return report_error(err);
        }
    }
    if (out_fd >= 0)
        close(out_fd);
    return ret;
}

/* xorshift64*: offsets only need to be spread, not unpredictable. */
static uint64_t next_random(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1Dull;
}

int vio_cli_bench(struct vio_cli *c)
{
    uint64_t blocks = c->length / c->block_size, seq = 0, rng = 0x9e3779b97f4a7c15ull;
    uint32_t type = c->write ? VIO_BLK_T_OUT : VIO_BLK_T_IN;
    uint64_t ios = 0, errors = 0, lat_sum_ns = 0, lat_max_ns = 0;
    struct error *err = NULL;

    if (blocks == 0) {
        fprintf(stderr, "thinblk-vhost-io: the range is smaller than one block\n");
        return VIO_EXIT_USAGE;
    }
    for (unsigned qi = 0; qi < c->queues; qi++) {
        for (unsigned i = 0; i < c->qs[qi].depth; i++)
            memset(c->qs[qi].reqs[i].data, c->pattern < 0 ? 0xcd : c->pattern, c->block_size);
    }
    uint64_t start = now_monotonic_ns();
    uint64_t stop = start + (uint64_t)(c->seconds * 1e9);
    unsigned inflight = 0;
    bool submitting = true;
    while (submitting || inflight) {
        if (submitting && now_monotonic_ns() >= stop)
            submitting = false;
        for (unsigned qi = 0; submitting && qi < c->queues; qi++) {
            struct vio_blk_queue *q = &c->qs[qi];
            bool added = false;
            struct vio_blk_req *r;
            while ((r = vio_blk_req_get(q))) {
                uint64_t b = c->random ? next_random(&rng) % blocks : seq++ % blocks;
                if (vio_blk_submit(r, type, c->offset + b * c->block_size, c->block_size,
                                   0) < 0) {
                    vio_blk_req_put(r);
                    break;
                }
                inflight++;
                added = true;
            }
            if (added)
                vio_blk_kick(q);
        }
        bool any = false;
        uint64_t now = now_monotonic_ns();
        for (unsigned qi = 0; qi < c->queues; qi++) {
            struct vio_blk_req *r;
            while ((r = vio_blk_poll(&c->qs[qi]))) {
                any = true;
                inflight--;
                ios++;
                if (*r->status != VIO_BLK_S_OK)
                    errors++;
                uint64_t lat = now - r->submit_ns;
                lat_sum_ns += lat;
                lat_max_ns = MAX(lat_max_ns, lat);
                vio_blk_req_put(r);
            }
        }
        if (!any && inflight && vio_blk_wait(c->qps, c->queues, c->timeout_ms, &err) < 0)
            return report_error(err);
    }
    double secs = (double)(now_monotonic_ns() - start) / 1e9;
    double iops = ios / secs, mbps = iops * c->block_size / 1e6;
    uint64_t kicks = 0, calls = 0;
    for (unsigned qi = 0; qi < c->queues; qi++) {
        kicks += c->qs[qi].vq->kicks;
        calls += c->qs[qi].vq->calls;
    }
    const char *rw = c->write ? (c->random ? "randwrite" : "write")
                              : (c->random ? "randread" : "read");
    double lat_avg_us = ios ? (double)lat_sum_ns / ios / 1e3 : 0;
    printf("%s: bs=%u depth=%u queues=%u: %.0f IOPS, %.1f MB/s, avg latency %.1f us "
           "(%" PRIu64 " requests in %.2f s, %" PRIu64 " errors)\n",
           rw, c->block_size, c->depth, c->queues, iops, mbps, lat_avg_us, ios, secs, errors);
    printf("{\"rw\": \"%s\", \"bs\": %u, \"depth\": %u, \"queues\": %u, \"seconds\": %.3f, "
           "\"requests\": %" PRIu64 ", \"errors\": %" PRIu64 ", \"iops\": %.1f, "
           "\"mbps\": %.2f, \"lat_avg_us\": %.1f, \"lat_max_us\": %.1f, \"kicks\": %" PRIu64
           ", \"calls\": %" PRIu64 ", \"event_idx\": %s}\n",
           rw, c->block_size, c->depth, c->queues, secs, ios, errors, iops, mbps, lat_avg_us,
           lat_max_ns / 1e3, kicks, calls,
           vio_dev_has(c->dev, VIO_F_EVENT_IDX) ? "true" : "false");
    return errors ? VIO_EXIT_IO : VIO_EXIT_OK;
}
