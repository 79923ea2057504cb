# Reading the page tables: which arena pages still map their frame, which map
# the zero page, which hold memory of their own. PAGEMAP_SCAN (Linux 6.7)
# answers for a whole range in one call; /proc/self/pagemap, eight bytes a
# page, is the fallback. Both work without privileges. The record is
# page_tables (_pagemap.pxd), shared with _maps.pxi and _track.pxi.

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


cdef int proc_file_fd(proc_file *f, const char *path) noexcept nogil:
    """The descriptor of /proc file `path`, opened again if this process is
    not the one it was opened in: after a fork the old descriptor still shows
    the parent. -1 if it cannot be opened. The one place that knows."""
    cdef int pid = getpid()
    if f.pid != pid:
        if f.fd >= 0:
            close(f.fd)
        f.fd = open(path, O_RDONLY | O_CLOEXEC)
        f.pid = pid
    return f.fd


cdef inline int pagemap_fd(page_tables *pt) noexcept nogil:
    return proc_file_fd(&pt.pagemap, "/proc/self/pagemap")


cdef void page_tables_open(page_tables *pt, char *base, size_t page_size,
                           size_t npages) noexcept nogil:
    """Readers of the page tables of [base, base + npages * page_size);
    which ways this kernel offers is probed at once."""
    memset(pt, 0, sizeof(page_tables))
    pt.base = base
    pt.page_size = page_size
    pt.npages = npages
    pt.pagemap = proc_file(-1, 0)
    pt.maps = proc_file(-1, 0)
    pt.track_uffd = -1
    probe_page_tables(pt)


cdef void page_tables_close(page_tables *pt) noexcept nogil:
    if pt.track_uffd >= 0:
        close(pt.track_uffd)
    if pt.pagemap.fd >= 0:
        close(pt.pagemap.fd)
    if pt.maps.fd >= 0:
        close(pt.maps.fd)
    pt.pagemap.fd = pt.maps.fd = pt.track_uffd = -1


cdef int scan_categories(page_tables *pt, size_t first, size_t n, uint8_t *out,
                         uint64_t flags=0, uint64_t wanted=CATEGORIES) noexcept nogil:
    """PAGEMAP_SCAN of the `wanted` categories; with PD_PM_SCAN_WP_MATCHING
    it also reports which pages were written and write-protects them again
    (_track.pxi)."""
    cdef pd_page_region regions[REGIONS_PER_CALL]
    cdef pd_pm_scan_arg arg
    cdef uint64_t start = <uint64_t>(pt.base + first * pt.page_size)
    cdef uint64_t p, lo, hi
    cdef long found, i
    memset(&arg, 0, sizeof(arg))
    arg.size = sizeof(arg)
    arg.start = start
    arg.end = start + n * pt.page_size
    arg.vec = <uint64_t>regions
    arg.vec_len = REGIONS_PER_CALL
    arg.flags = flags
    arg.category_anyof_mask = wanted
    arg.return_mask = wanted | (PD_PAGE_IS_WRITTEN if flags else 0)
    if flags and pt.spare_huge:         # write-protect no huge page: see take_written
        arg.category_inverted = arg.category_mask = PD_PAGE_IS_HUGE
    while True:
        found = ioctl(pt.pagemap.fd, PD_PAGEMAP_SCAN, &arg)
        if found < 0:
            return errno
        for i in range(found):
            lo = (regions[i].start - start) // pt.page_size
            hi = (regions[i].end - start) // pt.page_size
            memset(out + lo, <int>regions[i].categories, hi - lo)
        if arg.walk_end >= arg.end or found < REGIONS_PER_CALL:
            return 0
        arg.start = arg.walk_end


cdef uint8_t pagemap_entry_categories(page_tables *pt, uint64_t entry) noexcept nogil:
    cdef uint8_t cats = 0
    if entry & PM_PRESENT:
        cats |= PD_PAGE_IS_PRESENT
        if entry & PM_FILE:
            cats |= PD_PAGE_IS_FILE
        elif pt.zero_pfn:
            if entry & PM_PFN == pt.zero_pfn:
                cats |= PD_PAGE_IS_PFNZERO
        elif not entry & PM_EXCLUSIVE:
            # Frame numbers are hidden without CAP_SYS_ADMIN: a present page
            # that is neither a file page nor ours alone is the zero page,
            # unless a fork made it shared.
            cats |= PD_PAGE_IS_PFNZERO
    elif entry & PM_SWAPPED:
        cats |= PD_PAGE_IS_SWAPPED
    return cats


