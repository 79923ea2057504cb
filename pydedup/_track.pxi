# Written-page tracking: which arena pages were written since a pass last
# looked at them, so that a pass need not read pages that did not change.
# The arena is registered with a userfaultfd in asynchronous write-protect
# mode: the kernel resolves a write to a protected page by itself (no signal,
# no thread) and PAGEMAP_SCAN then shows the page as PAGE_IS_WRITTEN. A pass
# takes the written bits and protects the pages again in the same call, so a
# write made while it hashes a page is seen by the next pass. Needs no
# privilege (Linux 6.7+); without it every page counts as written, and the
# checksums tell what changed. Part of the page tables (_pagemap.pxd).

cdef int start_tracking(page_tables *pt) noexcept nogil:
    """0, or the errno that leaves every page counted as written."""
    cdef uint64_t wanted = (PD_UFFD_FEATURE_WP_ASYNC | PD_UFFD_FEATURE_WP_UNPOPULATED
                            | PD_UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    cdef uint64_t granted = 0
    cdef int fd, err
    if not pt.has_pagemap_scan:
        return ENOTTY
    fd = pd_uffd_open(1, wanted, &granted)
    if fd < 0:
        return -fd
    err = EOPNOTSUPP if granted & wanted != wanted else 0
    if err == 0:
        err = pd_uffd_register(fd, pt.base, pt.npages * pt.page_size)
    if err:
        close(fd)
        return err
    pt.track_uffd = fd
    return 0


cdef void stop_tracking(page_tables *pt) noexcept nogil:
    if pt.track_uffd >= 0:
        close(pt.track_uffd)             # the registration goes with the last reference
        pt.track_uffd = -1


cdef bint tracking(page_tables *pt) noexcept nogil:
    return pt.track_uffd >= 0


cdef void track_range(page_tables *pt, char *addr, size_t length) noexcept nogil:
    """A new mapping over arena pages (a remap) joins the tracking. If it
    cannot, its pages just count as written."""
    PD_ASSERT(addr >= pt.base and addr + length <= pt.base + pt.npages * pt.page_size,
              "track_range: a range of the reservation")
    if pt.track_uffd >= 0:
        pd_uffd_register(pt.track_uffd, addr, length)


cdef void untrack_range(page_tables *pt, char *addr, size_t length) noexcept nogil:
    """Before the uffd barrier takes the range: a mapping belongs to one
    userfaultfd at a time. Its pages count as written until tracked again."""
    PD_ASSERT(addr >= pt.base and addr + length <= pt.base + pt.npages * pt.page_size,
              "untrack_range: a range of the reservation")
    if pt.track_uffd >= 0:
        pd_uffd_unregister(pt.track_uffd, addr, length)


cdef bint track_huge_pages(page_tables *pt) noexcept nogil:
    """For one pass: take_written protects huge pages too, so that the pass
    learns which of them were written since it read them. True if it
    changed anything; spare_huge_pages_again() must then follow the pass."""
    if not (pt.spare_huge and pt.track_uffd >= 0):
        return False
    pt.spare_huge = False
    return True


cdef void spare_huge_pages_again(page_tables *pt, size_t first, size_t n) noexcept nogil:
    """After such a pass: the huge pages of [first, first + n) that are still
    whole lose that protection, since a write into one would split it; they
    count as written at the next pass, as spared huge pages do."""
    cdef uint8_t *huge = <uint8_t *>malloc(n)
    cdef size_t i = 0, j
    pt.spare_huge = True
    if huge == NULL or read_huge(pt, first, n, huge) != 0:
        # Left protected, they stay correct: the first write splits one.
        free(huge)
        return
    while i < n:
        j = i
        while j < n and huge[j]:
            j += 1
        if j > i:
            pd_uffd_write_unprotect(pt.track_uffd, pt.base + (first + i) * pt.page_size,
                                    (j - i) * pt.page_size)
        i = j + 1
    free(huge)
