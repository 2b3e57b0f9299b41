/* The "fault" filter driver: fail chosen requests with a chosen errno, for tests.
 *
 * In the spirit of QEMU's blkdebug: over any child, a list of rules, each making matching
 * requests fail without reaching the child. Options: file (the child) and rules, a list of
 *   {"op": "read"|"write"|"flush"|"discard"|"write-zeroes"|"any",
 *    "errno": "ENOSPC" (a name or a number),
 *    "offset": N, "length": N   (only requests overlapping [offset, offset+length);
 *                                length defaults to the rest of the node),
 *    "after": N                 (let the first N matching requests through),
 *    "once": BOOL               (fail one request, then the rule is spent; default false:
 *                                fail until the rules are replaced)}
 * Rules are checked in order; the first that fails a request wins. The rule list can be
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
    bool once;
    bool spent;
};

struct fault_state {
    struct fault_rule *rules;
    size_t nrules;
};

struct fault_op {
    struct loop_deferred fail_call;  /* failing later, never inside node_submit() */
    struct block_req child;
    struct block_req *parent;
    int err;
};

static const char *const op_names[] = {
    [BLOCK_OP_READ] = "read", [BLOCK_OP_WRITE] = "write", [BLOCK_OP_FLUSH] = "flush",
    [BLOCK_OP_DISCARD] = "discard", [BLOCK_OP_WRITE_ZEROES] = "write-zeroes",
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

static int parse_uint(json_t *rule, const char *key, uint64_t *out, struct error **errp)
{
    json_t *v = json_object_get(rule, key);

    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0) {
        error_setg(errp, "Parameter 'rules.%s' expects uint64", key);
        return -1;
    }
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

int fault_parse_rules(json_t *rules, struct fault_rule **out, size_t *n, struct error **errp)
{
    size_t i;
    json_t *r;

    *out = NULL;
    *n = 0;
    if (!rules)
        return 0;
    if (!json_is_array(rules)) {
        error_setg(errp, "Invalid parameter type for 'rules', expected: array");
        return -1;
    }
    struct fault_rule *list = xzalloc((json_array_size(rules) + 1) * sizeof(*list));
    json_array_foreach(rules, i, r) {
        struct fault_rule *fr = &list[i];
        const char *key;
        json_t *v;
        if (!json_is_object(r)) {
            error_setg(errp, "Invalid parameter type for 'rules[%zu]', expected: object", i);
            goto fail;
        }
        json_object_foreach(r, key, v) {
            if (strcmp(key, "op") && strcmp(key, "errno") && strcmp(key, "offset") &&
                strcmp(key, "length") && strcmp(key, "after") && strcmp(key, "once")) {
                error_setg(errp, "Parameter 'rules[%zu].%s' is unexpected", i, key);
                goto fail;
            }
        }
        fr->op = -1;
        const char *op = json_string_value(json_object_get(r, "op"));
        if (op && strcmp(op, "any") != 0) {
            for (size_t k = 0; k < ARRAY_SIZE(op_names); k++) {
                if (strcmp(op, op_names[k]) == 0)
                    fr->op = (int)k;
            }
            if (fr->op < 0) {
                error_setg(errp, "Parameter 'rules[%zu].op' does not accept value '%s'", i, op);
                goto fail;
            }
        } else if (!op && json_object_get(r, "op")) {
            error_setg(errp, "Invalid parameter type for 'rules[%zu].op', expected: string", i);
            goto fail;
        }
        if (!json_object_get(r, "errno")) {
            error_setg(errp, "Parameter 'rules[%zu].errno' is missing", i);
            goto fail;
        }
        fr->err = parse_errno(json_object_get(r, "errno"), errp);
        if (fr->err < 0)
            goto fail;
        fr->length = UINT64_MAX;
        if (parse_uint(r, "offset", &fr->offset, errp) < 0 ||
            parse_uint(r, "length", &fr->length, errp) < 0 ||
            parse_uint(r, "after", &fr->after, errp) < 0)
            goto fail;
        json_t *once = json_object_get(r, "once");
        if (once && !json_is_boolean(once)) {
            error_setg(errp, "Invalid parameter type for 'rules[%zu].once', expected: boolean", i);
            goto fail;
        }
        fr->once = json_is_true(once);
    }
    *out = list;
    *n = json_array_size(rules);
    return 0;
fail:
    free(list);
    return -1;
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
    child = block_node_open_child(n->graph, json_object_get(opts, "file"), "file", errp);
    if (!child) {
        free(s->rules);
        free(s);
        return -1;
    }
    json_object_del(opts, "rules");
    json_object_del(opts, "file");
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

/* The errno to fail req with, or 0 to let it through. */
static int match(struct fault_state *s, const struct block_req *req)
{
    for (size_t i = 0; i < s->nrules; i++) {
        struct fault_rule *r = &s->rules[i];
        if (r->spent || (r->op >= 0 && r->op != (int)req->op))
            continue;
        if (req->op != BLOCK_OP_FLUSH &&
            (req->offset + req->len <= r->offset || req->offset >= r->offset + MIN(r->length,
                                                                    UINT64_MAX - r->offset)))
            continue;
        if (r->after > 0) {
            r->after--;
            continue;
        }
        if (r->once)
            r->spent = true;
        return r->err;
    }
    return 0;
}

static void fault_failed(struct loop *loop, void *opaque)
{
    struct fault_op *op = opaque;
    struct block_req *parent = op->parent;
    int err = op->err;

    free(op);
    parent->done(parent, -err);
}

static void fault_child_done(struct block_req *child, int ret)
{
    struct fault_op *op = container_of(child, struct fault_op, child);
    struct block_req *parent = op->parent;

    free(op);
    parent->done(parent, ret);
}

static void fault_submit(struct block_node *n, struct block_req *req)
{
    struct fault_op *op = xzalloc(sizeof(*op));

    op->parent = req;
    op->err = match(n->opaque, req);
    if (op->err) {
        op->fail_call = LOOP_DEFERRED_INIT(fault_failed, op);
        loop_defer(n->graph->loop, &op->fail_call);
        return;
    }
    op->child = *req;
    op->child.done = fault_child_done;
    node_submit(n->file, &op->child);
}

const struct block_driver block_driver_fault = {
    .name = "fault",
    .open = fault_open,
    .close = fault_close,
    .submit = fault_submit,
};
