"""The limits a merge keeps: the mapping budget of the arena, vm.max_map_count
of the process, and a frame store that cannot grow. Judged by what the kernel
maps (/proc/self/maps, PAGEMAP_SCAN) and by the arrays' bytes, compared with
copies kept outside the arena. What would hurt the test process (a process
full of mappings, a file size limit) runs in a child process."""
import contextlib
import ctypes
import json
import mmap
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import pydedup
from pydedup import testing

from kernel import PAGE, address, frame_offsets, frame_place, process_data, touch, zero_page_mapped

PAGE_FLOATS = PAGE // 8


@pytest.fixture(autouse=True)
def small_pages(monkeypatch):
    """These tests count mappings and lone merged pages on 4 KiB pages: with
    huge pages a big array is a mapping of its own, and a huge page with a
    few lone duplicates is kept whole (tests/test_huge_pages.py)."""
    monkeypatch.setenv("PYDEDUP_HUGE_PAGES", "off")
HERE = os.path.dirname(os.path.abspath(__file__))


def scattered_workload(arena, rng, pairs, zeros):
    """One array whose pages with a twin, and whose all-zero pages, each sit
    alone between unique random pages. So every page merged onto a frame is a
    run of one page in the middle of an anonymous mapping, which it cuts in
    three (two mappings more), while a zero page costs no mapping at all.
    Returns the array, the rows with a twin and the zero rows."""
    special = rng.permutation(np.concatenate([np.arange(pairs), np.arange(pairs),
                                              np.full(zeros, -1)]))
    a = arena.empty((2 * special.size + 1, PAGE_FLOATS))
    a[:] = rng.random(a.shape)
    rows = 2 * np.arange(special.size) + 1
    twin_rows, zero_rows = rows[special >= 0], rows[special < 0]
    a[twin_rows] = rng.random((pairs, PAGE_FLOATS))[special[special >= 0]]
    a[zero_rows] = 0.0                           # written: they hold memory until merged
    return a, twin_rows, zero_rows


def maps():
    """(start, end, line) of every mapping of this process."""
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    return [(*(int(x, 16) for x in line.split()[0].split("-")), line) for line in lines]


def reservation(arena, first_array):
    """[lo, hi) of a fresh arena's range. Before any merge it is one mapping,
    and the arena's first array starts at its first page."""
    lo = address(first_array)
    [(start, end)] = [(start, end) for start, end, _ in maps() if start <= lo < end]
    assert (start, end - start) == (lo, arena.stats().bytes_reserved)
    return start, end


def mappings_in(lo, hi):
    """The lines of /proc/self/maps within [lo, hi): read here, not by pydedup."""
    return [line for start, end, line in maps() if start < hi and end > lo]


def same_bytes(a, expected):
    return np.array_equal(a.view(np.uint64), expected.view(np.uint64))


# -- the arena's mapping budget ----------------------------------------------

@pytest.mark.parametrize("max_mappings", [0, 200])
def test_scattered_merges_stop_at_the_mapping_budget(barrier, rng, max_mappings):
    with contextlib.closing(pydedup.Arena(size=1 << 30, barrier=barrier, max_mappings=max_mappings)) as arena:
        a, twin_rows, zero_rows = scattered_workload(arena, rng, pairs=3000, zeros=500)
        lo, hi = reservation(arena, a)
        expected = a.copy()
        report = arena.merge()

        # 6000 lone pages would need 12,000 mappings. The reservation itself
        # is one, which no budget can undo.
        assert len(mappings_in(lo, hi)) <= max(max_mappings, 1)
        assert arena.stats().mappings <= max(max_mappings, 1)
        # Every page with a twin was either merged or left to the budget, and
        # the report says how many were left.
        assert report.pages_merged + report.skipped["mapping_budget"] == twin_rows.size
        assert report.skipped["mapping_budget"] >= twin_rows.size - max_mappings // 2
        assert report.skipped["no_memory"] == report.skipped["changed"] == 0
        if max_mappings >= 3:
            assert report.pages_merged > 0       # the budget is spent, not hoarded
        offsets = frame_offsets(a)
        assert sum(offset is not None for offset in offsets) == report.pages_merged
        # Zero pages cost no mapping: all of them go, whatever the budget.
        assert report.pages_zeroed == zero_rows.size
        assert arena.stats().zero_pages == zero_rows.size
        assert all(offsets[row] is None for row in zero_rows)
        touch(a)
        zero = zero_page_mapped(a)
        if zero is not None:                     # a kernel with PAGEMAP_SCAN shows them
            assert np.flatnonzero(zero).tolist() == zero_rows.tolist()
        assert same_bytes(a, expected)


