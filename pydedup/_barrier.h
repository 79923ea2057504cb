/* The write barrier of a merge, in plain C because part of it runs in a
 * signal handler.
 *
 * While a run of arena pages is compared with its target and remapped, the
 * run is write-protected, so that no write can land in a page between the
 * comparison and the remap (the remap would drop it). A writer that touches
 * the run must wait until the remap is done and then succeed. Two ways:
 *
 * - mprotect(PROT_READ) and a SIGSEGV handler. The run is published as an
 *   open *window* before it is protected; a write fault inside an open
 *   window waits (in the handler) until the window closes, then returns, and
 *   the write is retried on whatever the page maps now. Every other fault
 *   goes to the handler that was installed before ours.
 * - userfaultfd write-protect, synchronous mode: the kernel itself parks the
 *   writer (kernel writes too, such as read() into the page) until the range
 *   is woken. Needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1.
 */
#ifndef PYDEDUP_BARRIER_H
#define PYDEDUP_BARRIER_H

#include "_os.h"
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <linux/userfaultfd.h>

/* What <linux/userfaultfd.h> of an older build host may lack. */
#define PD_UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)   /* Linux 5.19 */
#define PD_UFFD_FEATURE_WP_UNPOPULATED     (1 << 13)   /* Linux 6.4 */
#define PD_UFFD_FEATURE_WP_ASYNC           (1 << 15)   /* Linux 6.7 */
#define PD_UFFD_USER_MODE_ONLY 1
#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323
#endif

/* -- mprotect windows ----------------------------------------------------- */

#define PD_WINDOWS 64                 /* arenas merging at the same moment */

struct pd_window {
    _Atomic uint64_t generation;      /* odd while the window is open */
    _Atomic uintptr_t lo, hi;         /* the protected bytes */
    _Atomic int taken;
};

static struct pd_window pd_windows[PD_WINDOWS];
static _Atomic uint64_t pd_windows_closed;       /* windows closed, ever */
static struct sigaction pd_previous_action;      /* the handler before ours */
static _Atomic int pd_chain_depth;
static pthread_mutex_t pd_install_lock = PTHREAD_MUTEX_INITIALIZER;

/* The last fault this thread retried without finding its window, and the
 * window count then: the same fault again, with no window closed in
 * between, is not the barrier's. */
static __thread uintptr_t pd_retried_addr __attribute__((tls_model("initial-exec")));
static __thread uint64_t pd_retried_closed __attribute__((tls_model("initial-exec")));

/* Open a window over [lo, hi) before protecting it; returns its slot. */
static int pd_window_open(uintptr_t lo, uintptr_t hi)
{
    for (;;) {
        for (int i = 0; i < PD_WINDOWS; i++) {
            int free_slot = 0;
            if (atomic_compare_exchange_strong(&pd_windows[i].taken, &free_slot, 1)) {
                atomic_store(&pd_windows[i].lo, lo);
                atomic_store(&pd_windows[i].hi, hi);
                atomic_fetch_add(&pd_windows[i].generation, 1);
                return i;
            }
        }
        sched_yield();                 /* 64 arenas merging at once: wait for a slot */
    }
}

/* Close a window once its pages are remapped or writable again. */
static void pd_window_close(int slot)
{
    atomic_fetch_add(&pd_windows[slot].generation, 1);
    atomic_fetch_add(&pd_windows_closed, 1);
    atomic_store(&pd_windows[slot].taken, 0);
}

/* If addr lies in an open window, wait until that window closes: 1. */
static int pd_wait_for_window(uintptr_t addr)
{
    for (int i = 0; i < PD_WINDOWS; i++) {
        struct pd_window *w = &pd_windows[i];
        uint64_t generation = atomic_load(&w->generation);
        if (!(generation & 1) || addr < atomic_load(&w->lo) || addr >= atomic_load(&w->hi))
            continue;
        while (atomic_load(&w->generation) == generation)
            sched_yield();
        return 1;
    }
    return 0;
}

/* A fault that is not the barrier's goes where it would have gone without
 * us. A handler that faults or raises again inside (Python's faulthandler
 * re-raises after its report) gets the default action, so a crash stays a
 * crash and never loops. */
