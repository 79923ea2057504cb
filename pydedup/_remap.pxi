# Applying targets: the system calls that change what arena pages map. Each
# run is write-protected and compared again right before its remap, since the
# pass compared the pages a while ago; a page that changed meanwhile keeps
# its content. Neighbouring runs may share one protection (gather_run).

cdef int map_frames(Core c, char *addr, size_t length, uint32_t first_frame) noexcept nogil:
    """Frames from first_frame on, all in first_frame's memfd (its tier
    and stripe), over [addr, addr + length)."""
    if mmap(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
            frame_fd(&c.store, first_frame), <long>(file_page(first_frame) * c.res.page_size)) == MAP_FAILED:
        return errno
    madvise(addr, length, MADV_NOHUGEPAGE)
    return 0


cdef run_kind target_kind(Core c, size_t p) noexcept nogil:
    cdef rmap_item *it = &c.res.rmap[p]
    if it.flags & PAGE_TARGET:
        return RUN_FRAMES
    if it.flags & PAGE_TARGET_ZERO:
        return RUN_ZERO_FILE if it.state == PAGE_BROKEN else RUN_ZERO_ANON
    return RUN_NONE


cdef bint still_matches(Core c, size_t p, run_kind kind) noexcept nogil:
    cdef const char *page = page_address(&c.res, p)
    if kind == RUN_FRAMES:
        return memcmp(page, frame_address(&c.store, c.res.rmap[p].frame), c.res.page_size) == 0
    return pd_page_is_zero(page, c.res.page_size)


cdef void drop_targets(Core c, size_t first, size_t n) noexcept nogil:
    """Pages [first, first + n) keep what they map: their targets go, and
    the frames they would have mapped lose them."""
    cdef size_t p
    PD_ASSERT(first + n <= c.res.high_water, "drop_targets: pages below high_water")
    for p in range(first, first + n):
        if c.res.rmap[p].flags & PAGE_TARGET:
            frame_put(&c.store, c.res.rmap[p].frame)
        c.res.rmap[p].flags &= ~(PAGE_TARGET | PAGE_TARGET_ZERO)


cdef void settle_targets(Core c, size_t first, size_t n, run_kind kind, pass_stats *st) noexcept nogil:
    cdef size_t p
    for p in range(first, first + n):
        c.res.rmap[p].state = PAGE_MERGED if kind == RUN_FRAMES else PAGE_ZERO
        c.res.rmap[p].flags &= ~(PAGE_TARGET | PAGE_TARGET_ZERO)
    if kind == RUN_FRAMES:
        st.merged += n
    else:
        st.zeroed += n


cdef void remap_run(Core c, size_t first, size_t n, run_kind kind, bint charge,
                    pass_stats *st) noexcept nogil:
    """One system call for the run. If `charge`, only if the mapping budget
    allows its worst case, which it is charged: zero pages in an anonymous
    mapping cost no mapping and always go."""
    cdef char *addr = page_address(&c.res, first)
    cdef size_t length = n * c.res.page_size
    cdef long cost = worst_remap_cost(kind) if charge else 0
    cdef int err
    if cost > st.mappings_left:
        drop_targets(c, first, n)
        st.skipped_budget += n
        return
    if kind == RUN_ZERO_ANON:
        err = errno if madvise(addr, length, MADV_DONTNEED) != 0 else 0
    elif kind == RUN_ZERO_FILE:
        err = map_anonymous(addr, length)
    else:
        err = map_frames(c, addr, length, c.res.rmap[first].frame)
    st.syscalls += 1
    if err:
        drop_targets(c, first, n)
        st.skipped_no_memory += n
        st.mappings_left = 0            # the kernel said no: add no more mappings
        return
    st.mappings_left -= cost
    c.res.remapped |= kind != RUN_ZERO_ANON
    settle_targets(c, first, n, kind, st)


cdef long worst_remap_cost(run_kind kind) noexcept nogil:
    return 0 if kind == RUN_ZERO_ANON else MAPPINGS_PER_REMAP


