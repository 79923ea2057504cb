# The frame store (_frames.pxi), after KSM's stable nodes: the frames, the
# memfds (tiers) they live in, the stable tree that finds a frame by
# content, orphans and reclaim, the fork fence. Plain C with every address
# and descriptor inside, and what it needs of other parts (a page's node,
# the memory policy) passed in: ready to move to memory shared by processes.

cdef extern from "_writes.h" nogil:
    enum:
        PD_WRITES_AHEAD
    ctypedef struct pd_writes:     # new frames written on the scan's helper threads
        pass
    ctypedef struct pd_write:      # one pwrite of a run of frames, to the end or an error
        int fd
        const char *content
        size_t length
        long offset
        size_t written
        int err
    void pd_write_run(pd_write *j, size_t *helped)
    pd_writes *pd_writes_open()
    void pd_writes_put(pd_writes *w)
    size_t pd_writes_post(pd_writes *w, int fd, const char *content, size_t length, long offset)
    int pd_writes_finish(pd_writes *w, size_t i, size_t *written)
    size_t pd_writes_helped(pd_writes *w)

cdef enum:
    MAX_TIERS = 8                  # tiers of a frame store: one, plus one a fork level
    FRAME_STRIPES = 4              # memfds a tier, which threads write new frames into side
                                   # by side: a write into a shmem file holds its inode lock
    STRIPE_PAGES = 1024            # consecutive frames in one memfd, then the next one's
    MAX_TILE_PAGES = 65536         # frame_item.tile_index is 16 bits
    WRITE_BEHIND_PAGES = 1024      # new frames written with one pwrite, at most
    POSTED_WRITE_PAGES = 16        # writes of fewer frames are done at once: handing one to
                                   # a helper (a futex wake, a wait) costs what it would save

cdef struct frame_file:            # one memfd of the frame store
    int fd                         # frame f at page file_page(f); -1 if none
    char *view                     # read-only shared window on all of it

cdef struct frame_tier:            # the memfds of one generation of forked processes
    uint32_t first_frame           # frames [first_frame, next tier's first_frame) live here,
    frame_file files[FRAME_STRIPES]    # frame f in files[stripe_of(f)], whose stripes follow
                                       # each other: every FRAME_STRIPES-th run of STRIPE_PAGES

# In a store shared by processes: what frame_store holds that its members keep
# in common, in the shared mapping (frames_load, frames_save).
cdef struct frames_common:
    uint32_t frames_in_use
    uint32_t frame_high
    uint32_t frame_cursor
    uint32_t stable_mask
    uint64_t norphans
    uint32_t merge_across_nodes

cdef struct written_from:          # new frames of a pass and the pages they were written from
    const char *content            # the first page
    uint32_t frame                 # the first frame
    uint32_t n                     # consecutive frames, from consecutive pages

cdef struct frame_store:           # Core.store
    size_t page_size
    size_t nslots                  # frame slots: as many as arena pages
    frame_tier tiers[MAX_TIERS]    # by first_frame, tiers[0] from frame 0;
    int ntiers                     # new frames go to tiers[ntiers - 1]
    frame_item *frames             # nslots frame slots, mapped lazily
    uint32_t frames_in_use         # == #{f : frames[f].mapcount > 0}
    uint32_t frame_high            # slots [frame_high, nslots) were never used
    uint32_t frame_cursor          # where the next-fit search resumes
    uint32_t fork_fence            # frames below it existed at a fork: shared with
                                   # another process, never punched or reused
    uint32_t *stable               # stable-tree bucket heads
    uint32_t stable_mask           # buckets - 1, a power of two minus one
    uint32_t *orphans              # frames whose mapcount fell to 0, to reclaim
    size_t norphans, orphans_cap
    uint32_t zero_checksum         # of a page of zeros
    uint32_t zero_colours          # zero frames are kept apart by page colour
    bint merge_across_nodes        # one stable tree; else one a node (KSM's knob):
                                   # changes only while no frame is in use
    frames_common *common          # a store shared by processes (_shared.pxi): the
                                   # fields they keep in common, loaded into this
                                   # record under the store's lock; NULL: private
    uint32_t *ledger               # shared: this member's references, one a frame
                                   # (sum over members == mapcount); NULL: private
    written_from *sources          # this pass's new frames and where they came from,
    size_t nsources, sources_cap   # for the check that their pages held still
    uint32_t untrusted_lo          # new frames [untrusted_lo, untrusted_hi) may hold
    uint32_t untrusted_hi          # other content than their pages were compared with
    uint32_t behind_first          # new frames [behind_first, + behind_n) are not
    uint32_t behind_n              # written yet: their content is at behind_content,
    const char *behind_content     # page after page (arena pages, in place until the
    uint16_t behind_node           # remap, which compares them with their frames again);
                                   # one pwrite writes them before anything reads, maps,
                                   # punches or shares a frame (frames_write_behind)
    pd_writes *writes              # where writes are posted, for the scan's helpers to do;
                                   # NULL: each is done at once (frames_write_on_helpers)
    written_from writing[PD_WRITES_AHEAD]  # the writes posted and not collected:
    size_t writes_posted           # [writes_collected, writes_posted), at their number
    size_t writes_collected        # modulo PD_WRITES_AHEAD
    uint32_t unwritten_lo          # new frames [unwritten_lo, unwritten_hi) include those
    uint32_t unwritten_hi          # a write behind failed for (frames_take_unwritten)


cdef int frames_open(frame_store *fs, size_t page_size, size_t nslots,
                     uint32_t zero_checksum) noexcept nogil
