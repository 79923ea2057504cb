"""Access speed of arrays by where they live (issue 20): a random gather, a
transposed copy and a sequential sum, timed on
  - numpy's memory (the baseline: every ratio is against numpy's time,
    measured in the same run, timed alternately with it);
  - the arena with huge pages, and with 4 KiB pages, before a merge and after;
  - numpy's memory made MADV_MERGEABLE after kernel KSM merged it (at
    10,000 pages / 0 ms, until it settles; root only, else skipped with the
    reason; every /sys/kernel/mm/ksm knob restored: ksm.KernelKSM);
each on unique data (nothing merges) and on merged data (eight copies of one
block in the gathered array). Next to each row: the bytes of the arrays
that huge pages back (AnonHugePages of their mappings), so what a merge
splits shows.

    from pydedup.bench import access
    result = access.run(gather_bytes=256 << 20, gathers=4_000_000, matrix=(2048, 4096))
    print(access.table(result))

Used by `python -m pydedup bench --access` and benchmarks/huge_pages.py.
"""
from __future__ import annotations

import re
import time

import numpy as np

import pydedup
from pydedup import procfs
from pydedup.bench import ksm

MiB = 1 << 20
OPERATIONS = ("gather", "transpose", "sum")
CONTENTS = ("unique", "merged")
COPIES = 8                               # merged data: the gathered array is 8 copies of one block
KSM_KNOBS = {"pages_to_scan": 10_000, "sleep_millisecs": 0}


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def operations(src, mat, out, idx):
    """The three operations on one memory's arrays, by name."""
    return {"gather": lambda: np.take(src, idx), "transpose": lambda: np.copyto(out, mat.T),
            "sum": lambda: src.sum()}


def paired_times(ours, numpy, repeat):
    """{operation: (our best, numpy's best)}, the two timed alternately, so
    that load from elsewhere on the machine weighs on both alike."""
    found = {}
    for name in ours:
        mine, base = [], []
        for _ in range(repeat):
            base.append(timed(numpy[name]))
            mine.append(timed(ours[name]))
        found[name] = (min(mine), min(base))
    return found


class Memory:
    """Where a row's arrays live: numpy's memory, or an arena."""

    def __init__(self, huge_pages=None, size=0):
        self.arena = None if huge_pages is None else pydedup.Arena(size, huge_pages=huge_pages)

    def empty(self, shape):
        return np.empty(shape) if self.arena is None else self.arena.empty(shape)

    def merge(self):
        if self.arena is not None:
            self.arena.merge()

    def close(self):
        if self.arena is not None:
            self.arena.close()


class Data:
    """The content every row copies: the same bytes for every memory."""

    def __init__(self, n, rows, cols, gathers, seed=1):
        rng = np.random.default_rng(seed)
        self.n, self.rows, self.cols = n, rows, cols
        self.idx = rng.integers(0, n, gathers)
        self.unique = rng.random(n)
        self.block = rng.random(n // COPIES)
        self.matrix = rng.random((rows, cols))


def arrays(memory, data, content):
    """(gathered and summed array, matrix, transposed copy's target) in memory."""
    src = memory.empty(data.n)
    mat, out = memory.empty((data.rows, data.cols)), memory.empty((data.cols, data.rows))
    if content == "unique":
        src[:] = data.unique
    else:
        src.reshape(COPIES, -1)[:] = data.block
    mat[:] = data.matrix
    out[:] = 0.0
    return src, mat, out


_HEADER = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) [^\n]*$", re.MULTILINE)


def huge_bytes(*arrays) -> int:
    """AnonHugePages, in bytes, of the mappings that hold the arrays (an
    arena's big array is a mapping of its own; numpy's is malloc's mmap)."""
    spans = [(a.__array_interface__["data"][0], a.__array_interface__["data"][0] + a.nbytes)
             for a in arrays]
    with open("/proc/self/smaps", "rb") as f:
        text = f.read()
    headers = list(_HEADER.finditer(text))
    total = 0
    for i, header in enumerate(headers):
        lo, hi = int(header.group(1), 16), int(header.group(2), 16)
        if not any(start < hi and end > lo for start, end in spans):
            continue
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        found = re.search(rb"^AnonHugePages:\s+(\d+) kB", text[header.end():end], re.MULTILINE)
        total += int(found.group(1)) * 1024 if found else 0
    return total


def _row(memory, content, when, found, huge):
    return {"memory": memory, "data": content, "when": when, "huge_bytes": huge,
            "ops": {name: {"seconds": mine, "numpy_seconds": base, "over_numpy": mine / base}
                    for name, (mine, base) in found.items()}}


