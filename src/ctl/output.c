/* Output formats of thinblkctl. The readable one is for people; scripts use --raw, which
 * never loses anything the server said. */
#include "ctl/output.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "common/qjson.h"
#include "common/util.h"

/* v with every integer above INT64_MAX (boxed, common/qjson.h) as a double, which jansson
 * can print: the readable format rounds them, --raw prints what the server sent. A new
 * reference. */
static json_t *printable(json_t *v)
{
    const char *key;
    json_t *e, *copy;
    size_t i;

    if (qjson_is_big_uint64(v))
        return json_real((double)qjson_uint64(v));
    if (json_is_object(v)) {
        copy = json_object();
        json_object_foreach(v, key, e)
            json_object_set_new(copy, key, printable(e));
        return copy;
    }
    if (json_is_array(v)) {
        copy = json_array();
        json_array_foreach(v, i, e)
            json_array_append_new(copy, printable(e));
        return copy;
    }
    return json_incref(v);
}

/* Print v as JSON (flags for json_dumps) and a newline. */
static void print_json(json_t *v, size_t flags)
{
    json_t *p = printable(v);
    _cleanup_free_ char *s = json_dumps(p, flags | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER);
    json_decref(p);
    if (s)
        printf("%s\n", s);
}

static void print_message(const struct qmpc_message *msg, enum ctl_format fmt)
{
    if (fmt == CTL_FORMAT_RAW) {
        fwrite(msg->text, 1, msg->text_len, stdout);
        putchar('\n');
    } else {
        print_json(msg->json, JSON_INDENT(2));
    }
}

/* The return value for people: nothing for the usual empty object, a string as the text it
 * holds (human-monitor-command's output), anything else indented. */
static void print_return(json_t *ret)
{
    if (json_is_object(ret) && json_object_size(ret) == 0)
        return;
    if (json_is_string(ret)) {
        const char *s = json_string_value(ret);
        size_t len = json_string_length(ret);
        fwrite(s, 1, len, stdout);
        if (len > 0 && s[len - 1] != '\n')
            putchar('\n');
        return;
    }
    print_json(ret, JSON_INDENT(2));
}

void ctl_print_reply(const struct qmpc_message *reply, enum ctl_format fmt)
{
    if (fmt != CTL_FORMAT_READABLE)
        print_message(reply, fmt);
    else if (reply->kind == QMPC_MSG_RETURN)
        print_return(reply->ret);
    if (reply->kind == QMPC_MSG_ERROR) {
        fflush(stdout);
        fprintf(stderr, "thinblkctl: %s: %s\n", reply->error_class, reply->error_desc);
    }
}

void ctl_print_event(const struct qmpc_message *ev, enum ctl_format fmt)
{
    if (fmt != CTL_FORMAT_READABLE) {
        print_message(ev, fmt);
    } else {
        printf("%" PRId64 ".%06" PRId64 " %s", ev->seconds, ev->microseconds, ev->event);
        if (ev->data) {
            putchar(' ');
            print_json(ev->data, JSON_COMPACT);
        } else {
            putchar('\n');
        }
    }
    fflush(stdout);
}
