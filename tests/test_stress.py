"""Stress: many threads allocate, write, check and free arrays while the
background scanner runs flat out (sleep_millisecs 0, pages_to_scan large)
and another thread asks for merges, unmerges, knob changes and invariant
checks, all under a memory limit (RLIMIT_DATA), in a child process so
that the limit cannot hurt pytest. At the end: no lost write, no leaked
frame, no leaked mapping, and the arena's PSS and frame store back to zero.

A short run (STRESS_SECONDS_CI) is part of every test run; a long one runs
with --stress (STRESS_SECONDS_LONG) or PYDEDUP_STRESS_SECONDS=<seconds>.

The limit is RLIMIT_DATA, not a memory cgroup: CI runs unprivileged too,
where no cgroup can be made. It caps the process's private writable memory
a little above what it has at the start, so numpy's allocations (the
threads' reference copies, the arena's arrays, whatever else allocates)
fail with ENOMEM (MemoryError) again and again; the memfd's pages are shared memory and are
not capped (tests/test_limits.py stops the frame store with RLIMIT_FSIZE)."""
import gc
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pydedup import testing

from kernel import process_data

pytestmark = pytest.mark.slow   # threads, forks and frees for seconds

HERE = os.path.dirname(os.path.abspath(__file__))
STRESS_SECONDS_CI = 4
STRESS_SECONDS_LONG = 300
THREADS = 8
LIMIT_MARGIN = 32 << 20          # data above the start's: the threads' copies run into it


def stress_seconds(config):
    if os.environ.get("PYDEDUP_STRESS_SECONDS"):
        return float(os.environ["PYDEDUP_STRESS_SECONDS"])
    return STRESS_SECONDS_LONG if config.getoption("--stress") else STRESS_SECONDS_CI


def test_stress(request):
    seconds = stress_seconds(request.config)
    code = f"import json, test_stress; print(json.dumps(test_stress.child({seconds})))"
    path = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE),
                            env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True,
                            timeout=seconds * 3 + 300)
    assert result.returncode == 0, result.stderr[-5000:]
    out = json.loads(result.stdout.splitlines()[-1])
    print(json.dumps(out, indent=1))           # shown with -s: docs/testing.md quotes it
    assert out["lost_writes"] == [] and out["errors"] == []
    assert out["writes_checked"] > 0 and out["merges"] > 0
    assert out["memory_refused"] > 0           # the limit did bite
    # What the limit refused was refused with ENOMEM, and said so.
    for error in out["os_errors"] + out["scanner_errors"]:
        assert "Cannot allocate memory" in error or "MemoryError" in error, error
    assert out["merged_or_zeroed"] > 0         # the merging did work under the writers
    end = out["end"]
    assert end["pages_in_use"] == 0
    assert end["frames_in_use"] == 0 and end["frame_store_bytes"] == 0, "a frame leaked"
    assert end["pss_bytes"] == out["baseline"]["pss_bytes"] == 0
    assert out["invariant_checks"] > 0
    assert end["mappings"] == out["baseline"]["mappings"], "freed pages left the range cut"


def test_freeing_everything_leaves_the_arena_one_mapping():
    """a and its copy b merge (both onto frames: file mappings); a is freed
    (a fresh anonymous mapping) and c takes its pages and writes them (c's
    mapping gets an anon_vma of its own); then b and c are freed. The part
    after b still has the reservation's anon_vma, so the kernel joins none
    of the mappings left: only a mapping laid over the whole range once
    every array is gone (Core.forget_cuts) makes it one again."""
    import pydedup
    from pydedup import procfs
    arena = pydedup.Arena(size=1 << 26)
    rng = np.random.default_rng(8)
    page_floats = procfs.PAGE_SIZE // 8
    a = arena.array(rng.random((8, page_floats)))
    b = arena.array(a)
    arena.merge()
    del a
    c = arena.array(rng.random((8, page_floats)))
    del b, c
    gc.collect()
    stats = arena.stats()
    assert stats.pages_in_use == 0 and stats.frames_in_use == 0
    assert stats.mappings == 1


# -- in the child ---------------------------------------------------------------

def limit_data(margin):
    """RLIMIT_DATA (Linux 4.7+ counts private writable mappings, VmData) at
    what the process has now plus `margin`. Not RLIMIT_AS: glibc reserves 64
    MiB of address space for each thread's malloc arena up front, so an
    address-space limit set after the threads start never bites, while
    those reservations count as data only as malloc commits them."""
    limit = process_data() + margin
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


