# Block: the memory of one array, exported through the buffer protocol so
# that numpy arrays can be made on it and keep it (and so the arena) alive.

cimport cython


cdef class PageOwner:
    """The page allocator, as Block and numpy's handler (_handler.pyx) call
    it: a typed interface declared in _fast.pxd instead of methods looked up
    by name. pydedup/pages.py's Pages implements it."""

    cpdef object take_pages(self, size_t npages):
        """The first of npages fresh, zero-filled pages, or None."""
        raise NotImplementedError

    cpdef bint take_at(self, size_t first, size_t npages):
        """Take pages [first, first + npages) if all are free."""
        raise NotImplementedError

    cpdef give_back(self, size_t first, size_t npages):
        """Pages [first, first + npages) of a dead array come back."""
        raise NotImplementedError


@cython.no_gc_clear
cdef class Block:
    """Whole arena pages holding one array. When the last array made on it
    goes, its pages go back to `owner` (the arena's page allocator, a
    PageOwner; None: nobody takes them back)."""
    cdef char *data
    cdef Py_ssize_t length[1]
    cdef Py_ssize_t one[1]
    cdef readonly size_t first_page, npages
    cdef readonly PageOwner owner

    def __cinit__(self, Core core, PageOwner owner, size_t first_page, size_t npages, Py_ssize_t nbytes):
        core.check_range(first_page, npages)
        if nbytes < 0 or <size_t>nbytes > npages * core.res.page_size:
            raise ValueError(f"{nbytes} bytes do not fit in {npages} pages")
        self.data = page_address(&core.res, first_page)
        self.length[0] = nbytes
        self.one[0] = 1
        self.first_page = first_page
        self.npages = npages
        self.owner = owner

    @property
    def address(self):
        return <size_t>self.data

    def __getbuffer__(self, Py_buffer *buf, int flags):
        buf.buf = self.data
        buf.obj = self
        buf.len = self.length[0]
        buf.readonly = 0
        buf.itemsize = 1
        buf.format = NULL
        if flags & PyBUF_FORMAT:
            buf.format = b"B"
        buf.ndim = 1
        buf.shape = self.length
        buf.strides = self.one
        buf.suboffsets = NULL
        buf.internal = NULL

    def __releasebuffer__(self, Py_buffer *buf):
        pass

    def __dealloc__(self):
        if self.owner is not None:
            self.owner.give_back(self.first_page, self.npages)
