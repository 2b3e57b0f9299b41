/* QMP's JSON input: lexer, streamer and parser. See json-stream.h for the contract. */
#include "common/json-stream.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/qjson.h"
#include "common/utf8.h"
#include "common/util.h"
#include "common/vector.h"

enum tok_type {
    TOK_LCURLY, TOK_RCURLY, TOK_LSQUARE, TOK_RSQUARE, TOK_COLON, TOK_COMMA,
    TOK_INTEGER, TOK_FLOAT, TOK_KEYWORD, TOK_STRING, TOK_ERROR,
};

/* Lexer states. The number states follow RFC 8259's grammar; strings may also be single-quoted,
 * as QEMU allows. */
enum lex_state {
    LEX_START,
    LEX_DQ, LEX_DQ_ESC, LEX_SQ, LEX_SQ_ESC,
    LEX_NEG, LEX_ZERO, LEX_INT, LEX_DOT, LEX_FRAC, LEX_EXP, LEX_EXP_SIGN, LEX_EXP_DIGITS,
    LEX_KEYWORD,
    LEX_RECOVERY,
};

struct token {
    enum tok_type type;
    size_t off;  /* into json_stream.text */
    size_t len;
};

DEFINE_VECTOR_TYPE(token_vector, struct token)

struct json_stream {
    struct buf in;        /* queued input; in.data[in_pos..in.len) not yet lexed */
    size_t in_pos;

    enum lex_state state;
    struct buf tok;       /* the token being lexed (not kept while skipping) */

    /* The message being collected: its tokens, their text back to back. */
    token_vector tokens;
    struct buf text;
    size_t size;           /* bytes of the tokens (text also has a NUL after each) */
    int braces, brackets;  /* open minus closed, as QEMU counts them */

    bool skipping;         /* past a limit: drop tokens until the message ends */

    /* The message completed by the last token, for json_stream_next() to return. */
    json_t *ready_value;
    struct error *ready_err;
    bool ready;
};

struct json_stream *json_stream_new(void)
{
    return xzalloc(sizeof(struct json_stream));
}

static void message_reset(struct json_stream *js)
{
    js->tokens.len = 0;
    js->size = 0;
    buf_reset(&js->text);
    js->braces = js->brackets = 0;
    /* Keep memory bounded by typical messages, not by the largest one ever seen. */
    if (js->text.cap > 65536)
        buf_free(&js->text);
    if (js->tok.len == 0 && js->tok.cap > 65536)
        buf_free(&js->tok);
    if (js->tokens.cap > 4096)
        token_vector_reset(&js->tokens);
}

void json_stream_free(struct json_stream *js)
{
    if (!js)
        return;
    buf_free(&js->in);
    buf_free(&js->tok);
    buf_free(&js->text);
    token_vector_reset(&js->tokens);
    json_decref(js->ready_value);
    error_free(js->ready_err);
    free(js);
}

void json_stream_feed(struct json_stream *js, const void *data, size_t len)
{
    if (js->in_pos > 0 && js->in_pos == js->in.len) {
        buf_reset(&js->in);
        js->in_pos = 0;
    }
    buf_append(&js->in, data, len);
}

size_t json_stream_pending(const struct json_stream *js)
{
    return js->in.len - js->in_pos + js->text.len + js->tok.len;
}

/* ---- parser: one message's tokens to a value ---- */

struct parser {
    struct json_stream *js;
    size_t pos;
    struct error *err;  /* the first error wins, as in QEMU */
};