cdef void merge_runs(Core c, const target_run *runs, size_t n, pass_stats *st) noexcept nogil:
    """Remap the pages of the runs that still hold the content they were
    matched on, in as few pieces as the pages that changed leave. The runs
    are write-protected from the comparison to the remap (_barrier.pxi),
    under one protection with the pages between them when the barrier holds
    several (gather_run), each alone otherwise.

    When the budget cannot pay a run's worst case, it goes only if the
    kernel's mappings around it say it costs no more than is left
    (_maps.pxi), and in one piece, which is what that prediction was for;
    it is then charged what it really cost. Such a run is held alone."""
    cdef size_t first = runs[0].first, span = runs[n - 1].first + runs[n - 1].n - first
    cdef size_t i
    cdef held_run held
    cdef remap_cost cost
    cdef uint32_t refill_lo = 0, refill_hi = 0
    cdef bint measured = n == 1 and worst_remap_cost(runs[0].kind) > st.mappings_left
    PD_ASSERT(n >= 1 and n <= GROUP_RUNS and (n == 1 or barrier_holds_runs_together(&c.wb)),
              "merge_runs: one run, or runs the barrier holds together")
    if measured and not (predict_remap_cost(c, first, span, runs[0].kind, &cost)
                         and cost.predicted <= st.mappings_left):
        drop_targets(c, first, span)
        st.skipped_budget += span
        return
    held.first, held.n = first, span
    if barrier_may_refill(&c.wb):
        frames_under_broken_pages(c, first, span, &refill_lo, &refill_hi)
    if protect_run(&c.wb, &c.tables, &c.res, &held) != 0:
        if n > 1:                       # a mapping between may refuse: each run alone
            for i in range(n):
                merge_runs(c, &runs[i], 1, st)
            return
        drop_targets(c, first, span)    # the kernel could not split the mapping, or hold room
        st.skipped_no_memory += span
        return
    st.protections += 1
    for i in range(n):
        remap_held_run(c, runs[i].first, runs[i].n, runs[i].kind, measured, st)
    unprotect_run(&c.wb, &c.tables, &c.res, &held, n == 1 and runs[0].kind == RUN_ZERO_ANON, st)
    # UFFDIO_UNREGISTER has write-locked the runs' mappings, or mmap has
    # replaced them: no fault in them is left to fill a hole again.
    punch_refilled(&c.store, refill_lo, refill_hi)
    if measured:
        st.mappings_left -= measured_remap_cost(c, &cost)


cdef void remap_held_run(Core c, size_t first, size_t n, run_kind kind, bint measured,
                         pass_stats *st) noexcept nogil:
    """merge_runs() for one run the barrier holds: compared, then remapped
    where it still matches."""
    cdef size_t i = 0, j
    cdef uint8_t *matches = match_run_ahead(c, first, n, kind, st)
    while i < n:
        j = i
        while j < n and held_page_matches(c, matches, first, j, kind):
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
    free(matches)


cdef inline bint held_page_matches(Core c, const uint8_t *matches, size_t first, size_t j,
                                   run_kind kind) noexcept nogil:
    """Whether page first + j of a held run still holds what it was matched
    on: from match_run_ahead()'s answers if it made them."""
    if matches != NULL:
        return matches[j] != 0
    return still_matches(c, first + j, kind)


cdef uint8_t *match_run_ahead(Core c, size_t first, size_t n, run_kind kind,
                              pass_stats *st) noexcept nogil:
    """still_matches() for every page of a held run at once: from the write
    tracking where it tells (match_by_tracking), else on st.threads threads
    over slices of the run (_hash.h); NULL, and the pages are compared one
    by one, for one thread, a short run, or no memory. The barrier holds
    the run, so the answers hold until its remap."""
    cdef pd_match_job job
    cdef double cpu
    cdef uint8_t *known = match_by_tracking(c, first, n, kind, st)
    if known != NULL:
        return known
    if st.threads < 2 or n < MATCH_AHEAD_PAGES:
        return NULL
    job.match = <uint8_t *>malloc(n)
    if job.match == NULL:
        return NULL
    job.pages = page_address(&c.res, first)
    job.frames = frame_address(&c.store, c.res.rmap[first].frame) if kind == RUN_FRAMES else NULL
    job.page_size = c.res.page_size
    job.n = n
    cpu = pd_match_pages(&job, st.threads)
    st.apply_cpu_seconds += cpu
    st.helper_cpu_seconds += cpu
    return job.match


