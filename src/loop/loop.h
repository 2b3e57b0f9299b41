/* The event loop: one thread, epoll for file descriptors, one-shot timers, deferred calls.
 *
 * Modelled on redis's ae: a short, complete API. Callbacks run on the loop thread and must not
 * block. A callback may add or remove any registration, including its own; removal takes effect
 * at once (a removed fd's pending events are not delivered).
 */
#ifndef THINBLK_LOOP_H
#define THINBLK_LOOP_H

#include <stdbool.h>
#include <stdint.h>

struct loop;

#define LOOP_READ 1u
#define LOOP_WRITE 2u
#define LOOP_PEER_SHUTDOWN 4u  /* watch only: the peer shut its sending side (EPOLLRDHUP) */

/* events: LOOP_READ/LOOP_WRITE that are ready; errors and hang-ups are reported as both, and a
 * peer's shutdown, when watched, as LOOP_READ. */
typedef void loop_fd_fn(struct loop *loop, int fd, unsigned events, void *opaque);
typedef void loop_fn(struct loop *loop, void *opaque);

/* A new loop, or NULL with errno set. */
struct loop *loop_new(void);
/* Free the loop; registrations still present are dropped (their fds are not closed), and
 * so are deferred calls still queued (not called, their nodes not touched). */
void loop_free(struct loop *loop);

/* Watch fd for events (LOOP_READ | LOOP_WRITE | LOOP_PEER_SHUTDOWN, may be 0). One
 * registration per fd.
 * Returns 0, or -1 with errno set. */
int loop_add_fd(struct loop *loop, int fd, unsigned events, loop_fd_fn *fn, void *opaque);
/* Change the events watched for a registered fd. Returns 0 or -1 with errno. */
int loop_mod_fd(struct loop *loop, int fd, unsigned events);
/* Stop watching fd (does not close it). */
void loop_del_fd(struct loop *loop, int fd);

/* Call fn once, delay_ns from now. Returns a timer id (never 0) for loop_del_timer. */
uint64_t loop_add_timer(struct loop *loop, uint64_t delay_ns, loop_fn *fn, void *opaque);
/* Cancel a timer that has not fired; unknown or fired ids are ignored. */
void loop_del_timer(struct loop *loop, uint64_t id);

/* A deferred call: embedded by the caller in its own object, so deferring never allocates.
 * Set fn and opaque (LOOP_DEFERRED_INIT or plain assignment) before the first loop_defer();
 * next and queued belong to the loop while the call is queued. */
struct loop_deferred {
    loop_fn *fn;
    void *opaque;
    struct loop_deferred *next;  /* the loop's queue */
    bool queued;                 /* on the queue: set by loop_defer(), cleared before fn runs */
};
#define LOOP_DEFERRED_INIT(fn_, opaque_) ((struct loop_deferred){.fn = (fn_), .opaque = (opaque_)})

/* Queue d: d->fn(loop, d->opaque) runs once, after the current callback returns and before
 * the loop waits again; outside any callback, at the start of the next loop_run_once(). Never
 * inside the call to loop_defer(), so a completion deferred this way does not re-enter its
 * caller. Deferred calls run in the order they were queued; calls queued by a deferred call
 * run in the same round, after those already queued.
 * d must not be queued already (checked, aborts): a caller that may ask twice tests
 * loop_deferred_queued() first. d is not queued any more when fn runs, so fn may queue it
 * again. d must stay valid while queued: cancel it before freeing its object. */
void loop_defer(struct loop *loop, struct loop_deferred *d);
/* Whether d is queued (its call has not started). */
static inline bool loop_deferred_queued(const struct loop_deferred *d) { return d->queued; }
/* Take d off the queue if it is there (its call will not run); otherwise nothing. O(calls
 * queued). */
void loop_cancel_deferred(struct loop *loop, struct loop_deferred *d);

/* Run the deferred calls now (before tearing down what they refer to). Not from inside a
 * deferred call (checked). */
void loop_run_deferred(struct loop *loop);

/* Run until loop_stop(). Returns 0, or -1 with errno if epoll fails. */
int loop_run(struct loop *loop);
/* Make loop_run() return after the current iteration. */
void loop_stop(struct loop *loop);
/* Run one iteration, waiting at most timeout_ms (-1: until something happens). */
int loop_run_once(struct loop *loop, int timeout_ms);

#endif
