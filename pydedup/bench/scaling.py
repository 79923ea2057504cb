"""`pydedup bench --scaling 1GiB,4GiB,16GiB`: merge() of one workload at
several sizes, each time and each phase as a ratio to the smallest size's
(linear growth is a ratio equal to the size ratio), and each merge in read
passes (numpy's OR-reduce over the same memory, in the same run). That read
is the baseline of the growth too: on a machine whose memory reads slow
down as the data grows (TLB reach, a VM's host), it grows faster than the
data itself, and `x read` shows by how much.

Every size is built afresh in an arena of its own, one after the other. A
size is merged as often as the largest size holds it, at least MIN_REPEATS
and at most REPEATS times, and its merge of median time (the lower middle
one of an even count) stands for it: one merge of the smallest size is the
noisiest figure of the run, and every ratio's denominator; one of the
largest, the numerator of the ratio read most (on a 2-CPU VM, 16 GiB merged
once came out at 1.7 to 2.7 s from one run to the next)."""
import time

import numpy as np

import pydedup
from pydedup.bench import workloads
from pydedup.bench.workloads import best_of, fault_in, read_pass

PHASES = ("refresh", "decide", "apply")
MIN_REPEATS, REPEATS = 3, 5


def measure(size: int, workload: str, seed: int = 0, threads: int | None = None,
            barrier: str | None = None) -> dict:
    knobs = {name: value for name, value in (("threads", threads), ("barrier", barrier))
             if value is not None}
    with pydedup.Arena(size=2 * size + (64 << 20), **knobs) as arena:
        w = workloads.WORKLOADS[workload](lambda n: arena.empty(n), size,
                                           np.random.default_rng(seed))
        fault_in(w.arrays)
        read = best_of(3, lambda: read_pass(w.arrays))
        cpu0 = time.thread_time()
        report = arena.merge()
        cpu = time.thread_time() - cpu0 + report.helper_cpu_seconds
        return {"bytes": w.nbytes, "seconds": report.seconds, "cpu_seconds": cpu,
                "read_pass_seconds": read, "read_passes": report.seconds / read,
                "threads": report.threads, "barrier": arena.stats().barrier,
                "frames_new": report.frames_new,
                "phase_seconds": report.phase_seconds,
                "phase_cpu_seconds": report.phase_cpu_seconds}


def run(sizes, workload="structured", seed=0, threads=None, barrier=None,
        progress=print) -> dict:
    rows = []
    for size in sizes:
        merges = min(REPEATS, max(MIN_REPEATS, max(sizes) // size))
        progress(f"scaling: {workload} {size / 2**30:g} GiB, {merges} merges")
        runs = sorted((measure(size, workload, seed, threads, barrier) for _ in range(merges)),
                      key=lambda r: r["seconds"])
        rows.append(dict(runs[(merges - 1) // 2], merges=merges))
    base = rows[0]
    for row in rows:
        row["size_ratio"] = row["bytes"] / base["bytes"]
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["read_ratio"] = row["read_pass_seconds"] / base["read_pass_seconds"]
        row["phase_ratio"] = {p: row["phase_seconds"][p] / base["phase_seconds"][p]
                              if base["phase_seconds"][p] else None for p in PHASES}
    return {"workload": workload, "rows": rows}


def table(result: dict) -> str:
    lines = [f"scaling, {result['workload']}: merge() time over the smallest size's "
             "(a size merged several times: its median merge); x read: numpy's read "
             "of the same memory, over the smallest size's",
             f"  {'GiB':>6}{'threads':>8}{'barrier':>9}{'s':>8}{'CPU s':>8}{'x size':>8}"
             f"{'x time':>8}{'x read':>8}{'passes':>8}   refresh / decide / apply: x time"]
    for r in result["rows"]:
        ratios = " / ".join("-" if r["phase_ratio"][p] is None else f"{r['phase_ratio'][p]:.2f}"
                            for p in PHASES)
        lines.append(f"  {r['bytes'] / 2**30:6.2f}{r['threads']:>8}{r['barrier']:>9}"
                     f"{r['seconds']:8.3f}{r['cpu_seconds']:8.3f}{r['size_ratio']:8.2f}"
                     f"{r['time_ratio']:8.2f}{r['read_ratio']:8.2f}{r['read_passes']:8.2f}"
                     f"   {ratios}")
    return "\n".join(lines)
