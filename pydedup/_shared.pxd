# A frame store shared by the processes of one user (_shared.pxi, issue 16):
# the memfd of its records, the robust lock every member takes around an
# operation on the store, and the members. The frame store part keeps the
# records' meaning; this part maps them, locks them, and gives back what a
# dead member held.

cdef extern from "_shared.h" nogil:
    int PD_MUTEX_BYTES
    int pd_mutex_init(void *at)
    int pd_mutex_lock(void *at)
    int pd_mutex_trylock(void *at)    # EBUSY: held by another
    int pd_mutex_consistent(void *at)
    int pd_mutex_unlock(void *at)
    uint64_t PD_START_UNKNOWN
    uint64_t pd_process_start(int pid, uint64_t *stack)
    int pd_fork_lock(int records_fd, int slot)
    int pd_fork_locked(int records_fd, int slot)
    void pd_handshake_say(int fd)
    void pd_handshake_wait(int fd)
    int EOWNERDEAD
    int pd_dup_cloexec(int fd)

cdef enum:
    SHARED_MAGIC = 0x31646470      # "pdd1"
    SHARED_VERSION = 5             # 3: a member's stack address; 4: FRAME_STRIPES memfds;
                                   # 5: each holding its stripes one after the other
    MAX_MEMBERS = 64               # member slots, each with a ledger
    SHARED_SLOTS = 1 << 25         # frame slots of a shared store (128 GiB of 4 KiB frames)
    MEMBER_FREE = 0
    MEMBER_LIVE = 1                # a process with a Core on the store
    MEMBER_FORKING = 2             # reserved by a process for the child it is forking:
                                   # alive while its fork lock is held (pd_fork_lock)

cdef struct shared_member:         # one slot of the member table
    int pid                        # the process; for MEMBER_FORKING, the forking parent
    uint32_t state                 # MEMBER_FREE, MEMBER_LIVE, MEMBER_FORKING
    uint64_t start                 # pd_process_start(pid): a later process of that pid differs
                                   # (PD_START_UNKNOWN: /proc could not say; then the pid alone)
    uint64_t stack                 # where its stack began: it moves when the process execs

cdef struct shared_header:         # the first page of the records memfd
    uint32_t magic                 # SHARED_MAGIC once formatted
    uint32_t version
    uint64_t page_size
    uint64_t nslots                # frame slots
    uint64_t frames_at, stable_at, orphans_at, ledgers_at, length   # byte offsets
    char lock[64]                  # the pthread mutex (PD_MUTEX_BYTES), robust and shared
    frames_common common           # the frame store's fields the members share
    uint64_t repairs               # times a member died holding the lock, and it was repaired
    uint64_t members_lost          # dead members whose references were given back
    shared_member members[MAX_MEMBERS]

cdef struct shared_store:          # Core.shm
    shared_header *head            # the records memfd, mapped; NULL: the store is private
    int fd                         # the records memfd
    int slot                       # this member's slot, -1 before it has one
    bint locked                    # this process holds the lock (for this Core)
    int fork_lock                  # the fork lock of the slot of a child being forked, or -1

cdef int shared_format(int fd, size_t page_size) noexcept nogil
cdef int shared_map(shared_store *ss, int fd, size_t page_size) noexcept nogil
cdef int shared_open(shared_store *ss, frame_store *fs, const int *frames_fds,
                     uint32_t zero_checksum) noexcept nogil
cdef void shared_close(shared_store *ss, frame_store *fs) noexcept nogil
cdef bint shared_lock(shared_store *ss, frame_store *fs, bint wait=*) noexcept nogil
cdef void shared_unlock(shared_store *ss, frame_store *fs) noexcept nogil
cdef int shared_join(shared_store *ss, frame_store *fs) noexcept nogil
cdef void shared_sweep(shared_store *ss, frame_store *fs) noexcept nogil
cdef int shared_fork_prepare(shared_store *ss, frame_store *fs) noexcept nogil
cdef bint shared_fork_child(shared_store *ss, frame_store *fs, int slot) noexcept nogil
cdef void shared_fork_done(shared_store *ss) noexcept nogil
cdef uint32_t *member_ledger(shared_store *ss, int slot) noexcept nogil
