# The scan (_scan.pxi), after KSM's ksm_scan: the pass over every page in
# use, its unstable tree and cursor, and the page states it brings up to date.

cdef enum:
    STATE_CHUNK = 16384            # pages whose categories are read at once
    BUCKETS_AHEAD = 8              # the stable-tree bucket of the page this far ahead is
                                   # loaded while the scan looks at this one
    CHUNKS_AHEAD = 4               # chunks read, and given to the hash stream, before
                                   # the scan looks at the first of them

cdef struct scan_state:            # Core.scan: the scan in progress
    uint32_t *unstable             # unstable-tree bucket heads; NULL between scans
    uint32_t unstable_mask
    size_t cursor                  # the next page the background scan looks at
    uint32_t last_new_frame        # the frame a scan wrote last
    size_t run_last                # the last page of the run of one content going on
    size_t run_pages               # its pages: how long its tile may grow (_frames.pxi tile_next)
    bint by_checksum               # a checksum match stands for the bytes (compared_again_before_remap)
    pass_stats stats               # what the background scan in progress did
    page_hashes hashes             # zero tests and checksums, made ahead on threads

cdef struct chunk_tables:          # what the scan read of a chunk's page tables
    size_t first, n                # its pages
    uint8_t *cats                  # PAGE_IS_* of each, PAGE_IS_WRITTEN taken
    const uint8_t *taken_before    # PAGE_IS_WRITTEN of each, taken before the helpers ran, or NULL
    uint16_t *nodes                # the NUMA node of each one's memory, or NULL
    hashed_span hashed             # its pages in the hash stream

cdef bint mergeable(const rmap_item *it) noexcept nogil
cdef int refresh_states(Core c, size_t first, size_t n) noexcept nogil
cdef bint scan_in_progress(Core c) noexcept nogil
cdef void end_scan(Core c, pass_stats *st) noexcept nogil
cdef void unstable_tree_erase(Core c, size_t p) noexcept nogil
cdef int merge_pass(Core c, scan_knobs *k, pass_stats *st) noexcept nogil
cdef int scan_batch(Core c, size_t npages, scan_knobs *k, bint *scan_done) noexcept nogil
cdef int unmerge_range(Core c, size_t first, size_t n) noexcept nogil
cdef void scan_close(Core c) noexcept nogil
