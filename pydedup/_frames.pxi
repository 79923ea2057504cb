# The frame store (_frames.pxd): memfds whose pages (frames) hold merged
# content, the stable tree that finds a frame by content, and reclaim of
# frames that no arena page maps any more. A process has one tier of memfds,
# or after a fork one a generation (_fast.pxd). A tier stripes its frames
# over FRAME_STRIPES memfds, STRIPE_PAGES at a time, because shmem writes
# into one file one at a time (under its inode lock), and a first shared
# member's merge is mostly such writes: the scan's threads write neighbouring
# runs of new frames into different memfds side by side. A memfd holds its
# stripes one after the other (frame f at page file_page(f) of memfd
# stripe_of(f)), so that together they take the address space of one; a
# mapping of frames ends where a stripe does (files_part_at).

cdef int frames_open(frame_store *fs, size_t page_size, size_t nslots,
                     uint32_t zero_checksum) noexcept nogil:
    """An empty store of nslots frame slots, with its first memfd; 0 or an
    errno. frames_close() undoes it, also after a failure."""
    PD_ASSERT(0 < nslots < NO_FRAME, "frames_open: 1 to NO_FRAME - 1 slots")
    memset(fs, 0, sizeof(frame_store))
    fs.page_size = page_size
    fs.nslots = nslots
    tier_init(&fs.tiers[0], 0)
    fs.ntiers = 1
    fs.zero_checksum = zero_checksum
    fs.zero_colours = 1
    fs.merge_across_nodes = True
    fs.frames = <frame_item *>map_lazily(nslots * sizeof(frame_item))
    if <void *>fs.frames == MAP_FAILED:
        return ENOMEM
    fs.stable_mask = 15
    fs.stable = <uint32_t *>malloc(16 * sizeof(uint32_t))
    fs.orphans_cap = 64
    fs.orphans = <uint32_t *>malloc(fs.orphans_cap * sizeof(uint32_t))
    if fs.stable == NULL or fs.orphans == NULL:
        return ENOMEM
    memset(fs.stable, 0xFF, 16 * sizeof(uint32_t))
    return tier_open(fs, &fs.tiers[0], NULL)


cdef void frames_close(frame_store *fs) noexcept nogil:
    cdef int t
    frames_write_here(fs)               # no helper may write into a memfd closed below
    fs.behind_n = 0                     # no page maps a frame not written yet
    free(fs.sources)
    fs.sources, fs.nsources, fs.sources_cap = NULL, 0, 0
    for t in range(fs.ntiers):
        close_tier(fs, &fs.tiers[t])
    if fs.common != NULL:               # the shared mapping is _shared.pxi's to unmap
        fs.frames, fs.stable, fs.orphans, fs.ledger, fs.common = NULL, NULL, NULL, NULL, NULL
        return
    if fs.frames != NULL and <void *>fs.frames != MAP_FAILED:
        munmap(fs.frames, fs.nslots * sizeof(frame_item))
    fs.frames = NULL
    free(fs.stable)
    free(fs.orphans)
    fs.stable = fs.orphans = NULL


cdef frame_tier *tier_of(frame_store *fs, uint32_t f) noexcept nogil:
    """The tier holding frame f: the last whose first_frame <= f. One test
    in a process never forked as a child; the newest frames come first."""
    cdef int t = fs.ntiers - 1
    PD_ASSERT(f < fs.nslots, "tier_of: a frame slot")
    while f < fs.tiers[t].first_frame:   # tiers[0].first_frame == 0 ends it
        t -= 1
    return &fs.tiers[t]


cdef inline frame_file *file_of(frame_store *fs, uint32_t f) noexcept nogil:
    """The memfd holding frame f, and its view."""
    return &tier_of(fs, f).files[stripe_of(f)]


cdef inline int stripe_of(uint32_t f) noexcept nogil:
    """Which of its tier's memfds holds frame f."""
    return f // STRIPE_PAGES % FRAME_STRIPES


