/* Zero tests and checksums of many pages on several threads (_hash.pxi),
 * the new frames' writes of the scan (_writes.h), and the comparison of a
 * held run (_remap.pxi).
 *
 * Plain C and pthreads, not OpenMP: libgomp keeps a pool of threads that is
 * not fork-safe, and pydedup forks. The threads here live for one job (a
 * scan's hash stream, or a held run's comparison) and never touch Python;
 * a helper takes grains of pages until none is left, writes only the
 * answers of its grains (and the new frames the scan posts, _writes.h),
 * and leaves. A job ends inside the merge that
 * started it, under the arena's lock, which a fork waits for: a helper can
 * outlive it only by its last look at the shared record (which the last one
 * out frees), and nothing of it matters to a fork. A page's zero test and
 * its checksum are one pass over the page: the zero test stops at the first
 * non-zero word, so a page that is not zero is read once, by the checksum
 * (from memory: see _checksum.h). */
#ifndef PYDEDUP_HASH_H
#define PYDEDUP_HASH_H

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include "_os.h"
#include "_checksum.h"
#include "_writes.h"

#define PD_MAX_THREADS 256

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

/* Start up to `helpers` detached threads running fn(arg), each holding a
 * reference to arg's record in *refs; how many started. */
static unsigned pd_start_helpers(void *(*fn)(void *), void *arg, int *refs, unsigned helpers)
{
    pthread_attr_t attr;
    pthread_t tid;
    unsigned started = 0;
    if (helpers == 0 || pthread_attr_init(&attr) != 0)
        return 0;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (; started < helpers; started++) {
        __atomic_add_fetch(refs, 1, __ATOMIC_RELAXED);
        if (pthread_create(&tid, &attr, fn, arg) != 0) {
            __atomic_sub_fetch(refs, 1, __ATOMIC_RELAXED);
            break;                       /* the caller takes what is left */
        }
    }
    pthread_attr_destroy(&attr);
    return started;
}

static inline void pd_add_cpu(uint64_t *ns, double since)
{
    __atomic_fetch_add(ns, (uint64_t)((pd_thread_cpu() - since) * 1e9), __ATOMIC_RELAXED);
}

/* ---- the hash stream of a scan ------------------------------------------
 *
 * The scan publishes the pages of each chunk whose page tables it has read,
 * a few chunks ahead of the one it looks at; helpers zero-test and checksum
 * them in publishing order from a shared cursor, and sleep on a futex when
 * they have caught up. When the scan needs a chunk's answers it takes the
 * grains no helper has taken yet itself and waits for the rest. So the
 * helpers keep hashing while the scan spends long on a chunk (comparing
 * copies), and the scan hashes when it is the faster one. A helper writes
 * the new frames the scan posts (_writes.h) before it takes a grain: the
 * scan may be waiting for a frame, never for a grain it could hash itself.
 *
 * A page's position is its place in publishing order; the ring holds
 * `capacity` positions, reused once the scan has looked at their chunk.
 * Each chunk is padded to whole grains, so that a grain never waits for a
 * chunk not yet published. */
#define PD_NO_PAGE SIZE_MAX

typedef struct {
    const char *base;        /* the arena's first page */
    size_t page_size;
    size_t capacity;         /* ring positions, a multiple of PD_GRAIN */
    size_t *pages;           /* ring: the page (from base) at each position; PD_NO_PAGE pads */
    uint32_t *sums;          /* ring: low 32 bits of the checksum; 0 for a zero page */
    uint8_t *zero;           /* ring: 1 for an all-zero page */
    size_t *finished;        /* per grain of the ring: 1 + the position of the last grain done */
    size_t published;        /* positions that may be taken, whole grains */
    size_t next;             /* the first position nobody has taken */
    size_t released;         /* positions before it may be published again (the caller's) */
    uint32_t wake;           /* futex word: changes at every publish and at the close */
    int closed;
    uint64_t helper_ns;      /* the helpers' CPU time */
    pd_writes *writes;       /* the scan's frame writes, or NULL */
    int refs;
} pd_stream;

static void pd_stream_put(pd_stream *s)
{
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        free(s->pages);
        free(s->sums);
        free(s->zero);
        free(s->finished);
        if (s->writes != NULL)
            pd_writes_put(s->writes);
        free(s);
    }
}

