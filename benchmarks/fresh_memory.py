"""What fresh memory costs on this machine, without pydedup: the host side of
free page reporting (issue 16's slow first-member rows).

    python benchmarks/fresh_memory.py [--mib 256] [--repeat 7]

Two ways of taking `--mib` MiB of new memory, as a first member of a shared
store does for its frames:

- memfd pwrite: a new memfd written with one pwrite a 4 MiB (what
  frames_write_behind does), from a buffer touched before;
- anon touch: numpy.ones over new anonymous memory (a page fault a page);

each timed under two conditions, in alternation, `--repeat` times:

- quiet: free page reporting has reported nothing for 3 s, so all free
  memory was given to the host, which dropped it (pydedup.bench.fresh.
  wait_quiet);
- just freed: another process touched 2 GiB and exited just before, so the
  allocations take memory the guest still holds.

Seconds per GiB, medians and ranges; only numpy, os and the two helpers
of pydedup.bench.fresh (no arena, no merge). Without free page reporting
both conditions are the same.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import time

import numpy as np

from pydedup.bench import fresh

MiB = 1 << 20


def memfd_write(buf: bytearray) -> float:
    fd = os.memfd_create("fresh")
    try:
        os.ftruncate(fd, len(buf))
        view = memoryview(buf)
        start = time.perf_counter()
        for off in range(0, len(buf), 4 * MiB):
            os.pwrite(fd, view[off:off + 4 * MiB], off)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def anon_touch(nbytes: int) -> float:
    start = time.perf_counter()
    a = np.ones(nbytes // 8)
    seconds = time.perf_counter() - start
    del a
    return seconds


def hog(mib: int) -> None:
    np.ones(mib * MiB // 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    gib = args.mib / 1024
    buf = bytearray(np.random.default_rng(0).bytes(args.mib * MiB))
    ctx = mp.get_context("fork")
    reporting = fresh.reported_kib() is not None
    print(f"{args.mib} MiB a measurement, {args.repeat} times each; kernel {os.uname().release}, "
          f"{os.cpu_count()} CPUs; free page reporting: {'on' if reporting else 'off'}")
    results: dict = {}
    for _ in range(args.repeat):
        conditions = ["quiet", "just freed"]
        random.shuffle(conditions)
        for condition in conditions:
            for what in ("memfd pwrite", "anon touch"):
                if condition == "quiet":
                    fresh.wait_quiet()
                else:
                    p = ctx.Process(target=hog, args=(2048,))
                    p.start()
                    p.join()
                seconds = memfd_write(buf) if what == "memfd pwrite" else anon_touch(len(buf))
                results.setdefault((what, condition), []).append(seconds / gib)
    print()
    print("| new memory | condition | s/GiB, median | range |")
    print("|---|---|---|---|")
    for (what, condition), values in sorted(results.items()):
        print(f"| {what} | {condition} | {statistics.median(values):.3f} | "
              f"{min(values):.3f}-{max(values):.3f} |")


if __name__ == "__main__":
    main()
