# Transparent huge pages. With the huge_pages knob on, the arena's big arrays
# (4 MiB or more, numpy's threshold; pages.py) start on a 2 MiB boundary and
# their whole blocks are advised MADV_HUGEPAGE, as numpy advises its own; the
# kernel backs each block with one huge page where it can: one TLB entry
# instead of 512, which random access (gathers, transposes) feels most. The
# rest of the reservation stays MADV_NOHUGEPAGE, as do remaps: a small
# array must not take a 2 MiB page for its few pages.
#
# A merge would split such a page: remapping or zapping part of it breaks the
# PMD into 512 PTEs for good. So a pass, once it has decided its targets and
# before it applies them, looks at each block that is a huge page now as one
# unit (keep_huge_pages):
#   - all its pages have targets: it goes whole (a block of zeros is zapped
#     in one MADV_DONTNEED, frames are mapped over it): nothing is lost;
#   - some have: it is split only if they are at least huge.split_min pages
#     (the memory saved pays the slower access); else its targets are
#     dropped and counted (skipped_huge), as the mapping budget's are.
# A split block is fenced first, advised MADV_NOHUGEPAGE: one whose zeros
# are zapped must be, or khugepaged would collapse it again (max_ptes_none is
# 511 by default) and fill the zapped pages with memory. The fence reaches
# over the huge pages after the block in its mapping, so that one paid fence
# serves every block of an array after it (fence_block).


cdef int huge_open(huge_policy *h, size_t npages, size_t page_size) noexcept nogil:
    """The advice map of a reservation of npages (address space, no memory
    until used); ENOMEM without it."""
    h.nblocks = npages // (HUGE_ALIGN // page_size) + 1
    h.advised = <uint8_t *>map_lazily(h.nblocks)
    return ENOMEM if <void *>h.advised == MAP_FAILED else 0


cdef void huge_close(huge_policy *h) noexcept nogil:
    if <void *>h.advised != MAP_FAILED:
        munmap(h.advised, h.nblocks)
    h.advised = <uint8_t *>MAP_FAILED


cdef inline size_t advice_pages(Core c) noexcept nogil:
    """The pages of a 2 MiB block, the unit of the advice map."""
    return HUGE_ALIGN // c.res.page_size


cdef inline size_t advice_block(Core c, size_t p) noexcept nogil:
    return p // advice_pages(c)


cdef void note_advice(Core c, size_t lo, size_t hi, bint on) noexcept nogil:
    """Pages [lo, hi) advised MADV_HUGEPAGE (on) or MADV_NOHUGEPAGE: a block
    counts as advised while any of its pages may be (so, where huge pages are
    smaller than 2 MiB, a fence is never skipped wrongly)."""
    cdef size_t a, b
    if on:
        a, b = advice_block(c, lo), advice_block(c, hi - 1) + 1
        memset(c.huge.advised + a, 1, b - a)
    else:
        a, b = advice_block(c, lo + advice_pages(c) - 1), advice_block(c, hi)
        if b > a:
            memset(c.huge.advised + a, 0, b - a)


cdef size_t huge_block_end(const huge_policy *h, size_t p) noexcept nogil:
    """p, rounded up to the next block boundary when huge pages are on: a
    background step ends between blocks, so that the rule sees whole blocks."""
    if h.pages == 0:
        return p
    return (p + h.pages - 1) // h.pages * h.pages


cdef size_t huge_block_pages(const huge_policy *h) noexcept nogil:
    """The pages of a block the rule weighs whole: a huge page's, or 1 when
    huge pages are off."""
    return h.pages if h.pages else 1


cdef int advise_blocks(Core c, size_t first, size_t n, bint on, size_t *blocks) noexcept nogil:
    """MADV_HUGEPAGE (on) or MADV_NOHUGEPAGE over the whole blocks of
    [first, first + n): an array's own, never a block it shares with a
    small array, which would then take 2 MiB of memory for a few pages."""
    cdef size_t hp = c.huge.pages if c.huge.pages else advice_pages(c)
    cdef size_t lo = (first + hp - 1) // hp * hp, hi = (first + n) // hp * hp
    blocks[0] = 0
    if hi <= lo:
        return 0
    if on:
        note_advice(c, lo, hi, True)    # first: a failed advice may have advised some
    if madvise(page_address(&c.res, lo), (hi - lo) * c.res.page_size,
               MADV_HUGEPAGE if on else MADV_NOHUGEPAGE) != 0:
        return errno
    if not on:
        note_advice(c, lo, hi, False)
    blocks[0] = (hi - lo) // hp
    return 0


cdef inline size_t count_targets(Core c, size_t first, size_t n, size_t *zeros) noexcept nogil:
    cdef size_t p, found = 0
    zeros[0] = 0
    for p in range(first, first + n):
        if c.res.rmap[p].flags & (PAGE_TARGET | PAGE_TARGET_ZERO):
            found += 1
            zeros[0] += c.res.rmap[p].flags & PAGE_TARGET_ZERO != 0
    return found


