"""What an arena's first merge() costs beyond its pass, against the pass.

    python benchmarks/first_merge.py [--mib 64 256 1024] [--repeat 3]

The first merge() of an arena publishes its counters for `python -m
pydedup stats` (pydedup/publish.py). Scattered pages (the bench's
`scattered` workload: zero, copied and unique pages shuffled page by page)
cut the arena into up to `vm.max_map_count` mappings, and reading
/proc/self/smaps for them is tens of megabytes of text. For each size, a
fresh arena: the wall time of the merge() call, the pass's own seconds
(`MergeReport.seconds`), their ratio, the mappings made, and the time of an
explicit stats() after it (which reads smaps: the baseline of that cost).
Medians of `--repeat` arenas. Run it with PYTHONPATH set to another build
to compare builds.
"""
import argparse
import statistics
import time

import numpy as np

import pydedup
from pydedup.bench import workloads

MiB = 1 << 20


def one(mib: int, seed: int) -> dict:
    with pydedup.Arena(size=2 * mib * MiB + (64 << 20)) as arena:
        held = workloads.scattered(lambda n: arena.empty(n), mib * MiB, np.random.default_rng(seed))
        start = time.perf_counter()
        report = arena.merge()
        call = time.perf_counter() - start
        start = time.perf_counter()
        counters = arena.stats()
        stats_seconds = time.perf_counter() - start
        del held
    return dict(call=call, merge=report.seconds, stats=stats_seconds, mappings=counters.mappings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"pydedup from {pydedup.__file__}; medians of {args.repeat}")
    print("| MiB | mappings | merge() call s | its pass s | call / pass | stats() s |")
    print("|---|---|---|---|---|---|")
    for mib in args.mib:
        runs = [one(mib, seed) for seed in range(args.repeat)]
        for r in runs:
            r["ratio"] = r["call"] / r["merge"]
        m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"| {mib} | {m['mappings']:,.0f} | {m['call']:.3f} | {m['merge']:.3f} | "
              f"{m['ratio']:.2f} | {m['stats']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
