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


cdef void barrier_init(write_barrier *b) noexcept nogil:
    """No barrier chosen yet: a pass refuses to run (Core.check_can_merge)."""
    memset(b, 0, sizeof(write_barrier))
    b.uffd = -1


cdef void barrier_close(write_barrier *b) noexcept nogil:
    if b.uffd >= 0:
        close(b.uffd)
        b.uffd = -1


cdef int barrier_use_uffd(write_barrier *b) noexcept nogil:
    """The 'uffd' barrier, with a userfaultfd of its own replacing any it had
    (after a fork the inherited one acts on the parent); 0 or an errno, and
    then the barrier is as it was."""
    cdef int fd = open_sync_uffd()
    if fd < 0:
        return -fd
    barrier_close(b)
    b.uffd = fd
    b.mode = BARRIER_UFFD
    return 0


cdef int barrier_use_mprotect(write_barrier *b) noexcept nogil:
    """The 'mprotect' barrier and its SIGSEGV handler; 0 or an errno."""
    cdef int err = pd_barrier_install()
    if err:
        return err
    b.mode = BARRIER_MPROTECT
    barrier_close(b)
    return 0


cdef int protect_run(write_barrier *b, page_tables *pt, const reservation *r,
                     held_run *h) noexcept nogil:
    """Write-protect the run's pages [h.first, h.first + h.n); 0 or an errno,
    and then nothing is held."""
    cdef char *addr = page_address(r, h.first)
    cdef size_t length = h.n * r.page_size
    cdef void *room
    cdef int err
    PD_ASSERT(b.mode != 0 and h.n > 0 and h.first + h.n <= r.high_water,
              "protect_run: a barrier, and a run below high_water")
    h.window = -1
    h.room = NULL
    h.taken.n = 0
    if b.mode == BARRIER_UFFD:
        untrack_range(pt, addr, length)
        err = pd_uffd_register(b.uffd, addr, length)
        if err == 0:
            err = pd_uffd_write_protect(b.uffd, addr, length)
            if err:
                pd_uffd_unregister(b.uffd, addr, length)
        if err:
            track_range(pt, addr, length)
        return err
    if b.data_limited:
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
    if b.squeeze_data:
        take_data_slack(r.page_size, &h.taken)
    return 0


cdef void unprotect_run(write_barrier *b, page_tables *pt, reservation *r, held_run *h,
                        bint zeroed_in_place, pass_stats *st) noexcept nogil:
    """Pages that were not remapped become writable again; waiting writers
    go on, into the new mapping where there is one. The new mappings join
    the written-page tracking only now: until the barrier lets go of the
    range, it must be the barrier's userfaultfd alone. `zeroed_in_place`:
    the run's zero pages were dropped with MADV_DONTNEED, not remapped."""
    cdef char *addr = page_address(r, h.first)
    cdef size_t length = h.n * r.page_size
    PD_ASSERT(b.mode != 0 and h.first + h.n <= r.high_water, "unprotect_run: a held run")
    if b.mode == BARRIER_UFFD:
        pd_uffd_unregister(b.uffd, addr, length)  # clears the protection
        pd_uffd_wake(b.uffd, addr, length)        # and wakes writers of remapped pages
    else:
        # The range ends where the protection split its mappings, so making
        # it writable splits nothing and cannot run into the mapping limit;
        # RLIMIT_DATA can refuse it, though.
        if mprotect(addr, length, PROT_READ | PROT_WRITE) != 0:
            restore_in_pieces(b, r, h, zeroed_in_place, st)
        elif h.room != NULL:
            munmap(h.room, length)
        pd_window_close(h.window)
        give_data_slack_back(&h.taken)
    track_range(pt, addr, length)


cdef void take_data_slack(size_t page_size, data_slack *taken) noexcept nogil:
    """What another thread may do while a run is read-only: take all the
    RLIMIT_DATA room there is, the room the run gave up included. Tests
    ask for it (write_barrier.squeeze_data) to meet restore_in_pieces for sure."""
    cdef size_t length = <size_t>1 << 40
    cdef void *piece
    taken.n = 0
    while length >= page_size and taken.n < SLACK_PIECES:
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


cdef inline restore_need restore_need_of(const reservation *r, size_t p,
                                         bint zeroed_in_place) noexcept nogil:
    cdef uint8_t state = r.rmap[p].state
    if state == PAGE_MERGED or (state == PAGE_ZERO and not zeroed_in_place):
        return RESTORE_NOTHING
    return RESTORE_ZEROS if state == PAGE_ZERO else RESTORE_CONTENT


