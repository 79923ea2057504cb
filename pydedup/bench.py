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
from pydedup import ksm, procfs

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
        again = arena.merge()               # nothing written since: tracked pages are not read
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
            "second_merge_seconds": again.seconds,
            "second_merge_over_first": again.seconds / report.seconds,
            "tracking": arena._pages.core.tracking,
            "barrier": stats.barrier,
        }
        del arrays
    return result


def wait_for_background_merge(arena, timeout=300.0):
    """Run the scanner with the arena's knobs until a whole scan has gone by
    without a merge; (seconds, scanner CPU seconds) to the last merge."""
    core = arena._pages.core
    start, scans0 = time.monotonic(), core.full_scans
    arena.run = 1
    scanner, seen, scans_at_merge = arena.scanner, None, scans0
    while time.monotonic() - start < timeout:
        if scanner.last_merge != seen:
            seen, scans_at_merge = scanner.last_merge, core.full_scans
        if seen is not None and core.full_scans >= scans_at_merge + 2:
            break
        if scanner.error:
            raise scanner.error
        time.sleep(0.005)
    else:
        raise TimeoutError(f"the background scanner did not finish in {timeout} s")
    seconds, cpu = scanner.last_merge - start, scanner.last_merge_cpu
    arena.run = 0
    return seconds, cpu


def background(size: int, seed: int, ksm_rows=(), progress=print) -> dict:
    """Time to a full merge of the same workload in the background: pydedup's
    scanner with default knobs, and kernel KSM (root) with the knob sets in
    ksm_rows; each on a fresh copy of the workload, in this run."""
    rows = {}
    with pydedup.Arena(size=2 * size + (64 << 20)) as arena:
        arrays, minimum = build_workload(arena, size, np.random.default_rng(seed))
        progress("pydedup background scanner, default knobs")
        fault_in(arrays)
        before = procfs.process_pss()
        seconds, cpu = wait_for_background_merge(arena)
        fault_in(arrays)
        rows["pydedup scanner"] = {"seconds": seconds, "cpu_seconds": cpu,
                                   "pss_saved": before - procfs.process_pss(),
                                   "knobs": {k: getattr(arena, k) for k in ("pages_to_scan", "sleep_millisecs")}}
        del arrays
    for name, knobs in ksm_rows:
        progress(f"kernel KSM, {name}")
        with pydedup.Arena(size=2 * size + (64 << 20), track_writes=False) as arena:
            arrays, _ = build_workload(arena, size, np.random.default_rng(seed))
            fault_in(arrays)
            before = procfs.process_pss()
            with ksm.KernelKSM(**knobs) as kernel:
                result = kernel.merge(*arrays, pss_interval=None)
                fault_in(arrays)
                saved = before - procfs.process_pss()
                kernel.unmerge(*arrays)
            rows[f"kernel KSM, {name}"] = {"seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
                                          "pss_saved": saved, "knobs": knobs}
            del arrays
    base = rows["pydedup scanner"]["seconds"]
    for row in rows.values():
        row["pydedup_speedup"] = row["seconds"] / base
    return rows


def zero_read(size: int, progress=print) -> dict:
    """Read throughput of a large all-zero array (seed 000: merging zero pages
    into one shared page slowed every later read): (a) never written, (b)
    written with zeros and not merged, (c) merged to the kernel zero page,
    (d) merged into zero frames (use_zero_pages off). Best of 5 reads each,
    after one read that maps every page; ratios to (a)."""
    cases = {}
    for name, written, merged, zero_pages in (("a never written", False, False, True),
                                              ("b written zeros", True, False, True),
                                              ("c zero page", True, True, True),
                                              ("d zero frames", True, True, False)):
        progress(f"zero read: {name}")
        with pydedup.Arena(size=size + (64 << 20), use_zero_pages=zero_pages) as arena:
            z = arena.zeros(size // 8)
            if written:
                z[:] = 0.0
            if merged:
                arena.merge()
            read_pass([z])                          # maps every page
            cases[name] = {"seconds": best_of(5, lambda: read_pass([z]))}
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


KSM_TURBO = ("10,000 pages / 0 ms", dict(pages_to_scan=10_000, sleep_millisecs=0, use_zero_pages=1))
KSM_DEFAULTS = ("default knobs", dict(use_zero_pages=1))


def show_background(rows: dict) -> str:
    lines = ["background merge                    seconds   CPU s   PSS saved   time / pydedup's"]
    for name, row in rows.items():
        cpu = "?" if row["cpu_seconds"] is None else f"{row['cpu_seconds']:.2f}"
        lines.append(f"  {name:<34}{row['seconds']:8.2f}  {cpu:>6}  {row['pss_saved'] / 2**20:7.1f} MiB"
                     f"   {row['pydedup_speedup']:6.2f}x")
    return "\n".join(lines)


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
        f"second merge()         {r['second_merge_seconds'] * 1e3:8.1f} ms "
        f"= {100 * r['second_merge_over_first']:.1f}% of the first (nothing written; "
        f"written-page tracking {'on' if r['tracking'] else 'off'}, barrier {r['barrier']})",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pydedup bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="workload size, e.g. 256MiB, 1GiB (default 1GiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--background", action="store_true",
                        help="also time a full merge by the background scanner")
    parser.add_argument("--ksm", action="store_true",
                        help="and by kernel KSM at 10,000 pages / 0 ms (root; knobs restored)")
    parser.add_argument("--ksm-defaults", action="store_true",
                        help="and by kernel KSM with its default knobs (takes minutes a GiB)")
    parser.add_argument("--zero-read", action="store_true",
                        help="also the read throughput of an all-zero array, never written, "
                             "written, merged to the zero page, merged to zero frames")
    args = parser.parse_args(argv)
    progress = lambda m: print(m, file=sys.stderr)   # noqa: E731
    size = parse_size(args.size)
    result = run(size, args.seed, progress=progress)
    print(show(result))
    if args.background or args.ksm or args.ksm_defaults:
        ksm_rows = [row for row, wanted in ((KSM_TURBO, args.ksm), (KSM_DEFAULTS, args.ksm_defaults))
                    if wanted]
        if ksm_rows and ksm.available() is not None:
            print(f"kernel KSM rows skipped: {ksm.available()}")
            ksm_rows = []
        result["background"] = background(size, args.seed, ksm_rows, progress)
        print(show_background(result["background"]))
    if args.zero_read:
        result["zero_read"] = zero_read(size, progress)
        print(show_zero_read(result["zero_read"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
