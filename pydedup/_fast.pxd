# The words of pydedup, and the records its core keeps.
#
# arena page    One page of the arena's reserved virtual range, numbered from 0.
#               Arrays are made of whole, consecutive arena pages.
# frame         One page of the frame store. A frame is written once, before
#               any arena page maps it, and is immutable while one does: arena
#               pages map it MAP_PRIVATE, so a write to such a page makes the
#               kernel copy it (copy-on-write) and the frame stays intact.
# frame store   Where frames live: one memfd, frame f at offset f * page_size;
#               after a fork, possibly several (tiers). Frame numbers still
#               index the one `frames` array of the process.
# tier          One memfd of the frame store, holding frames [first_frame, the
#               next tier's first_frame), each at its own offset f * page_size
#               (the memfd is sparse: the frames below first_frame are holes).
#               A process starts with one tier from frame 0. A forked child
#               keeps the tiers it inherits for the frames that existed at the
#               fork (below its fork fence: shared with the parent, never
#               written, punched or reused) and pushes a tier of its own, a new
#               memfd, from the fence up: the parent keeps writing its memfd
#               above the fence, and neither process ever sees the other's new
#               frames. New frames always go to the top tier.
# rmap item     The record of one arena page (after KSM's rmap_item: 12 bytes
#               here, 64 in the kernel). One per arena page, in address order.
# stable tree   Frames by the checksum of their content, every hit confirmed by
#               memcmp. Lives as long as its frames. (KSM keeps an rbtree keyed
#               by content; a hash index keyed by checksum does the same job.)
# unstable tree During one pass, the private pages seen so far by checksum,
#               chained through their own rmap items, so it costs no memory
#               beyond its bucket heads. Rebuilt on every pass.
# node          A NUMA node. With merge_across_nodes off, each node has a stable
#               and an unstable tree of its own (KSM's): the bucket of a page or
#               frame is found by tree_key(checksum, node), and a match needs the
#               same node, so pages on different nodes never share a frame.
# pass          One walk over every arena page in use (KSM's full scan).
# run           Consecutive arena pages changed by one system call: mapped onto
#               consecutive frames, or sent to the zero page together.
#
# Page states (rmap_item.state), the only transitions being the arrows:
#
#   FREE --adopt--> PRIVATE --merge--> MERGED --written--> BROKEN
#                      |  ^                                  |
#                      |  '--------------written-----.       |
#                      '--merge (all zero)--> ZERO --'       |
#   BROKEN --merge--> MERGED or ZERO;  any state --release--> FREE
#
# PRIVATE and ZERO pages lie in anonymous mappings, MERGED and BROKEN pages in
# MAP_PRIVATE mappings of the frame store. "written" is found by reading the
# page tables (PAGEMAP_SCAN or /proc/self/pagemap), never by faults.
#
# Invariants, outside reclaim_frames():
#   frames[f].mapcount == #{p : rmap[p].state == PAGE_MERGED and rmap[p].frame == f}
#   frames[f].mapcount == 0  <=>  f is not in the stable tree and holds no memory
#   frames_in_use == #{f : frames[f].mapcount > 0}
#   tiers[ntiers - 1].first_frame <= fork_fence <= frame_high: every frame that
#   can be written, punched or reused lies in the top tier
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from pydedup._os cimport pd_xxh3_fn

cdef enum:
    NO_PAGE = 0xFFFFFFFF           # end of an unstable-tree chain
    NO_FRAME = 0xFFFFFFFF          # end of a stable-tree chain, or no frame found

cdef enum page_state:
    PAGE_FREE = 0                  # in no array: anonymous, holds no memory
    PAGE_PRIVATE = 1               # its own content, in an anonymous mapping
    PAGE_ZERO = 2                  # placed on the kernel zero page by pydedup
    PAGE_MERGED = 3                # maps frame rmap_item.frame, copy-on-write
    PAGE_BROKEN = 4                # written since merged: own content, file mapping

cdef enum page_flag:
    PAGE_UNMERGEABLE = 1 << 0      # excluded by the user (arena.unmergeable)
    PAGE_CHECKSUMMED = 1 << 1      # checksum holds the content of the last pass
    PAGE_UNSTABLE = 1 << 2         # in a pass: frame links the unstable chain
    PAGE_TARGET = 1 << 3           # in a pass: will map frame rmap_item.frame
    PAGE_TARGET_ZERO = 1 << 4      # in a pass: will go to the zero page

cdef struct rmap_item:             # 12 bytes, one per arena page
    uint32_t checksum              # low 32 bits of xxh3 of the content
    uint32_t frame                 # MERGED: its frame; in a pass: see flags
    uint8_t state                  # page_state
    uint8_t flags                  # page_flag bits
    uint16_t node                  # NUMA node of its own memory when last hashed

cdef struct frame_item:            # 16 bytes, one per frame slot
    uint32_t checksum              # of its content: the stable-tree key
    uint32_t mapcount              # arena pages mapping it (pass: or to map it)
    uint32_t next                  # next frame of the same stable-tree bucket
    uint16_t node                  # the NUMA node (pool) it was written for
    uint16_t spare                 # room to grow

cdef enum:
    MAX_TIERS = 8                  # memfds of a frame store: one, plus one a fork level

cdef struct frame_tier:            # one memfd of the frame store
    uint32_t first_frame           # frames [first_frame, next tier's first_frame) live here
    int fd                         # the memfd, frame f at offset f * page_size; -1 if none
    char *view                     # read-only shared window on the memfd from frame
                                   # first_frame: frame f at (f - first_frame) * page_size

