# The hash part (_hash.pxi): the zero tests and checksums of a chunk of
# pages, made ahead of the scan's page-by-page decisions on several threads
# without the GIL (_hash.h), each over a disjoint slice of the pages. The
# decisions, the trees and the remaps stay in the scan's one thread, in page
# order: only reads are shared out.

cdef extern from "_hash.h" nogil:
    enum:
        PD_MAX_THREADS
    double pd_thread_cpu()
    ctypedef struct pd_shared:     # a job under way on threads
        pass
    # The comparison of a held run (_remap.pxi merge_run), on threads: a C
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

cdef struct page_hashes:           # scan_state.ahead: the answers for one chunk
    size_t first                   # the chunk's first page
    size_t n                       # its pages; 0: no answers
    size_t count                   # of those, the pages hashed
    pd_shared *job                 # the threads hashing them, until hash_ahead_finish()
    uint32_t *pages                # the pages to hash, chunk-relative, in order
    uint32_t *sums                 # per chunk page: low 32 bits of xxh3 (0 if zero)
    uint8_t *zero                  # per chunk page: 1 zero, 0 not, HASH_NONE not hashed;
                                   # then `capacity` more: the threads' packed answers
    size_t capacity                # pages the arrays hold

cdef int hashes_open(page_hashes *h, size_t capacity) noexcept nogil
cdef void hashes_close(page_hashes *h) noexcept nogil
cdef void hash_ahead_start(page_hashes *h, const reservation *r, pd_xxh3_fn xxh3, size_t first,
                           size_t n, const uint8_t *wanted, uint32_t threads) noexcept nogil
cdef double hash_ahead_finish(page_hashes *h) noexcept nogil
cdef bint hashed_ahead(const page_hashes *h, size_t p, bint *zero,
                       uint32_t *checksum) noexcept nogil
cdef void hashes_forget(page_hashes *h) noexcept nogil