static void parse_error(struct parser *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void parse_error(struct parser *p, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    if (p->err)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    error_setg(&p->err, "JSON parse error, %s", msg);
}

static const struct token *peek(struct parser *p)
{
    return p->pos < p->js->tokens.len ? &p->js->tokens.ptr[p->pos] : NULL;
}

static const struct token *pop(struct parser *p)
{
    return p->pos < p->js->tokens.len ? &p->js->tokens.ptr[p->pos++] : NULL;
}

static const char *tok_text(struct parser *p, const struct token *t)
{
    return p->js->text.data + t->off;
}

static int hex4(const char *s)
{
    int v = 0;

    for (int i = 0; i < 4; i++) {
        int c = (unsigned char)s[i], d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static size_t utf8_encode(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static json_t *parse_string(struct parser *p, const struct token *t)
{
    const char *s = tok_text(p, t);
    const char *end = s + t->len - 1;  /* the closing quote */
    struct buf out = { 0 };
    json_t *v;

    for (s++; s < end;) {
        if (*s != '\\') {
            size_t n = utf8_seq_len((const unsigned char *)s, (size_t)(end - s));
            if (n == 0) {
                parse_error(p, "invalid UTF-8 sequence in string");
                goto fail;
            }
            buf_append(&out, s, n);
            s += n;
            continue;
        }
        char c = s[1], ch[4];
        const char *esc = s;
        s += 2;
        switch (c) {
        case 'b': buf_append(&out, "\b", 1); break;
        case 'f': buf_append(&out, "\f", 1); break;
        case 'n': buf_append(&out, "\n", 1); break;
        case 'r': buf_append(&out, "\r", 1); break;
        case 't': buf_append(&out, "\t", 1); break;
        case 'u': {
            int cp = end - s >= 4 ? hex4(s) : -1;
            int lo = -1;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                lo = end - s >= 10 && s[4] == '\\' && s[5] == 'u' ? hex4(s + 6) : -1;
                if (lo >= 0xDC00 && lo <= 0xDFFF)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (cp < 0 || (cp >= 0xD800 && cp <= 0xDFFF)) {
                /* QEMU's words, quoting the escape (at most "\uXXXX"). */
                int n = (int)MIN(end - esc, 6);
                parse_error(p, "%.*s is not a valid Unicode character", n, esc);
                goto fail;
            }
            s += cp >= 0x10000 ? 10 : 4;
            if (cp == 0) {
                parse_error(p, "\\u0000 is not supported");
                goto fail;
            }
            buf_append(&out, ch, utf8_encode(ch, (uint32_t)cp));
            break;
        }
        case '"': case '\'': case '\\': case '/':
            buf_append(&out, &c, 1);
            break;
        default:
            parse_error(p, "invalid escape sequence in string");
            goto fail;
        }
    }
    v = json_stringn_nocheck(out.len ? out.data : "", out.len);
    buf_free(&out);
    return v;
fail:
    buf_free(&out);
    return NULL;
}

static json_t *parse_number(struct parser *p, const struct token *t)
{
    const char *s = tok_text(p, t);

    if (t->type == TOK_INTEGER) {
        errno = 0;
        long long v = strtoll(s, NULL, 10);
        if (errno == 0)
            return json_integer(v);
        if (s[0] != '-') {
            errno = 0;
            unsigned long long u = strtoull(s, NULL, 10);
            if (errno == 0)
                return qjson_uint64_new(u);
        }
    }
    /* Beyond uint64, or a float: a double, as in QEMU. */
    return json_real(strtod(s, NULL));
}

static json_t *parse_value(struct parser *p);

static json_t *parse_object(struct parser *p)
{
    json_t *obj = json_object();
    const struct token *t;

    pop(p); /* { */
    t = peek(p);
    if (t && t->type == TOK_RCURLY) {
        pop(p);
        return obj;
    }
    for (;;) {
        t = peek(p);
        if (!t) {
            parse_error(p, "premature EOI");
            goto fail;
        }
        json_t *key = parse_value(p);
        if (!key || !json_is_string(key)) {
            json_decref(key);
            parse_error(p, "key is not a string in object");
            goto fail;
        }
        t = pop(p);
        if (!t || t->type != TOK_COLON) {
            json_decref(key);
            parse_error(p, t ? "missing : in object pair" : "premature EOI");
            goto fail;
        }
        json_t *val = parse_value(p);
        if (!val) {
            json_decref(key);
            parse_error(p, "Missing value in dict");
            goto fail;
        }
        if (json_object_getn(obj, json_string_value(key), json_string_length(key))) {
            json_decref(key);
            json_decref(val);
            parse_error(p, "duplicate key");
            goto fail;
        }
        json_object_setn_new_nocheck(obj, json_string_value(key), json_string_length(key), val);
        json_decref(key);

        t = pop(p);
        if (!t) {
            parse_error(p, "premature EOI");
            goto fail;
        }
        if (t->type == TOK_RCURLY)
            return obj;
        if (t->type != TOK_COMMA) {
            parse_error(p, "expected separator in dict");
            goto fail;
        }
    }
fail:
    json_decref(obj);
    return NULL;
}

static json_t *parse_array(struct parser *p)
{
    json_t *arr = json_array();
    const struct token *t;

    pop(p); /* [ */
    t = peek(p);
    if (t && t->type == TOK_RSQUARE) {
        pop(p);
        return arr;
    }
    for (;;) {
        json_t *v = parse_value(p);
        if (!v) {
            parse_error(p, "expecting value");
            goto fail;
        }
        json_array_append_new(arr, v);
        t = pop(p);
        if (!t) {
            parse_error(p, "premature EOI");
            goto fail;
        }
        if (t->type == TOK_RSQUARE)
            return arr;
        if (t->type != TOK_COMMA) {
            parse_error(p, "expected separator in list");
            goto fail;
        }
    }
fail:
    json_decref(arr);
    return NULL;
}

static json_t *parse_value(struct parser *p)
{
    const struct token *t = peek(p);

    if (!t) {
        parse_error(p, "premature EOI");
        return NULL;
    }
    switch (t->type) {
    case TOK_LCURLY:
        return parse_object(p);
    case TOK_LSQUARE:
        return parse_array(p);
    case TOK_STRING:
        return parse_string(p, pop(p));
    case TOK_INTEGER:
    case TOK_FLOAT:
        return parse_number(p, pop(p));
    case TOK_KEYWORD: {
        const char *s = tok_text(p, pop(p));
        if (strcmp(s, "true") == 0)
            return json_true();
        if (strcmp(s, "false") == 0)
            return json_false();
        if (strcmp(s, "null") == 0)
            return json_null();
        parse_error(p, "invalid keyword '%s'", s);
        return NULL;
    }
    default:
        parse_error(p, "expecting value");
        return NULL;
    }
}

/* ---- streamer: collect tokens until a message is complete ---- */

static void emit(struct json_stream *js, json_t *value, struct error *err)
{
    js->ready_value = value;
    js->ready_err = err;
    js->ready = true;
}

static void emit_error(struct json_stream *js, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void emit_error(struct json_stream *js, const char *fmt, ...)
{
    struct error *err = NULL;
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    error_setg(&err, "%s", msg);
    emit(js, NULL, err);
}

static void parse_message(struct json_stream *js)
{
    struct parser p = { .js = js };
    json_t *v = parse_value(&p);

    /* A message ends when the brackets balance, so tokens are left over only when a closing
     * bracket came too early, e.g. "1 }". */
    if (v && p.pos != js->tokens.len) {
        json_decref(v);
        v = NULL;
        parse_error(&p, "expecting value");
    }
    if (!v && !p.err)
        parse_error(&p, "expecting value");
    emit(js, v, v ? NULL : p.err);
    if (v)
        error_free(p.err);
    message_reset(js);
}

static void token_done(struct json_stream *js, enum tok_type type)
{
    int delta = type == TOK_LCURLY || type == TOK_LSQUARE ? 1
              : type == TOK_RCURLY || type == TOK_RSQUARE ? -1 : 0;

    if (js->skipping) {
        /* Past a limit: only follow the nesting, to find where the message ends. */
        if (type != TOK_ERROR) {
            js->braces += delta;
            if (js->braces <= 0) {
                js->skipping = false;
                js->braces = 0;
            }
        }
        buf_reset(&js->tok);
        return;
    }

    if (type == TOK_ERROR) {
        buf_append(&js->tok, "", 1);
        emit_error(js, "JSON parse error, stray '%s'", js->tok.data);
        buf_reset(&js->tok);
        message_reset(js);
        return;
    }

    if (type == TOK_LCURLY || type == TOK_RCURLY)
        js->braces += delta;
    else if (type == TOK_LSQUARE || type == TOK_RSQUARE)
        js->brackets += delta;

    token_vector_append(&js->tokens, (struct token){ type, js->text.len, js->tok.len });
    js->size += js->tok.len;
    buf_append(&js->text, js->tok.data, js->tok.len);
    buf_append(&js->text, "", 1);  /* each token's text is NUL-terminated */
    buf_reset(&js->tok);

    const char *limit = NULL;
    if (js->braces + js->brackets > JSON_STREAM_MAX_DEPTH)
        limit = "JSON nesting depth limit exceeded";
    else if (js->size >= JSON_STREAM_MAX_SIZE)  /* QEMU's boundary: 64 MiB is one too many */
        limit = "JSON token size limit exceeded";
    else if (js->tokens.len > JSON_STREAM_MAX_TOKENS)
        limit = "JSON token count limit exceeded";
    if (limit) {
        int open = js->braces + js->brackets;
        emit_error(js, "%s", limit);
        message_reset(js);
        js->skipping = open > 0;
        js->braces = open;
        return;
    }

    if (js->braces < 0 || js->brackets < 0 || (js->braces == 0 && js->brackets == 0))
        parse_message(js);
}

/* ---- lexer ---- */

static bool is_digit(int c) { return c >= '0' && c <= '9'; }

/* Feed one byte. Returns false if the byte was not consumed (it ended the token before it and
 * must be fed again). */
static bool lex_byte(struct json_stream *js, unsigned char c)
{
    /* The token being lexed counts towards the message size limit too: a client must not make
     * us hold more than the limit by never closing a string. */
    if (!js->skipping && js->tok.len + js->size >= JSON_STREAM_MAX_SIZE) {
        int open = js->braces + js->brackets;
        emit_error(js, "JSON token size limit exceeded");
        buf_reset(&js->tok);
        message_reset(js);
        js->skipping = true;  /* until the current token ends and the brackets close */
        js->braces = open;
    }
    bool keep = !js->skipping;

#define TAKE() do { if (keep) buf_append(&js->tok, &c, 1); } while (0)

    switch (js->state) {
    case LEX_START:
        switch (c) {
        case ' ': case '\t': case '\r': case '\n':
            return true;
        case '{': TAKE(); token_done(js, TOK_LCURLY); return true;
        case '}': TAKE(); token_done(js, TOK_RCURLY); return true;
        case '[': TAKE(); token_done(js, TOK_LSQUARE); return true;
        case ']': TAKE(); token_done(js, TOK_RSQUARE); return true;
        case ':': TAKE(); token_done(js, TOK_COLON); return true;
        case ',': TAKE(); token_done(js, TOK_COMMA); return true;
        case '"': TAKE(); js->state = LEX_DQ; return true;
        case '\'': TAKE(); js->state = LEX_SQ; return true;
        case '-': TAKE(); js->state = LEX_NEG; return true;
        case '0': TAKE(); js->state = LEX_ZERO; return true;
        default:
            TAKE();
            if (c >= '1' && c <= '9') {
                js->state = LEX_INT;
            } else if (c >= 'a' && c <= 'z') {
                js->state = LEX_KEYWORD;
            } else {
                js->state = LEX_RECOVERY;
                token_done(js, TOK_ERROR);
            }
            return true;
        }

    case LEX_DQ:
    case LEX_SQ: {
        bool dq = js->state == LEX_DQ;
        TAKE();
        if (c == (dq ? '"' : '\'')) {
            js->state = LEX_START;
            token_done(js, TOK_STRING);
        } else if (c == '\\') {
            js->state = dq ? LEX_DQ_ESC : LEX_SQ_ESC;
        } else if (c < 0x20 || c >= 0xFE) {
            /* Control characters must be escaped, and 0xFE/0xFF are the bytes a client sends
             * to resynchronise: both end the string as an error, as in QEMU. Other bad UTF-8
             * is left to the parser, which names it. */
            js->state = LEX_RECOVERY;
            token_done(js, TOK_ERROR);
        }
        return true;
    }

    case LEX_DQ_ESC:
    case LEX_SQ_ESC:
        TAKE();
        if (c >= 0x20 && c < 0xFE) {
            /* Any escape letter: the parser says which are invalid. */
            js->state = js->state == LEX_DQ_ESC ? LEX_DQ : LEX_SQ;
        } else {
            js->state = LEX_RECOVERY;
            token_done(js, TOK_ERROR);
        }
        return true;

    case LEX_NEG:
        TAKE();
        if (c == '0') {
            js->state = LEX_ZERO;
        } else if (is_digit(c)) {
            js->state = LEX_INT;
        } else {
            js->state = LEX_RECOVERY;
            token_done(js, TOK_ERROR);
        }
        return true;

    case LEX_ZERO:
    case LEX_INT:
        if (js->state == LEX_ZERO && is_digit(c)) {
            TAKE();  /* a leading zero: "01" is not a number */
            js->state = LEX_RECOVERY;
            token_done(js, TOK_ERROR);
            return true;
        }
        if (js->state == LEX_INT && is_digit(c)) {
            TAKE();
            return true;
        }
        if (c == '.') {
            TAKE();
            js->state = LEX_DOT;
            return true;
        }
        if (c == 'e' || c == 'E') {
            TAKE();
            js->state = LEX_EXP;
            return true;
        }
        js->state = LEX_START;
        token_done(js, TOK_INTEGER);
        return false;

    case LEX_DOT:
    case LEX_EXP:
    case LEX_EXP_SIGN:
        TAKE();
        if (is_digit(c)) {
            js->state = js->state == LEX_DOT ? LEX_FRAC : LEX_EXP_DIGITS;
        } else if (js->state == LEX_EXP && (c == '+' || c == '-')) {
            js->state = LEX_EXP_SIGN;
        } else {
            js->state = LEX_RECOVERY;
            token_done(js, TOK_ERROR);
        }
        return true;

    case LEX_FRAC:
    case LEX_EXP_DIGITS:
        if (is_digit(c)) {
            TAKE();
            return true;
        }
        if (js->state == LEX_FRAC && (c == 'e' || c == 'E')) {
            TAKE();
            js->state = LEX_EXP;
            return true;
        }
        js->state = LEX_START;
        token_done(js, TOK_FLOAT);
        return false;

    case LEX_KEYWORD:
        if (c >= 'a' && c <= 'z') {
            TAKE();
            return true;
        }
        js->state = LEX_START;
        token_done(js, TOK_KEYWORD);
        return false;

    case LEX_RECOVERY:
        /* Skip to a point where a new token surely starts (QEMU's resynchronisation). */
        if (c == '{' || c == '}' || c == '[' || c == ']' || (c < 0x20 && c != '\t') ||
            c >= 0xFE) {
            js->state = LEX_START;
            return false;
        }
        return true;
    }
#undef TAKE
    return true;
}

int json_stream_next(struct json_stream *js, json_t **value, struct error **err)
{
    *value = NULL;
    *err = NULL;
    while (!js->ready && js->in_pos < js->in.len) {
        if (lex_byte(js, (unsigned char)js->in.data[js->in_pos]))
            js->in_pos++;
    }
    if (!js->ready)
        return 0;
    *value = js->ready_value;
    *err = js->ready_err;
    js->ready_value = NULL;
    js->ready_err = NULL;
    js->ready = false;
    return 1;
}

json_t *json_stream_parse(const char *text, size_t len, struct error **errp)
{
    struct json_stream *js = json_stream_new();
    json_t *v = NULL, *extra = NULL;
    struct error *err = NULL;

    json_stream_feed(js, text, len);
    /* A trailing number or keyword is only finished by the byte after it. */
    json_stream_feed(js, " ", 1);
    if (json_stream_next(js, &v, &err) == 0) {
        error_setg(&err, "JSON parse error, premature EOI");
    } else if (v && (json_stream_next(js, &extra, &err) == 1 || json_stream_pending(js) > 0)) {
        json_decref(extra);
        error_free(err);
        err = NULL;
        json_decref(v);
        v = NULL;
        error_setg(&err, "JSON parse error, expected end of input");
    }
    json_stream_free(js);
    if (!v)
        error_propagate(errp, err);
    return v;
}
