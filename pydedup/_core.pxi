# The Core: the arena's reservation, its rmap items and its frame store, and
# the operations pydedup/pages.py calls, each under the arena's lock.
import os

cdef uint32_t zero_page_checksum(size_t page_size) except? 0:
    cdef void *zeros = calloc(1, page_size)
    if zeros == NULL:
        raise MemoryError()
    checksum = <uint32_t>pd_page_checksum(zeros, page_size)
    free(zeros)
    return checksum


def page_checksums(const unsigned char[::1] page):
    """{version: checksum of `page`} for every version of the page checksum
    this CPU runs (_checksum.h), fastest first: the scan uses the first,
    and all must agree. `page`'s length is a multiple of 64 bytes."""
    cdef const pd_checksum_version *v = pd_checksum_versions()
    if page.shape[0] % 64:
        raise ValueError(f"a page is a multiple of 64 bytes, not {page.shape[0]}")
    out = {}
    while v.name != NULL:
        out[v.name.decode()] = v.fn(&page[0] if page.shape[0] else NULL, page.shape[0])
        v += 1
    return out


def checksum_seconds(const unsigned char[::1] pages, size_t page_size, size_t rounds,
                     size_t other_address=0, str other_name="other"):
    """{version: seconds} to checksum `pages` one page at a time, `rounds`
    times, by each version of the page checksum this CPU runs, and by the
    function at `other_address` of the same C signature if one is given
    (benchmarks/checksum.py times python-xxhash's XXH3 so)."""
    cdef const pd_checksum_version *v = pd_checksum_versions()
    cdef list versions = []
    cdef pd_checksum_fn fn
    cdef size_t r, p, npages = pages.shape[0] // page_size if page_size else 0
    cdef double start
    if page_size == 0 or page_size % 64 or npages == 0:
        raise ValueError(f"pages holds whole pages of a multiple of 64 bytes, not {page_size}")
    while v.name != NULL:
        versions.append((v.name.decode(), <size_t>v.fn))
        v += 1
    if other_address:
        versions.append((other_name, other_address))
    out = {}
    for name, address in versions:
        fn = <pd_checksum_fn><size_t>address
        start = now()
        with nogil:
            for r in range(rounds):
                for p in range(npages):
                    fn(&pages[p * page_size], page_size)   # opaque: not optimised away
        out[name] = now() - start
    return out


cdef uint32_t check_threads(uint32_t threads) except 0:
    if not 1 <= threads <= PD_MAX_THREADS:
        raise ValueError(f"threads is 1 to {PD_MAX_THREADS}, not {threads}")
    return threads


cdef uint32_t check_tile_pages(uint32_t tile_pages) except 0:
    if not 1 <= tile_pages <= MAX_TILE_PAGES:
        raise ValueError(f"tile_pages is 1 to {MAX_TILE_PAGES}, not {tile_pages}")
    return tile_pages


cdef tuple tier_fds(const frame_tier *t):
    return tuple(t.files[i].fd for i in range(FRAME_STRIPES))


cdef pass_error(int err, str what):
    """An OSError that says what failed and why: a pass refused memory under
    RLIMIT_DATA says "Cannot allocate memory", not only its errno."""
    return OSError(err, f"{what}: {os.strerror(err)}")


