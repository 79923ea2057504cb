"""pydedup on a real machine of two NUMA nodes (run inside the qemu guest of
benchmarks/numa_qemu.sh): an array on node 0, its copy on node 1, merged with
merge_across_nodes True, then False. Reports frames_by_node, where the kernel
says the copy's memory is (move_pages), the pydedup-frames lines of
/proc/self/numa_maps, and the copy's read latency and throughput from CPU 1.

    python3 benchmarks/numa_guest_check.py [--mib 64]
"""
import argparse
import contextlib
import ctypes
import os
import time

import numpy as np

import pydedup

PAGE = pydedup.features()["page_size"]
libc = ctypes.CDLL(None, use_errno=True)
SYS_move_pages = 279                                 # x86_64


def nodes_of(array):
    """{node: pages} of the array's memory, as move_pages (no target) reports it."""
    base = array.__array_interface__["data"][0]
    n = -(-array.nbytes // PAGE)
    pages = (ctypes.c_void_p * n)(*[base + i * PAGE for i in range(n)])
    status = (ctypes.c_int * n)()
    if libc.syscall(SYS_move_pages, 0, ctypes.c_ulong(n), pages, None, status, 0) != 0:
        return f"move_pages failed: errno {ctypes.get_errno()}"
    out = {}
    for s in status:
        out[s] = out.get(s, 0) + 1
    return dict(sorted(out.items()))


def frame_maps():
    """N<node>=pages summed over the pydedup-frames mappings of numa_maps."""
    total, lines = {}, 0
    with open("/proc/self/numa_maps") as f:
        for line in f:
            if "pydedup-frames" not in line:
                continue
            lines += 1
            for word in line.split():
                if word[0] == "N" and "=" in word:
                    node, pages = word[1:].split("=")
                    total[int(node)] = total.get(int(node), 0) + int(pages)
    return f"{lines} mappings, pages by node {dict(sorted(total.items()))}"


def policies(array):
    """{policy word of numa_maps: mappings} over the mappings inside the array's range."""
    lo = array.__array_interface__["data"][0]
    hi = lo + array.nbytes
    out = {}
    with open("/proc/self/numa_maps") as f:
        starts = [(int(line.split()[0], 16), line.split()[1]) for line in f]
    for (start, policy), nxt in zip(starts, starts[1:] + [(1 << 64, "")]):
        if start < hi and nxt[0] > lo:
            out[policy] = out.get(policy, 0) + 1
    return out


def timings(array, rng):
    """(ns per random 8-byte read, GB/s of a full sum), median of 5, on this CPU."""
    flat = array.reshape(-1)
    idx = rng.integers(0, flat.size, 1 << 18)
    lat, bw = [], []
    for _ in range(5):
        t = time.perf_counter()
        flat[idx].sum()
        lat.append((time.perf_counter() - t) / idx.size * 1e9)
        t = time.perf_counter()
        flat.sum()
        bw.append(array.nbytes / (time.perf_counter() - t) / 1e9)
    return float(np.median(lat)), float(np.median(bw))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    topo = pydedup.numa.topology()
    print("nodes:", [(n.id, n.cpus, n.memory_bytes >> 20) for n in topo.nodes],
          "features:", pydedup.features())
    cpu1 = topo.nodes[-1].cpus[-1]
    os.sched_setaffinity(0, {cpu1})                   # the reader of the copy sits on node 1
    rng = np.random.default_rng(0)
    with contextlib.closing(pydedup.Arena(size=4 * args.mib << 20)) as arena:
        a = arena.array(rng.random((args.mib << 20) // 8), node=0)
        b = arena.array(a, node=topo.node_ids[-1])
        print(f"before merge: a on {nodes_of(a)} policy {policies(a)}, "
              f"b on {nodes_of(b)} policy {policies(b)}")
        lat, bw = timings(b, rng)
        print(f"  unmerged   b read from CPU {cpu1}: {lat:6.1f} ns/random read, {bw:5.2f} GB/s sum")
        for across in (True, False):
            arena.unmerge()
            a.sum(), b.sum()
            print(f"after unmerge(): a on {nodes_of(a)} policy {policies(a)}, "
                  f"b on {nodes_of(b)} policy {policies(b)}")
            arena.merge_across_nodes = across
            r = arena.merge()
            s = arena.stats()
            print(f"merge_across_nodes={across}: merged {r.pages_merged} moved {r.pages_moved} "
                  f"frames_by_node {s.frames_by_node} sharing {s.pages_sharing}")
            print(f"  kernel, not yet touched: a on {nodes_of(a)}, b on {nodes_of(b)}")
            lat, bw = timings(b, rng)
            a.sum()
            print(f"  merged     b read from CPU {cpu1}: {lat:6.1f} ns/random read, {bw:5.2f} GB/s sum")
            print(f"  kernel, after reads: a on {nodes_of(a)}, b on {nodes_of(b)}; frames {frame_maps()}")
            np.testing.assert_array_equal(a, b)
            r2 = arena.merge()
            print(f"  second merge: merged {r2.pages_merged} moved {r2.pages_moved} "
                  f"frames_by_node {arena.stats().frames_by_node}")
        del a, b


if __name__ == "__main__":
    main()
