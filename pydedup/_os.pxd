# Declarations of the system calls pydedup makes. Nothing here has logic;
# the few helpers that need C live in _os.h.
from libc.stdint cimport uint64_t

cdef extern from "_os.h" nogil:
    int errno
    int PROT_NONE, PROT_READ, PROT_WRITE
    int MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED, MAP_NORESERVE
    void *MAP_FAILED
    int MADV_DONTNEED, MADV_NOHUGEPAGE, MADV_POPULATE_WRITE
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    int O_RDONLY, O_CLOEXEC

    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    int mprotect(void *addr, size_t length, int prot)
    int fallocate(int fd, int mode, long offset, long length)
    int ftruncate(int fd, long length)
    long pread(int fd, void *buf, size_t count, long offset)
    long pwrite(int fd, const void *buf, size_t count, long offset)
    long sysconf(int name)
    int _SC_PAGESIZE
    int getpid()
    int open(const char *path, int flags)
    int close(int fd)
    int ioctl(int fd, unsigned long request, ...)

    uint64_t PD_PAGE_IS_FILE, PD_PAGE_IS_PRESENT, PD_PAGE_IS_SWAPPED, PD_PAGE_IS_PFNZERO
    struct pd_page_region:
        uint64_t start, end, categories
    struct pd_pm_scan_arg:
        uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages
        uint64_t category_inverted, category_mask, category_anyof_mask, return_mask
    unsigned long PD_PAGEMAP_SCAN

    int pd_memfd_create(const char *name)
    int pd_page_is_zero(const void *page, size_t size)
    void pd_touch_write(void *page)
    ctypedef uint64_t (*pd_xxh3_fn)(const void *data, size_t length)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC
    int clock_gettime(int clock, timespec *now)