cdef bint block_is_huge(Core c, size_t first, size_t n, uint8_t *cats) noexcept nogil:
    """Whether the block is one huge page now: PAGEMAP_SCAN's PAGE_IS_HUGE.
    Without it (before Linux 6.7), a whole block of anonymous pages that
    hold memory of their own is taken for one, as THP would have made it."""
    cdef size_t i
    cdef int err = read_huge(&c.tables, first, n, cats)
    if err == 0:
        return cats[0] & PD_PAGE_IS_HUGE != 0
    if n < c.huge.pages or read_categories(&c.tables, first, n, cats) != 0:
        return False
    for i in range(n):
        if not holds_own_memory(cats[i]) or cats[i] & PD_PAGE_IS_FILE:
            return False
    return True


cdef size_t fence_end(Core c, size_t first, long *cost) noexcept nogil:
    """Where a fence from block `first` ends, and the mappings it may add
    (*cost): through the blocks after it that are huge pages now and still
    advised huge, within the block's mapping. A block that holds no memory
    yet ends it, so that it still faults in a huge page. The block alone, at
    the worst cost, if the kernel cannot say."""
    cdef mapping m
    cdef size_t hp = c.huge.pages, end = first + hp, last, n, i
    cdef uint64_t addr = <uint64_t>page_address(&c.res, first)
    cdef uint64_t top = <uint64_t>page_address(&c.res, c.res.npages)
    cdef uint8_t *cats
    cost[0] = MAPPINGS_PER_REMAP
    if (find_mapping(&c.tables, addr, &m) != 0 or not m.start <= addr
            or <uint64_t>page_address(&c.res, end) > m.end):
        return end
    last = (min(m.end, top) - <uint64_t>c.res.base) // c.res.page_size // hp * hp
    cats = <uint8_t *>malloc(FENCE_READ_BLOCKS * hp) if last > end else NULL
    while cats != NULL and end < last:  # a read at a time, up to the first block not huge
        n = min(last - end, FENCE_READ_BLOCKS * hp)
        if read_huge(&c.tables, end, n, cats) != 0:
            break
        i = 0
        while i < n and cats[i] & PD_PAGE_IS_HUGE and c.huge.advised[advice_block(c, end + i)]:
            i += hp
        end += i
        if i < n:
            break
    free(cats)
    cost[0] = (addr > m.start) + (<uint64_t>page_address(&c.res, end) < m.end)
    return end


cdef bint fence_block(Core c, size_t first, size_t zeros, pass_stats *st) noexcept nogil:
    """Before a split: keep khugepaged away from the block (MADV_NOHUGEPAGE),
    and from the huge pages after it in its mapping (fence_end). It adds two
    mappings at most, at its ends (none where the mapping after is the
    reservation's own, NOHUGEPAGE too), charged to the budget; the blocks
    after need no fence of their own, so a background scan whose first
    blocks' copies spent the budget still zaps the zeros of the later ones.
    The huge pages it covers stay (the advice splits none), but one that the
    kernel splits later (a write after a fork, a block of zeros zapped whole
    and written again) comes back on small pages. A split that zaps zeros
    needs the fence: False if the budget cannot pay it, and the block is
    then kept whole. One that does not takes it where the budget can pay and
    it covers blocks after (its own remaps keep khugepaged from the block)."""
    cdef size_t end
    cdef long cost
    if not c.huge.advised[advice_block(c, first)]:
        return True                     # not advised huge (fenced before): nothing to add
    if zeros == 0 and st.mappings_left < MAPPINGS_PER_REMAP:
        return True                     # not needed, and perhaps not paid: not tried
    end = fence_end(c, first, &cost)
    if zeros == 0 and end == first + c.huge.pages:
        return True
    if st.mappings_left < cost:
        return zeros == 0
    if madvise(page_address(&c.res, first), (end - first) * c.res.page_size, MADV_NOHUGEPAGE) != 0:
        if errno == ENOMEM:
            st.mappings_left = 0        # the kernel's mapping limit: add no more mappings
        return zeros == 0
    note_advice(c, first, end, False)
    st.mappings_left -= cost
    st.syscalls += 1
    return True


cdef void keep_or_split(Core c, size_t b, size_t n, uint8_t *cats, pass_stats *st) noexcept nogil:
    """The rule for the block of pages [b, b + n)."""
    cdef size_t zeros, targets = count_targets(c, b, n, &zeros)
    if targets == 0 or targets == c.huge.pages or not block_is_huge(c, b, n, cats):
        return
    if targets >= c.huge.split_min and fence_block(c, b, zeros, st):
        st.huge_split += 1
        return
    drop_targets(c, b, n)
    st.skipped_huge += targets
    st.huge_kept += 1


cdef void keep_huge_pages(Core c, size_t first, size_t end, pass_stats *st) noexcept nogil:
    """The rule above, for the blocks that meet pages [first, end)."""
    cdef size_t hp = c.huge.pages, b
    cdef uint8_t *cats
    PD_ASSERT(end <= c.res.high_water, "keep_huge_pages: pages below high_water")
    if hp == 0 or first >= end:
        return
    cats = <uint8_t *>malloc(hp)
    if cats == NULL:
        return                          # no memory to look: the pass splits as before
    b = first - first % hp
    while b < end:
        keep_or_split(c, b, min(hp, c.res.high_water - b), cats, st)
        b += hp
    free(cats)
