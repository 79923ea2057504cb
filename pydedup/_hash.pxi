# The hash part (_hash.pxd): zero tests and checksums made ahead, on threads.

cdef extern from "_hash.h" nogil:
    ctypedef struct pd_hash_job:
        const char *base
        size_t page_size
        const uint32_t *pages
        size_t n
        uint32_t *sums
        uint8_t *zero
        pd_xxh3_fn xxh3
    pd_shared *pd_hash_start(const pd_hash_job *job, unsigned threads)
    double pd_hash_finish(pd_shared *s)


cdef int hashes_open(page_hashes *h, size_t capacity) noexcept nogil:
    """Room for the answers of `capacity` pages; 0 or ENOMEM. hashes_close()
    undoes it, also after a failure."""
    memset(h, 0, sizeof(page_hashes))
    h.pages = <uint32_t *>malloc(capacity * sizeof(uint32_t))
    h.sums = <uint32_t *>malloc(capacity * sizeof(uint32_t))
    h.zero = <uint8_t *>malloc(2 * capacity)
    if h.pages == NULL or h.sums == NULL or h.zero == NULL:
        return ENOMEM
    h.capacity = capacity
    return 0


cdef void hashes_close(page_hashes *h) noexcept nogil:
    hash_ahead_finish(h)                # threads still at it read into the arrays
    free(h.pages)
    free(h.sums)
    free(h.zero)
    memset(h, 0, sizeof(page_hashes))


cdef void hash_ahead_start(page_hashes *h, const reservation *r, pd_xxh3_fn xxh3, size_t first,
                           size_t n, const uint8_t *wanted, uint32_t threads) noexcept nogil:
    """Start zero-testing and checksumming the pages first + i of
    [first, first + n) whose wanted[i] is set, on `threads` - 1 helpers,
    while the caller goes on with other work (the scan of the chunk before);
    hash_ahead_finish() has the caller join in, and makes the answers."""
    cdef pd_hash_job job
    cdef size_t i, count = 0
    PD_ASSERT(n <= h.capacity and first + n <= r.npages and h.job == NULL,
              "hash_ahead_start: a chunk of the reservation, no job under way")
    for i in range(n):
        h.zero[i] = HASH_NONE
        if wanted[i]:
            h.pages[count] = <uint32_t>i
            count += 1
    job.base = page_address(r, first)
    job.page_size = r.page_size
    job.pages = h.pages
    job.n = count
    job.sums = h.sums           # packed: answer k for pages[k], spread by the finish
    job.zero = h.zero + h.capacity    # packed too, in the second half
    job.xxh3 = xxh3
    h.first, h.n, h.count = first, n, count
    h.job = pd_hash_start(&job, threads)
    if h.job == NULL:           # no memory for a job: the caller hashed them all
        spread_answers(h)


cdef double hash_ahead_finish(page_hashes *h) noexcept nogil:
    """The caller hashes what the helpers have not taken, waits for them,
    and the answers of the chunk hash_ahead_start() began are there; the
    CPU seconds of the threads other than the caller's. Nothing to do if no
    job is under way."""
    cdef double cpu
    if h.job == NULL:
        return 0
    cpu = pd_hash_finish(h.job)
    h.job = NULL
    spread_answers(h)
    return cpu


cdef void spread_answers(page_hashes *h) noexcept nogil:
    """The threads' packed answers (answer k for page h.pages[k]) out to
    their pages, from the last: page h.pages[k] is never before k."""
    cdef size_t i = h.count
    cdef const uint8_t *packed_zero = h.zero + h.capacity
    while i > 0:
        i -= 1
        h.sums[h.pages[i]] = h.sums[i]
        h.zero[h.pages[i]] = packed_zero[i]


cdef bint hashed_ahead(const page_hashes *h, size_t p, bint *zero,
                       uint32_t *checksum) noexcept nogil:
    """Page p's answers, if hash_ahead_start() and _finish() made them:
    True, and zero and checksum set (the checksum 0 for a zero page)."""
    if h.n == 0 or h.job != NULL or p < h.first or p >= h.first + h.n or h.zero[p - h.first] == HASH_NONE:
        return False
    zero[0] = h.zero[p - h.first]
    checksum[0] = h.sums[p - h.first]
    return True


cdef void hashes_forget(page_hashes *h) noexcept nogil:
    """No answers any more: the chunk is done."""
    h.n = 0
