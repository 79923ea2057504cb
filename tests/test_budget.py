"""The mapping budget spent on whole contents (_budget.pxi): when it cannot
pay every run, a content is merged whole or, where kernel KSM takes what is
left, left wholly private, no page of it merged and no frame kept for it.
Read from the kernel (/proc/self/maps offsets) and the arrays' bytes."""
import contextlib
import os

import numpy as np
import pytest

import pydedup
from pydedup import procfs, testing

from kernel import PAGE, frame_offsets

PAGE_FLOATS = PAGE // 8


@pytest.fixture(autouse=True)
def small_pages(monkeypatch):
    """Mappings counted on 4 KiB pages (a huge page is a mapping of its own)."""
    monkeypatch.setenv("PYDEDUP_HUGE_PAGES", "off")


@pytest.fixture
def kernel_ksm_runs(monkeypatch):
    """The kernel_ksm knob is on and ksmd is taken to run: the arena marks
    itself MADV_MERGEABLE (no privilege needed) and leaves the rest whole."""
    if not os.path.isdir("/sys/kernel/mm/ksm"):
        pytest.skip("a kernel without KSM: MADV_MERGEABLE is refused")
    monkeypatch.setattr(procfs, "ksm_running", lambda: True)


def scattered_contents(arena, rng, copies):
    """One array: content i repeated copies[i] times, every copy alone
    between unique random pages (a mapping boundary on each side: two
    mappings a merged copy), in shuffled order. Returns the array and, per
    content, the rows of its copies."""
    which = rng.permutation(np.repeat(np.arange(len(copies)), copies))
    a = arena.empty((2 * which.size + 1, PAGE_FLOATS))
    a[:] = rng.random(a.shape)
    rows = 2 * np.arange(which.size) + 1
    a[rows] = rng.random((len(copies), PAGE_FLOATS))[which]
    return a, [rows[which == i] for i in range(len(copies))]


def merged_rows(a, rows):
    offsets = frame_offsets(a)
    return [offsets[r] is not None for r in rows]


def arena_mappings(arena):
    lo, hi = testing.address_range(arena)
    return procfs.count_mappings(lo, hi)[1]


def test_a_content_the_budget_cannot_finish_stays_wholly_private(rng, kernel_ksm_runs):
    copies = [2, 5, 9, 14, 20, 27, 33, 40]       # two mappings a copy: 300 in all
    with contextlib.closing(pydedup.Arena(size=1 << 28, max_mappings=120,
                                          kernel_ksm=True)) as arena:
        a, rows = scattered_contents(arena, rng, copies)
        expected = a.copy()
        before = arena_mappings(arena)
        report = arena.merge()
        whole = [i for i, r in enumerate(rows) if all(merged_rows(a, r))]
        left = [i for i, r in enumerate(rows) if not any(merged_rows(a, r))]
        # Every content is merged whole or not at all ...
        assert sorted(whole + left) == list(range(len(copies)))
        assert whole and left
        # ... best first (most pages saved a mapping: the most copies), then
        # what still fits: 119 mappings to add (the reservation is one) pay
        # 40 copies (80), then 14 (28), then 5 (10).
        assert whole == [1, 3, 7]
        assert report.contents_left == len(left)
        assert report.skipped["mapping_budget"] == sum(copies[i] for i in left)
        assert report.pages_merged == sum(copies[i] for i in whole)
        # All copies of a merged content share one frame; no frame is kept
        # for a content left private (its frame was reclaimed).
        for i in whole:
            assert len({frame_offsets(a)[r] for r in rows[i]}) == 1
        stats = arena.stats()
        assert stats.pages_shared == len(whole)
        assert arena_mappings(arena) - before <= 120
        assert np.array_equal(a.view(np.uint64), expected.view(np.uint64))
        testing.check_invariants(arena)
        # A second pass, the budget spent, changes nothing and still merges
        # no part of a content.
        again = arena.merge()
        assert again.pages_merged == 0 and again.contents_left == len(left)
        assert all(not any(merged_rows(a, rows[i])) for i in left)
        testing.check_invariants(arena)


