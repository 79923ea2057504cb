"""Read throughput of a large all-zero array in four states (seed 000:
merging zero pages into one shared page slowed every later read)."""
import contextlib

import pydedup
from pydedup.bench.workloads import best_of, read_pass


def zero_read(size: int, progress=print) -> dict:
    """(a) never written, (b) written with zeros and not merged, (c) merged
    to the kernel zero page, (d) merged into zero frames (use_zero_pages
    off). Best of 5 reads each, after one read that maps every page; ratios
    to (a)."""
    cases = {}
    for name, written, merged, zero_pages in (("a never written", False, False, True),
                                              ("b written zeros", True, False, True),
                                              ("c zero page", True, True, True),
                                              ("d zero frames", True, True, False)):
        progress(f"zero read: {name}")
        with contextlib.closing(pydedup.Arena(size=size + (64 << 20), use_zero_pages=zero_pages)) as arena:
            z = arena.zeros(size // 8)
            if written:
                z[:] = 0.0
            if merged:
                arena.merge()
            read_pass([z])                          # maps every page
            cases[name] = {"seconds": best_of(5, lambda z=z: read_pass([z]))}
            del z
    base = cases["a never written"]["seconds"]
    for case in cases.values():
        case["gib_per_second"] = size / 2**30 / case["seconds"]
        case["throughput_over_a"] = base / case["seconds"]
    return cases


def show_zero_read(cases: dict) -> str:
    lines = ["zero-array read              GiB/s   throughput / (a)"]
    for name, case in cases.items():
        lines.append(f"  {name:<24}{case['gib_per_second']:8.1f}   {case['throughput_over_a']:8.3f}")
    return "\n".join(lines)
