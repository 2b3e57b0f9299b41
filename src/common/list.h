/* Typed intrusive lists: the element carries the links, the list only points at it, nothing
 * here allocates or blocks. Two shapes:
 *
 *   DEFINE_QUEUE_TYPE(req_queue, struct req, next)   a singly-linked FIFO (head and last):
 *       O(1) push at either end and pop at the head; remove is O(n). struct req has a
 *       `struct req *next` field.
 *   DEFINE_LIST_TYPE(conn_list, struct conn, prev, next)   a doubly-linked list (head and
 *       last): O(1) push at either end and remove of any element.
 *
 *     req_queue q = {0};               // {0} is the empty list; an empty list may be copied
 *     req_queue_push(&q, r);
 *     for (struct req *x = q.head; x; x = x->next) ...
 *     while ((r = req_queue_pop(&q))) ...
 *
 * DECLARE_LIST_HEAD(name, type) and DEFINE_QUEUE_FUNCTIONS / DEFINE_LIST_FUNCTIONS split the
 * same in two, for a list type needed before its element type is complete.
 *
 * An element is on at most one list through a given link field at a time; the caller keeps
 * track of which (the list does not). Popped or removed elements have their links cleared.
 */
#ifndef THINBLK_LIST_H
#define THINBLK_LIST_H

#include <stdbool.h>
#include <stddef.h>

/* The list's own type alone, where the element type is not complete yet (a struct that holds
 * a list of elements declared after it); DEFINE_*_FUNCTIONS follow once it is. */
#define DECLARE_LIST_HEAD(name, type)                                                      \
    typedef struct {                                                                       \
        type *head, *last;                                                                 \
    } name;

#define DEFINE_QUEUE_TYPE(name, type, next)                                                \
    DECLARE_LIST_HEAD(name, type)                                                          \
    DEFINE_QUEUE_FUNCTIONS(name, type, next)

#define DEFINE_LIST_TYPE(name, type, prev, next)                                           \
    DECLARE_LIST_HEAD(name, type)                                                          \
    DEFINE_LIST_FUNCTIONS(name, type, prev, next)

#define DEFINE_QUEUE_FUNCTIONS(name, type, next)                                           \
    static inline __attribute__((unused)) bool name##_empty(const name *q)                 \
    {                                                                                      \
        return !q->head;                                                                   \
    }                                                                                      \
    /* Append x at the end. */                                                             \
    static inline __attribute__((unused)) void name##_push(name *q, type *x)               \
    {                                                                                      \
        x->next = NULL;                                                                    \
        if (q->last)                                                                       \
            q->last->next = x;                                                             \
        else                                                                               \
            q->head = x;                                                                   \
        q->last = x;                                                                       \
    }                                                                                      \
    /* Insert x at the front. */                                                           \
    static inline __attribute__((unused)) void name##_push_head(name *q, type *x)          \
    {                                                                                      \
        x->next = q->head;                                                                 \
        q->head = x;                                                                       \
        if (!q->last)                                                                      \
            q->last = x;                                                                   \
    }                                                                                      \
    /* Insert x after pos, an element of q (pos NULL: at the front). */                    \
    static inline __attribute__((unused)) void name##_insert_after(name *q, type *pos,     \
                                                                   type *x)                \
    {                                                                                      \
        if (!pos) {                                                                        \
            name##_push_head(q, x);                                                        \
            return;                                                                        \
        }                                                                                  \
        x->next = pos->next;                                                               \
        pos->next = x;                                                                     \
        if (q->last == pos)                                                                \
            q->last = x;                                                                   \
    }                                                                                      \
    /* Remove and return the first element, or NULL if q is empty. */                      \
    static inline __attribute__((unused)) type *name##_pop(name *q)                        \
    {                                                                                      \
        type *x = q->head;                                                                 \
        if (x) {                                                                           \
            q->head = x->next;                                                             \
            if (!q->head)                                                                  \
                q->last = NULL;                                                            \
            x->next = NULL;                                                                \
        }                                                                                  \
        return x;                                                                          \
    }                                                                                      \
    /* Remove x if it is on q (a walk from the head). Returns whether it was. */           \
    static inline __attribute__((unused)) bool name##_remove(name *q, type *x)             \
    {                                                                                      \
        type *prev = NULL;                                                                 \
        for (type *y = q->head; y; prev = y, y = y->next) {                                \
            if (y != x)                                                                    \
                continue;                                                                  \
            if (prev)                                                                      \
                prev->next = x->next;                                                      \
            else                                                                           \
                q->head = x->next;                                                         \
            if (q->last == x)                                                              \
                q->last = prev;                                                            \
            x->next = NULL;                                                                \
            return true;                                                                   \
        }                                                                                  \
        return false;                                                                      \
    }                                                                                      \
    /* Move every element of from to the end of q, leaving from empty. */                  \
    static inline __attribute__((unused)) void name##_concat(name *q, name *from)          \
    {                                                                                      \
        if (!from->head)                                                                   \
            return;                                                                        \
        if (q->last)                                                                       \
            q->last->next = from->head;                                                    \
        else                                                                               \
            q->head = from->head;                                                          \
        q->last = from->last;                                                              \
        from->head = from->last = NULL;                                                    \
    }

#define DEFINE_LIST_FUNCTIONS(name, type, prev, next)                                      \
    static inline __attribute__((unused)) bool name##_empty(const name *l)                 \
    {                                                                                      \
        return !l->head;                                                                   \
    }                                                                                      \
    /* Append x at the end. */                                                             \
    static inline __attribute__((unused)) void name##_push(name *l, type *x)               \
    {                                                                                      \
        x->prev = l->last;                                                                 \
        x->next = NULL;                                                                    \
        if (l->last)                                                                       \
            l->last->next = x;                                                             \
        else                                                                               \
            l->head = x;                                                                   \
        l->last = x;                                                                       \
    }                                                                                      \
    /* Insert x at the front. */                                                           \
    static inline __attribute__((unused)) void name##_push_head(name *l, type *x)          \
    {                                                                                      \
        x->prev = NULL;                                                                    \
        x->next = l->head;                                                                 \
        if (l->head)                                                                       \
            l->head->prev = x;                                                             \
        else                                                                               \
            l->last = x;                                                                   \
        l->head = x;                                                                       \
    }                                                                                      \
    /* Remove x, which must be on l. */                                                    \
    static inline __attribute__((unused)) void name##_remove(name *l, type *x)             \
    {                                                                                      \
        if (x->prev)                                                                       \
            x->prev->next = x->next;                                                       \
        else                                                                               \
            l->head = x->next;                                                             \
        if (x->next)                                                                       \
            x->next->prev = x->prev;                                                       \
        else                                                                               \
            l->last = x->prev;                                                             \
        x->prev = x->next = NULL;                                                          \
    }                                                                                      \
    /* Remove and return the first element, or NULL if l is empty. */                      \
    static inline __attribute__((unused)) type *name##_pop(name *l)                        \
    {                                                                                      \
        type *x = l->head;                                                                 \
        if (x)                                                                             \
            name##_remove(l, x);                                                           \
        return x;                                                                          \
    }

#endif
