"""Arena: page-aligned numpy arrays whose identical pages can be merged."""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Generic, SupportsIndex, TypeVar, Union, cast, overload

import numpy as np
import numpy.typing as npt

from pydedup import knobs, layout, numa, procfs, publish
from pydedup._fast import Block, Core
from pydedup.pages import Pages
from pydedup.scanner import Scanner
from pydedup.stats import ArenaStats, ArrayStats, MergeReport, UnmergeReport

ShapeLike = Union[SupportsIndex, Sequence[SupportsIndex]]
Node = Union[int, str, None]    # a NUMA node number, "interleave", or None: the kernel's default
T = TypeVar("T")
A = TypeVar("A", bound="Arena")

PAGE_SIZE = procfs.PAGE_SIZE
MIN_RESERVATION = 1 << 30
MAX_DEFAULT_RESERVATION = 1 << 40


class _Knob(Generic[T]):
    """An arena attribute backed by the knob table: validated when set (any
    value may be given: a bad one raises ValueError naming the knob)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.__doc__ = knobs.KNOBS[name].doc

    @overload
    def __get__(self, arena: None, owner: type | None = None) -> _Knob[T]: ...
    @overload
    def __get__(self, arena: Arena, owner: type | None = None) -> T: ...

    def __get__(self, arena: Arena | None, owner: type | None = None) -> T | _Knob[T]:
        return self if arena is None else arena._knobs[self.name]

    def __set__(self, arena: Arena, value: object) -> None:
        arena._set_knob(self.name, knobs.parse(self.name, value))


class Arena:
    """A reserved range of virtual memory that numpy arrays are made in, whole
    pages each; merge() shares identical pages among them, copy-on-write.

    size: bytes of address space to reserve (memory is only used as arrays
    are written). Default: four times the physical memory, at most 1 TiB.
    Keyword arguments set knobs (see pydedup.KNOBS).
    """

    use_zero_pages = _Knob[bool]()
    zero_page_colours = _Knob[int]()
    max_page_sharing = _Knob[int]()
    merge_across_nodes = _Knob[bool]()
    max_mappings = _Knob[int]()
    tile_pages = _Knob[int]()
    kernel_ksm = _Knob[bool]()
    run = _Knob[int]()
    pages_to_scan = _Knob[int]()
    sleep_millisecs = _Knob[int]()
    threads = _Knob[int]()
    max_cpu = _Knob[int]()
    track_writes = _Knob[bool]()
    barrier = _Knob[str]()
    alloc_threshold = _Knob[int]()
    alloc_cache = _Knob[Union[int, str]]()    # bytes, or "auto"
    huge_pages = _Knob[str]()
    huge_split_min_pages = _Knob[int]()
    shared = _Knob[str]()

    def __init__(self, size: int | None = None, **knob_values: Any) -> None:
        self._knobs = knobs.initial(knob_values)
        self._scanner: Scanner | None = None
        self._ksm_marked = False         # the arena is marked for kernel KSM (kernel_ksm)
        self._allocator: Any = None      # numpy's memory handler for this arena, once asked for
        self._scopes: list[Any] = []     # `with arena:` blocks active (pydedup.allocator._Scope)
        self._warned: set[str] = set()   # fallback reasons a FallbackWarning has named
        self._merged_once = False        # the first merge() publishes (publish.py)
        self._scan_helper_cpu = 0.0      # CPU seconds of the last scan step's hashing threads
        self._store: Any = None          # pydedup.shared.Store, with `shared`
        self._pages: Pages | None = self._reserve_shared(size) if self.shared else _reserve(size)
        core = self._live().core
        _choose_barrier(core, self.barrier)
        core.set_tracking(self.track_writes)
        core.zero_colours = self.zero_page_colours
        self._topology = numa.topology()
        core.set_nodes(len(self._topology.nodes))
        with self._locked():             # a shared store's knob is the store's: under its lock
            core.set_merge_across_nodes(self.merge_across_nodes)
        self._huge_state = _choose_huge_pages(self._live(), self.huge_pages, self.huge_split_min_pages)
        self._lo = core.base_address
        self._hi = self._lo + core.npages * PAGE_SIZE
        self._publisher = publish.Publisher(self, self._knobs)     # for `python -m pydedup stats`
        self._set_knob("run", self.run)

    def __setattr__(self, name: str, value: Any) -> None:
        # A misspelt knob (max_pages_to_scan) must not become a new attribute
        # that does nothing: only knobs and the arena's own (_private) ones.
        if not name.startswith("_") and not hasattr(type(self), name):
            raise AttributeError(f"pydedup.Arena has no knob {name!r}; "
                                 f"knobs are: {', '.join(knobs.KNOBS)}")
        object.__setattr__(self, name, value)

    def _set_knob(self, name: str, value: Any) -> None:
        if name == "run":
            self._run_scanner(value)
            return
        if name == "shared":
            self._live()                 # a closed arena: ValueError, as for every knob
            if value != self.shared:
                raise ValueError("knob shared is set when the arena is made: "
                                 "pydedup.Arena(shared=...) or PYDEDUP_SHARED")
            return
        if name in ("alloc_threshold", "alloc_cache"):
            if self.closed:
                raise ValueError("the arena is closed")
            self._knobs[name] = value
            if self._allocator is not None:
                self._tune_allocator()
            return
        with self._locked() as core:
            if name == "barrier":
                _choose_barrier(core, value)
            elif name == "track_writes":
                core.set_tracking(value)
            elif name == "zero_page_colours":
                core.zero_colours = value
            elif name == "merge_across_nodes":
                core.set_merge_across_nodes(value)
            elif name == "huge_pages":
                self._huge_state = _choose_huge_pages(self._live(), value, self.huge_split_min_pages)
            elif name == "huge_split_min_pages":
                self._huge_state = _choose_huge_pages(self._live(), self.huge_pages, value)
            self._knobs[name] = value

    # -- life --------------------------------------------------------------

    def close(self) -> None:
        """No more arrays, merges or stats; the background scanner stops.
        Live arrays keep their memory until the last of them goes."""
        self._stop_scanner()
        if self._allocator is not None:
            self._allocator.close()
        self._pages = None
        self._publisher.remove()

    @property
    def closed(self) -> bool:
        return self._pages is None

    def __enter__(self: A) -> A:
        """Like pydedup.arena(self): numpy's allocations in the block (and in
        threads started in it) go to this arena. The block's end does not
        close the arena: it lives while you hold it (its arrays keep its
        memory, not the Arena object); close() ends it."""
        from pydedup.allocator import _Scope
        scope = _Scope(self)
        self._scopes.append(scope)
        return self

    def __exit__(self, *exc: object) -> None:
        self._scopes.pop().end(stacklevel=3)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._hi - self._lo:,} bytes reserved"
        return f"<pydedup.Arena {state}>"

    def _reserve_shared(self, size: int | None) -> Pages:
        """The arena's pages on shared store `shared`; where the kernel or
        the store cannot have it, a warning and a store of its own."""
        from pydedup import shared
        try:
            store = shared.join(self.shared)
        except shared.SharedStoreError:
            raise
        except OSError as e:
            warnings.warn(f"pydedup: shared store {self.shared!r} is not possible here ({e}); "
                          f"this arena keeps a store of its own", RuntimeWarning, stacklevel=3)
            self._knobs["shared"] = ""
            return _reserve(size)
        pages = _reserve(size, store.fds)
        shared.claim(self.shared, pages)
        self._store = store
        return pages

    def _live(self) -> Pages:
        pages = self._pages
        if pages is None:
            raise ValueError("the arena is closed")
        return pages

    def _locked(self) -> AbstractContextManager[Core]:
        return self._live().locked()

    # -- arrays, as numpy makes them ------------------------------------------

    # node=: where the array's memory comes from: a NUMA node number,
    # "interleave" (page by page over every node with memory) or None (the
    # node of the CPU that first writes each page, the kernel's default).

    def empty(self, shape: ShapeLike, dtype: npt.DTypeLike = float, order: str = "C", *,
              node: Node = None) -> npt.NDArray[Any]:
        """Like numpy.empty. Fresh arena pages are zero-filled."""
        return self._new(shape, dtype, layout.c_or_f(order), node=node)

    def zeros(self, shape: ShapeLike, dtype: npt.DTypeLike = float, order: str = "C", *,
              node: Node = None) -> npt.NDArray[Any]:
        return self._new(shape, dtype, layout.c_or_f(order), node=node)

    def ones(self, shape: ShapeLike, dtype: npt.DTypeLike | None = None, order: str = "C", *,
             node: Node = None) -> npt.NDArray[Any]:
        return self.full(shape, 1, dtype, order, node=node)

    def full(self, shape: ShapeLike, fill_value: Any, dtype: npt.DTypeLike | None = None,
             order: str = "C", *, node: Node = None) -> npt.NDArray[Any]:
        if dtype is None:
            dtype = np.array(fill_value).dtype
        out = self._new(shape, dtype, layout.c_or_f(order), node=node)
        np.copyto(out, fill_value, casting="unsafe")
        return out

    def empty_like(self, prototype: npt.ArrayLike, dtype: npt.DTypeLike | None = None, order: str = "K",
                   shape: ShapeLike | None = None, *, node: Node = None) -> npt.NDArray[Any]:
        prototype = np.asanyarray(prototype)
        dtype = prototype.dtype if dtype is None else dtype
        shape = prototype.shape if shape is None else layout.normalize_shape(shape)
        order, strides = layout.like_layout(prototype, shape, np.dtype(dtype), order)
        return self._new(shape, dtype, order, strides, node=node)

    def zeros_like(self, prototype: npt.ArrayLike, dtype: npt.DTypeLike | None = None, order: str = "K",
                   shape: ShapeLike | None = None, *, node: Node = None) -> npt.NDArray[Any]:
        return self.empty_like(prototype, dtype, order, shape, node=node)

    def ones_like(self, prototype: npt.ArrayLike, dtype: npt.DTypeLike | None = None, order: str = "K",
                  shape: ShapeLike | None = None, *, node: Node = None) -> npt.NDArray[Any]:
        return self.full_like(prototype, 1, dtype, order, shape, node=node)

    def full_like(self, prototype: npt.ArrayLike, fill_value: Any, dtype: npt.DTypeLike | None = None,
                  order: str = "K", shape: ShapeLike | None = None, *,
                  node: Node = None) -> npt.NDArray[Any]:
        out = self.empty_like(prototype, dtype, order, shape, node=node)
        np.copyto(out, fill_value, casting="unsafe")
        return out

    def array(self, object: npt.ArrayLike, dtype: npt.DTypeLike | None = None, *, copy: bool = True,
              order: str = "K", ndmin: int = 0, node: Node = None) -> npt.NDArray[Any]:
        """Like numpy.array: a copy of `object` in the arena (no copy if
        copy=False and it already is one of this arena's arrays)."""
        source = np.asanyarray(object, dtype=dtype)
        if ndmin > source.ndim:
            source = source.reshape((1,) * (ndmin - source.ndim) + source.shape)
        if not copy and self.owns(source) and node is None:
            return source
        out = self.empty_like(source, order=order, node=node)
        np.copyto(out, source)
        return out

    def asarray(self, a: npt.ArrayLike, dtype: npt.DTypeLike | None = None,
                order: str | None = None) -> npt.NDArray[Any]:
        """Like numpy.asarray: `a` itself if it is an arena array of the right
        dtype and order, else a copy in the arena."""
        if (isinstance(a, np.ndarray) and self.owns(a)
                and (dtype is None or a.dtype == np.dtype(dtype))
                and (order in (None, "K", "A")
                     or (order == "C" and a.flags.c_contiguous)
                     or (order == "F" and a.flags.f_contiguous))):
            return a
        return self.array(a, dtype, order=order or "K")

    def owns(self, array: object) -> bool:
        """Whether `array`'s memory lives in this arena: made by its
        constructors, or by numpy inside pydedup.arena() (or a view of either)."""
        if self._pages is None:
            return False
        root = layout.root_of(array)
        if isinstance(root, Block):
            return root.owner is self._pages
        return (isinstance(root, np.ndarray) and root.flags.owndata
                and self._lo <= root.__array_interface__["data"][0] < self._hi)

    # -- numpy's allocator (pydedup.arena(), pydedup.install()) --------------------

    def _numpy_handler(self) -> Any:
        """The NEP 49 memory handler (a PyCapsule) that puts numpy's
        allocations in this arena; see pydedup/allocator.py."""
        if self._pages is None:
            raise ValueError("the arena is closed")
        if self._allocator is None:
            from pydedup._handler import Allocator
            core = self._pages.core
            self._allocator = Allocator(self._pages, self._lo, core.npages, PAGE_SIZE,
                                        self.alloc_threshold, 0)
            self._tune_allocator()
            self._allocator_pages = self._pages     # outlives close(), for allocator_stats()
        return self._allocator.capsule

    def _tune_allocator(self) -> None:
        auto = self.alloc_cache == "auto"
        self._allocator.threshold = self.alloc_threshold
        self._allocator.cache_auto = auto
        self._allocator.cache_limit = 0 if auto else self.alloc_cache

    def allocator_stats(self) -> dict[str, int]:
        """numpy's allocator in this arena: `allocations` it made in arena
        pages (`cache_hits` of them reused a freed run), `fell_back` (sent
        to numpy's default allocator), of which `fell_back_full` (no free
        run that long: bigger than the arena's largest free run),
        `fell_back_closed` (the arena was closed) and `fell_back_busy`
        (allocated by pydedup itself, or a __del__, inside an arena
        operation of the same thread); `bytes_in_use` by live arrays,
        `cache_bytes` and `cached_runs` held for reuse. Works on a closed
        arena too."""
        if self._allocator is None:
            return dict(allocations=0, cache_hits=0, fell_back=0, fell_back_full=0,
                        fell_back_closed=0, fell_back_busy=0, bytes_in_use=0,
                        cache_bytes=0, cached_runs=0)
        counters = self._allocator.counters()
        busy = self._allocator_pages.busy_refusals
        counters["fell_back_full"] -= busy
        counters["fell_back_busy"] = busy
        return counters

    _FALLBACK_REASONS = {
        "fell_back_full": "bigger than the arena's largest free run (make a larger Arena(size=...))",
        "fell_back_closed": "the arena was closed",
        "fell_back_busy": "made inside an arena operation of the same thread",
    }

    def _warn_fallbacks(self, before: dict[str, int], stacklevel: int = 2) -> None:
        """A FallbackWarning for each reason that sent allocations to numpy's
        default allocator since `before` (allocator_stats() then), once per
        arena and reason: never silently, never a flood."""
        from pydedup.allocator import FallbackWarning
        now = self.allocator_stats()
        for reason, why in self._FALLBACK_REASONS.items():
            n = now[reason] - before.get(reason, 0)
            if n > 0 and reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"pydedup: {n} numpy allocation(s) went to numpy's default "
                              f"allocator instead of the arena: {why}; "
                              f"see Arena.allocator_stats()", FallbackWarning, stacklevel=stacklevel)

    def _trim_allocator_cache(self) -> None:
        """The end of a block: the cache back to what holds after it."""
        if self._allocator is not None and not self.closed:
            self._allocator.trim()

    def _flush_allocator_cache(self) -> None:
        """Cached runs are free memory to the user: they must not be merged
        nor counted in use."""
        if self._allocator is not None:
            self._allocator.flush()

    def _new(self, shape: Any, dtype: npt.DTypeLike, order: Any, strides: Any = None,
             node: Node = None) -> npt.NDArray[Any]:
        shape = layout.normalize_shape(shape)
        dtype = layout.check_dtype(dtype)
        nodes = self._topology.check(node)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > np.iinfo(np.intp).max:
            raise ValueError(f"array is too big: {shape} of {dtype} needs {nbytes} bytes")
        with self._locked():
            block = self._live().take(-(-nbytes // PAGE_SIZE), nbytes, nodes)
        # buffer=: numpy's stubs do not know the buffer protocol of a Cython class
        return np.ndarray(shape, dtype, buffer=cast(Any, block), order=order, strides=strides)

    # -- merging -----------------------------------------------------------

    def merge(self) -> MergeReport:
        """One full pass over every arena page, now: all-zero pages to the
        kernel zero page (use_zero_pages), identical pages onto one shared,
        immutable frame, byte for byte."""
        start = time.perf_counter()
        self._flush_allocator_cache()
        with self._locked() as core:
            core.sweep_members()         # a shared store: what dead members held, back
            st = core.merge(self.use_zero_pages, self.max_page_sharing, self._mapping_budget(),
                            self.tile_pages, self.threads, self._kernel_ksm_takes_the_rest())
            self._advise_kernel_ksm(core)
            self._live().keep_placements()
        report = MergeReport.made_from(dict(st, seconds=time.perf_counter() - start))
        self._publish_first_or_if_due()
        return report

    def _kernel_ksm_takes_the_rest(self) -> bool:
        """Whether kernel KSM merges what the mapping budget leaves (the
        kernel_ksm knob on, ksmd running): then a pass leaves the contents
        the budget cannot finish wholly private, for the kernel to merge
        into one page each, rather than merge some of their copies."""
        return self.kernel_ksm and procfs.ksm_running()

    def _advise_kernel_ksm(self, core: Core) -> None:
        """kernel_ksm: the arena marked for the kernel's KSM after a pass,
        again (remaps lay new mappings without the mark); once off, unmarked."""
        if self.kernel_ksm and procfs.ksm_running():
            core.advise_kernel_ksm(True)
            self._ksm_marked = True
        elif self._ksm_marked and not self.kernel_ksm:
            core.advise_kernel_ksm(False)
            self._ksm_marked = False

    def unmerge(self) -> UnmergeReport:
        """Every merged and zero page gets its own copy; contents unchanged."""
        start = time.perf_counter()
        with self._locked() as core:
            unmerged = self._unmerge(core, 0, core.high_water)
            if self._ksm_marked:        # and what kernel KSM merged
                core.advise_kernel_ksm(False)
                self._ksm_marked = False
        return UnmergeReport.made_from(dict(pages_unmerged=unmerged,
                                            seconds=time.perf_counter() - start))

    def unmergeable(self, array: npt.NDArray[Any]) -> None:
        """Like MADV_UNMERGEABLE: unmerge the pages under `array` and leave
        them out of later merges."""
        first, n = self._page_range(array)
        with self._locked() as core:
            core.set_unmergeable(first, n, True)
            self._unmerge(core, first, n)
            if self._ksm_marked:        # out of kernel KSM too
                core.advise_kernel_ksm(True)

    def mergeable(self, array: npt.NDArray[Any]) -> None:
        """Like MADV_MERGEABLE: undo unmergeable()."""
        first, n = self._page_range(array)
        with self._locked() as core:
            core.set_unmergeable(first, n, False)

    # -- the background scanner (ksmd) -------------------------------------------

    def _run_scanner(self, run: int) -> None:
        """KSM's run: 0 stop, 1 scan in the background, 2 stop and unmerge."""
        if self.closed:
            raise ValueError("the arena is closed")
        if run != 1:
            self._stop_scanner()
        if run == 2:
            self.unmerge()
        self._knobs["run"] = run
        if run == 1 and (self._scanner is None or not self._scanner.running):
            self._scanner = Scanner(self, Arena._scan_step)   # again, if an error stopped the last one

    def _stop_scanner(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            scanner.stop()

    def _scan_step(self) -> tuple[int, float]:
        """One step of the background scan: (pages it merged, seconds to sleep)."""
        cpu_started = time.thread_time()
        with self._locked() as core:
            # The budget is read once a scan: /proc/self/maps is not free.
            budget = self._mapping_budget() if core.scan_cursor == 0 else 0
            if core.scan_cursor == 0:
                core.sweep_members()     # a shared store: what dead members held, back
            step, scan_done = core.scan_batch(self.pages_to_scan, self.use_zero_pages,
                                              self.max_page_sharing, budget, self.tile_pages,
                                              self.threads, self._kernel_ksm_takes_the_rest())
            if scan_done:
                self._advise_kernel_ksm(core)
            if step["merged"] or step["zeroed"]:
                self._live().keep_placements()
        if step["merged"] or step["zeroed"]:
            self._publish_first_or_if_due()
        else:
            self._publish_if_due()
        # The hashing threads' CPU time (the core adds theirs, not this thread's)
        self._scan_helper_cpu = step["decide_cpu_seconds"]
        return step["merged"] + step["zeroed"], self._scan_sleep(
            time.thread_time() - cpu_started + self._scan_helper_cpu)

    def _scan_sleep(self, cpu: float) -> float:
        """Seconds to sleep after a step that took `cpu` CPU seconds on all
        its threads: sleep_millisecs, or longer so that the scanner stays
        within max_cpu percent of one CPU over the step and its sleep."""
        return max(self.sleep_millisecs / 1000, cpu * (100 - self.max_cpu) / self.max_cpu)

    @property
    def scanner(self) -> Scanner | None:
        """The background scanner while run == 1 (its cpu_seconds, last_merge
        and error), else None."""
        return self._scanner

    def _simulate_numa(self, nnodes: int) -> npt.NDArray[np.uint16]:
        """For tests of the per-node logic on a machine of one node: the arena
        believes in `nnodes` nodes and takes each page's node from the map this
        returns (a writable numpy array, one entry a page, all 0 at first)
        instead of the kernel; node= of the constructors writes it."""
        page_nodes = np.zeros(self._hi // PAGE_SIZE - self._lo // PAGE_SIZE, np.uint16)
        with self._locked() as core:
            core.simulate_nodes(page_nodes)
            core.set_nodes(nnodes)
        self._topology = numa.Topology(tuple(numa.Node(i, (), PAGE_SIZE) for i in range(nnodes)), False)
        return page_nodes

    @staticmethod
    def _unmerge(core: Core, first: int, n: int) -> int:
        core.refresh(first, n)
        before = core.counts(first, n)
        core.unmerge(first, n)
        return before["merged"] + before["zero"]

    def _mapping_budget(self) -> int:
        """Mappings a pass may add: within max_mappings for the arena, and
        clear of vm.max_map_count for the process, whose malloc and mmap
        would fail at the limit."""
        limit = procfs.max_map_count()
        total, ours = procfs.count_mappings(self._lo, self._hi)
        headroom = max(64, limit // 16)
        return max(0, min(self.max_mappings - ours, limit - headroom - total))

    # -- accounting --------------------------------------------------------

    @overload
    def stats(self, array: None = None) -> ArenaStats: ...
    @overload
    def stats(self, array: npt.NDArray[Any]) -> ArrayStats: ...

    def stats(self, array: npt.NDArray[Any] | None = None) -> ArenaStats | ArrayStats:
        """The arena's counters (ArenaStats), or one array's (ArrayStats)."""
        if array is not None:
            first, n = self._page_range(array)
            with self._locked() as core:
                core.refresh(first, n)
                c = core.counts(first, n)
            return ArrayStats.made_from(dict(c, pages=n, page_size=PAGE_SIZE))
        self._flush_allocator_cache()
        with self._locked() as core:
            readings, smaps_of = self._readings(core)
            readings.update(procfs.smaps_readings(procfs.arena_smaps(*smaps_of), core.shared))
        stats = ArenaStats.made_from(readings)
        self._publisher.publish(stats, self._scanner)
        return stats

    def _readings(self, core: Core) -> tuple[dict[str, Any], tuple[int, int, list[int]]]:
        """What stats() is made from but what /proc/self/smaps says, and
        what to read of it: (readings, (lo, hi, the frame store's inodes))."""
        core.sweep_members()
        core.refresh(0, core.high_water)
        c = core.counts(0, core.high_water)
        memfds = [os.fstat(fd) for fd in core.memfds]
        members = core.shared_counts()
        # A shared store: this arena's frames, and their memory (the
        # store holds other members' frames too: shared_frames).
        frames = core.member_frames() if core.shared else core.frames_in_use
        store_bytes = (frames * PAGE_SIZE if core.shared
                       else sum(memfd.st_blocks for memfd in memfds) * 512)
        readings = dict(
            c, frames=frames, metadata=core.metadata_bytes(),
            full_scans=core.full_scans, unshared=core.pages_unshared,
            volatile=core.pages_volatile, barrier=core.barrier_name,
            frame_store_bytes=store_bytes, shared_frames=core.frames_in_use if core.shared else 0,
            frames_by_node=core.frames_by_node(), **core.tile_counts(),
            ksm_stat=procfs.ksm_stat(),
            reserved=self._hi - self._lo, page_size=PAGE_SIZE,
            huge_pages=self._huge_state, **core.huge_counts(),
            shared_store=self.shared, shared_members=members["members"],
            shared_pages=members["pages_with_others"],
            shared_repairs=members["repairs"], members_lost=members["members_lost"])
        return readings, (self._lo, self._hi, [memfd.st_ino for memfd in memfds])

    def _publish_if_due(self) -> None:
        # While `pydedup stats` watches, at most a publication a second: merge()
        # and the scanner keep the published counters fresh (see publish.py).
        if self._publisher.due():
            self._publish()

    def _publish_first_or_if_due(self) -> None:
        """After a merge: the first one publishes at once, so that
        `pydedup stats` lists the arena from its first merge on."""
        if self._merged_once:
            self._publish_if_due()
        else:
            self._merged_once = True
            self._publish()

    def _publish(self) -> None:
        """The counters for `pydedup stats`, but those of /proc/self/smaps,
        which the reader measures (publish.py): the file is tens of megabytes
        for an arena cut into 100,000 mappings, a second or more to read, and
        a merge does not wait for that."""
        try:
            self._flush_allocator_cache()   # as stats(): its pages count as free
            with self._locked() as core:
                readings, smaps_of = self._readings(core)
            self._publisher.publish_unmeasured(readings, smaps_of, self._scanner)
        except (OSError, ValueError):   # best effort: never fail a merge or stop the scanner
            pass

    def _page_range(self, array: npt.NDArray[Any]) -> tuple[int, int]:
        """(first page, page count) that `array`'s bytes span."""
        if not self.owns(array):
            if self._pages is None:
                raise ValueError("the arena is closed")
            raise ValueError("the array does not live in this arena")
        lo, hi = layout.byte_bounds(array)
        if lo == hi:
            return 0, 0
        first = (lo - self._lo) // PAGE_SIZE
        return first, (hi - self._lo + PAGE_SIZE - 1) // PAGE_SIZE - first


def _reserve(size: int | None, shared: tuple[int, tuple[int, ...]] | None = None) -> Pages:
    """Reserve `size` bytes, or by default as much as can be had up to the
    default: strict overcommit (vm.overcommit_memory=2) refuses big ones."""
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive number of bytes, not {size!r}")
        if size % PAGE_SIZE:
            whole = -(-size // PAGE_SIZE) * PAGE_SIZE
            raise ValueError(f"size must be a whole number of pages ({PAGE_SIZE} bytes), not "
                             f"{size}; {whole} is the next one up")
        return Pages(size // PAGE_SIZE, shared)
    size = min(4 * procfs.physical_memory(), MAX_DEFAULT_RESERVATION)
    while True:
        try:
            return Pages(size // PAGE_SIZE, shared)
        except MemoryError:
            if size <= MIN_RESERVATION:
                raise
            size //= 2


def _huge_page_choice(knob: str) -> tuple[int, str]:
    """(arena pages per huge page, 0 for none; why): the huge_pages knob
    against what the system offers and what numpy does."""
    mode, size = procfs.thp_mode(), procfs.huge_page_size()
    if knob == "off":
        return 0, "off (huge_pages='off')"
    if mode in ("never", "absent") or size <= PAGE_SIZE or (2 << 20) % size:
        return 0, f"off (transparent huge pages: {mode}, {size} bytes)"
    if knob == "auto" and mode == "madvise" and not procfs.numpy_madvises_hugepage():
        return 0, "off (numpy does not ask for them: NUMPY_MADVISE_HUGEPAGE=0)"
    return size // PAGE_SIZE, f"on (transparent huge pages: {mode})"


def _choose_huge_pages(pages: Pages, huge_pages: str, huge_split_min_pages: int) -> str:
    """Huge pages for the arena, or not; what stats().huge_pages says."""
    per_huge, why = _huge_page_choice(huge_pages)
    split_min = min(huge_split_min_pages, per_huge) if per_huge else 1
    pages.set_huge_pages(per_huge, split_min)
    return why


def _choose_barrier(core: Core, choice: str) -> None:
    """The barrier the knob asks for; 'auto' is userfaultfd where this
    process may use it, else mprotect."""
    if choice != "auto":
        core.set_barrier(choice)
        return
    try:
        core.set_barrier("uffd")
    except OSError:
        core.set_barrier("mprotect")
