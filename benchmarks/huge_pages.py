"""Compute speed of arena arrays against numpy's, with and without huge pages.

    python benchmarks/huge_pages.py [--full] [--repeat 3]

numpy asks for transparent huge pages for its big arrays; an arena with the
`huge_pages` knob on gets them too, and keeps them through a merge that
finds little to merge there (`huge_split_min_pages`). Every figure is the
best of --repeat runs, and every ratio is against numpy's time measured in
the same run.

1. Access speed: a random gather (20M elements from 1 GiB), a transposed copy (8192 x 16384 float64 with
   --full, 4096 x 8192 by default) and a sequential sum, on
   - numpy's memory;
   - the arena with huge pages, before a merge and after one (unique data:
     nothing merges, so nothing should change);
   - the arena with `huge_pages="off"` (4 KiB pages), before and after;
   - merged data: eight copies of one block, merged (the pages map frames of
     the frame store, 4 KiB each, whatever the knob), against numpy holding
     the same eight copies.
   Target: unique data in the arena within 1.05x of numpy before and after.
2. The split rule: 2 MiB blocks of which k pages are zero and the rest
   unique, merged with `huge_split_min_pages` 1 (split: the k pages saved)
   and 512 (kept: nothing saved, huge pages stay): the gather's time and the
   memory (PSS of the arena) of each, so the time a kept huge page saves
   stands next to the memory it costs.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout

import pydedup  # noqa: E402
from pydedup import procfs  # noqa: E402

MiB = 1 << 20
PAGE = procfs.PAGE_SIZE


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

    def huge_in_use(self):
        return "-" if self.arena is None else self.arena.stats().huge_pages_in_use

    def close(self):
        if self.arena is not None:
            self.arena.close()


def arrays(memory, n, rows, cols, content, unique, block, matrix):
    src, mat, out = memory.empty(n), memory.empty((rows, cols)), memory.empty((cols, rows))
    if content == "unique":
        src[:] = unique
    else:
        src.reshape(8, -1)[:] = block
    mat[:] = matrix
    out[:] = 0.0
    return src, mat, out


def access_rows(args):
    n = args.gather_bytes // 8
    rows, cols = args.matrix
    rng = np.random.default_rng(1)
    idx = rng.integers(0, n, args.gathers)
    unique = rng.random(n)
    block = rng.random(n // 8)
    matrix = rng.random((rows, cols))
    reserve = (args.gather_bytes + 2 * rows * cols * 8) + 64 * MiB
    print(f"1. access speed: gather {args.gathers:,} of {args.gather_bytes // MiB} MiB, "
          f"transposed copy {rows} x {cols}, sum of {args.gather_bytes // MiB} MiB "
          f"(best of {args.repeat}, timed alternately with numpy's; ratio: numpy's time = 1)")
    print(f"{'memory':<36} {'data':<7} {'gather':>15} {'transpose':>15} {'sum':>15} {'huge pages':>10}")
    for content in ("unique", "merged"):
        numpy = operations(*arrays(Memory(), n, rows, cols, content, unique, block, matrix), idx)
        for label, knob in (("arena, huge pages", "on"), ("arena, 4 KiB pages", "off")):
            memory = Memory(knob, reserve)
            src, mat, out = arrays(memory, n, rows, cols, content, unique, block, matrix)
            for when in ("before merge", "after merge"):
                if when == "after merge":
                    memory.arena.merge()
                found = paired_times(operations(src, mat, out, idx), numpy, args.repeat)
                cells = " ".join(f"{mine:7.3f}s {mine / base:5.2f}x" for mine, base in found.values())
                print(f"{label + ', ' + when:<36} {content:<7} {cells} {memory.huge_in_use():>10}")
            del src, mat, out
            memory.close()
        cells = " ".join(f"{base:7.3f}s {1:5.2f}x" for _, base in found.values())
        print(f"{'numpy (its last times)':<36} {content:<7} {cells} {'-':>10}")
        del numpy


def split_rows(args):
    blocks = args.split_blocks
    per_block = 2 * MiB // PAGE
    n = blocks * 2 * MiB // 8
    rng = np.random.default_rng(2)
    idx = rng.integers(0, n, args.gathers // 2)
    unique = rng.random(n)
    plain = np.empty(n)
    plain[:] = unique
    numpy = {"gather": lambda: np.take(plain, idx)}
    print(f"\n2. the split rule: {blocks} huge pages, k of each one's {per_block} pages zero, "
          f"the rest unique; gather of {len(idx):,}, timed alternately with numpy's")
    print(f"{'k':>4} {'rule':<14} {'split':>6} {'kept':>6} {'gather':>8} {'x numpy':>8} "
          f"{'PSS MiB':>8} {'saved MiB':>9}")
    for k in args.k:
        for rule, split_min in (("split (1)", 1), ("kept (512)", 512)):
            ar = pydedup.Arena(blocks * 2 * MiB + 64 * MiB, huge_pages="on",
                               huge_split_min_pages=split_min)
            a = ar.empty(n)
            a[:] = unique
            a.reshape(blocks, per_block, -1)[:, :k] = 0
            before = ar.stats().pss_bytes
            ar.merge()
            st = ar.stats()
            g, base = paired_times({"gather": lambda a=a: np.take(a, idx)}, numpy, args.repeat)["gather"]
            print(f"{k:>4} {rule:<14} {st.huge_pages_split:>6} {st.huge_pages_kept:>6} {g:7.3f}s "
                  f"{g / base:7.2f}x {st.pss_bytes / MiB:8.1f} {(before - st.pss_bytes) / MiB:9.1f}")
            del a
            ar.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="issue 20's matrix: 8192 x 16384 (default 4096 x 8192)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="*", default=[8, 32, 64, 128, 256])
    parser.add_argument("--split-blocks", type=int, default=512)
    args = parser.parse_args()
    args.gather_bytes = 1 << 30
    args.gathers = 20_000_000
    args.matrix = (8192, 16384) if args.full else (4096, 8192)
    print(f"transparent huge pages: {procfs.thp_mode()}, {procfs.huge_page_size() // 1024} KiB; "
          f"numpy asks for them: {procfs.numpy_madvises_hugepage()}")
    access_rows(args)
    split_rows(args)


if __name__ == "__main__":
    main()
