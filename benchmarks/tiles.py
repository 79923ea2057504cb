"""Tiles (issue 15): saving against the theoretical, mappings added and frames
for each tile_pages, on a 256 MiB NaN array (np.full(n, np.nan)) and the
benchmark's filled and dataframe workloads (1 GiB), one merge() each:

    python benchmarks/tiles.py

Savings are the arena's counters (bytes_saved over the theoretical saving),
mappings are counted in /proc/self/maps (stats().mappings)."""
import gc
from contextlib import closing

import numpy as np

import pydedup
from pydedup.bench import workloads

SIZES = (("nan", 256 << 20), ("filled", 1 << 30), ("dataframe", 1 << 30))


def measure(tile_pages, name, size):
    with closing(pydedup.Arena(4 << 30, tile_pages=tile_pages)) as arena:
        if name == "nan":
            arrays = [arena.full(size // 8, np.nan)]
            theoretical = (size // workloads.PAGE - 1) * workloads.PAGE
        else:
            w = workloads.WORKLOADS[name](arena.empty, size, np.random.default_rng(0))
            arrays, theoretical = w.arrays, w.theoretical_saved
            del w
        before = arena.stats().mappings
        arena.merge()
        stats = arena.stats()
        del arrays
        gc.collect()
    return (f"{name}: {stats.bytes_saved / theoretical:6.2%} {stats.mappings - before:6} mappings "
            f"{stats.pages_shared:6} frames")


def main():
    for tile_pages in (1, 64, 128, 256, 512, 1024, 2048):     # 1: no tiles
        row = [f"tile_pages {tile_pages:5}"]
        row += [measure(tile_pages, name, size) for name, size in SIZES]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
