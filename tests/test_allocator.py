"""numpy's own allocations in an arena: pydedup.arena(), install(), uninstall()."""
import asyncio
import gc
import pickle
import threading
import tracemalloc
import warnings
import weakref

import numpy as np
import pytest

import pydedup
from pydedup import testing
from pydedup.procfs import PAGE_SIZE

try:
    from numpy._core.multiarray import get_handler_name
except ImportError:                           # numpy 1.x
    from numpy.core.multiarray import get_handler_name

BIG = 1 << 20                                 # bytes: well above alloc_threshold


@pytest.fixture
def ar():
    a = pydedup.Arena(size=1 << 30)      # not `with`: that would put the whole test in the arena
    yield a
    a.close()
    gc.collect()


@pytest.fixture(autouse=True)
def no_install_left():
    yield
    if pydedup.installed_arena() is not None:
        pydedup.uninstall()
        pytest.fail("a test left pydedup installed")


def in_reservation(ar, array) -> bool:
    lo, hi = testing.address_range(ar)
    return lo <= array.__array_interface__["data"][0] < hi


# -- where allocations go ---------------------------------------------------------

def test_handler_name_inside_and_outside(ar):
    assert get_handler_name() != "pydedup"
    with pydedup.arena(ar):
        assert get_handler_name() == "pydedup"
        x = np.ones(BIG // 8)
    assert get_handler_name() != "pydedup"
    assert get_handler_name(x) == "pydedup"


def test_large_go_to_the_arena_small_to_the_default_allocator(ar):
    with pydedup.arena(ar):
        large = np.empty(ar.alloc_threshold, np.uint8)
        small = np.empty(ar.alloc_threshold - 1, np.uint8)
    assert ar.owns(large) and in_reservation(ar, large)
    assert large.ctypes.data % PAGE_SIZE == 0
    assert not ar.owns(small) and not in_reservation(ar, small)
    assert ar.allocator_stats()["allocations"] == 1


def test_threshold_knob_moves_the_boundary(ar):
    ar.alloc_threshold = 1 << 22
    with pydedup.arena(ar):
        x = np.empty(BIG, np.uint8)
        ar.alloc_threshold = BIG
        y = np.empty(BIG, np.uint8)
    assert not ar.owns(x) and ar.owns(y)


def test_the_arena_outlives_its_block_and_close_ends_it():
    with pydedup.arena(size=1 << 28) as ar:
        x = np.arange(BIG // 8, dtype=np.float64)
        z = np.zeros(BIG // 8)
        z[:] = 0.0
        assert ar.owns(x)
        pages = weakref.ref(testing.pages(ar))
    assert not ar.closed                      # the block scoped allocations, nothing more
    y = np.empty(BIG // 8)                    # the block is over: numpy's own allocator
    assert get_handler_name(y) != "pydedup" and not ar.owns(y)
    assert ar.owns(x) and ar.owns(z)
    assert ar.merge().pages_zeroed == BIG // PAGE_SIZE
    assert ar.stats().zero_pages == BIG // PAGE_SIZE
    assert ar.allocator_stats()["allocations"] == 2
    ar.close()
    assert ar.closed and not ar.owns(x)
    with pytest.raises(ValueError, match="closed"):
        ar.merge()
    del ar, z
    gc.collect()
    assert pages() is not None                # x keeps the arena's memory
    x += 1                                    # and it still works
    assert x[0] == 1 and x[-1] == BIG // 8
    del x
    gc.collect()
    assert pages() is None                    # the last array took the arena with it


def test_closing_an_existing_arena_inside_the_block(ar):
    with pytest.warns(pydedup.FallbackWarning, match="closed"), pydedup.arena(ar):
        x = np.full(BIG // 8, 3.0)
        ar.close()
        y = np.full(BIG // 8, 4.0)            # the arena is closed: numpy's own allocator
    assert get_handler_name(y) == "pydedup" and not in_reservation(ar, y)
    assert in_reservation(ar, x)
    x.resize(2 * x.size, refcheck=False)      # out of a closed arena: a copy
    assert not in_reservation(ar, x) and (x[: BIG // 8] == 3).all()
    del x, y
    gc.collect()


# -- results as plain numpy ------------------------------------------------------

def compute(rng_seed=1):
    rng = np.random.default_rng(rng_seed)
    a = rng.random((300, 200))
    b = rng.random((200, 250))
    return {
        "zeros": np.zeros((500, 300)),
        "empty_written": np.empty(50_000) * 0 + 2,
        "ones": np.ones((400, 400), np.int32),
        "matmul": a @ b,
        "ufuncs": np.sqrt(a) * 2 + np.exp(-a),
        "concat": np.concatenate([a.ravel(), b.ravel()]),
        "sort": np.sort(rng.random(100_000)),
        "linalg": np.linalg.solve(a[:200] @ a[:200].T + np.eye(200), a[:200, 0]),
        "fft": np.fft.rfft(rng.random(65_536)),
        "small": np.arange(10),
    }


def test_numpy_results_equal_plain_numpy(ar):
    expected = compute()
    with pydedup.arena(ar):
        got = compute()
        assert ar.owns(got["matmul"]) and ar.owns(got["zeros"])
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_np_load_and_pickle(ar, tmp_path):
    data = np.random.default_rng(2).random((256, 512))
    np.save(tmp_path / "data.npy", data)
    with pydedup.arena(ar):
        loaded = np.load(tmp_path / "data.npy")
        made_inside = data * 1.0
    assert ar.owns(loaded)
    np.testing.assert_array_equal(loaded, data)
    # An arena array pickles as any array; unpickled, it is a plain one.
    again = pickle.loads(pickle.dumps(made_inside))
    np.testing.assert_array_equal(again, data)
    assert not ar.owns(again)
    # Unpickling inside a block: numpy makes the array on the pickle's own
    # bytes, no allocation, so not in the arena; a copy is.
    blob = pickle.dumps(data)
    with pydedup.arena(ar):
        unpickled = pickle.loads(blob)
        copied = unpickled.copy()
    np.testing.assert_array_equal(unpickled, data)
    assert isinstance(unpickled.base, bytes) and not ar.owns(unpickled)
    assert ar.owns(copied)
    np.testing.assert_array_equal(copied, data)


def test_scipy_sparse_toarray(ar):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    m = scipy_sparse.random(2000, 1500, density=0.001, format="csr", random_state=3)
    expected = m.toarray()
    expected_product = (m @ m.T).toarray()
    with pydedup.arena(ar):
        dense = m.toarray()
        product = (m @ m.T).toarray()
    assert ar.owns(dense) and ar.owns(product)
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(product, expected_product)


def test_tracemalloc_sees_the_allocations(ar):
    tracemalloc.start()
    try:
        domain = np.lib.tracemalloc_domain
        with pydedup.arena(ar):
            x = np.ones(4 * BIG // 8)
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, domain)])
        assert sum(t.size for t in snapshot.traces) >= 4 * BIG
        del x
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, domain)])
        assert sum(t.size for t in snapshot.traces) < 4 * BIG
    finally:
        tracemalloc.stop()


# -- calloc, the cache, realloc ---------------------------------------------------

def test_zeros_are_untouched_pages_even_after_a_free(ar):
    n = 16 * BIG
    with pydedup.arena(ar):
        dirty = np.full(n // 8, 7.0)
        del dirty                              # into the cache, written
        z = np.zeros(n // 8)                   # calloc: fresh pages, never the cache
    assert ar.owns(z) and not z.any()
    assert ar.stats(z).pages_private == n // PAGE_SIZE
    assert ar.stats().pss_bytes < n // 4       # they hold no memory


def test_cache_reuses_runs_and_merge_hands_them_back(ar):
    with pydedup.arena(ar):
        x = np.empty(BIG, np.uint8)
        address = x.ctypes.data
        del x
        assert ar.allocator_stats()["cache_bytes"] == BIG
        y = np.empty(BIG, np.uint8)
        assert y.ctypes.data == address
        assert ar.allocator_stats()["cache_hits"] == 1
        del y
        assert ar.stats().pages_in_use == 0    # stats() hands the cache back first
        assert ar.allocator_stats()["cache_bytes"] == 0
        z = np.empty(BIG, np.uint8)
        del z
        assert ar.allocator_stats()["cache_bytes"] == BIG
    assert ar.allocator_stats()["cache_bytes"] == BIG    # kept for the next block
    ar.close()
    assert ar.allocator_stats()["cache_bytes"] == 0      # close() hands it back


def test_no_cache(ar):
    ar.alloc_cache = 0
    with pydedup.arena(ar):
        for _ in range(3):
            x = np.empty(BIG, np.uint8)
            del x
    counters = ar.allocator_stats()
    assert counters["allocations"] == 3 and counters["cache_hits"] == 0
    assert counters["cache_bytes"] == 0


def test_every_page_goes_back(ar):
    free_before = testing.free_pages(ar)
    with pydedup.arena(ar):
        arrays = [np.ones(k * 5000) for k in range(1, 40)]
        for a in arrays[::3]:
            a.resize(a.size * 3, refcheck=False)
    del arrays, a
    gc.collect()
    ar.merge()                                 # hands the cache back
    assert testing.free_pages(ar) == free_before
    assert ar.allocator_stats()["bytes_in_use"] == 0


def test_resize_across_merged_pages_keeps_contents(ar):
    n = 64 * PAGE_SIZE // 8
    with pydedup.arena(ar):
        a = np.empty(n)
        a[:] = np.tile(np.arange(512.0), n // 512)
        b = a.copy()
        assert ar.merge().pages_merged >= 2 * (n * 8 // PAGE_SIZE)
        blocker = np.empty(BIG, np.uint8)      # right after b (best fit, lowest): b must move
        address = b.ctypes.data
        b.resize(4 * n, refcheck=False)        # grow: a copy, reading merged pages
        assert b.ctypes.data != address
        a.resize(n // 2, refcheck=False)       # shrink in place
    assert ar.owns(a) and ar.owns(b)
    np.testing.assert_array_equal(b[:n], np.tile(np.arange(512.0), n // 512))
    assert not b[n:].any()
    np.testing.assert_array_equal(a, np.tile(np.arange(512.0), n // 1024))
    b[0] = -1                                  # the copy is private
    assert a[0] == 0
    del blocker


def test_resize_between_default_allocator_and_arena(ar):
    with pydedup.arena(ar):
        x = np.arange(100, dtype=np.float64)   # small: numpy's own allocator
        assert not in_reservation(ar, x)
        x.resize(BIG // 8, refcheck=False)     # grown past the threshold: into the arena
        assert in_reservation(ar, x)
        assert (x[:100] == np.arange(100)).all() and not x[100:].any()
        x.resize(50, refcheck=False)           # shrunk below it: out again
        assert not in_reservation(ar, x)
        assert (x == np.arange(50)).all()


def test_growing_in_place(ar):
    with pydedup.arena(ar):
        x = np.arange(BIG // 8, dtype=np.float64)
        address = x.ctypes.data
        x.resize(2 * x.size, refcheck=False)   # the pages after it are free
    assert x.ctypes.data == address
    assert (x[: BIG // 8] == np.arange(BIG // 8)).all() and not x[BIG // 8:].any()


# -- merge ------------------------------------------------------------------------

def test_merge_inside_the_block_saves_memory(ar):
    with pydedup.arena(ar):
        a = np.random.default_rng(4).random((512, 1024))
        b = a.copy()
        c = np.empty((1024, 1024))
        c[:] = 0
        report = ar.merge()
    stats = ar.stats()
    assert report.pages_zeroed >= c.nbytes // PAGE_SIZE
    assert stats.pages_sharing >= a.nbytes // PAGE_SIZE
    assert stats.bytes_saved >= a.nbytes + c.nbytes
    np.testing.assert_array_equal(a, b)
    assert not c.any()


# -- nesting, threads, tasks ---------------------------------------------------------

def test_blocks_nest_and_restore(ar):
    with pydedup.Arena(size=1 << 28) as inner:      # `with` an Arena is a block too
        v = np.ones(BIG // 8)
        with pydedup.arena(ar):
            x = np.ones(BIG // 8)
            with pydedup.arena(inner):
                y = np.ones(BIG // 8)
            z = np.ones(BIG // 8)
    w = np.ones(BIG // 8)
    assert inner.owns(v) and ar.owns(x) and inner.owns(y) and ar.owns(z)
    assert not ar.owns(w) and not inner.owns(w) and get_handler_name(w) != "pydedup"
    assert not inner.closed
    inner.close()


def test_the_block_end_merges_when_asked(ar):
    with pydedup.arena(ar, merge=True):
        z = np.zeros(BIG // 8)
        z[:] = 0.0
        assert ar.stats().zero_pages == 0
    assert ar.stats().zero_pages == BIG // PAGE_SIZE
    with pytest.raises(KeyError):              # a block that raised does not merge
        with pydedup.arena(ar, merge=True):
            z2 = np.zeros(BIG // 8)
            z2[:] = 0.0
            raise KeyError
    assert ar.stats().zero_pages == BIG // PAGE_SIZE


def test_the_block_is_restored_after_an_exception(ar):
    with pytest.raises(KeyError):
        with pydedup.arena(ar):
            raise KeyError("x")
    assert get_handler_name() != "pydedup"


def test_exception_unwinding_frees_arena_arrays(ar):
    def fails():
        big = np.ones(BIG // 8)               # freed while the exception propagates
        raise ValueError(big.size)
    with pydedup.arena(ar):
        with pytest.raises(ValueError, match=str(BIG // 8)):
            fails()
        assert ar.allocator_stats()["bytes_in_use"] == 0


def allocate_in_thread():
    result = {}

    def run():
        result["array"] = np.ones(BIG // 8)
        result["handler"] = get_handler_name()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result


def test_threads_started_inside_a_block_allocate_in_the_arena(ar):
    import concurrent.futures
    before = allocate_in_thread()
    with concurrent.futures.ThreadPoolExecutor(2) as early:   # its threads start...
        early.submit(int).result()                            # ...before the block
        with pydedup.arena(ar):
            result = allocate_in_thread()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                arrays = list(pool.map(lambda i: np.full(BIG // 8, float(i)), range(8)))
            from_early = early.submit(np.ones, BIG // 8).result()
    with pydedup.arena(ar):
        from multiprocessing.pool import ThreadPool  # joblib's threading backend's pool
        with ThreadPool(2) as tpool:
            pooled = tpool.map(lambda i: np.full(BIG // 8, float(i)), range(4))
    assert not ar.owns(before["array"])
    assert result["handler"] == "pydedup" and ar.owns(result["array"])
    assert all(ar.owns(a) for a in arrays) and [a[0] for a in arrays] == list(range(8))
    assert all(ar.owns(a) for a in pooled)
    assert not ar.owns(from_early)            # threads started before the block: not covered
    assert not ar.owns(allocate_in_thread()["array"])         # the block is over
    assert threading.Thread.start is pydedup.allocator._thread_start   # and so is the hook


def test_a_scanner_started_in_a_block_does_not_allocate_in_its_arena():
    with pydedup.Arena(size=1 << 28, sleep_millisecs=0) as scanned:
        scanned.run = 1
        assert not getattr(scanned.scanner._thread, "_pydedup_handler", None)
    scanned.close()


def test_install_covers_new_threads(ar):
    assert pydedup.install(ar) is ar
    try:
        assert pydedup.installed_arena() is ar
        result = allocate_in_thread()
        here = np.ones(BIG // 8)
    finally:
        pydedup.uninstall()
    assert result["handler"] == "pydedup" and ar.owns(result["array"])
    assert ar.owns(here)
    assert not ar.owns(allocate_in_thread()["array"])
    assert get_handler_name() != "pydedup"
    assert not ar.closed                       # not ours to close


def test_install_without_an_arena_makes_one_and_uninstall_closes_it():
    ar = pydedup.install()
    try:
        x = np.ones(BIG // 8)
        assert ar.owns(x)
    finally:
        pydedup.uninstall()
    assert ar.closed and x.sum() == BIG // 8


def test_asyncio_tasks_copy_the_context(ar):
    async def make():
        await asyncio.sleep(0)
        return np.ones(BIG // 8)

    async def block_in_a_task(started, release):
        with pydedup.arena(ar):
            started.set()
            await release.wait()
            return np.ones(BIG // 8)

    async def main():
        with pydedup.arena(ar):
            made_inside = asyncio.create_task(make())
        made_outside = asyncio.create_task(make())
        started, release = asyncio.Event(), asyncio.Event()
        blocking = asyncio.create_task(block_in_a_task(started, release))
        await started.wait()
        bystander = np.ones(BIG // 8)              # another task's block does not leak here
        release.set()
        return await made_inside, await made_outside, await blocking, bystander

    inside, outside, in_task, bystander = asyncio.run(main())
    assert ar.owns(inside) and ar.owns(in_task)
    assert not ar.owns(outside) and not ar.owns(bystander)


# -- bad arguments -----------------------------------------------------------------

def test_bad_arguments(ar):
    with pytest.raises(TypeError, match="pydedup.Arena"):
        with pydedup.arena("not an arena"):
            pass
    with pytest.raises(TypeError, match="knobs are for a new arena"):
        with pydedup.arena(ar, run=1):
            pass
    with pytest.raises(ValueError, match="alloc_threshold"):
        pydedup.Arena(size=1 << 20, alloc_threshold=0)
    with pytest.raises(ValueError, match="alloc_cache"):
        ar.alloc_cache = -1
    with pytest.raises(ValueError, match="alloc_threshold"):
        ar.alloc_threshold = "4KiB"
    assert ar.alloc_threshold == 4 * PAGE_SIZE and ar.alloc_cache == "auto"
    with pytest.raises(RuntimeError, match="not installed"):
        pydedup.uninstall()
    pydedup.install(ar)
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            pydedup.install(ar)
    finally:
        pydedup.uninstall()
    closed = pydedup.Arena(size=1 << 20)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        with pydedup.arena(closed):
            pass
    with pytest.raises(ValueError, match="closed"):
        pydedup.install(closed)
    assert pydedup.installed_arena() is None and get_handler_name() != "pydedup"


def test_arena_too_small_falls_back_to_the_default_allocator_and_says_so():
    with pytest.warns(pydedup.FallbackWarning, match=r"2 numpy allocation\(s\).*largest free run"):
        with pydedup.arena(size=1 << 20) as ar:
            x = np.ones((1 << 21) // 8)            # does not fit: numpy's own allocator
            x2 = np.ones((1 << 21) // 8)
            y = np.ones((1 << 19) // 8)
    assert not in_reservation(ar, x) and not in_reservation(ar, x2) and in_reservation(ar, y)
    counters = ar.allocator_stats()
    assert counters["fell_back"] == counters["fell_back_full"] == 2
    assert counters["fell_back_closed"] == counters["fell_back_busy"] == 0
    assert x.sum() == (1 << 21) // 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # said once per arena and reason
        with pydedup.arena(ar):
            np.ones((1 << 21) // 8)
    assert ar.allocator_stats()["fell_back_full"] == 3
    ar.close()


def test_a_closed_arena_in_a_block_says_so():
    ar = pydedup.Arena(size=1 << 28)
    with pytest.warns(pydedup.FallbackWarning, match="1 numpy allocation.*closed"):
        with ar:
            ar.close()
            y = np.ones(BIG // 8)
    assert ar.allocator_stats()["fell_back_closed"] == 1 and get_handler_name(y) == "pydedup"


def test_the_cache_holds_little_after_the_block(ar):
    """Freed temporaries stay cached for reuse inside the block, within a
    tenth of the peak live bytes plus 16 MiB, and the block's end trims the
    cache to a tenth of what is live plus 16 MiB (issue 18: it held 256 MiB)."""
    with pydedup.arena(ar):
        keep = np.ones((64 << 20) // 8)
        for i in range(40):
            t = np.full((4 << 20) // 8 + i * 512, float(i))   # 40 sizes, 4 MiB each
            del t
        inside = ar.allocator_stats()
        assert 0 < inside["cache_bytes"] <= (16 << 20) + (68 << 20) // 10
    after = ar.allocator_stats()
    assert after["cache_bytes"] <= (16 << 20) + keep.nbytes // 10
    del keep
    with pydedup.arena(ar):
        pass
    assert ar.allocator_stats()["cache_bytes"] <= 16 << 20


def test_a_fixed_cache_is_kept_across_blocks(ar):
    ar.alloc_cache = 64 << 20                 # bytes, not "auto": the old, faster trade
    with pydedup.arena(ar):
        for i in range(8):
            t = np.full((4 << 20) // 8 + i * 512, float(i))
            del t
    assert ar.allocator_stats()["cache_bytes"] > 16 << 20
    ar.alloc_cache = "auto"
    assert ar.allocator_stats()["cache_bytes"] <= 16 << 20
    with pytest.raises(ValueError, match="'auto' or a number of bytes"):
        ar.alloc_cache = "big"
