/* New frames written on the scan's helper threads (_frames.pxi
 * frames_write_behind; the helpers are _hash.h's).
 *
 * A new frame is a pwrite into one of the store's memfds: shmem allocates,
 * charges and inserts a page and copies into it, about 1.5 us a page, under
 * the file's inode lock. On the scan's thread that was most of a first
 * shared member's merge (every page a new frame) while the helpers, done
 * hashing, slept. So the scan posts each write behind and goes on; a helper
 * takes it before its next grain; the scan collects the writes in posting
 * order when it needs their frames, doing itself any that nobody took, and
 * while it waits for one, the later ones (into other memfds). Only the scan
 * posts and collects.
 *
 * A write's slot is reused only once the scan has collected it, and a
 * helper reads its slot only between taking and finishing it, so the ring
 * needs no lock. The record lives as long as its last holder (the frame
 * store and the hash stream each hold it): a helper may look at it after
 * the scan has let go. */
#ifndef PYDEDUP_WRITES_H
#define PYDEDUP_WRITES_H

#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define PD_WRITES_AHEAD 4        /* writes posted and not collected, at most */

enum { PD_WRITE_POSTED, PD_WRITE_DONE };

typedef struct {
    int fd;
    const char *content;
    size_t length;
    off_t offset;
    size_t written;              /* bytes written, once done */
    int err;                     /* 0, or the errno that stopped it */
    int state;
} pd_write;

typedef struct {
    pd_write ring[PD_WRITES_AHEAD];
    size_t posted;               /* writes posted */
    size_t taken;                /* writes someone took */
    uint32_t *wake;              /* the helpers' futex word while they may help, or NULL */
    size_t helped;               /* bytes the helpers wrote */
    int refs;
} pd_writes;

static inline pd_writes *pd_writes_open(void)
{
    pd_writes *w = (pd_writes *)calloc(1, sizeof(pd_writes));
    if (w != NULL)
        w->refs = 1;
    return w;
}

static inline void pd_writes_get(pd_writes *w)
{
    __atomic_add_fetch(&w->refs, 1, __ATOMIC_RELAXED);
}

static inline void pd_writes_put(pd_writes *w)
{
    if (__atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(w);
}

/* Write it all, or stop at the first error: a page written in part is not
 * written (the caller takes written / page size). A helper passes its
 * count of bytes, `helped`, which grows before the write is marked done
 * (the scan may then read it, and reuse the slot), and wakes the scan,
 * which may wait for it. */
static void pd_write_run(pd_write *j, size_t *helped)
{
    size_t at = 0;
    int err = 0;
    while (at < j->length) {
        ssize_t done = pwrite(j->fd, j->content + at, j->length - at, j->offset + (off_t)at);
        if (done <= 0) {
            err = done < 0 ? errno : ENOMEM;
            break;
        }
        at += (size_t)done;
    }
    j->written = at;
    j->err = err;
    if (helped != NULL)
        __atomic_add_fetch(helped, at, __ATOMIC_RELAXED);
    __atomic_store_n(&j->state, PD_WRITE_DONE, __ATOMIC_RELEASE);
    if (helped != NULL)
        syscall(SYS_futex, &j->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Take write number i if nobody has: whether it was taken here. */
static inline int pd_writes_take(pd_writes *w, size_t i)
{
    return __atomic_compare_exchange_n(&w->taken, &i, i + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/* The oldest write nobody took, done here, by a helper or by the scan;
 * whether there was one. */
static inline int pd_writes_do_next(pd_writes *w, int helper)
{
    size_t i = __atomic_load_n(&w->taken, __ATOMIC_ACQUIRE);
    while (i < __atomic_load_n(&w->posted, __ATOMIC_ACQUIRE)) {
        if (pd_writes_take(w, i)) {
            pd_write_run(&w->ring[i % PD_WRITES_AHEAD], helper ? &w->helped : NULL);
            return 1;
        }
        i = __atomic_load_n(&w->taken, __ATOMIC_ACQUIRE);
    }
    return 0;
}

/* A helper's turn: the oldest write nobody took; whether there was one. */
static inline int pd_writes_help(pd_writes *w)
{
    return pd_writes_do_next(w, 1);
}

/* Post a write of `length` bytes from `content` at `offset` of `fd`; its
 * number. The caller has collected all but PD_WRITES_AHEAD - 1 of those
 * posted before. */
static inline size_t pd_writes_post(pd_writes *w, int fd, const char *content, size_t length,
                                    off_t offset)
{
    size_t i = w->posted;
    pd_write *j = &w->ring[i % PD_WRITES_AHEAD];
    j->fd = fd;
    j->content = content;
    j->length = length;
    j->offset = offset;
    j->state = PD_WRITE_POSTED;
    __atomic_store_n(&w->posted, i + 1, __ATOMIC_RELEASE);
    if (w->wake != NULL) {               /* a helper asleep on the stream wakes for it */
        __atomic_add_fetch(w->wake, 1, __ATOMIC_RELEASE);
        syscall(SYS_futex, w->wake, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    return i;
}

/* Write number i, done here if nobody took it, else waited for: 0 or its
 * errno, and the bytes it wrote in *written. While a helper writes it, the
 * scan does the later writes nobody took: neighbouring runs of frames lie
 * in different memfds (_frames.pxi), which shmem writes side by side. The
 * caller collects in posting order. */
static inline int pd_writes_finish(pd_writes *w, size_t i, size_t *written)
{
    pd_write *j = &w->ring[i % PD_WRITES_AHEAD];
    if (pd_writes_take(w, i))
        pd_write_run(j, NULL);
    while (__atomic_load_n(&j->state, __ATOMIC_ACQUIRE) != PD_WRITE_DONE && pd_writes_do_next(w, 0))
        ;
    /* A helper is writing it: up to milliseconds, so sleep, not spin. */
    while (__atomic_load_n(&j->state, __ATOMIC_ACQUIRE) != PD_WRITE_DONE)
        syscall(SYS_futex, &j->state, FUTEX_WAIT_PRIVATE, PD_WRITE_POSTED, NULL, NULL, 0);
    *written = j->written;
    return j->err;
}

/* Bytes the helpers wrote, of the writes collected. */
static inline size_t pd_writes_helped(pd_writes *w)
{
    return __atomic_load_n(&w->helped, __ATOMIC_RELAXED);
}

#endif
