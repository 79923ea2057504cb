# The merge pass, after mm/ksm.c. First every page in use is looked at once
# (cmp_and_merge_page) and given a target: the zero page, a frame of the
# stable tree, or a new frame shared with an identical page of the unstable
# tree. Then the targets are applied in runs (_remap.pxi), each run checked
# again just before it is remapped. Unlike ksmd, a pass merges a page whose
# checksum changed since the last pass: merge() is asked for "now".

cdef enum:
    STATE_CHUNK = 65536                 # pages whose categories are read at once


cdef inline char *page_address(Core c, size_t p) noexcept nogil:
    return c.base + p * c.page_size


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
    if cats == NULL:
        return ENOMEM
    while done < n and err == 0:
        chunk = min(n - done, <size_t>STATE_CHUNK)
        err = read_categories(c, first + done, chunk, cats)
        for i in range(chunk if err == 0 else 0):
            it = &c.rmap[first + done + i]
            if it.state == PAGE_MERGED and frame_written(cats[i]):
                it.state = PAGE_BROKEN
                frame_put(c, it.frame)
            elif it.state == PAGE_ZERO and zero_written(cats[i]):
                it.state = PAGE_PRIVATE
        done += chunk
    free(cats)
    reclaim_frames(c)
    return err


cdef inline void set_target(Core c, size_t p, uint32_t f) noexcept nogil:
    c.rmap[p].frame = f
    c.rmap[p].flags |= PAGE_TARGET
    frame_get(c, f)


cdef size_t unstable_tree_search_insert(Core c, uint32_t *heads, uint32_t mask,
                                        size_t p) noexcept nogil:
    """An earlier page of this pass with the same content as page p, taken
    out of the tree; or NO_PAGE, and p goes into the tree."""
    cdef rmap_item *it = &c.rmap[p]
    cdef uint32_t *link = &heads[it.checksum & mask]
    cdef uint32_t q = link[0]
    while q != NO_PAGE:
        if (c.rmap[q].checksum == it.checksum
                and memcmp(page_address(c, q), page_address(c, p), c.page_size) == 0):
            link[0] = c.rmap[q].frame
            c.rmap[q].flags &= ~PAGE_UNSTABLE
            return q
        link = &c.rmap[q].frame
        q = link[0]
    it.frame = heads[it.checksum & mask]
    heads[it.checksum & mask] = <uint32_t>p
    it.flags |= PAGE_UNSTABLE
    return NO_PAGE


cdef uint32_t new_stable_frame(Core c, const char *content, uint32_t checksum,
                               uint32_t hint, pass_stats *st) noexcept nogil:
    """A frame holding `content`, in the stable tree; NO_FRAME if the frame
    store cannot grow."""
    cdef uint32_t f = frame_alloc(c, hint)
    if f == NO_FRAME or frame_write(c, f, content) != 0:
        return NO_FRAME
    c.frames[f].checksum = checksum
    c.frames[f].mapcount = 0
    c.frames_in_use += 1
    stable_tree_insert(c, f)
    st.frames_new += 1
    return f


cdef uint32_t cmp_and_merge_page(Core c, size_t p, uint32_t *heads, uint32_t mask,
                                 uint32_t last_new, bint use_zero_pages,
                                 uint32_t max_page_sharing, pass_stats *st) noexcept nogil:
    """Give page p its target. Returns the frame this call created, else
    last_new, so the next new frame can be the one after it."""
    cdef rmap_item *it = &c.rmap[p]
    cdef const char *page = page_address(c, p)
    cdef uint32_t checksum, f
    cdef size_t q
    if use_zero_pages and pd_page_is_zero(page, c.page_size):
        it.flags = (it.flags | PAGE_TARGET_ZERO) & ~PAGE_CHECKSUMMED
        return last_new
    checksum = <uint32_t>c.xxh3(page, c.page_size)
    if it.flags & PAGE_CHECKSUMMED and it.checksum != checksum:
        st.volatile += 1
    it.checksum = checksum
    it.flags |= PAGE_CHECKSUMMED
    f = stable_tree_search(c, page, checksum, max_page_sharing)
    if f == NO_FRAME:
        q = unstable_tree_search_insert(c, heads, mask, p)
        if q == NO_PAGE:
            return last_new
        f = new_stable_frame(c, page, checksum, last_new + 1, st)
        if f == NO_FRAME:
            st.skipped_no_memory += 2
            return last_new
        last_new = f
        set_target(c, q, f)
    set_target(c, p, f)
    return last_new


