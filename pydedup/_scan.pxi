# The scan, after mm/ksm.c. Every page in use is looked at once
# (cmp_and_merge_page) and given a target: the zero page, a frame of the
# stable tree, or a new frame shared with an identical page of the unstable
# tree. Then the targets are applied in runs (_remap.pxi), each run checked
# again, under the write barrier, just before it is remapped.
#
# merge() makes a whole scan at once (merge_pass) and merges a page even if
# it changed since the last scan: it is asked for "now". The background
# scanner takes a scan in steps (scan_batch) and, as ksmd, merges only pages
# whose content held still since the previous scan.

cdef inline bint frame_written(uint8_t cats) noexcept nogil:
    """A MERGED page no longer maps its frame: copy-on-write gave it its own."""
    return (cats & PD_PAGE_IS_SWAPPED) or (cats & PD_PAGE_IS_PRESENT and not cats & PD_PAGE_IS_FILE)


cdef inline bint zero_written(uint8_t cats) noexcept nogil:
    """A ZERO page no longer maps the zero page: it was written."""
    return (cats & PD_PAGE_IS_SWAPPED) or (cats & PD_PAGE_IS_PRESENT and not cats & PD_PAGE_IS_PFNZERO)


cdef int refresh_states(Core c, size_t first, size_t n) noexcept nogil:
    """Bring MERGED and ZERO pages that were written since up to date: they
    become BROKEN and PRIVATE, and frames that lose their last page go."""
    cdef uint8_t *cats = <uint8_t *>malloc(STATE_CHUNK)
    cdef size_t done = 0, i, chunk
    cdef rmap_item *it
    cdef int err = 0
    PD_ASSERT(first + n <= c.res.npages, "refresh_states: pages of the reservation")
    if cats == NULL:
        return ENOMEM
    while done < n and err == 0:
        chunk = min(n - done, <size_t>STATE_CHUNK)
        err = read_categories(&c.tables, first + done, chunk, cats)
        for i in range(chunk if err == 0 else 0):
            it = &c.res.rmap[first + done + i]
            if it.state == PAGE_MERGED and frame_written(cats[i]):
                it.state = PAGE_BROKEN
                it.flags &= ~PAGE_CHECKSUMMED
                frame_put(&c.store, it.frame)
            elif it.state == PAGE_ZERO and zero_written(cats[i]):
                it.state = PAGE_PRIVATE
                it.flags &= ~PAGE_CHECKSUMMED
        done += chunk
    free(cats)
    reclaim_frames(&c.store)
    return err


cdef bint mergeable(const rmap_item *it) noexcept nogil:
    """Whether a page may be merged: its own content, not excluded."""
    return (it.state == PAGE_PRIVATE or it.state == PAGE_BROKEN) and not it.flags & PAGE_UNMERGEABLE


# -- the unstable tree: one per scan, chained through the rmap items ---------

cdef int begin_scan(Core c) noexcept nogil:
    """A fresh, empty unstable tree, with buckets for chains of two or three
    (2-4 bytes a candidate page)."""
    cdef size_t p, candidates = 0
    cdef uint32_t mask = 15
    for p in range(c.res.high_water):
        candidates += mergeable(&c.res.rmap[p])
    while mask + 1 < candidates // 2:
        mask = 2 * mask + 1
    free(c.scan.unstable)
    c.scan.unstable = <uint32_t *>malloc((<size_t>mask + 1) * sizeof(uint32_t))
    if c.scan.unstable == NULL:
        return ENOMEM
    memset(c.scan.unstable, 0xFF, (<size_t>mask + 1) * sizeof(uint32_t))
    c.scan.unstable_mask = mask
    c.scan.cursor = 0
    c.scan.last_new_frame = NO_FRAME
    c.scan.run_last = NO_PAGE
    return 0


