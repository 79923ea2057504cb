"""Every knob of an arena in one table: its default, what it accepts, its KSM
counterpart. Defaults can be overridden with PYDEDUP_<NAME> environment
variables; a bad value, from either place, raises ValueError naming the knob."""
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from pydedup import procfs


@dataclass(frozen=True)
class Knob:
    name: str
    default: Callable[[], Any]
    parse: Callable[[Any], Any]   # returns the value, or raises ValueError
    accepts: str
    ksm: str                      # the /sys/kernel/mm/ksm file it mirrors, or ""
    doc: str


def _boolean(value):
    if isinstance(value, (bool, numbers.Integral)) and value in (0, 1):
        return bool(value)
    raise ValueError


def _integer_at_least(low, high=None):
    def parse(value):
        if (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
                and (high is None or value <= high)):
            return int(value)
        raise ValueError
    return parse


UINT32_MAX = 2**32 - 1          # the core's page, frame and mapcount numbers are 32-bit
MAX_THREADS = 256               # PD_MAX_THREADS of the core (_hash.h)
SIZE_MAX = 2**63 - 1            # numpy's allocator keeps byte counts in a size_t


def _one_of_integers(*choices):
    def parse(value):
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in choices:
            return int(value)
        raise ValueError
    return parse


def _auto_or(parse_number):
    def parse(value):
        return value if isinstance(value, str) and value == "auto" else parse_number(value)
    return parse


def _store_name(value):
    if isinstance(value, str) and (value == "" or re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value)):
        return value
    raise ValueError


def _one_of(*choices):
    def parse(value):
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError
    return parse


