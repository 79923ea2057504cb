# The expensive invariant checker (mimalloc's _mi_page_is_valid): walks every
# rmap item, every frame, both trees, the frame store's memory and the
# process's mappings, and raises InvariantError naming the first invariant
# of _fast.pxd that does not hold, and the page or frame. Tests call it
# between operations; a build with PYDEDUP_DEBUG=1 runs it after every
# operation under the arena's lock (pydedup/pages.py). It changes nothing:
# it only reads records, the frame store and /proc/self.
#
# It holds between operations only: inside reclaim_frames() or a pass, the
# records are allowed to disagree for a while.

import io

DEBUG_CHECKS = bool(PD_DEBUG_CHECKS)   # a PYDEDUP_DEBUG=1 build: check after every operation


class InvariantError(AssertionError):
    """An invariant of pydedup's core does not hold: a bug in pydedup."""


def check_invariants(Core c, free_pages=None):
    """Raise InvariantError if the core's records are inconsistent. With
    free_pages (a bytes-like of one flag a page below high_water, as the
    page allocator sees them), also that exactly those pages are FREE."""
    counted = check_pages(c, free_pages)
    check_frames(c, counted)
    check_stable_tree(c)
    check_unstable_tree(c)
    check_tiers(&c.store)
    check_shared(c)
    check_frame_memory(c)
    check_mappings(c)
    if c.tables.zero_pfn:
        check_page_tables(c)


cdef fail(str invariant, str where):
    raise InvariantError(f"{invariant} ({where})")


cdef check_records_above(size_t ps, const char *records, size_t first, size_t count, size_t size,
                         str what):
    """Records [first, count) of a lazily mapped table were never written:
    all zero. Only resident pages of the table can hold anything, so only
    those are read (a table covers the whole reservation, up to terabytes)."""
    cdef size_t lo = first * size // ps * ps, hi = count * size
    cdef size_t npg = (hi - lo + ps - 1) // ps, i, b
    cdef unsigned char *resident
    if lo >= hi:
        return
    resident = <unsigned char *>malloc(npg)
    if resident == NULL:
        raise MemoryError()
    try:
        if mincore(<void *>(records + lo), hi - lo, resident) != 0:
            raise OSError(errno, "mincore")
        for i in range(npg):
            if not resident[i] & 1:
                continue
            for b in range(max(lo + i * ps, first * size), min(lo + (i + 1) * ps, hi)):
                if records[b] != 0:
                    fail(f"a {what} above the high water is not blank", f"{what} {b // size}")
    finally:
        free(resident)


cdef bytes check_pages(Core c, free_pages):
    """States and flags of every rmap item; returns, per frame, how many
    MERGED pages map it (uint32 each)."""
    cdef size_t p, hw = c.res.high_water
    cdef uint32_t nfr = c.store.frame_high
    cdef rmap_item *it
    cdef bytearray counts = bytearray(4 * (<size_t>nfr + 1))
    cdef uint32_t *counted = <uint32_t *><char *>counts
    cdef const uint8_t[::1] free_flags
    if hw > c.res.npages or nfr > c.store.nslots:
        fail("high_water lies within the reservation, frame_high within the frame slots",
             f"high_water {hw}, frame_high {nfr}, npages {c.res.npages}")
    if c.store.norphans:
        fail("no orphan frame is left unreclaimed between operations", f"{c.store.norphans} listed")
    if free_pages is not None:
        free_flags = free_pages
        if <size_t>free_flags.shape[0] < hw:
            raise ValueError("free_pages must cover the pages below high_water")
    for p in range(hw):
        it = &c.res.rmap[p]
        if it.state > PAGE_BROKEN:
            fail("a page's state is one of FREE, PRIVATE, ZERO, MERGED, BROKEN",
                 f"page {p}, state {it.state}")
        if it.flags & (PAGE_TARGET | PAGE_TARGET_ZERO):
            fail("the TARGET flags of a pass are cleared when it ends",
                 f"page {p}, flags {it.flags:#x}")
        if it.state == PAGE_FREE and (it.flags or it.frame or it.checksum):
            fail("a FREE page has a blank record", f"page {p}")
        if it.flags & PAGE_UNSTABLE and (c.scan.unstable == NULL or p >= c.scan.cursor
                                         or not mergeable(it)):
            fail("only mergeable pages behind the cursor of a scan in progress are in the "
                 "unstable tree", f"page {p}, state {it.state}, cursor {c.scan.cursor}")
        if it.state == PAGE_MERGED:
            if it.frame >= nfr:
                fail("a MERGED page maps a frame below frame_high", f"page {p}, frame {it.frame}")
            counted[it.frame] += 1
        if free_pages is not None and (it.state == PAGE_FREE) != (free_flags[p] != 0):
            fail("the pages the allocator holds free are exactly the FREE pages",
                 f"page {p}, state {it.state}, free in the allocator: {free_flags[p] != 0}")
    check_records_above(c.res.page_size, <const char *>c.res.rmap, hw, c.res.npages,
                        sizeof(rmap_item), "page record")
    return bytes(counts)


