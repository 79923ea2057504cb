"""What merge(), unmerge() and stats() return: every counter in one table.

As KNOBS is the one table of knobs, the records below are the one table of
counters. Each counter is a field declared once, with its KSM name (if it
mirrors one of Documentation/admin-guide/mm/ksm.rst), the line that
documents it and how its value is made from the readings the arena takes
(the core's counts and counters, /proc). The records, their values, the
published JSON (publish.py), `pydedup stats` and the counter tables of
docs/reference.md all come from these declarations, so adding a counter
touches this file only (and the core, if it needs a new reading).
`COUNTERS` lists them. tests/test_docs.py fails when the reference's
tables differ from them; `PYDEDUP_WRITE_REFERENCE=1 pytest tests/test_docs.py`
rewrites the tables.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, NamedTuple, TypeVar

Readings = Mapping[str, Any]
"""What a record is made from: the core's counts and counters, by name."""


def counter(doc: str, *, ksm: str = "", value: Callable[[Readings], Any] | None = None,
            ) -> dict[str, Any]:
    """A counter's entry in the table: the metadata of its dataclass field."""
    return {"doc": doc, "ksm": ksm, "value": value}


def _reading(name: str) -> Callable[[Readings], Any]:
    return lambda r: r[name]


def _per_phase(reading: str) -> Callable[[Readings], dict[str, float]]:
    """{phase: r["<phase>_<reading>"]} for the three phases of a pass."""
    return lambda r: {phase: round(r[f"{phase}_{reading}"], 6) for phase in ("refresh", "decide", "apply")}


class _Readable:
    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass

    def __str__(self) -> str:
        rows = list(self.as_dict().items())
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {_show(name, value)}" for name, value in rows)