cdef void frames_close(frame_store *fs) noexcept nogil
cdef frame_tier *tier_of(frame_store *fs, uint32_t f) noexcept nogil
cdef frame_file *file_of(frame_store *fs, uint32_t f) noexcept nogil
cdef int stripe_of(uint32_t f) noexcept nogil
cdef size_t file_page(uint32_t f) noexcept nogil
cdef uint32_t frame_at(int stripe, size_t page) noexcept nogil
cdef size_t file_page_from(int stripe, uint32_t f) noexcept nogil
cdef char *frame_address(frame_store *fs, uint32_t f) noexcept nogil
cdef const char *frame_content(frame_store *fs, uint32_t f) noexcept nogil
cdef int frame_fd(frame_store *fs, uint32_t f) noexcept nogil
cdef bint files_part_at(frame_store *fs, uint32_t f) noexcept nogil
cdef bint frames_adjoin(frame_store *fs, uint32_t f, uint32_t g) noexcept nogil
cdef void tier_init(frame_tier *t, uint32_t first_frame) noexcept nogil
cdef void frames_fence(frame_store *fs) noexcept nogil
cdef int push_tier(frame_store *fs) noexcept nogil
cdef uint32_t tree_key(frame_store *fs, uint32_t checksum, uint16_t node) noexcept nogil
cdef bint same_tree(frame_store *fs, uint16_t a, uint16_t b) noexcept nogil
cdef uint32_t zero_key(frame_store *fs, size_t vpn) noexcept nogil
cdef void frames_set_across_nodes(frame_store *fs, bint value) noexcept nogil
cdef uint32_t frame_mapcount(frame_store *fs, uint32_t f) noexcept nogil
cdef void frames_forget_sources(frame_store *fs) noexcept nogil
cdef const written_from *frames_sources(frame_store *fs, size_t *n) noexcept nogil
cdef void frames_distrust(frame_store *fs, uint32_t first, uint32_t n) noexcept nogil
cdef bint frames_trusted(frame_store *fs, uint32_t first, uint32_t n) noexcept nogil
cdef uint16_t frame_node(frame_store *fs, uint32_t f) noexcept nogil
cdef uint32_t frame_checksum(frame_store *fs, uint32_t f) noexcept nogil
cdef int frames_write_behind(frame_store *fs) noexcept nogil
cdef void frames_write_on_helpers(frame_store *fs) noexcept nogil
cdef pd_writes *frames_writes(frame_store *fs) noexcept nogil
cdef uint64_t frames_write_here(frame_store *fs) noexcept nogil
cdef void frames_write_other_node(frame_store *fs, uint16_t node) noexcept nogil
cdef bint frames_take_unwritten(frame_store *fs, uint32_t *lo, uint32_t *hi) noexcept nogil
cdef bint frame_unwritten(frame_store *fs, uint32_t f) noexcept nogil
cdef void frame_get(frame_store *fs, uint32_t f) noexcept nogil
cdef void frame_put(frame_store *fs, uint32_t f) noexcept nogil
cdef uint32_t stable_tree_search(frame_store *fs, const char *page, uint32_t checksum,
                                 uint16_t node, uint32_t max_page_sharing,
                                 bint by_checksum) noexcept nogil
cdef void stable_tree_prefetch(frame_store *fs, uint32_t checksum, uint16_t node) noexcept nogil
cdef uint32_t stable_tree_add(frame_store *fs, const char *content, uint32_t checksum,
                              uint16_t node, uint32_t hint) noexcept nogil
cdef void reclaim_frames(frame_store *fs) noexcept nogil
cdef uint32_t frame_tile_index(frame_store *fs, uint32_t f) noexcept nogil
cdef uint32_t tile_start(frame_store *fs, uint32_t f, uint32_t max_page_sharing) noexcept nogil
cdef uint32_t tile_next(frame_store *fs, uint32_t g, const char *page, uint32_t checksum,
                        uint16_t node, uint32_t max_page_sharing, uint32_t tile_pages,
                        size_t run_pages, bint by_checksum, bint *grow) noexcept nogil
cdef uint32_t tile_grow(frame_store *fs, uint32_t g, const char *content) noexcept nogil
cdef void punch_refilled(frame_store *fs, uint32_t lo, uint32_t hi) noexcept nogil
cdef frame_tier *frames_top(frame_store *fs) noexcept nogil
cdef uint32_t frames_high(frame_store *fs) noexcept nogil
cdef size_t frames_metadata_bytes(frame_store *fs) noexcept nogil
cdef bint merges_across_nodes(frame_store *fs) noexcept nogil
cdef int frames_open_shared(frame_store *fs, size_t page_size, size_t nslots,
                            uint32_t zero_checksum, const int *fds, frames_common *common,
                            frame_item *frames, uint32_t *stable, uint32_t *orphans,
                            uint32_t *ledger) noexcept nogil
cdef void frames_load(frame_store *fs) noexcept nogil
cdef void frames_save(frame_store *fs) noexcept nogil
cdef void frames_use_ledger(frame_store *fs, uint32_t *ledger) noexcept nogil
cdef void frames_drop_ledger(frame_store *fs, uint32_t *ledger) noexcept nogil
cdef void frames_copy_ledger(frame_store *fs, uint32_t *to) noexcept nogil
cdef void frames_recount(frame_store *fs, uint32_t **ledgers, int n) noexcept nogil
cdef bint frames_shared(frame_store *fs) noexcept nogil
cdef uint32_t frames_ledger_count(frame_store *fs, uint32_t f) noexcept nogil