cdef check_frames(Core c, bytes counts):
    """frames[f].mapcount == #{p : MERGED on f}; frames_in_use == #{f : mapcount > 0}.
    A frame's checksum is not checked against its content: it is the
    checksum its first page had when hashed, and a thread may write that
    page before the frame is filled (the merge stays right, since each remap
    compares the bytes, but the frame is then keyed by stale content)."""
    cdef frame_store *fs = &c.store
    cdef const uint32_t *counted = <const uint32_t *><const char *>counts
    cdef uint32_t f, in_use = 0
    for f in range(fs.frame_high):
        if frames_ledger_count(fs, f) != counted[f]:   # shared: this member's share
            fail("a frame's mapcount (shared: this member's ledger) is the number of MERGED "
                 "pages on it", f"frame {f}: {frames_ledger_count(fs, f)}, {counted[f]} MERGED pages")
        in_use += fs.frames[f].mapcount != 0
        if fs.frames[f].mapcount and fs.frames[f].tile_index:
            check_tile_frame(fs, f)
    if in_use != fs.frames_in_use:
        fail("frames_in_use counts the frames with a mapcount",
             f"frames_in_use {fs.frames_in_use}, {in_use} frames mapped")
    check_records_above(fs.page_size, <const char *>fs.frames, fs.frame_high, fs.nslots,
                        sizeof(frame_item), "frame slot")


cdef check_tile_frame(frame_store *fs, uint32_t f):
    """A frame of a tile lies in its tile's memfd, after its first frame: a
    tile grows a slot at a time, never across a tier's or a stripe's start
    or below the fork fence it grew above."""
    cdef uint32_t k = fs.frames[f].tile_index
    if k > f or file_of(fs, f - k) != file_of(fs, f):
        fail("a tile's frames lie in one memfd, after its first",
             f"frame {f}: tile_index {k}")


cdef check_stable_tree(Core c):
    """Every frame in use is in the stable tree once, in its checksum's
    bucket; no free frame is; chains end."""
    cdef frame_store *fs = &c.store
    cdef uint32_t b, f, nfr = fs.frame_high, in_tree = 0
    cdef bytearray seen = bytearray(<size_t>nfr + 1)
    cdef unsigned char *s = <unsigned char *><char *>seen
    if fs.stable_mask & (fs.stable_mask + 1):
        fail("the stable tree has a power of two buckets", f"mask {fs.stable_mask:#x}")
    for b in range(fs.stable_mask + 1):
        f = fs.stable[b]
        while f != NO_FRAME:
            if f >= nfr:
                fail("stable-tree chains link frames below frame_high", f"bucket {b}, frame {f}")
            if s[f]:
                fail("a frame is in the stable tree once (chains end)", f"bucket {b}, frame {f}")
            s[f] = 1
            if tree_key(fs, fs.frames[f].checksum, fs.frames[f].node) & fs.stable_mask != b:
                fail("a frame sits in its checksum's (and node's) stable-tree bucket",
                     f"frame {f} in bucket {b}, checksum {fs.frames[f].checksum:#x}")
            if fs.frames[f].mapcount == 0:
                fail("a free frame (mapcount 0) is not in the stable tree", f"frame {f}")
            in_tree += 1
            f = fs.frames[f].next
    for f in range(nfr):
        if fs.frames[f].mapcount and not s[f]:
            fail("a frame in use is in the stable tree", f"frame {f}")


