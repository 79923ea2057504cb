"""What NUMA awareness costs merge(), measured against merge() without it in
the same run: alternating rounds on the same arrays, the median of each.

    python benchmarks/numa.py [--size 512M] [--rounds 9]

Rows:
  one pair of trees     merge_across_nodes=True, as on any machine of one node
  a tree pair per node  merge_across_nodes=False; on one node nothing is looked up
  node lookups          nodes looked up (move_pages) for every page hashed and
                        frames written under a node policy, as on a machine of
                        several nodes, with merge_across_nodes=False

On a machine of one node the first two rows are the bookkeeping a user pays;
the third is what a machine of several nodes adds for asking the kernel.
"""
import argparse
import contextlib
import statistics
import sys

import numpy as np

import pydedup
from pydedup.bench import parse_size

PAGE = pydedup.features()["page_size"]

SETUPS = {
    "one pair of trees": dict(across=True, lookups=False),
    "a tree pair per node": dict(across=False, lookups=False),
    "node lookups": dict(across=False, lookups=True),
}


def build(arena, size, rng):
    """A quarter each: one array and its copy, zeros written, unique data."""
    quarter = size // 4 // 8
    original = arena.array(rng.random(quarter))
    copy = arena.array(original)
    zeros = arena.zeros(quarter)
    zeros[:] = 0.0
    unique = arena.array(rng.random(quarter))
    return [original, copy, zeros, unique]


def merge_seconds(arena, setup) -> float:
    arena.unmerge()
    arena.merge_across_nodes = setup["across"]
    arena._pages.core.set_nodes(2 if setup["lookups"] else len(pydedup.numa.topology().nodes))
    return arena.merge().seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("512M"))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    with contextlib.closing(pydedup.Arena(size=2 * args.size)) as arena:
        arrays = build(arena, args.size, np.random.default_rng(0))
        seconds = {name: [] for name in SETUPS}
        names = list(SETUPS)
        for round in range(args.rounds):
            # Each setup takes each place in the order in turn: the merge
            # after another setup's differs (what unmerge left, caches).
            for name in names[round % len(names):] + names[:round % len(names)]:
                seconds[name].append(merge_seconds(arena, SETUPS[name]))
        base = statistics.median(seconds["one pair of trees"])
        print(f"merge() of {args.size / 2**20:.0f} MiB, median of {args.rounds} alternating rounds, "
              f"{pydedup.features()['numa_nodes']} NUMA node(s) here")
        for name, runs in seconds.items():
            median = statistics.median(runs)
            print(f"  {name:<22} {median * 1000:8.1f} ms   {median / base:6.3f}x")
        del arrays


if __name__ == "__main__":
    sys.exit(main())
