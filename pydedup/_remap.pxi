# Applying targets: the system calls that change what arena pages map. Each
# run is write-protected and compared again right before its remap, since the
# pass compared the pages a while ago; a page that changed meanwhile keeps
# its content.

cdef enum run_kind:
    RUN_NONE = 0
    RUN_ZERO_ANON = 1      # zero pages in an anonymous mapping: MADV_DONTNEED
    RUN_ZERO_FILE = 2      # zero pages in a frame-store mapping: anonymous mmap
    RUN_FRAMES = 3         # pages onto consecutive frames of one tier: one mmap of its memfd

cdef enum:
    MAPPINGS_PER_REMAP = 2 # an mmap inside a mapping splits it in three


cdef int map_anonymous(Core c, char *addr, size_t length) noexcept nogil:
    """Fresh zero-filled anonymous memory over [addr, addr + length). Here
    MADV_DONTNEED would bring a file mapping's frame back, not zeros."""
    if mmap(addr, length, PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) == MAP_FAILED:
        return errno
    madvise(addr, length, MADV_NOHUGEPAGE)   # same flags as its neighbours: they merge
    return 0


cdef int map_frames(Core c, char *addr, size_t length, uint32_t first_frame) noexcept nogil:
    """Frames from first_frame on, all in first_frame's tier, over
    [addr, addr + length)."""
    if mmap(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
            tier_of(c, first_frame).fd, <long>first_frame * c.page_size) == MAP_FAILED:
        return errno
    madvise(addr, length, MADV_NOHUGEPAGE)
    return 0


cdef int populate_write(Core c, size_t first, size_t n) noexcept nogil:
    cdef char *addr = page_address(c, first)
    cdef size_t i
    if madvise(addr, n * c.page_size, MADV_POPULATE_WRITE) == 0:
        return 0
    if errno != EINVAL:                 # EINVAL: a kernel before 5.14
        return errno
    for i in range(n):
        pd_touch_write(addr + i * c.page_size)
    return 0


cdef run_kind target_kind(Core c, size_t p) noexcept nogil:
    cdef rmap_item *it = &c.rmap[p]
    if it.flags & PAGE_TARGET:
        return RUN_FRAMES
    if it.flags & PAGE_TARGET_ZERO:
        return RUN_ZERO_FILE if it.state == PAGE_BROKEN else RUN_ZERO_ANON
    return RUN_NONE


cdef bint still_matches(Core c, size_t p, run_kind kind) noexcept nogil:
    cdef const char *page = page_address(c, p)
    if kind == RUN_FRAMES:
        return memcmp(page, frame_address(c, c.rmap[p].frame), c.page_size) == 0
    return pd_page_is_zero(page, c.page_size)


cdef void drop_targets(Core c, size_t first, size_t n) noexcept nogil:
    cdef size_t p
    for p in range(first, first + n):
        if c.rmap[p].flags & PAGE_TARGET:
            frame_put(c, c.rmap[p].frame)
        c.rmap[p].flags &= ~(PAGE_TARGET | PAGE_TARGET_ZERO)


cdef void settle_targets(Core c, size_t first, size_t n, run_kind kind, pass_stats *st) noexcept nogil:
    cdef size_t p
    for p in range(first, first + n):
        c.rmap[p].state = PAGE_MERGED if kind == RUN_FRAMES else PAGE_ZERO
        c.rmap[p].flags &= ~(PAGE_TARGET | PAGE_TARGET_ZERO)
    if kind == RUN_FRAMES:
        st.merged += n
    else:
        st.zeroed += n


cdef void remap_run(Core c, size_t first, size_t n, run_kind kind, bint charge,
                    pass_stats *st) noexcept nogil:
    """One system call for the run. If `charge`, only if the mapping budget
    allows its worst case, which it is charged: zero pages in an anonymous
    mapping cost no mapping and always go."""
    cdef char *addr = page_address(c, first)
    cdef size_t length = n * c.page_size
    cdef long cost = worst_remap_cost(kind) if charge else 0
    cdef int err
    if cost > st.mappings_left:
        drop_targets(c, first, n)
        st.skipped_budget += n
        return
    if kind == RUN_ZERO_ANON:
        err = errno if madvise(addr, length, MADV_DONTNEED) != 0 else 0
    elif kind == RUN_ZERO_FILE:
        err = map_anonymous(c, addr, length)
    else:
        err = map_frames(c, addr, length, c.rmap[first].frame)
    st.syscalls += 1
    if err:
        drop_targets(c, first, n)
        st.skipped_no_memory += n
        st.mappings_left = 0            # the kernel said no: add no more mappings
        return
    st.mappings_left -= cost
    c.remapped |= kind != RUN_ZERO_ANON
    settle_targets(c, first, n, kind, st)


cdef inline long worst_remap_cost(run_kind kind) noexcept nogil:
    return 0 if kind == RUN_ZERO_ANON else MAPPINGS_PER_REMAP


cdef void merge_run(Core c, size_t first, size_t n, run_kind kind, pass_stats *st) noexcept nogil:
    """Remap the pages of the run that still hold the content they were
    matched on, in as few pieces as the pages that changed leave. The run is
    write-protected from the comparison to the remap (_barrier.pxi).

    When the budget cannot pay the worst case, the run goes only if the
    kernel's mappings around it say it costs no more than is left
    (_maps.pxi), and in one piece, which is what that prediction was for;
    it is then charged what it really cost."""
    cdef size_t i = 0, j
    cdef held_run held
    cdef remap_cost cost
    cdef bint measured = worst_remap_cost(kind) > st.mappings_left
    if measured and not (predict_remap_cost(c, first, n, kind, &cost)
                         and cost.predicted <= st.mappings_left):
        drop_targets(c, first, n)
        st.skipped_budget += n
        return
    held.first, held.n = first, n
    if protect_run(c, &held) != 0:
        drop_targets(c, first, n)       # the kernel could not split the mapping, or hold room
        st.skipped_no_memory += n
        return
    while i < n:
        j = i
        while j < n and still_matches(c, first + j, kind):
            j += 1
        if j > i and measured and i > 0:
            drop_targets(c, first + i, j - i)
            st.skipped_budget += j - i
        elif j > i:
            remap_run(c, first + i, j - i, kind, not measured, st)
        if j < n:
            drop_targets(c, first + j, 1)
            st.skipped_changed += 1
        i = j + 1
    unprotect_run(c, &held, kind == RUN_ZERO_ANON, st)
    if measured:
        st.mappings_left -= measured_remap_cost(c, &cost)


cdef inline bint continues_run(Core c, size_t first, size_t n, uint32_t f) noexcept nogil:
    """Whether frame f follows the n frames of the run at page `first` in
    the same memfd, so that one mmap maps them all."""
    return f == c.rmap[first].frame + n and not tier_starts_at(c, f)


cdef void apply_targets(Core c, pass_stats *st) noexcept nogil:
    cdef size_t p, first = 0, n = 0
    cdef run_kind kind = RUN_NONE, k
    for p in range(c.high_water + 1):
        k = target_kind(c, p) if p < c.high_water else RUN_NONE
        if n and k == kind and (k != RUN_FRAMES or continues_run(c, first, n, c.rmap[p].frame)):
            n += 1
            continue
        if n:
            merge_run(c, first, n, kind, st)
        first, kind = p, k
        n = 1 if k != RUN_NONE else 0
