"""No write is lost while merges run: the write barrier, in both its modes."""
import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import pydedup
from pydedup import testing

from kernel import PAGE

PAGE_FLOATS = PAGE // 8
ROUNDS = int(os.environ.get("PYDEDUP_STRESS_ROUNDS", 100))


def uffd_allowed() -> bool:
    return pydedup.features()["userfaultfd"]


class Writers:
    """Threads that keep rewriting regions of an array so that they stay
    mergeable (every page of a region holds the same value), each checking
    that what it wrote is there; merges run meanwhile."""

    def __init__(self, array, pages_each):
        self.array = array
        self.pages_each = pages_each
        self.errors = []
        self.efaults = 0
        self.last = {}
        self.stop = threading.Event()

    def region(self, k):
        return self.array[k * self.pages_each * PAGE_FLOATS:(k + 1) * self.pages_each * PAGE_FLOATS]

    def run(self, k, write):
        def loop():
            region, value = self.region(k), 0.0
            while not self.stop.is_set():
                value += 1
                try:
                    write(region, value)
                except Exception as e:       # noqa: BLE001 - reported by the test
                    self.errors.append(f"region {k}: {e!r}")
                    return
                if not (region == value).all():
                    self.errors.append(f"region {k}: wrote {value}, read {sorted(set(region))[:4]}")
                    return
                self.last[k] = value
        return threading.Thread(target=loop, daemon=True)


def write_with_ufunc(region, value):          # numpy drops the GIL in the loop
    np.multiply(region, 0.0, out=region)
    np.add(region, value, out=region)


