# The mappings (VMAs) the kernel made, asked by address: PROCMAP_QUERY on
# /proc/self/maps (Linux 6.11), one ioctl a mapping. Part of the page tables
# (_pagemap.pxd); what a remap costs in mappings is worked out from these in
# _remap.pxi.


cdef int find_mapping(page_tables *pt, uint64_t addr, mapping *m) noexcept nogil:
    """The mapping that covers addr or, if none does, the next one: 0, or
    ENOENT past the last mapping, or ENOTTY before Linux 6.11."""
    cdef pd_procmap_query q
    cdef int fd = proc_file_fd(&pt.maps, "/proc/self/maps")
    if fd < 0:
        return ENOTTY
    memset(&q, 0, sizeof(q))
    q.size = sizeof(q)
    q.query_flags = PD_PROCMAP_QUERY_COVERING_OR_NEXT_VMA
    q.query_addr = addr
    if ioctl(fd, PD_PROCMAP_QUERY, &q) != 0:
        return errno
    m[0] = mapping(q.vma_start, q.vma_end, q.vma_offset, q.inode, q.dev_major, q.dev_minor,
                   q.vma_flags)
    return 0


cdef long count_mappings(page_tables *pt, uint64_t lo, uint64_t hi) noexcept nogil:
    """Mappings that meet [lo, hi), or -1 if the kernel cannot say."""
    cdef mapping m
    cdef long n = 0
    cdef int err
    PD_ASSERT(lo <= hi, "count_mappings: a window")
    while lo < hi:
        err = find_mapping(pt, lo, &m)
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
