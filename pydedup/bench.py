"""The merge benchmark: a structured workload in an arena, merged once, every
figure a ratio against a baseline measured in the same run.

Workload (of --size bytes): half arrays written with zeros, a quarter copies
of four arrays (each array present four times), a quarter unique random data.
"""
import argparse
import json
import sys
import time

import numpy as np
import xxhash

import pydedup
from pydedup import procfs

PAGE = procfs.PAGE_SIZE
COPIES, SOURCES = 4, 4


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def build_workload(arena, size, rng):
    """Arrays of the structured workload, and the bytes they would need at
    the least (each distinct page once, zero pages none)."""
    part = size // 4 // PAGE * PAGE
    zeros = [arena.zeros(part // 8) for _ in range(2)]       # float64: part bytes each
    for z in zeros:
        z[:] = 0.0                                           # written: resident, as after use
    sources = [arena.empty(part // (SOURCES * COPIES) // 8) for _ in range(SOURCES)]
    for s in sources:
        s[:] = rng.random(s.size)
    copies = [arena.array(s) for s in sources for _ in range(COPIES - 1)]
    unique = arena.empty(part // 8)
    unique[:] = rng.random(unique.size)
    arrays = zeros + sources + copies + [unique]
    minimum = part // COPIES + part                          # one of each copy, and the unique
    return arrays, minimum


def best_of(runs, work):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def read_pass(arrays):
    """One plain read of every byte: numpy's OR-reduction, memory bound."""
    for a in arrays:
        np.bitwise_or.reduce(a.view(np.uint64), axis=None)


def hash_pass(arrays):
    """One xxh3 of every byte: the least a scanner that checksums must do."""
    for a in arrays:
        xxhash.xxh3_64_intdigest(memoryview(a).cast("B"))


def fault_in(arrays):
    """Read one word a page so every merged page is mapped and PSS sees it."""
    for a in arrays:
        a.view(np.uint8)[::PAGE].sum()


def run(size: int, seed: int = 0, progress=print) -> dict:
    rng = np.random.default_rng(seed)
    with pydedup.Arena(size=2 * size + (64 << 20)) as arena:
        progress(f"building a {size / 2**30:.2f} GiB workload")
        arrays, minimum = build_workload(arena, size, rng)
        total = sum(a.nbytes for a in arrays)
        read_seconds = best_of(3, lambda: read_pass(arrays))
        hash_seconds = best_of(3, lambda: hash_pass(arrays))
        fault_in(arrays)
        pss_before = procfs.process_pss()
        progress("merging")
        report = arena.merge()
        fault_in(arrays)
        pss_after = procfs.process_pss()
        stats = arena.stats()
        saved, ideal = pss_before - pss_after, total - minimum
        result = {
            "workload_bytes": total,
            "read_pass_seconds": read_seconds,
            "merge_seconds": report.seconds,
            "merge_seconds_per_gib": report.seconds * 2**30 / total,
            "merge_over_read_pass": report.seconds / read_seconds,
            "hash_pass_seconds": hash_seconds,
            "merge_over_hash_pass": report.seconds / hash_seconds,
            "pss_before": pss_before,
            "pss_after": pss_after,
            "pss_saved": saved,
            "theoretical_saved": ideal,
            "saved_over_theoretical": saved / ideal,
            "metadata_bytes_per_page": stats.metadata_bytes / stats.pages_in_use,
            "pages_in_use": stats.pages_in_use,
            "pages_sharing": stats.pages_sharing,
            "zero_pages": stats.zero_pages,
            "mappings": stats.mappings,
            "merge_report": report.as_dict(),
        }
        del arrays
    return result


def show(r: dict) -> str:
    gib = 2**30
    return "\n".join([
        f"workload               {r['workload_bytes'] / gib:.2f} GiB "
        f"(1/2 zero, 1/4 copies x{COPIES}, 1/4 unique)",
        f"read pass              {r['read_pass_seconds'] * 1e3:8.1f} ms (numpy OR-reduce, best of 3)",
        f"hash pass              {r['hash_pass_seconds'] * 1e3:8.1f} ms (xxh3, best of 3)",
        f"merge()                {r['merge_seconds'] * 1e3:8.1f} ms "
        f"= {r['merge_over_read_pass']:.2f} read passes = {r['merge_over_hash_pass']:.2f} hash passes "
        f"({r['merge_seconds_per_gib'] * 1e3:.0f} ms/GiB)",
        "  by phase             " + ", ".join(
            f"{phase} {seconds * 1e3:.0f} ms" for phase, seconds in r["merge_report"]["phase_seconds"].items()),
        f"PSS before -> after    {r['pss_before'] / 2**20:8.1f} -> {r['pss_after'] / 2**20:.1f} MiB",
        f"saved                  {r['pss_saved'] / 2**20:8.1f} MiB "
        f"= {100 * r['saved_over_theoretical']:.2f}% of the theoretical {r['theoretical_saved'] / 2**20:.1f} MiB",
        f"metadata               {r['metadata_bytes_per_page']:8.2f} bytes per arena page in use (KSM: 64)",
        f"mappings               {r['mappings']:8d}",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pydedup bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="workload size, e.g. 256MiB, 1GiB (default 1GiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    result = run(parse_size(args.size), args.seed, progress=lambda m: print(m, file=sys.stderr))
    print(show(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
