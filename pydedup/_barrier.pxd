# The write barrier (_barrier.pxi, _barrier.h): how a run is write-protected
# from its last comparison to its remap, so that no write falls between.

cdef enum barrier_mode:            # how a run is write-protected while it is merged
    BARRIER_MPROTECT = 1           # mprotect and a SIGSEGV handler that waits
    BARRIER_UFFD = 2               # userfaultfd write-protect: the kernel waits

cdef enum:
    SLACK_PIECES = 48              # mappings that take a whole RLIMIT_DATA slack, halving

cdef struct write_barrier:         # Core.wb
    int mode                       # barrier_mode; 0 until one is chosen
    int uffd                       # the userfaultfd of BARRIER_UFFD, or -1
    bint data_limited              # RLIMIT_DATA is finite: runs under mprotect hold room
    uint64_t restored_in_pieces    # runs RLIMIT_DATA kept read-only (restore_in_pieces)
    bint squeeze_data              # tests: runs under mprotect lose their room meanwhile

cdef struct data_slack:            # what take_data_slack took
    void *addr[SLACK_PIECES]
    size_t length[SLACK_PIECES]
    int n

cdef struct held_run:              # a run under the barrier, from protect_run to unprotect_run
    size_t first, n                # its pages
    int window                     # the mprotect barrier's window over it
    char *room                     # RLIMIT_DATA room held for its way back, or NULL
    data_slack taken               # for tests (squeeze_data): the slack another thread took

cdef void barrier_init(write_barrier *b) noexcept nogil
cdef void barrier_close(write_barrier *b) noexcept nogil
cdef int open_sync_uffd() noexcept nogil
cdef int barrier_use_uffd(write_barrier *b) noexcept nogil
cdef int barrier_use_mprotect(write_barrier *b) noexcept nogil
cdef int prepare_barrier(write_barrier *b) noexcept nogil
cdef bint barrier_may_refill(const write_barrier *b) noexcept nogil
cdef bint barrier_holds_runs_together(const write_barrier *b) noexcept nogil
cdef bint barrier_keeps_tracking(const write_barrier *b) noexcept nogil
cdef int protect_run(write_barrier *b, page_tables *pt, const reservation *r,
                     held_run *h) noexcept nogil
cdef void unprotect_run(write_barrier *b, page_tables *pt, reservation *r, held_run *h,
                        bint zeroed_in_place, pass_stats *st) noexcept nogil