cdef check_unstable_tree(Core c):
    """Between scans there is none; during a background scan its chains
    hold exactly the pages flagged UNSTABLE, each in its checksum's bucket."""
    cdef size_t p, hw = c.res.high_water, flagged = 0, linked = 0
    cdef uint32_t b, q
    cdef bytearray seen
    cdef unsigned char *s
    for p in range(hw):
        flagged += c.res.rmap[p].flags & PAGE_UNSTABLE != 0
    if c.scan.unstable == NULL:
        if c.scan.cursor != 0:
            fail("the scan cursor is 0 between scans", f"cursor {c.scan.cursor}")
        return
    if c.scan.cursor > hw:
        fail("the scan cursor lies below high_water", f"cursor {c.scan.cursor}, high_water {hw}")
    seen = bytearray(hw + 1)
    s = <unsigned char *><char *>seen
    for b in range(c.scan.unstable_mask + 1):
        q = c.scan.unstable[b]
        while q != NO_PAGE:
            if q >= hw or s[q] or not c.res.rmap[q].flags & PAGE_UNSTABLE:
                fail("unstable-tree chains link distinct UNSTABLE pages and end",
                     f"bucket {b}, page {q}")
            s[q] = 1
            if tree_key(&c.store, c.res.rmap[q].checksum, c.res.rmap[q].node) & c.scan.unstable_mask != b:
                fail("a page sits in its checksum's (and node's) unstable-tree bucket",
                     f"page {q}, bucket {b}")
            linked += 1
            q = c.res.rmap[q].frame
    if linked != flagged:
        fail("every UNSTABLE page is linked in the unstable tree",
             f"{flagged} flagged, {linked} linked")


cdef check_tiers(frame_store *fs):
    cdef int t, i
    cdef frame_tier *top = &fs.tiers[fs.ntiers - 1]
    if not 1 <= fs.ntiers <= MAX_TIERS or fs.tiers[0].first_frame != 0:
        fail("the frame store has 1 to MAX_TIERS tiers, the first from frame 0",
             f"{fs.ntiers} tiers")
    for t in range(fs.ntiers):
        for i in range(FRAME_STRIPES):
            if fs.tiers[t].files[i].fd < 0 or <void *>fs.tiers[t].files[i].view == MAP_FAILED:
                fail("every tier has its memfds and their views", f"tier {t}, memfd {i}")
        if t and fs.tiers[t].first_frame <= fs.tiers[t - 1].first_frame:
            fail("tiers are ordered by first_frame", f"tier {t}")
    if not top.first_frame <= fs.fork_fence <= fs.frame_high:
        fail("top tier's first_frame <= fork_fence <= frame_high",
             f"{top.first_frame}, {fs.fork_fence}, {fs.frame_high}")
    if fs.behind_n or fs.writes != NULL or fs.writes_collected != fs.writes_posted:
        fail("between operations every new frame is written, and no helper writes",
             f"{fs.behind_n} behind, {fs.writes_posted - fs.writes_collected} posted")


cdef check_shared(Core c):
    """A shared store, across its members: each frame's mapcount is the sum
    of the living members' ledgers (a dead member's was given back or will
    be at the next sweep: counted as living until then), this member holds
    its slot, and no member's ledger counts a slot above frame_high."""
    cdef shared_header *h = c.shm.head
    cdef frame_store *fs = &c.store
    cdef uint32_t f
    cdef uint64_t total
    cdef int m
    if h == NULL:
        return
    if not c.shm.locked:
        fail("the checker runs under the shared store's lock", "not held")
    if c.shm.slot < 0 or h.members[c.shm.slot].state != MEMBER_LIVE \
            or h.members[c.shm.slot].pid != getpid():
        fail("a member holds its own slot", f"slot {c.shm.slot}")
    if fs.stable_mask + 1 > 2 * fs.nslots:
        fail("a shared stable tree stays within its reserved buckets", f"mask {fs.stable_mask:#x}")
    for f in range(fs.frame_high):
        total = 0
        for m in range(MAX_MEMBERS):
            if h.members[m].state != MEMBER_FREE:
                total += member_ledger(&c.shm, m)[f]
        if total != fs.frames[f].mapcount:
            fail("a shared frame's mapcount is the sum of its members' ledgers",
                 f"frame {f}: mapcount {fs.frames[f].mapcount}, ledgers {total}")


