"""A hypothesis state machine drives an arena through random sequences of
allocations (every dtype, shape and order, empty and huge), writes (slices,
scalars, whole arrays, views, from another thread), merges, unmerges,
unmergeable and mergeable, knob changes, the background scanner, frees and
forks, and keeps a plain numpy copy of every array (pyroaring's
test/test_state_machine.py does the same for its bitmaps). After every step
every array equals its copy byte for byte, the counters add up, and the
core's invariant checker (_check.pxi) passes; once every array is freed no
page, frame or mapping is left.

How many steps: the `ci` profile (the default, conftest.py) and `nightly`
(--hypothesis-profile nightly, or PYDEDUP_NIGHTLY=1); docs/testing.md."""
import gc
import os
import sys
import threading
import traceback

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pydedup
from pydedup import procfs, testing

from kernel import PAGE

pytestmark = pytest.mark.slow   # the state machine: a minute or two (docs/testing.md)

ARENA_BYTES = 128 << 20
MAX_ARRAYS = 10
MAX_PAGES = 24                       # of an ordinary array
FILL_PAGES = 160                     # of a constant fill: runs that grow tiles
HUGE_PAGES = 1024                    # 4 MiB of 4 KiB pages, a few of them written
UFFD = pydedup.features()["userfaultfd"]

DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
          np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128,
          np.longdouble, "M8[ns]", "m8[s]", "S5", "U3", [("a", "<i4"), ("b", "<f8")],
          np.dtype([("x", "u1"), ("y", ">i8")], align=True)]
# Few distinct values, so that pages are often equal (and often all zero).
VALUES = st.sampled_from([0, 0, 1, 7, 255, -1, 0.5])


def raw(array):
    """The bytes of an array, in its logical order, whatever its dtype;
    field by field for a structured one, whose padding bytes numpy leaves
    undefined in a copy."""
    if array.dtype.names is None:
        return array.tobytes()
    return b"".join(raw(array[name]) for name in array.dtype.names)


