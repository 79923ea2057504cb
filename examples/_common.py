"""What every example does: run a workload with plain numpy and inside
`pydedup.arena()`, merge, and print the saving as PSS read from
/proc/self/smaps_rollup (never RSS) and the time against plain numpy."""
import argparse
import gc
import time

import pydedup

MiB = 1 << 20


def process_pss() -> int:
    """The process's PSS in bytes, read here, not from pydedup's counters."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise OSError("no Pss in /proc/self/smaps_rollup")


def size_option(description, default_mib):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--mib", type=int, default=default_mib,
                        help=f"about how many MiB of data (default {default_mib})")
    args = parser.parse_args()
    if args.mib <= 0:
        parser.error("--mib must be positive")
    return args.mib


def compare(name, build, check=None):
    """build() makes the data (a tuple of arrays or objects holding them).
    Runs it with plain numpy, then in an arena, merges, prints the figures."""
    build()                               # warm: imports, and the libraries' first-call costs
    gc.collect()
    start = time.perf_counter()
    plain = build()
    plain_seconds = time.perf_counter() - start
    del plain
    gc.collect()

    start = time.perf_counter()
    with pydedup.arena() as ar:
        data = build()
    built = time.perf_counter() - start
    ar.stats()                            # hands the allocator's cache of freed pages back,
    before = process_pss()                # so that the drop below is the merge's alone
    report = ar.merge()
    after = process_pss()
    if check is not None:
        check(data)                       # results unchanged by merging
    print(f"{name}:")
    print(f"  plain numpy {plain_seconds:.3f} s; in the arena {built:.3f} s "
          f"(x{built / plain_seconds:.2f}), merge {report.seconds:.3f} s")
    print(f"  process PSS {before / MiB:,.1f} MiB before the merge, {after / MiB:,.1f} MiB after: "
          f"{(before - after) / MiB:,.1f} MiB saved (smaps_rollup)")
    print(f"  pages merged {report.pages_merged:,}, to the zero page {report.pages_zeroed:,}")
    ar.close()
    return before - after
