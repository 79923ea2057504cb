"""A first member's merge on a shared store (issue 16) against what is
around it: the processes beside it, and the memory condition.

    python benchmarks/first_member.py [--repeat 3] [--mib 256]

One spawned process loads `--mib` MiB of random doubles into an arena on a
new shared store (a first member: every page becomes a new frame), or two
copies into a private arena (the two-copy baseline), and merges; the
configurations run in a shuffled order, `--repeat` times, and the medians
of their wall seconds per GiB are printed:

- beside: 0, 3 or 7 more processes hold `--mib` MiB each while the first
  member merges (plain numpy arrays, or the same data in arenas on the same
  store, not merged yet), all loaded before it merges, as in
  benchmarks/shared.py; memory warm;
- memory: the merge starts warm (its memory touched and freed just before),
  cold (free page reporting quiet for 3 s) or as found
  (pydedup.bench.fresh), for the first member and the two-copy merge.

Also per merge: steal time (/proc/stat) and KiB reported to the host
during it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import time
import uuid

import numpy as np

from pydedup.bench import fresh

MiB = 1 << 20


def steal() -> int:
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def member(kind: str, name: str, mib: int, copies: int, conn) -> None:
    common = np.random.default_rng(0).random(mib * MiB // 8)
    if kind == "numpy":
        arrays = [common.copy()]
    else:
        import pydedup
        arena = pydedup.Arena(size=4 << 30, shared=name)
        arrays = [arena.array(common) for _ in range(copies)]
    del common
    conn.send("loaded")
    conn.recv()
    out: dict = {}
    if kind == "merge":
        r0, s0 = fresh.reported_kib() or 0, steal()
        start = time.perf_counter()
        arena.merge()
        out = dict(wall=time.perf_counter() - start, steal=steal() - s0,
                   reported_mib=((fresh.reported_kib() or 0) - r0) // 1024)
    conn.send(out)
    conn.recv()
    del arrays


def run(method: str, beside: int, beside_kind: str, memory: str, mib: int) -> dict:
    """One merge: method "shared" (a first member) or "private" (two copies)."""
    copies = 2 if method == "private" else 1
    name = f"first-{uuid.uuid4().hex[:8]}" if method == "shared" else ""
    ctx = mp.get_context("spawn")
    procs = []

    def start(kind: str) -> None:
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=member, args=(kind, name, mib, copies if kind == "merge" else 1,
                                             theirs))
        p.start()
        procs.append((ours, p))

    start("merge")
    for _ in range(beside):
        start("numpy" if beside_kind == "numpy" else "hold")
    try:
        for c, _ in procs:
            assert c.recv() == "loaded"
        if memory == "warm":
            fresh.warm(mib * copies + 64)
        elif memory == "cold":
            fresh.wait_quiet()
        for c, _ in procs:
            c.send("go")
        out = procs[0][0].recv()
        for c, _ in procs[1:]:
            c.recv()
        for c, _ in procs:
            c.send("done")
        for _, p in procs:
            p.join()
    finally:
        for _, p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    out["s_gib"] = out["wall"] / (mib * copies / 1024)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configs = [("shared", n, kind, "warm") for n, kind in
               [(0, "numpy"), (3, "numpy"), (7, "numpy"), (3, "shared"), (7, "shared")]]
    configs += [(method, 0, "numpy", memory) for method in ("shared", "private")
                for memory in ("warm", "cold", "as found")]
    configs = list(dict.fromkeys(configs))
    results: dict = {c: [] for c in configs}
    for _ in range(args.repeat):
        order = configs[:]
        random.shuffle(order)
        for c in order:
            out = run(*c, mib=args.mib)
            results[c].append(out)
            print(c, json.dumps({k: round(v, 3) for k, v in out.items()}), flush=True)
    print()
    print(f"{args.mib} MiB, {args.repeat} runs each, shuffled; free page reporting: "
          f"{'on' if fresh.reported_kib() is not None else 'off'}")
    print("| merge | processes beside it | memory | s/GiB, median | range | steal (ticks) | "
          "reported during (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for (method, n, kind, memory), outs in results.items():
        w = [o["s_gib"] for o in outs]
        label = "first member" if method == "shared" else "private, two copies"
        with_ = f"{n} ({kind})" if n else "0"
        print(f"| {label} | {with_} | {memory} | {statistics.median(w):.3f} | "
              f"{min(w):.3f}-{max(w):.3f} | {sum(o['steal'] for o in outs)} | "
              f"{sum(o['reported_mib'] for o in outs)} |")


if __name__ == "__main__":
    main()