cdef class Core:
    """The arena's pages and frames. `npages` pages of virtual memory are
    reserved at once; records and frames only cost memory once used."""

    def __cinit__(self, size_t npages, tuple shared=None):
        cdef size_t page_size = sysconf(_SC_PAGESIZE)
        cdef int err
        self.res.base = <char *>MAP_FAILED
        self.res.rmap = <rmap_item *>MAP_FAILED
        self.huge.advised = <uint8_t *>MAP_FAILED
        self.res.page_size = page_size
        nodes_init(&self.nodes)
        barrier_init(&self.wb)
        self.tables.track_uffd = -1
        self.tables.pagemap.fd = self.tables.maps.fd = -1
        tier_init(&self.store.tiers[0], 0)
        self.store.ntiers = 1
        self.shm.fd, self.shm.slot, self.shm.fork_lock, self.fork_slot = -1, -1, -1, -1
        if npages == 0 or npages >= NO_PAGE:
            raise ValueError(f"an arena holds 1 to {NO_PAGE - 1} pages, not {npages}")
        self.res.npages = npages
        self.res.base = <char *>map_lazily_aligned(npages * page_size, HUGE_ALIGN)
        self.res.rmap = <rmap_item *>map_lazily(npages * sizeof(rmap_item))
        if (MAP_FAILED in (<void *>self.res.base, <void *>self.res.rmap)
                or huge_open(&self.huge, npages, page_size) != 0):
            raise MemoryError(f"cannot reserve {npages} pages of address space")
        madvise(self.res.base, npages * page_size, MADV_NOHUGEPAGE)  # huge pages: big arrays only (_huge.pxi)
        if shared is not None:
            self.open_shared(shared[0], shared[1], zero_page_checksum(page_size))
            err = 0
        else:
            err = frames_open(&self.store, page_size, npages, zero_page_checksum(page_size))
        if err == ENOMEM:
            raise MemoryError(f"cannot reserve the frame store of {npages} pages")
        if err:
            raise OSError(err, "cannot create the frame store (memfd_create)")
        page_tables_open(&self.tables, self.res.base, page_size, npages)
        start_tracking(&self.tables)

    def __dealloc__(self):
        if <void *>self.res.base != MAP_FAILED:
            munmap(self.res.base, self.res.npages * self.res.page_size)
        if <void *>self.res.rmap != MAP_FAILED:
            munmap(self.res.rmap, self.res.npages * sizeof(rmap_item))
        huge_close(&self.huge)
        shared_close(&self.shm, &self.store)    # this process's pages are unmapped: leave
        frames_close(&self.store)
        page_tables_close(&self.tables)
        barrier_close(&self.wb)
        scan_close(self)

    # -- what the parts hold, read-only (and the two knobs tests set) ----------

    @property
    def page_size(self):
        return self.res.page_size

    @property
    def npages(self):
        """Arena pages reserved."""
        return self.res.npages

    @property
    def high_water(self):
        """Pages [high_water, npages) were never used."""
        return self.res.high_water

    @property
    def frames_in_use(self):
        return self.store.frames_in_use

    @property
    def frame_high(self):
        """Frame slots [frame_high, npages) were never used."""
        return self.store.frame_high

    @property
    def fork_fence(self):
        """Frames below it existed at a fork: shared with another process,
        never punched or reused."""
        return self.store.fork_fence

    @property
    def zero_colours(self):
        """Zero frames are kept apart by page colour (zero_page_colours)."""
        return self.store.zero_colours

    @zero_colours.setter
    def zero_colours(self, uint32_t colours):
        self.store.zero_colours = colours

    @property
    def merge_across_nodes(self):
        """One pair of trees; else one a node."""
        return merges_across_nodes(&self.store)

    @property
    def nnodes(self):
        """Nodes pages may be on (1: no lookups)."""
        return self.nodes.nnodes

    @property
    def scan_cursor(self):
        """The next page the background scan looks at."""
        return self.scan.cursor

    @property
    def barrier(self):
        """The barrier_mode chosen; 0 before set_barrier()."""
        return self.wb.mode

    @property
    def restored_in_pieces(self):
        """Runs RLIMIT_DATA kept read-only (_barrier.pxi restore_in_pieces)."""
        return self.wb.restored_in_pieces

    @property
    def squeeze_data(self):
        """Tests: runs under mprotect lose their RLIMIT_DATA room meanwhile."""
        return self.wb.squeeze_data

    @squeeze_data.setter
    def squeeze_data(self, bint squeeze):
        self.wb.squeeze_data = squeeze

    @property
    def has_pagemap_scan(self):
        return self.tables.has_pagemap_scan

    @property
    def base_address(self):
        return <size_t>self.res.base

    @property
    def memfds(self):
        """The memfds new frames go to (the top tier's), frame f in
        memfds[f // STRIPE_PAGES % FRAME_STRIPES]. In a forked child they
        are the child's own: the frames it inherited live in its parent's
        memfds, shared with the parent, and are not in these. Every frame
        is written in them first."""
        frames_write_behind(&self.store)
        return tier_fds(frames_top(&self.store))

    # -- NUMA nodes (_numa.pxi) ------------------------------------------------

    def set_merge_across_nodes(self, bint value):
        """KSM's merge_across_nodes. It decides which tree each frame is in,
        so it changes only while no page is merged (KSM answers EBUSY)."""
        cdef pass_stats dropped
        if value == merges_across_nodes(&self.store):
            return
        if self.frames_in_use:
            raise RuntimeError(
                f"merge_across_nodes cannot change while pages are merged ({self.frames_in_use} "
                f"frames in use; KSM answers EBUSY): unmerge() first")
        if scan_in_progress(self):      # a background scan keyed its tree the old way
            end_scan(self, &dropped)
        frames_set_across_nodes(&self.store, value)

    def set_nodes(self, int nnodes):
        """How many nodes pages may be on; with one, nodes are never looked up."""
        self.nodes.nnodes = max(nnodes, 1)

    def simulate_nodes(self, nodes):
        """Take each page's node from `nodes`, a writable uint16 buffer with
        one entry a page, instead of the kernel: the per-node logic, tested on
        a machine of one node. Frames are then on the node they were written
        for. None: ask the kernel again."""
        cdef uint16_t[::1] view
        if nodes is None:
            self.nodes.simulated, self.simulated_nodes = NULL, None
            return
        view = nodes
        if <size_t>view.shape[0] != self.res.npages:
            raise ValueError(f"a node map needs one entry per page ({self.res.npages}), not {view.shape[0]}")
        self.nodes.simulated, self.simulated_nodes = &view[0], nodes

    @property
    def simulating(self):
        """Whether pages' nodes come from a simulated map (simulate_nodes)."""
        return self.nodes.simulated != NULL

    def place(self, size_t first, size_t n, tuple nodes):
        """Memory of pages [first, first + n) from `nodes`: one node, several
        (interleaved page by page), or () for the kernel's default (the node
        of the CPU that first writes a page)."""
        cdef unsigned long mask[NODE_MASK_WORDS]
        cdef int mode = PD_MPOL_DEFAULT if not nodes else PD_MPOL_PREFERRED if len(nodes) == 1 else PD_MPOL_INTERLEAVE
        self.check_range(first, n)
        if self.nodes.simulated != NULL:
            for i in range(n):
                self.nodes.simulated[first + i] = nodes[i % len(nodes)] if nodes else 0
            return
        memset(mask, 0, sizeof(mask))
        for node in nodes:
            mask[node // 64] |= 1UL << (node % 64)
        if n and pd_mbind(page_address(&self.res, first), n * self.res.page_size, mode,
                          mask if nodes else NULL) != 0:
            raise OSError(errno, f"cannot place pages on NUMA nodes {list(nodes)} (mbind)")

    def tile_counts(self):
        """Frames in use by tile: `tiles`, those with a frame after their
        first; `tile_frames`, the frames of those tiles."""
        cdef uint32_t f, tiles = 0, tile_frames = 0
        for f in range(self.store.frame_high):
            if frame_mapcount(&self.store, f) == 0:
                continue
            if frame_tile_index(&self.store, f) > 0:
                tile_frames += 1
            elif (f + 1 < self.store.frame_high and frame_mapcount(&self.store, f + 1)
                    and frame_tile_index(&self.store, f + 1) == 1):
                tiles += 1
                tile_frames += 1
        return dict(tiles=tiles, tile_frames=tile_frames)

    def frames_by_node(self):
        """{node: frames in use written for it}."""
        counts = {}
        for f in range(self.store.frame_high):
            if frame_mapcount(&self.store, f):
                node = frame_node(&self.store, f)
                counts[node] = counts.get(node, 0) + 1
        return counts

    @property
    def has_procmap_query(self):
        """Whether the kernel shows mappings by address (PROCMAP_QUERY, Linux
        6.11), which lets a spent mapping budget still pay for remaps that
        add no mapping."""
        cdef mapping m
        return find_mapping(&self.tables, <uint64_t>self.res.base, &m) == 0

    @property
    def frame_store_tiers(self):
        """The tiers of the frame store, bottom first, as (first_frame, memfds)."""
        return [(self.store.tiers[t].first_frame, tier_fds(&self.store.tiers[t]))
                for t in range(self.store.ntiers)]

    cdef void check_range(self, size_t first, size_t n) except *:
        if first > self.res.npages or n > self.res.npages - first:
            raise IndexError(f"pages [{first}, {first + n}) are outside the arena's {self.res.npages}")

    def adopt(self, size_t first, size_t n):
        """Pages of a new array: FREE (zero-filled) to PRIVATE."""
        self.check_range(first, n)
        for p in range(first, first + n):
            self.res.rmap[p] = rmap_item(0, 0, PAGE_PRIVATE, 0, 0)
        self.res.high_water = max(self.res.high_water, first + n)

    def release(self, size_t first, size_t n):
        """Pages of a dead array back to FREE: zero-filled and holding no
        memory. False if the kernel refused to remap them (mapping limit)."""
        cdef bint in_frame_store = False
        cdef char *addr
        cdef size_t length
        cdef int err
        self.check_range(first, n)
        for p in range(first, first + n):
            in_frame_store |= self.res.rmap[p].state in (PAGE_MERGED, PAGE_BROKEN)
        addr = page_address(&self.res, first)
        length = n * self.res.page_size
        with nogil:
            if in_frame_store:
                err = map_anonymous(addr, length)
                if err == 0:
                    self.res.remapped = True
                    track_range(&self.tables, addr, length)
            else:
                err = errno if madvise(addr, length, MADV_DONTNEED) else 0
            if err == 0:
                for p in range(first, first + n):
                    unstable_tree_erase(self, p)
                    if self.res.rmap[p].state == PAGE_MERGED:
                        frame_put(&self.store, self.res.rmap[p].frame)
                    self.res.rmap[p] = rmap_item(0, 0, PAGE_FREE, 0, 0)
                reclaim_frames(&self.store)
        return err == 0

    def forget_cuts(self):
        """Once every page is FREE: the reservation as one fresh anonymous
        mapping again. Remaps cut it into mappings that freeing does not join
        again, since the kernel joins anonymous neighbours only if their
        anon_vmas agree; a mapping laid over all of them does. Nothing to do
        if nothing was remapped; if the kernel refuses (the mapping limit),
        it is tried again at the next release."""
        cdef int err = 0
        cdef size_t length = self.res.npages * self.res.page_size
        if not self.res.remapped:
            return
        with nogil:
            err = map_anonymous(self.res.base, length)
            if err == 0:
                self.res.remapped = False
                track_range(&self.tables, self.res.base, length)

    def merge(self, bint use_zero_pages, uint32_t max_page_sharing, long mappings_left,
              uint32_t tile_pages=1, uint32_t threads=1, bint whole_contents=False):
        """One whole scan, now; returns what it did as a dict of pass_stats.
        Runs of one content map onto tiles of up to tile_pages frames; pages
        are read on `threads` threads. whole_contents: kernel KSM takes what
        the mapping budget leaves, so a content it cannot finish stays wholly
        private (_budget.pxi)."""
        cdef pass_stats st
        cdef scan_knobs k = scan_knobs(use_zero_pages, max_page_sharing, True,
                                       check_tile_pages(tile_pages), check_threads(threads),
                                       whole_contents)
        cdef int err
        self.check_can_merge()
        memset(&st, 0, sizeof(st))
        st.mappings_left = mappings_left
        with nogil:
            err = merge_pass(self, &k, &st)
        if err:
            raise pass_error(err, "the merge pass failed")
        self.full_scans += 1
        self.pages_unshared = st.unshared
        self.pages_volatile = st.volatile
        self.note_huge(&st, &st)
        return st

    def scan_batch(self, size_t npages, bint use_zero_pages, uint32_t max_page_sharing,
                   long mappings_left, uint32_t tile_pages=1, uint32_t threads=1,
                   bint whole_contents=False):
        """The background scanner's step: the next npages of the scan in
        progress. mappings_left is the mapping budget of a scan, taken when
        one begins (at scan_cursor 0). Returns (this step's pass_stats,
        whether a scan ended)."""
        cdef pass_stats before = self.scan.stats
        cdef scan_knobs k = scan_knobs(use_zero_pages, max_page_sharing, False,
                                       check_tile_pages(tile_pages), check_threads(threads),
                                       whole_contents)
        cdef bint scan_done = False
        cdef int err
        self.check_can_merge()
        if not scan_in_progress(self):
            self.scan.stats.mappings_left = mappings_left
        with nogil:
            err = scan_batch(self, npages, &k, &scan_done)
        step = {key: value - before.get(key, 0) if not key.endswith("left") else value
                for key, value in (<dict>self.scan.stats).items()}
        self.huge.split_total += step["huge_split"]
        if scan_done:
            self.note_huge(&self.scan.stats, NULL)
            self.full_scans += 1
            self.pages_unshared = self.scan.stats.unshared
            self.pages_volatile = self.scan.stats.volatile
            memset(&self.scan.stats, 0, sizeof(pass_stats))
        if err:
            raise pass_error(err, "the background scan failed")
        return step, scan_done

    # -- transparent huge pages (_huge.pxi) -----------------------------------

    def set_huge_pages(self, size_t pages, uint32_t split_min):
        """Huge pages of `pages` arena pages each (0: off); a pass splits one
        only to merge split_min of its pages or more. Which arrays may have
        them, advise_huge says."""
        if pages and (pages & (pages - 1) or HUGE_ALIGN % (pages * self.res.page_size)):
            raise ValueError(f"a huge page of {pages} pages does not divide {HUGE_ALIGN} bytes")
        if pages and not 1 <= split_min <= pages:
            raise ValueError(f"huge_split_min_pages is 1 to {pages}, not {split_min}")
        self.huge.pages, self.huge.split_min = pages, split_min
        self.tables.spare_huge = pages != 0 and self.tables.has_pagemap_scan

    def huge_counts(self):
        """The huge-page rule's counters: huge pages per block (0: off),
        split since the arena began, kept whole by the last full pass and
        the pages that keeping them left unmerged."""
        return dict(huge_page_pages=self.huge.pages, huge_pages_split=self.huge.split_total,
                    huge_pages_kept=self.huge.last_kept,
                    pages_kept_huge=self.huge.last_kept_pages)

    def advise_huge(self, size_t first, size_t n, bint on):
        """Advise the whole blocks inside pages [first, first + n)
        MADV_HUGEPAGE (on), as numpy advises its big arrays, or
        MADV_NOHUGEPAGE again; the pages they share with other arrays stay
        as they are. The number of blocks advised."""
        cdef size_t blocks
        cdef int err
        self.check_range(first, n)
        if self.huge.pages == 0 and on:
            return 0
        err = advise_blocks(self, first, n, on, &blocks)
        if err:
            raise OSError(err, f"madvise({'MADV_HUGEPAGE' if on else 'MADV_NOHUGEPAGE'}): "
                               f"{os.strerror(err)}")
        return blocks

    def huge_map(self, size_t first, size_t n):
        """One byte a page of [first, first + n): nonzero where a huge page
        maps it (PAGEMAP_SCAN's PAGE_IS_HUGE). OSError without PAGEMAP_SCAN."""
        cdef bytearray out = bytearray(n)
        cdef int err
        self.check_range(first, n)
        if n == 0:
            return bytes(out)
        err = read_huge(&self.tables, first, n, <uint8_t *><char *>out)
        if err:
            raise OSError(err, "PAGEMAP_SCAN cannot tell huge pages here")
        return bytes(out)

    def written_map(self, size_t first, size_t n):
        """One byte a page of [first, first + n): nonzero where the page may
        have been written since the last pass read it, as the write tracking
        tells (read_written); every page without tracking."""
        cdef bytearray out = bytearray(n)
        cdef int err
        self.check_range(first, n)
        if n == 0:
            return bytes(out)
        err = read_written(&self.tables, first, n, <uint8_t *><char *>out)
        if err:
            raise OSError(err, "PAGEMAP_SCAN cannot tell written pages here")
        return bytes(out)

    cdef void note_huge(self, const pass_stats *full, const pass_stats *step) noexcept:
        """After a pass (`step`, NULL if its steps were counted already) or
        the end of a full scan (`full`): the huge-page counters."""
        if step != NULL:
            self.huge.split_total += step.huge_split
        if full != NULL:
            self.huge.last_kept, self.huge.last_kept_pages = full.huge_kept, full.skipped_huge

    cdef check_can_merge(self):
        if self.wb.mode == 0:
            raise RuntimeError("no write barrier chosen: call set_barrier() first")
        if self.merge_refusal is not None:
            raise RuntimeError(self.merge_refusal)

    def set_barrier(self, str mode):
        """Write-protect runs under merge with 'uffd' (userfaultfd) or
        'mprotect' (and a SIGSEGV handler)."""
        cdef int err
        if mode == "uffd":
            err = barrier_use_uffd(&self.wb)
            if err:
                raise OSError(err, "the 'uffd' barrier needs userfaultfd, which this process may "
                                   "not use (it takes CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1"
                                   " and Linux 5.19+)")
        elif mode == "mprotect":
            err = barrier_use_mprotect(&self.wb)
            if err:
                raise OSError(err, "cannot install the SIGSEGV handler of the 'mprotect' barrier")
        else:
            raise ValueError(f"barrier is 'uffd' or 'mprotect', not {mode!r}")

    def set_tracking(self, bint on):
        """Track written pages, if the kernel can (see `tracking`)."""
        if on and not tracking(&self.tables):
            start_tracking(&self.tables)
        elif not on:
            stop_tracking(&self.tables)

    @property
    def tracking(self):
        """Whether written pages are tracked (else every page counts as written)."""
        return tracking(&self.tables)

    @property
    def barrier_name(self):
        return {BARRIER_UFFD: "uffd", BARRIER_MPROTECT: "mprotect"}.get(self.wb.mode, "none")

    def fork_happened(self, bint in_child):
        """After fork, parent and child share the frame store: frames that
        exist now are fenced, and stay as they are for both (neither punches
        or reuses them). The parent goes on writing new frames to its memfds,
        above the fence. The child writes its own to new memfds (a tier from
        the fence up, _fast.pxd), which the parent never sees; if it cannot
        have one, it may not merge (it can still read, write, free, unmerge).
        Called from the at-fork hooks: never raises."""
        cdef int err
        cdef bint shared = self.shm.head != NULL
        if shared:
            self.fork_shared(in_child)
        else:
            frames_fence(&self.store)
        if in_child and not shared:
            self.forked_child = True
            err = push_tier(&self.store)
            if err == 0:
                self.merge_refusal = None
            elif err < 0:
                self.merge_refusal = (
                    f"merging in this forked process is not possible: its frame store already "
                    f"has {MAX_TIERS} tiers of memfds (one for each generation of forked processes that "
                    f"merged), the most it can have, and a child needs one more; it can read, "
                    f"write, free and unmerge")
            else:
                self.merge_refusal = (
                    f"merging in this forked process is not possible: it could not make a "
                    f"memfd of its own for new frames ({os.strerror(err)}); it can read, "
                    f"write, free and unmerge")
        if in_child and tracking(&self.tables):
            # The inherited userfaultfd tracks the parent; the child's pages
            # lost their protection, so all count as written until retracked.
            stop_tracking(&self.tables)
            start_tracking(&self.tables)
        if in_child and self.wb.mode == BARRIER_UFFD and barrier_use_uffd(&self.wb) != 0:
            # The inherited userfaultfd acts on the parent's memory: never
            # use it (set_barrier closes it).
            self.set_barrier("mprotect")

    def unmerge(self, size_t first, size_t n):
        cdef int err
        self.check_range(first, n)
        with nogil:
            err = unmerge_range(self, first, n)
        if err:
            refresh_states(self, first, n)   # learn which pages did break
            raise pass_error(err, "unmerge stopped: the kernel could not give every page its own copy")

    def refresh(self, size_t first, size_t n):
        cdef int err
        self.check_range(first, n)
        with nogil:
            err = refresh_states(self, first, n)
        if err:
            raise OSError(err, "cannot read the page tables")

    def advise_kernel_ksm(self, bint on):
        """Kernel KSM for what merging left private: with `on`, the whole
        reservation MADV_MERGEABLE (one flag over every mapping: no mapping
        is cut), then the pages the user made unmergeable MADV_UNMERGEABLE
        again, a run at a time; else the whole reservation MADV_UNMERGEABLE,
        which gives every page KSM merged its own copy. Kernel KSM ignores
        pages on frames (file pages) and on the zero page."""
        cdef size_t p, first = 0, n = 0, hw = self.res.high_water
        cdef int err = 0
        cdef bint excluded
        with nogil:
            if madvise(self.res.base, self.res.npages * self.res.page_size,
                       MADV_MERGEABLE if on else MADV_UNMERGEABLE) != 0:
                err = errno
            for p in range(hw + 1 if on and err == 0 else 0):
                excluded = (p < hw and self.res.rmap[p].state != PAGE_FREE
                            and self.res.rmap[p].flags & PAGE_UNMERGEABLE != 0)
                if excluded:
                    first = p if n == 0 else first
                    n += 1
                    continue
                if n and madvise(page_address(&self.res, first), n * self.res.page_size,
                                 MADV_UNMERGEABLE) != 0:
                    err = errno
                    break
                n = 0
        if err:
            raise OSError(err, f"cannot mark the arena {'' if on else 'un'}mergeable for kernel KSM")

    def set_unmergeable(self, size_t first, size_t n, bint unmergeable):
        self.check_range(first, n)
        for p in range(first, first + n):
            if unmergeable:
                unstable_tree_erase(self, p)
                self.res.rmap[p].flags |= PAGE_UNMERGEABLE
            elif self.res.rmap[p].flags & PAGE_UNMERGEABLE:
                # Writes to it were not looked at: hash it again.
                self.res.rmap[p].flags &= ~(PAGE_UNMERGEABLE | PAGE_CHECKSUMMED)

    def counts(self, size_t first, size_t n):
        """Pages of [first, first + n) by state, and the pages they save: a
        page on a frame mapped k times saves 1 - 1/k, a ZERO page all of it.
        Call refresh() first for states that are up to date."""
        cdef uint8_t[::1] cats = bytearray(n)
        cdef size_t p, private = 0, resident = 0, merged = 0, zero = 0, unmergeable = 0, used = 0
        cdef double saved = 0
        cdef rmap_item *it
        self.check_range(first, n)
        if n and read_categories(&self.tables, first, n, &cats[0]) != 0:
            raise OSError(errno, "cannot read the page tables")
        for p in range(first, first + n):
            it = &self.res.rmap[p]
            used += it.state != PAGE_FREE
            unmergeable += it.state != PAGE_FREE and it.flags & PAGE_UNMERGEABLE != 0
            if it.state == PAGE_PRIVATE or it.state == PAGE_BROKEN:
                private += 1
                resident += holds_own_memory(cats[p - first])   # not the zero page a read mapped
            elif it.state == PAGE_MERGED:
                merged += 1
                saved += 1.0 - 1.0 / frame_mapcount(&self.store, it.frame)
            elif it.state == PAGE_ZERO:
                zero += 1
                saved += 1.0
        return dict(pages=used, private=private, private_resident=resident, merged=merged,
                    zero=zero, unmergeable=unmergeable, saved_pages=saved)

    def categories(self, size_t first, size_t n):
        """The kernel's PAGE_IS_* categories of each page, as bytes."""
        cdef uint8_t[::1] cats = bytearray(n)
        self.check_range(first, n)
        if n and read_categories(&self.tables, first, n, &cats[0]) != 0:
            raise OSError(errno, "cannot read the page tables")
        return bytes(cats)

    def metadata_bytes(self):
        """Memory the bookkeeping holds: records up to the high water, frame
        slots ever used, stable-tree buckets."""
        return self.res.high_water * sizeof(rmap_item) + frames_metadata_bytes(&self.store)

    @staticmethod
    def record_sizes():
        return dict(rmap_item=sizeof(rmap_item), frame_item=sizeof(frame_item))

    # -- a frame store shared by processes (_shared.pxi) ---------------------------

    cdef open_shared(self, int records_fd, tuple frames_fds, uint32_t zero_checksum):
        """The frame store of the records and frames memfds another member
        passed (pydedup/shared.py); this Core's own copies of them. Joins."""
        cdef int err, fd, i, j
        cdef int ffds[FRAME_STRIPES]
        if len(frames_fds) != FRAME_STRIPES:
            raise ValueError(f"a shared store has {FRAME_STRIPES} frames memfds, not {len(frames_fds)}")
        fd = pd_dup_cloexec(records_fd)
        if fd < 0:
            raise OSError(errno, "cannot take the shared store's records memfd")
        err = shared_map(&self.shm, fd, self.res.page_size)
        if err:
            close(fd)
            raise OSError(err, "the shared store's records are not a store of this pydedup "
                               "(version, page size)" if err == EINVAL else
                               "cannot map the shared store's records")
        err = 0
        for i in range(FRAME_STRIPES):
            ffds[i] = pd_dup_cloexec(frames_fds[i])
            if ffds[i] < 0:
                err = errno
                for j in range(i):
                    close(ffds[j])
                break
        if err == 0:
            err = shared_open(&self.shm, &self.store, ffds, zero_checksum)
        if err == 0:
            with nogil:
                err = shared_join(&self.shm, &self.store)
        if err == EBUSY:
            raise RuntimeError(f"the shared store has {MAX_MEMBERS} living members, the most it takes")
        if err:
            raise OSError(err, "cannot open the shared frame store")

    @staticmethod
    def format_shared(int records_fd):
        """Make an empty memfd the records of a new shared store."""
        cdef int err = shared_format(records_fd, sysconf(_SC_PAGESIZE))
        if err:
            raise OSError(err, "cannot make the shared store's records")

    @staticmethod
    def shared_slots():
        """Frame slots of a shared store."""
        return SHARED_SLOTS

    @staticmethod
    def frame_stripes():
        """The memfds of a tier of the frame store (of a shared store)."""
        return FRAME_STRIPES

    @staticmethod
    def stripe_pages():
        """Consecutive frames in one memfd, before the next memfd's."""
        return STRIPE_PAGES

    @property
    def shared(self):
        """Whether the frame store is shared by processes."""
        return self.shm.head != NULL

    def lock_store(self, bint wait=True):
        """Take the shared store's lock (nothing for a private store): every
        operation on the frame store runs under it (pydedup/pages.py). A
        member that died holding it is repaired for here. Without `wait`:
        False if another holds it."""
        cdef bint held
        if self.shm.head == NULL:
            return True
        with nogil:
            held = shared_lock(&self.shm, &self.store, wait)
        if not held and wait:
            raise OSError(EINVAL, "cannot take the shared frame store's lock")
        return held

    def unlock_store(self):
        with nogil:
            shared_unlock(&self.shm, &self.store)

    def sweep_members(self):
        """Under lock_store(): give back what dead members held."""
        if self.shm.head != NULL and self.shm.locked:
            with nogil:
                shared_sweep(&self.shm, &self.store)

    def shared_counts(self):
        """Under lock_store(): the members' pids (this one first), this
        member's merged pages whose frames other members map too, the
        repairs and lost members so far."""
        cdef shared_header *h = self.shm.head
        cdef size_t p, with_others = 0
        cdef rmap_item *it
        if h == NULL:
            return dict(members=[], pages_with_others=0, repairs=0, members_lost=0)
        for p in range(self.res.high_water):
            it = &self.res.rmap[p]
            if (it.state == PAGE_MERGED and frame_mapcount(&self.store, it.frame)
                    > frames_ledger_count(&self.store, it.frame)):
                with_others += 1
        pids = [h.members[self.shm.slot].pid] if self.shm.slot >= 0 else []
        pids += [h.members[m].pid for m in range(MAX_MEMBERS)
                 if m != self.shm.slot and h.members[m].state == MEMBER_LIVE]
        return dict(members=pids, pages_with_others=with_others, repairs=h.repairs,
                    members_lost=h.members_lost)

    def member_frames(self):
        """Frames this arena's pages map (in a private store: frames_in_use)."""
        cdef uint32_t f, n = 0
        for f in range(self.store.frame_high):
            n += frames_ledger_count(&self.store, f) != 0
        return n

    def fork_prepare(self):
        """Before a fork (the arena's lock held): a member slot for the
        child, with this process's references; -1 for a private store. If
        none can be had, the child copies its merged pages, and the parent
        waits for that after the fork (fork_shared), because the frames
        under them go once the parent frees its own pages."""
        cdef int slot = -1
        if self.shm.head == NULL or self.shm.slot < 0:
            return -1
        self.lock_store()
        slot = shared_fork_prepare(&self.shm, &self.store)
        self.unlock_store()
        self.fork_slot = slot
        if slot < 0:
            try:
                self.fork_handshake = os.pipe2(os.O_CLOEXEC)
            except OSError:
                self.fork_handshake = None
        return slot

    cdef fork_shared(self, bint in_child):
        """A fork of a member: the child is a member too, in the slot
        fork_prepare() filled for it. No fence: the store counts every
        member's references, so no frame is punched while either maps it.
        A child without a slot leaves the store, its merged pages copied
        while its fork lock, or the parent waiting, keeps their frames."""
        cdef bint member = False
        cdef int done, copied
        handshake, self.fork_handshake = self.fork_handshake, None
        if in_child and self.fork_slot >= 0:
            self.forked_child = True
            with nogil:
                member = shared_fork_child(&self.shm, &self.store, self.fork_slot)
        if in_child and not member:
            self.leave_store_unmerged()
        shared_fork_done(&self.shm)
        self.fork_slot = -1
        if handshake is not None:
            done, copied = handshake
            with nogil:
                if in_child:
                    pd_handshake_say(copied)
                    close(copied)
                else:
                    close(copied)       # the child's alone now: its exit or exec closes it
                    pd_handshake_wait(done)
                close(done)

    cdef leave_store_unmerged(self):
        """A forked child the store had no member slot for: its merged pages
        get their own copies, under the store's lock (the frames under them
        go when the parent frees them, which it does under the lock), and
        it no longer uses the store; it cannot merge."""
        cdef size_t p = 0, first, i, hw = self.res.high_water
        cdef bint locked
        self.shm.locked = False             # the parent's state, copied by the fork
        with nogil:
            locked = shared_lock(&self.shm, &self.store)
            while p < hw:
                first = p
                while p < hw and self.res.rmap[p].state == PAGE_MERGED:
                    self.res.rmap[p].state = PAGE_BROKEN
                    p += 1
                if p > first and populate_write(&self.res, first, p - first) != 0:
                    for i in range(first, p):   # each a fault: its copy, or the OOM killer
                        pd_touch_write(page_address(&self.res, i))
                elif p == first:
                    p += 1
            if locked:
                shared_unlock(&self.shm, &self.store)
        self.shm.head, self.shm.slot = NULL, -1     # its mapping stays, unused, till exit
        frames_use_ledger(&self.store, NULL)
        self.merge_refusal = ("merging in this forked process is not possible: the shared "
                              f"store had no member slot for it (of {MAX_MEMBERS}, or none "
                              f"could be kept for it during the fork)")


def userfaultfd_allowed():
    """Whether this process may use userfaultfd write-protect for faults the
    kernel takes too (the 'uffd' barrier)."""
    cdef int fd = open_sync_uffd()
    if fd < 0:
        return False
    close(fd)
    return True