cdef enum barrier_mode:           # how a run is write-protected while it is merged
    BARRIER_MPROTECT = 1           # mprotect and a SIGSEGV handler that waits
    BARRIER_UFFD = 2               # userfaultfd write-protect: the kernel waits

cdef enum:
    NODE_MASK_WORDS = 16           # longs in a NUMA node mask (PD_MAX_NODES bits)

cdef struct mem_policy:            # a thread's NUMA memory policy, kept to restore
    int mode
    unsigned long mask[NODE_MASK_WORDS]

cdef struct scan_knobs:            # what a scan is asked to do
    bint use_zero_pages
    uint32_t max_page_sharing
    bint merge_volatile            # merge pages that changed since the last scan too

cdef struct pass_stats:            # what one merge pass did
    uint64_t scanned               # pages looked at
    uint64_t hashed                # of those, read and checksummed (written since the last scan)
    uint64_t merged                # pages newly mapped onto frames
    uint64_t zeroed                # pages newly sent to the zero page
    uint64_t frames_new            # frames written this pass
    uint64_t unshared              # unique pages left in the unstable tree
    uint64_t volatile              # pages whose checksum changed since the last pass
    uint64_t skipped_unmergeable   # pages the user excluded
    uint64_t skipped_changed       # pages written between comparison and remap
    uint64_t skipped_budget        # merges the mapping budget refused
    uint64_t skipped_no_memory     # merges refused because a frame could not be written
    uint64_t moved                 # merged pages found on another node than their frame's
    uint64_t syscalls              # mmap and madvise calls made
    long mappings_left             # the mapping budget left at the end
    double refresh_seconds         # reading page tables, noticing writes
    double decide_seconds          # zero tests, checksums, tree searches
    double apply_seconds           # checks under way to the remap, and the remaps

cdef class Core:
    cdef readonly size_t page_size
    cdef char *base                    # first byte of the reservation
    cdef readonly size_t npages        # arena pages reserved
    cdef readonly size_t high_water    # pages [high_water, npages) were never used
    cdef bint remapped                 # mappings were laid inside the reservation since
                                       # it was last one mapping (forget_cuts)
    cdef rmap_item *rmap               # npages records, mapped lazily
    cdef pd_xxh3_fn xxh3
    # the frame store
    cdef frame_tier tiers[MAX_TIERS]   # by first_frame, tiers[0] from frame 0;
    cdef int ntiers                    # new frames go to tiers[ntiers - 1] (`memfd`)
    cdef frame_item *frames            # npages frame slots, mapped lazily
    cdef readonly uint32_t frames_in_use
    cdef readonly uint32_t frame_high  # slots [frame_high, npages) were never used
    cdef uint32_t frame_cursor         # where the next-fit search resumes
    cdef readonly uint32_t fork_fence  # frames below it existed at a fork: shared
                                       # with another process, never punched or reused
    cdef readonly bint forked_child    # this process is a child forked with the arena
    cdef readonly object merge_refusal # why this process may not merge (a forked child
                                       # without a tier of its own), or None
    cdef uint32_t *stable              # stable-tree bucket heads
    cdef uint32_t zero_checksum        # of a page of zeros
    cdef public uint32_t zero_colours  # zero frames are kept apart by page colour
    cdef uint32_t stable_mask          # buckets - 1, a power of two minus one
    cdef uint32_t *orphans             # frames whose mapcount fell to 0, to reclaim
    cdef size_t norphans, orphans_cap
    # the scan in progress (KSM's ksm_scan)
    cdef uint32_t *unstable            # unstable-tree bucket heads; NULL between scans
    cdef uint32_t unstable_mask
    cdef readonly size_t scan_cursor   # the next page the background scan looks at
    cdef uint32_t last_new_frame       # the frame a scan wrote last
    cdef pass_stats scan               # what the background scan in progress did
    cdef int track_uffd                # written-page tracking (_track.pxi), or -1
    # the write barrier
    cdef readonly int barrier          # barrier_mode
    cdef int barrier_uffd              # the userfaultfd of BARRIER_UFFD, or -1
    cdef bint data_limited             # RLIMIT_DATA is finite: runs under mprotect hold room
    cdef readonly uint64_t restored_in_pieces  # runs RLIMIT_DATA kept read-only (_barrier.pxi)
    cdef public bint squeeze_data      # tests: runs under mprotect lose their room meanwhile
    # reading the page tables
    cdef int pagemap_fd
    cdef int pagemap_pid               # the process pagemap_fd belongs to
    cdef readonly bint has_pagemap_scan
    cdef uint64_t zero_pfn             # 0 when pagemap hides frame numbers
    # NUMA nodes (_numa.pxi)
    cdef readonly bint merge_across_nodes  # one pair of trees; else one per node
    cdef readonly int nnodes           # nodes pages may be on (1: no lookups)
    cdef object simulated_nodes        # a writable uint16 map page -> node, or None
    cdef uint16_t *simulated           # its data: nodes come from it, not the kernel
    cdef int policy_node               # the node a pass prefers for new memory, or -1
    cdef mem_policy saved_policy       # the thread's own policy while policy_node >= 0
    # reading the mappings (_maps.pxi)
    cdef int maps_fd                   # /proc/self/maps, for PROCMAP_QUERY; -1 if not open
    cdef int maps_pid                  # the process maps_fd belongs to
    # counters of the last pass, after KSM
    cdef readonly uint64_t full_scans, pages_unshared, pages_volatile

    cdef void check_range(self, size_t first, size_t n) except *
    cdef check_can_merge(self)