static void pd_chain(int sig, siginfo_t *info, void *context)
{
    struct sigaction previous = pd_previous_action, fallback;
    if (atomic_fetch_add(&pd_chain_depth, 1) == 0) {
        if (previous.sa_flags & SA_SIGINFO) {
            previous.sa_sigaction(sig, info, context);
            atomic_fetch_sub(&pd_chain_depth, 1);
            return;
        }
        if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
            previous.sa_handler(sig);
            atomic_fetch_sub(&pd_chain_depth, 1);
            return;
        }
    }
    memset(&fallback, 0, sizeof(fallback));
    fallback.sa_handler = SIG_DFL;
    sigaction(sig, &fallback, NULL);
    if (info->si_code <= 0)            /* sent, not a fault: returning would lose it */
        raise(sig);
    /* a fault: returning re-executes the access, which now meets SIG_DFL */
}

static void pd_barrier_handler(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    uintptr_t addr = (uintptr_t)info->si_addr;
    if (info->si_code == SEGV_ACCERR) {
        if (pd_wait_for_window(addr)) {
            errno = saved_errno;
            return;
        }
        /* Maybe the window closed between the fault and now: retry once. */
        uint64_t closed = atomic_load(&pd_windows_closed);
        if (pd_retried_addr != addr || pd_retried_closed != closed) {
            pd_retried_addr = addr;
            pd_retried_closed = closed;
            errno = saved_errno;
            return;
        }
    }
    pd_chain(sig, info, context);
    errno = saved_errno;
}

/* Install the handler, or install it again if another one (Python's
 * faulthandler, say) replaced it since; that one is chained to. 0 or errno. */
static int pd_barrier_install(void)
{
    struct sigaction current, ours;
    int err = 0;
    pthread_mutex_lock(&pd_install_lock);
    if (sigaction(SIGSEGV, NULL, &current) != 0) {
        err = errno;
    } else if (!((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == pd_barrier_handler)) {
        memset(&ours, 0, sizeof(ours));
        ours.sa_sigaction = pd_barrier_handler;
        sigemptyset(&ours.sa_mask);
        ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK | SA_RESTART;
        pd_previous_action = current;
        if (sigaction(SIGSEGV, &ours, NULL) != 0)
            err = errno;
    }
    pthread_mutex_unlock(&pd_install_lock);
    return err;
}

static int pd_barrier_installed(void)
{
    struct sigaction current;
    return sigaction(SIGSEGV, NULL, &current) == 0 && (current.sa_flags & SA_SIGINFO)
           && current.sa_sigaction == pd_barrier_handler;
}

/* -- userfaultfd ---------------------------------------------------------- */

/* A userfaultfd with the features asked for, or -errno. user_mode_only
 * needs no privilege, but faults taken by the kernel then fail (EFAULT). */
static int pd_uffd_open(int user_mode_only, uint64_t features, uint64_t *granted)
{
    int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? PD_UFFD_USER_MODE_ONLY : 0);
    int fd = (int)syscall(SYS_userfaultfd, flags);
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (fd < 0)
        return -errno;
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    *granted = api.features;
    return fd;
}

static int pd_uffd_register(int fd, void *addr, size_t length)
{
    struct uffdio_register reg = {
        .range = { (uint64_t)(uintptr_t)addr, length }, .mode = UFFDIO_REGISTER_MODE_WP };
    return ioctl(fd, UFFDIO_REGISTER, &reg) == 0 ? 0 : errno;
}

static int pd_uffd_unregister(int fd, void *addr, size_t length)
{
    struct uffdio_range range = { (uint64_t)(uintptr_t)addr, length };
    return ioctl(fd, UFFDIO_UNREGISTER, &range) == 0 ? 0 : errno;
}

static int pd_uffd_write_protect(int fd, void *addr, size_t length)
{
    struct uffdio_writeprotect wp = {
        .range = { (uint64_t)(uintptr_t)addr, length }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0 ? 0 : errno;
}

/* The protection off again, without waking anyone: for the asynchronous
 * tracking userfaultfd, whose writers never wait. */
static int pd_uffd_write_unprotect(int fd, void *addr, size_t length)
{
    struct uffdio_writeprotect wp = {
        .range = { (uint64_t)(uintptr_t)addr, length }, .mode = UFFDIO_WRITEPROTECT_MODE_DONTWAKE };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0 ? 0 : errno;
}

static int pd_uffd_wake(int fd, void *addr, size_t length)
{
    struct uffdio_range range = { (uint64_t)(uintptr_t)addr, length };
    return ioctl(fd, UFFDIO_WAKE, &range) == 0 ? 0 : errno;
}

#endif
