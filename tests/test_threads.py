"""Pages read on several threads (the `threads` knob): a threaded pass
merges exactly what a single-threaded one does, loses no write, and the
knobs that steer it (`threads`, `max_cpu`) reject bad values."""
import contextlib
import os
import threading
import time

import numpy as np
import pytest

import pydedup
from pydedup import testing

from kernel import PAGE, frame_offsets, zero_page_mapped

PAGE_FLOATS = PAGE // 8
CHUNK_PAGES = 16384              # the scan's chunk (_scan.pxd STATE_CHUNK): chunks are
                                # hashed on the helpers while one before is looked at
# What threads change: times, and who wrote the new frames.
TIMING = {"seconds", "phase_seconds", "phase_cpu_seconds", "helper_cpu_seconds", "threads",
          "frames_new_on_helpers"}


def build(arena, seed=7):
    """The same arrays in any arena: zero pages, whole copies, runs of NaN
    (tiles), scattered copies of a few pages, unique pages; every run long
    enough to be hashed and compared on threads."""
    rng = np.random.default_rng(seed)
    zeros = arena.zeros(700 * PAGE_FLOATS)
    zeros[:] = 0.0                                       # written: holds memory
    source = arena.empty(600 * PAGE_FLOATS)
    rng.random(out=source)
    copy = arena.empty(source.size)
    copy[:] = source
    filled = arena.empty(900 * PAGE_FLOATS)
    rng.random(out=filled)
    filled[50 * PAGE_FLOATS:700 * PAGE_FLOATS] = np.nan  # a run of one content
    distinct = rng.random((16, PAGE_FLOATS))
    arena.empty(CHUNK_PAGES * PAGE_FLOATS)               # never written: what follows is
    scattered = arena.empty(800 * PAGE_FLOATS)           # in the scan's next chunk
    rng.random(out=scattered)
    pick = rng.permutation(800)[:400]
    scattered.reshape(800, PAGE_FLOATS)[pick] = distinct[rng.integers(0, 16, 400)]
    return [zeros, source, copy, filled, scattered]


def counters(report):
    return {k: v for k, v in report.as_dict().items() if k not in TIMING}


