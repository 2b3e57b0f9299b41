/* The "fault" filter driver: fail chosen requests with a chosen errno, for tests.
 *
 * In the spirit of QEMU's blkdebug: over any child, a list of rules, each making matching
 * requests fail without reaching the child. Options: file (the child) and rules, a list of
 *   {"op": "read"|"write"|"flush"|"discard"|"write-zeroes"|"block-status"|"any",
 *    "errno": "ENOSPC" (a name or a number),
 *    "offset": N, "length": N   (only requests overlapping [offset, offset+length);
 *                                length defaults to the rest of the node),
 *    "after": N                 (let the first N matching requests through),
 *    "once": BOOL               (fail one request, then the rule is spent; default false:
 *                                fail until the rules are replaced),
 *    "delay-ms": N              (hold a matching request N ms first: it is in flight at
 *                                its device meanwhile; then fail it with errno, or without
 *                                errno pass it on to the child)}
 * Rules are tried in order; the first that fails a request wins. A block status query
 * (graph.h) matches only "block-status" rules, not "any": it fails with the rule's errno,
 * and a delay does not hold it (a driver answers a query at once or after I/O it waited for,
 * and the query may be asked again, see graph.h). The rule list can be
 * replaced at run time with the QMP command __org.thinblk_fault-set (qmp/cmd-block.c).
 */
#include <errno.h>
#include <string.h>

#include "block/fault.h"
#include "block/graph.h"
#include "common/util.h"
#include "loop/loop.h"

struct fault_rule {
    int op;          /* enum block_op, or -1 for any */
    int err;         /* positive errno */
    uint64_t offset, length;
    uint64_t after;  /* matching requests still to let through */
    uint64_t delay_ms;
    bool once;
    bool spent;
};

struct fault_state {
    struct fault_rule *rules;
    size_t nrules;
};

struct fault_op {
    struct loop_deferred fail_call;  /* failing later, never inside node_submit() */
    struct block_node *node;
    struct block_req child;
    struct block_req *parent;
    int err;
};

/* Block status is not a request: its rules' op, after the requests' enum block_op. */
#define OP_BLOCK_STATUS (BLOCK_OP_WRITE_ZEROES + 1)

static const char *const op_names[] = {
    [BLOCK_OP_READ] = "read", [BLOCK_OP_WRITE] = "write", [BLOCK_OP_FLUSH] = "flush",
    [BLOCK_OP_DISCARD] = "discard", [BLOCK_OP_WRITE_ZEROES] = "write-zeroes",
    [OP_BLOCK_STATUS] = "block-status",
};

static const char *const op_values[] = {
    "read", "write", "flush", "discard", "write-zeroes", "block-status", "any", NULL,
};

#define RULE_UINT(name_) \
    { name_, SCHEMA_INT, .optional = true, .min = 0, .max = INT64_MAX, .range_name = "uint64" }

static const struct schema_member rule_members[] = {
    /* thinblk's own: a bad value is named with its place in the list. */
    { "op", SCHEMA_ENUM, .optional = true, .full_name = true, .values = op_values },
    /* A name or a number: parse_errno() says what it takes. Optional only with delay-ms. */
    { "errno", SCHEMA_ANY, .optional = true },
    RULE_UINT("offset"),
    RULE_UINT("length"),
    RULE_UINT("after"),
    { "once", SCHEMA_BOOL, .optional = true },
    RULE_UINT("delay-ms"),
    { NULL },
};

const struct schema_member fault_rule = { NULL, SCHEMA_OBJECT, .members = rule_members };

const struct schema_member block_fault_options[] = {
    BLOCK_REF_MEMBER("file"),
    { "rules", SCHEMA_ARRAY, .optional = true, .element = &fault_rule },
    { NULL },
};

static int parse_errno(json_t *v, struct error **errp)
{
    if (json_is_integer(v) && json_integer_value(v) > 0 && json_integer_value(v) < 4096)
        return (int)json_integer_value(v);
    if (json_is_string(v)) {
        for (int e = 1; e < 200; e++) {
            const char *name = strerrorname_np(e);
            if (name && strcmp(name, json_string_value(v)) == 0)
                return e;
        }
    }
    error_setg(errp, "Parameter 'errno' expects an errno name such as 'ENOSPC' or a number");
    return -1;
}

static uint64_t rule_uint(json_t *rule, const char *key, uint64_t dflt)
{
    json_t *v = json_object_get(rule, key);

    return v ? (uint64_t)json_integer_value(v) : dflt;
}

