# cython: language_level=3, wraparound=False, cdivision=True
"""pydedup as numpy's data memory handler (NEP 49).

One handler per arena: a PyCapsule named "mem_handler" holding a
PyDataMem_Handler named "pydedup", whose ctx is an `arena_ctx` below. numpy
keeps a reference to the handler in every array it allocates with it, so the
capsule, and through it the arena's Pages, live until the last such array is
freed.

Words:
    small allocation  fewer than `threshold` bytes: numpy's default handler
                      (its own functions, so its small-block cache and its
                      huge-page advice stay as they are)
    arena allocation  whole arena pages, `run_pages[first]` of them
    cache             runs of pages freed recently and not given back yet,
                      reused for a malloc of exactly as many pages: fresh
                      arena pages fault in on first touch, glibc's heap does
                      not, and numpy's temporaries come in the same sizes again
                      and again

Every function may be called without the GIL. Small allocations never take
it; `free` and `realloc` tell the two kinds apart by address (the arena is
one range [lo, hi)). The arena path takes the GIL (PyGILState_Ensure, cheap
when numpy already holds it, as it always does today): the page allocator
(pydedup/pages.py, extents.py) is Python, reached through the typed
PageOwner interface the core declares (_fast.pxd), and the GIL is also what
serialises the cache."""
from cpython.exc cimport PyErr_Fetch, PyErr_Restore
from cpython.pycapsule cimport PyCapsule_New, PyCapsule_GetPointer
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memmove, strncpy
from pydedup._fast cimport PageOwner

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE

cdef extern from "numpy/arrayobject.h":
    ctypedef void *(*pd_malloc_fn)(void *ctx, size_t size) noexcept nogil
    ctypedef void *(*pd_calloc_fn)(void *ctx, size_t nelem, size_t elsize) noexcept nogil
    ctypedef void *(*pd_realloc_fn)(void *ctx, void *ptr, size_t new_size) noexcept nogil
    ctypedef void (*pd_free_fn)(void *ctx, void *ptr, size_t size) noexcept nogil
    ctypedef struct PyDataMemAllocator:
        void *ctx
        pd_malloc_fn malloc
        pd_calloc_fn calloc
        pd_realloc_fn realloc
        pd_free_fn free
    ctypedef struct PyDataMem_Handler:
        char name[127]
        uint8_t version
        PyDataMemAllocator allocator
    PyObject *PyDataMem_SetHandler(PyObject *handler)   # new reference: the previous one
    PyObject *PyDataMem_GetHandler()                    # new reference: the current one
    PyObject *PyDataMem_DefaultHandler
    int _import_array() except -1

_import_array()

cdef enum:
    CACHE_SLOTS = 32
    HANDLER_VERSION = 1        # NEP 49's PyDataMem_Handler version

cdef size_t NO_RUN = <size_t>-1
cdef size_t CACHE_BASE = 16 << 20     # bytes the cache may hold with no array live


cdef struct cached_run:
    size_t first              # first arena page
    size_t npages


cdef struct arena_ctx:
    char *lo                  # the arena's reservation: [lo, hi)
    char *hi
    size_t page_size
    size_t threshold          # allocations of at least this many bytes go to the arena
    size_t cache_limit        # most bytes the cache holds; 0: no cache
    size_t cache_base         # most bytes it holds with no array live (cache_room())
    bint cache_auto           # alloc_cache 'auto': cache_room() follows the peak, not cache_limit
    size_t cache_bytes        # = sum of cache[i].npages * page_size
    int ncached
    cached_run cache[CACHE_SLOTS]   # oldest first
    uint32_t *run_pages       # [first page] = pages of the arena allocation starting there
    size_t npages             # pages in the reservation
    PyObject *pages           # the arena's Pages, a PageOwner (strong reference, dropped
                              # with the capsule)
    bint closed               # the arena is closed: new allocations go to the default handler
    PyDataMem_Handler *fallback     # numpy's default handler
    # counters
    size_t allocations        # arena allocations made (cache hits included)
    size_t cache_hits
    size_t fell_back          # wanted the arena, got the default handler (full, closed, busy)
    size_t fell_back_closed   # of those, because the arena was closed
    size_t fell_back_full     # of those, because take_pages said no (full, or busy: pages.py counts)
    size_t pages_live         # arena pages held by live allocations (cache excluded)
    size_t pages_peak         # most pages_live since the last trim or flush