cdef uint8_t *match_by_tracking(Core c, size_t first, size_t n, run_kind kind,
                                pass_stats *st) noexcept nogil:
    """The answers for a held run without reading again the pages that the
    write tracking shows unwritten since the pass read them: take_written
    protected each page before the pass read it, so a write since would
    show. Only the pages written since are compared. NULL where the
    tracking cannot tell (it is off, or the barrier took it over) or
    asking it costs more than comparing a short run."""
    cdef uint8_t *known
    cdef size_t j
    if n < TRACKED_RUN_PAGES or not (tracking(&c.tables) and barrier_keeps_tracking(&c.wb)):
        return NULL
    if kind == RUN_FRAMES and not frames_trusted(&c.store, c.res.rmap[first].frame, <uint32_t>n):
        return NULL                     # a new frame of them came from a page that changed
    known = <uint8_t *>malloc(n)
    if known == NULL:
        return NULL
    if read_written(&c.tables, first, n, known) != 0:
        free(known)
        return NULL
    for j in range(n):
        if known[j]:
            known[j] = still_matches(c, first + j, kind)
        else:
            known[j] = 1
            st.unwritten += 1
    return known


cdef void frames_under_broken_pages(Core c, size_t first, size_t n,
                                    uint32_t *lo, uint32_t *hi) noexcept nogil:
    """[lo, hi): the top tier's frames that the held pages that are BROKEN
    map, whose punched holes the barrier may fill again
    (barrier_may_refill); empty if it holds none. Noted before the remap,
    which takes their mappings away. Each run of BROKEN pages is looked up
    alone: the MERGED pages between them map frames in use, never punched.
    Without PROCMAP_QUERY (before Linux 6.11): every frame slot."""
    cdef uint32_t high = frames_high(&c.store)
    cdef size_t p = first, q, end = first + n
    cdef frame_tier *top = frames_top(&c.store)
    cdef mapping views[FRAME_STRIPES]   # the identities of the top tier's memfds
    cdef int i
    lo[0] = hi[0] = 0
    while p < end and c.res.rmap[p].state != PAGE_BROKEN:
        p += 1
    if p == end:
        return
    for i in range(FRAME_STRIPES):
        if find_mapping(&c.tables, <uint64_t>top.files[i].view, &views[i]) != 0:
            hi[0] = high
            return
    lo[0] = high
    while p < end:
        q = p
        while q < end and c.res.rmap[q].state == PAGE_BROKEN:
            q += 1
        if q > p:
            widen_by_frames_mapped(c, views, p, q - p, high, lo, hi)
        p = q + 1
    if lo[0] >= hi[0]:
        lo[0] = hi[0] = 0


