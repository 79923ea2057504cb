"""Tiles: a run of pages of one content maps onto consecutive frames of that
content, read back from the kernel (/proc/self/maps offsets, PSS), not from
pydedup's counters alone."""
import gc
import os

import numpy as np
import pytest

import pydedup
from pydedup import testing

from kernel import PAGE, frame_offsets, process_pss

PAGE_FLOATS = PAGE // 8


def arena_mappings(arena):
    lo, hi = testing.address_range(arena)
    return pydedup.procfs.count_mappings(lo, hi)[1]


def test_a_run_of_nan_maps_a_tile_of_consecutive_frames_in_few_mappings(arena):
    arena.tile_pages = 16
    a = arena.full(256 * PAGE_FLOATS, np.nan)
    before = arena_mappings(arena)
    report = arena.merge()
    assert report.pages_merged == 256 and report.skipped["mapping_budget"] == 0
    offsets = frame_offsets(a)
    assert None not in offsets
    frames = sorted(set(offsets))
    assert len(frames) == report.frames_new <= 16
    assert report.tile_frames_new == report.frames_new - 1
    # the tile's frames are consecutive in the memfd, and pages walk them in order
    assert frames == [frames[0] + i * PAGE for i in range(len(frames))]
    steps = sum(1 for x, y in zip(offsets, offsets[1:]) if y != x + PAGE)
    added = arena_mappings(arena) - before
    assert added <= steps + 2 < 256 // 4           # a mapping a wrap, not a page
    stats = arena.stats()
    assert stats.tiles == 1 and stats.tile_frames == len(frames) == stats.pages_shared
    assert np.isnan(a).all()
    testing.check_invariants(arena)


def test_without_tiles_every_page_of_the_run_is_a_mapping(arena):
    arena.tile_pages = 1
    a = arena.full(64 * PAGE_FLOATS, np.nan)
    before = arena_mappings(arena)
    report = arena.merge()
    assert report.frames_new == 1 and report.tile_frames_new == 0
    assert len(set(frame_offsets(a))) == 1
    assert arena_mappings(arena) - before >= 63