class Worker:
    """Allocates arrays whose pages are often identical or all zero, writes
    them, checks each against its own numpy copy, frees them."""

    def __init__(self, arena, seed, deadline, page):
        self.arena, self.deadline, self.page = arena, deadline, page
        self.rng = random.Random(seed)
        self.live = []                          # (array, copy)
        self.checked = self.memory_refused = 0
        self.lost, self.errors = [], []

    def new_array(self):
        pages = self.rng.choice([1, 2, 8, 32, 64, 256, 1024])   # the big ones hit the limit
        pattern = self.rng.choice(["zeros", "fill", "copy", "random"])
        words = pages * self.page // 8
        if pattern == "copy" and self.live:
            source = self.rng.choice(self.live)[1]
            return self.arena.array(source), source.copy()
        a = self.arena.zeros(words)
        if pattern == "fill":
            a[:] = self.rng.choice([1.0, 2.0, 0.0])
        elif pattern == "random":
            a[:] = np.random.default_rng(self.rng.getrandbits(32)).random(words)
        return a, a.copy()

    def write(self, a, copy):
        lo = self.rng.randrange(a.size)
        hi = min(a.size, lo + self.rng.choice([1, 100, self.page // 8, 4 * self.page // 8]))
        value = self.rng.choice([0.0, 1.0, float(self.rng.getrandbits(20))])
        copy[lo:hi] = value
        a[lo:hi] = value

    def check(self):
        for a, copy in self.live:
            if not np.array_equal(a, copy):
                self.lost.append(f"{np.count_nonzero(a != copy)} values differ")
            self.checked += 1

    def run(self):
        while time.monotonic() < self.deadline and not self.lost:
            try:
                action = self.rng.random()
                if action < 0.3 and len(self.live) < 8:
                    self.live.append(self.new_array())
                elif action < 0.8 and self.live:
                    self.write(*self.rng.choice(self.live))
                elif self.live:
                    self.live.pop(self.rng.randrange(len(self.live)))
                self.check()
            except MemoryError:                 # the memory limit: expected, go on
                self.memory_refused += 1
            except Exception as e:              # noqa: BLE001 - reported to the parent
                self.errors.append(repr(e))
                return


def requester(arena, deadline, rng, counts):
    """Merges, unmerges, unmergeable/mergeable, knob changes, invariant checks."""
    while time.monotonic() < deadline:
        try:
            action = rng.random()
            if action < 0.5:
                report = arena.merge()
                counts["merges"] += 1
                counts["merged_or_zeroed"] += report.pages_merged + report.pages_zeroed
            elif action < 0.6:
                arena.unmerge()
                counts["unmerges"] += 1
            elif action < 0.7:
                arena.max_page_sharing = rng.choice([2, 3, 256])
                arena.use_zero_pages = rng.random() < 0.8
            else:
                testing.check_invariants(arena)
                counts["invariant_checks"] += 1
            if not arena.scanner.running:       # an error stopped it (ENOMEM under the limit)
                counts["scanner_errors"].append(repr(arena.scanner.error))
                arena.run = 1                   # starts it again
        except MemoryError:
            counts["memory_refused"] += 1
        except OSError as e:                    # ENOMEM under the limit: a clear report
            counts["os_errors"].append(str(e))
        time.sleep(0.001)


def child(seconds):
    import pydedup
    from pydedup import procfs
    page = procfs.PAGE_SIZE
    arena = pydedup.Arena(size=512 << 20, run=1, sleep_millisecs=0, pages_to_scan=1 << 20)
    stats = arena.stats()
    baseline = dict(mappings=stats.mappings, pss_bytes=stats.pss_bytes)
    deadline = time.monotonic() + seconds
    workers = [Worker(arena, seed, deadline, page) for seed in range(THREADS)]
    counts = dict(merges=0, unmerges=0, merged_or_zeroed=0, invariant_checks=0,
                  memory_refused=0, os_errors=[], scanner_errors=[])
    threads = [threading.Thread(target=w.run) for w in workers]
    threads.append(threading.Thread(target=requester,
                                    args=(arena, deadline, random.Random(99), counts)))
    for t in threads:
        t.start()
    limit = limit_data(LIMIT_MARGIN)            # once the threads' stacks are mapped
    for t in threads:
        t.join()
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    for w in workers:
        w.check()
    scanner_cpu = arena.scanner.cpu_seconds
    arena.run = 0
    lost = [x for w in workers for x in w.lost]
    errors = [x for w in workers for x in w.errors]
    checked = sum(w.checked for w in workers)
    for w in workers:
        w.live.clear()
    gc.collect()
    arena.merge()                               # releases what died under the lock
    testing.check_invariants(arena)
    end = arena.stats()
    return dict(seconds=seconds, threads=THREADS, data_limit=limit,
                baseline=baseline, lost_writes=lost, errors=errors, writes_checked=checked,
                memory_refused=sum(w.memory_refused for w in workers) + counts["memory_refused"],
                scanner_cpu_seconds=round(scanner_cpu, 2),
                end=dict(pages_in_use=end.pages_in_use, frames_in_use=end.frames_in_use,
                         frame_store_bytes=end.frame_store_bytes, mappings=end.mappings,
                         pss_bytes=end.pss_bytes, full_scans=end.full_scans),
                **{k: v for k, v in counts.items() if k != "memory_refused"})
