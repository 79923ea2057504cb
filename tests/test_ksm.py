"""The kernel's KSM, driven by pydedup.bench.ksm: knobs restored exactly, memory
merged and unmerged with its data intact. Needs root; skipped otherwise."""
import mmap
import os

import numpy as np
import pytest

from pydedup.bench import ksm

from kernel import EXCLUSIVE, PFN, PRESENT, pagemap, zero_page_mapped

PAGE = mmap.PAGESIZE
PAGE_FLOATS = PAGE // 8
FAST = dict(pages_to_scan=10_000, sleep_millisecs=0)

needs_root = pytest.mark.skipif(ksm.available() is not None, reason=str(ksm.available()))


def test_available_gives_a_reason_without_root():
    if os.geteuid() != 0:
        assert ksm.available()
        return
    pid = os.fork()
    if pid == 0:                                  # child: drop root, ask again
        try:
            os.setgid(65534)
            os.setuid(65534)
            reason = ksm.available()
            os._exit(0 if reason and "\n" not in reason else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def private_memory(npages):
    """Plain numpy memory on a private anonymous mapping (KSM ignores shared ones)."""
    m = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE)
    return m, np.frombuffer(m, dtype=np.float64)


def workload(a, rng, copies=8, sources=32):
    """Pages of `a`: a quarter zeros (written), then `sources` random pages
    `copies` times each, the rest unique random pages."""
    pages = a.reshape(-1, PAGE_FLOATS)
    zeros = len(pages) // 4
    pages[:zeros] = 0.0
    source = rng.random((sources, PAGE_FLOATS))
    pages[zeros:zeros + sources * copies] = np.tile(source, (copies, 1))
    pages[zeros + sources * copies:] = rng.random((len(pages) - zeros - sources * copies, PAGE_FLOATS))
    return zeros


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)


@needs_root
def test_knobs_are_restored_exactly():
    before = ksm.knobs_at_rest()
    changed = dict(pages_to_scan=1234, sleep_millisecs=7,
                   use_zero_pages=1 - int(before["use_zero_pages"]),
                   smart_scan=1 - int(before["smart_scan"]),
                   max_page_sharing=int(before["max_page_sharing"]) + 3,
                   stable_node_chains_prune_millisecs=1500)
    with ksm.KernelKSM(**changed) as kernel:
        assert kernel.saved == before
        now = ksm.knobs()
        assert {name: now[name] for name in changed} == {name: str(v) for name, v in changed.items()}
    assert ksm.knobs_at_rest() == before


@needs_root
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_knobs_are_restored_after_an_exception(error):
    before = ksm.knobs_at_rest()
    with pytest.raises(error):
        with ksm.KernelKSM(pages_to_scan=4321, sleep_millisecs=3, run=1):
            assert ksm.knobs()["run"] == "1"
            raise error("inside")
    assert ksm.knobs_at_rest() == before


@needs_root
def test_unknown_knob_changes_nothing():
    before = ksm.knobs_at_rest()
    with pytest.raises(ValueError, match="full_scans"):
        with ksm.KernelKSM(sleep_millisecs=5, full_scans=3):
            pass
    assert ksm.knobs_at_rest() == before


@needs_root
def test_kernel_ksm_merges_duplicates_and_zero_pages(rng):
    m, a = private_memory(2048)                   # 8 MiB
    zeros = workload(a, rng)
    expected = a.copy()
    before = ksm.knobs_at_rest()
    with ksm.KernelKSM(use_zero_pages=1, **FAST) as kernel:
        result = kernel.merge(a, timeout=10)
        assert result.bytes_mergeable == a.nbytes
        assert result.full_scans >= 1 and result.seconds <= result.waited_seconds   # merged in scan 2+
        assert result.process["ksm_zero_pages"] == zeros
        assert result.process["ksm_merging_pages"] == 32 * 8   # 32 KSM pages, each mapped 8 times
        assert result.counters["pages_shared"] >= 32
        assert result.counters["pages_sharing"] >= 32 * 7
        assert result.pss_samples and all(pss > 0 for _, pss in result.pss_samples)
        np.testing.assert_array_equal(a, expected)
        pfns = [entry & PFN for entry in pagemap(a)]
        copies = np.array(pfns[zeros:zeros + 32 * 8]).reshape(8, 32)
        assert (copies == copies[0]).all() and len(set(copies[0])) == 32
        assert zero_page_mapped(a) in (None, [True] * zeros + [False] * (2048 - zeros))

        kernel.unmerge(a)
        # ksm_merging_pages only falls when ksmd next scans (or at run=2): the
        # pages themselves tell that they are unmerged
        assert ksm.process_counters()["ksm_zero_pages"] == 0
        entries = pagemap(a)
        assert all(e & PRESENT and e & EXCLUSIVE for e in entries)
        assert len({e & PFN for e in entries}) == 2048
        assert zero_page_mapped(a) in (None, [False] * 2048)
        np.testing.assert_array_equal(a, expected)
    assert ksm.knobs_at_rest() == before
    del a
    m.close()


@needs_root
def test_exit_unmerges_and_restores_knobs_that_need_it(rng):
    """Memory left merged at exit: unmerged (KSM was stopped with nothing
    merged when entered), and max_page_sharing, which the kernel refuses to
    change while pages are shared, restored all the same."""
    found = ksm.counters()
    if ksm.knobs()["run"] == "1" or found["pages_shared"] or found["ksm_zero_pages"]:
        pytest.skip("kernel KSM in use on this machine")
    m, a = private_memory(512)
    workload(a, rng, copies=4, sources=16)
    expected = a.copy()
    before = ksm.knobs_at_rest()
    try:
        with ksm.KernelKSM(max_page_sharing=int(before["max_page_sharing"]) + 1, **FAST) as kernel:
            ksm.mergeable(a)                      # marked outside kernel.merge(): not unmarked on exit
            kernel.merge(timeout=10)
            assert ksm.process_counters()["ksm_merging_pages"] > 0
        assert ksm.knobs_at_rest() == before
        assert ksm.process_counters()["ksm_merging_pages"] == 0
        assert not any(ksm.counters()[name] for name in ksm.HOLDING)   # rmap items too
        np.testing.assert_array_equal(a, expected)
    finally:
        ksm.unmergeable(a)
        del a
        m.close()


def test_shared_memory_is_refused():
    m = mmap.mmap(-1, 4 * PAGE)                   # MAP_SHARED: KSM would silently ignore it
    try:
        with pytest.raises(ValueError, match="MAP_SHARED"):
            ksm.mergeable(m)
    finally:
        ksm.unmergeable(m)
        m.close()


def test_page_ranges_cover_every_page_touched_and_join():
    base = 100 * PAGE
    assert ksm._page_ranges([(base + 10, 5)]) == [(base, base + PAGE)]
    assert ksm._page_ranges([(base + 2 * PAGE, PAGE), (base, 2 * PAGE + 1)]) == \
        [(base, base + 3 * PAGE)]
    a = np.zeros((8, PAGE_FLOATS))
    lo = a.__array_interface__["data"][0]
    assert ksm._span(a[::2]) == (lo, lo + 7 * PAGE)
    assert ksm._span(a[::-2]) == (lo + PAGE, lo + 8 * PAGE)
    assert ksm._span(a[:, :1]) == (lo, lo + 7 * PAGE + 8)
