/* The fault injection driver's run-time interface (see fault.c for its options). */
#ifndef THINBLK_BLOCK_FAULT_H
#define THINBLK_BLOCK_FAULT_H

#include <stddef.h>

#include <jansson.h>

#include "common/error.h"
#include "common/schema.h"

struct block_node;
struct fault_rule;

/* One rule of the "rules" option, as a list element (for __org.thinblk_fault-set's table). */
extern const struct schema_member fault_rule;

/* Replace the rules of fault node n with rules (borrowed JSON array as in the "rules" option,
 * checked against fault_rule; NULL or [] clears them). Returns 0, or -1 with *errp set (n is
 * unchanged). */
int fault_set_rules(struct block_node *n, json_t *rules, struct error **errp);

/* Parse rules (checked) into a new array (*out, caller frees) of *n rules. Returns 0 or -1
 * with *errp set (an errno that is no errno). */
int fault_parse_rules(json_t *rules, struct fault_rule **out, size_t *n, struct error **errp);

#endif
