/* Zero tests and checksums of many pages on several threads (_hash.pxi),
 * and the comparison of a held run (_remap.pxi).
 *
 * Plain C and pthreads, not OpenMP: libgomp keeps a pool of threads that is
 * not fork-safe, and pydedup forks. The threads here are started for one
 * job (a chunk's hashing, started while the caller scans the chunk before,
 * or a held run's comparison) and never touch Python; a helper takes
 * grains of pages until none is left, writes only the answers of its
 * grains, and leaves. The job's finish returns once every grain taken is
 * done, so a helper can outlive it only by its last look at the shared
 * counter (and then frees the shared record if it is the last), and a job
 * ends inside the merge that started it, under the arena's lock, which a
 * fork waits for: nothing of it matters to a fork. A page's zero test and its
 * checksum are one pass over the page (the zero test stops at the first
 * non-zero word, so the hash reads the page from L1). */
#ifndef PYDEDUP_HASH_H
#define PYDEDUP_HASH_H

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include "_os.h"

#define PD_MAX_THREADS 256

typedef struct {
    const char *base;        /* the arena's first page */
    size_t page_size;
    const uint32_t *pages;   /* page numbers to hash (from base) */
    size_t n;                /* how many */
    uint32_t *sums;          /* out: low 32 bits of xxh3; 0 for a zero page */
    uint8_t *zero;           /* out: 1 for an all-zero page */
    pd_xxh3_fn xxh3;
} pd_hash_job;

