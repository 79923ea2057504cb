"""numpy's allocator in an arena (pydedup.arena()): what it costs and what it saves.

    python benchmarks/allocator.py [--rounds 15] [--size 512MiB] [--cache 64MiB]

1. Speed: allocation-heavy numpy code (ufunc chains, concatenate, matmul,
   cumsum: many medium and large temporaries) run with numpy's default
   allocator and inside `with pydedup.arena(ar):`, alternating, several
   rounds, each timed run after an untimed one of its kind (warm); prints
   each round's ratio and the median (inside / outside). Target: <= 1.10.
2. Footprint: the same code, inputs --scale times larger, once in a fresh
   process with plain numpy and once in a block: PSS held after it and peak
   PSS during it (sampled), above the start, and its (cold) time. Target:
   held and peak within 10% (+16 MiB) of plain numpy's.
3. Memory: a big mostly-zero matrix workload (a sparse matrix made dense,
   then arithmetic on it) inside the block, then ar.merge(); prints the
   arena's counters and PSS (never RSS) before and after."""
import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

# One BLAS thread: on a small shared machine BLAS threads add noise, not signal.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout

import pydedup  # noqa: E402
from pydedup import procfs  # noqa: E402

MiB = 1 << 20


def temporaries(sizes):
    """Allocation-heavy numpy: every line makes one or more temporaries. The
    inputs are made here too, so that inside the block they are arena arrays
    as well: a page-aligned output next to an input at another offset modulo
    4 KiB runs a few percent slower (4K aliasing), whichever allocator."""
    rng = np.random.default_rng(0)
    total = 0.0
    for n in sizes:
        x = rng.random(n // 8)
        y = x * 2.0 + 1.0
        z = np.sqrt(y) - x / 3.0
        w = np.concatenate([z, y])
        total += float(np.cumsum(w)[-1])
        total += float((w.reshape(2, -1) ** 2).sum())
        m = x[: 256 * (len(x) // 256)].reshape(-1, 256)
        total += float((m[:256] @ m[:256].T).trace())
    return total


# Inputs from 32 KiB to 16 MiB, the small ones many times: medium
# temporaries dominate real code, large ones dominate its memory.
SIZES = [32 << 10] * 256 + [256 << 10] * 64 + [2 * MiB] * 16 + [16 * MiB] * 2


def time_once(fn):
    """(wall seconds, CPU seconds of this process: the machine may be shared)"""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def speed(rounds, cache):
    ar = pydedup.Arena(alloc_cache=cache)
    expected = temporaries(SIZES)

    def inside():
        with pydedup.arena(ar):
            assert temporaries(SIZES) == expected

    def outside():
        assert temporaries(SIZES) == expected

    inside(), outside()                     # warm both
    ratios, cpu_ratios = [], []
    print(f"speed: {len(SIZES)} inputs, alloc_threshold {ar.alloc_threshold} B, "
          f"alloc_cache {ar.alloc_cache if ar.alloc_cache == 'auto' else f'{ar.alloc_cache >> 20} MiB'}")
    for r in range(rounds):
        # Each timed run follows an untimed one of its own kind: run right
        # after the other kind, either one pays for faulting in the memory
        # the other just freed (1.5x here, whichever comes second).
        if r % 2:
            inside()
            t_in = time_once(inside)
            outside()
            t_out = time_once(outside)
        else:
            outside()
            t_out = time_once(outside)
            inside()
            t_in = time_once(inside)
        ratios.append(t_in[0] / t_out[0])
        cpu_ratios.append(t_in[1] / t_out[1])
        print(f"  round {r:2}: outside {t_out[0] * 1e3:7.1f} ms  inside {t_in[0] * 1e3:7.1f} ms  "
              f"ratio {ratios[-1]:.3f}  (CPU time ratio {cpu_ratios[-1]:.3f})")
    counters = ar.allocator_stats()
    print(f"  arena allocations {counters['allocations']:,}, cache hits {counters['cache_hits']:,}, "
          f"fell back {counters['fell_back']:,}")
    print(f"  median ratio (inside / outside): {statistics.median(ratios):.3f} wall, "
          f"{statistics.median(cpu_ratios):.3f} CPU time")
    ar.close()


def memory(size):
    """A sparse matrix made dense, scaled and shifted: mostly-zero pages
    written in full, as dense code over sparse data does."""
    try:
        import scipy.sparse
    except ImportError:
        print("memory: skipped (needs scipy)")
        return
    n = int((size // 8) ** 0.5)
    print(f"memory: {n} x {n} float64 ({n * n * 8 / MiB:,.0f} MiB a matrix), density 1e-5")
    pss_start = procfs.process_pss()
    with pydedup.arena() as ar:
        a = scipy.sparse.random(n, n, density=1e-5, format="csr", random_state=0).toarray()
        b = a * 2.0 + a                       # written in full, mostly zeros
        c = np.abs(b - a)
        before = ar.stats()
        pss_before = procfs.process_pss()
        report = ar.merge()
        after = ar.stats()
        pss_after = procfs.process_pss()
    print(f"  arena pages in use {after.pages_in_use:,}; merge {report.seconds:.2f} s: "
          f"{report.pages_zeroed:,} pages to the zero page, {report.pages_merged:,} merged")
    print(f"  arena PSS   before {before.pss_bytes / MiB:8.1f} MiB  after {after.pss_bytes / MiB:8.1f} MiB")
    print(f"  process PSS before {(pss_before - pss_start) / MiB:8.1f} MiB  after "
          f"{(pss_after - pss_start) / MiB:8.1f} MiB  (above the start of the workload)")
    print(f"  bytes_saved {after.bytes_saved / MiB:,.1f} MiB, pss_bytes_saved "
          f"{after.pss_bytes_saved / MiB:,.1f} MiB")
    del a, b, c


def footprint(mode, scale):
    """In a fresh process (run as `--child MODE`): the temporaries workload
    once with plain numpy or inside a block, and its PSS above the start:
    peak (sampled every 2 ms by a thread) and held (after the workload, its
    temporaries freed). PSS from /proc/self/smaps_rollup, never RSS."""
    import json
    import subprocess
    done = subprocess.run([sys.executable, __file__, "--child", mode, "--scale", str(scale)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def child(mode, scale):
    import json
    import threading
    sizes = [n * scale for n in SIZES]
    ar = pydedup.Arena() if mode == "arena" else None
    temporaries([32 << 10])                  # numpy's and BLAS's own start-up memory
    gc.collect()
    start = procfs.process_pss()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], procfs.process_pss())
    sampler = threading.Thread(target=sample)
    sampler._pydedup_exempt = True           # its own allocations stay outside the arena
    sampler.start()
    t = time.perf_counter()
    if ar is None:
        temporaries(sizes)
    else:
        with pydedup.arena(ar):
            temporaries(sizes)
    seconds = time.perf_counter() - t
    gc.collect()
    held = procfs.process_pss()
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], held)
    print(json.dumps({"peak": peak[0] - start, "held": held - start, "seconds": seconds}))


def memory_against_numpy(scale):
    """Memory held and peak of code in the block against plain numpy's; the
    target: within 10% (+16 MiB) of plain numpy's."""
    plain, inside = footprint("plain", scale), footprint("arena", scale)
    print(f"footprint of the temporaries workload (inputs x{scale}), PSS above the start:")
    print(f"  {'':10} {'held MiB':>9} {'peak MiB':>9} {'seconds':>8}  (a fresh process each: cold)")
    for name, row in (("numpy", plain), ("in block", inside)):
        print(f"  {name:10} {row['held'] / MiB:9.1f} {row['peak'] / MiB:9.1f} {row['seconds']:8.2f}")
    for what in ("held", "peak"):
        limit = plain[what] * 1.10 + 16 * MiB
        verdict = "within" if inside[what] <= limit else "OVER"
        print(f"  {what}: in block {inside[what] / MiB:.1f} MiB, limit {limit / MiB:.1f} MiB "
              f"(numpy's x1.10 + 16 MiB): {verdict}")


def parse_size(text):
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", type=parse_size, default=512 * MiB, help="bytes of one matrix")
    parser.add_argument("--cache", type=lambda t: t if t == "auto" else parse_size(t), default=None,
                        help="the arena's alloc_cache: 'auto' (the knob's default) or bytes")
    parser.add_argument("--scale", type=int, default=4,
                        help="the footprint run's inputs, times those of the speed run (default 4)")
    parser.add_argument("--child", choices=["plain", "arena"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache is not None:
        os.environ["PYDEDUP_ALLOC_CACHE"] = str(args.cache)   # the footprint's children too
    if args.child:
        child(args.child, args.scale)
        return
    cache = pydedup.KNOBS["alloc_cache"].default() if args.cache is None else args.cache
    speed(args.rounds, cache)
    memory_against_numpy(args.scale)
    memory(args.size)


if __name__ == "__main__":
    main()
