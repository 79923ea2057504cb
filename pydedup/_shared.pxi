# A frame store shared by processes (_shared.pxd). The members reach the
# same memfds, passed over a unix socket (pydedup/shared.py): FRAME_STRIPES
# of frames (_frames.pxi), one of records laid out as
#
#   header page | frame table | stable-tree buckets | orphan list | ledgers
#
# every table reserved for SHARED_SLOTS frames (sparse: memory only where
# used). Every operation of a member on the store runs between
# shared_lock() and shared_unlock(): the lock is a robust process-shared
# mutex, so a member killed holding it (in the middle of a merge) hands it
# to the next locker, which repairs the records from the living members'
# ledgers (frames_recount) before going on. A member that dies without the
# lock is found by the next sweep (its pid is gone, or belongs to a process
# that started later), and its ledger is given back. Frames are immutable
# while mapped anywhere: a frame is punched only when the sum of the
# ledgers, its mapcount, is 0.

from libc.errno cimport EACCES, EAGAIN, EBUSY


cdef inline size_t round_up(size_t n, size_t to) noexcept nogil:
    return (n + to - 1) // to * to


cdef size_t shared_layout(shared_header *h, size_t page_size) noexcept nogil:
    """Fill in the header's offsets; the records memfd's length."""
    cdef size_t n = SHARED_SLOTS, at = round_up(sizeof(shared_header), page_size)
    h.frames_at = at
    at = round_up(at + n * sizeof(frame_item), page_size)
    h.stable_at = at
    at = round_up(at + 2 * n * sizeof(uint32_t), page_size)
    h.orphans_at = at
    at = round_up(at + n * sizeof(uint32_t), page_size)
    h.ledgers_at = at
    h.length = at + <size_t>MAX_MEMBERS * n * sizeof(uint32_t)
    return h.length


cdef int shared_format(int fd, size_t page_size) noexcept nogil:
    """Make memfd `fd` (new, empty) the records of a new store; 0 or an errno."""
    cdef shared_header h
    cdef shared_header *head
    cdef uint32_t empty[16]
    cdef int err
    memset(&h, 0, sizeof(h))
    memset(empty, 0xFF, sizeof(empty))  # the stable tree's first 16 buckets, empty
    if ftruncate(fd, <long>shared_layout(&h, page_size)) != 0:
        return errno
    head = <shared_header *>mmap(NULL, sizeof(shared_header), PROT_READ | PROT_WRITE,
                                 MAP_SHARED, fd, 0)
    if <void *>head == MAP_FAILED:
        return errno
    memcpy(head, &h, sizeof(h))
    head.version = SHARED_VERSION
    head.page_size = page_size
    head.nslots = SHARED_SLOTS
    head.common.stable_mask = 15
    head.common.merge_across_nodes = True
    err = pd_mutex_init(head.lock)
    if err == 0 and pwrite(fd, empty, sizeof(empty), <long>h.stable_at) != sizeof(empty):
        err = errno
    if err == 0:
        head.magic = SHARED_MAGIC       # last: a store is usable once it is set
    munmap(head, sizeof(shared_header))
    return err


cdef int shared_map(shared_store *ss, int fd, size_t page_size) noexcept nogil:
    """Map the records of a store (memfd `fd`, this record's own from now
    on); 0, an errno, or EINVAL if it is not a store of this version and
    page size."""
    cdef shared_header h
    ss.fd, ss.slot, ss.locked, ss.fork_lock = fd, -1, False, -1
    ss.head = NULL
    if pread(fd, &h, sizeof(h), 0) != <long>sizeof(h):
        return EINVAL
    if h.magic != SHARED_MAGIC or h.version != SHARED_VERSION or h.page_size != page_size:
        return EINVAL
    ss.head = <shared_header *>mmap(NULL, h.length, PROT_READ | PROT_WRITE,
                                    MAP_SHARED | MAP_NORESERVE, fd, 0)
    if <void *>ss.head == MAP_FAILED:
        ss.head = NULL
        return errno
    return 0


cdef inline char *shared_at(shared_store *ss, size_t offset) noexcept nogil:
    return <char *>ss.head + offset


cdef uint32_t *member_ledger(shared_store *ss, int slot) noexcept nogil:
    PD_ASSERT(0 <= slot < MAX_MEMBERS, "member_ledger: a member slot")
    return <uint32_t *>shared_at(ss, ss.head.ledgers_at + <size_t>slot * ss.head.nslots
                                 * sizeof(uint32_t))


