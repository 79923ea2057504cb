# The words of pydedup, and the records its core keeps.
#
# arena page    One page of the arena's reserved virtual range, numbered from 0.
#               Arrays are made of whole, consecutive arena pages.
# frame         One page of the frame store. A frame is written once, before
#               any arena page maps it, and is immutable while one does: arena
#               pages map it MAP_PRIVATE, so a write to such a page makes the
#               kernel copy it (copy-on-write) and the frame stays intact.
# frame store   Where frames live: memfds; after a fork, several tiers of them.
#               Frame numbers still index the one `frames` array of the process.
# tier          The memfds of the frame store holding frames [first_frame, the
#               next tier's first_frame), striped: FRAME_STRIPES memfds,
#               STRIPE_PAGES consecutive frames to each in turn (so that threads
#               write new frames side by side), each memfd holding its stripes
#               one after the other: frame f at page file_page(f) of memfd
#               stripe_of(f) (sparse: the frames below first_frame are holes).
#               A process starts with one tier from frame 0. A forked child
#               keeps the tiers it inherits for the frames that existed at the
#               fork (below its fork fence: shared with the parent, never
#               written, punched or reused) and pushes a tier of its own, new
#               memfds, from the fence up: the parent keeps writing its memfds
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
# tile          Consecutive frames that each hold one content (frame_item.tile_index
#               0, 1, 2, ...: its place in the tile). A run of arena pages of that
#               content maps onto the tile page by page, starting again at its
#               first frame every tile_pages pages: L pages cost about
#               L / tile_pages mappings instead of L. A tile grows a frame at a
#               time, as runs reach its end; its frames are frames like any other.
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
#
# The parts of the core, in include order (_fast.pyx), after mm/ksm.c's
# records. Each owns its record and the invariants on it; the parts after it
# call its functions (declared in its .pxd), never the record's fields, and
# never a part included after them (tests/test_core_source.py):
#
#   base         _base        the reservation (Core.res): page addresses,
#                             anonymous maps, populate-write, the clock
#   nodes        _numa        node_map: which NUMA node a page is on, and the
#                             thread's memory policy while a pass writes frames
#   frame store  _frames      frame_store (KSM's stable nodes): the tiers of
#                             memfds, the frame table, the stable tree, orphans
#                             and reclaim, the fork fence. Plain C, no Python
#                             object, every address and fd inside: ready to
#                             live in memory shared by processes
#   shared       _shared      shared_store: a frame store shared by processes,
#                             its records' memfd, the robust lock, the members
#   page tables  _pagemap,    page_tables: pagemap / PAGEMAP_SCAN, PROCMAP_QUERY,
#                _maps,       the tracking userfaultfd; every /proc descriptor
#                _track       reopened after a fork in one place
#   barrier      _barrier     write_barrier: how a run is write-protected while
#                             it is compared and remapped
#   remap        _remap       applying a pass's targets in runs (no record)
#   budget       _budget      spending the mapping budget on whole contents,
#                             between deciding targets and applying them (no record)
#   hash         _hash        page_hashes: zero tests and checksums of a chunk
#                             of pages made ahead, on several threads
#   scan         _scan        scan_state (KSM's ksm_scan): the unstable tree,
#                             the cursor, the last new frame, the pass's stats
#   Core         _core        the Python face: the reservation, holding the parts
#   Block        _block       the buffer arrays are made on; PageOwner
#   checks       _check       the invariant checker
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

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
    uint32_t checksum              # low 32 bits of the content's checksum (_checksum.h)
    uint32_t frame                 # MERGED: its frame; in a pass: see flags
    uint8_t state                  # page_state
    uint8_t flags                  # page_flag bits
    uint16_t node                  # NUMA node of its own memory when last hashed

cdef struct frame_item:            # 16 bytes, one per frame slot
    uint32_t checksum              # of its content: the stable-tree key
    uint32_t mapcount              # arena pages mapping it (pass: or to map it)
    uint32_t next                  # next frame of the same stable-tree bucket
    uint16_t node                  # the NUMA node (pool) it was written for
    uint16_t tile_index            # its place in its tile: frame f - tile_index is
                                   # the tile's first; 0 for a frame of no tile

cdef struct scan_knobs:            # what a scan is asked to do
    bint use_zero_pages
    uint32_t max_page_sharing
    bint merge_volatile            # merge pages that changed since the last scan too
    uint32_t tile_pages            # the longest tile (1: no tiles)
    uint32_t threads               # threads that read pages (_hash.pxi); 1: the caller's only
    bint whole_contents            # kernel KSM takes what the mapping budget leaves: a
                                   # content it cannot finish stays wholly private (_budget.pxi)

