"""What merge(), unmerge() and stats() return. Counters carry KSM's names and
meanings (Documentation/admin-guide/mm/ksm.rst); docs/reference.md lists them."""
from dataclasses import asdict, dataclass, field


class _Readable:
    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self):
        rows = [(name, value) for name, value in self.as_dict().items()]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {_show(name, value)}" for name, value in rows)


def _show(name, value):
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and (name.endswith("bytes") or name.endswith("profit")):
        return f"{value:,} ({value / 2**20:,.1f} MiB)"
    return f"{value:,}" if isinstance(value, int) else str(value)


@dataclass(frozen=True)
class MergeReport(_Readable):
    pages_scanned: int        # pages looked at (in use, mergeable, not merged yet)
    pages_hashed: int         # of those, read: written since the last scan (or untracked)
    pages_merged: int         # pages newly mapped onto a frame
    pages_zeroed: int         # pages newly placed on the kernel zero page
    frames_new: int           # frames written for new shared content
    pages_unshared: int       # unique pages: nothing else holds their content
    pages_volatile: int       # pages that changed since the last pass (merged anyway)
    pages_moved: int          # merged pages whose frame was on another node than the
                              # page's own (merge_across_nodes off): merged again at home
    skipped: dict = field(default_factory=dict)  # pages not merged, by reason
    mappings_left: int = 0    # what the mapping budget had left at the end
    seconds: float = 0.0
    phase_seconds: dict = field(default_factory=dict)  # refresh, decide, apply


@dataclass(frozen=True)
class UnmergeReport(_Readable):
    pages_unmerged: int       # merged and zero pages given their own copy
    seconds: float


@dataclass(frozen=True)
class ArenaStats(_Readable):
    # KSM's counters
    pages_shared: int         # frames in use
    pages_sharing: int        # pages mapping a frame, less one per frame: pages saved
    pages_unshared: int       # unique pages at the last pass
    pages_volatile: int       # pages that changed between the last two passes
    zero_pages: int           # pages pydedup placed on the zero page that still map it
    full_scans: int           # passes made
    general_profit: int       # (pages_sharing + zero_pages) * page size - metadata_bytes
    # the arena's own
    pages_in_use: int         # pages belonging to live arrays
    pages_private: int        # of those, holding their own content (or none yet)
    pages_unmergeable: int    # of those, excluded by unmergeable()
    bytes_reserved: int       # virtual address space reserved
    bytes_in_use: int         # pages_in_use * page size
    frames_in_use: int        # frames some page maps (= pages_shared)
    frame_store_bytes: int    # memory the frame store holds: the memfd this process
                              # writes new frames to (in a forked child, its own;
                              # frames inherited at the fork count in the parent's)
    metadata_bytes: int       # memory the bookkeeping holds
    mappings: int             # kernel mappings (VMAs) the arena's range is cut into
    pss_bytes: int            # PSS of the arena's mappings (/proc/self/smaps)
    bytes_saved: int          # (pages_sharing + zero_pages) * page size
    pss_bytes_saved: int      # measured: what the data would hold unmerged, less
                              # anonymous PSS and the frame store
    barrier: str              # the write barrier in use: 'uffd' or 'mprotect'
    frames_by_node: dict      # {NUMA node: frames in use written on it}


@dataclass(frozen=True)
class ArrayStats(_Readable):
    pages: int                # pages the array's memory spans
    pages_private: int
    pages_merged: int         # pages mapping a frame
    zero_pages: int           # pages on the zero page placed by pydedup
    pages_unmergeable: int
    bytes_saved: int          # zero pages, plus 1 - 1/k of a page for each
                              # page on a frame that k pages map
