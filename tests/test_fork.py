"""After fork, parent and child keep every value, whichever frees first."""
import gc
import os

import numpy as np
import pytest

from kernel import PAGE

PAGE_FLOATS = PAGE // 8


def run_in_child(check):
    """Run check() in a forked child; its exit status tells the parent."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_the_parent_freeing_frames_leaves_the_child_its_data(arena, rng):
    a = arena.array(rng.random(64 * PAGE_FLOATS))
    b = arena.array(a)
    expected = a.copy()
    arena.merge()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                 # child: wait for the parent to free, then check
        os.read(r, 1)
        os._exit(0 if np.array_equal(b, expected) else 1)
    del a
    arena.unmerge()                              # the parent drops every frame it had
    gc.collect()
    assert arena.stats().frames_in_use == 0
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(b, expected)


def test_the_child_freeing_and_writing_leaves_the_parent_its_data(arena, rng):
    a = arena.array(rng.random(64 * PAGE_FLOATS))
    b = arena.array(a)
    expected = a.copy()
    arena.merge()

    def child():
        b[:] = -1.0
        arena.unmerge()
        return (b == -1.0).all() and np.array_equal(a, expected)

    assert run_in_child(child) == 0
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)
    assert arena.merge().skipped["no_memory"] == 0
    np.testing.assert_array_equal(b, expected)


def test_a_forked_child_refuses_to_merge_and_the_parent_goes_on(arena, rng):
    a = arena.array(rng.random(8 * PAGE_FLOATS))
    arena.merge()

    def child():
        try:
            arena.merge()
        except RuntimeError as e:
            return "forked" in str(e)
        return False

    assert run_in_child(child) == 0
    b = arena.array(a)
    assert arena.merge().pages_merged == 16
    np.testing.assert_array_equal(a, b)
