"""The methods the benchmark compares, each on a fresh copy of the same
workload in this run. Every method returns a row of the same figures:

seconds, cpu_seconds   to the full merge (None for plain numpy): wall time, and
                       the CPU time of whoever merged (merge(): the process, with
                       the threads that read pages; the scanner and its threads; ksmd)
pss_before, pss_after  process PSS with every page of the workload mapped
saved_over_theoretical (pss_before - pss_after) / the bytes merging can save
metadata_bytes_per_page  bookkeeping per workload page (kernel KSM: its rmap
                       items, 64 bytes each, the only part it counts per process)
read_gib_per_second    numpy read of every byte after merging, best of 3
first_write_us         one byte written into each of 2,048 duplicated pages
pss_samples            (seconds, PSS) every 50 ms while merging

The merge and merge+ksm rows also give counted_over_theoretical: the same
ratio from the counters (pydedup's bytes_saved; merge+ksm adds KSM's
pages_sharing), which PSS's few MiB of noise cannot move. Not for kernel KSM
alone: with huge pages the kernel (6.12+) maps zero-filled pages of an
underused huge page to the zero page itself, and no KSM counter shows them.
"""
import threading
import time
from typing import Callable

import numpy as np

import pydedup
from pydedup import procfs
from pydedup.bench import ksm
from pydedup.bench.workloads import PAGE, best_of, fault_in, first_write_seconds, read_pass

KSM_RMAP_ITEM_BYTES = 64        # sizeof(struct ksm_rmap_item), x86-64
METHODS: dict[str, tuple[Callable[..., dict], str]] = {}   # name -> (function, description)


def method(name, description):
    def register(function):
        METHODS[name] = (function, description)
        return function
    return register


class PssSampler:
    """Samples the process's PSS on a thread while a merge runs (merge()
    releases the GIL in its loops; ksmd and the scanner run apart). Reading
    smaps_rollup holds the process's mmap lock, which merges need too: the
    sampler waits 20 times as long as its last read took, so it holds the
    lock at most 5% of the time (measured: at every 50 ms it slowed a merge
    of the scattered workload by half)."""

    def __init__(self, interval=0.05):
        self.samples, self._interval = [], interval
        self._stop = threading.Event()

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self):
        while not self._stop.wait(max(self._interval, 20 * self._took)):
            self._sample()

    def _sample(self):
        start = time.perf_counter()
        pss = procfs.process_pss()
        self._took = time.perf_counter() - start
        self.samples.append((round(start - self._t0, 4), pss))


def _row(workload, pss_before, sampler, seconds, cpu_seconds, metadata_per_page, extra=None):
    """The figures after a merge; the first-write figure last (it unshares)."""
    fault_in(workload.arrays)
    pss_after = procfs.process_pss()
    read_seconds = best_of(3, lambda: read_pass(workload.arrays))
    row = {
        "seconds": seconds, "cpu_seconds": cpu_seconds,
        "pss_before": pss_before, "pss_after": pss_after,
        "saved_over_theoretical": (pss_before - pss_after) / workload.theoretical_saved,
        "metadata_bytes_per_page": metadata_per_page,
        "read_gib_per_second": workload.nbytes / 2**30 / read_seconds,
        "first_write_us": first_write_seconds(workload) * 1e6,
        "pss_samples": sampler.samples if sampler else [],
    }
    row.update(extra or {})
    return row


def _numpy_alloc(n):
    return np.empty(n)


def _arena(size, **knobs):
    return pydedup.Arena(size=2 * size + (64 << 20), **knobs)


@method("numpy", "plain numpy arrays, no merging: the baseline")
def plain_numpy(build, size):
    workload = build(_numpy_alloc)
    fault_in(workload.arrays)
    before = procfs.process_pss()
    with PssSampler() as sampler:
        pass
    return _row(workload, before, sampler, None, None, 0.0)


