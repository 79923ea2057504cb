"""Every public function and knob, fed bad input: a clear exception (the
type and words a user can act on), never a crash, and an arena that is
still consistent (the core's invariant checker) with its arrays intact."""
import gc
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pydedup
from pydedup import testing
from pydedup.bench import ksm
from pydedup.knobs import UINT32_MAX

from kernel import PAGE

pytestmark = pytest.mark.slow   # hypothesis draws: about 20 s in all

# Inputs of every kind, the wrong kind for most arguments.
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.binary(max_size=8), st.sampled_from([object(), [], {}, (), ..., "C", "K",
                                                                  np.int64(-1), np.uint64(2**64 - 1),
                                                                  np.float32(1.5), np.bool_(True),
                                                                  np.dtype(object), "M8", "V0"]),
    st.lists(st.integers(-2**65, 2**65), max_size=3).map(tuple),
)
# What a bad call may raise: the exception numpy or Python raise for the
# same mistake. Anything else (SystemError, a crash, an InvariantError) fails.
CLEAR = (TypeError, ValueError, OverflowError, MemoryError)


@pytest.fixture(scope="module")
def shared():
    """One arena and some arrays, shared by the fuzz examples; their copies."""
    arena = pydedup.Arena(size=1 << 28)
    rng = np.random.default_rng(8)
    arrays = [arena.array(rng.random((8, PAGE // 8))), arena.zeros((3, 5), np.int16, "F"),
              arena.full(PAGE, 7, np.uint8)]
    arrays.append(arena.array(arrays[0]))
    arena.merge()
    yield arena, arrays, [a.copy() for a in arrays]
    arena.close()


def consistent(arena, arrays, copies):
    testing.check_invariants(arena)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)
    stats = arena.stats()
    assert stats.pages_in_use >= sum(-(-a.nbytes // PAGE) for a in arrays)


def call(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except CLEAR as e:
        assert str(e), f"{type(e).__name__} without a message"
        return e


@given(shape=JUNK, dtype=JUNK, order=JUNK)
def test_constructors_take_any_junk(shared, shape, dtype, order):
    arena, arrays, copies = shared
    for make in (arena.empty, arena.zeros, arena.ones):
        call(make, shape, dtype, order)
    call(arena.full, shape, 3, dtype, order)
    consistent(arena, arrays, copies)


@given(prototype=JUNK, dtype=JUNK, order=JUNK, shape=JUNK, fill=JUNK)
def test_like_constructors_take_any_junk(shared, prototype, dtype, order, shape, fill):
    arena, arrays, copies = shared
    for make in (arena.empty_like, arena.zeros_like, arena.ones_like):
        call(make, prototype, dtype, order, shape)
        call(make, arrays[1], dtype, order, shape)
    call(arena.full_like, arrays[0], fill, dtype, order, shape)
    consistent(arena, arrays, copies)


@given(source=JUNK, dtype=JUNK, order=JUNK, ndmin=JUNK, copy=JUNK)
def test_array_and_asarray_take_any_junk(shared, source, dtype, order, ndmin, copy):
    arena, arrays, copies = shared
    call(arena.array, source, dtype, copy=copy, order=order, ndmin=ndmin)
    call(arena.array, arrays[2], dtype, copy=copy, order=order, ndmin=ndmin)
    call(arena.asarray, source, dtype, order)
    call(arena.asarray, arrays[3], dtype, order)
    consistent(arena, arrays, copies)


@given(thing=JUNK)
def test_array_methods_take_any_junk(shared, thing):
    arena, arrays, copies = shared
    assert arena.owns(thing) is False
    for method in (arena.unmergeable, arena.mergeable, arena.stats):
        if thing is None and method == arena.stats:
            continue                            # stats(None) is the arena's stats
        error = call(method, thing)
        assert isinstance(error, ValueError) and "does not live in this arena" in str(error)
    consistent(arena, arrays, copies)


@given(name=st.sampled_from(sorted(pydedup.KNOBS)), value=JUNK)
def test_knobs_take_any_junk(shared, name, value):
    """A value is taken or refused with ValueError naming the knob; one it
    takes works (a merge and a scanner step run with it)."""
    arena, arrays, copies = shared
    before = getattr(arena, name)
    try:
        setattr(arena, name, value)
    except ValueError as e:
        assert f"knob {name} accepts" in str(e)
        assert getattr(arena, name) == before
    except OSError as e:                        # barrier="uffd" where it is not allowed
        assert name == "barrier" and "userfaultfd" in str(e)
    except RuntimeError as e:                   # KSM's EBUSY: pages of `shared` are merged
        assert name == "merge_across_nodes" and "unmerge() first" in str(e)
        assert getattr(arena, name) == before
    else:
        arena.merge()
        testing.scan_step(arena)
    finally:
        arena.run = 0
        setattr(arena, name, before)
    consistent(arena, arrays, copies)


@pytest.mark.parametrize("name, value", [
    ("max_page_sharing", UINT32_MAX + 1), ("zero_page_colours", UINT32_MAX + 1),
    ("pages_to_scan", 2**64), ("sleep_millisecs", 2**70), ("max_page_sharing", np.uint64(2**64 - 1)),
])
def test_knob_values_the_core_cannot_take_are_refused_when_set(shared, name, value):
    """Once a knob took them, and merge() or the scanner failed later with
    an OverflowError; pages_to_scan = 2**64 - 1 set in the middle of a scan
    crashed the process (SIGSEGV: first + npages wrapped around in
    scan_batch, and the step read far past the arena's records)."""
    arena, arrays, copies = shared
    with pytest.raises(ValueError, match=f"knob {name} accepts an integer from"):
        setattr(arena, name, value)
    with pytest.raises(ValueError, match=f"knob {name} accepts"):
        pydedup.Arena(size=1 << 20, **{name: value})
    consistent(arena, arrays, copies)


@pytest.mark.parametrize("name", sorted(pydedup.KNOBS))
@pytest.mark.parametrize("text", ["", "abc", "1.5", "-3", "99999999999999999999", "yes", "0x10"])
def test_knobs_from_the_environment_take_any_text(monkeypatch, name, text):
    monkeypatch.setenv(f"PYDEDUP_{name.upper()}", text)
    try:
        arena = pydedup.Arena(size=1 << 20)
    except ValueError as e:
        assert f"knob {name} accepts" in str(e)
    except OSError as e:                        # barrier="uffd" where it is not allowed
        assert name == "barrier" and "userfaultfd" in str(e)
    else:
        with arena:
            arena.zeros(PAGE)[:] = 1
            arena.merge()
            testing.check_invariants(arena)


@given(size=JUNK)
def test_arena_sizes_take_any_junk(size):
    try:
        arena = pydedup.Arena(size=size)
    except (ValueError, MemoryError) as e:
        assert "size" in str(e) or "pages" in str(e)
    else:
        with arena:
            testing.check_invariants(arena)


def test_a_closed_arena_refuses_every_method_and_its_arrays_live_on(rng):
    arena = pydedup.Arena(size=1 << 26)
    a = arena.array(rng.random(4 * PAGE // 8))
    b = arena.array(a)
    arena.merge()
    expected = a.copy()
    arena.close()
    calls = [lambda: arena.zeros(3), lambda: arena.empty(3), lambda: arena.ones(3),
             lambda: arena.full(3, 1), lambda: arena.empty_like(a), lambda: arena.zeros_like(a),
             lambda: arena.ones_like(a), lambda: arena.full_like(a, 2), lambda: arena.array(a),
             lambda: arena.asarray([1]), arena.merge, arena.unmerge, arena.stats,
             lambda: arena.stats(a), lambda: arena.unmergeable(a), lambda: arena.mergeable(a)]
    calls += [lambda name=name: setattr(arena, name, getattr(arena, name)) for name in pydedup.KNOBS]
    for method in calls:
        with pytest.raises(ValueError, match="closed"):
            method()
    assert not arena.owns(a) and arena.closed
    arena.close()                               # twice is fine
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)
    b[0] = -1.0
    assert a[0] == expected[0]


def test_arrays_of_another_arena_and_views_are_told_apart(arena, rng):
    other = pydedup.Arena(size=1 << 26)
    mine, theirs = arena.array(rng.random(PAGE)), other.array(rng.random(PAGE))
    for stranger in (theirs, theirs[::2], theirs.reshape(-1, 8).T, np.zeros(3), memoryview(b"x")):
        for method in (arena.stats, arena.unmergeable, arena.mergeable):
            with pytest.raises(ValueError, match="does not live in this arena"):
                method(stranger)
        assert not arena.owns(stranger)
    # A view made without numpy knowing its base (as_strided) is refused too,
    # even one that reaches far beyond its array.
    far = np.lib.stride_tricks.as_strided(mine, shape=(10**9,), strides=(8,))
    with pytest.raises(ValueError, match="does not live in this arena"):
        arena.unmergeable(far)
    # Views of its own arrays work, whatever their strides.
    for view in (mine[::-1], mine[5:6], mine.reshape(-1, 8).T, mine.view(np.uint8)[3:5]):
        assert arena.owns(view)
        arena.unmergeable(view)
        arena.mergeable(view)
        assert arena.stats(view).pages >= 1
    assert arena.asarray(theirs) is not theirs and arena.owns(arena.asarray(theirs))
    testing.check_invariants(arena)
    testing.check_invariants(other)
    other.close()


@pytest.mark.parametrize("bad", [5, None, "text", object(), (1, 2, 3)])
def test_ksm_marking_takes_only_buffers(bad):
    """pydedup.bench.ksm marks memory for the kernel's KSM; only the marking is
    fuzzed here (driving ksmd needs root and /sys/kernel/mm/ksm)."""
    for function in (ksm.mergeable, ksm.unmergeable):
        with pytest.raises((TypeError, ValueError)):
            function(bad)


def test_features_and_the_command_line_do_not_crash():
    assert set(pydedup.features()) >= {"page_size", "userfaultfd"}
    result = subprocess.run([sys.executable, "-m", "pydedup", "--no-such-option"],
                            capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(pydedup.__file__)))
    assert result.returncode == 2 and "python -m pydedup [demo | bench" in result.stderr
    assert "unknown command '--no-such-option'" in result.stderr


def test_an_arena_freed_in_another_thread_mid_merge_stays_consistent(rng):
    """Arrays die anywhere (a garbage collection inside a merge); pages.py
    queues them. Here they die in a thread while merges run."""
    arena = pydedup.Arena(size=1 << 27)
    keep = arena.array(rng.random(8 * PAGE // 8))
    expected = keep.copy()
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            a = arena.full(PAGE, 1.0)
            b = arena.array(a)
            del a, b

    threads = [threading.Thread(target=churn) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            arena.merge()
            testing.check_invariants(arena)
    finally:
        stop.set()
        for t in threads:
            t.join()
    gc.collect()
    arena.merge()
    testing.check_invariants(arena)
    np.testing.assert_array_equal(keep, expected)
    assert arena.stats().pages_in_use == -(-keep.nbytes // PAGE)
    arena.close()

