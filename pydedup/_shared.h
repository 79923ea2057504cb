/* The C a frame store shared by processes needs (_shared.pxi): a robust,
 * process-shared mutex that lives in the shared mapping, the start time of
 * a process, which tells a member from a later process of the same pid,
 * and the lock that keeps a slot for a child being forked. */
#ifndef PYDEDUP_SHARED_H
#define PYDEDUP_SHARED_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PD_MUTEX_BYTES 64       /* room for a pthread_mutex_t in the shared header */
_Static_assert(sizeof(pthread_mutex_t) <= PD_MUTEX_BYTES, "pthread_mutex_t fits");

/* A mutex for processes that share `at`: robust, so a holder's death
 * hands it to the next locker with EOWNERDEAD instead of leaving it held. */
static int pd_mutex_init(void *at)
{
    pthread_mutexattr_t attr;
    int err = pthread_mutexattr_init(&attr);
    if (err)
        return err;
    err = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (!err)
        err = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (!err)
        err = pthread_mutex_init((pthread_mutex_t *)at, &attr);
    pthread_mutexattr_destroy(&attr);
    return err;
}

/* 0; EOWNERDEAD: held now, its last holder died holding it (repair, then
 * pd_mutex_consistent); or another error (not held). */
static int pd_mutex_lock(void *at) { return pthread_mutex_lock((pthread_mutex_t *)at); }
static int pd_mutex_trylock(void *at) { return pthread_mutex_trylock((pthread_mutex_t *)at); }
static int pd_mutex_consistent(void *at) { return pthread_mutex_consistent((pthread_mutex_t *)at); }
static int pd_mutex_unlock(void *at) { return pthread_mutex_unlock((pthread_mutex_t *)at); }

/* A copy of `fd` that programs this process execs do not inherit: they
 * would keep the store alive after its last member. */
static int pd_dup_cloexec(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }

#define PD_START_UNKNOWN UINT64_MAX

/* When process `pid` started, in clock ticks after boot (field 22 of
 * /proc/<pid>/stat), 0 if there is no such process or it is a zombie (its
 * memory, and with it every mapping of a frame, is gone already), or
 * PD_START_UNKNOWN if /proc could not say (no file descriptor or memory
 * left): a member must never be taken for dead for want of a descriptor.
 * And in *stack where its stack begins (field 28), which an exec moves (a
 * new address space, placed at random), or 0 where /proc hides it (a
 * process that is not dumpable). */
static uint64_t pd_process_start(int pid, uint64_t *stack)
{
    char path[64], text[1024], *end;
    const char *p;
    ssize_t n;
    int fd, field, err;
    uint64_t start;
    *stack = 0;
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? 0 : PD_START_UNKNOWN;
    n = read(fd, text, sizeof(text) - 1);
    err = errno;
    close(fd);
    if (n < 0)
        return err == ESRCH ? 0 : PD_START_UNKNOWN;
    if (n == 0)
        return 0;
    text[n] = 0;
    p = strrchr(text, ')');         /* the command may hold spaces and parentheses */
    if (p == NULL || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X')
        return 0;
    for (field = 2; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    start = strtoull(p, &end, 10);
    for (p = end; *p && field < 28; p++)
        if (*p == ' ')
            field++;
    if (field == 28)
        *stack = strtoull(p, NULL, 10);
    return start;
}

/* The lock that keeps the member slot reserved for a child while it is
 * being forked: an open file description of the records memfd of its own,
 * write-locked at byte `slot`. An OFD lock belongs to the description,
 * which the fork gives the child too, so it holds until both have closed
 * it or died, whatever the order; a child that execs drops it (CLOEXEC).
 * The new descriptor, or -1 (errno). */
static int pd_fork_lock(int records_fd, int slot)
{
    struct flock lock = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = slot, .l_len = 1};
    char path[64];
    int fd, err;
    snprintf(path, sizeof(path), "/proc/self/fd/%d", records_fd);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fcntl(fd, F_OFD_SETLK, &lock) != 0) {
        err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

/* Whether any description holds the lock of `slot` (pd_fork_lock); asked
 * through `records_fd`, which holds none. 1 also when it cannot be told. */
static int pd_fork_locked(int records_fd, int slot)
{
    struct flock lock = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = slot, .l_len = 1};
    if (fcntl(records_fd, F_OFD_GETLK, &lock) != 0)
        return 1;
    return lock.l_type != F_UNLCK;
}

/* The handshake of a child forked without a member slot (Core.fork_prepare):
 * the child writes one byte once it has copied its merged pages; the parent
 * waits for it, or for the pipe's end (the child exited or exec'd). Both
 * retry on EINTR, in C: a Python signal handler that raised in between
 * would end the parent's wait while the child's pages still map frames
 * the parent may free. */
static void pd_handshake_say(int fd)
{
    while (write(fd, "c", 1) < 0 && errno == EINTR)
        ;
}

static void pd_handshake_wait(int fd)
{
    char c;
    while (read(fd, &c, 1) < 0 && errno == EINTR)
        ;
}

#endif