int fault_parse_rules(json_t *rules, struct fault_rule **out, size_t *n, struct error **errp)
{
    size_t i;
    json_t *r;

    *out = NULL;
    *n = 0;
    if (!rules)
        return 0;
    struct fault_rule *list = xzalloc((json_array_size(rules) + 1) * sizeof(*list));
    json_array_foreach(rules, i, r) {
        struct fault_rule *fr = &list[i];
        const char *op = json_string_value(json_object_get(r, "op"));
        fr->op = -1;
        for (size_t k = 0; op && k < ARRAY_SIZE(op_names); k++) {
            if (strcmp(op, op_names[k]) == 0)
                fr->op = (int)k;
        }
        fr->delay_ms = rule_uint(r, "delay-ms", 0);
        json_t *err = json_object_get(r, "errno");
        if (!err && !fr->delay_ms) {
            error_setg(errp, "Parameter 'rules[%zu].errno' is missing", i);
            free(list);
            return -1;
        }
        fr->err = err ? parse_errno(err, errp) : 0;
        if (fr->err < 0) {
            free(list);
            return -1;
        }
        fr->offset = rule_uint(r, "offset", 0);
        fr->length = rule_uint(r, "length", UINT64_MAX);
        fr->after = rule_uint(r, "after", 0);
        fr->once = json_is_true(json_object_get(r, "once"));
    }
    *out = list;
    *n = json_array_size(rules);
    return 0;
}

int fault_set_rules(struct block_node *n, json_t *rules, struct error **errp)
{
    struct fault_state *s = n->opaque;
    struct fault_rule *list;
    size_t count;

    if (n->drv != &block_driver_fault) {
        error_setg(errp, "Node '%s' is not a fault injection node", n->node_name);
        return -1;
    }
    if (fault_parse_rules(rules, &list, &count, errp) < 0)
        return -1;
    free(s->rules);
    s->rules = list;
    s->nrules = count;
    return 0;
}

static int fault_open(struct block_node *n, json_t *opts, struct error **errp)
{
    struct fault_state *s = xzalloc(sizeof(*s));
    struct block_node *child;

    if (fault_parse_rules(json_object_get(opts, "rules"), &s->rules, &s->nrules, errp) < 0) {
        free(s);
        return -1;
    }
    child = block_node_open_child(n->graph, json_object_get(opts, "file"), errp);
    if (!child) {
        free(s->rules);
        free(s);
        return -1;
    }
    n->opaque = s;
    n->file = child;
    n->size = child->size;
    n->alignment = child->alignment;
    n->read_only = n->read_only || child->read_only;
    return 0;
}

static void fault_close(struct block_node *n)
{
    struct fault_state *s = n->opaque;

    free(s->rules);
    free(s);
}

/* The rule an operation op (enum block_op or OP_BLOCK_STATUS) on [offset, offset + len)
 * matches, or NULL to let it through. */
static const struct fault_rule *match(struct fault_state *s, int op, uint64_t offset,
                                      uint64_t len)
{
    for (size_t i = 0; i < s->nrules; i++) {
        struct fault_rule *r = &s->rules[i];
        /* "any" is any request: block status only by its name. */
        if (r->spent || (r->op >= 0 ? r->op != op : op == OP_BLOCK_STATUS))
            continue;
        if (op != BLOCK_OP_FLUSH &&
            (offset + len <= r->offset || offset >= r->offset + MIN(r->length,
                                                                    UINT64_MAX - r->offset)))
            continue;
        if (r->after > 0) {
            r->after--;
            continue;
        }
        if (r->once)
            r->spent = true;
        return r;
    }
    return NULL;
}

static void fault_child_done(struct block_req *child, int ret)
{
    struct fault_op *op = container_of(child, struct fault_op, child);
    struct block_req *parent = op->parent;

    free(op);
    parent->done(parent, ret);
}

/* Fail op's request with op->err, or pass it on if there is none (a delay rule). */
static void fault_go(struct loop *loop, void *opaque)
{
    struct fault_op *op = opaque;
    struct block_req *parent = op->parent;
    int err = op->err;

    if (!err) {
        op->child = *parent;
        op->child.done = fault_child_done;
        node_submit(op->node->file, &op->child);
        return;
    }
    free(op);
    parent->done(parent, -err);
}

static void fault_submit(struct block_node *n, struct block_req *req)
{
    const struct fault_rule *r = match(n->opaque, (int)req->op, req->offset, req->len);
    struct fault_op *op = xzalloc(sizeof(*op));

    op->node = n;
    op->parent = req;
    if (!r) {
        fault_go(n->graph->loop, op);  /* straight to the child */
        return;
    }
    op->err = r->err;
    if (r->delay_ms) {
        loop_add_timer(n->graph->loop, r->delay_ms * 1000000, fault_go, op);
        return;
    }
    op->fail_call = LOOP_DEFERRED_INIT(fault_go, op);
    loop_defer(n->graph->loop, &op->fail_call);
}

static int fault_block_status(struct block_node *n, struct block_status_call *c)
{
    const struct fault_rule *r = match(n->opaque, OP_BLOCK_STATUS, c->offset, c->len);

    if (r && r->err)
        return -r->err;
    block_status_pass(c, n->file, c->offset);
    return 0;
}

const struct block_driver block_driver_fault = {
    .name = "fault",
    .open = fault_open,
    .close = fault_close,
    .submit = fault_submit,
    .block_status = fault_block_status,
};
