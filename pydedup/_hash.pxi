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
        double cpu_seconds
    double pd_hash_pages(const pd_hash_job *job, unsigned threads)


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
    free(h.pages)
    free(h.sums)
    free(h.zero)
    memset(h, 0, sizeof(page_hashes))


cdef double hash_ahead(page_hashes *h, const reservation *r, pd_xxh3_fn xxh3, size_t first,
                       size_t n, const uint8_t *wanted, uint32_t threads) noexcept nogil:
    """Zero-test and checksum the pages first + i of [first, first + n) whose
    wanted[i] is set, on up to `threads` threads, each over a slice of them;
    the CPU seconds of the threads other than the caller's."""
    cdef pd_hash_job job
    cdef size_t i, count = 0
    cdef double cpu
    PD_ASSERT(n <= h.capacity and first + n <= r.npages, "hash_ahead: a chunk of the reservation")
    for i in range(n):
        h.zero[i] = HASH_NONE
        if wanted[i]:
            h.pages[count] = <uint32_t>i
            count += 1
    job.base = page_address(r, first)
    job.page_size = r.page_size
    job.pages = h.pages
    job.n = count
    job.sums = h.sums           # packed: answer k for pages[k], spread below
    job.zero = h.zero + h.capacity    # packed too, in the second half
    job.xxh3 = xxh3
    job.cpu_seconds = 0
    cpu = pd_hash_pages(&job, threads)
    i = count
    while i > 0:                # spread the packed answers out to their pages
        i -= 1
        h.sums[h.pages[i]] = h.sums[i]
        h.zero[h.pages[i]] = job.zero[i]
    h.first, h.n = first, n
    return cpu


cdef bint hashed_ahead(const page_hashes *h, size_t p, bint *zero,
                       uint32_t *checksum) noexcept nogil:
    """Page p's answers, if hash_ahead() made them: True, and zero and
    checksum set (the checksum 0 for a zero page)."""
    if h.n == 0 or p < h.first or p >= h.first + h.n or h.zero[p - h.first] == HASH_NONE:
        return False
    zero[0] = h.zero[p - h.first]
    checksum[0] = h.sums[p - h.first]
    return True


cdef void hashes_forget(page_hashes *h) noexcept nogil:
    """No answers any more: the chunk is done."""
    h.n = 0