# -- the page allocator, a PageOwner (GIL held) -------------------------------
#
# An exception in it (arena full) means "no"; an exception pending in the
# caller (numpy frees arrays while one unwinds) is kept as it was.

cdef size_t owner_take_pages(arena_ctx *c, size_t npages) noexcept:
    """The first of npages fresh pages, or NO_RUN."""
    cdef PyObject *etype
    cdef PyObject *evalue
    cdef PyObject *etb
    cdef size_t result = NO_RUN
    PyErr_Fetch(&etype, &evalue, &etb)
    try:
        first_page = (<PageOwner>c.pages).take_pages(npages)
        if first_page is not None:
            result = first_page
    except BaseException:
        result = NO_RUN
    PyErr_Restore(etype, evalue, etb)
    return result


cdef bint owner_take_at(arena_ctx *c, size_t first, size_t npages) noexcept:
    """Whether pages [first, first + npages) were free, and are taken now."""
    cdef PyObject *etype
    cdef PyObject *evalue
    cdef PyObject *etb
    cdef bint taken = False
    PyErr_Fetch(&etype, &evalue, &etb)
    try:
        taken = (<PageOwner>c.pages).take_at(first, npages)
    except BaseException:
        taken = False
    PyErr_Restore(etype, evalue, etb)
    return taken


cdef void owner_give_back(arena_ctx *c, size_t first, size_t npages) noexcept:
    cdef PyObject *etype
    cdef PyObject *evalue
    cdef PyObject *etb
    PyErr_Fetch(&etype, &evalue, &etb)
    try:
        (<PageOwner>c.pages).give_back(first, npages)
    except BaseException:
        pass
    PyErr_Restore(etype, evalue, etb)


cdef inline size_t pages_for(arena_ctx *c, size_t size) noexcept nogil:
    return (size + c.page_size - 1) // c.page_size


cdef inline bint in_arena(arena_ctx *c, void *ptr) noexcept nogil:
    return c.lo <= <char *>ptr < c.hi


cdef inline size_t page_of(arena_ctx *c, void *ptr) noexcept nogil:
    return <size_t>(<char *>ptr - c.lo) // c.page_size


# -- the cache (GIL held) -----------------------------------------------------

cdef size_t cache_take(arena_ctx *c, size_t npages) noexcept:
    """The newest cached run of exactly npages, taken out, or NO_RUN."""
    cdef int i
    cdef size_t first
    for i in range(c.ncached - 1, -1, -1):
        if c.cache[i].npages == npages:
            first = c.cache[i].first
            memmove(&c.cache[i], &c.cache[i + 1], (c.ncached - i - 1) * sizeof(cached_run))
            c.ncached -= 1
            c.cache_bytes -= npages * c.page_size
            return first
    return NO_RUN


cdef inline size_t cache_room(arena_ctx *c) noexcept nogil:
    """What the cache may hold now: alloc_cache bytes, or with alloc_cache
    'auto', cache_base plus a tenth of the most bytes live arrays held since
    the last trim, so that code in a block peaks within 10% (+16 MiB) of what
    it would with plain numpy (which needs that peak too). The end of a block
    trims (cache_trim): what it holds after the block is within 16 MiB of
    plain numpy's."""
    if not c.cache_auto:
        return c.cache_limit
    return c.cache_base + c.pages_peak * c.page_size // 10


