"""Transparent huge pages in the arena (issue 20): present where numpy would
have them, kept whole by a merge unless enough of their pages merge (the
split rule), merged whole where all their pages match, and no write lost,
through both barriers, fork and unmerge."""
import contextlib
import importlib
import threading

import numpy as np
import pytest
from test_fork import run_in_child

import pydedup
from pydedup import procfs, testing

from kernel import PAGE

arena_module = importlib.import_module("pydedup.arena")   # pydedup.arena is the function
HUGE = 2 << 20
PER_HUGE = HUGE // PAGE                 # pages in a huge page
FLOATS = HUGE // 8                      # float64 in a huge page


def skip_without_thp():
    mode = procfs.thp_mode()
    if mode in ("never", "absent"):
        pytest.skip(f"transparent huge pages are {mode} here")
    if procfs.huge_page_size() != HUGE:
        pytest.skip(f"huge pages of {procfs.huge_page_size()} bytes, not 2 MiB")


@contextlib.contextmanager
def huge_arena(size=256 << 20, **knobs):
    skip_without_thp()
    arena = pydedup.Arena(size=size, huge_pages="on", **knobs)
    try:
        assert arena.stats().huge_pages.startswith("on"), arena.stats().huge_pages
        yield arena
    finally:
        arena.close()


def huge_flags(arena, array):
    """One bool a page of `array`: whether a huge page maps it (PAGEMAP_SCAN)."""
    first, n = testing.page_range(arena, array)
    try:
        found = testing.core(arena).huge_map(first, n)
    except OSError as e:
        pytest.skip(f"PAGEMAP_SCAN cannot tell huge pages here: {e}")
    return np.frombuffer(found, np.uint8) != 0


def huge_bytes_in_smaps(arena):
    """AnonHugePages of the arena's mappings, in bytes."""
    lo, hi = testing.address_range(arena)
    return procfs.smaps_fields(lo, hi, (b"AnonHugePages",))["anonhugepages"]


def scan_whole(arena, scans):
    """The background scanner's steps, until `scans` whole scans are done."""
    for _ in range(scans):
        testing.scan_step(arena)
        while testing.core(arena).scan_cursor != 0:
            testing.scan_step(arena)


def filled_huge(arena, blocks, rng):
    """An array of `blocks` huge pages of unique values, skipped if the
    kernel backed none of them with a huge page (memory too fragmented)."""
    array = arena.empty(blocks * FLOATS)
    array[:] = rng.random(array.size)
    if not huge_flags(arena, array).any():
        pytest.skip("the kernel gave no huge page (memory fragmented, or THP defrag off)")
    return array


# -- the knob ---------------------------------------------------------------------

@pytest.mark.parametrize("mode, numpy_asks, knob, on", [
    ("always", True, "auto", True), ("madvise", True, "auto", True),
    ("madvise", False, "auto", False), ("madvise", False, "on", True),
    ("never", True, "on", False), ("absent", True, "auto", False),
    ("always", True, "off", False)])
def test_the_knob_follows_the_thp_mode_and_numpy(monkeypatch, mode, numpy_asks, knob, on):
    monkeypatch.setattr(procfs, "thp_mode", lambda: mode)
    monkeypatch.setattr(procfs, "huge_page_size", lambda: 0 if mode == "absent" else HUGE)
    monkeypatch.setattr(procfs, "numpy_madvises_hugepage", lambda: numpy_asks)
    pages, why = arena_module._huge_page_choice(knob)
    assert (pages == PER_HUGE) == on, why
    assert why.startswith("on" if on else "off")
    if not on and knob != "off":
        assert mode in why or "NUMPY_MADVISE_HUGEPAGE" in why


@pytest.mark.parametrize("name, value", [("huge_pages", "yes"), ("huge_pages", True),
                                         ("huge_split_min_pages", 0),
                                         ("huge_split_min_pages", 513)])
def test_bad_values_name_the_knob(name, value):
    with pytest.raises(ValueError, match=name):
        pydedup.Arena(size=16 << 20, **{name: value})


def test_off_keeps_the_arena_on_small_pages(rng):
    skip_without_thp()
    with contextlib.closing(pydedup.Arena(size=64 << 20, huge_pages="off")) as arena:
        array = arena.empty(4 * FLOATS)
        array[:] = rng.random(array.size)
        assert arena.stats().huge_pages == "off (huge_pages='off')"
        assert huge_bytes_in_smaps(arena) == 0
        assert not huge_flags(arena, array).any()
        assert arena.stats().huge_pages_in_use == 0


