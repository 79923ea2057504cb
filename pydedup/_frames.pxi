# The frame store: memfds whose pages (frames) hold merged content, the
# stable tree that finds a frame by content, and reclaim of frames that no
# arena page maps any more. A process has one memfd, or after a fork one a
# tier (_fast.pxd); frame f is at offset f * page_size of its tier's memfd.

cdef inline frame_tier *tier_of(Core c, uint32_t f) noexcept nogil:
    """The tier holding frame f: the last whose first_frame <= f. One test
    in a process never forked as a child; the newest frames come first."""
    cdef int t = c.ntiers - 1
    while f < c.tiers[t].first_frame:   # tiers[0].first_frame == 0 ends it
        t -= 1
    return &c.tiers[t]


cdef inline char *frame_address(Core c, uint32_t f) noexcept nogil:
    cdef frame_tier *t = tier_of(c, f)
    return t.view + <size_t>(f - t.first_frame) * c.page_size


cdef inline bint tier_starts_at(Core c, uint32_t f) noexcept nogil:
    """Whether frame f is the first of a tier above the bottom one: frames
    f - 1 and f lie in different memfds, and no mmap can map both."""
    cdef int t
    for t in range(1, c.ntiers):
        if c.tiers[t].first_frame == f:
            return True
    return False


cdef int push_tier(Core c) noexcept nogil:
    """A new memfd for the frames from the fork fence up, in a forked child;
    0, an errno, or -1 when the MAX_TIERS tiers are all taken. A top tier that
    starts at the fence holds no frame (every frame is below the fence): the
    new memfd replaces it here, and the parent keeps its own."""
    cdef size_t ps = c.page_size
    cdef uint32_t first = c.fork_fence
    cdef frame_tier *top = &c.tiers[c.ntiers - 1]
    cdef int fd
    cdef char *view
    if top.first_frame != first and c.ntiers == MAX_TIERS:
        return -1
    fd = pd_memfd_create(b"pydedup-frames")
    if fd < 0:
        return errno
    if ftruncate(fd, <long>(c.npages * ps)) != 0:
        close(fd)
        return errno
    view = <char *>mmap(NULL, view_length(c, first), PROT_READ, MAP_SHARED | MAP_NORESERVE,
                        fd, <long>first * ps)
    if <void *>view == MAP_FAILED:
        close(fd)
        return errno
    if top.first_frame == first:
        close_tier(c, top)
    else:
        top = &c.tiers[c.ntiers]
        c.ntiers += 1
    top.first_frame = first
    top.fd = fd
    top.view = view
    return 0


cdef inline size_t view_length(Core c, uint32_t first_frame) noexcept nogil:
    """The view of a tier from first_frame to the last frame slot; a page
    at least, for mmap, when the fence is at the end of the slots."""
    return max(c.npages - first_frame, 1) * c.page_size


cdef void close_tier(Core c, frame_tier *t) noexcept nogil:
    if <void *>t.view != MAP_FAILED:
        munmap(t.view, view_length(c, t.first_frame))
        t.view = <char *>MAP_FAILED
    if t.fd >= 0:
        close(t.fd)
        t.fd = -1


cdef uint32_t frame_alloc(Core c, uint32_t hint) noexcept nogil:
    """A free frame slot. `hint` when it is free, so that the frames of a run
    of new content are consecutive and the run maps back with one mmap; else
    the next free slot after the last one handed out."""
    cdef uint32_t nslots = <uint32_t>c.npages
    cdef uint32_t f = hint
    cdef uint32_t tries = 0
    if f >= nslots or f < c.fork_fence or c.frames[f].mapcount != 0:
        f = max(c.frame_cursor, c.fork_fence)
        if f >= nslots:
            f = 0
        while f < c.fork_fence or c.frames[f].mapcount != 0:
            f = f + 1 if f + 1 < nslots else 0
            tries += 1
            if tries == nslots:
                return NO_FRAME
    c.frame_cursor = f + 1 if f + 1 < nslots else 0
    if f >= c.frame_high:
        c.frame_high = f + 1
    return f


cdef int frame_write(Core c, uint32_t f, const char *content, uint16_t node) noexcept nogil:
    """Fill a new frame, with memory of `node`; 0 or an errno. pwrite, not a
    store through the view: a full memory cgroup or tmpfs then answers ENOMEM
    or ENOSPC, not SIGBUS."""
    cdef long done
    prefer_node(c, node)
    done = pwrite(tier_of(c, f).fd, content, c.page_size, <long>f * c.page_size)
    c.frames[f].node = node
    if done == <long>c.page_size:
        return 0
    return errno if done < 0 else ENOMEM


cdef inline void frame_get(Core c, uint32_t f) noexcept nogil:
    c.frames[f].mapcount += 1


cdef void frame_put(Core c, uint32_t f) noexcept nogil:
    cdef uint32_t *grown
    c.frames[f].mapcount -= 1
    if c.frames[f].mapcount != 0:
        return
    if c.norphans == c.orphans_cap:
        grown = <uint32_t *>realloc(c.orphans, 2 * c.orphans_cap * sizeof(uint32_t))
        if grown == NULL:
            reclaim_frames(c)           # empties the list instead
        else:
            c.orphans = grown
            c.orphans_cap *= 2
    c.orphans[c.norphans] = f
    c.norphans += 1


