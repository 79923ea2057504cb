"""merge() of the structured workload by two or more builds of pydedup,
alternately, in one sitting: medians of many merges, for a change whose
effect is smaller than this machine's noise from one merge to the next.

    python benchmarks/merge_builds.py OLD_TREE NEW_TREE [--threads 2] [--barrier mprotect]
        [--rounds 4] [--merges 3] [--gib 1]

Each tree is a checkout of pydedup with its extension built in place
(`python setup.py build_ext --inplace`). Each round runs every tree once,
in alternating order, as a child process (under SCHED_FIFO if allowed, so
that other processes do not take its CPUs); a child makes --merges fresh
arenas, each holding the workload, and merges each once. Just before each
workload is built it touches and frees 3x its size of memory, so that the
host backs the memory the workload and the frames take (a VM reporting free
pages to its host otherwise makes fresh memory cost up to 20x: see
benchmarks/fresh_memory.py). The read pass is numpy's OR-reduce over
memory of the workload's size, measured in the same child.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

CHILD = "--child"


def child(threads, barrier, gib, merges):
    import numpy as np

    import pydedup
    from pydedup.bench import workloads
    size = int(gib * (1 << 30))
    ones = np.ones(size // 8)
    out = []
    for _ in range(merges):
        warm = np.ones(3 * size // 8)
        del warm
        with pydedup.Arena(2 * size + (64 << 20), threads=threads, barrier=barrier) as arena:
            workload = workloads.structured(lambda n: arena.empty(n), size, np.random.default_rng(1))
            passes = []
            for _ in range(3):
                start = time.perf_counter()
                np.bitwise_or.reduce(ones.view(np.uint64))
                passes.append(time.perf_counter() - start)
            report = arena.merge()
            out.append({"read_passes": report.seconds / min(passes),
                        "decide": report.phase_seconds["decide"], "apply": report.phase_seconds["apply"]})
            del workload
    print(json.dumps(out))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--barrier", default="mprotect", choices=["uffd", "mprotect"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--merges", type=int, default=3)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args(argv)
    fifo = ["chrt", "-f", "50"] if shutil.which("chrt") and os.geteuid() == 0 else []
    found = {tree: [] for tree in args.trees}
    for r in range(args.rounds):
        for tree in (args.trees if r % 2 == 0 else args.trees[::-1]):
            done = subprocess.run(
                [*fifo, sys.executable, __file__, CHILD, str(args.threads), args.barrier, str(args.gib),
                 str(args.merges)], cwd=tree, env={**os.environ, "PYTHONPATH": os.path.abspath(tree)},
                capture_output=True, text=True, check=True)
            found[tree] += json.loads(done.stdout)
    print(f"structured {args.gib:g} GiB, {args.threads} thread(s), {args.barrier} barrier, "
          f"{args.rounds} rounds x {args.merges} merges a tree")
    for tree, rows in found.items():
        passes = [row["read_passes"] for row in rows]
        print(f"{tree}: read passes median {statistics.median(passes):.2f} "
              f"(min {min(passes):.2f}, max {max(passes):.2f}); decide median "
              f"{statistics.median(row['decide'] for row in rows):.3f} s, apply median "
              f"{statistics.median(row['apply'] for row in rows):.3f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