@method("merge", "pydedup Arena.merge(), one call, on the threads knob's default "
                 "(the CPUs the process may run on)")
def pydedup_merge(build, size, **knobs):
    with _arena(size, **knobs) as arena:
        workload = build(lambda n: arena.empty(n))
        fault_in(workload.arrays)
        read_before = best_of(3, lambda: read_pass(workload.arrays))
        before = procfs.process_pss()
        with PssSampler() as sampler:
            # the caller's CPU time and its threads' (merge() reads pages on
            # threads too); not the process's: the sampler's reads of
            # smaps_rollup cost more than the merge with 100,000 mappings
            cpu0 = time.thread_time()
            report = arena.merge()
            cpu = time.thread_time() - cpu0 + report.helper_cpu_seconds
        again = arena.merge()               # nothing written since: tracked pages are not read
        stats = arena.stats()
        return _row(workload, before, sampler, report.seconds, cpu,
                    stats.metadata_bytes / stats.pages_in_use, {
                        "merge_over_read_pass": report.seconds / read_before,
                        "second_merge_seconds": again.seconds,
                        "phase_seconds": report.phase_seconds,
                        "phase_cpu_seconds": report.phase_cpu_seconds,
                        "threads": report.threads,
                        "read_pass_seconds": read_before,
                        "mappings": stats.mappings,
                        "pages_skipped": report.skipped,
                        "pages_unwritten": report.pages_unwritten,
                        "barrier": stats.barrier,
                        "frames": stats.pages_shared,
                        "counted_over_theoretical": _counted(workload, stats.bytes_saved, {}),
                    })


@method("merge-1thr", "pydedup Arena.merge() on one thread (threads=1)")
def pydedup_merge_one_thread(build, size):
    return pydedup_merge(build, size, threads=1)


@method("merge-mprotect", "pydedup Arena.merge() with the mprotect barrier, as an ordinary "
                          "user has it (vm.unprivileged_userfaultfd=0): the write tracking spares "
                          "the barrier's second look at each page")
def pydedup_merge_mprotect(build, size):
    return pydedup_merge(build, size, barrier="mprotect")


@method("merge-mprotect-1thr", "merge-mprotect on one thread (threads=1)")
def pydedup_merge_mprotect_one_thread(build, size):
    return pydedup_merge(build, size, barrier="mprotect", threads=1)


def wait_for_background_merge(arena, timeout=300.0):
    """Run the scanner with the arena's knobs until two whole scans have gone
    by without a merge; (seconds, scanner CPU seconds) to the last merge."""
    core = arena._pages.core
    start = time.monotonic()
    arena.run = 1
    scanner, seen, scans_at_merge = arena.scanner, None, core.full_scans
    while time.monotonic() - start < timeout:
        if scanner.last_merge != seen:
            seen, scans_at_merge = scanner.last_merge, core.full_scans
        if seen is not None and core.full_scans >= scans_at_merge + 2:
            break
        if scanner.error:
            raise scanner.error
        time.sleep(0.005)
    else:
        raise TimeoutError(f"the background scanner did not finish in {timeout} s")
    seconds, cpu = scanner.last_merge - start, scanner.last_merge_cpu
    arena.run = 0
    return seconds, cpu


@method("background", "pydedup background scanner, default knobs (run=1)")
def pydedup_background(build, size):
    with _arena(size) as arena:
        workload = build(lambda n: arena.empty(n))
        fault_in(workload.arrays)
        before = procfs.process_pss()
        with PssSampler() as sampler:
            seconds, cpu = wait_for_background_merge(arena)
        stats = arena.stats()
        return _row(workload, before, sampler, seconds, cpu,
                    stats.metadata_bytes / stats.pages_in_use,
                    {"knobs": {k: getattr(arena, k) for k in ("pages_to_scan", "sleep_millisecs")},
                     "mappings": stats.mappings})


