"""Dask workers with and without pydedup: memory as the scheduler sees it.

    python benchmarks/dask_workers.py [--workers 2] [--dataset-mib 256] [--results 3]

N workers each load the same dataset (one task each, the same seed) and
compute `--results` zero-heavy results from it, one at a time (a region of
interest: 10% of the rows kept, the rest written as zeros, as np.where
writes them). The same run starts a plain LocalCluster and one with the
preload (`preload=["pydedup.dask"], preload_nanny=["pydedup.dask"]`) and
reports, for each, the memory the scheduler sees (the sum of the workers'
`metrics["memory"]`: RSS for plain Dask, PSS with the preload), less the
workers' memory before the data, and the bytes spilled to disk. The memory
limit is set so that the data fits in it as PSS after merging but not as
RSS: with `target: false` (spill by process memory only, at `spill`: 70%)
plain Dask must spill and the preloaded workers need not.

With the preload, the workers of one cluster share a frame store
(`pydedup.dask.cluster_store()`, issue 16), so data that every worker holds
counts about once in the sum.

As root, a third cluster runs plain Dask under kernel KSM: each worker makes
all its anonymous memory mergeable with prctl(PR_SET_MEMORY_MERGE) (Linux
6.4+, root or CAP_SYS_RESOURCE; `client.run` before any data), ksmd runs at
10,000 pages / 0 ms with use_zero_pages=1 from the start, and the figures
are read once its counters hold still over two full scans. Every KSM knob is
restored on exit, errors and Ctrl-C included (pydedup.bench.ksm.KernelKSM).
Without root the column is skipped with the reason printed. For every
cluster the workers' summed PSS is reported next to what the scheduler sees:
plain Dask reports RSS, which KSM's merged pages do not lower.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import time

import dask.config
import numpy as np
from distributed import Client, LocalCluster, wait

MiB = 1 << 20
WORKER_MIB = 100                    # a worker's own memory before the data, about


def load(mib: int) -> np.ndarray:
    return np.random.default_rng(0).random((mib * MiB // 8 // 1024, 1024))


def region_of_interest(data: np.ndarray, k: int) -> np.ndarray:
    """10% of the rows, at offset k, kept; the rest written as zeros."""
    rows = np.zeros(len(data), dtype=bool)
    n = len(data) // 10
    rows[k * n % len(data):][:n] = True
    out = np.empty_like(data)
    out[...] = 0.0                  # written, as a computed result is
    out[rows] = data[rows] * (k + 1)
    time.sleep(1.0)                 # compute time: the scanner merges while the next result waits
    return out


PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68
KSM_KNOBS = dict(pages_to_scan=10_000, sleep_millisecs=0, use_zero_pages=1, run=1)


def memory_merge() -> int:
    """In a worker: make every anonymous mapping of the process, present and
    future, mergeable by kernel KSM (prctl(PR_SET_MEMORY_MERGE, 1))."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_MEMORY_MERGE): {os.strerror(err)}")
    return os.getpid()


def worker_pss() -> int:
    from pydedup import procfs
    return procfs.process_pss()


def ksm_settle(seconds: float) -> None:
    """Wait until ksmd's counters (the whole system's) hold still over two
    full scans, at least three scans from now; at most `seconds`."""
    from pydedup.bench import ksm
    watch = ("pages_shared", "pages_sharing", "ksm_zero_pages")
    scans0 = ksm.counters()["full_scans"]
    last = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        c = ksm.counters()
        values = tuple(c.get(k, 0) for k in watch)
        if last is None or values != last[0]:
            last = (values, c["full_scans"])
        if c["full_scans"] >= scans0 + ksm.SCANS_TO_MERGE and c["full_scans"] >= last[1] + 2:
            break
        time.sleep(0.05)
    time.sleep(2.0)                 # the RSS reading and the heartbeat after it


def settle(client: Client, pydedup_on: bool, seconds: float) -> None:
    """Wait until the background scanners have merged what holds still
    (their counters unchanged over a second), at most `seconds`."""
    if not pydedup_on:
        time.sleep(2.0)             # two heartbeats
        return
    import pydedup.dask
    last = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = {w: (s["pages_sharing"], s["zero_pages"]) for w, s in client.run(pydedup.dask.stats).items()}
        if now == last:
            break
        last = now
        time.sleep(1.0)
    time.sleep(2.0)                 # the PSS reading and the heartbeat after it


def workers_info(client: Client) -> dict:
    """The scheduler's record of each worker, asked for now (client.scheduler_info()
    can come back without workers: its periodic refresh asks for none)."""
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def scheduler_memory(client: Client) -> tuple[int, int]:
    workers = workers_info(client).values()
    memory = sum(w["metrics"]["memory"] for w in workers)
    spilled = sum(w["metrics"]["spilled_bytes"]["disk"] for w in workers)
    return memory, spilled