cdef uint32_t stable_tree_search(Core c, const char *page, uint32_t checksum, uint16_t node,
                                 uint32_t max_page_sharing) noexcept nogil:
    """A frame holding exactly `page`'s content, in the tree of `node`, that
    may take one more page."""
    cdef uint32_t f = c.stable[tree_key(c, checksum, node) & c.stable_mask]
    while f != NO_FRAME:
        if (c.frames[f].checksum == checksum
                and same_tree(c, c.frames[f].node, node)
                and c.frames[f].mapcount < max_page_sharing
                and memcmp(page, frame_address(c, f), c.page_size) == 0):
            return f
        f = c.frames[f].next
    return NO_FRAME


cdef void stable_tree_link(Core c, uint32_t *heads, uint32_t mask, uint32_t f) noexcept nogil:
    cdef uint32_t *head = &heads[tree_key(c, c.frames[f].checksum, c.frames[f].node) & mask]
    c.frames[f].next = head[0]
    head[0] = f


cdef void stable_tree_grow(Core c) noexcept nogil:
    """Double the buckets so chains stay short. Without memory, keep going
    with longer chains: slower, never wrong."""
    cdef uint32_t mask = 2 * c.stable_mask + 1
    cdef uint32_t *heads = <uint32_t *>malloc((<size_t>mask + 1) * sizeof(uint32_t))
    cdef uint32_t b, f, next_f
    if heads == NULL:
        return
    memset(heads, 0xFF, (<size_t>mask + 1) * sizeof(uint32_t))
    for b in range(c.stable_mask + 1):
        f = c.stable[b]
        while f != NO_FRAME:
            next_f = c.frames[f].next
            stable_tree_link(c, heads, mask, f)
            f = next_f
    free(c.stable)
    c.stable = heads
    c.stable_mask = mask


cdef void stable_tree_insert(Core c, uint32_t f) noexcept nogil:
    if c.frames_in_use > c.stable_mask:
        stable_tree_grow(c)
    stable_tree_link(c, c.stable, c.stable_mask, f)


cdef bint stable_tree_holds(Core c, uint32_t f) noexcept nogil:
    cdef uint32_t g = c.stable[tree_key(c, c.frames[f].checksum, c.frames[f].node) & c.stable_mask]
    while g != NO_FRAME and g != f:
        g = c.frames[g].next
    return g == f


cdef bint stable_tree_erase(Core c, uint32_t f) noexcept nogil:
    cdef uint32_t *link = &c.stable[tree_key(c, c.frames[f].checksum, c.frames[f].node) & c.stable_mask]
    while link[0] != NO_FRAME:
        if link[0] == f:
            link[0] = c.frames[f].next
            return True
        link = &c.frames[link[0]].next
    return False


cdef int compare_frames(const void *a, const void *b) noexcept nogil:
    cdef uint32_t x = (<uint32_t *>a)[0], y = (<uint32_t *>b)[0]
    return (x > y) - (x < y)


cdef void punch_frames(Core c, uint32_t first, uint32_t n) noexcept nogil:
    if first < c.fork_fence:            # another process may still map them
        n = first + n - c.fork_fence if first + n > c.fork_fence else 0
        first = c.fork_fence
    if n == 0:
        return
    # At or above the fence: all in the top tier, the memfd no other process writes.
    fallocate(tier_of(c, first).fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              <long>first * c.page_size, <long>n * c.page_size)


cdef void reclaim_frames(Core c) noexcept nogil:
    """Free the frames whose mapcount fell to 0: out of the stable tree, and
    their memory back to the kernel, one fallocate per run of frames."""
    cdef size_t i
    cdef uint32_t f, run_first = 0, run_len = 0
    qsort(c.orphans, c.norphans, sizeof(uint32_t), compare_frames)
    for i in range(c.norphans):
        f = c.orphans[i]
        # An orphan may have been listed twice, or found again by a merge.
        if c.frames[f].mapcount != 0 or not stable_tree_erase(c, f):
            continue
        c.frames_in_use -= 1
        if run_len and f == run_first + run_len:
            run_len += 1
            continue
        if run_len:
            punch_frames(c, run_first, run_len)
        run_first, run_len = f, 1
    if run_len:
        punch_frames(c, run_first, run_len)
    c.norphans = 0


cdef void punch_refilled(Core c, uint32_t lo, uint32_t hi) noexcept nogil:
    """Punch again the free slots of frames [lo, hi) that hold memory again:
    a page fault racing with UFFDIO_WRITEPROTECT fills the hole of a punched
    frame that a BROKEN page still maps (_barrier.pxi). Free: no page maps
    it and the stable tree no longer holds it (an orphan still there is
    reclaim's). SEEK_DATA finds the memory, one call per run of it."""
    cdef frame_tier *top = &c.tiers[c.ntiers - 1]
    cdef size_t ps = c.page_size
    cdef long offset, data, hole, end
    cdef uint32_t f
    lo = max(lo, max(top.first_frame, c.fork_fence))
    hi = min(hi, c.frame_high)
    offset, end = <long>lo * ps, <long>hi * ps
    while offset < end:
        data = lseek(top.fd, offset, SEEK_DATA)
        if data < 0 or data >= end:
            return
        hole = min(max(lseek(top.fd, data, SEEK_HOLE), data + <long>ps), end)
        for f in range(<uint32_t>(data // ps), <uint32_t>((hole + <long>ps - 1) // ps)):
            if c.frames[f].mapcount == 0 and not stable_tree_holds(c, f):
                punch_frames(c, f, 1)
        offset = hole
