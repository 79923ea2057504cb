# The write barrier (_barrier.h): each run is write-protected while it is
# compared with its target and remapped, so no write can fall between the two.
# Writers that touch the run wait and then write to whatever it maps.

cdef int open_sync_uffd() noexcept nogil:
    """A userfaultfd for synchronous write-protect of anonymous and memfd
    mappings (broken pages live in the latter), or -errno: EPERM without
    CAP_SYS_PTRACE and vm.unprivileged_userfaultfd=0."""
    cdef uint64_t granted = 0
    cdef int fd = pd_uffd_open(0, PD_UFFD_FEATURE_WP_HUGETLBFS_SHMEM | PD_UFFD_FEATURE_WP_UNPOPULATED,
                               &granted)
    if fd >= 0 and not granted & PD_UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
        close(fd)
        return -EOPNOTSUPP
    return fd


cdef int open_barrier_uffd(Core c) noexcept nogil:
    """The barrier's userfaultfd, replacing any it had; 0 or an errno."""
    cdef int fd = open_sync_uffd()
    if fd < 0:
        return -fd
    if c.barrier_uffd >= 0:
        close(c.barrier_uffd)
    c.barrier_uffd = fd
    return 0


cdef int protect_run(Core c, char *addr, size_t length, int *window) noexcept nogil:
    cdef int err
    if c.barrier == BARRIER_UFFD:
        untrack_range(c, addr, length)
        err = pd_uffd_register(c.barrier_uffd, addr, length)
        if err == 0:
            err = pd_uffd_write_protect(c.barrier_uffd, addr, length)
            if err:
                pd_uffd_unregister(c.barrier_uffd, addr, length)
        if err:
            track_range(c, addr, length)
        return err
    window[0] = pd_window_open(<uintptr_t>addr, <uintptr_t>(addr + length))
    if mprotect(addr, length, PROT_READ) != 0:
        err = errno
        pd_window_close(window[0])
        return err
    return 0


cdef void unprotect_run(Core c, char *addr, size_t length, int window) noexcept nogil:
    """Pages that were not remapped become writable again; waiting writers
    go on, into the new mapping where there is one. The new mappings join
    the written-page tracking only now: until the barrier lets go of the
    range, it must be the barrier's userfaultfd alone."""
    if c.barrier == BARRIER_UFFD:
        pd_uffd_unregister(c.barrier_uffd, addr, length)  # clears the protection
        pd_uffd_wake(c.barrier_uffd, addr, length)        # and wakes writers of remapped pages
    else:
        # The range ends where the protection split its mappings, so making
        # it writable splits nothing and cannot run into the mapping limit.
        while mprotect(addr, length, PROT_READ | PROT_WRITE) != 0 and errno in (ENOMEM, EAGAIN):
            sched_yield()
        pd_window_close(window)
    track_range(c, addr, length)


cdef int prepare_barrier(Core c) noexcept nogil:
    """Before a pass: the SIGSEGV handler must be ours, since something
    (Python's faulthandler, say) may have replaced it since the last one."""
    if c.barrier == BARRIER_MPROTECT:
        return pd_barrier_install()
    return 0