cdef bint cache_put(arena_ctx *c, size_t first, size_t npages) noexcept:
    """Keep a freed run for reuse, evicting the oldest to make room; False
    if it is not kept (no cache, closed, or bigger than the whole cache)."""
    cdef size_t nbytes = npages * c.page_size
    cdef size_t room = cache_room(c)
    cdef cached_run oldest
    if c.closed or nbytes > room:
        nbytes = 0                      # not kept; what is cached must still fit the room
    while c.ncached and ((nbytes and c.ncached == CACHE_SLOTS) or c.cache_bytes + nbytes > room):
        # Out of the table before Python runs: give_back may collect garbage,
        # and a collected array comes back here.
        oldest = c.cache[0]
        memmove(&c.cache[0], &c.cache[1], (c.ncached - 1) * sizeof(cached_run))
        c.ncached -= 1
        c.cache_bytes -= oldest.npages * c.page_size
        owner_give_back(c, oldest.first, oldest.npages)
    if nbytes == 0:
        return False
    c.cache[c.ncached] = cached_run(first, npages)
    c.ncached += 1
    c.cache_bytes += nbytes
    return True


cdef void cache_trim(arena_ctx *c) noexcept:
    """Forget the peak, and give back the oldest runs until the cache fits
    the room that leaves."""
    cdef cached_run oldest
    c.pages_peak = c.pages_live
    while c.ncached and c.cache_bytes > cache_room(c):
        oldest = c.cache[0]
        memmove(&c.cache[0], &c.cache[1], (c.ncached - 1) * sizeof(cached_run))
        c.ncached -= 1
        c.cache_bytes -= oldest.npages * c.page_size
        owner_give_back(c, oldest.first, oldest.npages)


cdef void cache_flush(arena_ctx *c) noexcept:
    cdef cached_run run
    c.pages_peak = c.pages_live
    while c.ncached:
        c.ncached -= 1
        run = c.cache[c.ncached]
        c.cache_bytes -= run.npages * c.page_size
        owner_give_back(c, run.first, run.npages)


# -- arena allocations (GIL held) --------------------------------------------

cdef void *arena_alloc(arena_ctx *c, size_t size, bint zeroed) noexcept:
    """npages arena pages for `size` bytes, or NULL (the caller then uses the
    default handler). `zeroed`: fresh pages only, which are zero-filled and
    hold no memory until written (calloc must not get a cached run)."""
    cdef size_t npages = pages_for(c, size)
    cdef size_t first = NO_RUN
    if c.closed or npages > 0xFFFFFFFF:
        c.fell_back += 1
        c.fell_back_closed += c.closed
        c.fell_back_full += not c.closed
        return NULL
    if not zeroed:
        first = cache_take(c, npages)
        c.cache_hits += first != NO_RUN
    if first == NO_RUN:
        first = owner_take_pages(c, npages)
    if first == NO_RUN:
        c.fell_back += 1
        c.fell_back_full += 1
        return NULL
    c.run_pages[first] = <uint32_t>npages
    c.allocations += 1
    c.pages_live += npages
    if c.pages_live > c.pages_peak:
        c.pages_peak = c.pages_live
    return c.lo + first * c.page_size


cdef void arena_free(arena_ctx *c, void *ptr) noexcept:
    cdef size_t first = page_of(c, ptr)
    cdef size_t npages = c.run_pages[first]
    c.run_pages[first] = 0
    c.pages_live -= npages
    if not cache_put(c, first, npages):
        owner_give_back(c, first, npages)


cdef void *arena_realloc(arena_ctx *c, void *ptr, size_t new_size) noexcept:
    """Resize an arena allocation: in place where it shrinks or the pages
    after it are free, else a copy (reading merged pages reads their frames)."""
    cdef size_t first = page_of(c, ptr)
    cdef size_t old = c.run_pages[first]
    cdef size_t new = pages_for(c, new_size)
    cdef void *moved = NULL
    if new_size >= c.threshold and not c.closed:
        if new == old:
            return ptr
        if new < old:
            c.run_pages[first] = <uint32_t>new
            c.pages_live -= old - new
            owner_give_back(c, first + new, old - new)
            return ptr
        if new <= 0xFFFFFFFF and owner_take_at(c, first + old, new - old):
            c.run_pages[first] = <uint32_t>new
            c.pages_live += new - old
            return ptr
        moved = arena_alloc(c, new_size, False)
    if moved == NULL:
        moved = c.fallback.allocator.malloc(c.fallback.allocator.ctx, new_size if new_size else 1)
        if moved == NULL:
            return NULL                 # as realloc: the old block stays
    memcpy(moved, ptr, min(new_size, old * c.page_size))
    arena_free(c, ptr)
    return moved


