"""Arena arrays behave as numpy's own: every dtype, shape and order; bad
input raises a clear error and leaves the arena as it was."""
import gc
import pickle

import numpy as np
import pytest

import pydedup

from kernel import PAGE, address

DTYPES = [np.dtype(c) for c in np.typecodes["All"] if c not in "OVUSMm"] + [
    np.dtype("U7"), np.dtype("S3"), np.dtype("M8[ns]"), np.dtype("m8[s]"),
    np.dtype([("x", "<f4"), ("y", ">i8", (2,))]), np.dtype("(2,3)f8")]
SHAPES = [(), (0,), (5,), (3, 0, 2), (7, 9), (2, 3, 4, 5), (PAGE + 1,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_constructors_match_numpy(arena, dtype, shape):
    for order in "CF":
        for name in ("zeros", "empty"):
            a, b = getattr(arena, name)(shape, dtype, order), np.zeros(shape, dtype, order)
            assert (a.shape, a.dtype, a.flags.c_contiguous, a.flags.f_contiguous) == \
                (b.shape, b.dtype, b.flags.c_contiguous, b.flags.f_contiguous)
            assert a.size == 0 or a.strides == b.strides
            assert arena.owns(a)
            assert address(a) % PAGE == 0
            np.testing.assert_array_equal(a, b)
    if dtype.kind in "biufc":
        np.testing.assert_array_equal(arena.ones(shape, dtype), np.ones(shape, dtype))
        np.testing.assert_array_equal(arena.full(shape, 3, dtype), np.full(shape, 3, dtype))


@pytest.mark.parametrize("order", "CFAK")
def test_like_constructors_keep_numpy_layout(arena, order):
    prototypes = [np.ones((4, 5, 6)), np.ones((4, 5, 6), order="F"),
                  np.ones((4, 5, 6)).transpose(2, 0, 1), np.ones((6, 8))[::2, ::-1]]
    for p in prototypes:
        for name, args in (("empty_like", ()), ("zeros_like", ()), ("ones_like", ()),
                           ("full_like", (2.5,))):
            a = getattr(arena, name)(p, *args, order=order)
            b = getattr(np, name)(p, *args, order=order)
            assert (a.shape, a.dtype, a.strides) == (b.shape, b.dtype, b.strides), (name, p.strides)
            if name != "empty_like":
                np.testing.assert_array_equal(a, b)


def test_array_and_asarray(arena, rng):
    src = rng.random((30, 40))
    a = arena.array(src)
    assert arena.owns(a) and not np.shares_memory(a, src)
    np.testing.assert_array_equal(a, src)
    assert arena.asarray(a) is a
    assert arena.asarray(a, dtype=np.float32).dtype == np.float32
    assert arena.array(a, copy=False) is a
    assert arena.array([[1, 2], [3, 4]], dtype=np.int16).dtype == np.int16
    assert arena.array(5, ndmin=3).shape == (1, 1, 1)
    f = arena.asarray(src, order="F")
    assert f.flags.f_contiguous and arena.owns(f)


def test_non_contiguous_views_stay_arena_arrays(arena, rng):
    a = arena.array(rng.random((64, 700)))
    for view in (a[::3], a[:, 5:90:4], a.T, a[10:20].reshape(-1)[::-1]):
        assert arena.owns(view)
        assert arena.stats(view).pages >= 1


def test_the_base_keeps_the_arena_alive():
    def make():
        arena = pydedup.Arena(size=1 << 26)
        a = arena.full(1000, 4.0)
        return a[10:20]
    view = make()
    gc.collect()
    view += 1
    assert (view == 5.0).all()


def test_arrays_pickle_as_plain_arrays(arena, rng):
    a = arena.array(rng.random(5000))
    b = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(a, b)
    assert not arena.owns(b)


@pytest.mark.parametrize("shape, error, words", [
    (-1, ValueError, "negative"),
    ((3, -2), ValueError, "negative"),
    (2.5, TypeError, "shape"),
    ("ten", TypeError, "shape"),
    ((2**40, 2**40), ValueError, "too big"),
    ((1,) * 65, ValueError, "64 dimensions"),
])
def test_bad_shapes(arena, shape, error, words):
    with pytest.raises(error, match=words):
        arena.zeros(shape)
    assert arena.stats().pages_in_use == 0


def test_bad_dtypes_and_orders(arena):
    with pytest.raises(TypeError, match="Python objects"):
        arena.zeros(3, dtype=object)
    with pytest.raises(TypeError, match="Python objects"):
        arena.array([1, "a", None])
    with pytest.raises(TypeError):
        arena.zeros(3, dtype="not a dtype")
    with pytest.raises(ValueError, match="order"):
        arena.zeros(3, order="X")
    with pytest.raises(ValueError, match="order"):
        arena.empty_like(np.ones(3), order="Z")
    assert arena.stats().pages_in_use == 0


def test_an_array_larger_than_the_arena(arena):
    with pytest.raises(MemoryError, match="free bytes"):
        arena.empty(2 << 30, dtype=np.uint8)
    assert arena.zeros(10).sum() == 0


def test_arrays_of_other_origin_are_refused(arena):
    other = pydedup.Arena(size=1 << 26)
    for stranger in (np.zeros(10), other.zeros(10)):
        with pytest.raises(ValueError, match="does not live in this arena"):
            arena.stats(stranger)
        with pytest.raises(ValueError, match="does not live in this arena"):
            arena.unmergeable(stranger)
    with pytest.raises(ValueError, match="does not live in this arena"):
        arena.stats([1, 2, 3])


@pytest.mark.parametrize("name, bad", [
    ("use_zero_pages", 2), ("use_zero_pages", "yes"), ("use_zero_pages", None),
    ("max_page_sharing", 1), ("max_page_sharing", 2.0), ("max_page_sharing", True),
    ("max_mappings", -1), ("max_mappings", "many"),
])
def test_bad_knob_values_name_the_knob(arena, name, bad):
    before = getattr(arena, name)
    with pytest.raises(ValueError, match=f"knob {name} accepts"):
        setattr(arena, name, bad)
    assert getattr(arena, name) == before
    with pytest.raises(ValueError, match=f"knob {name} accepts"):
        pydedup.Arena(size=1 << 26, **{name: bad})


def test_knobs_are_the_table(arena):
    assert {k for k in vars(pydedup.Arena) if k in pydedup.KNOBS} == set(pydedup.KNOBS)
    with pytest.raises(TypeError, match="unknown knob"):
        pydedup.Arena(size=1 << 26, merge_everything=True)


def test_knobs_from_the_environment(monkeypatch):
    monkeypatch.setenv("PYDEDUP_MAX_PAGE_SHARING", "17")
    monkeypatch.setenv("PYDEDUP_USE_ZERO_PAGES", "false")
    arena = pydedup.Arena(size=1 << 26)
    assert (arena.max_page_sharing, arena.use_zero_pages) == (17, False)
    monkeypatch.setenv("PYDEDUP_MAX_PAGE_SHARING", "1")
    with pytest.raises(ValueError, match="max_page_sharing"):
        pydedup.Arena(size=1 << 26)


@pytest.mark.parametrize("size", [0, -5, 1.5, "1G", True])
def test_bad_arena_sizes(size):
    with pytest.raises(ValueError, match="size"):
        pydedup.Arena(size=size)


def test_features_are_reported():
    features = pydedup.features()
    assert features["page_size"] == PAGE
    assert isinstance(features["pagemap_scan"], bool)


def test_a_misspelt_knob_raises_naming_the_knobs(arena):
    with pytest.raises(AttributeError, match="max_pages_to_scan.*knobs are:.*pages_to_scan"):
        arena.max_pages_to_scan = 1
    assert not hasattr(arena, "max_pages_to_scan")
    arena.pages_to_scan = 7                      # the real knob still sets
    assert arena.pages_to_scan == 7


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("PYDEDUP_PAGES_TO_SCAN", "many")
    with pytest.raises(ValueError, match="PYDEDUP_PAGES_TO_SCAN='many'.*knob pages_to_scan accepts"):
        pydedup.Arena(size=1 << 20)


@pytest.mark.parametrize("size", [100, PAGE + 1, 10**9])
def test_a_size_that_is_not_whole_pages_is_refused_not_rounded(size):
    whole = -(-size // PAGE) * PAGE
    with pytest.raises(ValueError, match=f"whole number of pages.*{whole} is the next one up"):
        pydedup.Arena(size=size)
