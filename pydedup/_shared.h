/* The C a frame store shared by processes needs (_shared.pxi): a robust,
 * process-shared mutex that lives in the shared mapping, and the start time
 * of a process, which tells a member from a later process of the same pid. */
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

/* When process `pid` started, in clock ticks after boot (field 22 of
 * /proc/<pid>/stat), 0 if there is no such process or it is a zombie (its
 * memory, and with it every mapping of a frame, is gone already). */
static uint64_t pd_process_start(int pid)
{
    char path[64], text[1024];
    const char *p;
    ssize_t n;
    int fd, field;
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = 0;
    p = strrchr(text, ')');         /* the command may hold spaces and parentheses */
    if (p == NULL || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X')
        return 0;
    for (field = 2; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
}

#endif
