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


cdef enum:
    SLACK_PIECES = 48              # mappings that take a whole RLIMIT_DATA slack, halving

cdef struct data_slack:            # what take_data_slack took
    void *addr[SLACK_PIECES]
    size_t length[SLACK_PIECES]
    int n

cdef struct held_run:              # a run under the barrier, from protect_run to unprotect_run
    size_t first, n                # its pages
    int window                     # the mprotect barrier's window over it
    char *room                     # RLIMIT_DATA room held for its way back, or NULL
    data_slack taken               # for tests (Core.squeeze_data): the slack another thread took
    uint32_t mapped_lo, mapped_hi  # uffd: frames its BROKEN pages map, whose holes it may fill


cdef int protect_run(Core c, held_run *h) noexcept nogil:
    cdef char *addr = page_address(c, h.first)
    cdef size_t length = h.n * c.page_size
    cdef void *room
    cdef int err
    h.window = -1
    h.room = NULL
    h.taken.n = 0
    if c.barrier == BARRIER_UFFD:
        note_mapped_frames(c, h)
        untrack_range(c, addr, length)
        err = pd_uffd_register(c.barrier_uffd, addr, length)
        if err == 0:
            err = pd_uffd_write_protect(c.barrier_uffd, addr, length)
            if err:
                pd_uffd_unregister(c.barrier_uffd, addr, length)
        if err:
            track_range(c, addr, length)
        return err
    if c.data_limited:
        # RLIMIT_DATA counts a private mapping only while it is writable: the
        # run's room is free while it is read-only, and another thread may
        # take it. Holding room of the same size keeps the way back open.
        room = mmap(NULL, length, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if room == MAP_FAILED:
            return errno
        h.room = <char *>room
    h.window = pd_window_open(<uintptr_t>addr, <uintptr_t>(addr + length))
    if mprotect(addr, length, PROT_READ) != 0:
        err = errno
        pd_window_close(h.window)
        if h.room != NULL:
            munmap(h.room, length)
        return err
    if c.squeeze_data:
        take_data_slack(c, &h.taken)
    return 0


cdef void unprotect_run(Core c, held_run *h, bint zeroed_in_place, pass_stats *st) noexcept nogil:
    """Pages that were not remapped become writable again; waiting writers
    go on, into the new mapping where there is one. The new mappings join
    the written-page tracking only now: until the barrier lets go of the
    range, it must be the barrier's userfaultfd alone. `zeroed_in_place`:
    the run's zero pages were dropped with MADV_DONTNEED, not remapped."""
    cdef char *addr = page_address(c, h.first)
    cdef size_t length = h.n * c.page_size
    if c.barrier == BARRIER_UFFD:
        pd_uffd_unregister(c.barrier_uffd, addr, length)  # clears the protection
        pd_uffd_wake(c.barrier_uffd, addr, length)        # and wakes writers of remapped pages
        punch_refilled(c, h.mapped_lo, h.mapped_hi)
    else:
        # The range ends where the protection split its mappings, so making
        # it writable splits nothing and cannot run into the mapping limit;
        # RLIMIT_DATA can refuse it, though.
        if mprotect(addr, length, PROT_READ | PROT_WRITE) != 0:
            restore_in_pieces(c, h, zeroed_in_place, st)
        elif h.room != NULL:
            munmap(h.room, length)
        pd_window_close(h.window)
        give_data_slack_back(&h.taken)
    track_range(c, addr, length)


cdef void note_mapped_frames(Core c, held_run *h) noexcept nogil:
    """Which frames of the top tier the run's BROKEN pages map, before the
    uffd barrier takes it: [h.mapped_lo, h.mapped_hi), empty if none.

    Their frames may be punched already (a BROKEN page has its own copy),
    and the barrier can fill such a hole again while a thread writes the
    page: UFFDIO_WRITEPROTECT changes the page table under the mmap lock
    taken for reading, and UFFDIO_UNREGISTER clears the protection before it
    write-locks the mapping, so a write fault can run alongside and, as far
    as the kernel source tells, meet the entry while the kernel has it
    cleared (ptep_modify_prot_start). The fault then takes the page for
    missing, reads its file page from the memfd (shmem allocates the hole)
    and throws its copy away, the entry being back: a page of zeros in a free
    frame slot until the arena closes (benchmarks/uffd_refill.c shows it).
    Once UFFDIO_UNREGISTER has write-locked the run's mappings, or mmap has
    replaced them, every fault in them has ended: unprotect_run then punches
    these frames again. Without PROCMAP_QUERY (before Linux 6.11) every frame
    slot is looked at."""
    cdef frame_tier *top = &c.tiers[c.ntiers - 1]
    cdef uint64_t a = <uint64_t>page_address(c, h.first), b = a + h.n * c.page_size
    cdef uint64_t s, e, f0, f1
    cdef mapping view, m
    cdef size_t p
    h.mapped_lo = h.mapped_hi = 0
    for p in range(h.first, h.first + h.n):
        if c.rmap[p].state == PAGE_BROKEN:
            break
    else:
        return
    if find_mapping(c, <uint64_t>top.view, &view) != 0:
        h.mapped_lo, h.mapped_hi = 0, c.frame_high
        return
    h.mapped_lo = c.frame_high
    while a < b and find_mapping(c, a, &m) == 0 and m.start < b:
        s, e = max(a, m.start), min(b, m.end)
        if m.inode == view.inode and m.dev_major == view.dev_major and m.dev_minor == view.dev_minor:
            f0 = (m.offset + (s - m.start)) // c.page_size
            f1 = f0 + (e - s) // c.page_size
            h.mapped_lo = min(h.mapped_lo, <uint32_t>f0)
            h.mapped_hi = max(h.mapped_hi, <uint32_t>min(f1, <uint64_t>c.frame_high))
        a = e
    if h.mapped_lo >= h.mapped_hi:
        h.mapped_lo = h.mapped_hi = 0


cdef void take_data_slack(Core c, data_slack *taken) noexcept nogil:
    """What another thread may do while a run is read-only: take all the
    RLIMIT_DATA room there is, the room the run gave up included. Tests
    ask for it (Core.squeeze_data) to meet restore_in_pieces for sure."""
    cdef size_t length = <size_t>1 << 40
    cdef void *piece
    taken.n = 0
    while length >= c.page_size and taken.n < SLACK_PIECES:
        piece = mmap(NULL, length, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if piece == MAP_FAILED:
            length //= 2
            continue
        taken.addr[taken.n], taken.length[taken.n] = piece, length
        taken.n += 1


cdef void give_data_slack_back(data_slack *taken) noexcept nogil:
    while taken.n > 0:
        taken.n -= 1
        munmap(taken.addr[taken.n], taken.length[taken.n])


cdef enum restore_need:            # what a page of a protected run needs to be writable again
    RESTORE_NOTHING = 0            # remapped: a fresh writable mapping already
    RESTORE_ZEROS = 1              # dropped to the zero page in place
    RESTORE_CONTENT = 2            # not remapped: it keeps content of its own


cdef inline restore_need restore_need_of(Core c, size_t p, bint zeroed_in_place) noexcept nogil:
    cdef uint8_t state = c.rmap[p].state
    if state == PAGE_MERGED or (state == PAGE_ZERO and not zeroed_in_place):
        return RESTORE_NOTHING
    return RESTORE_ZEROS if state == PAGE_ZERO else RESTORE_CONTENT


cdef void restore_in_pieces(Core c, held_run *h, bint zeroed_in_place, pass_stats *st) noexcept nogil:
    """mprotect could not make the run writable again: RLIMIT_DATA is spent.
    A mapping laid over existing pages (mmap MAP_FIXED, mremap) is not
    charged for it, so each piece that needs one gets one: zero pages a
    fresh anonymous mapping, pages with content the held room's pages,
    holding a copy. Each piece may cost the mapping budget its worst case."""
    cdef size_t i = 0, j, kept = 0
    cdef size_t length
    cdef restore_need need
    cdef char *addr
    cdef int err
    c.restored_in_pieces += 1
    c.remapped = True
    while i < h.n:
        need = restore_need_of(c, h.first + i, zeroed_in_place)
        j = i + 1
        while j < h.n and restore_need_of(c, h.first + j, zeroed_in_place) == need:
            j += 1
        addr = page_address(c, h.first + i)
        length = (j - i) * c.page_size
        if need != RESTORE_NOTHING and mprotect(addr, length, PROT_READ | PROT_WRITE) != 0:
            while True:
                err = (map_anonymous(c, addr, length) if need == RESTORE_ZEROS
                       else move_content(c, h, i, j, &kept))
                if err == 0:
                    break
                sched_yield()           # the mapping limit as well: only freeing helps
            st.mappings_left -= MAPPINGS_PER_REMAP
        i = j
    if h.room != NULL and kept < h.n:
        munmap(h.room + kept * c.page_size, (h.n - kept) * c.page_size)
    h.room = NULL


cdef int move_content(Core c, held_run *h, size_t i, size_t j, size_t *kept) noexcept nogil:
    """Pages [i, j) of the run onto a copy of themselves in the held room
    (or in fresh memory, if no room was held); the room's pages before i
    that no piece took are let go. 0 or an errno."""
    cdef char *addr = page_address(c, h.first + i)
    cdef size_t length = (j - i) * c.page_size
    cdef void *piece
    cdef int err
    if h.room != NULL:
        piece = h.room + i * c.page_size
    else:
        piece = mmap(NULL, length, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if piece == MAP_FAILED:
            return errno
    memcpy(piece, addr, length)
    if mremap(piece, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, addr) == MAP_FAILED:
        err = errno
        if h.room == NULL:
            munmap(piece, length)
        return err
    if h.room != NULL:
        if i > kept[0]:
            munmap(h.room + kept[0] * c.page_size, (i - kept[0]) * c.page_size)
        kept[0] = j
    for p in range(h.first + i, h.first + j):
        if c.rmap[p].state == PAGE_BROKEN:
            c.rmap[p].state = PAGE_PRIVATE   # its content is anonymous memory now
    return 0


cdef int prepare_barrier(Core c) noexcept nogil:
    """Before a pass: the SIGSEGV handler must be ours, since something
    (Python's faulthandler, say) may have replaced it since the last one."""
    cdef rlimit data
    if c.barrier == BARRIER_MPROTECT:
        c.data_limited = getrlimit(RLIMIT_DATA, &data) == 0 and data.rlim_cur != RLIM_INFINITY
        return pd_barrier_install()
    return 0
