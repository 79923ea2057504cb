"""Processes holding the same data: private arenas, a shared frame store
(issue 16) and kernel KSM, in one run.

    python benchmarks/shared.py [--mib 256] [--private-mib 64] [--processes 1 2 4 8] [--cpu]
                                [--repeat 3] [--memory warm|cold]

For each N, N spawned processes each load the same `--mib` MiB (random
doubles from one seed), and, in the "mix" workload, also `--private-mib` MiB
of their own (random doubles, a seed per process), then merge:

- private: into an arena of their own (`shared=""`), merge() one process
  after the other;
- shared: into one shared store (`shared=<name>`), merge() one process after
  the other;
- kernel KSM (root only; skipped with the reason printed otherwise): plain
  numpy arrays marked MADV_MERGEABLE, ksmd run at 10,000 pages / 0 ms until
  the system's pages_shared and pages_sharing hold still over two full scans
  (at least three scans: a page merges on ksmd's second visit). Every KSM knob
  is restored on exit, on errors and Ctrl-C too (pydedup.bench.ksm.KernelKSM).

Reported, in one run:

- the PSS the N processes added together for the data (each process's PSS
  after the merge, every page read, less its PSS before the data), against
  the ideal: one copy of the common data plus every process's private data;
- the seconds each merge() took per GiB of the process's data, the first
  process's and the joining processes' (mean), against the baselines
  measured in the same run (the median of three runs each): a private
  merge() of the same data in one process (the data unique: hashing only),
  and a private merge() of two copies of it (per GiB of the two: search,
  compare, a frame written for every two pages, remap). A first member
  writes a frame for every page of its data (content no frame holds yet);
  a joining member searches, compares and remaps;
- all the N merges' seconds per GiB the N processes hold (for kernel KSM:
  from run=1 to ksmd's last change, whole system, per GiB held).

Every private and shared row is run `--repeat` times (3): the figures are
the medians, and the first member's range is printed beside its median. A
shared row's ratios to a private merge of two copies are to the median of
such merges run just before each of its runs (`--repeat` of them), not to
the baseline measured at the start, which varied 2x between runs here.

On a guest with free page reporting (virtio-balloon), the kernel reports
memory freed a couple of seconds before to the host in bursts (here up to
1 GiB in half a second, the CPUs' steal time at 42%), and a merge that
runs during one took up to 4.6x its time: which merges of a run it hits
depends on what processes exited seconds before, so one merge a row gave
slow rows that moved between runs. The last column counts a row's merges
during which the guest reported memory (pydedup.bench.fresh.reported_kib);
the medians are over the repeats. `--memory` runs every timed merge, the
baselines' too, under one memory condition instead of as found: "warm"
touches and frees the memory the merge may take just before (the guest
holds it), "cold" waits until reporting holds still (all free memory is
the host's, and every new page faults in the host). benchmarks/
fresh_memory.py measures fresh memory under both without pydedup, and
benchmarks/first_member.py a first member's merge under each and beside
other processes.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
import uuid

import numpy as np

MiB = 1 << 20
KSM_KNOBS = dict(pages_to_scan=10_000, sleep_millisecs=0)
BASELINE_RUNS = 3


def member(method: str, name: str, mib: int, private_mib: int, index: int, copies: int,
           cpu: bool, conn) -> None:
    from pydedup import procfs
    before = procfs.process_pss()
    common = np.random.default_rng(0).random(mib * MiB // 8)
    own = np.random.default_rng(1000 + index).random(private_mib * MiB // 8)
    if method == "ksm":
        from pydedup.bench import ksm
        arrays = [common] + ([own] if private_mib else [])
        ksm.mergeable(*arrays)                   # ksmd, run by the parent, merges them
    else:
        import pydedup
        arena = pydedup.Arena(size=4 << 30, shared=name)
        arrays = [arena.array(common) for _ in range(copies)]
        if private_mib:
            arrays.append(arena.array(own))
    del common, own
    conn.send("loaded")
    conn.recv()                              # our turn to merge
    seconds, reported = 0.0, 0
    if method != "ksm":
        from pydedup.bench import fresh
        clock = time.process_time if cpu else time.perf_counter
        before_kib = fresh.reported_kib() or 0
        start = clock()
        arena.merge()
        seconds = clock() - start
        reported = (fresh.reported_kib() or 0) - before_kib
    conn.send((seconds, reported))
    conn.recv()                              # everyone merged: measure
    for a in arrays:
        a.sum()                              # read every page: merged ones map their frame
    conn.send(procfs.process_pss() - before)
    conn.recv()                              # done


def kernel_merge(kernel) -> float:
    """Run ksmd (a KernelKSM, its knobs set) until the system's counters hold
    still over two full scans, at least three scans after the start; the
    seconds to its last change."""
    from pydedup.bench import ksm
    watch = ("pages_shared", "pages_sharing")
    scans0 = ksm.counters()["full_scans"]
    t0 = time.perf_counter()
    kernel.set(run=1)
    last = None                              # (values, when, full_scans) at the last change
    while True:
        now, c = time.perf_counter(), ksm.counters()
        values = tuple(c[k] for k in watch)
        if last is None or values != last[0]:
            last = (values, now, c["full_scans"])
        if c["full_scans"] >= scans0 + ksm.SCANS_TO_MERGE and c["full_scans"] >= last[2] + 2:
            return last[1] - t0
        if now - t0 > 600:
            raise TimeoutError("kernel KSM did not settle in 600 s")
        time.sleep(0.02)


def run(method: str, n: int, mib: int, private_mib: int = 0, copies: int = 1,
        kernel=None, cpu: bool = False, prepare=None, hits=None) -> tuple[list[float], int]:
    """Merge seconds of each process (kernel KSM: one figure, ksmd's), and
    the PSS the n added together. prepare(mib), if given, runs just before
    each merge, with the MiB the merging process holds; hits, a list, gets
    for each merge whether the guest reported free memory to its host
    during it (pydedup.bench.fresh)."""
    name = f"bench-{uuid.uuid4().hex[:8]}" if method == "shared" else ""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    try:
        for i in range(n):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=member, args=(method, name, mib, private_mib, i, copies, cpu,
                                                           theirs))
            p.start()
            pipes.append(ours)
            procs.append(p)
        for c in pipes:
            assert c.recv() == "loaded"
        seconds = []
        for c in pipes:
            if prepare is not None and method != "ksm":
                prepare(mib * copies + private_mib)
            c.send("merge")
            merge_seconds, reported = c.recv()
            seconds.append(merge_seconds)
            if hits is not None:
                hits.append(reported > 0)
        if method == "ksm":
            seconds = [kernel_merge(kernel)]
        for c in pipes:
            c.send("measure")
        pss = sum(c.recv() for c in pipes)
        for c in pipes:
            c.send("done")
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if method == "ksm":
        kernel.set(run=2)                    # unmerge all: the next run starts with nothing merged
        kernel.set(run=0)
    return seconds, pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="the data all processes hold")
    parser.add_argument("--private-mib", type=int, default=64,
                        help="each process's own data in the mix workload (0: no mix)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--cpu", action="store_true",
                        help="merge seconds as the CPU time of the merging process (all its "
                             "threads, in the kernel too) instead of wall time: steadier on a "
                             "machine others use")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each private and shared row: the medians are reported")
    parser.add_argument("--memory", choices=["as-found", "warm", "cold"], default="as-found",
                        help="before every timed merge: nothing (as-found), or warm: touch and "
                             "free the memory the merge may take (the guest holds it), or cold: "
                             "wait until free page reporting has given all free memory to the host")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    gib = args.mib / 1024
    from pydedup.bench import fresh, ksm
    reason = ksm.available()

    def prepare(mib: int) -> None:
        if args.memory == "warm":
            fresh.warm(mib + 64)
        elif args.memory == "cold":
            fresh.wait_quiet()

    # The baselines are the median of BASELINE_RUNS runs each: every row is
    # divided by them, and one run of a few hundred ms varies by 2x here.
    one = sorted(run("private", 1, args.mib, cpu=args.cpu, prepare=prepare)[0][0]
                 for _ in range(BASELINE_RUNS))
    two = sorted(run("private", 1, args.mib, copies=2, cpu=args.cpu, prepare=prepare)[0][0]
                 for _ in range(BASELINE_RUNS))
    private_unique = one[BASELINE_RUNS // 2] / gib
    private_dup = two[BASELINE_RUNS // 2] / (2 * gib)
    reporting = fresh.reported_kib() is not None
    print(f"data: {args.mib} MiB common a process, mix: {args.private_mib} MiB private more; "
          f"kernel {os.uname().release}, {os.cpu_count()} CPUs")
    print("merge seconds: " + ("CPU time of the merging process" if args.cpu else "wall time")
          + f"; private and shared rows: median of {args.repeat} runs")
    print("memory before every timed merge: "
          + {"as-found": "as found",
             "warm": "warm (the merge's size plus 64 MiB touched and freed just before)",
             "cold": "cold (free page reporting quiet for 3 s)"}[args.memory]
          + ("; free page reporting: on (last column: the row's merges during which the guest "
             "reported free memory to the host)" if reporting else "; free page reporting: off"))
    print(f"baseline, one process, private, median of {BASELINE_RUNS}: merge() "
          f"{private_unique:.3f} s/GiB (unique data), {private_dup:.3f} s/GiB (two copies); "
          "a shared row's ratios to two copies: to its own baseline, run beside it (of s/GiB)")
    print("kernel KSM: " + (f"skipped: {reason}" if reason else
                            "10,000 pages / 0 ms, knobs restored at the end"))
    print()
    print("| workload | processes | method | PSS added, all processes | x ideal | merge s/GiB: "
          "first (range), joining (mean) | first / private unique | first / private two copies "
          "| joining / private two copies "
          "| all merges, s/GiB held | merges during reporting |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    workloads = [("same", 0)] + ([("mix", args.private_mib)] if args.private_mib else [])
    methods = ["private", "shared"] + ([] if reason else ["ksm"])

    def table(kernel) -> None:
        for label, private_mib in workloads:
            each = (args.mib + private_mib) / 1024                 # GiB a process holds
            for n in args.processes:
                ideal = (args.mib + n * private_mib) * MiB
                for method in methods:
                    if method == "ksm":
                        seconds, pss = run(method, n, args.mib, private_mib, kernel=kernel)
                        merges = f"(ksmd) {seconds[0] / (n * each):.3f}"
                        print(f"| {label} | {n} | kernel KSM | {pss / MiB:,.0f} MiB | "
                              f"{pss / ideal:.2f} | - | - | - | - | {merges} | - |", flush=True)
                        continue
                    runs, beside, hits = [], [], []
                    for _ in range(args.repeat):
                        if method == "shared":          # its own baseline, run just before
                            beside.append(run("private", 1, args.mib, copies=2, cpu=args.cpu,
                                              prepare=prepare)[0][0] / (2 * gib))
                        runs.append(run(method, n, args.mib, private_mib, cpu=args.cpu,
                                        prepare=prepare, hits=hits))
                    dup = statistics.median(beside) if beside else private_dup
                    firsts = [seconds[0] / each for seconds, _ in runs]
                    first = statistics.median(firsts)
                    rest_mean = (statistics.median(sum(s[1:]) / len(s[1:]) / each for s, _ in runs)
                                 if n > 1 else float("nan"))
                    pss = statistics.median(p for _, p in runs)
                    held = statistics.median(sum(s) / (n * each) for s, _ in runs)
                    spread = f" ({min(firsts):.3f}-{max(firsts):.3f})" if args.repeat > 1 else ""
                    of = f" (of {dup:.3f})" if beside else ""
                    print(f"| {label} | {n} | {method} | {pss / MiB:,.0f} MiB | {pss / ideal:.2f} | "
                          f"{first:.3f}{spread}, {rest_mean:.3f} | {first / private_unique:.2f} | "
                          f"{first / dup:.2f}{of} | {rest_mean / dup:.2f} | "
                          f"{held:.3f} | {sum(hits)} of {len(hits)} |",
                          flush=True)

    if reason:
        table(None)
    else:
        with ksm.KernelKSM(**KSM_KNOBS) as kernel:     # every knob restored, Ctrl-C too
            table(kernel)


if __name__ == "__main__":
    main()
