/* libFuzzer target: the whole QMP input path of thinblkd.
 *
 * Bytes from a client go through the JSON stream (lexer, streamer, parser), the dispatcher
 * with the daemon's real command tables and run state, and the JSON writer, compact and
 * pretty, exactly as the monitor server does with a socket's input. The first byte chooses
 * where the input is split in two feeds, so message boundaries across reads are covered.
 */
#include <stddef.h>
#include <stdint.h>

#include "block/graph.h"
#include "common/util.h"
#include "device/device.h"
#include "loop/loop.h"
#include "qmp/commands.h"
#include "qmp/dispatch.h"
#include "common/json-stream.h"
#include "common/qjson.h"
#include "runstate/runstate.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void emit(void *opaque, const char *name, json_t *data)
{
    struct buf *out = opaque;
    json_t *ev = json_pack("{s:s}", "event", name);

    if (data)
        json_object_set_new(ev, "data", data);
    qjson_write(out, ev, false);
    json_decref(ev);
}

static void emit_device(void *opaque, const char *name, json_t *data, json_t *extra)
{
    json_decref(extra);
    emit(opaque, name, data);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct buf out = { 0 };
    struct loop *loop = loop_new();
    struct qmp_dispatcher *d = qmp_dispatcher_new();
    json_t *version = qmp_version_info("0.1.0");
    struct block_graph *graph = block_graph_new(loop, NULL, emit, &out);
    struct runstate *rs = runstate_new(loop, RUN_STATE_RUNNING, emit, &out);
    struct json_stream *js = json_stream_new();
    struct qmp_session session = { 0 };
    size_t split = size > 0 ? data[0] % (size + 1) : 0;

    if (!loop)
        abort();
    struct dev_context *devs = dev_context_new(loop, rs, emit_device, &out);
    struct qmp_services svc = { .runstate = rs, .graph = graph, .devs = devs };

    /* Not the export commands: fuzzed input must not bind sockets. */
    qmp_register_control(d, version);
    qmp_register_run(d, &svc);
    qmp_register_block(d, &svc);

    for (int pass = 0; pass < 2; pass++) {
        if (pass == 0)
            json_stream_feed(js, data, split);
        else
            json_stream_feed(js, data + split, size - split);
        json_t *req;
        struct error *err;
        while (json_stream_next(js, &req, &err) == 1) {
            json_t *rsp = qmp_dispatch(d, &session, req, err);
            if (rsp) {  /* NULL: deferred (an rbd blockdev-add), answered into nothing */
                qjson_write(&out, rsp, false);
                qjson_write(&out, rsp, true);
                buf_reset(&out);
            } else {
                qmp_session_detach(&session);
            }
            json_decref(rsp);
            json_decref(req);
            error_free(err);
        }
    }
    /* Deferred stop requests, if any, run as the loop would run them; an rbd blockdev-add
     * (connecting on the offload thread) is waited for. */
    loop_run_once(loop, 0);
    while (block_graph_busy(graph))
        loop_run_once(loop, 100);

    json_stream_free(js);
    dev_context_free(devs);
    runstate_free(rs);
    block_graph_free(graph);
    qmp_dispatcher_free(d);
    json_decref(version);
    loop_free(loop);
    buf_free(&out);
    return 0;
}