cdef int pagemap_categories(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil:
    cdef uint64_t entries[PAGEMAP_ENTRIES_PER_READ]
    cdef size_t done = 0, want, i
    cdef size_t vpn = <size_t>pt.base // pt.page_size + first
    cdef long got
    while done < n:
        want = min(n - done, <size_t>PAGEMAP_ENTRIES_PER_READ)
        got = pread(pt.pagemap.fd, entries, want * 8, <long>((vpn + done) * 8))
        if got <= 0:
            return errno if got < 0 else ENOMEM
        for i in range(<size_t>got // 8):
            out[done + i] = pagemap_entry_categories(pt, entries[i])
        done += <size_t>got // 8
    return 0


cdef int read_categories(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil:
    """PAGE_IS_* categories of arena pages [first, first + n) into out[0:n]."""
    PD_ASSERT(first + n <= pt.npages, "read_categories: pages of the reservation")
    memset(out, 0, n)
    if pagemap_fd(pt) < 0:
        return EBADF
    if pt.has_pagemap_scan:
        return scan_categories(pt, first, n, out)
    return pagemap_categories(pt, first, n, out)


cdef int read_huge(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil:
    """PD_PAGE_IS_HUGE on the pages of [first, first + n) that a huge page
    maps (PMD-mapped THP), 0 on the others; EOPNOTSUPP without PAGEMAP_SCAN,
    since /proc/self/pagemap does not tell (only kpageflags, root's)."""
    PD_ASSERT(first + n <= pt.npages, "read_huge: pages of the reservation")
    memset(out, 0, n)
    if not pt.has_pagemap_scan or pagemap_fd(pt) < 0:
        return EOPNOTSUPP
    return scan_categories(pt, first, n, out, 0, PD_PAGE_IS_HUGE)


cdef int take_written(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil:
    """Like read_categories, with PD_PAGE_IS_WRITTEN set on the pages written
    since the last call that covered them (every page, without tracking);
    tracking starts over for the range."""
    cdef size_t i
    cdef int err
    PD_ASSERT(first + n <= pt.npages, "take_written: pages of the reservation")
    if pt.track_uffd < 0:
        err = read_categories(pt, first, n, out)
        for i in range(n):
            out[i] |= PD_PAGE_IS_WRITTEN
        return err
    memset(out, 0, n)
    if pagemap_fd(pt) < 0:
        return EBADF
    err = scan_categories(pt, first, n, out, PD_PM_SCAN_WP_MATCHING)
    if err == 0 and pt.spare_huge:
        err = huge_pages_written(pt, first, n, out)
    return err


cdef int read_written(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil:
    """out[i] nonzero for each page of [first, first + n) that may have been
    written since take_written protected it, 0 for each that was not: a
    write would have made the kernel lift its protection. A page that no
    longer holds memory of its own (dropped with MADV_DONTNEED since) counts
    as written too. Protects nothing. Without tracking, every page counts
    as written."""
    cdef size_t i
    cdef int err
    PD_ASSERT(first + n <= pt.npages, "read_written: pages of the reservation")
    memset(out, 1 if pt.track_uffd < 0 else 0, n)
    if pt.track_uffd < 0:
        return 0
    if pagemap_fd(pt) < 0:
        return EBADF
    err = scan_categories(pt, first, n, out, 0, CATEGORIES | PD_PAGE_IS_WRITTEN)
    for i in range(n):
        out[i] = out[i] & PD_PAGE_IS_WRITTEN != 0 or not holds_own_memory(out[i])
    return err


cdef int huge_pages_written(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil:
    """With spare_huge, the huge pages take_written's scan left out, as
    present and written. The kernel splits a huge page on the first write
    into it once write-protected for tracking (wp_huge_pmd: async
    write-protect is resolved per page), so they are never protected, and
    are read every pass, as without tracking."""
    cdef uint8_t *huge = <uint8_t *>malloc(2 * n)
    cdef uint8_t *cats = huge + n
    cdef size_t i
    cdef int err
    if huge == NULL:
        return ENOMEM
    err = read_huge(pt, first, n, huge)
    if err == 0:
        err = read_categories(pt, first, n, cats)   # the huge zero page is PFNZERO
    for i in range(n if err == 0 else 0):
        if huge[i]:
            out[i] = cats[i] | PD_PAGE_IS_WRITTEN
    free(huge)
    return err


cdef int pagemap_entry(page_tables *pt, const void *addr, uint64_t *entry) noexcept nogil:
    """The /proc/self/pagemap entry of the page at addr; 0 or an errno."""
    if pagemap_fd(pt) < 0:
        return EBADF
    if pread(pt.pagemap.fd, entry, 8, <long>(<size_t>addr // pt.page_size * 8)) != 8:
        return errno
    return 0


cdef void probe_page_tables(page_tables *pt) noexcept nogil:
    """Which way of reading page tables this kernel offers, and the frame
    number of the zero page where pagemap shows frame numbers (root)."""
    cdef uint8_t cats
    cdef uint64_t entry = 0
    # The last page, where arrays come last: a read leaves a page table
    # behind, and a 2 MiB block with one gets 4 KiB pages on its faults, not
    # a huge page (_huge.pxi).
    cdef volatile char *last = pt.base + (pt.npages - 1) * pt.page_size
    if pagemap_fd(pt) < 0:
        return
    pt.has_pagemap_scan = scan_categories(pt, 0, 1, &cats) == 0
    last[0]                             # a read maps the zero page
    if pagemap_entry(pt, <const void *>last, &entry) == 0:
        pt.zero_pfn = entry & PM_PFN if entry & PM_PRESENT else 0
    madvise(<void *>last, pt.page_size, MADV_DONTNEED)


cdef bint holds_own_memory(uint8_t cats) noexcept nogil:
    """Whether a page of these PAGE_IS_* categories holds memory of its own.
    Pages never written hold none, nor do those a read mapped to the zero
    page: nothing to merge or count, and reading them would only fault them
    in."""
    return cats & (PD_PAGE_IS_PRESENT | PD_PAGE_IS_SWAPPED) and not cats & PD_PAGE_IS_PFNZERO