def test_without_kernel_ksm_what_is_left_of_the_budget_merges_in_part(rng):
    # One content of 100 lone copies (200 mappings) and a budget of 60: no
    # content can be finished; without kernel KSM the budget is spent on it
    # all the same, as before.
    with contextlib.closing(pydedup.Arena(size=1 << 28, max_mappings=60)) as arena:
        a, [rows] = scattered_contents(arena, rng, [100])
        expected = a.copy()
        report = arena.merge()
        assert 25 <= report.pages_merged == sum(merged_rows(a, rows)) <= 30
        assert report.contents_left == 1
        assert report.pages_merged + report.skipped["mapping_budget"] == 100
        assert np.array_equal(a.view(np.uint64), expected.view(np.uint64))
        testing.check_invariants(arena)


def test_with_kernel_ksm_a_content_too_big_for_the_budget_is_not_begun(rng, kernel_ksm_runs):
    with contextlib.closing(pydedup.Arena(size=1 << 28, max_mappings=60,
                                          kernel_ksm=True)) as arena:
        a, [rows] = scattered_contents(arena, rng, [100])
        report = arena.merge()
        assert report.pages_merged == 0 and not any(merged_rows(a, rows))
        assert report.skipped["mapping_budget"] == 100 and report.contents_left == 1
        assert arena.stats().pages_shared == 0
        testing.check_invariants(arena)


def test_a_copied_array_goes_before_scattered_copies(rng, kernel_ksm_runs):
    # The scattered copies come first in the arena; in address order they
    # would take the budget. A copied array is one run (two mappings) that
    # saves 64 pages: it goes first.
    with contextlib.closing(pydedup.Arena(size=1 << 28, max_mappings=30,
                                          kernel_ksm=True)) as arena:
        s, rows = scattered_contents(arena, rng, [10, 10])
        x = arena.array(rng.random((64, PAGE_FLOATS)))
        y = arena.array(x)
        report = arena.merge()
        assert None not in frame_offsets(y) and frame_offsets(x) == frame_offsets(y)
        assert sum(all(merged_rows(s, r)) for r in rows) == 1     # 20 mappings: one fits
        assert sum(not any(merged_rows(s, r)) for r in rows) == 1
        assert report.contents_left == 1
        np.testing.assert_array_equal(x, y)
        testing.check_invariants(arena)


@pytest.mark.parametrize("whole", [False, True], ids=["partial", "whole"])
def test_with_enough_budget_every_target_goes_as_before(rng, whole, monkeypatch):
    monkeypatch.setattr(procfs, "ksm_running", lambda: whole)
    with contextlib.closing(pydedup.Arena(size=1 << 28, kernel_ksm=whole)) as arena:
        a, rows = scattered_contents(arena, rng, [2, 7, 30])
        x = arena.array(rng.random((40, PAGE_FLOATS)))
        y = arena.array(x)
        z = arena.zeros((16, PAGE_FLOATS))
        z[:] = 0.0
        report = arena.merge()
        assert report.contents_left == 0 and report.skipped["mapping_budget"] == 0
        assert report.pages_merged == 39 + 80 and report.pages_zeroed == 16
        assert all(all(merged_rows(a, r)) for r in rows)
        assert None not in frame_offsets(y) and frame_offsets(x) == frame_offsets(y)
        testing.check_invariants(arena)


def test_runs_that_share_a_boundary_are_paid_what_they_cost_together(rng, kernel_ksm_runs):
    # Copies in pairs of neighbours, of two contents. The frames of the two
    # follow each other: a pair in that order is one run (two mappings), in
    # the other order two runs that share a boundary (three mappings, not
    # the four apply charges at worst). 10 of each: 50 mappings, 60 at
    # worst. A budget of 50 pays all of them, and the kernel shows 50 more.
    with contextlib.closing(pydedup.Arena(size=1 << 28, max_mappings=51,
                                          kernel_ksm=True)) as arena:
        distinct = rng.random((2, PAGE_FLOATS))
        a = arena.empty((3 * 20 + 1, PAGE_FLOATS))
        a[:] = rng.random(a.shape)
        first, second = 3 * np.arange(20) + 1, 3 * np.arange(20) + 2
        order = np.arange(20) % 2                # 0, 1: in frame order; 1, 0: not
        a[first], a[second] = distinct[order], distinct[1 - order]
        expected = a.copy()
        before = arena_mappings(arena)           # the reservation: one
        report = arena.merge()
        assert report.pages_merged == 40 and report.contents_left == 0
        assert report.skipped["mapping_budget"] == 0
        assert arena_mappings(arena) - before == 50
        assert arena.stats().mappings <= 51
        assert np.array_equal(a.view(np.uint64), expected.view(np.uint64))
        testing.check_invariants(arena)


