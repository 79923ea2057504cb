# Reading the page tables: which arena pages still map their frame, which map
# the zero page, which hold memory of their own. PAGEMAP_SCAN (Linux 6.7)
# answers for a whole range in one call; /proc/self/pagemap, eight bytes a
# page, is the fallback. Both work without privileges.

cdef uint64_t CATEGORIES = PD_PAGE_IS_FILE | PD_PAGE_IS_PRESENT | PD_PAGE_IS_SWAPPED | PD_PAGE_IS_PFNZERO

cdef enum:
    REGIONS_PER_CALL = 256
    PAGEMAP_ENTRIES_PER_READ = 512

# /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
cdef uint64_t PM_PRESENT = 1ULL << 63
cdef uint64_t PM_SWAPPED = 1ULL << 62
cdef uint64_t PM_FILE = 1ULL << 61
cdef uint64_t PM_EXCLUSIVE = 1ULL << 56
cdef uint64_t PM_PFN = (1ULL << 55) - 1


cdef int open_pagemap(Core c) noexcept nogil:
    """(Re)open /proc/self/pagemap. After fork the old descriptor still reads
    the parent's page tables, so the pid it was opened in is kept beside it."""
    if c.pagemap_fd >= 0:
        close(c.pagemap_fd)
    c.pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
    c.pagemap_pid = getpid()
    return 0 if c.pagemap_fd >= 0 else errno


cdef int scan_categories(Core c, size_t first, size_t n, uint8_t *out,
                         uint64_t flags=0) noexcept nogil:
    """PAGEMAP_SCAN; with PD_PM_SCAN_WP_MATCHING it also reports which pages
    were written and write-protects them again (_track.pxi)."""
    cdef pd_page_region regions[REGIONS_PER_CALL]
    cdef pd_pm_scan_arg arg
    cdef uint64_t start = <uint64_t>(c.base + first * c.page_size)
    cdef uint64_t p, lo, hi
    cdef long found, i
    memset(&arg, 0, sizeof(arg))
    arg.size = sizeof(arg)
    arg.start = start
    arg.end = start + n * c.page_size
    arg.vec = <uint64_t>regions
    arg.vec_len = REGIONS_PER_CALL
    arg.flags = flags
    arg.category_anyof_mask = CATEGORIES
    arg.return_mask = CATEGORIES | (PD_PAGE_IS_WRITTEN if flags else 0)
    while True:
        found = ioctl(c.pagemap_fd, PD_PAGEMAP_SCAN, &arg)
        if found < 0:
            return errno
        for i in range(found):
            lo = (regions[i].start - start) // c.page_size
            hi = (regions[i].end - start) // c.page_size
            memset(out + lo, <int>regions[i].categories, hi - lo)
        if arg.walk_end >= arg.end or found < REGIONS_PER_CALL:
            return 0
        arg.start = arg.walk_end


cdef uint8_t pagemap_entry_categories(Core c, uint64_t entry) noexcept nogil:
    cdef uint8_t cats = 0
    if entry & PM_PRESENT:
        cats |= PD_PAGE_IS_PRESENT
        if entry & PM_FILE:
            cats |= PD_PAGE_IS_FILE
        elif c.zero_pfn:
            if entry & PM_PFN == c.zero_pfn:
                cats |= PD_PAGE_IS_PFNZERO
        elif not entry & PM_EXCLUSIVE:
            # Frame numbers are hidden without CAP_SYS_ADMIN: a present page
            # that is neither a file page nor ours alone is the zero page,
            # unless a fork made it shared.
            cats |= PD_PAGE_IS_PFNZERO
    elif entry & PM_SWAPPED:
        cats |= PD_PAGE_IS_SWAPPED
    return cats


cdef int pagemap_categories(Core c, size_t first, size_t n, uint8_t *out) noexcept nogil:
    cdef uint64_t entries[PAGEMAP_ENTRIES_PER_READ]
    cdef size_t done = 0, want, i
    cdef size_t vpn = <size_t>c.base // c.page_size + first
    cdef long got
    while done < n:
        want = min(n - done, <size_t>PAGEMAP_ENTRIES_PER_READ)
        got = pread(c.pagemap_fd, entries, want * 8, <long>((vpn + done) * 8))
        if got <= 0:
            return errno if got < 0 else ENOMEM
        for i in range(<size_t>got // 8):
            out[done + i] = pagemap_entry_categories(c, entries[i])
        done += <size_t>got // 8
    return 0


cdef int read_categories(Core c, size_t first, size_t n, uint8_t *out) noexcept nogil:
    """PAGE_IS_* categories of arena pages [first, first + n) into out[0:n]."""
    cdef int err = 0
    memset(out, 0, n)
    if c.pagemap_pid != getpid():
        err = open_pagemap(c)
    if err == 0 and c.has_pagemap_scan:
        err = scan_categories(c, first, n, out)
    elif err == 0:
        err = pagemap_categories(c, first, n, out)
    return err


cdef int take_written(Core c, size_t first, size_t n, uint8_t *out) noexcept nogil:
    """Like read_categories, with PD_PAGE_IS_WRITTEN set on the pages written
    since the last call that covered them (every page, without tracking);
    tracking starts over for the range."""
    cdef size_t i
    cdef int err
    if c.track_uffd < 0:
        err = read_categories(c, first, n, out)
        for i in range(n):
            out[i] |= PD_PAGE_IS_WRITTEN
        return err
    memset(out, 0, n)
    if c.pagemap_pid != getpid() and open_pagemap(c) != 0:
        return errno
    return scan_categories(c, first, n, out, PD_PM_SCAN_WP_MATCHING)


cdef void probe_page_tables(Core c) noexcept nogil:
    """Which way of reading page tables this kernel offers, and the frame
    number of the zero page where pagemap shows frame numbers (root)."""
    cdef uint8_t cats
    cdef uint64_t entry = 0
    cdef volatile char *first = c.base
    if open_pagemap(c) != 0:
        return
    c.has_pagemap_scan = True
    if scan_categories(c, 0, 1, &cats) != 0:
        c.has_pagemap_scan = False
    first[0]                            # a read maps the zero page
    if pread(c.pagemap_fd, &entry, 8, <long>(<size_t>c.base // c.page_size * 8)) == 8:
        c.zero_pfn = entry & PM_PFN if entry & PM_PRESENT else 0
    madvise(c.base, c.page_size, MADV_DONTNEED)