KNOBS = {knob.name: knob for knob in (
    Knob("use_zero_pages", lambda: True, _boolean, "True or False (or 1, 0)", "use_zero_pages",
         "All-zero pages go to the kernel's zero page instead of a frame."),
    Knob("zero_page_colours", procfs.zero_page_colours, _integer_at_least(1, UINT32_MAX),
         f"an integer from 1 to {UINT32_MAX}", "",
         "With use_zero_pages off: a zero page shares a zero frame only with "
         "pages of its colour (virtual page number modulo this), as the kernel "
         "colours its zero pages. Default: the kernel's own count, read from "
         "pagemap where frame numbers are visible, else 1 (right on x86-64)."),
    Knob("merge_across_nodes", lambda: True, _boolean, "True or False (or 1, 0)",
         "merge_across_nodes",
         "Pages on different NUMA nodes may share a frame. Off: each node has "
         "its own trees and frames, so merged pages stay local. Changes only "
         "while no page is merged (KSM answers EBUSY): unmerge() first."),
    Knob("max_page_sharing", lambda: 256, _integer_at_least(2, UINT32_MAX),
         f"an integer from 2 to {UINT32_MAX}", "max_page_sharing",
         "Most arena pages one frame backs; more copies get another frame."),
    Knob("max_mappings", lambda: procfs.max_map_count() // 3, _integer_at_least(0),
         "an integer >= 0", "",
         "Most mappings the arena may hold (vm.max_map_count counts them per "
         "process); merges that would need more are left undone and counted."),
    Knob("tile_pages", lambda: 256, _integer_at_least(1, 65536), "an integer from 1 to 65536",
         "",
         "Longest tile: a run of consecutive pages of one content (NaN, ones, "
         "a fill value) maps onto up to this many consecutive frames of that "
         "content, reused every tile_pages pages, so a run of L pages costs "
         "about L / tile_pages mappings and a content at most tile_pages "
         "frames. Tiles grow a frame at a time, as runs reach their end. "
         "1: no tiles (every page of such a run is a mapping of its own)."),
    Knob("kernel_ksm", lambda: False, _boolean, "True or False (or 1, 0)", "",
         "Where the kernel's KSM runs (/sys/kernel/mm/ksm/run is 1), mark the "
         "arena MADV_MERGEABLE after every merge() and background scan, so "
         "that the kernel merges the pages pydedup left private (the mapping "
         "budget could not pay them); unmergeable() arrays stay out. "
         "stats().kernel_ksm_pages counts what it merged. Needs no privilege."),
    Knob("huge_pages", lambda: "auto", _one_of("auto", "on", "off"), "'auto', 'on' or 'off'",
         "",
         "Transparent huge pages for the arena, as numpy gets them for its "
         "arrays: 'auto' follows the system's THP mode (always; madvise, unless "
         "numpy's NUMPY_MADVISE_HUGEPAGE=0) and numpy; 'on' asks for them "
         "wherever THP is not 'never'; 'off' keeps the arena on 4 KiB pages "
         "(every merge then splits nothing). Arrays of 4 MiB or more (numpy's "
         "threshold) start on a huge page's boundary and get them; smaller "
         "ones never do. stats().huge_pages says what was "
         "chosen and why."),
    Knob("huge_split_min_pages", lambda: 64, _integer_at_least(1, 512),
         "an integer from 1 to 512", "",
         "A merge splits a huge page only if it merges at least this many of "
         "its pages (64: 256 KiB of its 2 MiB); otherwise the huge page is kept "
         "whole, its matching pages left unmerged and counted "
         "(skipped['huge_page']). A huge page all of whose pages match goes "
         "whole, whatever this says."),
    Knob("shared", lambda: "", _store_name,
         "'' or a name of 1 to 64 letters, digits, '.', '_', '-'", "",
         "A frame store shared with the other processes of this user on this "
         "machine that name the same store (PYDEDUP_SHARED for pool workers): "
         "identical pages of all of them map the same frames, copy-on-write. "
         "'' (the default): the arena's own store. Set when the arena is made; "
         "one arena per store in a process. Where sharing cannot work, the "
         "arena warns and keeps a store of its own."),
    Knob("run", lambda: 0, _one_of_integers(0, 1, 2), "0, 1 or 2", "run",
         "The background scanner: 0 stops it, 1 runs it, 2 stops it and "
         "unmerges every page (the arena's pages, not the process's)."),
    Knob("pages_to_scan", lambda: 65536, _integer_at_least(1, UINT32_MAX),
         f"an integer from 1 to {UINT32_MAX}", "pages_to_scan",
         "Pages the background scanner looks at in one step. Pages not written "
         "since the last scan cost almost nothing, so a step is usually short."),
    Knob("sleep_millisecs", lambda: 20, _integer_at_least(0, UINT32_MAX),
         f"an integer from 0 to {UINT32_MAX}", "sleep_millisecs",
         "How long the background scanner sleeps between steps."),
    Knob("threads", lambda: min(len(os.sched_getaffinity(0)), MAX_THREADS),
         _integer_at_least(1, MAX_THREADS), f"an integer from 1 to {MAX_THREADS}", "",
         "Threads that read pages in a merge() and a background scan: the zero "
         "tests and checksums of each chunk of pages run on this many threads "
         "without the GIL, over disjoint slices, and the copies into new frames "
         "go to the same threads; the decisions, the trees and the remaps stay "
         "on the calling thread, in page order, so a pass merges the same pages "
         "whatever the count. Default: the CPUs the process may run on "
         "(os.sched_getaffinity)."),
    Knob("max_cpu", lambda: 100, _integer_at_least(1, 100 * MAX_THREADS),
         f"an integer from 1 to {100 * MAX_THREADS}", "",
         "The background scanner's CPU budget, in percent of one CPU (KSM's "
         "advisor_max_cpu): after a step that took c CPU seconds, on all its "
         "threads, the scanner sleeps at least c * (100 - max_cpu) / max_cpu "
         "seconds, besides sleep_millisecs. 100: at most one CPU's worth on "
         "average, whatever `threads` is; 200: two."),
    Knob("track_writes", lambda: True, _boolean, "True or False (or 1, 0)", "",
         "Track written pages (userfaultfd write-protect, asynchronous) so that "
         "a scan reads only pages written since the last one. Costs a minor "
         "fault on the first write to each page after a scan."),
    Knob("barrier", lambda: "auto", _one_of("auto", "uffd", "mprotect"),
         "'auto', 'uffd' or 'mprotect'", "",
         "How a page is write-protected between its comparison and its remap: "
         "'uffd' (userfaultfd; writers, the kernel's included, wait) needs "
         "CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1; 'mprotect' (a SIGSEGV "
         "handler makes writers wait; a kernel write into such a page fails with "
         "EFAULT) works everywhere; 'auto' takes uffd where allowed."),
    Knob("alloc_threshold", lambda: 4 * procfs.PAGE_SIZE, _integer_at_least(1, SIZE_MAX),
         f"a number of bytes from 1 to {SIZE_MAX}", "",
         "Inside pydedup.arena() or after pydedup.install(), numpy allocations "
         "of at least this many bytes take whole arena pages; smaller ones go "
         "to numpy's default allocator. Default: four pages."),
    Knob("alloc_cache", lambda: "auto", _auto_or(_integer_at_least(0, SIZE_MAX)),
         f"'auto' or a number of bytes from 0 to {SIZE_MAX}", "",
         "Most bytes of arena pages that numpy's allocator keeps after a free, "
         "to reuse for the next allocation of the same page count (fresh pages "
         "fault in on first touch); merge(), stats() and close() hand them "
         "back. 'auto': 16 MiB plus a tenth of the most bytes live arrays held "
         "since the block began, trimmed at the block's end, so that code in a "
         "block holds and peaks within 10% (+16 MiB) of plain numpy. A number: "
         "that many bytes, kept across blocks (faster for big temporaries, "
         "more memory). 0: no cache."),
)}


def parse(name: str, value):
    knob = KNOBS.get(name)
    if knob is None:
        raise ValueError(f"unknown knob {name!r}; knobs are: {', '.join(KNOBS)}")
    try:
        return knob.parse(value)
    except (ValueError, TypeError):
        raise ValueError(f"knob {name} accepts {knob.accepts}, not {value!r}") from None


def from_environment(name: str):
    """The knob's default, or the value of PYDEDUP_<NAME> if set."""
    variable = f"PYDEDUP_{name.upper()}"
    text = os.environ.get(variable)
    if text is None:
        return KNOBS[name].default()
    value: Any
    try:
        value = int(text)
    except ValueError:
        value = {"true": 1, "false": 0}.get(text.strip().lower(), text)
    try:
        return parse(name, value)
    except ValueError:
        raise ValueError(f"environment variable {variable}={text!r}: knob {name} accepts "
                         f"{KNOBS[name].accepts}") from None


def initial(overrides: dict) -> dict:
    """Every knob's starting value: keyword arguments, else environment, else default."""
    for name in overrides:
        if name not in KNOBS:
            raise TypeError(f"unknown knob {name!r}; knobs are: {', '.join(KNOBS)}")
    return {name: parse(name, overrides[name]) if name in overrides else from_environment(name)
            for name in KNOBS}
