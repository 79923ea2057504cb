"""The arena's pages: the Cython core under one lock, the free extents, and
arrays giving their pages back.

An array's pages come back when its Block dies, which can happen in any
thread, in the middle of anything (a garbage collection inside a merge, say).
So a Block only queues its pages; whoever holds the lock releases the queue,
now if the lock is free, else when the current operation ends."""
import collections
import os
import threading
import weakref
from contextlib import contextmanager

from pydedup._fast import DEBUG_CHECKS, Block, Core, PageOwner, check_invariants
from pydedup.extents import Extents

HUGE_ARRAY_BYTES = 4 << 20
"""Arrays this big get huge pages (huge_pages on): numpy advises
MADV_HUGEPAGE for its allocations of 4 MiB and more (NPY_HUGEPAGE_THRESHOLD)."""


class Pages(PageOwner):
    def __init__(self, npages: int, shared: tuple[int, tuple[int, ...]] | None = None):
        # shared: the (records, frames) memfds of a store shared by
        # processes (pydedup/shared.py); the core takes copies of its own.
        self.core = Core(npages, shared)
        self.extents = Extents(npages)
        self._lock = threading.Lock()
        self._holder: int | None = None     # the thread holding _lock, for numpy's allocator
        self._given_back: collections.deque[tuple[int, int]] = collections.deque()
        # first page -> (npages, nodes) of placed blocks
        self._placed: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.busy_refusals = 0          # take_pages() refused: this thread held the lock
        self.huge_page_pages = 0        # arena pages per huge page; 0: huge pages off
        self._huge_runs: dict[int, int] = {}    # first page -> npages of arrays advised huge
        self.debug_checks = DEBUG_CHECKS   # check every invariant after each operation
        _LIVE.add(self)

    @contextmanager
    def locked(self, store: bool = True):
        # store: the operation touches the frame store; a shared store's
        # lock (_shared.pxi) is then taken after ours. Allocations do not:
        # they need not wait for another process's merge.
        store = store or not self.core.shared
        with self._lock, self._store_locked(store):
            self._holder = threading.get_ident()
            try:
                if store:
                    self._release_given_back()
                yield self.core
                if store:
                    self._release_given_back()
            finally:
                self._holder = None
                if self.debug_checks and store:   # after a failed operation too: it must not corrupt
                    self._check_invariants()
        if self._given_back:
            self._release_if_free()

    @contextmanager
    def _store_locked(self, store: bool = True):
        """The frame store's lock, if `store`: for a store shared by
        processes, the robust mutex of its records; nothing to wait for in
        a private one."""
        if not store:
            yield
            return
        self.core.lock_store()
        try:
            yield
        finally:
            self.core.unlock_store()

    def check_invariants(self):
        """Raise pydedup._fast.InvariantError if the core's records, the
        frame store, the process's mappings or the free extents disagree."""
        with self._lock, self._store_locked():
            self._check_invariants()

    def _check_invariants(self):
        high_water = self.core.high_water
        free = bytearray(high_water)
        for first, n in self.extents.runs():
            end = min(first + n, high_water)
            if first < end:
                free[first:end] = b"\1" * (end - first)
        check_invariants(self.core, free)

    def take(self, npages: int, nbytes: int, nodes: tuple = ()) -> Block:
        """A Block of npages fresh, zero-filled pages, whose memory comes from
        `nodes` if any are given (interleaved if several). Call under locked()."""
        if npages == 0:
            return Block(self.core, self, 0, 0, 0)
        first = self._take_free(npages)
        if first is None:
            page = self.core.page_size
            raise MemoryError(
                f"arena has no {npages * page} free bytes in one piece "
                f"(largest free run: {self.extents.largest * page} bytes, "
                f"free in all: {self.extents.free_pages * page}); make a larger Arena(size=...)")
        if nodes:
            try:
                self.core.place(first, npages, nodes)
            except OSError:
                self.extents.give(first, npages)
                raise
            self._placed[first] = (npages, nodes)
        self.core.adopt(first, npages)
        self._advise_huge(first, npages)
        return Block(self.core, self, first, npages, nbytes)

    def keep_placements(self):
        """After remaps: a remap gives pages a new mapping, without the NUMA
        policy the old one had, and copy-on-write and unmerge() would then
        put their copies wherever the writing CPU is. Call under locked()."""
        if self.core.simulating:        # simulated nodes live in their map, not in mappings
            return
        for first, (npages, nodes) in self._placed.items():
            self.core.place(first, npages, nodes)

    def take_pages(self, npages: int):
        """For numpy's allocator (pydedup/_handler.pyx): the first of npages
        fresh, zero-filled pages, or None if no free run is that long, or if
        this thread holds the lock already: numpy allocating inside an arena
        operation (a garbage collection running a __del__) must not wait for
        itself. Other threads wait for the operation in progress."""
        if self._holder == threading.get_ident():
            self.busy_refusals += 1
            return None
        with self.locked(store=False) as core:
            first = self._take_free(npages)
            if first is not None:
                core.adopt(first, npages)
                self._advise_huge(first, npages)
        return first

    def _takes_huge(self, npages: int) -> bool:
        """Whether an array of npages gets huge pages: huge_pages on, and as
        big as numpy's arrays that do (HUGE_ARRAY_BYTES)."""
        return bool(self.huge_page_pages) and npages * self.core.page_size >= HUGE_ARRAY_BYTES

    def _advise_huge(self, first: int, npages: int):
        if self._takes_huge(npages) and self.core.advise_huge(first, npages, True):
            self._huge_runs[first] = npages

    def set_huge_pages(self, per_huge: int, split_min: int):
        """Huge pages on (per_huge pages each) or off (0); off, the arrays
        that have them are advised MADV_NOHUGEPAGE again. Call under locked()."""
        self.core.set_huge_pages(per_huge, split_min)
        self.huge_page_pages = per_huge
        if not per_huge:
            for first, npages in self._huge_runs.items():
                self.core.advise_huge(first, npages, False)
            self._huge_runs.clear()

    def _take_free(self, npages: int):
        """A free run of npages: on a huge page's boundary for an array that
        gets huge pages, as numpy's big arrays are, else the best fit."""
        align = self.huge_page_pages
        if self._takes_huge(npages):
            first = self.extents.take_aligned(npages, align)
            if first is not None:
                return first
        return self.extents.take(npages)

    def take_at(self, first: int, npages: int) -> bool:
        """For numpy's allocator: take pages [first, first + npages) if all
        are free (an allocation grown in place)."""
        if self._holder == threading.get_ident():
            return False
        with self.locked(store=False) as core:
            taken = self.extents.take_at(first, npages)
            if taken:
                core.adopt(first, npages)
        return taken

    def give_back(self, first: int, npages: int):
        if npages == 0:
            return
        self._given_back.append((first, npages))
        self._release_if_free()

    def _release_if_free(self):
        if self._lock.acquire(blocking=False):
            self._holder = threading.get_ident()
            try:
                # Not waiting for another process's merge: the next
                # operation releases what stays queued.
                if self.core.lock_store(False):
                    try:
                        self._release_given_back()
                    finally:
                        self.core.unlock_store()
            finally:
                self._holder = None
                self._lock.release()

    def _release_given_back(self):
        for _ in range(len(self._given_back)):
            first, npages = self._given_back.popleft()
            if self._placed.pop(first, None):   # the next array here gets the default again
                self.core.place(first, npages, ())
            if self.core.release(first, npages):
                if self._huge_runs.pop(first, None):    # small arrays here get none
                    self.core.advise_huge(first, npages, False)
                self.extents.give(first, npages)
            else:                       # at the mapping limit: try again later
                self._given_back.append((first, npages))
        if self.extents.free_pages == self.core.npages:
            self.core.forget_cuts()     # every array gone: one mapping again


# fork: wait for merges in progress, then fence the frames both processes share;
# the child writes its new frames to memfds of its own (Core.fork_happened).
_LIVE: weakref.WeakSet[Pages] = weakref.WeakSet()
_forking: list[Pages] = []


def _before_fork():
    _forking[:] = list(_LIVE)
    for pages in _forking:
        pages._lock.acquire()
        pages.core.fork_prepare()       # a shared store: the child's member slot


def _after_fork(in_child: bool):
    error = None
    for pages in _forking:          # each arena's lock let go, whatever raised (a signal)
        try:
            pages.core.fork_happened(in_child)
        except BaseException as e:
            error = error or e
        finally:
            pages._lock.release()
    _forking.clear()
    if error is not None:
        raise error


os.register_at_fork(before=_before_fork,
                    after_in_parent=lambda: _after_fork(False),
                    after_in_child=lambda: _after_fork(True))
