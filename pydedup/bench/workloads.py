"""The benchmark's workloads, built the same way (same seed, same bytes) in
whatever memory a method uses: plain numpy arrays or an arena's.

structured  half arrays written with zeros (resident, as after use), a quarter
            four random arrays present four times each (whole arrays
            duplicated), a quarter unique random data.
scattered   one array, page by page in shuffled order: 50% written zero
            pages, 25% copies of 1,024 distinct random pages, 25% unique
            random pages; the mix kernel KSM is usually measured with.
"""
import time
from dataclasses import dataclass

import numpy as np

from pydedup import procfs

PAGE = procfs.PAGE_SIZE
PAGE_FLOATS = PAGE // 8
COPIES, SOURCES = 4, 4          # structured: four arrays, each present four times
DISTINCT = 1024                 # scattered: distinct pages the copies repeat
SAMPLE_PAGES = 2048             # duplicated pages whose first write is timed
CHUNK = 16384                   # pages filled at a time: no workload-sized temporaries


@dataclass
class Workload:
    name: str
    arrays: list                # float64 arrays holding the data
    theoretical_saved: int      # bytes merging can save at most: every duplicated page
    write_sample: list          # (array index, byte offsets): duplicated pages to write once

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def structured(alloc, size, rng) -> Workload:
    """alloc(n) returns a new float64 array of n elements."""
    part = max(size // 4 // PAGE, SOURCES * COPIES) * PAGE
    zeros = [alloc(part // 8) for _ in range(2)]
    for z in zeros:
        z[:] = 0.0                                   # written: resident, as after use
    sources = [alloc(part // (SOURCES * COPIES) // 8) for _ in range(SOURCES)]
    for s in sources:
        rng.random(out=s)
    copies = []
    for s in sources:
        for _ in range(COPIES - 1):
            copies.append(alloc(s.size))
            copies[-1][:] = s
    unique = alloc(part // 8)
    rng.random(out=unique)
    arrays = zeros + sources + copies + [unique]
    total = sum(a.nbytes for a in arrays)
    minimum = part // COPIES + part                  # one of each copy, and the unique
    half = SAMPLE_PAGES // 2                         # zero pages and pages of copies
    sample = [(0, _spread(zeros[0].nbytes // PAGE, half)),
              (len(zeros) + len(sources), _spread(copies[0].nbytes // PAGE, half))]
    return Workload("structured", arrays, total - minimum, sample)


def scattered(alloc, size, rng) -> Workload:
    npages = max(size // PAGE, 8)
    counts = [npages // 2, npages // 4, npages - npages // 2 - npages // 4]
    kinds = np.repeat(np.array([0, 1, 2], np.uint8), counts)
    rng.shuffle(kinds)                               # page by page
    # each distinct page at least twice, so every copy page has a twin
    ndistinct = max(1, min(DISTINCT, counts[1] // 2))
    distinct = rng.random((ndistinct, PAGE_FLOATS))
    data = alloc(npages * PAGE_FLOATS)
    pages = data.reshape(npages, PAGE_FLOATS)
    copied = 0
    for lo in range(0, npages, CHUNK):
        k = kinds[lo:lo + CHUNK]
        chunk = pages[lo:lo + CHUNK]
        chunk[k == 0] = 0.0
        copies = int((k == 1).sum())
        # the copies take the distinct pages in turn: shuffled by position
        chunk[k == 1] = distinct[np.arange(copied, copied + copies) % ndistinct]
        copied += copies
        unique = k == 2
        chunk[unique] = rng.random((int(unique.sum()), PAGE_FLOATS))
    duplicated = np.flatnonzero(kinds != 2)
    picked = duplicated[_spread(len(duplicated), SAMPLE_PAGES) // PAGE]
    minimum = (ndistinct + counts[2]) * PAGE
    return Workload("scattered", [data], data.nbytes - minimum, [(0, picked * PAGE)])


WORKLOADS = {"structured": structured, "scattered": scattered}


def _spread(npages, n):
    """Byte offsets of n pages spread evenly over npages."""
    return np.linspace(0, npages - 1, min(n, npages)).astype(np.int64) * PAGE


def read_pass(arrays):
    """One plain read of every byte: numpy's OR-reduction, memory bound."""
    for a in arrays:
        np.bitwise_or.reduce(a.view(np.uint64), axis=None)


def fault_in(arrays):
    """Read one word a page so every merged page is mapped and PSS sees it."""
    for a in arrays:
        a.view(np.uint8)[::PAGE].sum()


def best_of(runs, work) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def first_write_seconds(workload) -> float:
    """Seconds per page to write one byte into each sampled duplicated page
    (merged pages, after a merge: the copy-on-write fault). Destroys sharing."""
    start, n = time.perf_counter(), 0
    for index, offsets in workload.write_sample:
        workload.arrays[index].view(np.uint8)[offsets] = 1
        n += len(offsets)
    return (time.perf_counter() - start) / n