# -- the handler's functions (any thread, GIL or not) -------------------------

cdef void *pd_malloc(void *ctx, size_t size) noexcept nogil:
    cdef arena_ctx *c = <arena_ctx *>ctx
    cdef void *ptr = NULL
    if size >= c.threshold and size > 0:
        with gil:
            ptr = arena_alloc(c, size, False)
    if ptr == NULL:
        ptr = c.fallback.allocator.malloc(c.fallback.allocator.ctx, size)
    return ptr


cdef void *pd_calloc(void *ctx, size_t nelem, size_t elsize) noexcept nogil:
    cdef arena_ctx *c = <arena_ctx *>ctx
    cdef void *ptr = NULL
    cdef size_t size = nelem * elsize
    if elsize and size // elsize != nelem:
        return NULL                     # overflow
    if size >= c.threshold and size > 0:
        with gil:
            ptr = arena_alloc(c, size, True)
    if ptr == NULL:
        ptr = c.fallback.allocator.calloc(c.fallback.allocator.ctx, nelem, elsize)
    return ptr


cdef void *pd_realloc(void *ctx, void *ptr, size_t new_size) noexcept nogil:
    cdef arena_ctx *c = <arena_ctx *>ctx
    cdef void *grown
    cdef void *moved = NULL
    if ptr == NULL:
        return pd_malloc(ctx, new_size)
    if in_arena(c, ptr):
        with gil:
            moved = arena_realloc(c, ptr, new_size)
        return moved
    grown = c.fallback.allocator.realloc(c.fallback.allocator.ctx, ptr, new_size)
    if grown == NULL or new_size < c.threshold:
        return grown
    # Grown past the threshold (ndarray.resize): move it into the arena.
    with gil:
        moved = arena_alloc(c, new_size, False)
    if moved == NULL:
        return grown
    memcpy(moved, grown, new_size)
    c.fallback.allocator.free(c.fallback.allocator.ctx, grown, new_size)
    return moved


cdef void pd_free(void *ctx, void *ptr, size_t size) noexcept nogil:
    cdef arena_ctx *c = <arena_ctx *>ctx
    if in_arena(c, ptr):
        with gil:
            arena_free(c, ptr)
    else:
        c.fallback.allocator.free(c.fallback.allocator.ctx, ptr, size)


cdef void destroy_handler(object capsule) noexcept:
    """The last array made with this handler is gone: hand the cache back and
    let go of the arena's Pages."""
    cdef PyDataMem_Handler *handler = <PyDataMem_Handler *>PyCapsule_GetPointer(capsule, "mem_handler")
    cdef arena_ctx *c = <arena_ctx *>handler.allocator.ctx
    cache_flush(c)
    munmap(c.run_pages, c.npages * sizeof(uint32_t))
    Py_XDECREF(c.pages)
    free(c)
    free(handler)


# -- the Python side ----------------------------------------------------------

