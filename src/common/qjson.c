/* JSON as QEMU has it. See qjson.h. */
#include "common/qjson.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "common/utf8.h"

/* QEMU's qdict.c hashes keys with tdb_hash() into 512 buckets, inserts at the head of a
 * bucket's list and iterates bucket by bucket: members come out in bucket order, and within
 * a bucket the last inserted first. */
#define QDICT_BUCKETS 512

static unsigned qdict_bucket(const char *key)
{
    uint32_t value = 0x238F13AFu * (uint32_t)strlen(key);

    for (unsigned i = 0; key[i]; i++)
        value += (uint32_t)(unsigned char)key[i] << (i * 5 % 24);
    return (1103515243u * value + 12345u) % QDICT_BUCKETS;
}

struct member {
    const char *key;
    json_t *value;
    unsigned bucket;
    size_t index;  /* insertion order */
};

static int member_cmp(const void *a, const void *b)
{
    const struct member *x = a, *y = b;

    if (x->bucket != y->bucket)
        return x->bucket < y->bucket ? -1 : 1;
    return x->index > y->index ? -1 : x->index < y->index;
}

const char **qjson_keys(json_t *obj, size_t *n)
{
    size_t count = json_object_size(obj), i = 0;
    struct member *m = xmalloc((count + 1) * sizeof(*m));
    const char **keys = xmalloc((count + 1) * sizeof(*keys));
    const char *key;
    json_t *value;

    json_object_foreach(obj, key, value) {
        m[i] = (struct member){ key, value, qdict_bucket(key), i };
        i++;
    }
    qsort(m, count, sizeof(*m), member_cmp);
    for (i = 0; i < count; i++)
        keys[i] = m[i].key;
    free(m);
    *n = count;
    return keys;
}

static void put(struct buf *out, const char *s)
{
    buf_append(out, s, strlen(s));
}

static void newline(struct buf *out, int level)
{
    put(out, "\r\n");
    for (int i = 0; i < level; i++)
        put(out, "    ");
}

static uint32_t utf8_decode(const unsigned char **p)
{
    const unsigned char *s = *p;
    uint32_t cp;
    int n;

    /* jansson strings are valid UTF-8, so no checks beyond the lead byte. */
    if (s[0] < 0x80)
        cp = s[0], n = 1;
    else if (s[0] < 0xE0)
        cp = s[0] & 0x1F, n = 2;
    else if (s[0] < 0xF0)
        cp = s[0] & 0x0F, n = 3;
    else
        cp = s[0] & 0x07, n = 4;
    for (int i = 1; i < n; i++)
        cp = (cp << 6) | (s[i] & 0x3F);
    *p = s + n;
    return cp;
}

static void write_string(struct buf *out, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + len;
    char esc[16];

    put(out, "\"");
    while (p < end) {
        const unsigned char *run = p;
        while (p < end && *p >= 0x20 && *p < 0x7F && *p != '"' && *p != '\\')
            p++;
        buf_append(out, run, (size_t)(p - run));
        if (p == end)
            break;
        uint32_t cp = utf8_decode(&p);
        switch (cp) {
        case '"': put(out, "\\\""); break;
        case '\\': put(out, "\\\\"); break;
        case '\b': put(out, "\\b"); break;
        case '\f': put(out, "\\f"); break;
        case '\n': put(out, "\\n"); break;
        case '\r': put(out, "\\r"); break;
        case '\t': put(out, "\\t"); break;
        default:
            if (cp > 0xFFFF) {
                cp -= 0x10000;
                snprintf(esc, sizeof(esc), "\\u%04X\\u%04X", 0xD800 + (cp >> 10),
                         0xDC00 + (cp & 0x3FF));
            } else {
                snprintf(esc, sizeof(esc), "\\u%04X", cp);
            }
            put(out, esc);
        }
    }
    put(out, "\"");
}

static void write_value(struct buf *out, json_t *v, bool pretty, int level);

static void write_object(struct buf *out, json_t *v, bool pretty, int level)
{
    size_t n = json_object_size(v), i = 0;
    struct member stack[16];
    struct member *m = n <= ARRAY_SIZE(stack) ? stack : xmalloc(n * sizeof(*m));
    const char *key;
    json_t *value;

    json_object_foreach(v, key, value) {
        m[i] = (struct member){ key, value, qdict_bucket(key), i };
        i++;
    }
    qsort(m, n, sizeof(*m), member_cmp);

    put(out, "{");
    for (i = 0; i < n; i++) {
        if (i > 0)
            put(out, pretty ? "," : ", ");
        if (pretty)
            newline(out, level + 1);
        write_string(out, m[i].key, strlen(m[i].key));
        put(out, ": ");
        write_value(out, m[i].value, pretty, level + 1);
    }
    /* QEMU writes an empty object in pretty form over two lines too. */
    if (pretty)
        newline(out, level);
    put(out, "}");
    if (m != stack)
        free(m);
}

static void write_array(struct buf *out, json_t *v, bool pretty, int level)
{
    size_t i;
    json_t *value;

    put(out, "[");
    json_array_foreach(v, i, value) {
        if (i > 0)
            put(out, pretty ? "," : ", ");
        if (pretty)
            newline(out, level + 1);
        write_value(out, value, pretty, level + 1);
    }
    if (pretty)
        newline(out, level);
    put(out, "]");
}

static void write_value(struct buf *out, json_t *v, bool pretty, int level)
{
    char num[64];

    switch (json_typeof(v)) {
    case JSON_OBJECT:
        if (qjson_is_big_uint64(v)) {
            snprintf(num, sizeof(num), "%" PRIu64, qjson_uint64(v));
            put(out, num);
        } else {
            write_object(out, v, pretty, level);
        }
        break;
    case JSON_ARRAY:
        write_array(out, v, pretty, level);
        break;
    case JSON_STRING:
        write_string(out, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER:
        snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        put(out, num);
        break;
    case JSON_REAL:
        snprintf(num, sizeof(num), "%.17g", json_real_value(v));
        put(out, num);
        break;
    case JSON_TRUE:
        put(out, "true");
        break;
    case JSON_FALSE:
        put(out, "false");
        break;
    case JSON_NULL:
        put(out, "null");
        break;
    }
}

void qjson_write(struct buf *out, json_t *v, bool pretty)
{
    write_value(out, v, pretty, 0);
}

json_t *qjson_string_sanitized(const char *s)
{
    json_t *v = json_string(s);

    if (!v) {
        char *clean = utf8_sanitize(s);
        v = json_string(clean);
        free(clean);
    }
    return v;
}

/* The box's key: 0xFF never occurs in UTF-8, and the monitor's lexer rejects it. */
static const char big_key[] = "\xffuint64";

json_t *qjson_uint64_new(uint64_t v)
{
    if (v <= INT64_MAX)
        return json_integer((json_int_t)v);
    json_t *box = json_object();
    json_object_set_new_nocheck(box, big_key, json_integer((json_int_t)v));
    return box;
}

bool qjson_is_big_uint64(const json_t *v)
{
    return json_is_object(v) && json_object_size(v) == 1 &&
           json_is_integer(json_object_get(v, big_key));
}

bool qjson_is_object(const json_t *v)
{
    return json_is_object(v) && !qjson_is_big_uint64(v);
}

bool qjson_is_uint64(const json_t *v)
{
    return json_is_integer(v) || qjson_is_big_uint64(v);
}

uint64_t qjson_uint64(const json_t *v)
{
    if (qjson_is_big_uint64(v))
        v = json_object_get(v, big_key);
    return (uint64_t)json_integer_value(v);
}