cdef void restore_in_pieces(write_barrier *b, reservation *r, held_run *h, bint zeroed_in_place,
                            pass_stats *st) noexcept nogil:
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
    b.restored_in_pieces += 1
    r.remapped = True
    while i < h.n:
        need = restore_need_of(r, h.first + i, zeroed_in_place)
        j = i + 1
        while j < h.n and restore_need_of(r, h.first + j, zeroed_in_place) == need:
            j += 1
        addr = page_address(r, h.first + i)
        length = (j - i) * r.page_size
        if need != RESTORE_NOTHING and mprotect(addr, length, PROT_READ | PROT_WRITE) != 0:
            while True:
                err = (map_anonymous(addr, length) if need == RESTORE_ZEROS
                       else move_content(r, h, i, j, &kept))
                if err == 0:
                    break
                sched_yield()           # the mapping limit as well: only freeing helps
            st.mappings_left -= MAPPINGS_PER_REMAP
        i = j
    if h.room != NULL and kept < h.n:
        munmap(h.room + kept * r.page_size, (h.n - kept) * r.page_size)
    h.room = NULL


cdef int move_content(reservation *r, held_run *h, size_t i, size_t j, size_t *kept) noexcept nogil:
    """Pages [i, j) of the run onto a copy of themselves in the held room
    (or in fresh memory, if no room was held); the room's pages before i
    that no piece took are let go. 0 or an errno."""
    cdef char *addr = page_address(r, h.first + i)
    cdef size_t length = (j - i) * r.page_size
    cdef void *piece
    cdef int err
    if h.room != NULL:
        piece = h.room + i * r.page_size
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
            munmap(h.room + kept[0] * r.page_size, (i - kept[0]) * r.page_size)
        kept[0] = j
    for p in range(h.first + i, h.first + j):
        if r.rmap[p].state == PAGE_BROKEN:
            r.rmap[p].state = PAGE_PRIVATE   # its content is anonymous memory now
    return 0


cdef int prepare_barrier(write_barrier *b) noexcept nogil:
    """Before a pass: the SIGSEGV handler must be ours, since something
    (Python's faulthandler, say) may have replaced it since the last one."""
    cdef rlimit data
    PD_ASSERT(b.mode != 0, "prepare_barrier: a barrier chosen")
    if b.mode == BARRIER_MPROTECT:
        b.data_limited = getrlimit(RLIMIT_DATA, &data) == 0 and data.rlim_cur != RLIM_INFINITY
        return pd_barrier_install()
    return 0


cdef bint barrier_may_refill(const write_barrier *b) noexcept nogil:
    """Whether a write fault under this barrier can fill a punched frame's
    hole again. The uffd barrier's UFFDIO_WRITEPROTECT changes the page table
    under the mmap lock taken for reading, and UFFDIO_UNREGISTER clears the
    protection before it write-locks the mapping, so a write fault can run
    alongside and, as far as the kernel source tells, meet the entry while
    the kernel has it cleared (ptep_modify_prot_start). On a BROKEN page the
    fault then takes the page for missing, reads its file page from the memfd
    (shmem allocates a punched hole again) and throws its copy away, the
    entry being back: a page of zeros in a free frame slot
    (benchmarks/uffd_refill.c shows it without pydedup). The mprotect
    barrier changes no page table under a fault."""
    return b.mode == BARRIER_UFFD


cdef bint barrier_holds_runs_together(const write_barrier *b) noexcept nogil:
    """Whether one protection may hold several runs and the pages between
    them (_remap.pxi merge_runs). The uffd barrier parks every writer and
    lets go of a range in one piece whatever it holds. Under mprotect a
    kernel write into a held page fails with EFAULT, and the pages between
    runs are unique pages that may be live I/O buffers; its way back is per
    run too: what each page needs to be writable again depends on how its
    run was remapped (restore_need_of), and the RLIMIT_DATA room held is
    the run's."""
    return b.mode == BARRIER_UFFD


cdef bint barrier_keeps_tracking(const write_barrier *b) noexcept nogil:
    """Whether written-page tracking (_track.pxi) still tells, of a run this
    barrier holds, which pages were written since the pass read them:
    mprotect leaves the pages' userfaultfd write-protect bits alone, while
    the uffd barrier takes the range from the tracking userfaultfd, which
    clears them."""
    return b.mode == BARRIER_MPROTECT