cdef int shared_open(shared_store *ss, frame_store *fs, const int *frames_fds,
                     uint32_t zero_checksum) noexcept nogil:
    """The frame store `fs` on the mapped records, frames in the
    FRAME_STRIPES memfds `frames_fds`; 0 or an errno. Not a member yet:
    shared_join()."""
    cdef shared_header *h = ss.head
    PD_ASSERT(h != NULL, "shared_open: after shared_map")
    return frames_open_shared(fs, h.page_size, h.nslots, zero_checksum, frames_fds, &h.common,
                              <frame_item *>shared_at(ss, h.frames_at),
                              <uint32_t *>shared_at(ss, h.stable_at),
                              <uint32_t *>shared_at(ss, h.orphans_at), NULL)


cdef void shared_close(shared_store *ss, frame_store *fs) noexcept nogil:
    """Leave the store: this member's pages are gone (the caller unmapped
    them), so are its references."""
    if ss.head == NULL:
        return
    if ss.slot >= 0 and shared_lock(ss, fs):
        frames_drop_ledger(fs, member_ledger(ss, ss.slot))
        ss.head.members[ss.slot].state = MEMBER_FREE
        ss.head.members[ss.slot].pid = 0
        shared_unlock(ss, fs)
    munmap(ss.head, ss.head.length)
    ss.head = NULL
    if ss.fd >= 0:
        close(ss.fd)
        ss.fd = -1


cdef bint member_dead(shared_store *ss, int slot) noexcept nogil:
    """Whether the member of `slot` is gone. A slot reserved for a child
    lives while its fork lock is held; a member, while its process does and
    has not exec'd (a forked child may: its pages went with it). Never dead
    when /proc cannot tell."""
    cdef shared_member *m = &ss.head.members[slot]
    cdef uint64_t start, stack
    if m.state == MEMBER_FREE:
        return False
    if m.state == MEMBER_FORKING:
        return not pd_fork_locked(ss.fd, slot)
    start = pd_process_start(m.pid, &stack)
    if start == PD_START_UNKNOWN:
        return False
    if m.start == PD_START_UNKNOWN:
        return start == 0
    return start != m.start or (stack != 0 and m.stack != 0 and stack != m.stack)


cdef void release_member(shared_store *ss, frame_store *fs, int slot) noexcept nogil:
    frames_drop_ledger(fs, member_ledger(ss, slot))
    ss.head.members[slot].state = MEMBER_FREE
    ss.head.members[slot].pid = 0
    ss.head.members_lost += 1


cdef void shared_repair(shared_store *ss, frame_store *fs) noexcept nogil:
    """The last holder of the lock died holding it: the dead members'
    ledgers are cleared, and the records counted again from the living."""
    cdef uint32_t *ledgers[MAX_MEMBERS]
    cdef int m, n = 0
    cdef shared_member *mb
    for m in range(MAX_MEMBERS):
        mb = &ss.head.members[m]
        if mb.state == MEMBER_FREE:
            continue
        if member_dead(ss, m):
            memset(member_ledger(ss, m), 0, fs.frame_high * sizeof(uint32_t))
            mb.state, mb.pid = MEMBER_FREE, 0
            ss.head.members_lost += 1
        else:
            ledgers[n] = member_ledger(ss, m)
            n += 1
    frames_recount(fs, ledgers, n)
    ss.head.repairs += 1


cdef bint shared_lock(shared_store *ss, frame_store *fs, bint wait=True) noexcept nogil:
    """Take the store's lock and load the shared fields into `fs`. True if
    held (always, for a private store: nothing to do); without `wait`,
    False at once if another holds it."""
    cdef int err
    if ss.head == NULL:
        return True
    PD_ASSERT(not ss.locked, "shared_lock: not held already")
    err = pd_mutex_lock(ss.head.lock) if wait else pd_mutex_trylock(ss.head.lock)
    if err != 0 and err != EOWNERDEAD:
        return False
    frames_load(fs)
    if err == EOWNERDEAD:
        shared_repair(ss, fs)
        frames_save(fs)
        pd_mutex_consistent(ss.head.lock)
    ss.locked = True
    return True