def check_frame_memory(Core c):
    """A frame this process may punch (top tier, at or above the fence)
    holds memory exactly while a page maps it: no frame leaks."""
    cdef frame_store *fs = &c.store
    cdef frame_tier *top = &fs.tiers[fs.ntiers - 1]
    cdef uint32_t f, lo = max(top.first_frame, fs.fork_fence)
    cdef int i
    ps = fs.page_size
    data = set()
    for i in range(FRAME_STRIPES):
        offset = file_page_from(i, lo) * ps
        end = os.fstat(top.files[i].fd).st_size
        while offset < end:
            try:
                offset = os.lseek(top.files[i].fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == 6:        # ENXIO: no data after offset
                    break
                raise
            hole = os.lseek(top.files[i].fd, offset, os.SEEK_HOLE)
            data.update(frame_at(i, page) for page in range(offset // ps, (hole + ps - 1) // ps))
            offset = hole
    for f in sorted(data):
        if f >= fs.frame_high or fs.frames[f].mapcount == 0:
            fail("a frame no page maps holds no memory (it was punched)", f"frame {f}")
    for f in range(lo, fs.frame_high):
        if fs.frames[f].mapcount and f not in data:
            fail("a frame in use holds memory", f"frame {f}")


def check_mappings(Core c):
    """What the kernel maps agrees with the states: PRIVATE, ZERO and FREE
    pages in anonymous memory, BROKEN pages in a frame-store mapping, and a
    MERGED page in its frame's memfd, at its frame's page there."""
    cdef int t, i
    ps = c.res.page_size
    lo = <size_t>c.res.base
    hi = lo + c.res.high_water * ps
    inodes = {}
    for t in range(c.store.ntiers):
        for i in range(FRAME_STRIPES):
            inodes[os.fstat(c.store.tiers[t].files[i].fd).st_ino] = (t, i)
    with io.open("/proc/self/maps", "rb") as maps:
        for line in maps:
            fields = line.split(None, 5)
            start, end = (int(x, 16) for x in fields[0].split(b"-"))
            if end <= lo or start >= hi:
                continue
            path = fields[5].strip() if len(fields) > 5 else b""
            store = path.startswith(b"/memfd:pydedup-frames")
            if path and not store:
                fail("the arena maps only anonymous memory and the frame store",
                     line.decode().strip())
            check_mapping(c, (max(start, lo) - lo) // ps, (min(end, hi) - lo) // ps,
                          (max(start, lo) - start) // ps + int(fields[2], 16) // ps,
                          inodes.get(int(fields[4]), (-1, -1)) if store else (-2, -1))


cdef check_mapping(Core c, size_t first, size_t end, size_t pgoff, tuple file):
    """Pages [first, end) lie in one mapping: anonymous (file (-2, -1)),
    of memfd i of tier t (file (t, i)), or of a frame-store memfd no tier
    holds ((-1, -1)), with page `first` at file page pgoff."""
    cdef size_t p
    cdef rmap_item *it
    tier, stripe = file
    for p in range(first, end):
        it = &c.res.rmap[p]
        if it.state in (PAGE_MERGED, PAGE_BROKEN) and tier == -2:
            fail("MERGED and BROKEN pages lie in a frame-store mapping",
                 f"page {p}, state {it.state}")
        if it.state in (PAGE_FREE, PAGE_PRIVATE, PAGE_ZERO) and tier != -2:
            fail("FREE, PRIVATE and ZERO pages lie in anonymous memory",
                 f"page {p}, state {it.state}")
        if it.state == PAGE_MERGED and (pgoff + p - first != file_page(it.frame)
                                        or tier < 0
                                        or file_of(&c.store, it.frame) != &c.store.tiers[tier].files[stripe]):
            fail("a MERGED page maps its own frame, in its memfd",
                 f"page {p}: frame {it.frame}, mapped at file page {pgoff + p - first} "
                 f"of tier {tier}, memfd {stripe}")


def check_page_tables(Core c):
    """Where pagemap shows frame numbers (root): a MERGED page that maps a
    file page maps the very page of memory its frame is."""
    cdef size_t p
    cdef uint64_t entry = 0, frame_entry = 0
    cdef const char *content
    cdef volatile char touch
    cdef int err
    for p in range(c.res.high_water):
        if c.res.rmap[p].state != PAGE_MERGED:
            continue
        err = pagemap_entry(&c.tables, page_address(&c.res, p), &entry)
        if err:
            raise OSError(err, "cannot read /proc/self/pagemap")
        if not (entry & PM_PRESENT and entry & PM_FILE):
            continue                    # not faulted in, or written (BROKEN at the next refresh)
        content = frame_address(&c.store, c.res.rmap[p].frame)
        touch = content[0]              # the view maps the frame's page
        err = pagemap_entry(&c.tables, content, &frame_entry)
        if err:
            raise OSError(err, "cannot read /proc/self/pagemap")
        if entry & PM_PFN != frame_entry & PM_PFN:
            fail("a MERGED page maps its frame's memory", f"page {p}, frame {c.res.rmap[p].frame}")