cdef void end_scan(Core c, pass_stats *st) noexcept nogil:
    """What is left in the unstable tree is unique: count it, drop the tree."""
    cdef size_t p
    PD_ASSERT(c.scan.unstable != NULL, "end_scan: a scan in progress")
    for p in range(c.res.high_water):
        if c.res.rmap[p].flags & PAGE_UNSTABLE:
            c.res.rmap[p].flags &= ~PAGE_UNSTABLE
            st.unshared += 1
    free(c.scan.unstable)
    c.scan.unstable = NULL
    c.scan.cursor = 0


cdef inline bint same_content(Core c, const char *page, const char *other) noexcept nogil:
    """Whether two pages of one checksum hold one content: their bytes, or
    the checksum taken for them where applying compares every page again
    (c.scan.by_checksum; _frames.pxi holds_page for a frame)."""
    return c.scan.by_checksum or memcmp(page, other, c.res.page_size) == 0


cdef size_t unstable_tree_search_insert(Core c, size_t p) noexcept nogil:
    """An earlier page of this scan with the same content as page p, taken
    out of the tree; or NO_PAGE, and p goes into the tree."""
    cdef rmap_item *it = &c.res.rmap[p]
    cdef uint32_t *head = &c.scan.unstable[tree_key(&c.store, it.checksum, it.node) & c.scan.unstable_mask]
    cdef uint32_t *link = head
    cdef uint32_t q = link[0]
    while q != NO_PAGE:
        if (c.res.rmap[q].checksum == it.checksum
                and same_tree(&c.store, c.res.rmap[q].node, it.node)
                and same_content(c, page_address(&c.res, q), page_address(&c.res, p))):
            link[0] = c.res.rmap[q].frame
            c.res.rmap[q].flags &= ~PAGE_UNSTABLE
            return q
        link = &c.res.rmap[q].frame
        q = link[0]
    it.frame = head[0]
    head[0] = <uint32_t>p
    it.flags |= PAGE_UNSTABLE
    return NO_PAGE


cdef void unstable_tree_erase(Core c, size_t p) noexcept nogil:
    """Take page p out of the tree of the scan in progress: it is freed or
    made unmergeable, and its record must not stay linked."""
    cdef uint32_t *link
    PD_ASSERT(p < c.res.npages, "unstable_tree_erase: a page of the reservation")
    if not c.res.rmap[p].flags & PAGE_UNSTABLE:
        return
    link = &c.scan.unstable[tree_key(&c.store, c.res.rmap[p].checksum, c.res.rmap[p].node) & c.scan.unstable_mask]
    while link[0] != NO_PAGE:
        if link[0] == p:
            link[0] = c.res.rmap[p].frame
            break
        link = &c.res.rmap[link[0]].frame
    c.res.rmap[p].flags &= ~PAGE_UNSTABLE


# -- deciding each page's target ----------------------------------------------

cdef inline void set_target(Core c, size_t p, uint32_t f) noexcept nogil:
    c.res.rmap[p].frame = f
    c.res.rmap[p].flags |= PAGE_TARGET
    frame_get(&c.store, f)


cdef uint32_t new_stable_frame(Core c, const char *content, uint32_t checksum, uint16_t node,
                               uint32_t hint, pass_stats *st) noexcept nogil:
    """A frame holding `content`, with memory of `node` and in its stable
    tree; NO_FRAME if the frame store cannot grow."""
    cdef uint32_t f
    frames_write_other_node(&c.store, node)     # under their node's policy
    prefer_node(&c.nodes, node)
    f = stable_tree_add(&c.store, content, checksum, node, hint)
    st.frames_new += f != NO_FRAME
    return f


