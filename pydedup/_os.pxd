# Declarations of the system calls pydedup makes. Nothing here has logic;
# the few helpers that need C live in _os.h.
from libc.stdint cimport uint64_t, uintptr_t

cdef extern from "_os.h" nogil:
    int errno
    int PROT_NONE, PROT_READ, PROT_WRITE
    int MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED, MAP_NORESERVE
    int MREMAP_MAYMOVE, MREMAP_FIXED
    void *MAP_FAILED
    int MADV_DONTNEED, MADV_NOHUGEPAGE, MADV_HUGEPAGE, MADV_POPULATE_WRITE
    int MADV_MERGEABLE, MADV_UNMERGEABLE
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    int O_RDONLY, O_CLOEXEC
    int SEEK_DATA, SEEK_HOLE, SEEK_END

    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    void pd_prefetch(const void *p)
    int munmap(void *addr, size_t length)
    void *mremap(void *old_addr, size_t old_length, size_t new_length, int flags, void *new_addr)
    int madvise(void *addr, size_t length, int advice)
    int mprotect(void *addr, size_t length, int prot)
    int mincore(void *addr, size_t length, unsigned char *vec)
    int fallocate(int fd, int mode, long offset, long length)
    int ftruncate(int fd, long length)
    long pread(int fd, void *buf, size_t count, long offset)
    long pwrite(int fd, const void *buf, size_t count, long offset)
    long lseek(int fd, long offset, int whence)
    long sysconf(int name)
    int _SC_PAGESIZE
    int getpid()
    int sched_yield()
    int open(const char *path, int flags)
    int close(int fd)
    int ioctl(int fd, unsigned long request, ...)

    uint64_t PD_PAGE_IS_WRITTEN, PD_PAGE_IS_FILE, PD_PAGE_IS_PRESENT, PD_PAGE_IS_SWAPPED
    uint64_t PD_PAGE_IS_PFNZERO, PD_PAGE_IS_HUGE, PD_PM_SCAN_WP_MATCHING
    struct pd_page_region:
        uint64_t start, end, categories
    struct pd_pm_scan_arg:
        uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages
        uint64_t category_inverted, category_mask, category_anyof_mask, return_mask
    unsigned long PD_PAGEMAP_SCAN

    uint64_t PD_PROCMAP_QUERY_COVERING_OR_NEXT_VMA
    struct pd_procmap_query:
        uint64_t size, query_flags, query_addr
        uint64_t vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode
        unsigned int dev_major, dev_minor, vma_name_size, build_id_size
        uint64_t vma_name_addr, build_id_addr
    unsigned long PD_PROCMAP_QUERY

    int PD_MPOL_DEFAULT, PD_MPOL_PREFERRED, PD_MPOL_INTERLEAVE, PD_MAX_NODES
    long pd_move_pages(unsigned long count, void **pages, int *status)
    long pd_set_mempolicy(int mode, const unsigned long *nodemask)
    long pd_get_mempolicy(int *mode, unsigned long *nodemask)
    long pd_mbind(void *addr, unsigned long length, int mode, const unsigned long *nodemask)

    int pd_memfd_create(const char *name)
    int pd_page_is_zero(const void *page, size_t size)
    void pd_touch_write(void *page)

cdef extern from "_checksum.h" nogil:
    uint64_t pd_page_checksum(const void *page, size_t size)
    ctypedef uint64_t (*pd_checksum_fn)(const void *data, size_t size)
    ctypedef struct pd_checksum_version:
        const char *name
        pd_checksum_fn fn
    const pd_checksum_version *pd_checksum_versions()

cdef extern from "<sys/resource.h>" nogil:
    ctypedef unsigned long rlim_t
    struct rlimit:
        rlim_t rlim_cur, rlim_max
    int getrlimit(int resource, rlimit *limit)
    int RLIMIT_DATA
    rlim_t RLIM_INFINITY

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC
    int clock_gettime(int clock, timespec *now)

cdef extern from "_barrier.h" nogil:
    int pd_window_open(uintptr_t lo, uintptr_t hi)
    void pd_window_close(int window)
    int pd_barrier_install()
    int pd_barrier_installed()
    uint64_t PD_UFFD_FEATURE_WP_HUGETLBFS_SHMEM, PD_UFFD_FEATURE_WP_UNPOPULATED
    uint64_t PD_UFFD_FEATURE_WP_ASYNC
    int pd_uffd_open(int user_mode_only, uint64_t features, uint64_t *granted)
    int pd_uffd_register(int fd, void *addr, size_t length)
    int pd_uffd_unregister(int fd, void *addr, size_t length)
    int pd_uffd_write_protect(int fd, void *addr, size_t length)
    int pd_uffd_write_unprotect(int fd, void *addr, size_t length)
    int pd_uffd_wake(int fd, void *addr, size_t length)