static inline double pd_thread_cpu(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* The pages go out a grain at a time from a shared counter, not in fixed
 * slices: on a machine whose other CPUs are busy a helper may not run for a
 * while, and the caller then does the work itself instead of waiting for a
 * slice only that helper would read. Helpers are detached; the caller waits
 * only for grains a helper has taken, and the last one out frees the shared
 * record (a helper that starts late finds the counter spent and leaves). */
#define PD_GRAIN 128

typedef struct {
    pd_hash_job hash;        /* kind 0 */
    int kind;                /* 0: hash, 1: match */
    const char *pages;       /* kind 1 */
    const char *frames;
    uint8_t *match;
    size_t n;
    size_t next;             /* the next grain's first index */
    size_t done;             /* indices finished */
    uint64_t helper_ns;      /* the helpers' CPU time */
    int refs;
} pd_shared;

static void pd_do_grain(pd_shared *s, size_t lo, size_t hi)
{
    size_t ps = s->hash.page_size;
    if (s->kind == 0) {
        const pd_hash_job *j = &s->hash;
        for (size_t i = lo; i < hi; i++) {
            const char *page = j->base + (size_t)j->pages[i] * ps;
            j->zero[i] = (uint8_t)pd_page_is_zero(page, ps);
            j->sums[i] = j->zero[i] ? 0 : (uint32_t)j->xxh3(page, ps);
        }
    } else {
        for (size_t i = lo; i < hi; i++) {
            const char *page = s->pages + i * ps;
            s->match[i] = (uint8_t)(s->frames ? memcmp(page, s->frames + i * ps, ps) == 0
                                              : pd_page_is_zero(page, ps));
        }
    }
}

static void pd_take_grains(pd_shared *s, int helper)
{
    for (;;) {
        size_t lo = __atomic_fetch_add(&s->next, PD_GRAIN, __ATOMIC_RELAXED);
        if (lo >= s->n)
            return;
        size_t hi = lo + PD_GRAIN < s->n ? lo + PD_GRAIN : s->n;
        double start = helper ? pd_thread_cpu() : 0;
        pd_do_grain(s, lo, hi);
        if (helper)
            __atomic_fetch_add(&s->helper_ns, (uint64_t)((pd_thread_cpu() - start) * 1e9),
                               __ATOMIC_RELAXED);
        __atomic_fetch_add(&s->done, hi - lo, __ATOMIC_RELEASE);
    }
}

static void pd_shared_put(pd_shared *s)
{
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(s);
}

static void *pd_helper(void *arg)
{
    pd_shared *s = (pd_shared *)arg;
    pd_take_grains(s, 1);
    pd_shared_put(s);
    return NULL;
}

/* Start s on up to `threads` - 1 helpers, which go on while the caller does
 * other work; pd_finish_shared() joins them. s is malloc'd and given away. */
static pd_shared *pd_start_shared(pd_shared *s, unsigned threads)
{
    pthread_attr_t attr;
    pthread_t tid;
    unsigned t;
    if (threads > PD_MAX_THREADS)
        threads = PD_MAX_THREADS;
    if (threads > s->n / PD_GRAIN + 1)
        threads = (unsigned)(s->n / PD_GRAIN + 1);
    s->refs = 1;
    if (threads > 1 && pthread_attr_init(&attr) == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        for (t = 1; t < threads; t++) {
            __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
            if (pthread_create(&tid, &attr, pd_helper, s) != 0) {
                __atomic_sub_fetch(&s->refs, 1, __ATOMIC_RELAXED);
                break;                   /* the caller takes what is left */
            }
        }
        pthread_attr_destroy(&attr);
    }
    return s;
}

/* The caller takes the grains left of a started s and waits for those the
 * helpers took; the helpers' CPU seconds. s is given back. */
static double pd_finish_shared(pd_shared *s)
{
    double cpu;
    pd_take_grains(s, 0);
    while (__atomic_load_n(&s->done, __ATOMIC_ACQUIRE) < s->n)
        sched_yield();                   /* a grain a helper took is under way */
    cpu = __atomic_load_n(&s->helper_ns, __ATOMIC_RELAXED) * 1e-9;
    pd_shared_put(s);
    return cpu;
}

/* s on up to `threads` threads, the caller's one of them. */
static double pd_run_shared(pd_shared *s, unsigned threads)
{
    return pd_finish_shared(pd_start_shared(s, threads));
}

/* Start zero-testing and checksumming job->n pages on `threads` - 1
 * helpers, while the caller goes on; pd_hash_finish() has the caller join
 * in and wait. Without memory for the shared record, the caller hashes
 * them all now, and NULL is returned. */
static inline pd_shared *pd_hash_start(const pd_hash_job *job, unsigned threads)
{
    pd_shared *s = (pd_shared *)calloc(1, sizeof(pd_shared));
    if (s == NULL) {
        pd_shared local;
        memset(&local, 0, sizeof(local));
        local.hash = *job;
        local.n = job->n;
        pd_do_grain(&local, 0, job->n);
        return NULL;
    }
    s->hash = *job;
    s->kind = 0;
    s->n = job->n;
    return pd_start_shared(s, threads);
}

/* The CPU seconds of the threads other than the caller's. */
static inline double pd_hash_finish(pd_shared *s)
{
    return s != NULL ? pd_finish_shared(s) : 0;
}

/* The comparison under the barrier, on threads: match[i] = page i of `pages`
 * equals page i of `frames` (frames NULL: page i is all zero). The run is
 * write-protected while this runs, so the answers hold until its remap. */
typedef struct {
    const char *pages;
    const char *frames;      /* consecutive frames, or NULL for zero pages */
    size_t page_size;
    size_t n;
    uint8_t *match;
} pd_match_job;

/* On up to `threads` threads, the caller's one of them; the CPU seconds of
 * the threads other than the caller's. */
static inline double pd_match_pages(const pd_match_job *job, unsigned threads)
{
    pd_shared local, *s = (pd_shared *)calloc(1, sizeof(pd_shared));
    pd_shared *use = s ? s : &local;
    if (s == NULL)
        memset(&local, 0, sizeof(local));
    use->kind = 1;
    use->hash.page_size = job->page_size;
    use->pages = job->pages;
    use->frames = job->frames;
    use->match = job->match;
    use->n = job->n;
    if (s == NULL) {
        pd_do_grain(&local, 0, job->n);
        return 0;
    }
    return pd_run_shared(s, threads);
}

#endif
