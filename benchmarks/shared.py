"""Processes holding the same data, with and without a shared frame store (issue 16).

    python benchmarks/shared.py [--mib 256] [--processes 1 2 4]

For each N, N spawned processes each load the same `--mib` MiB (random
doubles from one seed) into an arena, private (`shared=""`) or on one
shared store (`shared=<name>`), and merge, one process after the other.
Reported, in one run:

- the PSS the N processes added together for the data (each process's PSS
  after the merge, every page read, less its PSS before the data), against
  one copy of the data;
- the seconds each merge() took per GiB of data, against the baseline
  measured in the same run: a private merge() of the same data in one
  process (the data unique: hash and unstable tree only), and a private
  merge() of two copies of it in one process (per GiB of the two), which
  does the work a second member's shared merge does (search, compare,
  remap);
- all the N merges' seconds per GiB the N processes hold.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import uuid

import numpy as np

MiB = 1 << 20


def member(name: str, mib: int, copies: int, conn) -> None:
    import pydedup
    from pydedup import procfs
    arena = pydedup.Arena(size=4 << 30, shared=name)
    before = procfs.process_pss()
    data = np.random.default_rng(0).random(mib * MiB // 8)
    arrays = [arena.array(data) for _ in range(copies)]
    del data
    conn.send("loaded")
    conn.recv()                              # our turn to merge
    start = time.perf_counter()
    arena.merge()
    seconds = time.perf_counter() - start
    conn.send(seconds)
    conn.recv()                              # everyone merged: measure
    for a in arrays:
        a.sum()                              # read every page: merged ones map their frame
    conn.send(procfs.process_pss() - before)
    conn.recv()                              # done


def run(n: int, name: str, mib: int, copies: int = 1) -> tuple[list[float], int]:
    """Merge seconds of each process, and the PSS the n added together."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(n):
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=member, args=(name, mib, copies, theirs))
        p.start()
        pipes.append(ours)
        procs.append(p)
    for c in pipes:
        assert c.recv() == "loaded"
    seconds = []
    for c in pipes:
        c.send("merge")
        seconds.append(c.recv())
    for c in pipes:
        c.send("measure")
    pss = sum(c.recv() for c in pipes)
    for c in pipes:
        c.send("done")
    for p in procs:
        p.join()
    return seconds, pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    gib = args.mib / 1024
    one, _ = run(1, "", args.mib)
    two, _ = run(1, "", args.mib, copies=2)
    private_unique = one[0] / gib
    private_dup = two[0] / (2 * gib)
    print(f"data: {args.mib} MiB a process; kernel {os.uname().release}, {os.cpu_count()} CPUs")
    print(f"baseline, one process, private: merge() {private_unique:.3f} s/GiB (unique data), "
          f"{private_dup:.3f} s/GiB (two copies)")
    print()
    print("| processes | store | PSS added, all processes | x one copy | merge s/GiB: first, "
          "others (mean) | others / private two copies | all merges, s/GiB held |")
    print("|---|---|---|---|---|---|---|")
    for n in args.processes:
        for store in ("private", "shared"):
            name = f"bench-{uuid.uuid4().hex[:8]}" if store == "shared" else ""
            seconds, pss = run(n, name, args.mib)
            per_gib = [s / gib for s in seconds]
            rest = per_gib[1:]
            rest_mean = sum(rest) / len(rest) if rest else float("nan")
            print(f"| {n} | {store} | {pss / MiB:,.0f} MiB | {pss / (args.mib * MiB):.2f} | "
                  f"{per_gib[0]:.3f}, {rest_mean:.3f} | {rest_mean / private_dup:.2f} | "
                  f"{sum(seconds) / (n * gib):.3f} |")


if __name__ == "__main__":
    main()
