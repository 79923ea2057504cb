# The base part: the arena's reservation, which Core keeps, and what every
# part above needs of it: page addresses, anonymous maps, populate-write, the
# clock; and the cheap checks at the entry of each part's functions.

cdef extern from *:
    """
    #include <stdio.h>
    #include <stdlib.h>
    #ifdef PYDEDUP_DEBUG_CHECKS
    #define PD_DEBUG_CHECKS 1
    #define PD_ASSERT(cond, what) do { if (!(cond)) { \\
        fprintf(stderr, "pydedup: broken entry condition: %s\\n", what); abort(); } } while (0)
    #else
    #define PD_DEBUG_CHECKS 0
    #define PD_ASSERT(cond, what) ((void)sizeof(cond), (void)(what))
    #endif
    """
    const bint PD_DEBUG_CHECKS         # a PYDEDUP_DEBUG=1 build
    # The debug build aborts with `what` when `cond` is false; the release
    # build compiles it to nothing. For cheap conditions without effects,
    # checked at the entry of a part's function (mimalloc's mi_assert).
    void PD_ASSERT(bint cond, const char *what) noexcept nogil

cdef struct reservation:           # the arena's pages (Core.res)
    char *base                     # first byte of the reservation
    size_t page_size
    size_t npages                  # arena pages reserved
    size_t high_water              # pages [high_water, npages) were never used
    rmap_item *rmap                # npages records, mapped lazily
    bint remapped                  # mappings were laid inside the reservation since
                                   # it was last one mapping (forget_cuts)

cdef char *page_address(const reservation *r, size_t p) noexcept nogil
cdef void *map_lazily(size_t length) noexcept nogil
cdef void *map_lazily_aligned(size_t length, size_t align) noexcept nogil
cdef int map_anonymous(char *addr, size_t length) noexcept nogil
cdef int populate_write(const reservation *r, size_t first, size_t n) noexcept nogil
cdef double now() noexcept nogil