cdef inline uint32_t page_zero_key(Core c, size_t p) noexcept nogil:
    """The stable-tree key of page p when it is all zero (zero_key)."""
    return zero_key(&c.store, <size_t>c.res.base // c.res.page_size + p)


cdef void cmp_and_merge_page(Core c, size_t p, bint written, scan_knobs *k,
                             pass_stats *st) noexcept nogil:
    """Give page p its target. A page not written since it was hashed is not
    read again: its checksum still holds."""
    cdef rmap_item *it = &c.res.rmap[p]
    cdef const char *page = page_address(&c.res, p)
    cdef uint32_t checksum, f
    cdef bint zero, changed = False
    cdef size_t q
    if written or not it.flags & PAGE_CHECKSUMMED:
        st.hashed += 1
        if not hashed_ahead(&c.scan.hashes, p, &zero, &checksum):
            zero = pd_page_is_zero(page, c.res.page_size)
            checksum = 0 if zero else <uint32_t>pd_page_checksum(page, c.res.page_size)
        if zero:
            checksum = page_zero_key(c, p)
        changed = not (it.flags & PAGE_CHECKSUMMED and it.checksum == checksum)
        if changed and it.flags & PAGE_CHECKSUMMED:
            st.volatile += 1
        it.checksum = checksum
        it.flags |= PAGE_CHECKSUMMED
    else:
        checksum = it.checksum
        zero = checksum == page_zero_key(c, p) and pd_page_is_zero(page, c.res.page_size)
    if changed and not k.merge_volatile:
        return                          # KSM's rule: only content that held still for a pass
    if zero and k.use_zero_pages:
        it.flags |= PAGE_TARGET_ZERO
        return
    f = tile_continuation(c, p, page, checksum, k, st)
    if f == NO_FRAME and k.tile_pages > 1:
        f = tile_restart(c, p, page, checksum, st)
    if f == NO_FRAME:
        f = stable_tree_search(&c.store, page, checksum, it.node, k.max_page_sharing,
                               c.scan.by_checksum)
        if f != NO_FRAME:
            f = tile_start(&c.store, f, k.max_page_sharing)
    if f == NO_FRAME and frames_shared(&c.store):
        # Shared by processes: content of no frame yet becomes one at once
        # (the page's own memory is freed by the remap), so that a page of
        # another member finds it; the unstable tree is this process's.
        f = new_stable_frame(c, page, checksum, it.node, c.scan.last_new_frame + 1, st)
        if f == NO_FRAME:
            st.skipped_no_memory += 1
            return
        c.scan.last_new_frame = f
    if f == NO_FRAME:
        q = unstable_tree_search_insert(c, p)
        if q == NO_PAGE:
            return
        # The frame after the last new one: a copied array maps back in one
        # run. It is written on the node of the page that was there first,
        # which KSM would have made the shared page.
        f = new_stable_frame(c, page, checksum, c.res.rmap[q].node, c.scan.last_new_frame + 1, st)
        if f == NO_FRAME:
            st.skipped_no_memory += 2
            return
        c.scan.last_new_frame = f
        set_target(c, q, f)
        if q + 1 == p:                  # a run of one content begins: p starts a tile
            f = tile_continuation(c, p, page, checksum, k, st)
            if f == NO_FRAME:
                f = c.scan.last_new_frame
    set_target(c, p, f)


cdef uint32_t tile_restart(Core c, size_t p, const char *page, uint32_t checksum,
                           pass_stats *st) noexcept nogil:
    """A run of one content that its tile cannot take on (its first frame
    is full, max_page_sharing, or was reclaimed): page p, holding what page
    p - 1 maps, begins a new tile on a new frame, which the pages after it
    grow. The frames of the old tile with room left are found by runs that
    begin on them (stable_tree_search); taking them here would cost a
    mapping a page, since their neighbours are full. NO_FRAME if page p - 1
    maps no frame of p's content."""
    cdef rmap_item *prev = &c.res.rmap[p - 1] if p > 0 else NULL
    cdef uint32_t f
    if prev == NULL or not (prev.flags & PAGE_TARGET or (prev.state == PAGE_MERGED
                                                         and not prev.flags & PAGE_TARGET)):
        return NO_FRAME
    if (frame_mapcount(&c.store, prev.frame) == 0
            or frame_checksum(&c.store, prev.frame) != checksum   # before the frame is read
            or not same_content(c, page, frame_content(&c.store, prev.frame))
            or not same_tree(&c.store, frame_node(&c.store, prev.frame), c.res.rmap[p].node)):
        return NO_FRAME
    f = new_stable_frame(c, page, checksum, frame_node(&c.store, prev.frame),
                         c.scan.last_new_frame + 1, st)
    if f != NO_FRAME:
        c.scan.last_new_frame = f
        c.scan.run_last = p
        c.scan.run_pages += 1
    return f


cdef uint32_t tile_continuation(Core c, size_t p, const char *page, uint32_t checksum,
                                scan_knobs *k, pass_stats *st) noexcept nogil:
    """If page p - 1 maps, or is to map, a frame of p's content: the next
    frame of that frame's tile, grown if need be (_frames.pxi), so that a run
    of one content maps onto consecutive frames. NO_FRAME otherwise."""
    cdef rmap_item *prev
    cdef uint32_t g, f
    cdef bint grow
    if p == 0 or k.tile_pages < 2:
        return NO_FRAME
    prev = &c.res.rmap[p - 1]
    if not (prev.flags & PAGE_TARGET or (prev.state == PAGE_MERGED
                                         and not prev.flags & (PAGE_TARGET | PAGE_UNSTABLE))):
        return NO_FRAME
    if c.scan.run_last + 1 != p:
        c.scan.run_pages = 1            # page p - 1 begins a run
    g = prev.frame
    f = tile_next(&c.store, g, page, checksum, c.res.rmap[p].node, k.max_page_sharing,
                  k.tile_pages, c.scan.run_pages, c.scan.by_checksum, &grow)
    if grow:
        frames_write_other_node(&c.store, frame_node(&c.store, g))
        prefer_node(&c.nodes, frame_node(&c.store, g))
        f = tile_grow(&c.store, g, page)
        if f != NO_FRAME:
            st.frames_new += 1
            st.tile_frames_new += 1
            c.scan.last_new_frame = f
    if f != NO_FRAME:
        c.scan.run_last = p
        c.scan.run_pages += 1
    return f


cdef int scan_range(Core c, size_t first, size_t end, scan_knobs *k, bint zeros_at_once,
                    pass_stats *st) noexcept nogil:
    """Look at every mergeable page of [first, end) that holds memory, a
    chunk at a time. With threads, the page tables of up to CHUNKS_AHEAD
    chunks are read ahead and their pages given to the hash stream, whose
    helpers hash them while the caller looks at the first, and write the
    new frames the caller posts (unless frames must be written under the
    caller's NUMA policy): the trees, the new frames and the targets stay
    in page order on the caller. `zeros_at_once`: each chunk's zero pages
    are freed as soon as it is looked at (free_zero_runs)."""
    cdef uint8_t *cats = <uint8_t *>malloc(CHUNKS_AHEAD * STATE_CHUNK)
    cdef uint16_t *nodes = NULL
    cdef chunk_tables chunks[CHUNKS_AHEAD]
    cdef chunk_tables *chunk
    cdef size_t looked = 0, read = 0, i
    cdef size_t next_first = first, looked_end = first
    cdef uint8_t *taken_before = NULL
    cdef double cpu
    cdef int err = 0
    st.threads = max(k.threads, 1)      # also for the remaps of the pass (_remap.pxi)
    c.scan.by_checksum = compared_again_before_remap(c)
    if knows_nodes(&c.nodes):
        nodes = <uint16_t *>malloc(CHUNKS_AHEAD * STATE_CHUNK * sizeof(uint16_t))
    if cats == NULL or (knows_nodes(&c.nodes) and nodes == NULL):
        free(cats)
        free(nodes)
        return ENOMEM
    memset(chunks, 0, sizeof(chunks))
    for i in range(CHUNKS_AHEAD):
        chunks[i].cats = cats + i * STATE_CHUNK
        if nodes != NULL:
            chunks[i].nodes = nodes + i * STATE_CHUNK
    if k.threads > 1 and tracking(&c.tables):
        err = take_written_before_helpers(c, first, end, &taken_before)
    if k.threads > 1 and not steers_memory(&c.nodes):
        frames_write_on_helpers(&c.store)
    if not hashes_open(&c.scan.hashes, &c.res, STATE_CHUNK, CHUNKS_AHEAD, k.threads,
                       frames_writes(&c.store)):
        frames_write_here(&c.store)     # no helper to write them
    while err == 0:
        while err == 0 and next_first < end and read - looked < CHUNKS_AHEAD:
            chunk = &chunks[read % CHUNKS_AHEAD]
            chunk.first, chunk.n = next_first, min(end - next_first, <size_t>STATE_CHUNK)
            chunk.taken_before = taken_before + (next_first - first) if taken_before != NULL else NULL
            err = read_chunk(c, chunk)
            next_first += chunk.n
            read += 1
        if err or looked == read:
            break
        chunk = &chunks[looked % CHUNKS_AHEAD]
        hashes_take(&c.scan.hashes, chunk.first, chunk.n, &chunk.hashed)
        scan_chunk(c, chunk, k, st)
        hashes_forget(&c.scan.hashes, &chunk.hashed)
        if zeros_at_once and k.use_zero_pages:
            free_zero_runs(c, chunk.first, chunk.n, huge_block_pages(&c.huge), st)
        looked += 1
        looked_end = chunk.first + chunk.n
    if err:
        forget_checksums(c, looked_end, end)
    st.frames_new_on_helpers += frames_write_here(&c.store)   # while the helpers are there
    cpu = hashes_close(&c.scan.hashes)  # the helpers' CPU time is the decision's
    st.decide_cpu_seconds += cpu
    st.helper_cpu_seconds += cpu
    free(cats)
    free(nodes)
    free(taken_before)
    drop_unwritten(c, st)
    return err


cdef void forget_checksums(Core c, size_t first, size_t end) noexcept nogil:
    """After a take of written bits failed: the pages of [first, end) are
    hashed again next pass. Their bits may have been taken (by the whole
    range's take, a chunk read ahead, or the failed call itself, partway)
    and not looked at: gone with the failure, while the pages stay
    protected and would pass for unwritten."""
    cdef size_t p
    for p in range(first, end):
        c.res.rmap[p].flags &= ~PAGE_CHECKSUMMED


cdef int take_written_before_helpers(Core c, size_t first, size_t end,
                                     uint8_t **taken) noexcept nogil:
    """The written bits of the pages of [first, end), taken at once before
    the hash stream's helpers start, in *taken (NULL without memory for
    them). Taking them write-protects the pages for the tracking, and the
    kernel then flushes the TLB of every CPU that runs the process, by an
    interrupt to each (a trip to the host in a virtual machine), for each
    page table it changed: while the helpers hash, every chunk's take would
    interrupt their CPUs, 10% of the scan's thread's time at two threads.
    Taken here, the chunks' takes find the pages protected, flush nothing,
    and add what was written since (read_chunk)."""
    taken[0] = <uint8_t *>malloc(end - first)
    if taken[0] == NULL:
        return 0                        # each chunk's take alone says it all, as without helpers
    return take_written(&c.tables, first, end - first, taken[0])


cdef int read_chunk(Core c, chunk_tables *chunk) noexcept nogil:
    """Read a chunk's page tables, taking the written bits, and give the
    hash stream the pages the scan will need hashed."""
    cdef size_t i
    cdef int err = take_written(&c.tables, chunk.first, chunk.n, chunk.cats)
    if err == 0 and chunk.taken_before != NULL:
        for i in range(chunk.n):
            chunk.cats[i] |= chunk.taken_before[i] & PD_PAGE_IS_WRITTEN
    if err == 0 and chunk.nodes != NULL:
        read_nodes(&c.nodes, &c.res, chunk.first, chunk.n, chunk.cats, chunk.nodes)
    if err == 0:
        hash_chunk_ahead(c, chunk)
    return err


cdef void scan_chunk(Core c, chunk_tables *chunk, scan_knobs *k, pass_stats *st) noexcept nogil:
    """Give each mergeable page of the chunk that holds memory its target,
    in page order."""
    cdef size_t p, i
    cdef uint8_t *cats = chunk.cats
    cdef uint16_t *nodes = chunk.nodes
    cdef uint32_t checksum
    cdef bint zero
    for p in range(chunk.first, chunk.first + chunk.n):
        i = p - chunk.first
        if hashed_ahead(&c.scan.hashes, p + BUCKETS_AHEAD, &zero, &checksum) and not zero:
            stable_tree_prefetch(&c.store, checksum, c.res.rmap[p + BUCKETS_AHEAD].node)
        if (nodes != NULL and not merges_across_nodes(&c.store) and c.res.rmap[p].state == PAGE_MERGED
                and away_from_home(c, p, nodes[i]) and go_home(c, p, st) == 0):
            cats[i] = PD_PAGE_IS_PRESENT | PD_PAGE_IS_WRITTEN
            nodes[i] = c.res.rmap[p].node
        if mergeable(&c.res.rmap[p]):
            if holds_own_memory(cats[i]):
                st.scanned += 1
                if nodes != NULL and nodes[i] != NO_NODE:
                    c.res.rmap[p].node = nodes[i]
                cmp_and_merge_page(c, p, cats[i] & PD_PAGE_IS_WRITTEN != 0, k, st)
        elif c.res.rmap[p].state != PAGE_FREE and c.res.rmap[p].flags & PAGE_UNMERGEABLE:
            st.skipped_unmergeable += 1


cdef void drop_unwritten(Core c, pass_stats *st) noexcept nogil:
    """The new frames are written now (the frame store writes them behind,
    a run with one pwrite: _frames.pxi frame_write). Pages given one that
    could not be written (a full memory cgroup, RLIMIT_FSIZE) keep their
    own memory, refused for want of it, and the frame is not new."""
    cdef uint32_t lo, hi
    cdef size_t p
    cdef rmap_item *it
    if not frames_take_unwritten(&c.store, &lo, &hi):
        return
    for p in range(c.res.high_water):
        it = &c.res.rmap[p]
        if it.flags & PAGE_TARGET and lo <= it.frame < hi and frame_unwritten(&c.store, it.frame):
            it.flags &= ~PAGE_TARGET
            frame_put(&c.store, it.frame)
            st.skipped_no_memory += 1
            st.frames_new -= frame_mapcount(&c.store, it.frame) == 0


cdef void hash_chunk_ahead(Core c, chunk_tables *chunk) noexcept nogil:
    """Give the hash stream the chunk's pages that cmp_and_merge_page will
    need hashed: the mergeable pages holding memory that were written since
    their last checksum or never checksummed. (A page that go_home() gives
    a copy after this is hashed again by the scan itself.) Looking at the
    chunks before changes no record of these pages, so the choice holds."""
    cdef uint8_t *wanted
    cdef size_t i
    cdef rmap_item *it
    chunk.hashed = hashed_span(0, 0)
    if c.scan.hashes.stream == NULL:
        return                          # one thread: the scan hashes each page itself
    wanted = <uint8_t *>malloc(chunk.n)
    if wanted == NULL:
        return                          # the same
    for i in range(chunk.n):
        it = &c.res.rmap[chunk.first + i]
        wanted[i] = (mergeable(it) and holds_own_memory(chunk.cats[i])
                     and (chunk.cats[i] & PD_PAGE_IS_WRITTEN != 0 or not it.flags & PAGE_CHECKSUMMED))
    hash_ahead(&c.scan.hashes, chunk.first, chunk.n, wanted, &chunk.hashed)
    free(wanted)


cdef int merge_pass(Core c, scan_knobs *k, pass_stats *st) noexcept nogil:
    """merge(): one whole scan now, replacing a background scan in progress."""
    cdef pass_stats abandoned
    cdef double refreshed, decided, started = now()
    cdef double cpu_refreshed, cpu_decided, cpu_started = pd_thread_cpu()
    cdef bint huge_tracked
    cdef int err = prepare_barrier(&c.wb)
    PD_ASSERT(c.res.high_water <= c.res.npages, "merge_pass: high_water within the reservation")
    if err:
        return err
    if c.scan.unstable != NULL:
        end_scan(c, &abandoned)
    err = refresh_states(c, 0, c.res.high_water)
    refreshed = now()
    cpu_refreshed = pd_thread_cpu()
    if err == 0:
        err = begin_scan(c)
    huge_tracked = track_huge_pages_for_pass(c)
    frames_forget_sources(&c.store)
    if err == 0:
        err = scan_range(c, 0, c.res.high_water, k, True, st)
    decided = now()
    cpu_decided = pd_thread_cpu()
    keep_huge_pages(c, 0, c.res.high_water, st)
    check_new_frames(c)
    apply_within_budget(c, k, st)       # also drops the targets of a failed scan
    if huge_tracked:
        spare_huge_pages_again(&c.tables, 0, c.res.high_water)
    if c.scan.unstable != NULL:
        end_scan(c, st)
    reclaim_frames(&c.store)
    restore_policy(&c.nodes)
    st.refresh_seconds = refreshed - started
    st.decide_seconds = decided - refreshed
    st.apply_seconds = now() - decided
    note_cpu(st, cpu_started, cpu_refreshed, cpu_decided)
    return err


cdef void check_new_frames(Core c) noexcept nogil:
    """Before applying: a new frame holds what the pages were compared with
    only if the page it was written from held still until it was written
    (an unstable-tree pair compared the two pages, then wrote one of them).
    The write tracking tells, for the pages the barrier will not compare
    again (match_by_tracking); frames written from a page that was written
    since it was read are distrusted, and their pages compared."""
    cdef size_t i, j, nsources, first
    cdef const written_from *s = frames_sources(&c.store, &nsources)
    cdef uint8_t *written
    if compared_again_before_remap(c):
        return
    for i in range(nsources):
        first = (s[i].content - c.res.base) // c.res.page_size
        PD_ASSERT(s[i].content >= c.res.base and first + s[i].n <= c.res.high_water,
                  "check_new_frames: frames written from arena pages")
        written = <uint8_t *>malloc(s[i].n)
        if written == NULL or read_written(&c.tables, first, s[i].n, written) != 0:
            frames_distrust(&c.store, s[i].frame, s[i].n)
        else:
            for j in range(s[i].n):
                if written[j]:
                    frames_distrust(&c.store, s[i].frame, s[i].n)
                    break
        free(written)


cdef bint compared_again_before_remap(Core c) noexcept nogil:
    """Whether applying compares every page with its target again under
    the barrier (_remap.pxi match_run_ahead): the uffd barrier, which takes
    the run from the write tracking, or no tracking. Then the scan need not
    compare bytes to choose a target: a match of checksums stands for them
    (_frames.pxi holds_page), and a page is read once by the scan and once
    under the barrier, not twice and once."""
    return not (tracking(&c.tables) and barrier_keeps_tracking(&c.wb))


cdef bint track_huge_pages_for_pass(Core c) noexcept nogil:
    """Whether this pass protects huge pages for the write tracking too: only
    where the barrier keeps the tracking, so that applying need not read
    them again (match_by_tracking); spare_huge_pages_again() follows."""
    return barrier_keeps_tracking(&c.wb) and track_huge_pages(&c.tables)


cdef void note_cpu(pass_stats *st, double started, double refreshed,
                   double decided) noexcept nogil:
    """The pass's CPU seconds a phase (the calling thread's, and for the
    decision, the hashing threads' that scan_range added) and its threads."""
    st.refresh_cpu_seconds = refreshed - started
    st.decide_cpu_seconds += decided - refreshed
    st.apply_cpu_seconds += pd_thread_cpu() - decided


cdef int scan_batch(Core c, size_t npages, scan_knobs *k, bint *scan_done) noexcept nogil:
    """The background scanner's step (ksmd's ksm_do_scan): the next
    `npages` pages of the scan in progress, merged where they match, counted
    in the scan's stats."""
    cdef pass_stats *st = &c.scan.stats
    cdef size_t first, end
    cdef bint huge_tracked
    cdef int err = prepare_barrier(&c.wb)
    PD_ASSERT(c.scan.cursor <= c.res.high_water, "scan_batch: the cursor below high_water")
    scan_done[0] = False
    if err == 0 and c.scan.unstable == NULL:
        err = begin_scan(c)
    if err:
        return err
    first = c.scan.cursor
    end = min(c.res.high_water, huge_block_end(&c.huge, first + npages))
    err = refresh_states(c, first, end - first)
    huge_tracked = track_huge_pages_for_pass(c)
    frames_forget_sources(&c.store)
    if err == 0:
        err = scan_range(c, first, end, k, False, st)
    keep_huge_pages(c, first, end, st)
    check_new_frames(c)
    apply_within_budget(c, k, st)
    if huge_tracked:
        spare_huge_pages_again(&c.tables, first, end - first)
    reclaim_frames(&c.store)
    restore_policy(&c.nodes)
    c.scan.cursor = end
    if end >= c.res.high_water:
        end_scan(c, st)
        scan_done[0] = True
    return err


cdef int unmerge_range(Core c, size_t first, size_t n) noexcept nogil:
    """Give every MERGED and ZERO page in the range its own private copy,
    contents unchanged: KSM's unmerge, zero pages included."""
    cdef size_t p, start = 0, run = 0
    cdef int err = refresh_states(c, first, n)
    PD_ASSERT(first + n <= c.res.npages, "unmerge_range: pages of the reservation")
    for p in range(first, first + n + 1):
        if p < first + n and (c.res.rmap[p].state == PAGE_MERGED or c.res.rmap[p].state == PAGE_ZERO):
            if run == 0:
                start = p
            run += 1
            continue
        if run and err == 0:
            err = populate_write(&c.res, start, run)
            if err == 0:
                settle_private(c, start, run)
        run = 0
    reclaim_frames(&c.store)
    return err


cdef void settle_private(Core c, size_t first, size_t n) noexcept nogil:
    cdef size_t p
    for p in range(first, first + n):
        if c.res.rmap[p].state == PAGE_MERGED:
            c.res.rmap[p].state = PAGE_BROKEN
            frame_put(&c.store, c.res.rmap[p].frame)
        else:
            c.res.rmap[p].state = PAGE_PRIVATE


# -- NUMA: merged pages whose frame is on another node -------------------------

cdef inline bint away_from_home(Core c, size_t p, uint16_t seen) noexcept nogil:
    """Whether MERGED page p's frame is on another node than the page's own:
    the kernel migrated the frame (`seen` is where the page's memory is
    now), or, simulated, the map moved the page."""
    if simulating(&c.nodes):
        return simulated_node(&c.nodes, p) != frame_node(&c.store, c.res.rmap[p].frame)
    return seen != NO_NODE and seen != c.res.rmap[p].node


cdef int go_home(Core c, size_t p, pass_stats *st) noexcept nogil:
    """Give merged page p a private copy on its own node, where this pass
    merges it again, in its node's trees."""
    cdef uint16_t home = (simulated_node(&c.nodes, p) if simulating(&c.nodes)
                          else c.res.rmap[p].node)
    cdef int err
    frames_write_other_node(&c.store, home)
    prefer_node(&c.nodes, home)
    err = populate_write(&c.res, p, 1)
    if err:
        return err
    frame_put(&c.store, c.res.rmap[p].frame)
    c.res.rmap[p].state = PAGE_BROKEN
    c.res.rmap[p].flags &= ~PAGE_CHECKSUMMED
    c.res.rmap[p].node = home
    st.moved += 1
    return 0


cdef bint scan_in_progress(Core c) noexcept nogil:
    """Whether a background scan is under way (its unstable tree exists)."""
    return c.scan.unstable != NULL


cdef void scan_close(Core c) noexcept nogil:
    free(c.scan.unstable)
    c.scan.unstable = NULL
