/* Argument and option checks from tables, with QEMU's error texts (its QAPI input visitor).
 *
 * An object type is an array of struct schema_member ending with an entry whose name is NULL,
 * in QEMU's schema order. A union is an object whose discriminator (an enum member) has
 * variants: the members of the variant its value selects follow the base members. One table
 * describes a command's arguments, a driver's options, an export type's: the QMP dispatcher,
 * the command line and the layers below share it, and a layer receives options already
 * checked. A new driver or export type adds a table, not a parser.
 *
 * The check walks members in schema order (base, then the variant's) and reports the first
 * problem; unexpected members come after, in QEMU's key order. Names are QEMU's: the full
 * path ("cache.direct", "options.size", "rules[0].op") in "is missing", "is unexpected",
 * "Invalid parameter type" and "expects"; the member's own name in "does not accept value"
 * and an alternate's type error (QEMU's enum and alternate visitors say so; a list element
 * has no name there: 'null').
 */
#ifndef THINBLK_COMMON_SCHEMA_H
#define THINBLK_COMMON_SCHEMA_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "common/error.h"

enum schema_type {
    SCHEMA_STR,
    SCHEMA_INT,     /* int64; with range_name, between min and max */
    SCHEMA_UINT64,  /* QEMU's uint64: negative integers accepted (they wrap, as in QEMU) */
    SCHEMA_BOOL,
    SCHEMA_ENUM,    /* a string from values */
    SCHEMA_OBJECT,  /* members, or any object if members is NULL */
    SCHEMA_ARRAY,   /* of element */
    SCHEMA_ALT,     /* QEMU's alternate: a string, an integer, an object (of members), null */
    SCHEMA_ANY,     /* any value: the layer checks it (its own texts) */
};

/* SCHEMA_ALT branches. */
#define SCHEMA_ALT_STR 1u
#define SCHEMA_ALT_OBJECT 2u
#define SCHEMA_ALT_NULL 4u
#define SCHEMA_ALT_INT 8u

struct schema_member;

/* A union's variant: the members a discriminator value adds. open: the variant's members are
 * not described here; any are accepted and the layer decides (QEMU's other drivers). */
struct schema_variant {
    const char *value;
    const struct schema_member *members;
    bool open;
};

struct schema_member {
    const char *name;
    enum schema_type type;
    bool optional;
    /* "does not accept value" and an alternate's type error name the full path, not the
     * member's own name: where thinblk's texts differ from QEMU's visitor (the fault
     * driver's rules say where in a list the bad value is). */
    bool full_name;
    const char *const *values;              /* ENUM: NULL-terminated; NULL: the variants' */
    /* ENUM as a union's discriminator: the variants, ending with value NULL. A value
     * without a variant adds no members. */
    const struct schema_variant *variants;
    const struct schema_member *members;    /* OBJECT, ALT's object branch; NULL: any */
    const struct schema_member *element;    /* ARRAY: each element (its name unused) */
    unsigned alt;                           /* ALT: SCHEMA_ALT_* */
    const char *alt_name;                   /* ALT: QEMU's name of the type ("BlockdevRef") */
    /* INT: if range_name is set, values outside [min, max] give "Parameter 'X' expects
     * RANGE_NAME" ("uint32"). */
    int64_t min, max;
    const char *range_name;
};

/* Check obj (borrowed; must be an object) against members. Returns 0, or -1 with *errp set
 * to QEMU's text for the first problem. */
int schema_check(const struct schema_member *members, json_t *obj, struct error **errp);

/* Give obj's string values (from key=value options, common/keyval.h) the types members
 * expects, in place: booleans from "on"/"off" (and QEMU's other spellings), integers from
 * numbers, lists from objects keyed "0", "1", ...; for ANY members, a number if the value
 * reads as one. Members the table does not know are left for schema_check(). Returns 0, or
 * -1 with *errp set ("Parameter 'X' expects 'on' or 'off'" / "... expects integer"). */
int schema_coerce(const struct schema_member *members, json_t *obj, struct error **errp);

#endif
