# The Core: the arena's reservation, its rmap items and its frame store, and
# the operations pydedup/pages.py calls, each under the arena's lock.
import os

cdef void *map_lazily(size_t length) noexcept nogil:
    """Zero-filled memory that costs nothing until touched."""
    return mmap(NULL, length, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)


cdef uint32_t zero_page_checksum(Core c) except? 0:
    cdef void *zeros = calloc(1, c.page_size)
    if zeros == NULL:
        raise MemoryError()
    checksum = <uint32_t>c.xxh3(zeros, c.page_size)
    free(zeros)
    return checksum


cdef class Core:
    """The arena's pages and frames. `npages` pages of virtual memory are
    reserved at once; records and frames only cost memory once used."""

    def __cinit__(self, size_t npages, size_t xxh3_address):
        self.tiers[0] = frame_tier(0, -1, <char *>MAP_FAILED)
        self.ntiers = 1
        self.pagemap_fd = -1
        self.maps_fd = -1
        self.barrier_uffd = -1
        self.track_uffd = -1
        self.base = <char *>MAP_FAILED
        self.rmap = <rmap_item *>MAP_FAILED
        self.frames = <frame_item *>MAP_FAILED
        if npages == 0 or npages >= NO_PAGE:
            raise ValueError(f"an arena holds 1 to {NO_PAGE - 1} pages, not {npages}")
        self.page_size = sysconf(_SC_PAGESIZE)
        self.zero_colours = 1
        self.merge_across_nodes = True
        self.nnodes = 1
        self.policy_node = -1
        self.npages = npages
        self.xxh3 = <pd_xxh3_fn>xxh3_address
        self.base = <char *>map_lazily(npages * self.page_size)
        self.rmap = <rmap_item *>map_lazily(npages * sizeof(rmap_item))
        self.frames = <frame_item *>map_lazily(npages * sizeof(frame_item))
        if MAP_FAILED in (<void *>self.base, <void *>self.rmap, <void *>self.frames):
            raise MemoryError(f"cannot reserve {npages} pages of address space")
        madvise(self.base, npages * self.page_size, MADV_NOHUGEPAGE)  # a merge would split a huge page
        self.tiers[0].fd = pd_memfd_create(b"pydedup-frames")
        if self.tiers[0].fd < 0 or ftruncate(self.tiers[0].fd, <long>(npages * self.page_size)) != 0:
            raise OSError(errno, "cannot create the frame store (memfd_create)")
        self.tiers[0].view = <char *>mmap(NULL, npages * self.page_size, PROT_READ,
                                          MAP_SHARED | MAP_NORESERVE, self.tiers[0].fd, 0)
        if <void *>self.tiers[0].view == MAP_FAILED:
            raise MemoryError("cannot map the frame store")
        self.stable_mask = 15
        self.stable = <uint32_t *>malloc(16 * sizeof(uint32_t))
        self.orphans_cap = 64
        self.orphans = <uint32_t *>malloc(self.orphans_cap * sizeof(uint32_t))
        if self.stable == NULL or self.orphans == NULL:
            raise MemoryError()
        memset(self.stable, 0xFF, 16 * sizeof(uint32_t))
        self.zero_checksum = zero_page_checksum(self)
        probe_page_tables(self)
        start_tracking(self)

    def __dealloc__(self):
        cdef size_t ps = self.page_size
        cdef int t
        if <void *>self.base != MAP_FAILED:
            munmap(self.base, self.npages * ps)
        for t in range(self.ntiers):
            close_tier(self, &self.tiers[t])
        if <void *>self.rmap != MAP_FAILED:
            munmap(self.rmap, self.npages * sizeof(rmap_item))
        if <void *>self.frames != MAP_FAILED:
            munmap(self.frames, self.npages * sizeof(frame_item))
        for fd in (self.pagemap_fd, self.maps_fd, self.barrier_uffd, self.track_uffd):
            if fd >= 0:
                close(fd)
        free(self.stable)
        free(self.orphans)
        free(self.unstable)

    @property
    def base_address(self):
        return <size_t>self.base

    @property
    def memfd(self):
        """The memfd new frames go to (the top tier's). In a forked child it
        is the child's own: the frames it inherited live in its parent's
        memfd(s), shared with the parent, and are not in this one."""
        return self.tiers[self.ntiers - 1].fd

    # -- NUMA nodes (_numa.pxi) ------------------------------------------------

    def set_merge_across_nodes(self, bint value):
        """KSM's merge_across_nodes. It decides which tree each frame is in,
        so it changes only while no page is merged (KSM answers EBUSY)."""
        cdef pass_stats dropped
        if value == self.merge_across_nodes:
            return
        if self.frames_in_use:
            raise RuntimeError(
                f"merge_across_nodes cannot change while pages are merged ({self.frames_in_use} "
                f"frames in use; KSM answers EBUSY): unmerge() first")
        if self.unstable != NULL:       # a background scan keyed its tree the old way
            end_scan(self, &dropped)
        self.merge_across_nodes = value

    def set_nodes(self, int nnodes):
        """How many nodes pages may be on; with one, nodes are never looked up."""
        self.nnodes = max(nnodes, 1)

    def simulate_nodes(self, nodes):
        """Take each page's node from `nodes`, a writable uint16 buffer with
        one entry a page, instead of the kernel: the per-node logic, tested on
        a machine of one node. Frames are then on the node they were written
        for. None: ask the kernel again."""
        cdef uint16_t[::1] view
        if nodes is None:
            self.simulated, self.simulated_nodes = NULL, None
            return
        view = nodes
        if <size_t>view.shape[0] != self.npages:
            raise ValueError(f"a node map needs one entry per page ({self.npages}), not {view.shape[0]}")
        self.simulated, self.simulated_nodes = &view[0], nodes

    @property
    def simulating(self):
        """Whether pages' nodes come from a simulated map (simulate_nodes)."""
        return self.simulated != NULL

    def place(self, size_t first, size_t n, tuple nodes):
        """Memory of pages [first, first + n) from `nodes`: one node, several
        (interleaved page by page), or () for the kernel's default (the node
        of the CPU that first writes a page)."""
        cdef unsigned long mask[NODE_MASK_WORDS]
        cdef int mode = PD_MPOL_DEFAULT if not nodes else PD_MPOL_PREFERRED if len(nodes) == 1 else PD_MPOL_INTERLEAVE
        self.check_range(first, n)
        if self.simulated != NULL:
            for i in range(n):
                self.simulated[first + i] = nodes[i % len(nodes)] if nodes else 0
            return
        memset(mask, 0, sizeof(mask))
        for node in nodes:
            mask[node // 64] |= 1UL << (node % 64)
        if n and pd_mbind(page_address(self, first), n * self.page_size, mode,
                          mask if nodes else NULL) != 0:
            raise OSError(errno, f"cannot place pages on NUMA nodes {list(nodes)} (mbind)")

    def frames_by_node(self):
        """{node: frames in use written for it}."""
        counts = {}
        for f in range(self.frame_high):
            if self.frames[f].mapcount:
                counts[self.frames[f].node] = counts.get(self.frames[f].node, 0) + 1
        return counts

    @property
    def has_procmap_query(self):
        """Whether the kernel shows mappings by address (PROCMAP_QUERY, Linux
        6.11), which lets a spent mapping budget still pay for remaps that
        add no mapping."""
        cdef mapping m
        return find_mapping(self, <uint64_t>self.base, &m) == 0

    @property
    def frame_store_tiers(self):
        """The tiers of the frame store, bottom first, as (first_frame, memfd)."""
        return [(self.tiers[t].first_frame, self.tiers[t].fd) for t in range(self.ntiers)]

    cdef void check_range(self, size_t first, size_t n) except *:
        if first > self.npages or n > self.npages - first:
            raise IndexError(f"pages [{first}, {first + n}) are outside the arena's {self.npages}")

    def adopt(self, size_t first, size_t n):
        """Pages of a new array: FREE (zero-filled) to PRIVATE."""
        self.check_range(first, n)
        for p in range(first, first + n):
            self.rmap[p] = rmap_item(0, 0, PAGE_PRIVATE, 0, 0)
        self.high_water = max(self.high_water, first + n)

    def release(self, size_t first, size_t n):
        """Pages of a dead array back to FREE: zero-filled and holding no
        memory. False if the kernel refused to remap them (mapping limit)."""
        cdef bint in_frame_store = False
        cdef int err
        self.check_range(first, n)
        for p in range(first, first + n):
            in_frame_store |= self.rmap[p].state in (PAGE_MERGED, PAGE_BROKEN)
        with nogil:
            if in_frame_store:
                err = map_anonymous(self, page_address(self, first), n * self.page_size)
                if err == 0:
                    self.remapped = True
                    track_range(self, page_address(self, first), n * self.page_size)
            else:
                err = errno if madvise(page_address(self, first), n * self.page_size, MADV_DONTNEED) else 0
            if err == 0:
                for p in range(first, first + n):
                    unstable_tree_erase(self, p)
                    if self.rmap[p].state == PAGE_MERGED:
                        frame_put(self, self.rmap[p].frame)
                    self.rmap[p] = rmap_item(0, 0, PAGE_FREE, 0, 0)
                reclaim_frames(self)
        return err == 0

    def forget_cuts(self):
        """Once every page is FREE: the reservation as one fresh anonymous
        mapping again. Remaps cut it into mappings that freeing does not join
        again, since the kernel joins anonymous neighbours only if their
        anon_vmas agree; a mapping laid over all of them does. Nothing to do
        if nothing was remapped; if the kernel refuses (the mapping limit),
        it is tried again at the next release."""
        cdef int err = 0
        if not self.remapped:
            return
        with nogil:
            err = map_anonymous(self, self.base, self.npages * self.page_size)
            if err == 0:
                self.remapped = False
                track_range(self, self.base, self.npages * self.page_size)

    def merge(self, bint use_zero_pages, uint32_t max_page_sharing, long mappings_left):
        """One whole scan, now; returns what it did as a dict of pass_stats."""
        cdef pass_stats st
        cdef scan_knobs k = scan_knobs(use_zero_pages, max_page_sharing, True)
        cdef int err
        self.check_can_merge()
        memset(&st, 0, sizeof(st))
        st.mappings_left = mappings_left
        with nogil:
            err = merge_pass(self, &k, &st)
        if err:
            raise OSError(err, "merge pass failed")
        self.full_scans += 1
        self.pages_unshared = st.unshared
        self.pages_volatile = st.volatile
        return st

    def scan_batch(self, size_t npages, bint use_zero_pages, uint32_t max_page_sharing,
                   long mappings_left):
        """The background scanner's step: the next npages of the scan in
        progress. mappings_left is the mapping budget of a scan, taken when
        one begins (at scan_cursor 0). Returns (this step's pass_stats,
        whether a scan ended)."""
        cdef pass_stats before = self.scan
        cdef scan_knobs k = scan_knobs(use_zero_pages, max_page_sharing, False)
        cdef bint scan_done = False
        cdef int err
        self.check_can_merge()
        if self.unstable == NULL:
            self.scan.mappings_left = mappings_left
        with nogil:
            err = scan_batch(self, npages, &k, &self.scan, &scan_done)
        step = {key: value - before.get(key, 0) if not key.endswith("left") else value
                for key, value in (<dict>self.scan).items()}
        if scan_done:
            self.full_scans += 1
            self.pages_unshared = self.scan.unshared
            self.pages_volatile = self.scan.volatile
            memset(&self.scan, 0, sizeof(self.scan))
        if err:
            raise OSError(err, "background scan failed")
        return step, scan_done

    cdef check_can_merge(self):
        if self.barrier == 0:
            raise RuntimeError("no write barrier chosen: call set_barrier() first")
        if self.merge_refusal is not None:
            raise RuntimeError(self.merge_refusal)

    def set_barrier(self, str mode):
        """Write-protect runs under merge with 'uffd' (userfaultfd) or
        'mprotect' (and a SIGSEGV handler)."""
        cdef int err
        if mode == "uffd":
            err = open_barrier_uffd(self)
            if err:
                raise OSError(err, "the 'uffd' barrier needs userfaultfd, which this process may "
                                   "not use (it takes CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1"
                                   " and Linux 5.19+)")
            self.barrier = BARRIER_UFFD
        elif mode == "mprotect":
            err = pd_barrier_install()
            if err:
                raise OSError(err, "cannot install the SIGSEGV handler of the 'mprotect' barrier")
            self.barrier = BARRIER_MPROTECT
            if self.barrier_uffd >= 0:
                close(self.barrier_uffd)
                self.barrier_uffd = -1
        else:
            raise ValueError(f"barrier is 'uffd' or 'mprotect', not {mode!r}")

    def set_tracking(self, bint on):
        """Track written pages, if the kernel can (see `tracking`)."""
        if on and self.track_uffd < 0:
            start_tracking(self)
        elif not on:
            stop_tracking(self)

    @property
    def tracking(self):
        """Whether written pages are tracked (else every page counts as written)."""
        return self.track_uffd >= 0

    @property
    def barrier_name(self):
        return {BARRIER_UFFD: "uffd", BARRIER_MPROTECT: "mprotect"}.get(self.barrier, "none")

    def fork_happened(self, bint in_child):
        """After fork, parent and child share the frame store: frames that
        exist now are fenced, and stay as they are for both (neither punches
        or reuses them). The parent goes on writing new frames to its memfd,
        above the fence. The child writes its own to a new memfd (a tier from
        the fence up, _fast.pxd), which the parent never sees; if it cannot
        have one, it may not merge (it can still read, write, free, unmerge).
        Called from the at-fork hooks: never raises."""
        cdef int err
        self.fork_fence = max(self.fork_fence, self.frame_high)
        if in_child:
            self.forked_child = True
            err = push_tier(self)
            if err == 0:
                self.merge_refusal = None
            elif err < 0:
                self.merge_refusal = (
                    f"merging in this forked process is not possible: its frame store already "
                    f"has {MAX_TIERS} memfds (one for each generation of forked processes that "
                    f"merged), the most it can have, and a child needs one more; it can read, "
                    f"write, free and unmerge")
            else:
                self.merge_refusal = (
                    f"merging in this forked process is not possible: it could not make a "
                    f"memfd of its own for new frames ({os.strerror(err)}); it can read, "
                    f"write, free and unmerge")
        if in_child and self.track_uffd >= 0:
            # The inherited userfaultfd tracks the parent; the child's pages
            # lost their protection, so all count as written until retracked.
            stop_tracking(self)
            start_tracking(self)
        if in_child and self.barrier == BARRIER_UFFD and open_barrier_uffd(self) != 0:
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
            raise OSError(err, "unmerge stopped: the kernel could not give every page its own copy")

    def refresh(self, size_t first, size_t n):
        cdef int err
        self.check_range(first, n)
        with nogil:
            err = refresh_states(self, first, n)
        if err:
            raise OSError(err, "cannot read the page tables")

    def set_unmergeable(self, size_t first, size_t n, bint unmergeable):
        self.check_range(first, n)
        for p in range(first, first + n):
            if unmergeable:
                unstable_tree_erase(self, p)
                self.rmap[p].flags |= PAGE_UNMERGEABLE
            elif self.rmap[p].flags & PAGE_UNMERGEABLE:
                # Writes to it were not looked at: hash it again.
                self.rmap[p].flags &= ~(PAGE_UNMERGEABLE | PAGE_CHECKSUMMED)

    def counts(self, size_t first, size_t n):
        """Pages of [first, first + n) by state, and the pages they save: a
        page on a frame mapped k times saves 1 - 1/k, a ZERO page all of it.
        Call refresh() first for states that are up to date."""
        cdef uint8_t[::1] cats = bytearray(n)
        cdef size_t p, private = 0, resident = 0, merged = 0, zero = 0, unmergeable = 0, used = 0
        cdef double saved = 0
        cdef rmap_item *it
        self.check_range(first, n)
        if n and read_categories(self, first, n, &cats[0]) != 0:
            raise OSError(errno, "cannot read the page tables")
        for p in range(first, first + n):
            it = &self.rmap[p]
            used += it.state != PAGE_FREE
            unmergeable += it.state != PAGE_FREE and it.flags & PAGE_UNMERGEABLE != 0
            if it.state == PAGE_PRIVATE or it.state == PAGE_BROKEN:
                private += 1
                resident += holds_own_memory(cats[p - first])   # not the zero page a read mapped
            elif it.state == PAGE_MERGED:
                merged += 1
                saved += 1.0 - 1.0 / self.frames[it.frame].mapcount
            elif it.state == PAGE_ZERO:
                zero += 1
                saved += 1.0
        return dict(pages=used, private=private, private_resident=resident, merged=merged,
                    zero=zero, unmergeable=unmergeable, saved_pages=saved)

    def categories(self, size_t first, size_t n):
        """The kernel's PAGE_IS_* categories of each page, as bytes."""
        cdef uint8_t[::1] cats = bytearray(n)
        self.check_range(first, n)
        if n and read_categories(self, first, n, &cats[0]) != 0:
            raise OSError(errno, "cannot read the page tables")
        return bytes(cats)

    def metadata_bytes(self):
        """Memory the bookkeeping holds: records up to the high water, frame
        slots ever used, stable-tree buckets."""
        return (self.high_water * sizeof(rmap_item) + self.frame_high * sizeof(frame_item)
                + (self.stable_mask + 1) * sizeof(uint32_t) + self.orphans_cap * sizeof(uint32_t))

    @staticmethod
    def record_sizes():
        return dict(rmap_item=sizeof(rmap_item), frame_item=sizeof(frame_item))


def userfaultfd_allowed():
    """Whether this process may use userfaultfd write-protect for faults the
    kernel takes too (the 'uffd' barrier)."""
    cdef int fd = open_sync_uffd()
    if fd < 0:
        return False
    close(fd)
    return True