cdef class Allocator:
    """The numpy handler of one arena. `capsule` is what numpy is given;
    this object tunes and reads its ctx, which lives as long as the capsule
    (so as long as this object, or any array made with it)."""
    cdef readonly object capsule
    cdef arena_ctx *c

    def __cinit__(self, PageOwner pages not None, size_t base, size_t npages, size_t page_size,
                  size_t threshold, size_t cache_limit):
        cdef PyDataMem_Handler *handler = <PyDataMem_Handler *>calloc(1, sizeof(PyDataMem_Handler))
        cdef arena_ctx *c = <arena_ctx *>calloc(1, sizeof(arena_ctx))
        if handler == NULL or c == NULL:
            free(handler)
            free(c)
            raise MemoryError()
        c.run_pages = <uint32_t *>mmap(NULL, npages * sizeof(uint32_t), PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if <void *>c.run_pages == MAP_FAILED:
            free(handler)
            free(c)
            raise MemoryError(f"cannot reserve the allocator's table for {npages} pages")
        c.lo = <char *>base
        c.hi = c.lo + npages * page_size
        c.npages = npages
        c.page_size = page_size
        c.threshold = threshold
        c.cache_limit = cache_limit
        c.cache_base = CACHE_BASE
        c.fallback = <PyDataMem_Handler *>PyCapsule_GetPointer(
            <object>PyDataMem_DefaultHandler, "mem_handler")
        Py_INCREF(pages)
        c.pages = <PyObject *>pages
        strncpy(handler.name, b"pydedup", sizeof(handler.name) - 1)
        handler.version = HANDLER_VERSION
        handler.allocator = PyDataMemAllocator(<void *>c, pd_malloc, pd_calloc, pd_realloc, pd_free)
        self.c = c
        self.capsule = PyCapsule_New(handler, "mem_handler", <void (*)(object) noexcept>destroy_handler)

    @property
    def threshold(self):
        return self.c.threshold

    @threshold.setter
    def threshold(self, size_t nbytes):
        self.c.threshold = nbytes

    @property
    def cache_limit(self):
        return self.c.cache_limit

    @cache_limit.setter
    def cache_limit(self, size_t nbytes):
        self.c.cache_limit = nbytes
        if not self.c.cache_auto and self.c.cache_bytes > nbytes:
            cache_flush(self.c)

    @property
    def cache_base(self):
        return self.c.cache_base

    @cache_base.setter
    def cache_base(self, size_t nbytes):
        self.c.cache_base = nbytes

    @property
    def cache_auto(self):
        return self.c.cache_auto

    @cache_auto.setter
    def cache_auto(self, bint auto):
        self.c.cache_auto = auto
        cache_trim(self.c)

    def trim(self):
        """The end of a block: with cache_auto, keep at most cache_base plus a
        tenth of what live arrays hold now."""
        if self.c.cache_auto:
            cache_trim(self.c)

    def flush(self):
        """Give every cached run back to the arena."""
        cache_flush(self.c)

    def close(self):
        """The arena closed: new allocations go to numpy's default handler;
        live ones are freed into the arena as before."""
        self.c.closed = True
        cache_flush(self.c)

    def counters(self):
        c = self.c
        return dict(allocations=c.allocations, cache_hits=c.cache_hits,
                    fell_back=c.fell_back, fell_back_closed=c.fell_back_closed,
                    fell_back_full=c.fell_back_full, bytes_in_use=c.pages_live * c.page_size,
                    cache_bytes=c.cache_bytes, cached_runs=c.ncached)


def set_handler(handler):
    """numpy's PyDataMem_SetHandler for the current context: returns the
    handler it replaces."""
    if handler is not None and not isinstance(handler, type(<object>PyDataMem_DefaultHandler)):
        raise TypeError(f"a numpy memory handler is a PyCapsule, not {type(handler).__name__}")
    cdef PyObject *previous = PyDataMem_SetHandler(NULL if handler is None else <PyObject *>handler)
    if previous == NULL:
        raise RuntimeError("numpy refused the memory handler")
    result = <object>previous
    Py_XDECREF(previous)
    return result


def current_handler():
    """The handler numpy uses in the current context."""
    cdef PyObject *handler = PyDataMem_GetHandler()
    if handler == NULL:
        raise RuntimeError("numpy has no current memory handler")
    result = <object>handler
    Py_XDECREF(handler)
    return result


def default_handler():
    return <object>PyDataMem_DefaultHandler
