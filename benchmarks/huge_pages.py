"""Compute speed of arena arrays against numpy's, with and without huge pages.

    python benchmarks/huge_pages.py [--full] [--repeat 3] [--no-ksm] [--parts 1,2,3]

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
     the same eight copies;
   - kernel KSM after merging numpy arrays of the same data (MADV_MERGEABLE,
     10,000 pages / 0 ms until it settles; root only, every KSM knob
     restored), with the huge pages left to it.
   Each row shows the MiB of its arrays that huge pages back (AnonHugePages).
   The measuring code is pydedup.bench.access (`python -m pydedup bench --access`).
   Target: unique data in the arena within 1.05x of numpy before and after.
2. The split rule: 2 MiB blocks of which k pages are zero and the rest
   unique, merged with `huge_split_min_pages` 1 (split: the k pages saved)
   and 512 (kept: nothing saved, huge pages stay): the gather's time and the
   memory (PSS of the arena) of each, so the time a kept huge page saves
   stands next to the memory it costs.
3. The first write into a 2 MiB block that merged whole to zero pages: the
   kernel takes a huge page again (and clears it), as on the first write into
   fresh memory of numpy's `np.zeros`; one byte written into each of --blocks
   such blocks, microseconds and PSS taken back a write, in the arena with
   huge pages, in one without (4 KiB a write), and in `np.zeros`, in turn.
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
from pydedup.bench import access  # noqa: E402
from pydedup.bench.access import paired_times  # noqa: E402

MiB = 1 << 20
PAGE = procfs.PAGE_SIZE


def access_rows(args):
    """Part 1, measured by pydedup.bench.access (also `python -m pydedup
    bench --access`): kernel KSM's rows need root, and are skipped with the
    reason otherwise."""
    rows, cols = args.matrix
    result = access.run(args.gather_bytes, args.gathers, (rows, cols), args.repeat,
                        kernel=not args.no_ksm, progress=lambda m: print(m, file=sys.stderr))
    print("1. " + access.table(result))


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


def first_write_rows(args):
    n = args.blocks * 2 * MiB // 8
    firsts = np.arange(args.blocks) * (2 * MiB // 8) + 17   # one element in each block

    def timed_writes(a, pss):
        before, t = pss(), time.perf_counter()
        for i in firsts:
            a[i] = 1.0
        seconds = time.perf_counter() - t
        return seconds / args.blocks, (pss() - before) / args.blocks

    def arena_row(huge_pages):
        with pydedup.Arena(n * 8 + 64 * MiB, huge_pages=huge_pages) as ar:
            a = ar.empty(n)
            a[:] = 0.0                       # written: resident zeros, merged to zero pages
            ar.merge()
            return timed_writes(a, lambda: ar.stats().pss_bytes)

    def numpy_row():
        return timed_writes(np.zeros(n), procfs.process_pss)

    print(f"\n3. the first write into a 2 MiB block merged whole to zero pages: "
          f"one byte into each of {args.blocks} blocks")
    print(f"{'memory':<26} {'us a write':>10} {'KiB taken':>10}")
    for _ in range(args.repeat):
        for name, row in (("arena, huge pages", lambda: arena_row("on")),
                          ("arena, huge_pages=off", lambda: arena_row("off")),
                          ("numpy np.zeros", numpy_row)):
            seconds, taken = row()
            print(f"{name:<26} {seconds * 1e6:10.1f} {taken / 1024:10.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="issue 20's matrix: 8192 x 16384 (default 4096 x 8192)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="*", default=[8, 32, 64, 128, 256])
    parser.add_argument("--split-blocks", type=int, default=512)
    parser.add_argument("--no-ksm", action="store_true", help="leave out kernel KSM's rows")
    parser.add_argument("--blocks", type=int, default=64, help="part 3's blocks")
    parser.add_argument("--parts", default="1,2,3", help="which parts, e.g. 3")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    args.gather_bytes = 1 << 30
    args.gathers = 20_000_000
    args.matrix = (8192, 16384) if args.full else (4096, 8192)
    print(f"transparent huge pages: {procfs.thp_mode()}, {procfs.huge_page_size() // 1024} KiB; "
          f"numpy asks for them: {procfs.numpy_madvises_hugepage()}")
    if "1" in parts:
        access_rows(args)
    if "2" in parts:
        split_rows(args)
    if "3" in parts:
        first_write_rows(args)


if __name__ == "__main__":
    main()
