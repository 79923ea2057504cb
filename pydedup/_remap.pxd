# Applying a pass's targets (_remap.pxi): the runs, their barrier, their
# remaps, and what they cost in mappings. No record of its own: it works on
# the reservation's rmap items through the parts below it.

cdef enum run_kind:
    RUN_NONE = 0
    RUN_ZERO_ANON = 1      # zero pages in an anonymous mapping: MADV_DONTNEED
    RUN_ZERO_FILE = 2      # zero pages in a frame-store mapping: anonymous mmap
    RUN_FRAMES = 3         # pages onto consecutive frames of one tier: one mmap of its memfd

cdef enum:
    MAPPINGS_PER_REMAP = 2  # an mmap inside a mapping splits it in three
    MATCH_AHEAD_PAGES = 256  # runs this long are compared on threads (match_run_ahead)
    TRACKED_RUN_PAGES = 8   # runs this long ask the write tracking (match_by_tracking): a
                            # PAGEMAP_SCAN costs about what comparing 5 pages does

cdef enum:
    GROUP_RUNS = 64           # runs the uffd barrier holds under one protection (merge_runs)
    GROUP_GAP_PAGES = 16      # pages between two of them at most, their writers waiting too:
                              # far fewer than a huge page's (512 and more), none kept whole
    GROUP_SPAN_PAGES = 1024   # pages one protection spans at most: long runs gain nothing

cdef struct target_run:            # pages [first, first + n) that go the same way
    size_t first, n
    run_kind kind

cdef struct run_group:             # runs gathered for one protection (gather_run)
    target_run runs[GROUP_RUNS]
    size_t n
    long worst                     # what their remaps may cost in mappings, at worst
    bint alone                     # each run is held alone (a budget plan lent apply room)

cdef struct remap_cost:            # the mappings one remap of a run changes
    uint64_t lo, hi                # the window: the run and the mappings it touches
    long before                    # mappings meeting the window before the remap
    long predicted                 # mappings the remap adds (negative: removes)

cdef run_kind target_kind(Core c, size_t p) noexcept nogil
cdef bint continues_run(Core c, size_t first, size_t n, uint32_t f) noexcept nogil
cdef long worst_remap_cost(run_kind kind) noexcept nogil
cdef bint predict_remap_cost(Core c, size_t first, size_t n, run_kind kind,
                             remap_cost *cost) noexcept nogil
cdef void drop_targets(Core c, size_t first, size_t n) noexcept nogil
cdef void apply_targets(Core c, pass_stats *st, bint lent) noexcept nogil
cdef void free_zero_runs(Core c, size_t first, size_t n, size_t block_pages,
                         pass_stats *st) noexcept nogil
