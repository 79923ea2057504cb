# The base part (_base.pxd): what every part does with arena pages.

cdef char *page_address(const reservation *r, size_t p) noexcept nogil:
    PD_ASSERT(p <= r.npages, "page_address: a page of the reservation, or its end")
    return r.base + p * r.page_size


cdef void *map_lazily(size_t length) noexcept nogil:
    """Zero-filled memory that costs nothing until touched."""
    return mmap(NULL, length, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)


cdef void *map_lazily_aligned(size_t length, size_t align) noexcept nogil:
    """Like map_lazily, at an address that is a multiple of `align` (a power
    of two): huge pages need the arena's 2 MiB blocks on 2 MiB boundaries."""
    cdef char *p = <char *>map_lazily(length + align)
    cdef size_t head
    if <void *>p == MAP_FAILED:
        return MAP_FAILED
    head = (align - <size_t>p % align) % align
    if head:
        munmap(p, head)
    munmap(p + head + length, align - head)
    return p + head


cdef int map_anonymous(char *addr, size_t length) noexcept nogil:
    """Fresh zero-filled anonymous memory over [addr, addr + length). Here
    MADV_DONTNEED would bring a file mapping's frame back, not zeros."""
    PD_ASSERT(addr != NULL and length > 0, "map_anonymous: a range")
    if mmap(addr, length, PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) == MAP_FAILED:
        return errno
    madvise(addr, length, MADV_NOHUGEPAGE)   # same flags as its neighbours: they merge
    return 0


cdef int populate_write(const reservation *r, size_t first, size_t n) noexcept nogil:
    """Fault pages [first, first + n) in for writing: each MERGED or ZERO
    page gets its own copy, contents unchanged."""
    cdef char *addr = page_address(r, first)
    cdef size_t i
    PD_ASSERT(first + n <= r.high_water, "populate_write: pages below high_water")
    if madvise(addr, n * r.page_size, MADV_POPULATE_WRITE) == 0:
        return 0
    if errno != EINVAL:                 # EINVAL: a kernel before 5.14
        return errno
    for i in range(n):
        pd_touch_write(addr + i * r.page_size)
    return 0


cdef double now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9