def arena_rows(data, content, numpy, repeat, progress):
    """Rows of the arena with huge pages and with 4 KiB pages, before and
    after a merge, against numpy's operations."""
    rows = []
    reserve = -(-(data.n + 2 * data.rows * data.cols) * 8 // procfs.PAGE_SIZE) * procfs.PAGE_SIZE + 64 * MiB
    for label, knob in (("arena, huge pages", "on"), ("arena, 4 KiB pages", "off")):
        memory = Memory(knob, reserve)
        try:
            src, mat, out = arrays(memory, data, content)
            for when in ("before merge", "after merge"):
                progress(f"access: {label}, {content}, {when}")
                if when == "after merge":
                    memory.merge()
                found = paired_times(operations(src, mat, out, data.idx), numpy, repeat)
                rows.append(_row(label, content, when, found, huge_bytes(src, mat, out)))
            del src, mat, out
        finally:
            memory.close()
    return rows


def kernel_ksm_row(data, content, numpy, repeat, progress):
    """numpy arrays of the same data, merged by kernel KSM (MADV_MERGEABLE,
    10,000 pages / 0 ms until it settles), then timed; the knobs are
    restored on leaving, errors included."""
    progress(f"access: kernel KSM, {content}")
    src, mat, out = arrays(Memory(), data, content)
    with ksm.KernelKSM(**KSM_KNOBS) as kernel:
        merged = kernel.merge(src, mat, out)
        huge = huge_bytes(src, mat, out)         # before a write copies a merged page
        found = paired_times(operations(src, mat, out, data.idx), numpy, repeat)
    row = _row("kernel KSM", content, "after merge", found, huge)
    row["ksm_merging_pages"] = merged.process.get("ksm_merging_pages")
    row["ksm_seconds"] = merged.seconds
    return row


def run(gather_bytes=256 * MiB, gathers=4_000_000, matrix=(2048, 4096), repeat=3,
        kernel=True, progress=None) -> dict:
    """Every row, as {"config", "rows", "skipped"}: each row's ops give
    seconds, numpy's seconds and their ratio, timed in this run."""
    progress = progress or (lambda message: None)
    n = max(COPIES, gather_bytes // 8 // COPIES * COPIES)
    rows_, cols = matrix
    if rows_ <= 0 or cols <= 0 or gathers <= 0 or repeat <= 0:
        raise ValueError(f"access: matrix {matrix}, gathers {gathers} and repeat {repeat} "
                         "must be positive")
    data = Data(n, rows_, cols, gathers)
    reason = None if kernel else "not asked for"
    reason = reason or ksm.available()
    result: dict = {"config": {"gather_bytes": n * 8, "gathers": gathers, "matrix": [rows_, cols],
                         "repeat": repeat, "thp": procfs.thp_mode(),
                         "numpy_madvise_hugepage": procfs.numpy_madvises_hugepage()},
              "rows": [], "skipped": {"kernel KSM": reason} if reason else {}}
    for content in CONTENTS:
        src, mat, out = arrays(Memory(), data, content)
        numpy = operations(src, mat, out, data.idx)
        result["rows"] += arena_rows(data, content, numpy, repeat, progress)
        if reason is None:
            result["rows"].append(kernel_ksm_row(data, content, numpy, repeat, progress))
        # numpy's row: its best time of all the pairs above
        best = {name: min(row["ops"][name]["numpy_seconds"] for row in result["rows"]
                          if row["data"] == content) for name in OPERATIONS}
        result["rows"].append(_row("numpy", content, "-", {name: (t, t) for name, t in best.items()},
                                   huge_bytes(src, mat, out)))
        del numpy, src, mat, out
    return result


def table(result) -> str:
    c = result["config"]
    lines = [f"access speed: gather {c['gathers']:,} of {c['gather_bytes'] // MiB} MiB, transposed "
             f"copy {c['matrix'][0]} x {c['matrix'][1]}, sum of {c['gather_bytes'] // MiB} MiB "
             f"(best of {c['repeat']}, timed alternately with numpy's; ratio: numpy's time = 1; "
             f"THP {c['thp']})",
             f"{'memory':<34} {'data':<7} " + " ".join(f"{name:>15}" for name in OPERATIONS)
             + f" {'huge MiB':>9}"]
    for row in result["rows"]:
        label = row["memory"] + ("" if row["when"] == "-" else ", " + row["when"])
        cells = " ".join(f"{row['ops'][name]['seconds']:7.3f}s {row['ops'][name]['over_numpy']:5.2f}x"
                         for name in OPERATIONS)
        lines.append(f"{label:<34} {row['data']:<7} {cells} {row['huge_bytes'] / MiB:9.0f}")
    for row in result["rows"]:
        if "ksm_seconds" in row:
            lines.append(f"kernel KSM, {row['data']}: {row['ksm_merging_pages']} pages merged, "
                         f"settled in {row['ksm_seconds']:.1f} s")
    for name, reason in result["skipped"].items():
        lines.append(f"{name}: skipped: {reason}")
    return "\n".join(lines)
