/* common/list.h: the FIFO and the doubly-linked list, each operation at the ends and inside. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "common/list.h"

struct item {
    int v;
    struct item *next;
    struct item *lprev, *lnext;
};

DEFINE_QUEUE_TYPE(item_queue, struct item, next)
DEFINE_LIST_TYPE(item_list, struct item, lprev, lnext)

/* The values along q from the head, as a number (digits), checking last. */
static int queue_digits(const item_queue *q)
{
    int d = 0;
    const struct item *last = NULL;

    for (const struct item *x = q->head; x; x = x->next) {
        d = d * 10 + x->v;
        last = x;
    }
    assert_ptr_equal(q->last, last);
    return d;
}

/* The same, both ways along l: the backward walk must mirror the forward one. */
static int list_digits(const item_list *l)
{
    int d = 0, back = 0, mul = 1;
    const struct item *prev = NULL;

    for (const struct item *x = l->head; x; x = x->lnext) {
        assert_ptr_equal(x->lprev, prev);
        d = d * 10 + x->v;
        prev = x;
    }
    assert_ptr_equal(l->last, prev);
    for (const struct item *x = l->last; x; x = x->lprev, mul *= 10)
        back += x->v * mul;
    assert_int_equal(back, d);
    return d;
}

static void items(struct item *it, int n)
{
    for (int i = 0; i < n; i++)
        it[i] = (struct item){.v = i + 1};
}

static void test_queue_fifo(void **state)
{
    struct item it[3];
    item_queue q = {0};

    items(it, 3);
    assert_true(item_queue_empty(&q));
    assert_null(item_queue_pop(&q));
    for (int i = 0; i < 3; i++)
        item_queue_push(&q, &it[i]);
    assert_false(item_queue_empty(&q));
    assert_int_equal(queue_digits(&q), 123);
    assert_ptr_equal(item_queue_pop(&q), &it[0]);
    assert_null(it[0].next);
    assert_ptr_equal(item_queue_pop(&q), &it[1]);
    assert_ptr_equal(item_queue_pop(&q), &it[2]);
    assert_true(item_queue_empty(&q));
    assert_null(q.last);
    /* Reusable once empty: last was reset. */
    item_queue_push(&q, &it[1]);
    assert_int_equal(queue_digits(&q), 2);
}

static void test_queue_push_head_and_insert_after(void **state)
{
    struct item it[5];
    item_queue q = {0};

    items(it, 5);
    item_queue_push_head(&q, &it[1]);           /* 2 */
    item_queue_push_head(&q, &it[0]);           /* 12 */
    item_queue_insert_after(&q, &it[1], &it[3]); /* 124: after the last moves last */
    item_queue_insert_after(&q, &it[1], &it[2]); /* 1234 */
    item_queue_insert_after(&q, NULL, &it[4]);   /* 51234 */
    assert_int_equal(queue_digits(&q), 51234);
}

static void test_queue_remove(void **state)
{
    struct item it[4], other = {.v = 9};
    item_queue q = {0};

    items(it, 4);
    for (int i = 0; i < 4; i++)
        item_queue_push(&q, &it[i]);
    assert_false(item_queue_remove(&q, &other));
    assert_true(item_queue_remove(&q, &it[1]));  /* inside */
    assert_int_equal(queue_digits(&q), 134);
    assert_true(item_queue_remove(&q, &it[3]));  /* the last */
    assert_int_equal(queue_digits(&q), 13);
    item_queue_push(&q, &it[3]);
    assert_int_equal(queue_digits(&q), 134);
    assert_true(item_queue_remove(&q, &it[0]));  /* the head */
    assert_true(item_queue_remove(&q, &it[2]));
    assert_true(item_queue_remove(&q, &it[3]));
    assert_true(item_queue_empty(&q));
    assert_null(q.last);
}

static void test_queue_concat(void **state)
{
    struct item it[4];
    item_queue a = {0}, b = {0};

    items(it, 4);
    item_queue_concat(&a, &b);  /* both empty */
    assert_true(item_queue_empty(&a));
    item_queue_push(&b, &it[0]);
    item_queue_concat(&a, &b);  /* into an empty one */
    assert_int_equal(queue_digits(&a), 1);
    assert_true(item_queue_empty(&b));
    assert_null(b.last);
    item_queue_push(&b, &it[1]);
    item_queue_push(&b, &it[2]);
    item_queue_concat(&a, &b);
    item_queue_push(&a, &it[3]);  /* last followed the move */
    assert_int_equal(queue_digits(&a), 1234);
    item_queue_concat(&a, &b);  /* an empty one: nothing */
    assert_int_equal(queue_digits(&a), 1234);
}

static void test_list_push_both_ends(void **state)
{
    struct item it[4];
    item_list l = {0};

    items(it, 4);
    assert_true(item_list_empty(&l));
    item_list_push(&l, &it[1]);
    item_list_push_head(&l, &it[0]);
    item_list_push(&l, &it[2]);
    item_list_push(&l, &it[3]);
    assert_int_equal(list_digits(&l), 1234);
}

static void test_list_remove_anywhere(void **state)
{
    struct item it[5];
    item_list l = {0};

    items(it, 5);
    for (int i = 0; i < 5; i++)
        item_list_push(&l, &it[i]);
    item_list_remove(&l, &it[2]);  /* inside */
    assert_null(it[2].lprev);
    assert_null(it[2].lnext);
    assert_int_equal(list_digits(&l), 1245);
    item_list_remove(&l, &it[0]);  /* the head */
    assert_int_equal(list_digits(&l), 245);
    item_list_remove(&l, &it[4]);  /* the last */
    assert_int_equal(list_digits(&l), 24);
    assert_ptr_equal(item_list_pop(&l), &it[1]);
    assert_ptr_equal(item_list_pop(&l), &it[3]);
    assert_null(item_list_pop(&l));
    assert_true(item_list_empty(&l));
    assert_null(l.last);
}

static void test_one_element_on_both_kinds(void **state)
{
    /* The links are separate fields: an item may be on a queue and a list at once. */
    struct item it[2];
    item_queue q = {0};
    item_list l = {0};

    items(it, 2);
    item_queue_push(&q, &it[0]);
    item_queue_push(&q, &it[1]);
    item_list_push_head(&l, &it[0]);
    item_list_push_head(&l, &it[1]);
    assert_int_equal(queue_digits(&q), 12);
    assert_int_equal(list_digits(&l), 21);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_queue_fifo),
        cmocka_unit_test(test_queue_push_head_and_insert_after),
        cmocka_unit_test(test_queue_remove),
        cmocka_unit_test(test_queue_concat),
        cmocka_unit_test(test_list_push_both_ends),
        cmocka_unit_test(test_list_remove_anywhere),
        cmocka_unit_test(test_one_element_on_both_kinds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