def write_with_python_stores(region, value):
    for i in range(0, region.size, PAGE_FLOATS // 4):
        region[i] = value                     # one store at a time, GIL held
    region[:] = value


def reader_through_pipe(writers, pipes):
    """Write with read() from a pipe of its own: the kernel is the writer."""
    r, w = os.pipe()
    pipes += [r, w]

    def write_with_readinto(region, value):
        payload = np.full(region.size, value).tobytes()
        view = memoryview(region).cast("B")
        done = 0
        feeder = threading.Thread(target=os.write, args=(w, payload))
        feeder.start()
        while done < len(payload):
            try:
                done += os.readv(r, [view[done:]])
            except OSError as e:
                if e.errno != errno.EFAULT:
                    raise
                writers.efaults += 1          # mprotect barrier: the data stays in the pipe
        feeder.join()
    return write_with_readinto


@pytest.mark.slow
def test_no_write_is_lost_while_merges_run(barrier):
    with contextlib.closing(pydedup.Arena(size=64 << 20, barrier=barrier)) as arena:
        pages_each = 8
        array = arena.zeros(12 * pages_each * PAGE_FLOATS)
        writers = Writers(array, pages_each)
        pipes = []
        kinds = ([write_with_ufunc] * 6 + [write_with_python_stores] * 4
                 + [reader_through_pipe(writers, pipes) for _ in range(2)])
        threads = [writers.run(k, write) for k, write in enumerate(kinds)]
        for t in threads:
            t.start()
        merged = 0
        try:
            for _ in range(ROUNDS):
                report = arena.merge()
                merged += report.pages_merged + report.pages_zeroed
                if writers.errors:
                    break
        finally:
            writers.stop.set()
            for t in threads:
                t.join()
            for fd in pipes:
                os.close(fd)
        assert writers.errors == []
        assert merged > 0                    # the merges did work under the writers
        for k, value in writers.last.items():
            np.testing.assert_array_equal(writers.region(k), value)
        if barrier == "uffd":
            assert writers.efaults == 0       # kernel writes wait instead of failing


@pytest.mark.slow
def test_a_writer_under_merges_leaks_no_frame(barrier, rng):
    """Pages that each merge maps onto a fresh frame, a writer breaks, and
    the next merge finds changed under the barrier, beside twins that
    merge, unmerge and merge again: punched frames stay punched. With the
    uffd barrier, a write fault alongside UFFDIO_WRITEPROTECT used to fill
    such a hole again (_barrier.pxi, barrier_may_refill;
    benchmarks/uffd_refill.c): a page of zeros no page maps, which the
    checker finds after the merge."""
    with pydedup.Arena(size=1 << 26, barrier=barrier) as arena:
        a = arena.array(rng.random((256, PAGE_FLOATS)))
        b = arena.array(a)
        writing = arena.zeros((64, PAGE_FLOATS))
        stop, seen = threading.Event(), []

        def write():
            value = 0.0
            while not stop.is_set():
                value += 1
                writing[:] = value
                if not (writing == value).all():
                    seen.append(value)

        writer = threading.Thread(target=write)
        writer.start()
        merged = 0
        try:
            for i in range(100):
                merged += arena.merge().pages_merged
                testing.check_invariants(arena)
                if i % 10 == 9:
                    arena.unmerge()
        finally:
            stop.set()
            writer.join()
        assert seen == []
        assert merged >= 10 * 256            # the twins merged again after each unmerge
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_neighbouring_runs_share_a_protection_and_no_write_between_them_is_lost(barrier, rng):
    """The uffd barrier holds neighbouring runs under one protection, the
    pages between them too (_remap.pxi gather_run); mprotect holds each run
    alone. Every third page is a writer's, between a zero page and a copy,
    with content no other page holds: its writers, numpy and the kernel's
    read(), wait while a merge holds it and then succeed; no write is lost,
    and the runs merge again after each unmerge()."""
    triples, nwriters, distinct = 192, 4, rng.random((8, PAGE_FLOATS))
    with contextlib.closing(pydedup.Arena(size=64 << 20, barrier=barrier)) as arena:
        pages = arena.zeros((3 * triples, PAGE_FLOATS))
        pages[0::3] = 0.0                         # written: zero pages holding memory
        pages[1::3] = distinct[np.arange(triples) % len(distinct)]
        expected = pages.copy()
        between = pages[2::3]                     # a view: the writers' pages, in the arena
        stop, errors, efaults, last = threading.Event(), [], [], {}

        def write(k, by_kernel):
            mine, value = range(k, triples, nwriters), 0.0
            r, w = os.pipe()
            try:
                while not stop.is_set():
                    value += 1
                    for i in mine:
                        content = np.full(PAGE_FLOATS, i * 1e9 + value)
                        if by_kernel:             # read() from a pipe: the kernel writes
                            os.write(w, content.tobytes())
                            while True:
                                try:
                                    os.readv(r, [memoryview(between[i]).cast("B")])
                                    break
                                except OSError as e:
                                    if e.errno != errno.EFAULT:
                                        raise
                                    efaults.append(i)   # mprotect: the data stays in the pipe
                        else:
                            np.copyto(between[i], content)
                        if not (between[i] == content).all():
                            errors.append(f"page {i}: wrote {content[0]}, read {between[i][0]}")
                            return
                    last[k] = value
            finally:
                os.close(r)
                os.close(w)

        threads = [threading.Thread(target=write, args=(k, k % 2 == 1), daemon=True)
                   for k in range(nwriters)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(last) < nwriters and not errors and time.monotonic() < deadline:
            time.sleep(0.001)                     # every page written once: none is zero
        reports = []
        try:
            for _ in range(max(ROUNDS // 10, 3)):
                reports.append(arena.merge())
                arena.unmerge()
                if errors:
                    break
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)        # a writer the barrier never let go fails, not hangs
        assert not any(t.is_alive() for t in threads), "a writer still waits on the barrier"
        assert errors == []
        assert len(last) == nwriters
        for i in range(triples):
            np.testing.assert_array_equal(between[i], i * 1e9 + last[i % nwriters])
        np.testing.assert_array_equal(pages[0::3], expected[0::3])
        np.testing.assert_array_equal(pages[1::3], expected[1::3])
        for report in reports:
            assert report.pages_zeroed + report.pages_merged == 2 * triples
            runs = 2 * triples                    # a zero page, a copy: frames apart
            assert report.protections == (runs if barrier == "mprotect" else -(-runs // 64))
        if barrier == "uffd":
            assert efaults == []                  # kernel writes wait instead of failing


def test_a_forced_uffd_barrier_that_is_not_allowed_says_why():
    if uffd_allowed():
        pytest.skip("this process may use userfaultfd")
    with pytest.raises(OSError, match="userfaultfd"):
        pydedup.Arena(size=1 << 20, barrier="uffd")


def test_auto_takes_uffd_where_allowed():
    with contextlib.closing(pydedup.Arena(size=1 << 20)) as arena:
        assert arena.stats().barrier == ("uffd" if uffd_allowed() else "mprotect")


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("faulthandler_first", [True, False])
def test_a_real_crash_still_crashes_and_is_reported(faulthandler_first):
    """The handler passes faults that are not the barrier's on to the one
    before it (here Python's faulthandler), whichever was installed first,
    and the process dies of SIGSEGV instead of hanging."""
    result = run_python(f"""
        import ctypes, faulthandler, numpy as np, pydedup
        if {faulthandler_first}:
            faulthandler.enable()
        arena = pydedup.Arena(size=1 << 24, barrier="mprotect")
        a = arena.zeros(1 << 16); a[:] = 1; b = arena.array(a)
        arena.merge()
        faulthandler.enable()
        arena.merge()                          # puts the barrier's handler back on top
        print("merged", flush=True)
        ctypes.string_at(8)
        """)
    assert "merged" in result.stdout, result.stderr
    assert result.returncode == -11, result.stderr
    assert "Fatal Python error: Segmentation fault" in result.stderr


WRITER_UNDER_MERGES = """
    import faulthandler, threading, numpy as np, pydedup
    from pydedup import testing
    arena = pydedup.Arena(size=1 << 26, barrier={barrier!r})
    {after_arena}
    a = arena.zeros(1 << 18)
    stop, lost = False, []
    def write():
        v = 0.0
        while not stop and not lost:
            v += 1
            a[:] = v
            if not (a == v).all():
                lost.append(v)
    t = threading.Thread(target=write); t.start()
    for _ in range(100):
        arena.merge()
    stop = True; t.join()
    testing.check_invariants(arena)
    print("lost" if lost else "ok", faulthandler.is_enabled())
    """


@pytest.mark.slow
def test_the_barrier_survives_faulthandler_replacing_it():
    """faulthandler.enable() after the arena replaces the SIGSEGV handler;
    the next merge puts the barrier's back, and writers under merge wait
    instead of crashing the process."""
    result = run_python(WRITER_UNDER_MERGES.format(barrier="mprotect",
                                                   after_arena="faulthandler.enable()"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "True"], result.stderr


# -- the barrier's second look, and when the write tracking spares it ---------------

def tracked_arena(barrier, **knobs):
    arena = pydedup.Arena(size=64 << 20, barrier=barrier, **knobs)
    if not testing.core(arena).tracking:
        arena.close()
        pytest.skip("written-page tracking is not available here (PAGEMAP_SCAN, userfaultfd)")
    return arena


def test_the_tracking_shows_each_page_written_since_a_pass_read_it(rng):
    with contextlib.closing(tracked_arena("mprotect")) as arena:
        a = arena.array(rng.random(8 * PAGE_FLOATS))
        first, n = testing.page_range(arena, a)
        arena.merge()                                 # reads every page: protects it
        core = testing.core(arena)
        assert not any(core.written_map(first, n))
        a[3 * PAGE_FLOATS] = -1.0
        a[5 * PAGE_FLOATS + 7] = -1.0
        assert [i for i, w in enumerate(core.written_map(first, n)) if w] == [3, 5]


def test_the_mprotect_barrier_does_not_read_again_what_no_one_wrote(barrier, rng):
    """A merge reads each page, then holds each run under the barrier and
    makes sure, right before its remap, that the run still holds what was
    read. With the mprotect barrier the write tracking tells without
    reading the pages again; the uffd barrier takes the range from the
    tracking, which forgets, so it compares them. A short run is compared
    either way: that costs less than asking the tracking."""
    with contextlib.closing(tracked_arena(barrier)) as arena:
        a = arena.array(rng.random(32 * PAGE_FLOATS))
        b = arena.array(a)
        z = arena.zeros(16 * PAGE_FLOATS)
        z[:] = 0.0                                    # written: zero pages holding memory
        short = arena.array(rng.random(4 * PAGE_FLOATS))
        short_copy = arena.array(short)
        report = arena.merge()
        assert report.pages_merged == 72 and report.pages_zeroed == 16
        assert report.pages_unwritten == (80 if barrier == "mprotect" else 0)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(short, short_copy)
        assert not z.any()
        testing.check_invariants(arena)


def test_a_checksum_shared_by_other_bytes_merges_nothing(barrier):
    """Two pages of one 32-bit checksum and other bytes, found by search
    (word 0 of a fixed random page set to 3093, or to 93284). Where applying
    compares every page again under the barrier (uffd, or no tracking), the
    scan takes a match of checksums for the bytes: the third page is given
    the frame of the first two, and the barrier's comparison keeps it as it
    is (`skipped["changed"]`). With mprotect and the tracking, which trusts
    the scan's comparison, the scan compares bytes and gives it none."""
    if PAGE != 4096:
        pytest.skip("the two pages were searched for among 4 KiB pages")
    base = np.random.default_rng(0).integers(0, 2**63, PAGE_FLOATS, dtype=np.uint64)
    one, other = base.copy(), base.copy()
    one[0], other[0] = 3093, 93284
    sums = [pydedup._fast.page_checksums(p.view(np.uint8)) for p in (one, other)]
    assert all(s1 & 0xFFFFFFFF == s2 & 0xFFFFFFFF for s1, s2 in zip(*(s.values() for s in sums)))
    with contextlib.closing(pydedup.Arena(size=1 << 24, barrier=barrier)) as arena:
        a = arena.array(np.stack([one, one, other]))
        report = arena.merge()
        by_checksum = barrier == "uffd" or not testing.core(arena).tracking
        assert report.pages_merged == 2
        assert report.skipped["changed"] == (1 if by_checksum else 0)
        np.testing.assert_array_equal(a, np.stack([one, one, other]))
        testing.check_invariants(arena)


def test_without_tracking_every_held_page_is_read_again(rng):
    with contextlib.closing(pydedup.Arena(size=64 << 20, barrier="mprotect",
                                          track_writes=False)) as arena:
        a = arena.array(rng.random(32 * PAGE_FLOATS))
        b = arena.array(a)
        report = arena.merge()
        assert report.pages_merged == 64 and report.pages_unwritten == 0
        np.testing.assert_array_equal(a, b)
