/* uffd_refill: does the userfaultfd write barrier fill a punched frame again?
 *
 * pydedup's pattern in plain C, no pydedup involved. An arena page P is
 * mapped (mmap MAP_FIXED, MAP_PRIVATE) onto a fresh frame of a memfd under
 * the write barrier (UFFDIO_REGISTER, UFFDIO_WRITEPROTECT, compare, remap,
 * UFFDIO_UNREGISTER, UFFDIO_WAKE) while another thread keeps writing P. Once
 * pagemap shows P has its own copy (the writer broke it), its frame is
 * punched; a barrier that finds P changed punches the new frame at once.
 * After every step the memfd is asked (SEEK_DATA) whether a punched frame
 * holds memory again; the first that does ends the run.
 *
 *   cc -O2 -pthread -o uffd_refill benchmarks/uffd_refill.c
 *   ./uffd_refill [rounds] [write-protect 1|0] [thread: 1 writer, 2 reader, 0 none] [re-punch 0|1]
 *
 * Linux 6.18, x86-64: with a writer, the frame P's mapping mapped comes back
 * during UFFDIO_WRITEPROTECT within some thousand rounds; with registration
 * alone rarely (once in 60000 rounds, during UFFDIO_UNREGISTER, which clears
 * the protection the same way); never with a reader or no thread; never
 * when that frame is punched again after UFFDIO_UNREGISTER (pydedup's fix,
 * _barrier.pxi: the ioctl returns after every fault in the mapping ended).
 * Needs userfaultfd: root, or vm.unprivileged_userfaultfd=1. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PS 4096
#define SLOTS 4096

static int memfd, uffd, pagemap;
static int wp = 1, thread_kind = 1, repunch = 0;
static char *P;
static _Atomic int stop;
static _Atomic long accesses;
static int current = -1;                /* the slot with content no one punched */
static int mapped_before = -1;          /* the slot P's mapping mapped at the round's start */

static void *other_thread(void *arg)
{
    long v = 0, sum = 0;
    (void)arg;
    while (!atomic_load(&stop)) {
        v++;
        for (int i = 0; i < PS; i += 8) {
            if (thread_kind == 1)
                *(volatile long *)(P + i) = v;
            else
                sum += *(volatile long *)(P + i);
        }
        atomic_fetch_add(&accesses, 1);
    }
    return (void *)sum;
}

static void check(const char *step, long round)
{
    off_t off = 0, d;
    while ((d = lseek(memfd, off, SEEK_DATA)) >= 0) {
        if (d / PS != current) {
            char line[256];
            FILE *maps = fopen("/proc/self/maps", "r");
            printf("round %ld: punched frame %ld holds memory again, seen after: %s "
                   "(P's mapping mapped frame %d at the round's start)\n",
                   round, (long)(d / PS), step, mapped_before);
            while (maps && fgets(line, sizeof line, maps))
                if (strtoul(line, NULL, 16) == (uintptr_t)P)
                    printf("  P now: %s", line);
            exit(1);
        }
        off = (d / PS + 1) * PS;
    }
}

static int has_own_copy(void)
{
    uint64_t e = 0;
    if (pread(pagemap, &e, 8, (off_t)((uintptr_t)P / PS) * 8) != 8)
        exit(2);
    return (e >> 63 & 1) && !(e >> 61 & 1);     /* present, not a file page */
}

static void uffd_call(unsigned long request, void *arg, const char *what)
{
    if (ioctl(uffd, request, arg) != 0) {
        perror(what);
        exit(2);
    }
}

static void punch(int slot)
{
    fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)slot * PS, PS);
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 20000;
    long remaps = 0, refused = 0;
    int mapped = -1;                    /* the slot P's mapping maps, punched or not */
    char content[PS];
    pthread_t t;
    if (argc > 2) wp = atoi(argv[2]);
    if (argc > 3) thread_kind = atoi(argv[3]);
    if (argc > 4) repunch = atoi(argv[4]);

    memfd = memfd_create("frames", 0);
    pagemap = open("/proc/self/pagemap", O_RDONLY);
    if (memfd < 0 || pagemap < 0 || ftruncate(memfd, (off_t)SLOTS * PS) != 0) {
        perror("memfd");
        return 2;
    }
    P = mmap(NULL, PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(P, 1, PS);
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_WP_HUGETLBFS_SHMEM };
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) != 0) {
        perror("userfaultfd");
        return 2;
    }
    if (thread_kind)
        pthread_create(&t, NULL, other_thread, NULL);

    for (long r = 0; r < rounds; r++) {
        int slot = (int)(r % SLOTS);
        struct uffdio_register reg = { .range = { (uintptr_t)P, PS }, .mode = UFFDIO_REGISTER_MODE_WP };
        struct uffdio_writeprotect protect = { .range = { (uintptr_t)P, PS }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
        struct uffdio_range range = { (uintptr_t)P, PS };
        int old_mapping = mapped_before = mapped;

        /* the scan: P's content becomes a new frame */
        check("the round's start", r);
        memcpy(content, P, PS);
        if (pwrite(memfd, content, PS, (off_t)slot * PS) != PS)
            return 2;
        current = slot;
        check("pwrite", r);
        /* the apply: protect, compare again, remap if unchanged, unprotect */
        uffd_call(UFFDIO_REGISTER, &reg, "UFFDIO_REGISTER");
        check("UFFDIO_REGISTER", r);
        if (wp)
            uffd_call(UFFDIO_WRITEPROTECT, &protect, "UFFDIO_WRITEPROTECT");
        if (!repunch)
            check("UFFDIO_WRITEPROTECT", r);
        if (memcmp(content, P, PS) == 0) {
            if (mmap(P, PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, memfd,
                     (off_t)slot * PS) == MAP_FAILED) {
                perror("mmap");
                return 2;
            }
            madvise(P, PS, MADV_NOHUGEPAGE);
            mapped = slot;
            remaps++;
            if (!repunch)
                check("the remap", r);
        } else {
            punch(slot);                /* changed: the new frame goes at once */
            current = -1;
            refused++;
        }
        uffd_call(UFFDIO_UNREGISTER, &range, "UFFDIO_UNREGISTER");
        if (repunch && old_mapping >= 0 && old_mapping != current)
            punch(old_mapping);         /* what a fault during the write-protect filled */
        check("UFFDIO_UNREGISTER", r);
        uffd_call(UFFDIO_WAKE, &range, "UFFDIO_WAKE");
        check("UFFDIO_WAKE", r);
        /* the next refresh: once P has its own copy, its frame goes */
        if (thread_kind != 1)
            ((volatile char *)P)[8] += 1;
        while (!has_own_copy())
            sched_yield();
        if (current >= 0)
            punch(current);
        current = -1;
        check("the punch", r);
    }
    atomic_store(&stop, 1);
    if (thread_kind)
        pthread_join(t, NULL);
    check("the end", rounds);
    printf("no punched frame came back: %ld rounds (write-protect %d, thread %d, re-punch %d), "
           "%ld remaps, %ld refused, %ld accesses by the thread\n",
           rounds, wp, thread_kind, repunch, remaps, refused, (long)atomic_load(&accesses));
    return 0;
}
