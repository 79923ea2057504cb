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
                it.flags &= ~PAGE_CHECKSUMMED
                frame_put(c, it.frame)
            elif it.state == PAGE_ZERO and zero_written(cats[i]):
                it.state = PAGE_PRIVATE
                it.flags &= ~PAGE_CHECKSUMMED
        done += chunk
    free(cats)
    reclaim_frames(c)
    return err


cdef inline bint mergeable(rmap_item *it) noexcept nogil:
    return (it.state == PAGE_PRIVATE or it.state == PAGE_BROKEN) and not it.flags & PAGE_UNMERGEABLE


cdef inline bint holds_own_memory(uint8_t cats) noexcept nogil:
    """Pages never written hold no memory (or map the zero page by the
    kernel's own doing): nothing to merge, and reading them would only fault
    them in."""
    return cats & (PD_PAGE_IS_PRESENT | PD_PAGE_IS_SWAPPED) and not cats & PD_PAGE_IS_PFNZERO


# -- the unstable tree: one per scan, chained through the rmap items ---------

cdef int begin_scan(Core c) noexcept nogil:
    """A fresh, empty unstable tree, with buckets for chains of two or three
    (2-4 bytes a candidate page)."""
    cdef size_t p, candidates = 0
    cdef uint32_t mask = 15
    for p in range(c.high_water):
        candidates += mergeable(&c.rmap[p])
    while mask + 1 < candidates // 2:
        mask = 2 * mask + 1
    free(c.unstable)
    c.unstable = <uint32_t *>malloc((<size_t>mask + 1) * sizeof(uint32_t))
    if c.unstable == NULL:
        return ENOMEM
    memset(c.unstable, 0xFF, (<size_t>mask + 1) * sizeof(uint32_t))
    c.unstable_mask = mask
    c.scan_cursor = 0
    c.last_new_frame = NO_FRAME
    return 0


cdef void end_scan(Core c, pass_stats *st) noexcept nogil:
    """What is left in the unstable tree is unique: count it, drop the tree."""
    cdef size_t p
    for p in range(c.high_water):
        if c.rmap[p].flags & PAGE_UNSTABLE:
            c.rmap[p].flags &= ~PAGE_UNSTABLE
            st.unshared += 1
    free(c.unstable)
    c.unstable = NULL
    c.scan_cursor = 0


cdef size_t unstable_tree_search_insert(Core c, size_t p) noexcept nogil:
    """An earlier page of this scan with the same content as page p, taken
    out of the tree; or NO_PAGE, and p goes into the tree."""
    cdef rmap_item *it = &c.rmap[p]
    cdef uint32_t *head = &c.unstable[tree_key(c, it.checksum, it.node) & c.unstable_mask]
    cdef uint32_t *link = head
    cdef uint32_t q = link[0]
    while q != NO_PAGE:
        if (c.rmap[q].checksum == it.checksum
                and same_tree(c, c.rmap[q].node, it.node)
                and memcmp(page_address(c, q), page_address(c, p), c.page_size) == 0):
            link[0] = c.rmap[q].frame
            c.rmap[q].flags &= ~PAGE_UNSTABLE
            return q
        link = &c.rmap[q].frame
        q = link[0]
    it.frame = head[0]
    head[0] = <uint32_t>p
    it.flags |= PAGE_UNSTABLE
    return NO_PAGE


cdef void unstable_tree_erase(Core c, size_t p) noexcept nogil:
    """Take page p out of the tree of the scan in progress: it is freed or
    made unmergeable, and its record must not stay linked."""
    cdef uint32_t *link
    if not c.rmap[p].flags & PAGE_UNSTABLE:
        return
    link = &c.unstable[tree_key(c, c.rmap[p].checksum, c.rmap[p].node) & c.unstable_mask]
    while link[0] != NO_PAGE:
        if link[0] == p:
            link[0] = c.rmap[p].frame
            break
        link = &c.rmap[link[0]].frame
    c.rmap[p].flags &= ~PAGE_UNSTABLE


# -- deciding each page's target ----------------------------------------------

cdef inline void set_target(Core c, size_t p, uint32_t f) noexcept nogil:
    c.rmap[p].frame = f
    c.rmap[p].flags |= PAGE_TARGET
    frame_get(c, f)


cdef uint32_t new_stable_frame(Core c, const char *content, uint32_t checksum, uint16_t node,
                               uint32_t hint, pass_stats *st) noexcept nogil:
    """A frame holding `content`, on `node` and in its stable tree; NO_FRAME
    if the frame store cannot grow."""
    cdef uint32_t f = frame_alloc(c, hint)
    if f == NO_FRAME or frame_write(c, f, content, node) != 0:
        return NO_FRAME
    c.frames[f].checksum = checksum
    c.frames[f].mapcount = 0
    c.frames_in_use += 1
    stable_tree_insert(c, f)
    st.frames_new += 1
    return f