/* A grain below `end` nobody has taken: its first position in *lo, or 0. */
static int pd_stream_take(pd_stream *s, size_t end, size_t *lo)
{
    size_t at = __atomic_load_n(&s->next, __ATOMIC_RELAXED);
    for (;;) {
        size_t limit = __atomic_load_n(&s->published, __ATOMIC_ACQUIRE);
        if (limit > end)
            limit = end;
        if (at >= limit)
            return 0;
        if (__atomic_compare_exchange_n(&s->next, &at, at + PD_GRAIN, 1,
                                        __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            *lo = at;
            return 1;
        }
    }
}

static void pd_stream_hash_grain(pd_stream *s, size_t lo)
{
    size_t ps = s->page_size, first = lo % s->capacity;
    for (size_t i = first; i < first + PD_GRAIN; i++) {
        if (s->pages[i] == PD_NO_PAGE)
            continue;
        const char *page = s->base + s->pages[i] * ps;
        s->zero[i] = (uint8_t)pd_page_is_zero(page, ps);
        s->sums[i] = s->zero[i] ? 0 : (uint32_t)pd_page_checksum(page, ps);
    }
    __atomic_store_n(&s->finished[first / PD_GRAIN], lo + 1, __ATOMIC_RELEASE);
}

static void *pd_stream_helper(void *arg)
{
    pd_stream *s = (pd_stream *)arg;
    size_t lo;
    for (;;) {
        uint32_t seen = __atomic_load_n(&s->wake, __ATOMIC_ACQUIRE);
        double start = pd_thread_cpu();  /* for the write or grain below, if any */
        if (s->writes != NULL && pd_writes_help(s->writes)) {
            pd_add_cpu(&s->helper_ns, start);
        } else if (pd_stream_take(s, SIZE_MAX, &lo)) {
            pd_stream_hash_grain(s, lo);
            pd_add_cpu(&s->helper_ns, start);
        } else if (__atomic_load_n(&s->closed, __ATOMIC_ACQUIRE)) {
            break;
        } else {                         /* returns at once if a publish came since `seen` */
            syscall(SYS_futex, &s->wake, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
        }
    }
    pd_stream_put(s);
    return NULL;
}

static void pd_stream_wake(pd_stream *s)
{
    __atomic_add_fetch(&s->wake, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, &s->wake, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

/* A stream of `capacity` positions (rounded up to whole grains) and
 * `threads` - 1 helpers, which also do the writes posted to `writes` if
 * not NULL; NULL without memory for it. */
static inline pd_stream *pd_stream_open(const char *base, size_t page_size, size_t capacity,
                                        unsigned threads, pd_writes *writes)
{
    pd_stream *s = (pd_stream *)calloc(1, sizeof(pd_stream));
    if (s == NULL)
        return NULL;
    capacity = (capacity + PD_GRAIN - 1) / PD_GRAIN * PD_GRAIN;
    s->pages = (size_t *)malloc(capacity * sizeof(size_t));
    s->sums = (uint32_t *)malloc(capacity * sizeof(uint32_t));
    s->zero = (uint8_t *)malloc(capacity);
    s->finished = (size_t *)calloc(capacity / PD_GRAIN, sizeof(size_t));
    s->refs = 1;
    if (s->pages == NULL || s->sums == NULL || s->zero == NULL || s->finished == NULL) {
        pd_stream_put(s);
        return NULL;
    }
    s->base = base;
    s->page_size = page_size;
    s->capacity = capacity;
    if (writes != NULL) {
        pd_writes_get(writes);
        s->writes = writes;
        writes->wake = &s->wake;
    }
    if (threads > PD_MAX_THREADS)
        threads = PD_MAX_THREADS;
    pd_start_helpers(pd_stream_helper, s, &s->refs, threads > 1 ? threads - 1 : 0);
    return s;
}

/* Publish the pages first + i of [first, first + n) whose wanted[i] is
 * set; their positions are [*start, *end). 0, or ENOSPC if the ring has no
 * room for n more (the caller has not released enough). */
static inline int pd_stream_publish(pd_stream *s, size_t first, size_t n, const uint8_t *wanted,
                                    size_t *start, size_t *end)
{
    size_t at = s->published, i;
    if (at + (n + PD_GRAIN - 1) / PD_GRAIN * PD_GRAIN > s->released + s->capacity)
        return ENOSPC;
    for (i = 0; i < n; i++)
        if (wanted[i])
            s->pages[at++ % s->capacity] = first + i;
    *start = s->published;
    while (at % PD_GRAIN)
        s->pages[at++ % s->capacity] = PD_NO_PAGE;
    *end = at;
    __atomic_store_n(&s->published, at, __ATOMIC_RELEASE);
    pd_stream_wake(s);
    return 0;
}

/* The caller hashes the grains of [start, end) nobody has taken, and
 * waits for those the helpers took. */
static inline void pd_stream_wait(pd_stream *s, size_t start, size_t end)
{
    size_t lo;
    while (pd_stream_take(s, end, &lo))
        pd_stream_hash_grain(s, lo);
    for (lo = start - start % PD_GRAIN; lo < end; lo += PD_GRAIN)
        while (__atomic_load_n(&s->finished[(lo % s->capacity) / PD_GRAIN], __ATOMIC_ACQUIRE) != lo + 1)
            sched_yield();               /* a grain a helper took is under way */
}

/* The answers of positions [start, end), which pd_stream_wait() made, out
 * to the pages from `first`: sums[p - first] and zero[p - first]. */
static inline void pd_stream_answers(const pd_stream *s, size_t start, size_t end, size_t first,
                                     uint32_t *sums, uint8_t *zero)
{
    for (size_t at = start; at < end; at++) {
        size_t i = at % s->capacity;
        if (s->pages[i] != PD_NO_PAGE) {
            sums[s->pages[i] - first] = s->sums[i];
            zero[s->pages[i] - first] = s->zero[i];
        }
    }
}

/* Positions before `end` are looked at: the ring may take new ones there.
 * (A chunk that gave the stream no pages has an empty span at 0.) */
static inline void pd_stream_release(pd_stream *s, size_t end)
{
    if (end > s->released)
        s->released = end;
}

/* End the stream: what is published is hashed (a scan that stopped early
 * leaves some), the helpers are told to leave, and s is given back. The
 * helpers' CPU seconds. */
static inline double pd_stream_close(pd_stream *s)
{
    double cpu;
    pd_stream_wait(s, s->released, s->published);
    if (s->writes != NULL)
        s->writes->wake = NULL;          /* the word goes with the stream */
    cpu = __atomic_load_n(&s->helper_ns, __ATOMIC_RELAXED) * 1e-9;
    __atomic_store_n(&s->closed, 1, __ATOMIC_RELEASE);
    pd_stream_wake(s);
    pd_stream_put(s);
    return cpu;
}

/* ---- the comparison of a held run ---------------------------------------
 *
 * match[i] = page i of `pages` equals page i of `frames` (frames NULL:
 * page i is all zero). The run is write-protected while this runs, so the
 * answers hold until its remap. */
typedef struct {
    const char *pages;
    const char *frames;      /* consecutive frames, or NULL for zero pages */
    size_t page_size;
    size_t n;
    uint8_t *match;
} pd_match_job;

typedef struct {
    pd_match_job job;
    size_t next;             /* the next grain's first index */
    size_t done;             /* indices finished */
    uint64_t helper_ns;      /* the helpers' CPU time */
    int refs;
} pd_matching;

static void pd_match_grain(const pd_match_job *j, size_t lo, size_t hi)
{
    for (size_t i = lo; i < hi; i++) {
        const char *page = j->pages + i * j->page_size;
        j->match[i] = (uint8_t)(j->frames ? memcmp(page, j->frames + i * j->page_size,
                                                   j->page_size) == 0
                                          : pd_page_is_zero(page, j->page_size));
    }
}

static void pd_match_take_grains(pd_matching *m, int helper)
{
    for (;;) {
        size_t lo = __atomic_fetch_add(&m->next, PD_GRAIN, __ATOMIC_RELAXED);
        if (lo >= m->job.n)
            return;
        size_t hi = lo + PD_GRAIN < m->job.n ? lo + PD_GRAIN : m->job.n;
        double start = helper ? pd_thread_cpu() : 0;
        pd_match_grain(&m->job, lo, hi);
        if (helper)
            pd_add_cpu(&m->helper_ns, start);
        __atomic_fetch_add(&m->done, hi - lo, __ATOMIC_RELEASE);
    }
}

static void pd_matching_put(pd_matching *m)
{
    if (__atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(m);
}

static void *pd_match_helper(void *arg)
{
    pd_matching *m = (pd_matching *)arg;
    pd_match_take_grains(m, 1);
    pd_matching_put(m);
    return NULL;
}

/* On up to `threads` threads, the caller's one of them; the CPU seconds of
 * the threads other than the caller's. */
static inline double pd_match_pages(const pd_match_job *job, unsigned threads)
{
    pd_matching *m = (pd_matching *)calloc(1, sizeof(pd_matching));
    double cpu;
    if (m == NULL) {
        pd_match_grain(job, 0, job->n);
        return 0;
    }
    m->job = *job;
    m->refs = 1;
    if (threads > PD_MAX_THREADS)
        threads = PD_MAX_THREADS;
    if (threads > job->n / PD_GRAIN + 1)
        threads = (unsigned)(job->n / PD_GRAIN + 1);
    pd_start_helpers(pd_match_helper, m, &m->refs, threads - 1);
    pd_match_take_grains(m, 0);
    while (__atomic_load_n(&m->done, __ATOMIC_ACQUIRE) < job->n)
        sched_yield();                   /* a grain a helper took is under way */
    cpu = __atomic_load_n(&m->helper_ns, __ATOMIC_RELAXED) * 1e-9;
    pd_matching_put(m);
    return cpu;
}

#endif
