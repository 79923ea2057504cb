"""The invariant checker (_check.pxi) passes on a healthy arena and names
what is broken when something outside pydedup breaks it: a frame punched
or written behind the core's back, a page remapped under it, an allocator
that disagrees with the records."""
import ctypes
import mmap
import os

import pytest

import pydedup
from pydedup import testing
from pydedup._fast import DEBUG_CHECKS, InvariantError, check_invariants

from kernel import PAGE, address

PAGE_FLOATS = PAGE // 8
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
MAP_FIXED = 0x10
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long)
libc.mmap.restype = ctypes.c_void_p


@pytest.fixture
def merged(rng):
    """An arena whose first two arrays share frames 0..3 and whose third
    has zero pages; checked healthy."""
    arena = pydedup.Arena(size=1 << 26)
    a = arena.array(rng.random((4, PAGE_FLOATS)))
    b = arena.array(a)
    z = arena.zeros((4, PAGE_FLOATS))
    z[:] = 0.0
    report = arena.merge()
    assert (report.pages_merged, report.pages_zeroed) == (8, 4)
    testing.check_invariants(arena)
    yield arena, a, b
    testing.set_debug_checks(arena, False)            # the arena is broken on purpose
    arena.close()


def core_of(arena):
    return testing.core(arena)


def test_a_healthy_arena_passes_through_its_life(arena, rng):
    testing.check_invariants(arena)
    a = arena.array(rng.random((64, PAGE_FLOATS)))
    b = arena.array(a)
    arena.run, arena.pages_to_scan, arena.sleep_millisecs = 1, 16, 0
    for _ in range(20):
        testing.check_invariants(arena)                # also while a background scan is half done
    arena.run = 0
    arena.merge()
    b[3] = 1.0
    testing.check_invariants(arena)                    # a written MERGED page, not yet refreshed
    arena.unmergeable(b[10:20])
    arena.unmerge()
    testing.check_invariants(arena)
    del a, b
    testing.check_invariants(arena)


def test_a_punched_frame_in_use_is_found(merged):
    arena, a, b = merged
    assert libc.fallocate(core_of(arena).memfds[0], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          2 * PAGE, PAGE) == 0
    with pytest.raises(InvariantError, match=r"a frame in use holds memory \(frame 2\)"):
        testing.check_invariants(arena)


def test_memory_in_a_free_frame_slot_is_a_leak(merged):
    arena, a, b = merged
    os.pwrite(core_of(arena).memfds[0], b"x" * PAGE, 40 * PAGE)
    with pytest.raises(InvariantError, match=r"a frame no page maps holds no memory .* \(frame 40\)"):
        testing.check_invariants(arena)


def test_a_merged_page_remapped_behind_the_core_is_found(merged):
    arena, a, b = merged
    page = address(b) + PAGE                     # b's second page, MERGED
    assert libc.mmap(page, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, -1, 0) == page
    with pytest.raises(InvariantError, match="MERGED and BROKEN pages lie in a frame-store mapping"):
        testing.check_invariants(arena)


def test_a_merged_page_on_the_wrong_frame_is_found(merged):
    arena, a, b = merged
    page = address(b) + PAGE                     # frame 1; map frame 3 there instead
    assert libc.mmap(page, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | MAP_FIXED, core_of(arena).memfds[0], 3 * PAGE) == page
    with pytest.raises(InvariantError, match="a MERGED page maps its own frame"):
        testing.check_invariants(arena)


def test_an_allocator_that_disagrees_with_the_records_is_found(merged):
    arena, a, b = merged
    core = core_of(arena)
    free = bytearray(core.high_water)
    check_invariants(core, free)                 # nothing is free below the high water
    free[5] = 1
    with pytest.raises(InvariantError, match=r"allocator holds free .* \(page 5"):
        check_invariants(core, free)


def test_the_debug_build_checks_after_every_operation(merged):
    """In a PYDEDUP_DEBUG=1 build every locked operation ends with the
    check, so the next call after a corruption fails; otherwise only an
    explicit check_invariants() does."""
    arena, a, b = merged
    os.pwrite(core_of(arena).memfds[0], b"x" * PAGE, 40 * PAGE)
    if DEBUG_CHECKS:
        with pytest.raises(InvariantError):
            arena.stats()
    else:
        arena.stats()
    testing.set_debug_checks(arena, True)
    with pytest.raises(InvariantError):
        arena.stats()


def test_the_seams_refuse_a_closed_arena_and_see_an_open_one(rng):
    """pydedup.testing works on an open arena and says so of a closed one."""
    arena = pydedup.Arena(size=1 << 26)
    a = arena.array(rng.random((4, PAGE_FLOATS)))
    lo, hi = testing.address_range(arena)
    assert hi - lo == 1 << 26 and lo <= address(a) < hi
    assert testing.page_range(arena, a) == ((address(a) - lo) // PAGE, 4)
    assert testing.free_pages(arena) == (1 << 26) // PAGE - 4
    assert min(testing.core(arena).memfds) >= 0
    assert testing.scan_step(arena) == (0, arena.sleep_millisecs / 1000)
    testing.check_invariants(arena)
    arena.close()
    assert testing.address_range(arena) == (lo, hi)            # its arrays still live there
    for seam in (testing.check_invariants, testing.core, testing.scan_step, testing.free_pages,
                 testing.pages, lambda ar: testing.page_range(ar, a),
                 lambda ar: testing.set_debug_checks(ar, True)):
        with pytest.raises(ValueError, match="the arena is closed"):
            seam(arena)
