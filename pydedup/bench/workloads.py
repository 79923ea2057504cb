"""The benchmark's workloads, built the same way (same seed, same bytes) in
whatever memory a method uses: plain numpy arrays or an arena's.

structured  half arrays written with zeros (resident, as after use), a quarter
            four random arrays present four times each (whole arrays
            duplicated), a quarter unique random data.
scattered   one array, page by page in shuffled order: 50% written zero
            pages, 25% copies of 1,024 distinct random pages, 25% unique
            random pages; the mix kernel KSM is usually measured with.
filled      content repeated within arrays: a quarter NaN, an eighth ones, an
            eighth a sentinel fill value (-9999), each as a whole array; half
            one array of random data broken by runs of NaN and of the sentinel
            (1 to 1,024 pages each, not page-aligned), as missing values and
            masks leave them.
dataframe   two consolidated float64 blocks of 100 columns, as pandas keeps a
            DataFrame and its copy(): 40 zero, 25 NaN, 15 constant (five
            values) and 20 random columns, columns not page-aligned.
"""
import hashlib
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


FILLS = (np.nan, 1.0, -9999.0)   # filled: what a whole array holds
RUN_FILLS = (np.nan, -9999.0)    # filled: the runs inside the random array


def filled(alloc, size, rng) -> Workload:
    quarter = max(size // 4 // PAGE, 4) * PAGE_FLOATS
    arrays = [alloc(quarter), alloc(quarter // 2), alloc(quarter // 2)]
    for a, value in zip(arrays, FILLS):
        a.fill(value)
    runs = alloc(2 * quarter)
    rng.random(out=runs)
    at = int(rng.integers(0, PAGE_FLOATS))
    while at < runs.size:
        length = int(rng.integers(1, 1025)) * PAGE_FLOATS + int(rng.integers(0, PAGE_FLOATS))
        runs[at:at + length] = RUN_FILLS[int(rng.integers(0, len(RUN_FILLS)))]
        at += length + int(rng.integers(1, 257)) * PAGE_FLOATS
    arrays.append(runs)
    sample = [(0, _spread(arrays[0].nbytes // PAGE, SAMPLE_PAGES))]
    return Workload("filled", arrays, theoretical_saved(arrays), sample)


COLUMNS = (("zero", 40), ("nan", 25), ("constant", 15), ("random", 20))
CONSTANTS = (1.0, -1.0, 100.0, 0.5, -9999.0)


def dataframe(alloc, size, rng) -> Workload:
    ncols = sum(n for _, n in COLUMNS)
    nrows = max(size // 2 // 8 // ncols, PAGE_FLOATS) + PAGE_FLOATS // 3   # columns cross pages
    block = alloc(ncols * nrows).reshape(ncols, nrows)   # pandas: one row a column
    col = 0
    for kind, count in COLUMNS:
        for i in range(count):
            if kind == "zero":
                block[col] = 0.0
            elif kind == "nan":
                block[col] = np.nan
            elif kind == "constant":
                block[col] = CONSTANTS[i % len(CONSTANTS)]
            else:
                rng.random(out=block[col])
            col += 1
    copy = alloc(block.size)
    copy[:] = block.reshape(-1)
    arrays = [block.reshape(-1), copy]
    sample = [(1, _spread(copy.nbytes // PAGE, SAMPLE_PAGES))]
    return Workload("dataframe", arrays, theoretical_saved(arrays), sample)


def theoretical_saved(arrays) -> int:
    """Bytes merging saves at most: every page but one of each content, and
    every zero page (the kernel zero page costs nothing). Only whole pages
    count: arrays start on a page, and a last partial page is left out."""
    seen: set[bytes] = set()
    pages = 0
    for a in arrays:
        rows = a.view(np.uint8)[:a.nbytes // PAGE * PAGE].reshape(-1, PAGE)
        for lo in range(0, len(rows), CHUNK):
            chunk = rows[lo:lo + CHUNK]
            pages += len(chunk)
            zero = ~chunk.view(np.uint64).any(axis=1)
            seen.update(hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                        for row in chunk[~zero])
    return (pages - len(seen)) * PAGE


WORKLOADS = {"structured": structured, "scattered": scattered, "filled": filled,
             "dataframe": dataframe}


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