cdef void shared_unlock(shared_store *ss, frame_store *fs) noexcept nogil:
    """Reclaim what this operation orphaned, save the shared fields, and
    let the next member in."""
    if ss.head == NULL or not ss.locked:
        return
    if fs.norphans:
        reclaim_frames(fs)
    frames_save(fs)
    ss.locked = False
    pd_mutex_unlock(ss.head.lock)


cdef void take_slot(shared_store *ss, int slot, int pid, uint32_t state) noexcept nogil:
    cdef shared_member *mb = &ss.head.members[slot]
    mb.pid, mb.start, mb.state = pid, pd_process_start(pid, &mb.stack), state


cdef int claim_slot(shared_store *ss, int pid, uint32_t state) noexcept nogil:
    """A free member slot, now this process's; -1 if every slot is taken by
    a living member. Under the lock."""
    cdef int m
    for m in range(MAX_MEMBERS):
        if ss.head.members[m].state == MEMBER_FREE:
            take_slot(ss, m, pid, state)
            return m
    return -1


cdef int shared_join(shared_store *ss, frame_store *fs) noexcept nogil:
    """This process becomes a member: a slot and a ledger of its own; 0, or
    EBUSY if all MAX_MEMBERS slots belong to living processes."""
    cdef int slot
    if not shared_lock(ss, fs):
        return EINVAL
    shared_sweep(ss, fs)
    slot = claim_slot(ss, getpid(), MEMBER_LIVE)
    if slot >= 0:
        ss.slot = slot
        memset(member_ledger(ss, slot), 0, fs.frame_high * sizeof(uint32_t))
        frames_use_ledger(fs, member_ledger(ss, slot))
    shared_unlock(ss, fs)
    return 0 if slot >= 0 else EBUSY


cdef void shared_sweep(shared_store *ss, frame_store *fs) noexcept nogil:
    """Under the lock: give back the references of members that died (or
    of children whose fork never completed: their fork lock is gone)."""
    cdef int m
    for m in range(MAX_MEMBERS):
        if m != ss.slot and member_dead(ss, m):
            release_member(ss, fs, m)


cdef int shared_fork_prepare(shared_store *ss, frame_store *fs) noexcept nogil:
    """Before a fork: a slot for the child, holding the references its
    pages will hold (this process's), and its fork lock, which parent and
    child both hold until the child has taken the slot, so that a sweep
    keeps it however soon the parent exits; -1 if no slot is free or no
    lock can be had. Under the lock. If the fork fails, the slot is swept
    once the parent let its lock go (shared_fork_done)."""
    cdef int slot
    if ss.head == NULL or ss.slot < 0:
        return -1
    shared_sweep(ss, fs)                # the slots of members gone since the last one
    for slot in range(MAX_MEMBERS):
        if ss.head.members[slot].state != MEMBER_FREE:
            continue
        ss.fork_lock = pd_fork_lock(ss.fd, slot)
        if ss.fork_lock >= 0:
            take_slot(ss, slot, getpid(), MEMBER_FORKING)
            frames_copy_ledger(fs, member_ledger(ss, slot))
            return slot
        if errno != EAGAIN and errno != EACCES:
            return -1                   # no lock can be had (no descriptor left)
        # else a description about to close still holds its byte: try the next slot
    return -1


cdef void shared_fork_done(shared_store *ss) noexcept nogil:
    """Let the fork lock go: in the parent after a fork (or a failed one),
    which leaves it to the child; in the child once it is a member, or has
    left the store."""
    if ss.fork_lock >= 0:
        close(ss.fork_lock)
        ss.fork_lock = -1


cdef bint shared_fork_child(shared_store *ss, frame_store *fs, int slot) noexcept nogil:
    """In the child, after the fork: the reserved slot is its own; False
    if the store's lock cannot be had (the slot is swept once this process
    has gone or closed its fork lock)."""
    cdef shared_member *mb = &ss.head.members[slot]
    ss.locked = False                   # the parent's state, copied by the fork
    if not shared_lock(ss, fs):
        return False
    if mb.state != MEMBER_FORKING:      # cannot be while the fork lock holds it
        shared_unlock(ss, fs)
        return False
    mb.pid = getpid()
    mb.start = pd_process_start(mb.pid, &mb.stack)
    mb.state = MEMBER_LIVE
    ss.slot = slot
    frames_use_ledger(fs, member_ledger(ss, slot))
    shared_unlock(ss, fs)
    return True
