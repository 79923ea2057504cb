# What a remap costs in mappings, asked of the kernel. One mmap inside a
# mapping splits it in three, so a pass charges every run MAPPINGS_PER_REMAP
# while the budget allows. When it does not, the pass looks at the mappings
# around the run (PROCMAP_QUERY on /proc/self/maps, Linux 6.11, one ioctl a
# mapping) and predicts what the kernel will make of them: a page going back
# onto the frame it left, inside the mapping it left, joins the mappings on
# both sides and costs nothing. The mappings are counted again after the
# remap, and the budget is charged what the remap really cost.

cdef struct mapping:               # one mapping (VMA), as PROCMAP_QUERY tells it
    uint64_t start, end            # [start, end) of the address space
    uint64_t offset                # in the file, of start; 0 if anonymous
    uint64_t inode                 # of the file; 0 if anonymous
    uint32_t dev_major, dev_minor  # of the file's filesystem
    uint64_t flags                 # readable, writable, executable, shared

cdef struct remap_cost:            # the mappings one remap of a run changes
    uint64_t lo, hi                # the window: the run and the mappings it touches
    long before                    # mappings meeting the window before the remap
    long predicted                 # mappings the remap adds (negative: removes)

cdef enum:
    MAPPING_READ_WRITE = 0x3       # PROCMAP_QUERY_VMA_READABLE | _WRITABLE: an arena mapping


cdef int find_mapping(Core c, uint64_t addr, mapping *m) noexcept nogil:
    """The mapping that covers addr or, if none does, the next one: 0, or
    ENOENT past the last mapping, or ENOTTY before Linux 6.11."""
    cdef pd_procmap_query q
    if c.maps_pid != getpid():          # a fork: the old descriptor shows the parent
        if c.maps_fd >= 0:
            close(c.maps_fd)
        c.maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)
        c.maps_pid = getpid()
    if c.maps_fd < 0:
        return ENOTTY
    memset(&q, 0, sizeof(q))
    q.size = sizeof(q)
    q.query_flags = PD_PROCMAP_QUERY_COVERING_OR_NEXT_VMA
    q.query_addr = addr
    if ioctl(c.maps_fd, PD_PROCMAP_QUERY, &q) != 0:
        return errno
    m[0] = mapping(q.vma_start, q.vma_end, q.vma_offset, q.inode, q.dev_major, q.dev_minor,
                   q.vma_flags)
    return 0


cdef long count_mappings(Core c, uint64_t lo, uint64_t hi) noexcept nogil:
    """Mappings that meet [lo, hi), or -1 if the kernel cannot say."""
    cdef mapping m
    cdef long n = 0
    cdef int err
    while lo < hi:
        err = find_mapping(c, lo, &m)
        if err == ENOENT or (err == 0 and m.start >= hi):
            break
        if err:
            return -1
        n += 1
        lo = m.end
    return n


cdef bint joins(const mapping *left, const mapping *right) noexcept nogil:
    """Whether the kernel makes one mapping of two neighbours: the same file
    at offsets that follow on, or both anonymous; the same protection."""
    return (left.end == right.start and left.flags == right.flags
            and left.inode == right.inode
            and left.dev_major == right.dev_major and left.dev_minor == right.dev_minor
            and (left.inode == 0 or left.offset + (left.end - left.start) == right.offset))


cdef bint predict_remap_cost(Core c, size_t first, size_t n, run_kind kind,
                             remap_cost *cost) noexcept nogil:
    """What remapping the whole run will cost, from the mappings around it;
    False if the kernel cannot show them."""
    cdef uint64_t a = <uint64_t>page_address(c, first), b = a + n * c.page_size
    cdef uint64_t lo = <uint64_t>c.base, hi = lo + c.npages * c.page_size
    cdef mapping left, right, placed, view
    cdef bint has_left = a > lo and find_mapping(c, a - 1, &left) == 0 and left.start < a
    cdef bint has_right = b < hi and find_mapping(c, b, &right) == 0 and right.start <= b
    cdef bint join_left = False, join_right = False
    cdef bint one_mapping = has_left and has_right and left.start == right.start
    cdef long after = 1
    placed = mapping(a, b, 0, 0, 0, 0, MAPPING_READ_WRITE)
    if kind == RUN_FRAMES:              # the memfd's identity, from its view
        if find_mapping(c, <uint64_t>tier_of(c, c.rmap[first].frame).view, &view) != 0:
            return False
        placed.inode, placed.dev_major, placed.dev_minor = view.inode, view.dev_major, view.dev_minor
        placed.offset = <uint64_t>c.rmap[first].frame * c.page_size
    cost.lo = left.start if has_left else a
    cost.hi = right.end if has_right else b
    cost.before = count_mappings(c, cost.lo, cost.hi)
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
    cdef long now = count_mappings(c, cost.lo, cost.hi)
    return now - cost.before if now >= 0 else MAPPINGS_PER_REMAP