# -- huge pages where numpy would have them ---------------------------------------

def test_big_arrays_start_on_a_huge_page_and_are_backed_by_huge_pages(rng):
    with huge_arena() as arena:
        small = arena.empty(3 * PAGE // 8)          # puts the next array off a boundary by best fit
        big = filled_huge(arena, 4, rng)
        assert big.__array_interface__["data"][0] % HUGE == 0
        assert huge_flags(arena, big).all()
        assert huge_bytes_in_smaps(arena) == 4 * HUGE
        assert arena.stats().huge_pages_in_use >= 4
        del small


def test_the_knob_turned_off_and_on_again_on_a_live_arena(rng):
    with huge_arena() as arena:
        arena.huge_pages = "off"
        assert arena.stats().huge_pages.startswith("off")
        a = arena.empty(4 * FLOATS)
        a[:] = 1.0
        assert not huge_flags(arena, a).any()
        arena.huge_pages = "on"
        b = filled_huge(arena, 2, rng)
        assert huge_flags(arena, b).all()


# -- the split rule -----------------------------------------------------------------

def test_a_huge_page_with_fewer_matches_than_the_knob_is_kept_whole(rng):
    with huge_arena(huge_split_min_pages=64) as arena:
        array = filled_huge(arena, 4, rng)
        blocks = array.reshape(4, PER_HUGE, -1)
        blocks[:, :10] = 0                          # 10 zero pages in each huge page
        expect = array.copy()
        was_huge = huge_flags(arena, array).reshape(4, -1).all(axis=1)
        report = arena.merge()
        assert report.skipped["huge_page"] == 10 * was_huge.sum()
        assert report.huge_pages_kept == was_huge.sum()
        assert report.huge_pages_split == 0
        assert report.pages_zeroed == 10 * (~was_huge).sum()
        assert (huge_flags(arena, array).reshape(4, -1).all(axis=1) == was_huge).all()
        st = arena.stats()
        assert (st.huge_pages_kept, st.pages_kept_huge) == (was_huge.sum(), 10 * was_huge.sum())
        np.testing.assert_array_equal(array, expect)


def test_a_huge_page_with_as_many_matches_as_the_knob_is_split(rng):
    with huge_arena(huge_split_min_pages=64) as arena:
        array = filled_huge(arena, 4, rng)
        array.reshape(4, PER_HUGE, -1)[:, 100:164] = 0     # 64 zero pages in each
        expect = array.copy()
        huge = huge_flags(arena, array).reshape(4, -1).all(axis=1).sum()
        report = arena.merge()
        assert report.huge_pages_split == huge
        assert report.skipped["huge_page"] == 0
        assert report.pages_zeroed == 4 * 64
        assert arena.stats(array).zero_pages == 4 * 64
        assert not huge_flags(arena, array).any()
        assert arena.stats().huge_pages_split == huge
        np.testing.assert_array_equal(array, expect)
        # A split huge page is fenced from khugepaged, which would fill its
        # zapped pages again: its block is advised MADV_NOHUGEPAGE ("nh").
        assert b" nh" in vm_flags(array)


def test_a_huge_page_the_budget_cannot_fence_is_kept_whole(rng):
    # Splitting a block whose zeros are zapped first fences it from khugepaged
    # (MADV_NOHUGEPAGE), with the huge pages after it in its mapping. Here the
    # fence would end inside the mapping, before the fifth block, whose zeros
    # the scan frees whole (no longer a huge page): a mapping, which the spent
    # budget cannot pay, so the four are kept whole, their targets counted.
    # A block of zeros only needs no fence and still goes whole.
    with huge_arena(huge_split_min_pages=64, max_mappings=0) as arena:
        array = filled_huge(arena, 5, rng)
        array.reshape(5, PER_HUGE, -1)[:4, 100:164] = 0    # 64 zero pages in each of four
        array[4 * FLOATS:] = 0                              # the fifth: all zeros
        expect = array.copy()
        was_huge = huge_flags(arena, array).reshape(5, -1).all(axis=1)
        if not was_huge[:4].any():
            pytest.skip("the kernel gave none of the four blocks a huge page")
        report = arena.merge()
        kept = was_huge[:4].sum()
        assert report.huge_pages_split == 0
        assert report.huge_pages_kept == kept
        assert report.skipped["huge_page"] == 64 * kept
        assert report.pages_zeroed == 64 * (4 - kept) + PER_HUGE
        now = huge_flags(arena, array).reshape(5, -1).all(axis=1)
        assert (now[:4] == was_huge[:4]).all() and not now[4]
        assert b" nh" not in vm_flags(array[:4 * FLOATS])
        assert arena.stats().huge_pages_kept == kept
        np.testing.assert_array_equal(array, expect)


def vm_flags(array):
    lo = array.__array_interface__["data"][0]
    with open("/proc/self/smaps", "rb") as f:
        text = f.read().split(b"\n")
    flags, inside = b"", False
    for line in text:
        if line[:1].isdigit() or line[:1].isalpha() and b"-" in line.split(b" ")[0]:
            start, end = (int(x, 16) for x in line.split(b" ")[0].split(b"-"))
            inside = start < lo + array.nbytes and end > lo
        elif inside and line.startswith(b"VmFlags:"):
            flags += line[len(b"VmFlags:"):] + b" "
    return b" " + flags


def test_an_all_zero_huge_page_goes_to_the_zero_page_whole(rng):
    with huge_arena(huge_split_min_pages=512) as arena:
        array = filled_huge(arena, 3, rng)
        array[FLOATS:2 * FLOATS] = 0                # the middle huge page: all zeros
        report = arena.merge()
        assert report.pages_zeroed == PER_HUGE
        assert report.huge_pages_split == report.huge_pages_kept == 0
        assert arena.stats(array).zero_pages == PER_HUGE
        flags = huge_flags(arena, array)
        assert not flags[PER_HUGE:2 * PER_HUGE].any()
        assert (array[FLOATS:2 * FLOATS] == 0).all()


def test_a_huge_page_whose_pages_all_match_maps_onto_frames_whole(rng):
    with huge_arena(huge_split_min_pages=512) as arena:
        a = filled_huge(arena, 2, rng)
        b = arena.empty(a.size)
        b[:] = a
        report = arena.merge()
        assert report.pages_merged == 2 * 2 * PER_HUGE
        assert report.huge_pages_split == report.huge_pages_kept == 0
        np.testing.assert_array_equal(a, b)


def test_the_rule_splits_nothing_in_an_arena_without_huge_pages(rng):
    with contextlib.closing(pydedup.Arena(size=64 << 20, huge_pages="off",
                                          huge_split_min_pages=512)) as arena:
        array = arena.empty(2 * FLOATS)
        array[:] = rng.random(array.size)
        array[:10 * PAGE // 8] = 0
        report = arena.merge()
        assert report.pages_zeroed == 10
        assert report.skipped["huge_page"] == report.huge_pages_kept == 0


# -- tracking, barriers, fork, unmerge ------------------------------------------------

def test_writes_after_a_merge_keep_huge_pages_and_are_seen(barrier, rng):
    """Huge pages are not left write-protected for the tracking, whichever
    barrier the pass held its runs with: a write would split them."""
    with huge_arena(barrier=barrier) as arena:
        if not testing.core(arena).tracking:
            pytest.skip("written-page tracking is not available here")
        a = filled_huge(arena, 2, rng)
        b = filled_huge(arena, 2, rng)
        arena.merge()
        b[:] = a                                    # written into tracked huge pages
        assert huge_flags(arena, a).all() and huge_flags(arena, b).all()
        report = arena.merge()                      # the write was seen
        assert report.pages_merged == 2 * 2 * PER_HUGE
        np.testing.assert_array_equal(a, b)


def test_no_write_is_lost_while_huge_pages_merge(barrier):
    with huge_arena(size=64 << 20, barrier=barrier, huge_split_min_pages=1) as arena:
        regions = 6
        array = arena.zeros(regions * FLOATS)       # each writer owns a whole huge page
        errors, last, stop = [], {}, threading.Event()

        def writer(k):
            region, value = array[k * FLOATS:(k + 1) * FLOATS], 0.0
            while not stop.is_set():
                value += 1
                if k % 2:
                    region[: FLOATS // 2] = value   # half: the huge page is split
                else:
                    np.add(region, 1.0, out=region) if value > 1 else region.fill(1.0)
                    value = float(region[0])
                    if not (region == value).all():
                        errors.append(f"region {k}: wrote {value}, read {set(region[:8])}")
                        return
                last[k] = value

        threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(regions)]
        for t in threads:
            t.start()
        merged = 0
        try:
            for _ in range(15):
                report = arena.merge()
                merged += report.pages_merged + report.pages_zeroed
                if errors:
                    break
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []
        assert merged > 0
        for k, value in last.items():
            region = array[k * FLOATS:(k + 1) * FLOATS]
            assert (region[: FLOATS // 2] == value).all(), k


def test_a_forked_child_and_its_parent_keep_their_values_around_huge_pages(rng):
    with huge_arena(huge_split_min_pages=64) as arena:
        array = filled_huge(arena, 4, rng)
        blocks = array.reshape(4, PER_HUGE, -1)
        blocks[0, :100] = 0                         # split
        blocks[1, :10] = 0                          # kept
        blocks[2] = 0                               # whole
        expect = array.copy()
        arena.merge()

        def child():
            ok = (array == expect).all()
            array[:] = 7.0                          # the child's writes stay its own
            arena.merge()
            return ok and (array == 7.0).all()

        assert run_in_child(child) == 0
        np.testing.assert_array_equal(array, expect)
        array[::1000] = 3.0
        expect[::1000] = 3.0
        arena.merge()
        np.testing.assert_array_equal(array, expect)
        testing.check_invariants(arena)


def test_unmerge_after_split_and_kept_huge_pages_keeps_every_value(rng):
    with huge_arena(huge_split_min_pages=64) as arena:
        array = filled_huge(arena, 3, rng)
        blocks = array.reshape(3, PER_HUGE, -1)
        blocks[0, :100] = 0
        blocks[1, :10] = 0
        blocks[2] = 0
        expect = array.copy()
        arena.merge()
        zeroed = arena.stats(array).zero_pages
        assert zeroed >= 100 + PER_HUGE
        assert arena.unmerge().pages_unmerged == zeroed
        assert arena.stats(array).zero_pages == 0
        np.testing.assert_array_equal(array, expect)
        testing.check_invariants(arena)


def test_the_background_scanner_applies_the_rule_on_whole_huge_pages(rng):
    with huge_arena(huge_split_min_pages=64, pages_to_scan=PER_HUGE // 2) as arena:
        array = filled_huge(arena, 2, rng)
        array.reshape(2, PER_HUGE, -1)[:, 300:310] = 0      # few matches: kept
        huge = huge_flags(arena, array).reshape(2, -1).all(axis=1).sum()
        scan_whole(arena, 2)                        # the second scan merges what stayed
        kept = arena.stats().pages_kept_huge
        assert kept == 10 * huge                    # a step ends on a huge page's boundary
        assert huge_flags(arena, array).reshape(2, -1).all(axis=1).sum() == huge


@pytest.mark.parametrize("zeros_in_first", [True, False])
def test_the_background_scanner_zaps_the_zeros_of_every_huge_page_after_the_budget_is_spent(
        rng, zeros_in_first):
    # The scanner goes a block a step. The first block's scattered copies
    # spend the mapping budget; the zeros of the blocks after still go: the
    # first split fences the huge pages after it too (MADV_NOHUGEPAGE, against
    # khugepaged), so their splits need no fence of their own. Before, each
    # needed one the budget could no longer pay, and a scattered workload
    # saved 22% instead of 73%.
    blocks, zeros = 6, 128
    with huge_arena(huge_split_min_pages=64, pages_to_scan=PER_HUGE, max_mappings=48) as arena:
        array = filled_huge(arena, blocks, rng)
        pages = array.reshape(blocks, PER_HUGE, -1)
        pages[int(not zeros_in_first):, 256:256 + zeros] = 0
        pages[0, 1:200:2] = pages[0, 0]     # 100 scattered copies: 200 mappings wanted
        expect = array.copy()
        huge = huge_flags(arena, array).reshape(blocks, -1).all(axis=1)
        if not huge.all():
            pytest.skip("the kernel gave not every block a huge page")
        scan_whole(arena, 2)
        stats = arena.stats(array)
        assert stats.zero_pages == (blocks - int(not zeros_in_first)) * zeros
        assert 0 < stats.pages_merged < 101                  # the budget stopped the copies
        assert not huge_flags(arena, array).any()
        assert b" nh" in vm_flags(array[-FLOATS:])
        assert arena.stats().mappings <= 48
        np.testing.assert_array_equal(array, expect)


def test_a_fence_covers_every_huge_page_after_the_split_block(rng):
    # More blocks than fence_end asks the kernel about at a time (64).
    blocks = 70
    with huge_arena(size=(blocks + 8) * HUGE, huge_split_min_pages=64) as arena:
        array = filled_huge(arena, blocks, rng)
        if not huge_flags(arena, array).all():
            pytest.skip("the kernel gave not every block a huge page")
        array.reshape(blocks, PER_HUGE, -1)[0, :128] = 0
        assert arena.merge().huge_pages_split == 1
        assert b" hg" not in vm_flags(array) and b" nh" in vm_flags(array[-FLOATS:])
        assert huge_flags(arena, array[FLOATS:]).all()      # the advice splits none


def test_a_block_fenced_before_splits_later_without_a_mapping(rng):
    # A split fences the huge pages after it in its mapping; zeros written
    # into one of them later go with a budget of none, its fence there already
    # (also when another array's fence came since).
    with huge_arena(huge_split_min_pages=64) as arena:
        a = filled_huge(arena, 4, rng)
        small = arena.empty(1000)                   # a mapping of its own between the two
        b = filled_huge(arena, 4, rng)
        if not (huge_flags(arena, a).all() and huge_flags(arena, b).all()):
            pytest.skip("the kernel gave not every block a huge page")
        for array in (a, b):
            array.reshape(4, PER_HUGE, -1)[0, :128] = 0
        assert arena.merge().huge_pages_split == 2
        assert b" hg" not in vm_flags(a) and b" hg" not in vm_flags(b)
        a.reshape(4, PER_HUGE, -1)[2, :128] = 0
        expect = a.copy()
        arena.max_mappings = 0
        report = arena.merge()
        assert report.huge_pages_split == 1 and report.huge_pages_kept == 0
        assert arena.stats(a).zero_pages == 2 * 128
        np.testing.assert_array_equal(a, expect)
        del small


def test_a_fence_leaves_blocks_not_yet_touched_to_fault_in_huge_pages(rng):
    # The fence covers the huge pages after a split block, not the blocks of
    # the array that hold no memory yet: written later, they get huge pages.
    with huge_arena(huge_split_min_pages=64) as arena:
        array = arena.empty(4 * FLOATS)
        array[:2 * FLOATS] = rng.random(2 * FLOATS)
        if not huge_flags(arena, array[:2 * FLOATS]).all():
            pytest.skip("the kernel gave the written blocks no huge page")
        array.reshape(4, PER_HUGE, -1)[0, :128] = 0
        report = arena.merge()
        assert report.huge_pages_split == 1 and report.pages_zeroed == 128
        assert b" nh" in vm_flags(array[FLOATS:2 * FLOATS])
        assert b" nh" not in vm_flags(array[2 * FLOATS:])
        array[2 * FLOATS:] = 1.0
        if not huge_flags(arena, array[2 * FLOATS:]).all():
            pytest.skip("the kernel gave the blocks written last no huge page")


def test_small_arrays_get_no_huge_page_and_freed_big_ones_give_theirs_back(rng):
    with huge_arena() as arena:
        small = arena.empty(64 * PAGE // 8)         # 256 KiB: numpy gives it no huge page either
        small[:] = 1.0
        assert not huge_flags(arena, small).any()
        assert huge_bytes_in_smaps(arena) == 0
        big = filled_huge(arena, 2, rng)
        first, n = testing.page_range(arena, big)
        del big
        testing.check_invariants(arena)             # takes the lock: the pages come back
        assert testing.free_pages(arena) == arena.stats().bytes_reserved // PAGE - 64
        below = arena.empty(1000 * PAGE // 8)       # under 4 MiB, where the big one was
        below[:] = 2.0
        start, count = testing.page_range(arena, below)
        assert start < first + n and first < start + count   # on pages the big one had
        assert not huge_flags(arena, below).any()
        assert huge_bytes_in_smaps(arena) == 0