def _show(name: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and (name.endswith("bytes") or name.endswith("profit")):
        return f"{value:,} ({value / 2**20:,.1f} MiB)"
    return f"{value:,}" if isinstance(value, int) else str(value)


R = TypeVar("R", bound=_Readable)


def _made_from(record: type[R], readings: Readings, partial: bool = False) -> R:
    """A record whose every counter is computed from `readings` by its entry;
    with `partial`, a counter whose readings are missing is None."""
    values: dict[str, Any] = {}
    for f in fields(record):  # type: ignore[arg-type]  # every record is a dataclass
        try:
            values[f.name] = (f.metadata["value"] or _reading(f.name))(readings)
        except KeyError:
            if not partial:
                raise
            values[f.name] = None
    return record(**values)


@dataclass(frozen=True)
class MergeReport(_Readable):
    """One merge(): what the pass did. Made from the core's pass statistics."""

    pages_scanned: int = field(metadata=counter(
        "pages holding memory, mergeable and not merged, looked at", value=_reading("scanned")))
    pages_hashed: int = field(metadata=counter(
        "of those, the pages read: written since the last scan, or all without tracking",
        value=_reading("hashed")))
    pages_merged: int = field(metadata=counter(
        "pages newly mapped onto a frame", value=_reading("merged")))
    pages_zeroed: int = field(metadata=counter(
        "pages newly placed on the kernel zero page", value=_reading("zeroed")))
    frames_new: int = field(metadata=counter(
        "frames written for new shared content", value=_reading("frames_new")))
    tile_frames_new: int = field(metadata=counter(
        "of those, frames that grew a tile (`tile_pages`)", value=_reading("tile_frames_new")))
    frames_new_on_helpers: int = field(metadata=counter(
        "of those, frames the helper threads wrote (`threads` > 1): runs of new frames go to "
        "them once 16 or more long"))
    pages_unshared: int = field(metadata=counter(
        "unique pages: nothing else holds their content", ksm="pages_unshared",
        value=_reading("unshared")))
    pages_volatile: int = field(metadata=counter(
        "pages that changed since the last pass (merged anyway)", ksm="pages_volatile",
        value=_reading("volatile")))
    pages_unwritten: int = field(metadata=counter(
        "pages merged or zeroed without being read again under the barrier: the write "
        "tracking showed them unwritten since the pass read them (the `mprotect` barrier "
        "with `track_writes`; the `uffd` barrier takes the tracking over)",
        value=_reading("unwritten")))
    pages_moved: int = field(metadata=counter(
        "merged pages whose frame was on another node than their own, with "
        "`merge_across_nodes` off: merged again on their node", value=_reading("moved")))
    skipped: dict[str, int] = field(metadata=counter(
        "pages not merged, by reason: `unmergeable`; `changed`: written between the "
        "comparison and the remap; `mapping_budget`; `no_memory`: the frame store or the "
        "kernel refused, or, with the `mprotect` barrier, `RLIMIT_DATA` had no room for a "
        "run to hold while it was read-only; `huge_page`: left to keep their huge page "
        "whole (fewer than `huge_split_min_pages` of its pages matched)",
        value=lambda r: {reason: r[f"skipped_{key}"] for reason, key in (
            ("unmergeable", "unmergeable"), ("changed", "changed"),
            ("mapping_budget", "budget"), ("no_memory", "no_memory"), ("huge_page", "huge"))}))
    contents_left: int = field(metadata=counter(
        "contents (pages of one content) the mapping budget could not merge whole: with "
        "kernel KSM taking what is left (`kernel_ksm` on, ksmd running) none of their pages "
        "is merged, so the kernel merges them all into one page; their pages are in "
        "`skipped.mapping_budget`"))
    huge_pages_kept: int = field(metadata=counter(
        "huge pages kept whole although some of their pages matched (`huge_split_min_pages`)",
        value=_reading("huge_kept")))
    huge_pages_split: int = field(metadata=counter(
        "huge pages split to merge at least `huge_split_min_pages` of their pages (one all "
        "of whose pages matched went whole and is not counted)", value=_reading("huge_split")))
    mappings_left: int = field(metadata=counter(
        "what the mapping budget had left at the end", value=_reading("mappings_left")))
    protections: int = field(metadata=counter(
        "write protections the barrier took before comparing pages again and remapping "
        "them: one a run, or, with the `uffd` barrier, one for neighbouring runs together "
        "(each costs system calls that split and join mappings)"))
    seconds: float = field(metadata=counter(
        "wall time of the merge()'s pass (not the counters it then publishes for `pydedup "
        "stats`)"))
    phase_seconds: dict[str, float] = field(metadata=counter(
        "seconds of each phase: `refresh`, `decide`, `apply`", value=_per_phase("seconds")))
    threads: int = field(metadata=counter(
        "threads that read pages (zero tests, checksums) and write new frames: the "
        "`threads` knob"))
    phase_cpu_seconds: dict[str, float] = field(metadata=counter(
        "CPU seconds of each phase, every thread's: `refresh`, `decide`, `apply`",
        value=_per_phase("cpu_seconds")))
    helper_cpu_seconds: float = field(metadata=counter(
        "of `phase_cpu_seconds`, the CPU seconds of the threads other than the caller's"))

    @classmethod
    def made_from(cls, readings: Readings) -> MergeReport:
        return _made_from(cls, readings)


@dataclass(frozen=True)
class UnmergeReport(_Readable):
    """One unmerge()."""

    pages_unmerged: int = field(metadata=counter("merged and zero pages given their own copy"))
    seconds: float = field(metadata=counter("wall time of the unmerge()"))

    @classmethod
    def made_from(cls, readings: Readings) -> UnmergeReport:
        return _made_from(cls, readings)


def _sharing(r: Readings) -> int:
    return int(r["merged"] - r["frames"])


def _saved(r: Readings) -> int:
    return int((_sharing(r) + r["zero"]) * r["page_size"])


MAPPING_BYTES = 250
"""The kernel memory one mapping costs, an estimate measured on Linux 6.x
x86-64 (issue 15): its vm_area_struct (157 bytes of slab), about 24 of
maple tree nodes, and the rest (anon_vma_chain, file rmap)."""


def _mappings_added(r: Readings) -> int:
    return max(int(r["mappings"]) - 1, 0)


def _mapping_bytes(r: Readings) -> int:
    return _mappings_added(r) * MAPPING_BYTES


@dataclass(frozen=True)
class ArenaStats(_Readable):
    """stats(): the arena's counters, KSM's first, then the arena's own.
    Made from core.counts() of every page, the core's counters and /proc."""

    pages_shared: int = field(metadata=counter(
        "frames in use", ksm="pages_shared", value=_reading("frames")))
    pages_sharing: int = field(metadata=counter(
        "pages mapping a frame, less one per frame: pages saved", ksm="pages_sharing",
        value=_sharing))
    pages_unshared: int = field(metadata=counter(
        "pages with content found nowhere else, at the last pass", ksm="pages_unshared",
        value=_reading("unshared")))
    pages_volatile: int = field(metadata=counter(
        "pages whose content changed between the last two scans (merge() merges them "
        "anyway; the scanner waits)", ksm="pages_volatile", value=_reading("volatile")))
    zero_pages: int = field(metadata=counter(
        "pages pydedup placed on the zero page that still map it", ksm="ksm_zero_pages",
        value=_reading("zero")))
    full_scans: int = field(metadata=counter("passes made", ksm="full_scans"))
    general_profit: int = field(metadata=counter(
        "`(pages_sharing + zero_pages) * page_size - metadata_bytes - mapping_bytes`: as "
        "KSM's subtracts its rmap items, the kernel memory of the mappings merging added",
        ksm="general_profit", value=lambda r: _saved(r) - r["metadata"] - _mapping_bytes(r)))
    pages_in_use: int = field(metadata=counter("pages of live arrays", value=_reading("pages")))
    pages_private: int = field(metadata=counter(
        "of those, with their own content or none yet", value=_reading("private")))
    pages_unmergeable: int = field(metadata=counter(
        "of those, excluded by `unmergeable()`", value=_reading("unmergeable")))
    bytes_reserved: int = field(metadata=counter(
        "address space reserved", value=_reading("reserved")))
    bytes_in_use: int = field(metadata=counter(
        "`pages_in_use * page_size`", value=lambda r: r["pages"] * r["page_size"]))
    frames_in_use: int = field(metadata=counter(
        "equal to `pages_shared`", value=_reading("frames")))
    tiles: int = field(metadata=counter(
        "tiles in use: runs of consecutive frames of one content that runs of pages of that "
        "content map (`tile_pages`); their frames count in `pages_shared`"))
    tile_frames: int = field(metadata=counter("frames in use of those tiles"))
    kernel_ksm_pages: int = field(metadata=counter(
        "pages of this process the kernel's KSM merged (`ksm_merging_pages` of "
        "`/proc/self/ksm_stat`; with `kernel_ksm`, what pydedup left to it), 0 where the "
        "kernel does not say", value=lambda r: r["ksm_stat"].get("ksm_merging_pages", 0)))
    frame_store_bytes: int = field(metadata=counter(
        "memory the frame store holds (allocated blocks of the memfds this process writes new "
        "frames to; after a fork, frames inherited from the parent count in the parent's)"))
    metadata_bytes: int = field(metadata=counter(
        "memory of the records and trees: 12 bytes a page up to the highest page used, "
        "16 a frame slot, 4 a stable-tree bucket", value=_reading("metadata")))
    mappings: int = field(metadata=counter("kernel mappings inside the arena's range"))
    mappings_added: int = field(metadata=counter(
        "of those, the ones merging cut the range into: `mappings - 1` (the reservation is "
        "one mapping)", value=_mappings_added))
    mapping_bytes: int = field(metadata=counter(
        "kernel memory of `mappings_added`, estimated at `MAPPING_BYTES` (250) each: a "
        "`vm_area_struct` (about 160 bytes of its slab), maple tree nodes and the rest",
        value=_mapping_bytes))
    pss_bytes: int = field(metadata=counter(
        "PSS of the arena's mappings, from `/proc/self/smaps` (a frame counts in each mapping "
        "that maps it, by its share)", value=_reading("pss")))
    bytes_saved: int = field(metadata=counter(
        "`(pages_sharing + zero_pages) * page_size`", value=_saved))
    pss_bytes_saved: int = field(metadata=counter(
        "measured: resident private, merged and zero pages times the page size (what they would "
        "hold unmerged), less `pss_bytes`, less the PSS share of the frames held by the core's "
        "window onto the frame store, less frames no page maps; agrees with the drop of the "
        "process's `smaps_rollup` PSS that merging causes (`tests/test_accounting.py`)",
        value=lambda r: ((r["private_resident"] + r["merged"] + r["zero"]) * r["page_size"]
                         - r["pss"] - r["window_pss"]
                         - max(0, r["frame_store_bytes"] - r["frames"] * r["page_size"]))))
    barrier: str = field(metadata=counter(
        "the write barrier in use, `\"uffd\"` or `\"mprotect\"`"))
    huge_pages: str = field(metadata=counter(
        "transparent huge pages: `\"on\"` or `\"off\"`, and why (the `huge_pages` knob, "
        "the system's THP mode, numpy's `NUMPY_MADVISE_HUGEPAGE`)"))
    huge_pages_in_use: int = field(metadata=counter(
        "huge pages backing the arena now (`AnonHugePages` of its mappings in "
        "`/proc/self/smaps`, in huge pages)",
        value=lambda r: r["anonhugepages"] // max(r["huge_page_pages"] * r["page_size"], 1)
        if r["huge_page_pages"] else r["anonhugepages"] // (2 << 20)))
    huge_pages_kept: int = field(metadata=counter(
        "huge pages the last full pass kept whole although some of their pages matched",
        value=_reading("huge_pages_kept")))
    pages_kept_huge: int = field(metadata=counter(
        "their matching pages, left unmerged to keep them whole (`huge_split_min_pages`)"))
    huge_pages_split: int = field(metadata=counter(
        "huge pages merges split since the arena began"))
    frames_by_node: dict[int, int] = field(metadata=counter(
        "`{node: frames in use written on it}`"))
    shared_store: str = field(metadata=counter(
        "the shared store the arena's frames are in (knob `shared`), or `\"\"`"))
    shared_members: list[int] = field(metadata=counter(
        "pids of the processes on that store, this one first (`[]` unshared)"))
    shared_frames: int = field(metadata=counter(
        "frames in use in the whole shared store, every member's; with a shared store, "
        "`pages_shared`, `frames_in_use` and `frame_store_bytes` count the frames this "
        "arena maps"))
    shared_pages: int = field(metadata=counter(
        "merged pages of this arena on frames that other members map too"))
    shared_bytes: int = field(metadata=counter(
        "`shared_pages * page_size`", value=lambda r: r["shared_pages"] * r["page_size"]))
    shared_rss_bytes: int = field(metadata=counter(
        "measured: Rss of the arena's mappings of the shared store's frames (`/proc/self/smaps`)",
        value=_reading("shared_rss")))
    shared_pss_bytes: int = field(metadata=counter(
        "measured: Pss of the same: a frame mapped k times (by members' arenas, and by the "
        "read-only windows their cores compare frames through) counts 1/k of a page in "
        "each; `shared_rss_bytes - shared_pss_bytes` is what other mappings carry for this "
        "arena", value=_reading("shared_pss")))
    shared_repairs: int = field(metadata=counter(
        "times a member of the store died holding its lock, and the next one repaired the "
        "records"))
    members_lost: int = field(metadata=counter(
        "members of the store that died and whose frame references were given back"))

    @classmethod
    def made_from(cls, readings: Readings, partial: bool = False) -> ArenaStats:
        """With `partial`, the counters of readings that are missing (those
        of smaps, where `pydedup stats` may not read it) are None."""
        return _made_from(cls, readings, partial)

    @classmethod
    def from_published(cls, values: Mapping[str, Any]) -> ArenaStats:
        """The record of a published JSON file (publish.py), whose counters
        another version may lack: those are None."""
        found: dict[str, Any] = {f.name: values.get(f.name) for f in fields(cls)}
        return cls(**found)


@dataclass(frozen=True)
class ArrayStats(_Readable):
    """stats(array): one array's pages. Made from core.counts() of its pages."""

    pages: int = field(metadata=counter("pages the array's bytes span"))
    pages_private: int = field(metadata=counter(
        "of those, with their own content or none yet", value=_reading("private")))
    pages_merged: int = field(metadata=counter("pages mapping a frame", value=_reading("merged")))
    zero_pages: int = field(metadata=counter(
        "pages on the zero page placed by pydedup", value=_reading("zero")))
    pages_unmergeable: int = field(metadata=counter(
        "of those, excluded by `unmergeable()`", value=_reading("unmergeable")))
    bytes_saved: int = field(metadata=counter(
        "each zero page saves a page, each merged page `1 - 1/k` of one where `k` pages map "
        "its frame, so the arrays' `bytes_saved` add up to the arena's",
        value=lambda r: round(r["saved_pages"] * r["page_size"])))

    @classmethod
    def made_from(cls, readings: Readings) -> ArrayStats:
        return _made_from(cls, readings)


RECORDS: tuple[type[_Readable], ...] = (ArenaStats, ArrayStats, MergeReport, UnmergeReport)


class Counter(NamedTuple):
    """A row of the table of counters."""

    record: str     # the record it is a field of
    name: str
    type: str       # its annotation, as written
    ksm: str        # the KSM counter it mirrors, or ""
    doc: str


COUNTERS: tuple[Counter, ...] = tuple(
    Counter(record.__name__, f.name, str(f.type), f.metadata["ksm"], f.metadata["doc"])
    for record in RECORDS for f in fields(record))  # type: ignore[arg-type]


# -- docs/reference.md's tables ------------------------------------------------

def reference_table(record: str) -> str:
    """The markdown table of `record`'s counters, as docs/reference.md has it."""
    rows = ["| counter | KSM | meaning |", "|---|---|---|"]
    rows += [f"| `{c.name}` | {f'`{c.ksm}` ' if c.ksm else ''}| {c.doc} |"
             for c in COUNTERS if c.record == record]
    return "".join(row + "\n" for row in rows)


_TABLE = re.compile(r"(<!-- counters: (\w+) -->\n)(.*?)(<!-- end counters -->)", re.S)


def with_reference_tables(text: str) -> str:
    """`text` (docs/reference.md) with each counter table regenerated."""
    return _TABLE.sub(lambda m: m[1] + reference_table(m[2]) + m[4], text)


def reference_tables_in(text: str) -> dict[str, str]:
    """{record: the table between its markers} of docs/reference.md."""
    return {m[2]: m[3] for m in _TABLE.finditer(text)}