cdef struct pass_stats:            # what one merge pass did
    uint64_t scanned               # pages looked at
    uint64_t hashed                # of those, read and checksummed (written since the last scan)
    uint64_t merged                # pages newly mapped onto frames
    uint64_t zeroed                # pages newly sent to the zero page
    uint64_t frames_new            # frames written this pass
    uint64_t tile_frames_new       # of those, frames that grew a tile
    uint64_t frames_new_on_helpers  # of those, frames the helper threads wrote
    uint64_t unshared              # unique pages left in the unstable tree
    uint64_t volatile              # pages whose checksum changed since the last pass
    uint64_t skipped_unmergeable   # pages the user excluded
    uint64_t skipped_changed       # pages written between comparison and remap
    uint64_t unwritten             # pages of held runs not compared again: unwritten since read
    uint64_t skipped_budget        # merges the mapping budget refused
    uint64_t skipped_no_memory     # merges refused because a frame could not be written
    uint64_t moved                 # merged pages found on another node than their frame's
    uint64_t syscalls              # mmap and madvise calls made
    uint64_t protections           # write protections the barrier took (_remap.pxi merge_runs)
    uint64_t skipped_huge          # pages left unmerged to keep their huge page whole
    uint64_t huge_kept             # huge pages kept whole although some of their pages matched
    uint64_t huge_split            # huge pages split: their matching pages reached split_min
    long mappings_left             # the mapping budget left at the end
    double refresh_seconds         # reading page tables, noticing writes
    double decide_seconds          # zero tests, checksums, tree searches
    double apply_seconds           # checks under way to the remap, and the remaps
    uint32_t threads               # threads the pass read pages with
    double refresh_cpu_seconds     # CPU time of each phase, every thread's
    double decide_cpu_seconds
    double apply_cpu_seconds
    double helper_cpu_seconds      # of those, the threads' other than the caller's
    uint64_t contents_left         # contents the mapping budget could not merge whole (_budget.pxi)

cdef class Core                    # below, once the records of its parts are known

# The parts, in include order: each .pxd holds a part's record and the
# prototypes of the functions the parts after it may call.
include "_base.pxd"
include "_numa.pxd"
include "_frames.pxd"
include "_shared.pxd"
include "_pagemap.pxd"
include "_barrier.pxd"
include "_remap.pxd"
include "_huge.pxd"
include "_budget.pxd"
include "_hash.pxd"
include "_scan.pxd"


cdef class Core:
    cdef reservation res               # the arena's pages and their rmap items (_base)
    cdef node_map nodes                # NUMA nodes (_numa)
    cdef frame_store store             # the frame store (_frames)
    cdef shared_store shm              # the store's records, if shared by processes (_shared)
    cdef page_tables tables            # reading the page tables (_pagemap, _maps, _track)
    cdef write_barrier wb              # the write barrier (_barrier)
    cdef scan_state scan               # the scan in progress (_scan)
    cdef huge_policy huge              # transparent huge pages (_huge)
    cdef readonly bint forked_child    # this process is a child forked with the arena
    cdef readonly object merge_refusal  # why this process may not merge (a forked
                                        # child without a tier of its own), or None
    cdef int fork_slot                 # the member slot fork_prepare() took for the child
    cdef object fork_handshake         # (read, write) pipe: a child without a slot copies
                                       # its merged pages before the parent may free them
    cdef object simulated_nodes        # the writable uint16 buffer nodes.simulated is, or None
    # counters of the last pass, after KSM
    cdef readonly uint64_t full_scans, pages_unshared, pages_volatile

    cdef void check_range(self, size_t first, size_t n) except *
    cdef check_can_merge(self)
    cdef void note_huge(self, const pass_stats *full, const pass_stats *step) noexcept
    cdef open_shared(self, int records_fd, tuple frames_fds, uint32_t zero_checksum)
    cdef fork_shared(self, bint in_child)
    cdef leave_store_unmerged(self)


cdef class PageOwner:
    """The page allocator (pydedup/pages.py) as the core and numpy's handler
    see it: a typed interface, so nothing below calls up into Python by a
    method's name. Pages subclasses it."""
    cpdef object take_pages(self, size_t npages)
    cpdef bint take_at(self, size_t first, size_t npages)
    cpdef give_back(self, size_t first, size_t npages)
