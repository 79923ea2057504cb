# Transparent huge pages (_huge.pxi): the rule by which a pass keeps one of
# the arena's 2 MiB blocks whole or splits it, and what keeping it costs.

cdef enum:
    HUGE_ALIGN = 2097152           # the reservation starts on a 2 MiB boundary, so that
                                   # arena page p's block is p // huge.pages on every machine
                                   # whose PMD maps 2 MiB (x86-64, arm64 with 4 KiB pages)
    FENCE_READ_BLOCKS = 64         # blocks a fence asks PAGEMAP_SCAN about at a time (fence_end)

cdef struct huge_policy:           # Core.huge
    size_t pages                   # arena pages per huge page; 0: huge pages off
    uint32_t split_min             # the fewest pages a split must merge (huge_split_min_pages)
    uint64_t split_total           # huge pages split by passes since the arena began
    uint64_t last_kept             # huge pages the last full pass kept whole
    uint64_t last_kept_pages       # their pages that matched, left unmerged
    uint8_t *advised               # a byte a 2 MiB block: 1 while advised MADV_HUGEPAGE
                                   # (advise_blocks) and not fenced since (huge_open)
    size_t nblocks                 # of advised

cdef int huge_open(huge_policy *h, size_t npages, size_t page_size) noexcept nogil
cdef void huge_close(huge_policy *h) noexcept nogil
cdef size_t huge_block_end(const huge_policy *h, size_t p) noexcept nogil
cdef size_t huge_block_pages(const huge_policy *h) noexcept nogil
cdef int advise_blocks(Core c, size_t first, size_t n, bint on, size_t *blocks) noexcept nogil
cdef void keep_huge_pages(Core c, size_t first, size_t end, pass_stats *st) noexcept nogil