cdef inline bint mergeable(rmap_item *it) noexcept nogil:
    return (it.state == PAGE_PRIVATE or it.state == PAGE_BROKEN) and not it.flags & PAGE_UNMERGEABLE


cdef inline bint holds_own_memory(uint8_t cats) noexcept nogil:
    """Pages never written hold no memory (or map the zero page by the
    kernel's own doing): nothing to merge, and reading them would only fault
    them in."""
    return cats & (PD_PAGE_IS_PRESENT | PD_PAGE_IS_SWAPPED) and not cats & PD_PAGE_IS_PFNZERO


cdef int decide_targets(Core c, bint use_zero_pages, uint32_t max_page_sharing,
                        pass_stats *st) noexcept nogil:
    cdef size_t p, first, n, candidates = 0
    cdef uint32_t mask = 15, last_new = NO_FRAME
    cdef uint32_t *heads
    cdef uint8_t *cats
    cdef int err = 0
    for p in range(c.high_water):
        candidates += mergeable(&c.rmap[p])
    while mask + 1 < candidates // 2:   # chains of two or three, 2-4 bytes a page
        mask = 2 * mask + 1
    heads = <uint32_t *>malloc((<size_t>mask + 1) * sizeof(uint32_t))
    cats = <uint8_t *>malloc(STATE_CHUNK)
    if heads == NULL or cats == NULL:
        free(heads)
        free(cats)
        return ENOMEM
    memset(heads, 0xFF, (<size_t>mask + 1) * sizeof(uint32_t))
    first = 0
    while first < c.high_water and err == 0:
        n = min(c.high_water - first, <size_t>STATE_CHUNK)
        err = read_categories(c, first, n, cats)
        if err:
            break
        for p in range(first, first + n):
            if mergeable(&c.rmap[p]):
                if holds_own_memory(cats[p - first]):
                    st.scanned += 1
                    last_new = cmp_and_merge_page(c, p, heads, mask, last_new,
                                                  use_zero_pages, max_page_sharing, st)
            elif c.rmap[p].state != PAGE_FREE and c.rmap[p].flags & PAGE_UNMERGEABLE:
                st.skipped_unmergeable += 1
        first += n
    free(heads)
    free(cats)
    for p in range(c.high_water):       # what is left in the unstable tree is unique
        if c.rmap[p].flags & PAGE_UNSTABLE:
            c.rmap[p].flags &= ~PAGE_UNSTABLE
            st.unshared += 1
    return err


cdef double now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef int merge_pass(Core c, bint use_zero_pages, uint32_t max_page_sharing,
                    pass_stats *st) noexcept nogil:
    cdef double refreshed, decided, started = now()
    cdef int err = prepare_barrier(c)
    if err:
        return err
    err = refresh_states(c, 0, c.high_water)
    refreshed = now()
    if err == 0:
        err = decide_targets(c, use_zero_pages, max_page_sharing, st)
    decided = now()
    apply_targets(c, st)                # also drops the targets of a failed decide
    reclaim_frames(c)
    st.refresh_seconds = refreshed - started
    st.decide_seconds = decided - refreshed
    st.apply_seconds = now() - decided
    return err


cdef int unmerge_range(Core c, size_t first, size_t n) noexcept nogil:
    """Give every MERGED and ZERO page in the range its own private copy,
    contents unchanged: KSM's unmerge, zero pages included."""
    cdef size_t p, start = 0, run = 0
    cdef int err = refresh_states(c, first, n)
    for p in range(first, first + n + 1):
        if p < first + n and (c.rmap[p].state == PAGE_MERGED or c.rmap[p].state == PAGE_ZERO):
            if run == 0:
                start = p
            run += 1
            continue
        if run and err == 0:
            err = populate_write(c, start, run)
            if err == 0:
                settle_private(c, start, run)
        run = 0
    reclaim_frames(c)
    return err


cdef void settle_private(Core c, size_t first, size_t n) noexcept nogil:
    cdef size_t p
    for p in range(first, first + n):
        if c.rmap[p].state == PAGE_MERGED:
            c.rmap[p].state = PAGE_BROKEN
            frame_put(c, c.rmap[p].frame)
        else:
            c.rmap[p].state = PAGE_PRIVATE
