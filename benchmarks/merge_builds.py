"""merge() by two or more builds of pydedup, alternately, in one sitting:
medians of many merges, for a change whose effect is smaller than this
machine's noise from one merge to the next.

    python benchmarks/merge_builds.py OLD_TREE NEW_TREE [--threads 2] [--barrier mprotect]
        [--rounds 4] [--merges 3] [--gib 1] [--workload structured|first-member]
        [--perf-control FIFO]

Each tree is a checkout of pydedup with its extension built in place
(`python setup.py build_ext --inplace`). Each round runs every tree once,
in alternating order, as a child process (under SCHED_FIFO if allowed, so
that other processes do not take its CPUs); a child makes --merges fresh
arenas, each holding the workload, and merges each once. Just before each
workload is built it touches and frees 3x its size of memory, so that the
host backs the memory the workload and the frames take (a VM reporting free
pages to its host otherwise makes fresh memory cost up to 20x: see
benchmarks/fresh_memory.py).

The workloads:
- structured (pydedup.bench.workloads): read passes, the merge's time over
  numpy's OR-reduce over memory of the workload's size, in the same child;
- first-member (issue 16): a first member of a new shared store merging
  --gib of random doubles (a new frame for every page), and just before
  it, as its baseline, a private arena merging two copies of half as much
  (a frame for every two pages: benchmarks/shared.py's two-copy merge);
  seconds a GiB of each, and their ratio.

Besides each tree's medians over all its merges, the structured workload
prints each later tree against the first round by round (the ratio of
their medians in one round, and the median of those ratios): a burst of
noise then falls on both trees of a round, not on one tree's median.

With --perf-control, the path of a FIFO that `perf record --control
fifo:FIFO -D -1` reads (and which blocks until perf does), each merge alone
is recorded (one tree, one round,
one merge, to read a profile):

    mkfifo /tmp/ctl
    perf record -F 20000 -g -D -1 --control fifo:/tmp/ctl -o merge.data -- \
        python benchmarks/merge_builds.py . --rounds 1 --merges 1 --perf-control /tmp/ctl
    perf report -i merge.data --no-children --sort pid,sym -g none
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


class Recorded:
    """perf records what runs inside `with recorded:` (nothing without a FIFO)."""

    def __init__(self, fifo):
        self.fd = os.open(fifo, os.O_WRONLY) if fifo else None

    def __enter__(self):
        if self.fd is not None:
            os.write(self.fd, b"enable\n")

    def __exit__(self, *exc):
        if self.fd is not None:
            os.write(self.fd, b"disable\n")


def child(workload, threads, barrier, gib, merges, fifo):
    recorded = Recorded(fifo)
    if workload == "first-member":
        return first_member(threads, barrier, gib, merges, recorded)
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
            with recorded:
                report = arena.merge()
            out.append({"read_passes": report.seconds / min(passes),
                        "decide": report.phase_seconds["decide"],
                        "decide_cpu": getattr(report, "phase_cpu_seconds",   # none before 047b2c8
                                              {}).get("decide", float("nan")),
                        "apply": report.phase_seconds["apply"]})
            del workload
    print(json.dumps(out))


def first_member(threads, barrier, gib, merges, recorded):
    import uuid

    import numpy as np

    import pydedup
    size = int(gib * (1 << 30))
    data = np.random.default_rng(1).random(size // 8)
    out = []
    for _ in range(merges):
        seconds = {}
        for kind in ("two copies", "first member"):
            warm = np.ones(3 * size // 8)
            del warm
            shared = f"merge-builds-{uuid.uuid4().hex[:8]}" if kind == "first member" else ""
            with pydedup.Arena(2 * size + (64 << 20), threads=threads, barrier=barrier,
                               shared=shared) as arena:
                held = ([arena.array(data)] if shared
                        else [arena.array(data[:size // 16]) for _ in range(2)])
                with recorded:
                    seconds[kind] = arena.merge().seconds / gib
                del held
        out.append({"first_member": seconds["first member"], "two_copies": seconds["two copies"],
                    "ratio": seconds["first member"] / seconds["two copies"]})
    print(json.dumps(out))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--barrier", default="mprotect", choices=["uffd", "mprotect"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--merges", type=int, default=3)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--workload", default="structured", choices=["structured", "first-member"])
    parser.add_argument("--perf-control", default="", metavar="FIFO")
    args = parser.parse_args(argv)
    fifo = ["chrt", "-f", "50"] if shutil.which("chrt") and os.geteuid() == 0 else []
    # A tree given twice is run twice, as two builds: its noise against itself.
    names = [tree if args.trees.count(tree) == 1 else f"{tree} (#{i + 1})"
             for i, tree in enumerate(args.trees)]
    found = {name: [] for name in names}
    rounds = []                         # per round: each build's rows
    builds = list(zip(names, args.trees))
    for r in range(args.rounds):
        rounds.append({})
        for name, tree in (builds if r % 2 == 0 else builds[::-1]):
            done = subprocess.run(
                [*fifo, sys.executable, __file__, CHILD, args.workload, str(args.threads), args.barrier,
                 str(args.gib), str(args.merges), args.perf_control],
                cwd=tree, env={**os.environ, "PYTHONPATH": os.path.abspath(tree)},
                capture_output=True, text=True, check=True)
            rounds[-1][name] = json.loads(done.stdout)
            found[name] += rounds[-1][name]
    print(f"{args.workload} {args.gib:g} GiB, {args.threads} thread(s), {args.barrier} barrier, "
          f"{args.rounds} rounds x {args.merges} merges a tree")
    for tree, rows in found.items():
        if args.workload == "first-member":
            print(f"{tree}: first member median {statistics.median(r['first_member'] for r in rows):.3f} "
                  f"s/GiB, two copies {statistics.median(r['two_copies'] for r in rows):.3f} s/GiB; "
                  f"ratio median {statistics.median(r['ratio'] for r in rows):.2f} (min "
                  f"{min(r['ratio'] for r in rows):.2f}, max {max(r['ratio'] for r in rows):.2f})")
            continue
        passes = [row["read_passes"] for row in rows]
        print(f"{tree}: read passes median {statistics.median(passes):.2f} "
              f"(min {min(passes):.2f}, max {max(passes):.2f}); decide median "
              f"{statistics.median(row['decide'] for row in rows):.3f} s (CPU, all threads "
              f"{statistics.median(row['decide_cpu'] for row in rows):.3f} s), apply median "
              f"{statistics.median(row['apply'] for row in rows):.3f} s")
    if args.workload == "structured":
        for name in names[1:]:
            print(f"{name} / {names[0]}, round by round:")
            for key in ("read_passes", "decide", "decide_cpu"):
                ratios = [statistics.median(row[key] for row in r[name])
                          / statistics.median(row[key] for row in r[names[0]]) for r in rounds]
                print(f"  {key}: median {statistics.median(ratios):.2f} "
                      f"({sum(x < 1 for x in ratios)} of {len(ratios)} below 1): "
                      + " ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), int(sys.argv[6]),
              sys.argv[7])
    else:
        main()