cdef void widen_by_frames_mapped(Core c, const mapping *views, size_t first, size_t n,
                                 uint32_t high, uint32_t *lo, uint32_t *hi) noexcept nogil:
    """[lo, hi) grown by the frames below `high` of the top tier's memfds
    (`views` are their mappings) that pages [first, first + n) map."""
    cdef uint64_t a = <uint64_t>page_address(&c.res, first), b = a + n * c.res.page_size
    cdef uint64_t s, e, page
    cdef uint32_t f0, f1
    cdef mapping m
    cdef int i
    while a < b and find_mapping(&c.tables, a, &m) == 0 and m.start < b:
        s, e = max(a, m.start), min(b, m.end)
        i = mapped_file(&m, views, FRAME_STRIPES)
        if i >= 0:                      # its pages hold frames of stripe i, in order
            page = (m.offset + (s - m.start)) // c.res.page_size
            f0 = frame_at(i, page)
            f1 = frame_at(i, page + (e - s) // c.res.page_size - 1) + 1
            lo[0] = min(lo[0], min(f0, high))
            hi[0] = max(hi[0], min(f1, high))
        a = e


cdef int mapped_file(const mapping *m, const mapping *files, int n) noexcept nogil:
    """Which of `files` mapping m maps the file of; -1 if none."""
    cdef int i
    for i in range(n):
        if (m.inode == files[i].inode and m.dev_major == files[i].dev_major
                and m.dev_minor == files[i].dev_minor):
            return i
    return -1


cdef bint continues_run(Core c, size_t first, size_t n, uint32_t f) noexcept nogil:
    """Whether frame f follows the n frames of the run at page `first` in
    the same memfd, so that one mmap maps them all."""
    return f == c.res.rmap[first].frame + n and not files_part_at(&c.store, f)


cdef void apply_targets(Core c, pass_stats *st, bint lent) noexcept nogil:
    """Remap every target, run by run in address order. `lent`: the budget's
    plan lent apply what the kernel will give back by joining mappings
    (_budget.pxi), which it does only once a run's protection lets go."""
    cdef run_group group
    cdef target_run run
    cdef size_t p
    cdef run_kind k
    PD_ASSERT(c.res.high_water <= c.res.npages, "apply_targets: high_water within the reservation")
    group.n, group.alone = 0, lent or not barrier_holds_runs_together(&c.wb)
    run.first, run.n, run.kind = 0, 0, RUN_NONE
    for p in range(c.res.high_water + 1):
        k = target_kind(c, p) if p < c.res.high_water else RUN_NONE
        if run.n and k == run.kind and (
                k != RUN_FRAMES or continues_run(c, run.first, run.n, c.res.rmap[p].frame)):
            run.n += 1
            continue
        if run.n:
            gather_run(c, &group, &run, st)
        run.first, run.kind = p, k
        run.n = 1 if k != RUN_NONE else 0
    if group.n:
        merge_runs(c, group.runs, group.n, st)


cdef void free_zero_runs(Core c, size_t first, size_t n, size_t block_pages,
                         pass_stats *st) noexcept nogil:
    """Apply the runs of zero pages of the chunk [first, first + n) now, not
    after the whole decision: the new frames the rest of the pass writes
    then take the memory they free, which the pass would otherwise free
    only after taking more. That lowers its peak, and in a virtual machine
    that hands free memory back to its host, spares the frames memory that
    faults in the host on its first touch (benchmarks/fresh_memory.py): at
    16 GiB of the structured workload, 15% of the merge's CPU time.

    A zero page's target is final once the scan has looked at it, and
    dropping it to the zero page costs no mapping, so nothing the budget
    plans for changes (but for a run that the mprotect barrier must make
    writable again in pieces for want of RLIMIT_DATA room, charged before
    the plan exists: restore_in_pieces). Only whole blocks of `block_pages`
    (a huge page's; 1 without huge pages) all of whose pages are zero
    targets go now: whether a block with other pages is split or kept
    whole (keep_huge_pages) depends on frame targets the rest of the pass
    may still give its pages. Neighbouring runs share a protection as in
    apply_targets(); the comparison under the barrier stays on this thread:
    the helpers are hashing the chunks ahead."""
    cdef size_t p = (first + block_pages - 1) // block_pages * block_pages
    cdef size_t q, block_end, end = first + n
    cdef uint32_t threads = st.threads
    cdef target_run run
    cdef run_group group
    group.n, group.alone = 0, not barrier_holds_runs_together(&c.wb)
    run.first, run.n, run.kind = p, 0, RUN_ZERO_ANON
    st.threads = 1
    while p < end:
        block_end = p + block_pages
        if block_end > end:
            break
        q = p
        while q < block_end and target_kind(c, q) == RUN_ZERO_ANON:
            q += 1
        if q < block_end:               # a page with another target, or none, ends the run
            if run.n:
                gather_run(c, &group, &run, st)
            run.n = 0
        elif run.n == 0:
            run.first, run.n = p, block_end - p
        else:
            run.n += block_end - p
        p = block_end
    if run.n:
        gather_run(c, &group, &run, st)
    if group.n:
        merge_runs(c, group.runs, group.n, st)
    st.threads = threads


cdef void gather_run(Core c, run_group *group, const target_run *run, pass_stats *st) noexcept nogil:
    """Hold `run` with the runs gathered before it, or merge those first.
    A protection costs the uffd barrier six ioctls whatever it holds, four
    of them splitting or joining mappings: most of applying scattered
    targets when each run had its own. Runs join while
    - few pages lie between them: their writers wait too, and they count
      as written at the next pass (the barrier took them from the write
      tracking); no huge page, kept whole, fits between;
    - the span is short: its writers wait for all of it;
    - the budget pays every run at its worst: the mappings a group splits
      join again only when it lets go, so it cannot count on the joins a
      budget plan lends apply. With a plan, and for a run the budget cannot
      pay, runs are held alone."""
    cdef long worst = worst_remap_cost(run.kind)
    cdef const target_run *head = &group.runs[0]
    cdef const target_run *last = &group.runs[group.n - 1] if group.n else NULL
    cdef size_t gap = run.first - (last.first + last.n) if group.n else 0
    PD_ASSERT(group.n == 0 or run.first >= last.first + last.n, "gather_run: runs in address order")
    if group.n and (group.alone or group.n == GROUP_RUNS or gap > GROUP_GAP_PAGES
                    or run.first + run.n - head.first > GROUP_SPAN_PAGES
                    or group.worst + worst > st.mappings_left):
        merge_runs(c, group.runs, group.n, st)
        group.n = 0
    if group.n == 0:
        group.worst = 0
    group.runs[group.n] = run[0]
    group.n += 1
    group.worst += worst


# -- what a remap costs in mappings ---------------------------------------------
#
# One mmap inside a mapping splits it in three, so a pass charges every run
# MAPPINGS_PER_REMAP while the budget allows. When it does not, the pass
# looks at the mappings around the run (_maps.pxi) and predicts what the
# kernel will make of them: a page going back onto the frame it left, inside
# the mapping it left, joins the mappings on both sides and costs nothing.
# The mappings are counted again after the remap, and the budget is charged
# what the remap really cost.

cdef bint predict_remap_cost(Core c, size_t first, size_t n, run_kind kind,
                             remap_cost *cost) noexcept nogil:
    """What remapping the whole run will cost, from the mappings around it;
    False if the kernel cannot show them."""
    cdef uint64_t a = <uint64_t>page_address(&c.res, first), b = a + n * c.res.page_size
    cdef uint64_t lo = <uint64_t>c.res.base, hi = lo + c.res.npages * c.res.page_size
    cdef mapping left, right, placed, view
    cdef bint has_left = a > lo and find_mapping(&c.tables, a - 1, &left) == 0 and left.start < a
    cdef bint has_right = b < hi and find_mapping(&c.tables, b, &right) == 0 and right.start <= b
    cdef bint join_left = False, join_right = False
    cdef bint one_mapping = has_left and has_right and left.start == right.start
    cdef long after = 1
    placed = mapping(a, b, 0, 0, 0, 0, MAPPING_READ_WRITE)
    if kind == RUN_FRAMES:              # the memfd's identity, from its view
        if find_mapping(&c.tables, <uint64_t>frame_address(&c.store, c.res.rmap[first].frame),
                        &view) != 0:
            return False
        placed.inode, placed.dev_major, placed.dev_minor = view.inode, view.dev_major, view.dev_minor
        placed.offset = file_page(c.res.rmap[first].frame) * c.res.page_size
    cost.lo = left.start if has_left else a
    cost.hi = right.end if has_right else b
    cost.before = count_mappings(&c.tables, cost.lo, cost.hi)
    if cost.before < 0:
        return False
    if has_left:                        # what is left of it once the run is unmapped
        left.end = a
        join_left = joins(&left, &placed)
        after += not join_left
    if has_right:
        if right.inode:
            right.offset += b - right.start
        right.start = b
        join_right = joins(&placed, &right)
        after += not join_right
    if join_left and join_right and not one_mapping:
        # Two mappings join through a third only if their anon_vmas agree,
        # which /proc does not show: expect the kernel to join one side.
        after += 1
    cost.predicted = after - cost.before
    return True


cdef long measured_remap_cost(Core c, const remap_cost *cost) noexcept nogil:
    """What the remap did cost, counted again; the worst case if the kernel
    cannot say."""
    cdef long now = count_mappings(&c.tables, cost.lo, cost.hi)
    return now - cost.before if now >= 0 else MAPPINGS_PER_REMAP