def page_view(arrays):
    """What the kernel says each page maps: a frame-store offset, the zero
    page, or its own memory."""
    out = []
    for a in arrays:
        zero = zero_page_mapped(a) or [False] * (a.nbytes // PAGE)   # None: no PAGEMAP_SCAN
        out += [("zero" if z else off) for off, z in zip(frame_offsets(a), zero)]
    return out


def test_a_threaded_merge_merges_what_one_thread_does(barrier):
    outcome = {}
    for threads in (1, 4):
        with contextlib.closing(pydedup.Arena(size=128 << 20, threads=threads,
                                              barrier=barrier)) as arena:
            arrays = build(arena)
            expected = [a.copy() for a in arrays]
            first = arena.merge()
            assert first.threads == threads
            arrays[1][::PAGE_FLOATS] += 1.0              # written since: read again
            arrays[4][: 200 * PAGE_FLOATS] = 0.0
            expected[1][::PAGE_FLOATS] += 1.0
            expected[4][: 200 * PAGE_FLOATS] = 0.0
            second = arena.merge()
            testing.check_invariants(arena)
            for a, e in zip(arrays, expected):
                np.testing.assert_array_equal(a, e)
            outcome[threads] = (counters(first), counters(second), page_view(arrays),
                                arena.stats().pages_sharing)
    assert outcome[1] == outcome[4]
    assert outcome[1][0]["pages_merged"] > 0 and outcome[1][0]["pages_zeroed"] > 0


def test_a_merge_over_more_chunks_than_the_hash_stream_holds_merges_what_one_thread_does():
    # The helpers hash up to CHUNKS_AHEAD (4) chunks ahead in a ring that
    # the scan reuses: 5.5 chunks of written pages wrap it.
    npages = 11 * CHUNK_PAGES // 2
    outcome = {}
    for threads in (1, 2):
        with contextlib.closing(pydedup.Arena(size=npages * PAGE + (8 << 20), threads=threads)) as arena:
            data = arena.empty((npages, PAGE_FLOATS))
            data[:] = (np.arange(npages) % 5000)[:, None]   # each content on 18 pages, all chunks
            report = arena.merge()
            np.testing.assert_array_equal(data[:, 0], np.arange(npages) % 5000)
            testing.check_invariants(arena)
            outcome[threads] = (counters(report), page_view([data]))
    assert outcome[1] == outcome[2]
    assert outcome[1][0]["pages_merged"] > npages // 2


def test_a_threaded_background_scan_merges_what_one_thread_does():
    outcome = {}
    for threads in (1, 3):
        with contextlib.closing(pydedup.Arena(size=128 << 20, threads=threads,
                                              pages_to_scan=8000, sleep_millisecs=0)) as arena:
            arrays = build(arena, seed=11)
            merged = [testing.scan_step(arena)[0] for _ in range(12)]
            testing.check_invariants(arena)
            outcome[threads] = (merged, page_view(arrays), arena.stats().pages_sharing)
    assert outcome[1] == outcome[3]
    assert sum(outcome[1][0]) > 0


def test_the_report_says_threads_and_cpu_seconds_a_phase():
    with contextlib.closing(pydedup.Arena(size=16 << 20, threads=2)) as arena:
        build_small = arena.zeros(1024 * PAGE_FLOATS)
        build_small[:] = 0.0
        report = arena.merge()
    assert report.threads == 2
    assert set(report.phase_cpu_seconds) == {"refresh", "decide", "apply"}
    assert all(v >= 0 for v in report.phase_cpu_seconds.values())
    assert report.pages_zeroed == 1024


def start_writer(store, rows, stop, lock, budget, seed, pause):
    """A thread that stores 1, 2, 3, ... into random rows, store(row, value)
    under `lock`, while budget[0] allows (each store spends one), until
    `stop`; it pauses between stores to spread them over a merge."""
    def write():
        pick, value = np.random.default_rng(seed), 0.0
        while not stop.is_set():
            with lock:
                if budget[0] > 0:
                    budget[0] -= 1
                    value += 1
                    store(int(pick.integers(rows)), value)
            time.sleep(pause)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_no_write_is_lost_with_threads(barrier):
    """A writer stores into pages of a long zero run (hashed and compared on
    threads, the comparison under the barrier) while merges run, a few
    hundred stores a merge so that the zero runs stay long; before each
    merge the run is all zero again. Every store stays."""
    rows = 4096                                          # far over MATCH_AHEAD_PAGES
    with contextlib.closing(pydedup.Arena(size=64 << 20, threads=2, barrier=barrier)) as arena:
        a = arena.zeros((rows, PAGE_FLOATS))
        expected = np.zeros(rows)
        stop, lock, budget = threading.Event(), threading.Lock(), [0]

        def store(row, value):
            a[row, 5] = expected[row] = value

        thread = start_writer(store, rows, stop, lock, budget, seed=9, pause=0.00005)
        zeroed, changed, lost = 0, 0, []
        try:
            for _ in range(20):
                with lock:
                    lost += [int(r) for r in np.flatnonzero(a[:, 5] != expected)]
                    a[:] = 0.0
                    expected[:] = 0.0
                    budget[0] = 300
                report = arena.merge()
                zeroed += report.pages_zeroed
                changed += report.skipped["changed"]
        finally:
            stop.set()
            thread.join()
        lost += [int(r) for r in np.flatnonzero(a[:, 5] != expected)]
        assert lost == [], f"{len(lost)} stores lost, pages {lost[:8]}"
        assert zeroed > 0
        assert not a[:, :5].any() and not a[:, 6:].any()
        testing.check_invariants(arena)
        print(f"{changed} pages changed between their comparison and their remap")


def test_no_write_is_lost_while_helpers_write_new_frames(barrier):
    """Two copies of new content: each pair's frame is written from the
    second copy's page, the one the scan comes to last, by a helper
    (_writes.h) in runs of 1,024, while a writer stores into that copy. A
    store between the pair's comparison and the frame's write makes the
    frame differ from the first copy's page, which must then keep its own
    memory (the barrier compares it again, or the written-page tracking
    distrusts the frame). Every store stays, and the first copy is intact."""
    rows = 4096                                          # four writes of WRITE_BEHIND_PAGES
    rng = np.random.default_rng(12)
    with contextlib.closing(pydedup.Arena(size=128 << 20, threads=2, barrier=barrier)) as arena:
        first = arena.zeros((rows, PAGE_FLOATS))
        second = arena.zeros((rows, PAGE_FLOATS))
        stop, lock, budget = threading.Event(), threading.Lock(), [0]
        expected = np.zeros((rows, PAGE_FLOATS))

        def store(row, value):
            second[row, 5] = expected[row, 5] = value

        thread = start_writer(store, rows, stop, lock, budget, seed=13, pause=0.00002)
        frames_new, on_helpers, lost, torn = 0, 0, [], []
        try:
            for _ in range(8):
                with lock:
                    lost += [int(r) for r in np.flatnonzero((second != expected).any(axis=1))]
                    content = rng.random((rows, PAGE_FLOATS))
                    first[:], second[:], expected[:] = content, content, content
                    budget[0] = 600
                report = arena.merge()
                frames_new += report.frames_new
                on_helpers += report.frames_new_on_helpers
                torn += [int(r) for r in np.flatnonzero((first != content).any(axis=1))]
        finally:
            stop.set()
            thread.join()
        lost += [int(r) for r in np.flatnonzero((second != expected).any(axis=1))]
        assert lost == [], f"{len(lost)} stores lost, rows {lost[:8]}"
        assert torn == [], f"the first copy took stores into the second, rows {torn[:8]}"
        assert frames_new > 4 * rows                    # most pairs merged, round after round
        assert 0 < on_helpers <= frames_new             # the helpers took writes
        testing.check_invariants(arena)


@pytest.mark.parametrize("name,value", [("threads", 0), ("threads", 257), ("threads", "2"),
                                        ("threads", True), ("threads", 1.5),
                                        ("max_cpu", 0), ("max_cpu", -5), ("max_cpu", 25601),
                                        ("max_cpu", "50")])
def test_bad_thread_knobs_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        pydedup.Arena(size=1 << 20, **{name: value})


def test_threads_defaults_to_the_cpus_the_process_may_use(monkeypatch):
    monkeypatch.delenv("PYDEDUP_THREADS", raising=False)
    with contextlib.closing(pydedup.Arena(size=1 << 20)) as arena:
        assert arena.threads == min(len(os.sched_getaffinity(0)), 256)
    monkeypatch.setenv("PYDEDUP_THREADS", "3")
    with contextlib.closing(pydedup.Arena(size=1 << 20)) as arena:
        assert arena.threads == 3
        arena.threads = 1
        assert arena.threads == 1
        with pytest.raises(ValueError, match="threads"):
            arena.threads = 0


def test_max_cpu_lengthens_the_scanners_sleep():
    """A step's CPU time over the budget is slept off: at max_cpu=1 the
    scanner sleeps 99 times its step's CPU time, at 100 only
    sleep_millisecs."""
    sleeps = {}
    for max_cpu in (100, 1):
        with contextlib.closing(pydedup.Arena(size=128 << 20, max_cpu=max_cpu,
                                              sleep_millisecs=0, pages_to_scan=4000)) as arena:
            build(arena)
            sleeps[max_cpu] = testing.scan_step(arena)[1]
    assert sleeps[100] == 0
    assert sleeps[1] > 0
