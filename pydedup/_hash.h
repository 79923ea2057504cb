/* Zero tests and checksums of many pages on several threads (_hash.pxi).
 *
 * Plain C and pthreads, not OpenMP: the threads live only inside one call
 * (started, joined), so that nothing of them is left when the process forks
 * (libgomp's pool is not fork-safe), and they never touch Python. Each
 * thread reads a disjoint slice of the pages and writes only its slice of
 * the answers; the page's zero test and its checksum are one pass over the
 * page (the zero test stops at the first non-zero word, so the hash reads
 * the page from L1). */
#ifndef PYDEDUP_HASH_H
#define PYDEDUP_HASH_H

#include <pthread.h>
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
    double cpu_seconds;      /* out: the thread's CPU time for its slice */
} pd_hash_job;

static inline double pd_thread_cpu(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *pd_hash_slice(void *arg)
{
    pd_hash_job *j = (pd_hash_job *)arg;
    double start = pd_thread_cpu();
    for (size_t i = 0; i < j->n; i++) {
        const char *page = j->base + (size_t)j->pages[i] * j->page_size;
        j->zero[i] = (uint8_t)pd_page_is_zero(page, j->page_size);
        j->sums[i] = j->zero[i] ? 0 : (uint32_t)j->xxh3(page, j->page_size);
    }
    j->cpu_seconds = pd_thread_cpu() - start;
    return NULL;
}

/* Hash job->n pages on up to `threads` threads (the caller's one of them);
 * the CPU seconds of the threads other than the caller's. A thread that cannot be started leaves
 * its slice to the caller. */
static inline double pd_hash_pages(const pd_hash_job *job, unsigned threads)
{
    pd_hash_job slices[PD_MAX_THREADS];
    pthread_t tids[PD_MAX_THREADS];
    int started[PD_MAX_THREADS];
    size_t at = 0, each;
    double cpu = 0;
    unsigned t;
    if (threads > PD_MAX_THREADS)
        threads = PD_MAX_THREADS;
    if (threads > job->n / 64 + 1)       /* a slice is worth a thread from 64 pages */
        threads = (unsigned)(job->n / 64 + 1);
    if (threads < 1)
        threads = 1;
    each = (job->n + threads - 1) / threads;
    for (t = 0; t < threads; t++) {
        slices[t] = *job;
        slices[t].pages = job->pages + at;
        slices[t].sums = job->sums + at;
        slices[t].zero = job->zero + at;
        slices[t].n = at + each <= job->n ? each : job->n - at;
        at += slices[t].n;
        started[t] = t > 0 && pthread_create(&tids[t], NULL, pd_hash_slice, &slices[t]) == 0;
    }
    pd_hash_slice(&slices[0]);
    for (t = 1; t < threads; t++) {
        if (started[t]) {
            pthread_join(tids[t], NULL);
            cpu += slices[t].cpu_seconds;
        } else {
            pd_hash_slice(&slices[t]);
        }
    }
    return cpu;
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
    double cpu_seconds;
} pd_match_job;

static void *pd_match_slice(void *arg)
{
    pd_match_job *j = (pd_match_job *)arg;
    double start = pd_thread_cpu();
    for (size_t i = 0; i < j->n; i++) {
        const char *page = j->pages + i * j->page_size;
        j->match[i] = (uint8_t)(j->frames
                                ? memcmp(page, j->frames + i * j->page_size, j->page_size) == 0
                                : pd_page_is_zero(page, j->page_size));
    }
    j->cpu_seconds = pd_thread_cpu() - start;
    return NULL;
}

/* As pd_hash_pages: the CPU seconds of the threads other than the caller's. */
static inline double pd_match_pages(const pd_match_job *job, unsigned threads)
{
    pd_match_job slices[PD_MAX_THREADS];
    pthread_t tids[PD_MAX_THREADS];
    int started[PD_MAX_THREADS];
    size_t at = 0, each;
    double cpu = 0;
    unsigned t;
    if (threads > PD_MAX_THREADS)
        threads = PD_MAX_THREADS;
    if (threads > job->n / 64 + 1)
        threads = (unsigned)(job->n / 64 + 1);
    if (threads < 1)
        threads = 1;
    each = (job->n + threads - 1) / threads;
    for (t = 0; t < threads; t++) {
        slices[t] = *job;
        slices[t].pages = job->pages + at * job->page_size;
        slices[t].frames = job->frames ? job->frames + at * job->page_size : NULL;
        slices[t].match = job->match + at;
        slices[t].n = at + each <= job->n ? each : job->n - at;
        at += slices[t].n;
        started[t] = t > 0 && pthread_create(&tids[t], NULL, pd_match_slice, &slices[t]) == 0;
    }
    pd_match_slice(&slices[0]);
    for (t = 1; t < threads; t++) {
        if (started[t]) {
            pthread_join(tids[t], NULL);
            cpu += slices[t].cpu_seconds;
        } else {
            pd_match_slice(&slices[t]);
        }
    }
    return cpu;
}

#endif
