# The hash part (_hash.pxi): the zero tests and checksums of the scan's
# pages, made ahead of its page-by-page decisions on several threads without
# the GIL (_hash.h): a stream that the scan feeds a chunk at a time, a few
# chunks ahead of the one it looks at. The decisions, the trees and the
# remaps stay in the scan's one thread, in page order: only reads, and the
# copies into new frames (_writes.h), are shared out.

cdef extern from "_hash.h" nogil:
    enum:
        PD_MAX_THREADS
    double pd_thread_cpu()
    ctypedef struct pd_stream:     # a scan's hash stream and its helpers
        pass
    # The comparison of a held run (_remap.pxi remap_held_run), on threads: a C
    # helper, which the remap part calls as it calls the system.
    ctypedef struct pd_match_job:
        const char *pages
        const char *frames         # consecutive frames, or NULL: zero pages
        size_t page_size
        size_t n
        uint8_t *match
    double pd_match_pages(const pd_match_job *job, unsigned threads)

cdef enum:
    HASH_NONE = 2                  # page_hashes.zero[i]: page i was not hashed ahead

cdef struct page_hashes:           # scan_state.hashes: the answers for the chunk looked at
    pd_stream *stream              # the threads hashing ahead; NULL: the scan hashes itself
    size_t first                   # the chunk's first page
    size_t n                       # its pages; 0: no answers
    uint32_t *sums                 # per chunk page: low 32 bits of the checksum (0 if zero)
    uint8_t *zero                  # per chunk page: 1 zero, 0 not, HASH_NONE not hashed
    size_t capacity                # the pages of a chunk

cdef struct hashed_span:           # where a chunk's pages are in the stream
    size_t start, end

cdef bint hashes_open(page_hashes *h, const reservation *r, size_t chunk_pages, size_t chunks_ahead,
                      uint32_t threads, pd_writes *writes) noexcept nogil
cdef double hashes_close(page_hashes *h) noexcept nogil
cdef void hash_ahead(page_hashes *h, size_t first, size_t n, const uint8_t *wanted,
                     hashed_span *span) noexcept nogil
cdef void hashes_take(page_hashes *h, size_t first, size_t n, const hashed_span *span) noexcept nogil
cdef bint hashed_ahead(const page_hashes *h, size_t p, bint *zero,
                       uint32_t *checksum) noexcept nogil
cdef void hashes_forget(page_hashes *h, const hashed_span *span) noexcept nogil