def test_the_background_scanner_keeps_contents_whole_within_a_step(rng, kernel_ksm_runs):
    copies = [3, 8, 20, 30]
    with contextlib.closing(pydedup.Arena(size=1 << 28, max_mappings=80, kernel_ksm=True,
                                          pages_to_scan=1 << 20, sleep_millisecs=10)) as arena:
        a, rows = scattered_contents(arena, rng, copies)
        expected = a.copy()
        arena.run = 1
        try:
            deadline = 200
            while arena.stats().full_scans < 2 and deadline:
                deadline -= 1
                import time
                time.sleep(0.05)
        finally:
            arena.run = 0
        assert arena.stats().full_scans >= 2
        states = [merged_rows(a, r) for r in rows]
        assert all(all(s) or not any(s) for s in states)
        assert any(all(s) for s in states) and any(not any(s) for s in states)
        assert np.array_equal(a.view(np.uint64), expected.view(np.uint64))
        testing.check_invariants(arena)


def test_huge_pages_split_for_their_matches_keep_contents_whole(rng, kernel_ksm_runs):
    # The huge-page rule decides first (blocks with matches are split and
    # fenced, a mapping each), then the budget: what is left of it is spent
    # on whole contents.
    if procfs.thp_mode() in ("never", "absent"):
        pytest.skip("transparent huge pages are off here")
    copies = [6, 10, 16, 24]
    with contextlib.closing(pydedup.Arena(size=1 << 28, max_mappings=60, kernel_ksm=True,
                                          huge_pages="on", huge_split_min_pages=1)) as arena:
        a = arena.empty((2048, PAGE_FLOATS))         # 8 MiB: four huge pages
        a[:] = rng.random(a.shape)
        which = rng.permutation(np.repeat(np.arange(len(copies)), copies))
        at = np.sort(rng.choice(np.arange(1, 2048, 2), which.size, replace=False))
        a[at] = rng.random((len(copies), PAGE_FLOATS))[which]
        rows = [at[which == i] for i in range(len(copies))]
        expected = a.copy()
        report = arena.merge()
        if report.huge_pages_split == 0:
            pytest.skip("the kernel gave the array no huge page")
        states = [merged_rows(a, r) for r in rows]
        assert all(all(s) or not any(s) for s in states)
        assert report.contents_left == sum(not any(s) for s in states) > 0
        assert any(all(s) for s in states)
        assert arena.stats().mappings <= 60
        assert np.array_equal(a.view(np.uint64), expected.view(np.uint64))
        testing.check_invariants(arena)


@pytest.mark.parametrize("max_mappings", [60, 100_000])
def test_runs_share_a_protection_only_while_the_budget_pays_each_at_its_worst(
        rng, barrier, max_mappings):
    """The uffd barrier holds neighbouring runs under one protection
    (_remap.pxi gather_run) only while the budget pays every run at its
    worst: the mappings a group splits join again only when it lets go, and
    a plan for a short budget counts on such joins. So with 60 mappings for
    100 lone copies each run is held alone, and the mappings added stay
    within the budget; mprotect holds each run alone always."""
    with contextlib.closing(pydedup.Arena(size=1 << 28, max_mappings=max_mappings,
                                          barrier=barrier)) as arena:
        a, [rows] = scattered_contents(arena, rng, [100])
        expected = a.copy()
        before = arena_mappings(arena)
        report = arena.merge()
        assert arena_mappings(arena) - before <= max_mappings
        assert report.pages_merged == (100 if max_mappings > 200 else sum(merged_rows(a, rows)))
        if barrier == "mprotect" or max_mappings < 200:
            assert report.protections >= report.pages_merged     # a run of one page each
        else:
            assert report.protections == -(-100 // 64)          # copies one page apart
        assert np.array_equal(a.view(np.uint64), expected.view(np.uint64))
        testing.check_invariants(arena)