def pages_of(array) -> int:
    return -(-array.nbytes // PAGE)


def shapes(max_items):
    """0 to 3 dimensions, empty ones included, at most max_items items."""
    return st.lists(st.integers(0, 64), min_size=0, max_size=3).filter(
        lambda s: int(np.prod(s)) <= max_items).map(tuple)


def slices(n):
    return st.builds(slice, st.integers(-n - 1, n + 1) | st.none(),
                     st.integers(-n - 1, n + 1) | st.none(),
                     st.sampled_from([None, 1, 2, 3, -1, -2]))


class Entry:
    """One array of the arena and its plain copy; which of its pages the
    user made unmergeable."""

    def __init__(self, array):
        self.array = array
        self.copy = array.copy(order="K")
        self.unmergeable = np.zeros(pages_of(array), bool)


class ArenaMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.arena = pydedup.Arena(size=ARENA_BYTES)
        self.entries = {}
        self.serial = 0
        self.forked = False

    # -- allocate ---------------------------------------------------------

    def keep(self, array):
        assert self.arena.owns(array)
        self.serial += 1
        self.entries[self.serial] = Entry(array)

    @precondition(lambda self: len(self.entries) < MAX_ARRAYS)
    @rule(constructor=st.sampled_from(["zeros", "empty", "ones", "full"]),
          dtype=st.sampled_from(DTYPES), shape=st.data(), order=st.sampled_from("CF"),
          value=VALUES)
    def allocate(self, constructor, dtype, shape, order, value):
        dtype = np.dtype(dtype)
        shape = shape.draw(shapes(MAX_PAGES * PAGE // dtype.itemsize))
        if constructor == "full":
            try:
                np.full(1, value, dtype)
            except (TypeError, ValueError, OverflowError):   # a value the dtype does not take
                return
            array = self.arena.full(shape, value, dtype, order)
        elif constructor == "ones":
            array = self.arena.ones(shape, dtype, order)
        else:
            array = getattr(self.arena, constructor)(shape, dtype, order)
            assert not raw(array).strip(b"\0")    # fresh pages are zero-filled
        self.keep(array)

    @precondition(lambda self: len(self.entries) < MAX_ARRAYS)
    @rule(data=st.data(), how=st.sampled_from(["array", "asarray", "empty_like", "full_like",
                                               "copy_of_arena_array"]),
          order=st.sampled_from("CFAK"), seed=st.integers(0, 2**32 - 1))
    def allocate_like(self, data, how, order, seed):
        if how == "copy_of_arena_array":
            if not self.entries:
                return
            source = self.entries[data.draw(st.sampled_from(sorted(self.entries)))].array
            source = source.T if data.draw(st.booleans()) else source
            array = self.arena.array(source, order=order)   # identical pages: merge fodder
        else:
            dtype = np.dtype(data.draw(st.sampled_from(DTYPES)))
            shape = data.draw(shapes(MAX_PAGES * PAGE // dtype.itemsize))
            content = np.random.default_rng(seed).integers(
                0, 256, int(np.prod(shape)) * dtype.itemsize, np.uint8).view(dtype).reshape(shape)
            content = content.T if data.draw(st.booleans()) else content
            if how == "array":
                array = self.arena.array(content, order=order)
            elif how == "asarray":
                array = self.arena.asarray(content, order=None if order == "K" else order)
            elif how == "empty_like":
                array = self.arena.empty_like(content, order=order)
            else:
                array = self.arena.full_like(content, 3, order=order)
        self.keep(array)

    @precondition(lambda self: len(self.entries) < MAX_ARRAYS)
    @rule(pages=st.integers(2, FILL_PAGES), value=st.sampled_from([np.nan, 1.0, -9999.0, 0.0]),
          masked=st.integers(0, FILL_PAGES))
    def allocate_a_constant_fill(self, pages, value, masked):
        """A long run of one content (NaN, ones, a fill value), maybe with a
        stretch of other content inside: the runs tiles are made for."""
        array = self.arena.full(pages * PAGE // 8, value)
        array[masked * PAGE // 8:(masked + 3) * PAGE // 8 + 5] = 0.25
        self.keep(array)

    @precondition(lambda self: len(self.entries) < MAX_ARRAYS)
    @rule(touched=st.lists(st.integers(0, HUGE_PAGES - 1), max_size=5), value=VALUES)
    def allocate_huge_mostly_untouched(self, touched, value):
        array = self.arena.zeros(HUGE_PAGES * PAGE // 8)
        for page in touched:
            array[page * PAGE // 8] = value
        self.keep(array)

    @rule()
    def allocate_more_than_the_arena_holds(self):
        with pytest.raises(MemoryError, match="free bytes"):
            self.arena.empty(ARENA_BYTES + PAGE, np.uint8)

    @precondition(lambda self: self.entries)
    @rule(data=st.data())
    def asarray_of_an_arena_array_is_itself(self, data):
        array = self.pick(data).array
        assert self.arena.asarray(array) is array
        assert self.arena.array(array, copy=False) is array

    # -- write --------------------------------------------------------------

    def pick(self, data):
        return self.entries[data.draw(st.sampled_from(sorted(self.entries)))]

    @staticmethod
    def mirror(entry, write):
        """Apply `write` to the copy, then to the array; a write numpy
        refuses on the copy (a value the dtype does not take) is skipped."""
        try:
            write(entry.copy)
        except (TypeError, ValueError, OverflowError):
            return
        write(entry.array)

    @precondition(lambda self: self.entries)
    @rule(data=st.data(), value=VALUES)
    def write_a_slice(self, data, value):
        entry = self.pick(data)
        if not entry.array.ndim:
            return
        index = data.draw(slices(entry.array.shape[0]))
        self.mirror(entry, lambda a: a.__setitem__(index, value))

    @precondition(lambda self: self.entries)
    @rule(data=st.data(), value=VALUES)
    def write_a_scalar(self, data, value):
        entry = self.pick(data)
        if not entry.array.size:
            return
        index = tuple(data.draw(st.integers(0, n - 1)) for n in entry.array.shape)
        self.mirror(entry, lambda a: a.__setitem__(index, value))

    @precondition(lambda self: self.entries)
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def write_the_whole_array(self, data, seed):
        entry = self.pick(data)
        noise = np.random.default_rng(seed).integers(0, 256, entry.array.nbytes, np.uint8)
        content = noise.view(entry.array.dtype).reshape(entry.array.shape)
        self.mirror(entry, lambda a: np.copyto(a, content))

    @precondition(lambda self: self.entries)
    @rule(data=st.data(), value=VALUES)
    def write_through_a_view(self, data, value):
        entry = self.pick(data)
        if entry.array.ndim < 2:
            return
        self.mirror(entry, lambda a: a.T[::2].__setitem__(Ellipsis, value))

    @precondition(lambda self: self.entries)
    @rule(data=st.data(), value=VALUES)
    def write_from_another_thread(self, data, value):
        entry = self.pick(data)
        if not entry.array.size:
            return
        try:
            entry.copy[...] = value
        except (TypeError, ValueError, OverflowError):
            return
        errors = []

        def write():
            try:
                entry.array[...] = value
            except Exception as e:             # noqa: BLE001 - reported below
                errors.append(e)
        thread = threading.Thread(target=write)
        thread.start()
        self.arena.merge()              # while it writes, maybe
        thread.join()
        assert not errors

    # -- merge, unmerge, unmergeable ------------------------------------------

    @rule()
    def merge(self):
        mappings_before = self.mappings()
        scans_before = testing.core(self.arena).full_scans
        report = self.arena.merge()
        assert report.pages_merged + report.pages_zeroed <= report.pages_scanned
        assert report.pages_hashed <= report.pages_scanned
        assert report.skipped["changed"] == 0        # nothing writes during this merge
        if self.arena.run != 1:                      # else the scanner merges too
            assert report.skipped["unmergeable"] == int(
                sum(e.unmergeable.sum() for e in self.entries.values()))
            assert self.mappings() <= max(mappings_before, self.arena.max_mappings, 1)
            assert testing.core(self.arena).full_scans == scans_before + 1

    def mappings(self):
        """Mappings in the arena's range (stats().mappings, without the
        PSS that stats() also reads, at 10 ms a time)."""
        return procfs.count_mappings(*testing.address_range(self.arena))[1]

    @rule()
    def unmerge(self):
        self.arena.unmerge()
        if self.arena.run != 1:
            stats = self.arena.stats()
            assert stats.pages_sharing == stats.pages_shared == stats.zero_pages == 0

    @precondition(lambda self: self.entries)
    @rule(data=st.data(), unmergeable=st.booleans(), view=st.booleans())
    def mark(self, data, unmergeable, view):
        entry = self.pick(data)
        target = entry.array
        if view and target.ndim and target.shape[0] > 2:
            target = target[1:-1]
        (self.arena.unmergeable if unmergeable else self.arena.mergeable)(target)
        if target.size:
            first, n = testing.page_range(self.arena, target)
            base, _ = testing.page_range(self.arena, entry.array)
            entry.unmergeable[first - base:first - base + n] = unmergeable
        if unmergeable:
            stats = self.arena.stats(target)
            assert stats.pages_merged == stats.zero_pages == 0
            assert stats.pages_unmergeable == stats.pages

    # -- knobs ------------------------------------------------------------------

    @rule(name=st.sampled_from(["use_zero_pages", "track_writes"]), value=st.booleans())
    def set_a_switch(self, name, value):
        setattr(self.arena, name, value)
        assert getattr(self.arena, name) == value

    @rule(name=st.sampled_from(["max_page_sharing", "zero_page_colours", "max_mappings",
                                "pages_to_scan", "sleep_millisecs", "tile_pages"]),
          value=st.sampled_from([1, 2, 3, 8, 64, 1000]))
    def set_a_number(self, name, value):
        try:
            pydedup.KNOBS[name].parse(value)
        except ValueError:                           # below the knob's minimum: refused
            with pytest.raises(ValueError, match=f"knob {name}"):
                setattr(self.arena, name, value)
            return
        setattr(self.arena, name, value)
        assert getattr(self.arena, name) == value

    @rule(barrier=st.sampled_from(["auto", "mprotect", "uffd"]))
    def set_the_barrier(self, barrier):
        if barrier == "uffd" and not UFFD:
            with pytest.raises(OSError, match="userfaultfd"):
                self.arena.barrier = barrier
            return
        self.arena.barrier = barrier
        assert self.arena.stats().barrier == ("uffd" if barrier == "auto" and UFFD else
                                              "mprotect" if barrier == "auto" else barrier)

    @rule(run=st.sampled_from([0, 1, 2]), fast=st.booleans())
    def set_run(self, run, fast):
        if fast:
            self.arena.sleep_millisecs = 0
        self.arena.run = run
        assert (self.arena.scanner is not None) == (run == 1)
        if run == 2:
            stats = self.arena.stats()
            assert stats.pages_sharing == stats.pages_shared == stats.zero_pages == 0

    # -- free, fork -------------------------------------------------------------

    @precondition(lambda self: self.entries)
    @rule(data=st.data())
    def free(self, data):
        del self.entries[data.draw(st.sampled_from(sorted(self.entries)))]   # its last reference

    @rule(merge_in_child=st.booleans())
    def fork(self, merge_in_child):
        """The child checks every array and the invariants, merges, writes
        and frees, and says how that went in its exit status; the parent
        must not see any of it."""
        pid = os.fork()
        if pid == 0:
            status = 3
            try:
                status = 0 if self.child_checks(merge_in_child) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        self.forked = True
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0

    def child_checks(self, merge_in_child):
        testing.check_invariants(self.arena)
        if not all(raw(e.array) == raw(e.copy) for e in self.entries.values()):
            return False
        if merge_in_child:
            self.arena.merge()
            testing.check_invariants(self.arena)
        for key in self.entries:
            np.copyto(self.entries[key].array, np.zeros_like(self.entries[key].copy))
        self.entries.clear()
        self.arena.merge()
        testing.check_invariants(self.arena)
        return self.arena.stats().pages_in_use == 0

    # -- after every step ---------------------------------------------------------

    @invariant()
    def arrays_equal_their_copies(self):
        for key, entry in self.entries.items():
            assert raw(entry.array) == raw(entry.copy), f"array {key} lost a write"

    @invariant()
    def counters_add_up(self):
        stats = self.arena.stats()
        in_use = sum(pages_of(e.array) for e in self.entries.values())
        assert stats.pages_in_use == in_use
        assert stats.pages_sharing <= stats.pages_in_use
        assert stats.frames_in_use == stats.pages_shared
        # Each page is counted once: private, on a frame, or on the zero page.
        assert (stats.pages_private + stats.pages_sharing + stats.pages_shared
                + stats.zero_pages) == stats.pages_in_use
        assert stats.pages_unmergeable == sum(int(e.unmergeable.sum()) for e in self.entries.values())
        if not self.forked:
            assert stats.frame_store_bytes == stats.frames_in_use * PAGE
        if self.arena.run == 1:
            return                      # the scanner moves pages between the calls below
        per_array = [self.arena.stats(e.array) for e in self.entries.values()]
        assert sum(s.pages for s in per_array) == in_use
        assert sum(s.pages_private for s in per_array) == stats.pages_private
        assert sum(s.pages_merged for s in per_array) == stats.pages_sharing + stats.pages_shared
        assert sum(s.zero_pages for s in per_array) == stats.zero_pages
        assert sum(s.pages_unmergeable for s in per_array) == stats.pages_unmergeable
        for s in per_array:
            assert s.pages_merged + s.zero_pages <= s.pages - s.pages_unmergeable

    @invariant()
    def the_core_is_consistent(self):
        testing.check_invariants(self.arena)

    def teardown(self):
        """Once every array is freed: no page, frame or mapping is left.
        (Not after a failed step: its traceback may still hold arrays.)"""
        try:
            self.arena.run = 0
            self.entries.clear()
            gc.collect()
            if sys.exc_info()[0] is not None:
                return
            stats = self.arena.stats()
            testing.check_invariants(self.arena)
            assert stats.pages_in_use == 0
            assert stats.frames_in_use == stats.pages_shared == 0
            core = testing.core(self.arena)
            assert stats.frame_store_bytes <= core.fork_fence * PAGE   # fenced frames stay
            if not self.forked:
                assert stats.frame_store_bytes == 0
            # Not `stats.mappings == 1`: freed pages can leave the range cut
            # in several mappings (test_stress.py, LEFT_CUT: an expected failure).
        finally:
            self.arena.close()


TestArenaMachine = ArenaMachine.TestCase