def _kernel_ksm(build, size, knobs):
    # Arena memory without written-page tracking: private anonymous pages
    # without THP, as pydedup's, so both merge the same pages; no merge() is
    # ever called on it.
    with _arena(size, track_writes=False) as arena:
        workload = build(lambda n: arena.empty(n))
        fault_in(workload.arrays)
        before = procfs.process_pss()
        with ksm.KernelKSM(**knobs) as kernel:
            with PssSampler() as sampler:
                result = kernel.merge(*workload.arrays, pss_interval=None)
            rmap_items = result.process.get("ksm_rmap_items")
            meta = (None if rmap_items is None
                    else rmap_items * KSM_RMAP_ITEM_BYTES / (workload.nbytes // PAGE))
            row = _row(workload, before, sampler, result.seconds, result.cpu_seconds, meta,
                       {"knobs": knobs, "full_scans": result.full_scans,
                        "ksm_pages_shared": result.counters.get("pages_shared")})
            kernel.unmerge(*workload.arrays)
        return row


@method("merge+ksm", "pydedup Arena.merge() with kernel_ksm on, then kernel KSM at 10,000 "
                    "pages / 0 ms over what the mapping budget left (root)")
def pydedup_merge_then_kernel_ksm(build, size):
    with _arena(size, kernel_ksm=True) as arena:
        workload = build(lambda n: arena.empty(n))
        fault_in(workload.arrays)
        before = procfs.process_pss()
        with ksm.KernelKSM(**KSM_FAST) as kernel:
            kernel.set(run=1)
            with PssSampler() as sampler:
                cpu0 = time.thread_time()
                report = arena.merge()
                cpu = time.thread_time() - cpu0
                result = kernel.merge(pss_interval=None)      # what is marked: the arena
            stats = arena.stats()
            ksm_cpu = result.cpu_seconds
            row = _row(workload, before, sampler, report.seconds + result.seconds,
                       None if ksm_cpu is None else cpu + ksm_cpu,
                       stats.metadata_bytes / stats.pages_in_use, {
                           "mappings": stats.mappings, "pages_skipped": report.skipped,
                           "kernel_ksm_pages": stats.kernel_ksm_pages,
                           # what is kept of the duplicated content: pydedup's
                           # frames and the kernel's KSM pages (pages_shared)
                           "frames": stats.pages_shared,
                           "ksm_pages_shared": result.counters.get("pages_shared"),
                           "contents_left": report.contents_left,
                           "counted_over_theoretical": _counted(workload, stats.bytes_saved,
                                                                result.counters)})
            arena.unmerge()
        return row


def _counted(workload, pydedup_saved, ksm_counters):
    """Saved over the theoretical from the counters, not PSS (which moves by
    a few MiB between readings): pydedup's bytes_saved and the pages kernel
    KSM saved (pages_sharing, and ksm_zero_pages: use_zero_pages), the
    whole system's: the benchmark runs KSM alone (KernelKSM's lock)."""
    pages = ksm_counters.get("pages_sharing", 0) + ksm_counters.get("ksm_zero_pages", 0)
    return (pydedup_saved + pages * PAGE) / workload.theoretical_saved


KSM_FAST = dict(pages_to_scan=10_000, sleep_millisecs=0, use_zero_pages=1)
KSM_DEFAULT = dict(pages_to_scan=100, sleep_millisecs=20, use_zero_pages=1)


@method("ksm-fast", "kernel KSM, 10,000 pages / 0 ms, use_zero_pages=1 (root)")
def kernel_ksm_fast(build, size):
    return _kernel_ksm(build, size, KSM_FAST)


@method("ksm-default", "kernel KSM, default pace (100 pages / 20 ms), use_zero_pages=1 (root)")
def kernel_ksm_default(build, size):
    return _kernel_ksm(build, size, KSM_DEFAULT)


def skip_reason(name):
    """Why a method cannot run here, or None."""
    return ksm.available() if "ksm" in name else None