cdef inline size_t file_page(uint32_t f) noexcept nogil:
    """The page of its memfd that holds frame f."""
    return <size_t>(f // (STRIPE_PAGES * FRAME_STRIPES)) * STRIPE_PAGES + f % STRIPE_PAGES


cdef inline uint32_t frame_at(int stripe, size_t page) noexcept nogil:
    """The frame at page `page` of memfd `stripe` (file_page's inverse)."""
    return <uint32_t>((page // STRIPE_PAGES) * (STRIPE_PAGES * FRAME_STRIPES)
                      + <size_t>stripe * STRIPE_PAGES + page % STRIPE_PAGES)


cdef size_t file_page_from(int stripe, uint32_t f) noexcept nogil:
    """The page of memfd `stripe` that holds its first frame at or after f:
    frames [lo, hi) of that memfd are its pages [file_page_from(stripe, lo),
    file_page_from(stripe, hi))."""
    cdef size_t block = f // STRIPE_PAGES, round = block // FRAME_STRIPES
    cdef int at = <int>(block % FRAME_STRIPES)
    if at < stripe:
        return round * STRIPE_PAGES
    if at == stripe:
        return round * STRIPE_PAGES + f % STRIPE_PAGES
    return (round + 1) * STRIPE_PAGES


cdef char *frame_address(frame_store *fs, uint32_t f) noexcept nogil:
    """Where the store's read-only view shows frame f (and the frames after
    it in its memfd, up to the end of its stripe: every frame is written
    first)."""
    frames_write_behind(fs)
    return view_address(fs, f)


cdef inline char *view_address(frame_store *fs, uint32_t f) noexcept nogil:
    return file_of(fs, f).view + file_page(f) * fs.page_size


cdef int frame_fd(frame_store *fs, uint32_t f) noexcept nogil:
    """The memfd holding frame f, at page file_page(f) (to be mapped:
    every frame is written first)."""
    frames_write_behind(fs)
    return file_of(fs, f).fd


cdef uint32_t frames_high(frame_store *fs) noexcept nogil:
    """Frame slots [frames_high, nslots) were never used."""
    return fs.frame_high


cdef bint frames_adjoin(frame_store *fs, uint32_t f, uint32_t g) noexcept nogil:
    """Whether frame g is the page after frame f in f's memfd, so that the
    kernel may hold pages that map them, side by side, in one mapping: g is
    f + 1 in a stripe, or the first frame of the next stripe of f's memfd
    (frames 1,023 and 4,096, say)."""
    return file_of(fs, f) == file_of(fs, g) and file_page(g) == file_page(f) + 1


cdef frame_tier *frames_top(frame_store *fs) noexcept nogil:
    """The tier new frames go to: its memfds and their views, which name them."""
    return &fs.tiers[fs.ntiers - 1]


cdef bint files_part_at(frame_store *fs, uint32_t f) noexcept nogil:
    """Whether frames f - 1 and f lie in different memfds, so that no mmap
    can map both: f starts a stripe, or a tier above the bottom one."""
    cdef int t
    if f % STRIPE_PAGES == 0:
        return True
    for t in range(1, fs.ntiers):
        if fs.tiers[t].first_frame == f:
            return True
    return False


cdef void frames_fence(frame_store *fs) noexcept nogil:
    """A fork: the frames that exist now are shared with another process
    from here on, never punched or reused by this one."""
    frames_write_behind(fs)
    fs.fork_fence = max(fs.fork_fence, fs.frame_high)


cdef int push_tier(frame_store *fs) noexcept nogil:
    """New memfds for the frames from the fork fence up, in a forked child;
    0, an errno, or -1 when the MAX_TIERS tiers are all taken. A top tier that
    starts at the fence holds no frame (every frame is below the fence): the
    new memfds replace it here, and the parent keeps its own."""
    cdef frame_tier *top = &fs.tiers[fs.ntiers - 1]
    cdef frame_tier made
    cdef int err
    PD_ASSERT(fs.frame_high <= fs.fork_fence, "push_tier: after frames_fence")
    PD_ASSERT(fs.behind_n == 0, "push_tier: every frame written")
    if top.first_frame != fs.fork_fence and fs.ntiers == MAX_TIERS:
        return -1
    tier_init(&made, fs.fork_fence)
    err = tier_open(fs, &made, NULL)
    if err:
        close_tier(fs, &made)
        return err
    if top.first_frame == fs.fork_fence:
        close_tier(fs, top)
    else:
        top = &fs.tiers[fs.ntiers]
        fs.ntiers += 1
    top[0] = made
    return 0


cdef void tier_init(frame_tier *t, uint32_t first_frame) noexcept nogil:
    """A tier from first_frame with no memfd yet (close_tier() closes none)."""
    cdef int i
    t.first_frame = first_frame
    for i in range(FRAME_STRIPES):
        t.files[i] = frame_file(-1, <char *>MAP_FAILED)


cdef int tier_open(frame_store *fs, frame_tier *t, const int *fds) noexcept nogil:
    """Tier t's memfds (new ones, or `fds`, which are all t's from now
    on, whatever fails), grown to their length (the same for every member
    of a shared store: one longer is of another layout, EINVAL, and is
    never cut), and their views; 0 or an errno, and close_tier() undoes
    what was done."""
    cdef frame_file *file
    cdef long length = <long>view_length(fs), size
    cdef int i
    if fds != NULL:
        for i in range(FRAME_STRIPES):
            t.files[i].fd = fds[i]
    for i in range(FRAME_STRIPES):
        file = &t.files[i]
        if fds == NULL:
            file.fd = pd_memfd_create(b"pydedup-frames")
            if file.fd < 0:
                return errno
        size = lseek(file.fd, 0, SEEK_END)
        if size < 0:
            return errno
        if size > length:
            return EINVAL
        if size < length and ftruncate(file.fd, length) != 0:
            return errno
        file.view = <char *>mmap(NULL, view_length(fs), PROT_READ, MAP_SHARED | MAP_NORESERVE,
                                 file.fd, 0)
        if <void *>file.view == MAP_FAILED:
            return errno
    return 0


cdef inline size_t view_length(frame_store *fs) noexcept nogil:
    """A memfd's length, and its view's: its pages of every frame slot
    (in a tier above the bottom one, those below its first frame are
    holes)."""
    return file_page_from(0, <uint32_t>fs.nslots) * fs.page_size


cdef void close_tier(frame_store *fs, frame_tier *t) noexcept nogil:
    cdef frame_file *file
    cdef int i
    for i in range(FRAME_STRIPES):
        file = &t.files[i]
        if <void *>file.view != MAP_FAILED:
            munmap(file.view, view_length(fs))
            file.view = <char *>MAP_FAILED
        if file.fd >= 0:
            close(file.fd)
            file.fd = -1


# -- keys: one stable tree, or one a node -------------------------------------

cdef uint32_t tree_key(frame_store *fs, uint32_t checksum, uint16_t node) noexcept nogil:
    """The bucket key of a page or frame: with merge_across_nodes off, each
    node's pages hash apart, as if in trees of their own. The scan keys its
    unstable tree the same way."""
    if fs.merge_across_nodes:
        return checksum
    return checksum ^ (<uint32_t>node * 0x9E3779B1u)


cdef bint merges_across_nodes(frame_store *fs) noexcept nogil:
    return fs.merge_across_nodes


cdef bint same_tree(frame_store *fs, uint16_t a, uint16_t b) noexcept nogil:
    return fs.merge_across_nodes or a == b


cdef uint32_t zero_key(frame_store *fs, size_t vpn) noexcept nogil:
    """The stable-tree key of an all-zero page at virtual page number vpn:
    the zero page's checksum, made distinct per colour, so that with
    use_zero_pages off a zero page only shares a zero frame with pages of its
    own colour (vpn modulo zero_page_colours), as the kernel colours its
    zero pages."""
    if fs.zero_colours <= 1:
        return fs.zero_checksum
    return fs.zero_checksum ^ <uint32_t>(vpn % fs.zero_colours)


cdef void frames_set_across_nodes(frame_store *fs, bint value) noexcept nogil:
    """It decides which tree each frame is in: only while none is in use."""
    PD_ASSERT(fs.frames_in_use == 0, "frames_set_across_nodes: no frame in use")
    fs.merge_across_nodes = value


# -- frames -------------------------------------------------------------------

cdef uint32_t frame_alloc(frame_store *fs, uint32_t hint) noexcept nogil:
    """A free frame slot. `hint` when it is free, so that the frames of a run
    of new content are consecutive and the run maps back with one mmap; else
    the next free slot after the last one handed out."""
    cdef uint32_t nslots = <uint32_t>fs.nslots
    cdef uint32_t f = hint
    cdef uint32_t tries = 0
    if f >= nslots or f < fs.fork_fence or not slot_free(fs, f):
        f = max(fs.frame_cursor, fs.fork_fence)
        if f >= nslots:
            f = 0
        while f < fs.fork_fence or not slot_free(fs, f):
            f = f + 1 if f + 1 < nslots else 0
            tries += 1
            if tries == nslots:
                return NO_FRAME
    fs.frame_cursor = f + 1 if f + 1 < nslots else 0
    if f >= fs.frame_high:
        fs.frame_high = f + 1
        if fs.common != NULL:           # at once: a member dying now leaves its record
            fs.common.frame_high = f + 1    # below the high the next one repairs up to
    return f


cdef inline bint slot_free(frame_store *fs, uint32_t f) noexcept nogil:
    """Whether frame slot f may take a new frame: never used, or reclaimed.
    A frame no page maps any more is an orphan until the next reclaim, still
    in the stable tree: taking its slot would link it there twice (a page
    whose frames all moved to another node's tree leaves such orphans in
    the middle of a scan, _scan.pxi go_home). A slot above every one used
    is free unread: reading its record first would map the zero page there,
    and the write that follows would then flush the TLB of every CPU that
    runs the process, interrupting the scan's helpers (_scan.pxi
    take_written_before_helpers)."""
    return f >= fs.frame_high or (fs.frames[f].mapcount == 0 and not stable_tree_holds(fs, f))


cdef int frame_write(frame_store *fs, uint32_t f, const char *content, uint16_t node) noexcept nogil:
    """Fill a new frame, written for `node`; 0 or an errno. pwrite, not a
    store through the view: a full memory cgroup or tmpfs then answers ENOMEM
    or ENOSPC, not SIGBUS. The memory comes from the writing thread's policy
    (_numa.pxi prefer_node).

    Written behind: a frame that follows the frames not written yet, with
    content that follows theirs, for the same node, joins them, and one
    pwrite writes them all, posted for a helper when the next frame does not
    join or done when something first needs a frame's content
    (frames_write_behind). A copied array's new frames cost a pwrite a
    WRITE_BEHIND_PAGES instead of one a page. The error of an earlier run's
    write, collected now (to make room, or done here), refuses this frame
    too: the store is failing."""
    cdef int err
    fs.frames[f].node = node
    if fs.behind_n and not joins_behind(fs, f, content, node):
        err = post_behind(fs)
        if err:
            return err
    if fs.behind_n == 0:
        fs.behind_first, fs.behind_content, fs.behind_node = f, content, node
    fs.behind_n += 1
    return 0


cdef inline bint joins_behind(frame_store *fs, uint32_t f, const char *content,
                              uint16_t node) noexcept nogil:
    """Whether new frame f may be written with the frames not written yet."""
    return (fs.behind_n < WRITE_BEHIND_PAGES and f == fs.behind_first + fs.behind_n
            and content == fs.behind_content + <size_t>fs.behind_n * fs.page_size
            and node == fs.behind_node and not files_part_at(fs, f))


cdef int frames_write_behind(frame_store *fs) noexcept nogil:
    """Write the new frames not written yet, and wait for those being
    written; 0 or the errno of the first that failed. A frame that could not
    be written holds a hole (it reads as zeros): its pages are compared with
    it again before their remap and keep their own memory, and it is
    reclaimed as a frame no page maps. Anything that reads, maps, punches or
    shares frames calls it first: frame_address, frame_fd, reclaim, the fork
    fence, the shared store's unlock (frames_save)."""
    cdef int err = post_behind(fs), failed
    while fs.writes_collected < fs.writes_posted:
        failed = collect_write(fs)
        err = err or failed
    return err


cdef int post_behind(frame_store *fs) noexcept nogil:
    """The frames not written yet go to be written: with one pwrite (more if
    it writes less), here, or posted for a helper of the scan
    (frames_write_on_helpers), collecting the oldest write first if as many
    as may be are under way; 0 or an errno, of that one."""
    cdef uint32_t first = fs.behind_first, n = fs.behind_n
    cdef const char *content = fs.behind_content
    cdef written_from *slot
    cdef int err = 0
    if n == 0:
        return 0
    fs.behind_n = 0                     # first: the errors below leave nothing behind
    note_source(fs, first, content, n)
    if fs.writes == NULL or n < POSTED_WRITE_PAGES:
        return write_frames(fs, first, content, n)
    if fs.writes_posted - fs.writes_collected == PD_WRITES_AHEAD:
        err = collect_write(fs)
    slot = &fs.writing[fs.writes_posted % PD_WRITES_AHEAD]
    slot[0] = written_from(content, first, n)
    pd_writes_post(fs.writes, file_of(fs, first).fd, content, <size_t>n * fs.page_size,
                   <long>(file_page(first) * fs.page_size))
    fs.writes_posted += 1
    return err


cdef int write_frames(frame_store *fs, uint32_t first, const char *content,
                      uint32_t n) noexcept nogil:
    """Frames [first, first + n) written from `content` here, with the
    helpers' pwrite loop; 0 or an errno, and the frames not written are
    unwritten (a page written in part is not written)."""
    cdef pd_write j
    cdef uint32_t done
    j.fd, j.content = file_of(fs, first).fd, content
    j.length, j.offset = <size_t>n * fs.page_size, <long>(file_page(first) * fs.page_size)
    pd_write_run(&j, NULL)
    if j.err:
        done = <uint32_t>(j.written // fs.page_size)
        unwrite_frames(fs, first + done, n - done)
    return j.err


cdef int collect_write(frame_store *fs) noexcept nogil:
    """The oldest write posted, done: 0 or its errno, and then its frames
    not written are unwritten (a page written in part is not written)."""
    cdef size_t i = fs.writes_collected, written = 0
    cdef written_from *slot = &fs.writing[i % PD_WRITES_AHEAD]
    cdef uint32_t done
    cdef int err = pd_writes_finish(fs.writes, i, &written)
    fs.writes_collected += 1
    if err:
        done = <uint32_t>(written // fs.page_size)
        unwrite_frames(fs, slot.frame + done, slot.n - done)
    return err


cdef void frames_write_on_helpers(frame_store *fs) noexcept nogil:
    """From now on writes are posted for the scan's helpers (pass
    frames_writes() to them), not done at once; without memory for that,
    they still are. The pwrite of a frame is most of a first shared member's merge, and
    the helpers, which hash faster than the scan decides, have time for it.
    frames_write_here() ends it."""
    PD_ASSERT(fs.writes == NULL, "frames_write_on_helpers: not already")
    frames_write_behind(fs)
    fs.writes = pd_writes_open()
    fs.writes_posted = fs.writes_collected = 0


cdef pd_writes *frames_writes(frame_store *fs) noexcept nogil:
    """The writes for the scan's helpers to do, or NULL."""
    return fs.writes


cdef uint64_t frames_write_here(frame_store *fs) noexcept nogil:
    """Every write posted is done (by this thread if nobody took it), and
    writes are done at once again: before the helpers leave. The frames the
    helpers wrote."""
    cdef uint64_t helped
    if fs.writes == NULL:
        return 0
    frames_write_behind(fs)
    helped = pd_writes_helped(fs.writes) // fs.page_size
    pd_writes_put(fs.writes)
    fs.writes = NULL
    return helped


cdef void unwrite_frames(frame_store *fs, uint32_t first, uint32_t n) noexcept nogil:
    """New frames [first, first + n) could not be written: out of the stable
    tree (nothing finds them), with a checksum no page has (no tile takes
    them), no memory, and noted for the scan, whose pages were given them
    (frames_take_unwritten). They are no longer in use; their mapcount is
    the pages' references, which the scan drops."""
    cdef uint32_t f
    for f in range(first, first + n):
        if stable_tree_erase(fs, f):
            fs.frames_in_use -= 1
        fs.frames[f].checksum = ~fs.frames[f].checksum
    punch_frames(fs, first, n)
    widen(&fs.unwritten_lo, &fs.unwritten_hi, first, n)


cdef bint frames_take_unwritten(frame_store *fs, uint32_t *lo, uint32_t *hi) noexcept nogil:
    """After the scan has given pages their new frames: write them, and
    whether some could not be; [lo, hi) then holds those (frame_unwritten
    tells which), whose pages must keep their own memory."""
    frames_write_behind(fs)
    lo[0], hi[0] = fs.unwritten_lo, fs.unwritten_hi
    fs.unwritten_lo = fs.unwritten_hi = 0
    return lo[0] < hi[0]


cdef bint frame_unwritten(frame_store *fs, uint32_t f) noexcept nogil:
    """Whether frame f, of a range frames_take_unwritten() gave, is one that
    could not be written: pages map it, and the stable tree no longer has
    it (every other frame in use is in the tree)."""
    return fs.frames[f].mapcount != 0 and not stable_tree_holds(fs, f)


cdef const char *frame_content(frame_store *fs, uint32_t f) noexcept nogil:
    """Where frame f's content can be compared now: the page it is being
    written from while it is not written yet (frames_write_behind) or a
    helper may be writing it, which is what the write copies, else the view
    (a frame written already: the frames not written yet stay so). Reads one
    page, never a run."""
    cdef size_t i
    cdef const written_from *w
    if fs.behind_n and fs.behind_first <= f < fs.behind_first + fs.behind_n:
        return fs.behind_content + <size_t>(f - fs.behind_first) * fs.page_size
    for i in range(fs.writes_collected, fs.writes_posted):
        w = &fs.writing[i % PD_WRITES_AHEAD]
        if w.frame <= f < w.frame + w.n:
            return w.content + <size_t>(f - w.frame) * fs.page_size
    return view_address(fs, f)


cdef void frames_write_other_node(frame_store *fs, uint16_t node) noexcept nogil:
    """Before the writing thread's memory policy changes for `node`: the
    frames not written yet for another node are written under its policy
    (or posted for the helpers, which write only where no policy steers
    memory: the scan's frames_write_on_helpers)."""
    if fs.behind_n and fs.behind_node != node:
        post_behind(fs)


cdef uint32_t frame_mapcount(frame_store *fs, uint32_t f) noexcept nogil:
    PD_ASSERT(f < fs.frame_high, "frame_mapcount: a frame below frame_high")
    return fs.frames[f].mapcount


# -- where a pass's new frames came from ---------------------------------------
#
# A page compared with a page that a new frame is then written from (the
# unstable tree's pair) was compared with the frame's content only if that
# page held still until the frame was written. The scan checks it after
# deciding (the write tracking), and the barrier trusts the comparisons of
# decided pages only with frames that passed (_remap.pxi match_by_tracking).

cdef void frames_forget_sources(frame_store *fs) noexcept nogil:
    """A pass begins: no new frames yet, none distrusted."""
    fs.nsources = 0
    fs.untrusted_lo = fs.untrusted_hi = 0


cdef void note_source(frame_store *fs, uint32_t first, const char *content, uint32_t n) noexcept nogil:
    """New frames [first, first + n) are being copied from the pages at
    `content` (frames_write_behind). Without memory to note it, every frame
    is distrusted."""
    cdef written_from *grown
    cdef size_t cap = max(2 * fs.sources_cap, 64)
    if fs.nsources == fs.sources_cap:
        grown = <written_from *>realloc(fs.sources, cap * sizeof(written_from))
        if grown == NULL:
            frames_distrust(fs, 0, <uint32_t>fs.nslots)
            return
        fs.sources, fs.sources_cap = grown, cap
    fs.sources[fs.nsources] = written_from(content, first, n)
    fs.nsources += 1


cdef const written_from *frames_sources(frame_store *fs, size_t *n) noexcept nogil:
    """The runs of new frames of this pass, with the pages they came from."""
    n[0] = fs.nsources
    return fs.sources


cdef void frames_distrust(frame_store *fs, uint32_t first, uint32_t n) noexcept nogil:
    """Frames [first, first + n) may hold other content than the pages
    they were written from were compared with."""
    widen(&fs.untrusted_lo, &fs.untrusted_hi, first, n)


cdef inline void widen(uint32_t *lo, uint32_t *hi, uint32_t first, uint32_t n) noexcept nogil:
    """[lo, hi), empty if lo >= hi, grown to cover [first, first + n) too."""
    if lo[0] >= hi[0]:
        lo[0], hi[0] = first, first + n
    else:
        lo[0], hi[0] = min(lo[0], first), max(hi[0], first + n)


cdef bint frames_trusted(frame_store *fs, uint32_t first, uint32_t n) noexcept nogil:
    """Whether frames [first, first + n) hold what the pass compared with
    them: none is a new frame whose page changed before it was written."""
    return first + n <= fs.untrusted_lo or first >= fs.untrusted_hi


cdef uint16_t frame_node(frame_store *fs, uint32_t f) noexcept nogil:
    PD_ASSERT(f < fs.frame_high, "frame_node: a frame below frame_high")
    return fs.frames[f].node


cdef uint32_t frame_checksum(frame_store *fs, uint32_t f) noexcept nogil:
    """The stable-tree checksum of frame f's content: a page of other
    checksum holds other content, and need not read the frame to know it
    (a read of a frame not mapped yet in the view is a page fault)."""
    PD_ASSERT(f < fs.frame_high, "frame_checksum: a frame below frame_high")
    return fs.frames[f].checksum


cdef void frame_get(frame_store *fs, uint32_t f) noexcept nogil:
    PD_ASSERT(f < fs.frame_high, "frame_get: a frame below frame_high")
    fs.frames[f].mapcount += 1
    if fs.ledger != NULL:
        fs.ledger[f] += 1


cdef void frame_put(frame_store *fs, uint32_t f) noexcept nogil:
    """One page less maps frame f; at none, it is an orphan, reclaimed by
    the next reclaim_frames()."""
    cdef uint32_t *grown
    PD_ASSERT(f < fs.frame_high and fs.frames[f].mapcount > 0,
              "frame_put: a frame some page maps")
    fs.frames[f].mapcount -= 1
    if fs.ledger != NULL:
        fs.ledger[f] -= 1
    if fs.frames[f].mapcount != 0:
        return
    if fs.norphans == fs.orphans_cap and fs.common != NULL:
        reclaim_frames(fs)              # a shared list does not grow
    elif fs.norphans == fs.orphans_cap:
        grown = <uint32_t *>realloc(fs.orphans, 2 * fs.orphans_cap * sizeof(uint32_t))
        if grown == NULL:
            reclaim_frames(fs)          # empties the list instead
        else:
            fs.orphans = grown
            fs.orphans_cap *= 2
    fs.orphans[fs.norphans] = f
    fs.norphans += 1


# -- the stable tree ----------------------------------------------------------

cdef inline bint holds_page(frame_store *fs, uint32_t f, const char *page,
                            bint by_checksum) noexcept nogil:
    """Whether frame f, whose checksum is page's, holds `page`'s content: its
    bytes compared, or with `by_checksum` the checksum's word taken for
    them, where the pass compares every page with its frame again under the
    barrier before the remap (_scan.pxi compared_again_before_remap). Two
    contents share a 32-bit checksum once in four billion pairs, and the
    barrier's comparison leaves such a page as it is."""
    return by_checksum or memcmp(page, frame_content(fs, f), fs.page_size) == 0


cdef uint32_t stable_tree_search(frame_store *fs, const char *page, uint32_t checksum,
                                 uint16_t node, uint32_t max_page_sharing,
                                 bint by_checksum) noexcept nogil:
    """A frame holding exactly `page`'s content (holds_page), in the tree of
    `node`, that may take one more page."""
    cdef uint32_t f
    PD_ASSERT(fs.stable != NULL and page != NULL, "stable_tree_search: an open store")
    f = fs.stable[tree_key(fs, checksum, node) & fs.stable_mask]
    while f != NO_FRAME:
        if (fs.frames[f].checksum == checksum
                and same_tree(fs, fs.frames[f].node, node)
                and fs.frames[f].mapcount < max_page_sharing
                and holds_page(fs, f, page, by_checksum)):
            return f
        f = fs.frames[f].next
    return NO_FRAME


cdef void stable_tree_prefetch(frame_store *fs, uint32_t checksum, uint16_t node) noexcept nogil:
    """Start loading the bucket stable_tree_search() will read first."""
    pd_prefetch(&fs.stable[tree_key(fs, checksum, node) & fs.stable_mask])


cdef uint32_t stable_tree_add(frame_store *fs, const char *content, uint32_t checksum,
                              uint16_t node, uint32_t hint) noexcept nogil:
    """A new frame holding `content`, written for `node` and in its stable
    tree, at `hint` if that slot is free; NO_FRAME if the store cannot grow.
    Its mapcount is 0 until frame_get()."""
    cdef uint32_t f = frame_alloc(fs, hint)
    PD_ASSERT(fs.frame_high <= fs.nslots and content != NULL, "stable_tree_add: content")
    if f == NO_FRAME or frame_write(fs, f, content, node) != 0:
        return NO_FRAME
    fs.frames[f].checksum = checksum
    fs.frames[f].mapcount = 0
    fs.frames[f].tile_index = 0
    fs.frames_in_use += 1
    stable_tree_insert(fs, f)
    return f


cdef void stable_tree_link(frame_store *fs, uint32_t *heads, uint32_t mask, uint32_t f) noexcept nogil:
    cdef uint32_t *head = &heads[tree_key(fs, fs.frames[f].checksum, fs.frames[f].node) & mask]
    fs.frames[f].next = head[0]
    head[0] = f


cdef void stable_tree_grow(frame_store *fs) noexcept nogil:
    """Double the buckets so chains stay short. Without memory, keep going
    with longer chains: slower, never wrong."""
    cdef uint32_t mask = 2 * fs.stable_mask + 1
    cdef uint32_t *heads
    cdef uint32_t b, f, next_f
    if fs.common != NULL:
        stable_tree_split(fs)
        return
    heads = <uint32_t *>malloc((<size_t>mask + 1) * sizeof(uint32_t))
    if heads == NULL:
        return
    memset(heads, 0xFF, (<size_t>mask + 1) * sizeof(uint32_t))
    for b in range(fs.stable_mask + 1):
        f = fs.stable[b]
        while f != NO_FRAME:
            next_f = fs.frames[f].next
            stable_tree_link(fs, heads, mask, f)
            f = next_f
    free(fs.stable)
    fs.stable = heads
    fs.stable_mask = mask


cdef void stable_tree_insert(frame_store *fs, uint32_t f) noexcept nogil:
    if fs.frames_in_use > fs.stable_mask:
        stable_tree_grow(fs)
    stable_tree_link(fs, fs.stable, fs.stable_mask, f)


cdef bint stable_tree_erase(frame_store *fs, uint32_t f) noexcept nogil:
    cdef uint32_t *link = &fs.stable[tree_key(fs, fs.frames[f].checksum, fs.frames[f].node)
                                     & fs.stable_mask]
    while link[0] != NO_FRAME:
        if link[0] == f:
            link[0] = fs.frames[f].next
            return True
        link = &fs.frames[link[0]].next
    return False


# -- tiles: consecutive frames of one content ---------------------------------
#
# A run of arena pages holding one content (NaN, ones, a fill value) would
# map one frame page after page, and no two of those pages could share a
# mapping: a run of L pages would cost L mappings. Mapped onto a tile
# instead, page i of the run onto frame i % tile_pages of the tile, it costs
# L / tile_pages mappings, for tile_pages frames a content. A tile's frames
# are ordinary frames, each with its own mapcount, node, stable-tree entry
# and reclaim; only tile_index ties them together, and it is a hint checked
# every time it is used (the frame it points at may have been reclaimed and
# reused for other content since).

cdef uint32_t frame_tile_index(frame_store *fs, uint32_t f) noexcept nogil:
    PD_ASSERT(f < fs.frame_high, "frame_tile_index: a frame below frame_high")
    return fs.frames[f].tile_index


cdef inline bint takes_one_more(frame_store *fs, uint32_t f, uint32_t checksum, uint16_t node,
                                uint32_t max_page_sharing) noexcept nogil:
    """Whether frame f is in use, in the tree of `node`, by its checksum
    holds the content, and may take one more page."""
    return (f < fs.frame_high and fs.frames[f].mapcount != 0
            and fs.frames[f].mapcount < max_page_sharing
            and fs.frames[f].checksum == checksum and same_tree(fs, fs.frames[f].node, node))


cdef uint32_t tile_start(frame_store *fs, uint32_t f, uint32_t max_page_sharing) noexcept nogil:
    """The first frame of f's tile, if it still holds f's content and may
    take one more page: a run that starts there maps the tile in as few
    pieces as it can. Else f."""
    cdef uint32_t k = fs.frames[f].tile_index, h
    PD_ASSERT(f < fs.frame_high, "tile_start: a frame below frame_high")
    if k == 0 or k > f:
        return f
    h = f - k
    if (fs.frames[h].tile_index == 0 and file_of(fs, h) == file_of(fs, f)
            and takes_one_more(fs, h, fs.frames[f].checksum, fs.frames[f].node, max_page_sharing)
            and memcmp(frame_content(fs, h), frame_content(fs, f), fs.page_size) == 0):
        return h
    return f


cdef bint slot_free_after(frame_store *fs, uint32_t g) noexcept nogil:
    """Whether slot g + 1 may become a new frame in g's memfd, right after
    it: never used or reclaimed (not an orphan waiting for reclaim), above
    the fork fence, in the same memfd."""
    cdef uint32_t h = g + 1
    if h >= fs.nslots or h < fs.fork_fence or files_part_at(fs, h):
        return False
    return slot_free(fs, h)


cdef uint32_t tile_next(frame_store *fs, uint32_t g, const char *page, uint32_t checksum,
                        uint16_t node, uint32_t max_page_sharing, uint32_t tile_pages,
                        size_t run_pages, bint by_checksum, bint *grow) noexcept nogil:
    """The frame for a page holding `page` whose previous page maps (or is
    to map) frame g, when g holds the same content and ends a run of
    `run_pages` pages of it: the next frame of g's tile if it exists, else
    the tile's first frame again (a new mapping). NO_FRAME if neither can
    take the page. `grow` is set instead when the tile may grow into the
    next slot (tile_grow): it is free, and the tile would still be no longer
    than the square root of the run so far. A run of L pages on a tile of T
    frames costs T frames and L / T mappings, least in sum at T = sqrt(L);
    so a short run costs few frames, and a long one few mappings."""
    cdef uint32_t k, h
    cdef bint can_grow
    grow[0] = False
    PD_ASSERT(g < fs.frame_high and tile_pages >= 1, "tile_next: a frame below frame_high")
    if (tile_pages < 2 or fs.frames[g].checksum != checksum or fs.frames[g].mapcount == 0
            or not same_tree(fs, fs.frames[g].node, node)):
        return NO_FRAME
    k = fs.frames[g].tile_index
    can_grow = False
    if k + 1 < tile_pages:
        h = g + 1
        if (h < fs.frame_high and takes_one_more(fs, h, checksum, node, max_page_sharing)
                and fs.frames[h].tile_index == k + 1
                and holds_page(fs, h, page, by_checksum)):
            return h
        # Bytes, always: the tile's new frame is written from the page as g's content.
        can_grow = slot_free_after(fs, g) and memcmp(page, frame_content(fs, g), fs.page_size) == 0
    grow[0] = can_grow and <size_t>(k + 1) * (k + 1) <= run_pages
    if grow[0] or k > g:
        return NO_FRAME
    h = g - k
    if file_of(fs, h) != file_of(fs, g) or fs.frames[h].tile_index != 0:
        return NO_FRAME
    if takes_one_more(fs, h, checksum, node, max_page_sharing):
        return h if holds_page(fs, h, page, by_checksum) else NO_FRAME
    grow[0] = can_grow                  # the first frame is full (max_page_sharing)
    if can_grow:
        return NO_FRAME
    # The tile is as long as it may be and its first frames are full (they
    # take a page at every wrap, and took more while the tile was short):
    # start again at its first frame with room, the frames after it being
    # fuller rarely.
    while h < g:
        h += 1
        if fs.frames[h].tile_index != h - (g - k):
            return NO_FRAME
        if takes_one_more(fs, h, checksum, node, max_page_sharing):
            return h if holds_page(fs, h, page, by_checksum) else NO_FRAME
    return NO_FRAME


cdef uint32_t tile_grow(frame_store *fs, uint32_t g, const char *content) noexcept nogil:
    """Frame g + 1, written with `content` (g's), the next frame of g's
    tile; NO_FRAME if it cannot be written. The caller checked with
    tile_next() that the slot is free, and set the memory policy for g's
    node. Its mapcount is 0 until frame_get()."""
    cdef uint32_t h
    PD_ASSERT(g < fs.frame_high and fs.frames[g].tile_index + 1 < MAX_TILE_PAGES,
              "tile_grow: a frame whose tile may grow")
    h = stable_tree_add(fs, content, fs.frames[g].checksum, fs.frames[g].node, g + 1)
    if h == NO_FRAME:
        return NO_FRAME
    PD_ASSERT(h == g + 1, "tile_grow: the slot after g")
    fs.frames[h].tile_index = fs.frames[g].tile_index + 1
    return h


# -- reclaim ------------------------------------------------------------------

cdef bint stable_tree_holds(frame_store *fs, uint32_t f) noexcept nogil:
    cdef uint32_t g = fs.stable[tree_key(fs, fs.frames[f].checksum, fs.frames[f].node) & fs.stable_mask]
    while g != NO_FRAME and g != f:
        g = fs.frames[g].next
    return g == f


cdef int compare_frames(const void *a, const void *b) noexcept nogil:
    cdef uint32_t x = (<uint32_t *>a)[0], y = (<uint32_t *>b)[0]
    return (x > y) - (x < y)


cdef void punch_frames(frame_store *fs, uint32_t first, uint32_t n) noexcept nogil:
    cdef uint32_t end = first + n, piece
    frames_write_behind(fs)             # a hole written after it is punched holds memory
    first = max(first, fs.fork_fence)   # below it another process may still map them
    # At or above the fence: all in the top tier, whose memfds no other process
    # writes; a fallocate a stripe.
    while first < end:
        piece = <uint32_t>(min(<uint64_t>end, (<uint64_t>first // STRIPE_PAGES + 1) * STRIPE_PAGES)
                           - first)
        fallocate(file_of(fs, first).fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  <long>(file_page(first) * fs.page_size), <long>piece * fs.page_size)
        first += piece


cdef void reclaim_frames(frame_store *fs) noexcept nogil:
    """Free the frames whose mapcount fell to 0: out of the stable tree, and
    their memory back to the kernel, one fallocate per run of frames."""
    cdef size_t i
    cdef uint32_t f, run_first = 0, run_len = 0
    PD_ASSERT(fs.norphans <= fs.orphans_cap, "reclaim_frames: orphans in their list")
    frames_write_behind(fs)             # the end of a pass: every frame written
    qsort(fs.orphans, fs.norphans, sizeof(uint32_t), compare_frames)
    for i in range(fs.norphans):
        f = fs.orphans[i]
        # An orphan may have been listed twice, or found again by a merge.
        if fs.frames[f].mapcount != 0 or not stable_tree_erase(fs, f):
            continue
        fs.frames_in_use -= 1
        if run_len and f == run_first + run_len:
            run_len += 1
            continue
        if run_len:
            punch_frames(fs, run_first, run_len)
        run_first, run_len = f, 1
    if run_len:
        punch_frames(fs, run_first, run_len)
    fs.norphans = 0


cdef void punch_refilled(frame_store *fs, uint32_t lo, uint32_t hi) noexcept nogil:
    """Punch again the free slots of frames [lo, hi) that hold memory again
    (a fault under the barrier can fill a punched frame's hole:
    barrier_may_refill). Free: no page maps it and the stable tree no longer
    holds it (an orphan still there is reclaim's). SEEK_DATA finds the
    memory, one call a run of it, in each memfd of the top tier."""
    cdef frame_tier *top = &fs.tiers[fs.ntiers - 1]
    cdef long ps = <long>fs.page_size
    cdef long offset, data, hole, end
    cdef uint32_t f
    cdef size_t page
    cdef int i, fd
    if lo >= hi:
        return                          # without waiting for the helpers' writes below
    frames_write_behind(fs)
    lo = max(lo, max(top.first_frame, fs.fork_fence))
    hi = min(hi, fs.frame_high)
    for i in range(FRAME_STRIPES):
        fd = top.files[i].fd
        offset, end = <long>file_page_from(i, lo) * ps, <long>file_page_from(i, hi) * ps
        while offset < end:
            data = lseek(fd, offset, SEEK_DATA)
            if data < 0 or data >= end:
                break
            hole = min(max(lseek(fd, data, SEEK_HOLE), data + ps), end)
            for page in range(<size_t>(data // ps), <size_t>((hole + ps - 1) // ps)):
                f = frame_at(i, page)
                if fs.frames[f].mapcount == 0 and not stable_tree_holds(fs, f):
                    punch_frames(fs, f, 1)
            offset = hole


cdef size_t frames_metadata_bytes(frame_store *fs) noexcept nogil:
    """Memory the store's bookkeeping holds: frame slots ever used, bucket
    heads, the orphan list."""
    if fs.common != NULL:               # shared: the orphan list is as long as the slots,
        return (fs.frame_high * (sizeof(frame_item) + sizeof(uint32_t))   # this one's ledger
                + (fs.stable_mask + 1) * sizeof(uint32_t))
    return (fs.frame_high * sizeof(frame_item) + (fs.stable_mask + 1) * sizeof(uint32_t)
            + fs.orphans_cap * sizeof(uint32_t))


# -- a store shared by processes (_shared.pxi holds the mapping and the lock) --
#
# The frame table, the stable tree's buckets, the orphan list and one ledger
# per member live in a memfd every member maps. The record's own fields that
# the members keep in common (frames_common) are loaded under the store's
# lock and saved before it is released, so every function above works on a
# shared store unchanged. A member's ledger counts the references its pages
# hold, frame by frame: mapcount is their sum, and a dead member's ledger is
# given back (frames_drop_ledger) or, if it died holding the lock, every
# mapcount is counted again from the living ones (frames_recount).

cdef int frames_open_shared(frame_store *fs, size_t page_size, size_t nslots,
                            uint32_t zero_checksum, const int *fds, frames_common *common,
                            frame_item *frames, uint32_t *stable, uint32_t *orphans,
                            uint32_t *ledger) noexcept nogil:
    """A store whose records are in shared memory (formatted by
    _shared.pxi) and whose frames are in the FRAME_STRIPES memfds `fds`
    (this record's own descriptors from now on). 0 or an errno."""
    PD_ASSERT(0 < nslots < NO_FRAME and common != NULL, "frames_open_shared: a shared mapping")
    memset(fs, 0, sizeof(frame_store))
    fs.page_size = page_size
    fs.nslots = nslots
    tier_init(&fs.tiers[0], 0)
    fs.ntiers = 1
    fs.zero_checksum = zero_checksum
    fs.zero_colours = 1
    fs.common, fs.frames, fs.stable, fs.orphans, fs.ledger = common, frames, stable, orphans, ledger
    fs.orphans_cap = nslots
    frames_load(fs)
    return tier_open(fs, &fs.tiers[0], fds)


cdef void frames_load(frame_store *fs) noexcept nogil:
    """Under the store's lock: the fields the members keep in common, as
    the last one to hold the lock left them."""
    cdef frames_common *c = fs.common
    fs.frames_in_use, fs.frame_high, fs.frame_cursor = c.frames_in_use, c.frame_high, c.frame_cursor
    fs.stable_mask, fs.norphans = c.stable_mask, c.norphans
    fs.merge_across_nodes = c.merge_across_nodes != 0


cdef void frames_save(frame_store *fs) noexcept nogil:
    """Before the store's lock is released: the frames this member added
    are written, for the next to find."""
    cdef frames_common *c = fs.common
    frames_write_behind(fs)
    c.frames_in_use, c.frame_high, c.frame_cursor = fs.frames_in_use, fs.frame_high, fs.frame_cursor
    c.stable_mask, c.norphans = fs.stable_mask, fs.norphans
    c.merge_across_nodes = fs.merge_across_nodes


cdef void frames_use_ledger(frame_store *fs, uint32_t *ledger) noexcept nogil:
    """This process's references are counted in `ledger` from now on (a
    forked child takes the ledger its parent filled for it)."""
    fs.ledger = ledger


cdef bint frames_shared(frame_store *fs) noexcept nogil:
    """Whether other processes may use this store (_shared.pxi)."""
    return fs.common != NULL


cdef uint32_t frames_ledger_count(frame_store *fs, uint32_t f) noexcept nogil:
    """This member's references to frame f (its mapcount in a private store)."""
    return fs.ledger[f] if fs.ledger != NULL else fs.frames[f].mapcount


cdef void frames_drop_ledger(frame_store *fs, uint32_t *ledger) noexcept nogil:
    """A member is gone, and its pages with it: its references are given
    back, and frames no one maps any more are reclaimed."""
    cdef uint32_t f, n
    for f in range(fs.frame_high):
        n = ledger[f]
        if n == 0:
            continue
        ledger[f] = 0
        n = min(n, fs.frames[f].mapcount)
        fs.frames[f].mapcount -= n
        if fs.frames[f].mapcount == 0:
            if fs.norphans == fs.orphans_cap:
                reclaim_frames(fs)
            fs.orphans[fs.norphans] = f
            fs.norphans += 1
    reclaim_frames(fs)


cdef void frames_copy_ledger(frame_store *fs, uint32_t *to) noexcept nogil:
    """A fork: the child's pages map what this process's map, so the
    child's ledger (`to`) holds the same references, counted in the
    mapcounts too."""
    cdef uint32_t f
    for f in range(fs.frame_high):
        to[f] = fs.ledger[f]
        fs.frames[f].mapcount += fs.ledger[f]


cdef void frames_recount(frame_store *fs, uint32_t **ledgers, int n) noexcept nogil:
    """A member died holding the lock, in the middle of anything: the
    store is made whole again from what cannot be half-done, the living
    members' ledgers. Every mapcount is their sum; the stable tree is
    built again from the frames in use; every other slot is punched (a
    frame the dead member was writing, or had orphaned)."""
    cdef uint32_t f, run_first = 0, run_len = 0
    cdef uint64_t count
    cdef int m
    memset(fs.stable, 0xFF, (<size_t>fs.stable_mask + 1) * sizeof(uint32_t))
    fs.frames_in_use = 0
    fs.norphans = 0
    for f in range(fs.frame_high):
        count = 0
        for m in range(n):
            count += ledgers[m][f]
        fs.frames[f].mapcount = <uint32_t>count
        if count:
            fs.frames_in_use += 1
            stable_tree_link(fs, fs.stable, fs.stable_mask, f)
            continue
        if run_len and f == run_first + run_len:
            run_len += 1
            continue
        if run_len:
            punch_frames(fs, run_first, run_len)
        run_first, run_len = f, 1
    if run_len:
        punch_frames(fs, run_first, run_len)
    while fs.frames_in_use > fs.stable_mask:
        stable_tree_split(fs)


cdef void stable_tree_split(frame_store *fs) noexcept nogil:
    """Double a shared table's buckets where they are (its memory is
    reserved for the most buckets it can need): bucket b's chain splits
    between b and b + the old count."""
    cdef uint32_t old = fs.stable_mask + 1, mask = 2 * fs.stable_mask + 1
    cdef uint32_t b, f, next_f
    if <size_t>mask + 1 > 2 * fs.nslots:
        return
    memset(&fs.stable[old], 0xFF, <size_t>old * sizeof(uint32_t))
    for b in range(old):
        f = fs.stable[b]
        fs.stable[b] = NO_FRAME
        while f != NO_FRAME:
            next_f = fs.frames[f].next
            stable_tree_link(fs, fs.stable, mask, f)
            f = next_f
    fs.stable_mask = mask
