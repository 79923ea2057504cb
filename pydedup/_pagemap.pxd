# Reading the page tables (_pagemap.pxi, _maps.pxi, _track.pxi): which arena
# pages map what (pagemap, PAGEMAP_SCAN), which mappings the kernel made
# (PROCMAP_QUERY), which pages were written (the tracking userfaultfd).

cdef struct proc_file:             # a /proc/self file, opened in the process it shows
    int fd                         # -1 if not open (or it cannot be)
    int pid                        # the process fd was opened in: after a fork it
                                   # still shows the parent, and is opened again

cdef struct page_tables:           # Core.tables
    char *base                     # the range it reads: the reservation
    size_t page_size
    size_t npages
    proc_file pagemap              # /proc/self/pagemap
    proc_file maps                 # /proc/self/maps, for PROCMAP_QUERY
    bint has_pagemap_scan          # the kernel answers PAGEMAP_SCAN (Linux 6.7)
    uint64_t zero_pfn              # the zero page's frame number; 0 when pagemap hides them
    int track_uffd                 # written-page tracking (_track.pxi), or -1
    bint spare_huge                # tracking leaves huge pages alone: a write into a
                                   # write-protected one splits it (_huge.pxi)

cdef struct mapping:               # one mapping (VMA), as PROCMAP_QUERY tells it
    uint64_t start, end            # [start, end) of the address space
    uint64_t offset                # in the file, of start; 0 if anonymous
    uint64_t inode                 # of the file; 0 if anonymous
    uint32_t dev_major, dev_minor  # of the file's filesystem
    uint64_t flags                 # readable, writable, executable, shared

cdef enum:
    MAPPING_READ_WRITE = 0x3       # PROCMAP_QUERY_VMA_READABLE | _WRITABLE: an arena mapping

# _pagemap.pxi
cdef void page_tables_open(page_tables *pt, char *base, size_t page_size,
                           size_t npages) noexcept nogil
cdef void page_tables_close(page_tables *pt) noexcept nogil
cdef int proc_file_fd(proc_file *f, const char *path) noexcept nogil
cdef int read_categories(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil
cdef int read_huge(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil
cdef bint holds_own_memory(uint8_t cats) noexcept nogil
cdef int take_written(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil
cdef int read_written(page_tables *pt, size_t first, size_t n, uint8_t *out) noexcept nogil
cdef int pagemap_entry(page_tables *pt, const void *addr, uint64_t *entry) noexcept nogil
# _maps.pxi
cdef int find_mapping(page_tables *pt, uint64_t addr, mapping *m) noexcept nogil
cdef long count_mappings(page_tables *pt, uint64_t lo, uint64_t hi) noexcept nogil
cdef bint joins(const mapping *left, const mapping *right) noexcept nogil
# _track.pxi
cdef int start_tracking(page_tables *pt) noexcept nogil
cdef void stop_tracking(page_tables *pt) noexcept nogil
cdef bint tracking(page_tables *pt) noexcept nogil
cdef void track_range(page_tables *pt, char *addr, size_t length) noexcept nogil
cdef void untrack_range(page_tables *pt, char *addr, size_t length) noexcept nogil
cdef bint track_huge_pages(page_tables *pt) noexcept nogil
cdef void spare_huge_pages_again(page_tables *pt, size_t first, size_t n) noexcept nogil