def test_writes_to_tile_pages_stay_private_and_exact(arena, rng):
    arena.tile_pages = 8
    a = arena.full(100 * PAGE_FLOATS, -9999.0)
    b = arena.full(100 * PAGE_FLOATS, -9999.0)
    arena.merge()
    assert None not in frame_offsets(a) and set(frame_offsets(a)) == set(frame_offsets(b))
    where = rng.choice(a.size, 50, replace=False)
    a[where] = rng.random(50)
    expected = np.full(a.size, -9999.0)
    expected[where] = a[where]
    assert np.array_equal(a, expected)
    assert (b == -9999.0).all()                   # the tile's frames are untouched
    stats = arena.stats()
    assert stats.pages_private == len(set(where // PAGE_FLOATS))
    arena.merge()                                 # the written pages, back as they are
    assert np.array_equal(a, expected) and (b == -9999.0).all()
    testing.check_invariants(arena)


def test_unmerge_restores_private_pages_with_their_content(arena):
    arena.tile_pages = 32
    a = arena.ones(300 * PAGE_FLOATS)
    arena.merge()
    assert arena.stats().tile_frames > 1
    report = arena.unmerge()
    assert report.pages_unmerged == 300
    assert set(frame_offsets(a)) == {None} or arena.stats().pages_private == 300
    stats = arena.stats()
    assert stats.pages_shared == 0 and stats.tiles == 0 and (a == 1.0).all()
    testing.check_invariants(arena)


def test_pss_drops_as_claimed(arena):
    a = arena.full(4096 * PAGE_FLOATS, np.nan)     # 16 MiB
    pss_before = process_pss()
    arena.merge()
    stats = arena.stats()
    a.view(np.uint8)[::PAGE].sum()                 # fault every page in: PSS sees the frames
    dropped = pss_before - process_pss()
    # claimed: every page but the tile's frames; measured within 1 MiB of it
    assert stats.bytes_saved == (4096 - stats.pages_shared) * PAGE
    assert abs(dropped - stats.bytes_saved) < 1 << 20, (dropped, stats.bytes_saved)
    assert stats.pages_shared <= 4096 // 8


def test_runs_of_one_content_in_many_arrays_share_one_tile(arena, rng):
    arena.tile_pages = 64
    arrays = []
    for _ in range(6):
        x = arena.empty(400 * PAGE_FLOATS)
        rng.random(out=x)
        x[37 * PAGE_FLOATS:(37 + 200) * PAGE_FLOATS] = np.nan   # a masked stretch
        arrays.append(x)
    arena.merge()
    frames = set()
    for x in arrays:
        frames |= set(frame_offsets(x)[37:237])
    assert None not in frames and len(frames) <= 64
    assert arena.stats().tiles == 1
    for x in arrays:
        assert np.isnan(x[37 * PAGE_FLOATS:237 * PAGE_FLOATS]).all()
    testing.check_invariants(arena)


def test_tiles_stay_within_the_mapping_budget(arena):
    arena.tile_pages = 4
    arena.max_mappings = 40
    a = arena.full(1024 * PAGE_FLOATS, np.nan)
    before = arena_mappings(arena)
    report = arena.merge()
    assert report.skipped["mapping_budget"] > 0
    assert arena_mappings(arena) - before <= 40
    assert np.isnan(a).all()
    testing.check_invariants(arena)


def test_max_page_sharing_caps_every_tile_frame(arena):
    arena.tile_pages = 4
    arena.max_page_sharing = 8
    a = arena.full(256 * PAGE_FLOATS, 1.5)
    arena.merge()
    offsets = frame_offsets(a)
    assert None not in offsets
    assert max(offsets.count(o) for o in set(offsets)) <= 8
    assert (a == 1.5).all()
    testing.check_invariants(arena)


def test_tiles_are_per_node_with_merge_across_nodes_off(arena):
    nodes = testing.simulate_numa(arena, 2)
    arena.merge_across_nodes = False
    arena.tile_pages = 16
    runs = [arena.full((200, PAGE_FLOATS), np.nan, node=node) for node in (0, 1)]
    arena.merge()
    by_node = arena.stats().frames_by_node
    assert set(by_node) == {0, 1}
    assert not set(frame_offsets(runs[0])) & set(frame_offsets(runs[1]))
    assert nodes is not None and all(np.isnan(r).all() for r in runs)
    testing.check_invariants(arena)


def test_a_forked_child_grows_tiles_in_its_own_memfd_and_the_parent_keeps_its_values(arena):
    arena.tile_pages = 16
    a = arena.full(128 * PAGE_FLOATS, np.nan)
    arena.merge()
    parent_offsets = frame_offsets(a)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            b = arena.full(128 * PAGE_FLOATS, -1.0)
            arena.merge()
            testing.check_invariants(arena)
            a[0] = 7.0
            code = 0 if ((b == -1.0).all() and a[0] == 7.0 and np.isnan(a[1:]).all()) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.isnan(a).all() and frame_offsets(a) == parent_offsets
    b = arena.full(128 * PAGE_FLOATS, -1.0)
    arena.merge()
    assert (b == -1.0).all() and np.isnan(a).all()
    testing.check_invariants(arena)


@pytest.mark.parametrize("bad", [0, -1, 65537, 2.5, "512", True])
def test_bad_tile_pages_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="tile_pages"):
        pydedup.Arena(1 << 20, tile_pages=bad)


def test_the_core_refuses_a_tile_length_out_of_range(arena):
    with pytest.raises(ValueError, match="tile_pages"):
        testing.core(arena).merge(True, 256, 100, 65537)


def test_general_profit_pays_for_the_mappings_merging_added(arena):
    arena.tile_pages = 1                # a mapping a page: what tiles avoid
    a = arena.full(64 * PAGE_FLOATS, np.nan)
    arena.merge()
    stats = arena.stats()
    assert stats.mappings_added == stats.mappings - 1 == arena_mappings(arena) - 1 >= 63
    assert stats.mapping_bytes == stats.mappings_added * pydedup.stats.MAPPING_BYTES
    assert stats.general_profit == stats.bytes_saved - stats.metadata_bytes - stats.mapping_bytes
    arena.unmerge()
    del a
    gc.collect()
    assert arena.stats().mappings_added == arena.stats().mappings - 1


# -- kernel KSM for what the mapping budget could not pay ------------------------

def test_kernel_ksm_merges_what_the_mapping_budget_left(arena, rng):
    from pydedup.bench import ksm
    reason = ksm.available()
    if reason:
        pytest.skip(reason)
    distinct = rng.random((8, PAGE_FLOATS))
    a = arena.empty((512, PAGE_FLOATS))
    a[:] = distinct[np.arange(512) % 8]              # duplicates scattered: a mapping each
    expected = a.copy()
    keep = arena.empty((64, PAGE_FLOATS))
    keep[:] = distinct[0]
    arena.unmergeable(keep)
    arena.max_mappings = 8
    arena.kernel_ksm = True
    with ksm.KernelKSM(pages_to_scan=10_000, sleep_millisecs=0, use_zero_pages=1) as kernel:
        kernel.set(run=1)
        report = arena.merge()
        assert report.skipped["mapping_budget"] > 0
        kernel.merge()                                   # ksmd over what is marked: waits
        stats = arena.stats()
        # the pages pydedup left, not the unmergeable array: at most 512 - merged
        assert 0 < stats.kernel_ksm_pages <= 512 - report.pages_merged
        assert np.array_equal(a, expected) and (keep == distinct[0]).all()
        a[3, 5] = -1.0                                   # a write still lands, privately
        assert a[3, 5] == -1.0 and a[11, 5] == expected[11, 5]
        arena.unmerge()
        testing.check_invariants(arena)


def merge_flags(arena):
    """For each mapping of the arena's range: whether the kernel has it
    VM_MERGEABLE (VmFlags "mg" in /proc/self/smaps)."""
    lo, hi = testing.address_range(arena)
    flags, start = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start = int(head.split("-")[0], 16)
            elif head == "VmFlags:" and lo <= start < hi:
                flags.append("mg" in line.split()[1:])
    return flags


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/ksm"), reason="a kernel without KSM")
def test_kernel_ksm_marks_the_arena_only_when_on_and_the_kernel_runs_ksm(arena, monkeypatch):
    arena.full(64 * PAGE_FLOATS, 2.0)
    arena.merge()
    assert not any(merge_flags(arena))                  # the knob is off by default
    arena.kernel_ksm = True
    monkeypatch.setattr(pydedup.procfs, "ksm_running", lambda: False)
    arena.merge()
    assert not any(merge_flags(arena))
    monkeypatch.setattr(pydedup.procfs, "ksm_running", lambda: True)
    keep = arena.full(8 * PAGE_FLOATS, 3.0)
    arena.unmergeable(keep)
    arena.merge()
    flags = merge_flags(arena)
    assert any(flags) and not all(flags)                # all but the unmergeable array
    arena.unmerge()
    assert not any(merge_flags(arena))                  # unmerge() takes the mark off
    arena.merge()
    arena.kernel_ksm = False
    arena.merge()
    assert not any(merge_flags(arena))