@pytest.mark.parametrize("max_mappings", [200, None], ids=["budget-spent", "budget-ample"])
def test_a_second_merge_over_the_same_data_adds_no_mapping(barrier, rng, max_mappings):
    knobs = {} if max_mappings is None else {"max_mappings": max_mappings}
    with contextlib.closing(pydedup.Arena(size=1 << 30, barrier=barrier, **knobs)) as arena:
        a, twin_rows, zero_rows = scattered_workload(arena, rng, pairs=1000, zeros=200)
        lo, hi = reservation(arena, a)
        expected = a.copy()
        first = arena.merge()
        before = mappings_in(lo, hi)
        second = arena.merge()
        # Not one mapping more, nor any moved: the same lines, byte for byte.
        assert mappings_in(lo, hi) == before
        assert (second.pages_merged, second.pages_zeroed) == (0, 0)
        # What the first left to the budget is still waiting, and counted again.
        assert second.skipped["mapping_budget"] == first.skipped["mapping_budget"]
        assert first.pages_merged + first.skipped["mapping_budget"] == twin_rows.size
        if max_mappings is None:
            assert first.skipped["mapping_budget"] == 0
        assert same_bytes(a, expected)


def test_raising_the_budget_lets_merging_go_on(rng):
    with contextlib.closing(pydedup.Arena(size=1 << 30, max_mappings=200)) as arena:
        a, twin_rows, zero_rows = scattered_workload(arena, rng, pairs=1000, zeros=200)
        lo, hi = reservation(arena, a)
        expected = a.copy()
        merged = arena.merge().pages_merged
        arena.max_mappings = 600
        report = arena.merge()
        assert report.pages_merged > 0
        assert len(mappings_in(lo, hi)) <= 600
        merged += report.pages_merged
        arena.max_mappings = pydedup.KNOBS["max_mappings"].default()
        report = arena.merge()
        merged += report.pages_merged
        assert report.skipped["mapping_budget"] == 0
        assert merged == twin_rows.size
        assert arena.stats().pages_sharing == twin_rows.size // 2
        assert same_bytes(a, expected)


@pytest.mark.parametrize("budget", ["ample", pytest.param("spent", marks=pytest.mark.skipif(
    not pydedup.features()["procmap_query"],
    reason="a spent budget pays for remaps that add no mapping only where the kernel "
           "shows mappings by address (PROCMAP_QUERY, Linux 6.11)"))])
def test_remerges_that_add_no_mapping_go_on_when_the_budget_is_spent(arena, rng, budget):
    a = arena.array(rng.random((512, PAGE_FLOATS)))
    b = arena.array(a)
    lo, hi = reservation(arena, a)
    arena.merge()
    before = len(mappings_in(lo, hi))
    broken = np.arange(0, 512, 4)
    b[broken] = a[broken]                        # written: own copies, same content
    assert arena.stats(b).pages_private == broken.size
    if budget == "spent":
        arena.max_mappings = arena.stats().mappings
    report = arena.merge()
    # Each page goes back onto its old frame at its old offset: the kernel
    # joins it to the mappings on either side, so the count does not move.
    assert len(mappings_in(lo, hi)) == before
    assert report.pages_merged == broken.size
    assert report.skipped["mapping_budget"] == 0
    assert frame_offsets(a) == frame_offsets(b)
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not pydedup.features()["procmap_query"],
                    reason="needs the kernel to show mappings by address (PROCMAP_QUERY, Linux 6.11)")
def test_a_spent_budget_pays_for_remerges_but_not_for_new_mappings(arena, rng):
    a = arena.array(rng.random((256, PAGE_FLOATS)))
    b = arena.array(a)
    lo, hi = reservation(arena, a)
    arena.merge()
    broken = np.arange(1, 256, 8)
    b[broken] = a[broken]
    # Right after b, c's new frames would follow b's at the next offsets and
    # join its mapping for free; after a page of something else, they cannot.
    spacer = arena.array(rng.random((1, PAGE_FLOATS)))
    c = arena.array(rng.random((64, PAGE_FLOATS)))
    c_copy = arena.array(c)
    arena.max_mappings = arena.stats().mappings
    before = len(mappings_in(lo, hi))
    report = arena.merge()
    assert report.pages_merged == broken.size
    assert report.skipped["mapping_budget"] == c.size // PAGE_FLOATS * 2
    assert report.mappings_left == 0
    assert len(mappings_in(lo, hi)) == before
    assert arena.stats(c).pages_merged == arena.stats(c_copy).pages_merged == 0
    assert arena.stats(spacer).pages_private == 1
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, c_copy)