cdef inline uint32_t zero_key(Core c, size_t p) noexcept nogil:
    """The stable-tree key of an all-zero page: the zero page's checksum,
    made distinct per colour, so that with use_zero_pages off a zero page
    only shares a zero frame with pages of its own colour (the virtual page
    number modulo zero_page_colours), as the kernel colours its zero pages."""
    if c.zero_colours <= 1:
        return c.zero_checksum
    return c.zero_checksum ^ <uint32_t>((<size_t>c.base // c.page_size + p) % c.zero_colours)


cdef void cmp_and_merge_page(Core c, size_t p, bint written, scan_knobs *k,
                             pass_stats *st) noexcept nogil:
    """Give page p its target. A page not written since it was hashed is not
    read again: its checksum still holds."""
    cdef rmap_item *it = &c.rmap[p]
    cdef const char *page = page_address(c, p)
    cdef uint32_t checksum, f
    cdef bint zero, changed = False
    cdef size_t q
    if written or not it.flags & PAGE_CHECKSUMMED:
        st.hashed += 1
        zero = pd_page_is_zero(page, c.page_size)
        checksum = zero_key(c, p) if zero else <uint32_t>c.xxh3(page, c.page_size)
        changed = not (it.flags & PAGE_CHECKSUMMED and it.checksum == checksum)
        if changed and it.flags & PAGE_CHECKSUMMED:
            st.volatile += 1
        it.checksum = checksum
        it.flags |= PAGE_CHECKSUMMED
    else:
        checksum = it.checksum
        zero = checksum == zero_key(c, p) and pd_page_is_zero(page, c.page_size)
    if changed and not k.merge_volatile:
        return                          # KSM's rule: only content that held still for a pass
    if zero and k.use_zero_pages:
        it.flags |= PAGE_TARGET_ZERO
        return
    f = stable_tree_search(c, page, checksum, it.node, k.max_page_sharing)
    if f == NO_FRAME:
        q = unstable_tree_search_insert(c, p)
        if q == NO_PAGE:
            return
        # The frame after the last new one: a copied array maps back in one
        # run. It is written on the node of the page that was there first,
        # which KSM would have made the shared page.
        f = new_stable_frame(c, page, checksum, c.rmap[q].node, c.last_new_frame + 1, st)
        if f == NO_FRAME:
            st.skipped_no_memory += 2
            return
        c.last_new_frame = f
        set_target(c, q, f)
    set_target(c, p, f)


cdef int scan_range(Core c, size_t first, size_t end, scan_knobs *k,
                    pass_stats *st) noexcept nogil:
    """Look at every mergeable page of [first, end) that holds memory."""
    cdef uint8_t *cats = <uint8_t *>malloc(STATE_CHUNK)
    cdef uint16_t *nodes = NULL
    cdef size_t p, n
    cdef int err = 0
    if knows_nodes(c):
        nodes = <uint16_t *>malloc(STATE_CHUNK * sizeof(uint16_t))
    if cats == NULL or (knows_nodes(c) and nodes == NULL):
        free(cats)
        free(nodes)
        return ENOMEM
    while first < end and err == 0:
        n = min(end - first, <size_t>STATE_CHUNK)
        err = take_written(c, first, n, cats)
        if err == 0 and nodes != NULL:
            read_nodes(c, first, n, cats, nodes)
        for p in range(first, first + n if err == 0 else first):
            if (nodes != NULL and not c.merge_across_nodes and c.rmap[p].state == PAGE_MERGED
                    and away_from_home(c, p, nodes[p - first]) and go_home(c, p, st) == 0):
                cats[p - first] = PD_PAGE_IS_PRESENT | PD_PAGE_IS_WRITTEN
                nodes[p - first] = c.rmap[p].node
            if mergeable(&c.rmap[p]):
                if holds_own_memory(cats[p - first]):
                    st.scanned += 1
                    if nodes != NULL and nodes[p - first] != NO_NODE:
                        c.rmap[p].node = nodes[p - first]
                    cmp_and_merge_page(c, p, cats[p - first] & PD_PAGE_IS_WRITTEN != 0, k, st)
            elif c.rmap[p].state != PAGE_FREE and c.rmap[p].flags & PAGE_UNMERGEABLE:
                st.skipped_unmergeable += 1
        first += n
    free(cats)
    free(nodes)
    return err


cdef double now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef int merge_pass(Core c, scan_knobs *k, pass_stats *st) noexcept nogil:
    """merge(): one whole scan now, replacing a background scan in progress."""
    cdef pass_stats abandoned
    cdef double refreshed, decided, started = now()
    cdef int err = prepare_barrier(c)
    if err:
        return err
    if c.unstable != NULL:
        end_scan(c, &abandoned)
    err = refresh_states(c, 0, c.high_water)
    refreshed = now()
    if err == 0:
        err = begin_scan(c)
    if err == 0:
        err = scan_range(c, 0, c.high_water, k, st)
    decided = now()
    apply_targets(c, st)                # also drops the targets of a failed scan
    if c.unstable != NULL:
        end_scan(c, st)
    reclaim_frames(c)
    restore_policy(c)
    st.refresh_seconds = refreshed - started
    st.decide_seconds = decided - refreshed
    st.apply_seconds = now() - decided
    return err


cdef int scan_batch(Core c, size_t npages, scan_knobs *k, pass_stats *st,
                    bint *scan_done) noexcept nogil:
    """The background scanner's step (ksmd's ksm_do_scan): the next
    `npages` pages of the scan in progress, merged where they match."""
    cdef size_t first, end
    cdef int err = prepare_barrier(c)
    scan_done[0] = False
    if err == 0 and c.unstable == NULL:
        err = begin_scan(c)
    if err:
        return err
    first = c.scan_cursor
    end = min(c.high_water, first + npages)
    err = refresh_states(c, first, end - first)
    if err == 0:
        err = scan_range(c, first, end, k, st)
    apply_targets(c, st)
    reclaim_frames(c)
    restore_policy(c)
    c.scan_cursor = end
    if end >= c.high_water:
        end_scan(c, st)
        scan_done[0] = True
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
