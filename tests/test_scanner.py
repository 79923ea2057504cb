"""The background scanner (run, pages_to_scan, sleep_millisecs) and the
written-page tracking that lets a scan skip pages nobody wrote."""
import contextlib
import gc
import threading
import time

import numpy as np
import pytest

import pydedup
from pydedup import testing

from kernel import FILE, PAGE, PRESENT, frame_offsets, pagemap, zero_page_mapped

PAGE_FLOATS = PAGE // 8


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def scanner_threads():
    return [t for t in threading.enumerate() if t.name == "pydedup-scanner"]


def test_the_scanner_merges_in_the_background(arena, rng):
    a = arena.array(rng.random(64 * PAGE_FLOATS))
    b = arena.array(a)
    z = arena.zeros(32 * PAGE_FLOATS)
    z[:] = 0.0
    expected = a.copy()
    arena.run = 1
    assert wait_for(lambda: arena.stats().pages_sharing == 64 and arena.stats().zero_pages == 32)
    assert frame_offsets(a) == frame_offsets(b) and None not in frame_offsets(a)
    assert arena.scanner.last_merge is not None and arena.scanner.error is None
    np.testing.assert_array_equal(b, expected)
    arena.run = 0
    assert arena.scanner is None and scanner_threads() == []


def test_run_2_unmerges_everything_and_stops(arena, rng):
    a = arena.array(rng.random(16 * PAGE_FLOATS))
    b = arena.array(a)
    z = arena.zeros(16 * PAGE_FLOATS)
    z[:] = 0.0
    arena.run = 1
    assert wait_for(lambda: arena.stats().pages_sharing == 16 and arena.stats().zero_pages == 16)
    arena.run = 2
    stats = arena.stats()
    assert (stats.pages_sharing, stats.zero_pages, stats.frames_in_use) == (0, 0, 0)
    assert arena.scanner is None and scanner_threads() == []
    assert all(e & PRESENT and not e & FILE for e in pagemap(b))   # copies of their own
    assert not any(zero_page_mapped(z) or [])   # placed zero pages got their own again
    np.testing.assert_array_equal(a, b)
    assert not z.any()


def test_the_scanner_stops_at_close_and_when_the_arena_goes():
    arena = pydedup.Arena(size=1 << 26, run=1, sleep_millisecs=1)
    assert len(scanner_threads()) == 1
    arena.close()
    assert scanner_threads() == []
    arena = pydedup.Arena(size=1 << 26, run=1, sleep_millisecs=1)
    del arena
    gc.collect()
    assert wait_for(lambda: scanner_threads() == [], timeout=5)


def test_only_content_that_held_still_for_a_scan_is_merged(arena, rng):
    """KSM's rule for the background scan: pages written between two scans
    wait for a later one. merge() merges them at once."""
    arena.pages_to_scan = 1 << 20               # one step is one whole scan
    still = arena.array(rng.random(8 * PAGE_FLOATS))
    still_copy = arena.array(still)
    moving = arena.full(8 * PAGE_FLOATS, 1.0)   # eight identical pages
    testing.scan_step(arena)                          # first sight: nothing held still yet
    assert arena.stats().pages_sharing == 0
    moving[:] = 2.0
    testing.scan_step(arena)
    assert arena.stats(still_copy).pages_merged == 8
    assert arena.stats(moving).pages_merged == 0 and arena.stats().pages_volatile == 8
    testing.scan_step(arena)                          # now it held still for a scan
    assert arena.stats(moving).pages_merged == 8
    np.testing.assert_array_equal(moving, 2.0)


@pytest.fixture
def tracked(arena):
    if not testing.core(arena).tracking:
        pytest.skip("written pages are not tracked here (no PAGEMAP_SCAN or userfaultfd "
                    "asynchronous write-protect: Linux 6.7+)")
    return arena


def test_a_scan_reads_only_pages_written_since_the_last(tracked, rng):
    arena = tracked
    unique = arena.array(rng.random(256 * PAGE_FLOATS))
    first = arena.merge()
    assert first.pages_hashed == first.pages_scanned == 256
    assert arena.merge().pages_hashed == 0      # nothing written: nothing read
    unique[5 * PAGE_FLOATS] += 1.0              # one store into page 5
    unique[9 * PAGE_FLOATS:10 * PAGE_FLOATS] = unique[20 * PAGE_FLOATS:21 * PAGE_FLOATS]
    report = arena.merge()
    assert report.pages_hashed == 2
    assert report.pages_merged == 2             # page 9 now equals page 20, and it was seen
    assert frame_offsets(unique)[9] == frame_offsets(unique)[20]


def test_writes_by_the_kernel_are_seen_too(tracked, rng, tmp_path):
    arena = tracked
    a = arena.array(rng.random(4 * PAGE_FLOATS))
    b = arena.array(rng.random(4 * PAGE_FLOATS))
    arena.merge()
    path = tmp_path / "a.bin"
    a.tofile(path)
    with open(path, "rb") as f:
        f.readinto(memoryview(b).cast("B"))      # the kernel writes b: now a copy of a
    report = arena.merge()
    assert report.pages_hashed == 4 and report.pages_merged == 8
    np.testing.assert_array_equal(a, b)


def test_without_tracking_every_page_is_read(rng):
    with contextlib.closing(pydedup.Arena(size=1 << 26, track_writes=False)) as arena:
        unique = arena.array(rng.random(16 * PAGE_FLOATS))
        arena.merge()
        assert arena.merge().pages_hashed == 16
        del unique