# -- the process's vm.max_map_count ------------------------------------------

def run_child(function, *args):
    """Call function(*args) of this module in a fresh Python process, whose
    limits cannot hurt this one, and return what it returned (via JSON)."""
    code = f"import json, test_limits; print(json.dumps(test_limits.{function}(*{args!r})))"
    path = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def max_map_count():
    with open("/proc/sys/vm/max_map_count") as f:
        return int(f.read())


def process_mappings():
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def fill_mappings(upto):
    """Add mappings until the process has `upto`: one anonymous mapping,
    every other page of it made read-only. Pages that differ in protection
    never coalesce, so each mprotect cuts two mappings more. Keep the result."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    filler = mmap.mmap(-1, (upto - process_mappings() + 4) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(filler))
    page = 1
    while (missing := upto - process_mappings()) >= 2:
        for _ in range(missing // 2):
            assert libc.mprotect(base + page * PAGE, PAGE, mmap.PROT_READ) == 0, ctypes.get_errno()
            page += 2
    return filler


def allocations_work():
    """What other code of the process does: each needs a mapping of its own."""
    works = {}
    for name, allocate in [("mmap", lambda: mmap.mmap(-1, 1 << 20)),
                           ("bytearray", lambda: bytearray(10 << 20)),
                           ("numpy", lambda: np.ones(1 << 20))]:
        try:
            allocate()
            works[name] = True
        except (MemoryError, OSError):
            works[name] = False
    return works


def child_merges_near_the_mapping_limit(distance):
    """In the child: a scattered workload that needs far more mappings than
    the process has left, merged with the default knobs."""
    rng = np.random.default_rng(20261121)
    arena = pydedup.Arena(size=1 << 30)
    a, twin_rows, zero_rows = scattered_workload(arena, rng, pairs=4000, zeros=500)
    expected = a.copy()
    limit = max_map_count()
    filler = fill_mappings(limit - distance)
    before = process_mappings()
    try:
        report = arena.merge()
        error = None
    except Exception as e:                       # reported to the parent
        report, error = None, repr(e)
    after = process_mappings()
    out = dict(limit=limit, before=before, after=after, error=error,
               allocations=allocations_work(), intact=same_bytes(a, expected),
               twins=int(twin_rows.size), zeros=int(zero_rows.size),
               zero_pages=arena.stats().zero_pages)
    if report is not None:
        out.update(merged=report.pages_merged, zeroed=report.pages_zeroed, skipped=report.skipped)
    del filler                                   # its mappings had to last until here
    return out


@pytest.mark.slow
@pytest.mark.parametrize("distance", [6000, 1000])
def test_merging_near_the_process_mapping_limit_leaves_other_code_working(distance):
    if max_map_count() > 1 << 18:
        pytest.skip(f"vm.max_map_count is {max_map_count()}: too many mappings to fill quickly")
    out = run_child("child_merges_near_the_mapping_limit", distance)
    assert out["limit"] - out["before"] <= distance + 1
    # 8000 lone pages would need 16,000 mappings, more than the process had
    # left: the merge stops short of the limit instead of failing.
    assert out["error"] is None
    assert out["after"] < out["limit"]
    assert out["allocations"] == {"mmap": True, "bytearray": True, "numpy": True}
    assert out["intact"]
    assert out["skipped"]["mapping_budget"] > 0, out
    assert out["merged"] + out["skipped"]["mapping_budget"] == out["twins"]
    assert out["skipped"]["no_memory"] == 0
    assert out["zeroed"] == out["zero_pages"] == out["zeros"]


# -- RLIMIT_DATA and the mprotect barrier --------------------------------------
# RLIMIT_DATA counts a private mapping only while it is writable. A run the
# mprotect barrier made read-only gives its room back, and another thread can
# take it, so mprotect may refuse to make the run writable again.

def limit_data(margin):
    """RLIMIT_DATA, soft and hard (what `ulimit -d` sets), at what the
    process has now plus `margin`."""
    limit = process_data() + margin
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


class Hog(threading.Thread):
    """Takes every page of RLIMIT_DATA it can get, a page at a time, as code
    that allocates until MemoryError would, and holds them until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.held, self.may_take, self.stop = [], threading.Event(), threading.Event()

    def run(self):
        self.may_take.wait()
        while not self.stop.is_set():
            try:
                self.held.append(mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
            except OSError:
                time.sleep(0.001)


def child_merges_while_the_data_limit_is_taken(seconds):
    """In the child: zero pages, and pages a thread writes while merges run,
    in an arena whose runs lose their RLIMIT_DATA room while protected
    (Core.squeeze_data takes it, as another thread could)."""
    rows = 8192
    arena = pydedup.Arena(size=1 << 28, barrier="mprotect")
    a = arena.array(np.random.default_rng(3).random((rows, PAGE_FLOATS)))
    expected = a[:, 7].copy()
    zero_masks = [np.random.default_rng(i).random(rows) < 0.6 for i in range(7)]
    stop, writer_may_go, writer_paused = threading.Event(), threading.Event(), threading.Event()

    def writer():                                # pages change between scan and remap
        rng, value = np.random.default_rng(5), 0.0
        while not stop.is_set():
            if not writer_may_go.is_set():
                writer_paused.set()
                writer_may_go.wait()
                continue
            writer_paused.clear()
            row, value = int(rng.integers(rows)), value + 1
            a[row, 7] = expected[row] = value

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    limit_data(64 << 20)
    core = testing.core(arena)
    core.squeeze_data = True
    merges = zeroed = changed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (changed and zeroed and merges >= 5):
        writer_may_go.clear()
        writer_paused.wait()
        mask = zero_masks[merges % len(zero_masks)]
        a[mask] = expected[mask] = 0.0
        writer_may_go.set()
        report = arena.merge()
        merges, zeroed, changed = (merges + 1, zeroed + report.pages_zeroed,
                                   changed + report.skipped["changed"])
    stop.set()
    writer_may_go.set()
    thread.join()
    core.squeeze_data = False
    return dict(merges=merges, zeroed=zeroed, changed=changed,
                restored_in_pieces=core.restored_in_pieces,
                lost=int(np.count_nonzero(a[:, 7] != expected)),
                still_zero=bool(not a[zero_masks[(merges - 1) % len(zero_masks)], 8:].any()),
                mappings=arena.stats().mappings, mapping_budget=arena.max_mappings)


@pytest.mark.slow
def test_a_run_kept_read_only_by_the_data_limit_is_made_writable_in_pieces():
    out = run_child("child_merges_while_the_data_limit_is_taken", 20)
    assert out["lost"] == 0 and out["still_zero"], out
    assert out["zeroed"] > 0 and out["restored_in_pieces"] > 0, out
    assert out["mappings"] <= out["mapping_budget"]
    if out["changed"] == 0:
        pytest.skip(f"in {out['merges']} merges no page changed between its scan and its remap, "
                    "so no run had to be made writable with its content moved")


def child_merges_with_the_data_limit_spent(unused):
    """In the child: zero pages and twins, merged with the mprotect barrier
    while a hog holds the whole of RLIMIT_DATA; then again after it let go."""
    rng = np.random.default_rng(4)
    arena = pydedup.Arena(size=1 << 28, barrier="mprotect")
    a, twin_rows, zero_rows = scattered_workload(arena, rng, pairs=100, zeros=100)
    expected = a.copy()
    hog = Hog()
    hog.start()                                  # its stack is data too: before the limit
    limit_data(1 << 20)
    hog.may_take.set()
    while len(hog.held) < 256:                   # the 1 MiB margin, and no more
        time.sleep(0.01)
    try:
        spent, error = arena.merge(), None
    except MemoryError as e:
        spent, error = None, repr(e)
    hog.stop.set()
    hog.join()
    hog.held.clear()
    intact_then = same_bytes(a, expected)
    freed = arena.merge()
    return dict(error=error, intact_then=intact_then, intact=same_bytes(a, expected),
                spent=spent and dict(merged=spent.pages_merged, zeroed=spent.pages_zeroed,
                                     skipped=spent.skipped),
                freed=dict(merged=freed.pages_merged, zeroed=freed.pages_zeroed),
                twins=int(twin_rows.size), zeros=int(zero_rows.size))


def test_with_the_data_limit_spent_runs_are_skipped_and_none_waits():
    """Nothing is protected that could not be made writable again: a run
    that cannot hold room for its way back is not merged, and says so."""
    out = run_child("child_merges_with_the_data_limit_spent", None)
    assert out["intact_then"] and out["intact"]
    if out["spent"] is not None:                 # else the pass's bookkeeping was refused
        spent = out["spent"]
        assert spent["merged"] == spent["zeroed"] == 0
        assert spent["skipped"]["no_memory"] == out["twins"] + out["zeros"]
    merged_before = 0 if out["spent"] is None else out["spent"]["merged"]
    assert merged_before + out["freed"]["merged"] == out["twins"]
    assert out["freed"]["zeroed"] == out["zeros"]


# -- a frame store that cannot grow ------------------------------------------

def vm_size() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmSize:")).split()[1]) * 1024


def test_an_arena_reserves_about_twice_its_size_of_address_space():
    """Its pages, and the views of the frame store's memfds, which hold
    their stripes one after the other: together as long as the pages (the
    records add 28 bytes a page). Under `ulimit -v` that is what an arena
    costs."""
    size = 1 << 34
    before = vm_size()
    arena = pydedup.Arena(size=size)
    try:
        assert vm_size() - before < 2.05 * size
    finally:
        arena.close()


def writable(pages_allowed, frames):
    """How many of frames [0, frames) lie below page `pages_allowed` of
    their memfd."""
    return sum(frame_place(f)[1] < pages_allowed for f in range(frames))


def child_merges_with_a_frame_store_limit(pages_allowed, pairs, threads):
    """In the child: RLIMIT_FSIZE stops pwrite into each memfd of the
    frame store at its page `pages_allowed` (EFBIG; SIGXFSZ would kill the
    process, so it is ignored). Merge, then lift the limit and merge
    again."""
    rng = np.random.default_rng(20261121)
    arena = pydedup.Arena(size=1 << 28, threads=threads)
    a = arena.array(rng.random((pairs, PAGE_FLOATS)))
    b = arena.array(a)                           # `pairs` frames wanted
    z = arena.zeros((32, PAGE_FLOATS))
    z[:] = 0.0
    unique = arena.array(rng.random((16, PAGE_FLOATS)))
    expected_a, expected_unique = a.copy(), unique.copy()

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (pages_allowed * PAGE, hard))
    try:
        report = arena.merge()
        error = None
    except Exception as e:                       # reported to the parent
        report, error = None, repr(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    def state():
        stats = arena.stats()
        touch(z)
        zero = zero_page_mapped(z)
        return dict(offsets_a=frame_offsets(a), offsets_b=frame_offsets(b),
                    frames_in_use=stats.frames_in_use, frame_store_bytes=stats.frame_store_bytes,
                    zero_pages=stats.zero_pages, pages_sharing=stats.pages_sharing,
                    zero_mapped=None if zero is None else all(zero),
                    intact=(same_bytes(a, expected_a) and same_bytes(b, expected_a)
                            and same_bytes(unique, expected_unique) and not z.any()))

    out = dict(error=error, first=state())
    if report is not None:
        out["first"].update(merged=report.pages_merged, zeroed=report.pages_zeroed,
                            frames_new=report.frames_new, skipped=report.skipped)
    again = arena.merge()
    out["second"] = state()
    out["second"].update(merged=again.pages_merged, skipped=again.skipped)
    return out


@pytest.mark.parametrize("pages_allowed, pairs, threads", [
    (0, 64, 1), (8, 64, 1), (8, 64, 2),
    # Several writes of WRITE_BEHIND_PAGES frames, posted for the helper
    # (_writes.h), each into another memfd: each fails in its middle.
    (600, 4000, 2), (600, 4000, 1)])
def test_a_frame_store_that_cannot_grow_stops_the_merge_cleanly(pages_allowed, pairs, threads):
    out = run_child("child_merges_with_a_frame_store_limit", pages_allowed, pairs, threads)
    first, second = out["first"], out["second"]
    # The merge reports the refusal instead of raising, and loses nothing.
    assert out["error"] is None
    assert first["intact"]
    assert first["skipped"]["no_memory"] > 0
    # Pages that did get frames are merged, in pairs, within the limit; a
    # frame that could not be written is not left in use.
    assert first["frames_new"] <= writable(pages_allowed, pairs)
    assert first["merged"] == 2 * first["frames_new"]
    assert first["merged"] + first["skipped"]["no_memory"] == 2 * pairs
    assert first["frames_in_use"] == first["frames_new"]
    assert first["frame_store_bytes"] == first["frames_new"] * PAGE, \
        "the frame store holds memory that no frame in use accounts for"
    merged_a = [offset for offset in first["offsets_a"] if offset is not None]
    assert len(merged_a) == first["frames_new"]
    assert all(offset < pages_allowed * PAGE for offset in merged_a)
    assert first["offsets_a"] == first["offsets_b"]
    # Zero pages need no frame: they all go.
    assert first["zeroed"] == first["zero_pages"] == 32
    assert first["zero_mapped"] in (True, None)
    # With the limit lifted the next merge does the rest.
    assert second["skipped"]["no_memory"] == 0
    assert first["merged"] + second["merged"] == 2 * pairs
    assert (second["frames_in_use"], second["pages_sharing"]) == (pairs, pairs)
    assert None not in second["offsets_a"] and second["offsets_a"] == second["offsets_b"]
    assert second["zero_pages"] == 32 and second["zero_mapped"] in (True, None)
    assert second["intact"]