def run(pydedup_on: bool, args: argparse.Namespace, kernel_ksm: bool = False) -> dict[str, float]:
    preload = dict(preload=["pydedup.dask"], preload_nanny=["pydedup.dask"]) if pydedup_on else {}
    limit = int(args.limit_mib * MiB)
    config = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": 0.7,
              "distributed.worker.memory.pause": 0.95, "distributed.worker.memory.terminate": 0.98}
    # Spill by process memory only (target: false), at 70%: managed memory
    # (sizeof) counts every result in full, with or without pydedup.
    with contextlib.ExitStack() as stack:
        if kernel_ksm:
            from pydedup.bench import ksm
            stack.enter_context(ksm.KernelKSM(**KSM_KNOBS))     # restored on exit, Ctrl-C too
        return measure(pydedup_on, args, config, limit, preload, kernel_ksm)


def measure(pydedup_on, args, config, limit, preload, kernel_ksm) -> dict[str, float]:
    with dask.config.set(config), \
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                         memory_limit=limit, dashboard_address=None, **preload) as cluster, \
            Client(cluster) as client:
        if kernel_ksm:
            client.run(memory_merge)
        time.sleep(2.0)
        before, _ = scheduler_memory(client)
        pss_before = sum(client.run(worker_pss).values())
        workers = sorted(workers_info(client))
        held = []
        for w in workers:
            data = client.submit(load, args.dataset_mib, workers=[w], pure=False)
            held.append(data)
            held += [client.submit(region_of_interest, data, k, workers=[w], pure=False)
                     for k in range(args.results)]
        wait(held)
        start = time.monotonic()
        if kernel_ksm:
            ksm_settle(300.0)
        else:
            settle(client, pydedup_on, 60.0)
        after, spilled = scheduler_memory(client)
        pss = sum(client.run(worker_pss).values()) - pss_before
        return dict(memory=after - before, spilled=spilled, settle=time.monotonic() - start,
                    pss=pss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dataset-mib", type=int, default=256)
    parser.add_argument("--results", type=int, default=3)
    parser.add_argument("--limit-mib", type=float, default=None,
                        help="each worker's memory limit (default: its spill point, 70%%, halfway "
                        "between pydedup's peak and plain Dask's need)")
    args = parser.parse_args()
    if args.limit_mib is None:
        plain_need = (1 + args.results) * args.dataset_mib
        dedup_peak = (2 + 0.1 * args.results) * args.dataset_mib     # the dataset, merged results, one new
        args.limit_mib = ((plain_need + dedup_peak) / 2 + WORKER_MIB) / 0.7
    one_copy = args.dataset_mib * MiB
    written = args.workers * args.dataset_mib * (1 + args.results) * MiB
    print(f"{args.workers} workers, each: the dataset ({args.dataset_mib} MiB, the same in every "
          f"worker) and {args.results} zero-heavy results of its size (90% zeros); memory limit "
          f"{args.limit_mib:.0f} MiB a worker; {written / MiB:.0f} MiB written in all")
    from pydedup.bench import ksm
    reason = ksm.available()
    if reason is None and ctypes.CDLL(None).prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) < 0:
        reason = "the kernel has no prctl(PR_SET_MEMORY_MERGE) (Linux 6.4+)"
    plain = run(False, args)
    dedup = run(True, args)
    rows = [("plain Dask", plain), ("pydedup.dask", dedup)]
    if reason is None:
        kernel = run(False, args, kernel_ksm=True)
        rows.append(("kernel KSM", kernel))
    for name, r in rows:
        print(f"{name:<13} scheduler sees {r['memory'] / MiB:8.1f} MiB of data "
              f"({r['memory'] / one_copy:5.2f}x one copy of the dataset, "
              f"{r['memory'] / args.workers / one_copy:4.2f}x per worker); "
              f"workers' PSS {r['pss'] / MiB:8.1f} MiB ({r['pss'] / one_copy:5.2f}x); "
              f"spilled {r['spilled'] / MiB:7.1f} MiB; settled in {r['settle']:.1f} s")
    print(f"pydedup / plain: {dedup['memory'] / plain['memory']:.3f}  "
          f"(scanner settled in {dedup['settle']:.1f} s)")
    if reason is None:
        print(f"kernel KSM / plain: scheduler {kernel['memory'] / plain['memory']:.3f}, "
              f"PSS {kernel['pss'] / plain['pss']:.3f}  (KSM: 10,000 pages / 0 ms, "
              f"use_zero_pages=1, settled in {kernel['settle']:.1f} s)")
    else:
        print(f"kernel KSM: skipped: {reason}")


if __name__ == "__main__":
    main()
