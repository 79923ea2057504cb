# The hash part (_hash.pxd): zero tests and checksums made ahead, on threads.

cdef extern from "_hash.h" nogil:
    pd_stream *pd_stream_open(const char *base, size_t page_size, size_t capacity, unsigned threads,
                              pd_writes *writes)
    int pd_stream_publish(pd_stream *s, size_t first, size_t n, const uint8_t *wanted,
                          size_t *start, size_t *end)
    void pd_stream_wait(pd_stream *s, size_t start, size_t end)
    void pd_stream_answers(const pd_stream *s, size_t start, size_t end, size_t first,
                           uint32_t *sums, uint8_t *zero)
    void pd_stream_release(pd_stream *s, size_t end)
    double pd_stream_close(pd_stream *s)


cdef bint hashes_open(page_hashes *h, const reservation *r, size_t chunk_pages, size_t chunks_ahead,
                      uint32_t threads, pd_writes *writes) noexcept nogil:
    """With threads, a stream for the pages of `chunks_ahead` chunks of
    `chunk_pages`, hashed by threads - 1 helpers, which also do the frame
    writes posted to `writes` (if not NULL), and room for one chunk's
    answers; whether there are helpers. Without memory for them
    (RLIMIT_DATA, say) the scan hashes each page itself, as on one thread:
    the threads are a speed-up, never a reason to fail. hashes_close()
    undoes it."""
    memset(h, 0, sizeof(page_hashes))
    if threads < 2:
        return False
    h.sums = <uint32_t *>malloc(chunk_pages * sizeof(uint32_t))
    h.zero = <uint8_t *>malloc(chunk_pages)
    h.capacity = chunk_pages
    if h.sums != NULL and h.zero != NULL:
        h.stream = pd_stream_open(page_address(r, 0), r.page_size, chunk_pages * chunks_ahead, threads,
                                  writes)
    if h.stream == NULL:
        hashes_close(h)
    return h.stream != NULL


cdef double hashes_close(page_hashes *h) noexcept nogil:
    """Ends the stream (what it was given is hashed first: its threads read
    the arena's pages); the helpers' CPU seconds."""
    cdef double cpu = pd_stream_close(h.stream) if h.stream != NULL else 0
    free(h.sums)
    free(h.zero)
    memset(h, 0, sizeof(page_hashes))
    return cpu


cdef void hash_ahead(page_hashes *h, size_t first, size_t n, const uint8_t *wanted,
                     hashed_span *span) noexcept nogil:
    """Give the helpers the pages first + i of [first, first + n) whose
    wanted[i] is set; span says where they are for hashes_take(). Without a
    stream, nothing: the scan hashes them itself."""
    cdef int err
    span.start = span.end = 0
    if h.stream == NULL:
        return
    PD_ASSERT(n <= h.capacity, "hash_ahead: a chunk at most")
    err = pd_stream_publish(h.stream, first, n, wanted, &span.start, &span.end)
    PD_ASSERT(err == 0, "hash_ahead: the stream has room for the chunks the scan reads ahead")


cdef void hashes_take(page_hashes *h, size_t first, size_t n, const hashed_span *span) noexcept nogil:
    """The answers for the chunk [first, first + n), which hash_ahead() gave
    the stream as `span`: the caller hashes what the helpers have not
    taken, and waits for the rest."""
    cdef size_t i
    if h.stream == NULL:
        return
    pd_stream_wait(h.stream, span.start, span.end)
    for i in range(n):
        h.zero[i] = HASH_NONE
    pd_stream_answers(h.stream, span.start, span.end, first, h.sums, h.zero)
    h.first, h.n = first, n


cdef bint hashed_ahead(const page_hashes *h, size_t p, bint *zero,
                       uint32_t *checksum) noexcept nogil:
    """Page p's answers, if hashes_take() made them: True, and zero and
    checksum set (the checksum 0 for a zero page)."""
    if h.n == 0 or p < h.first or p >= h.first + h.n or h.zero[p - h.first] == HASH_NONE:
        return False
    zero[0] = h.zero[p - h.first]
    checksum[0] = h.sums[p - h.first]
    return True


cdef void hashes_forget(page_hashes *h, const hashed_span *span) noexcept nogil:
    """No answers any more: the chunk is done, and its place in the stream
    is free."""
    h.n = 0
    if h.stream != NULL:
        pd_stream_release(h.stream, span.end)
