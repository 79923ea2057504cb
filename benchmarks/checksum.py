"""The page checksum's speed, each version against python-xxhash's XXH3.

    python benchmarks/checksum.py [--repeat 5]

Times pydedup's page checksum (_checksum.h), every version this CPU runs,
and XXH3_64bits of python-xxhash (the checksum pydedup used before; `pip
install xxhash`), called on one 4 KiB page after another from one C loop:
over 4 pages that stay in L1 (with the 4 KiB key) (the scan zero-tests a page first, so the
checksum mostly reads it from L1), and over 256 MiB read from memory.
Figures are the best of --repeat runs, as GB/s and as the ratio of XXH3's
time to each version's in the same run (above 1: faster than XXH3).
"""
import argparse
import ctypes

import numpy as np

from pydedup._fast import checksum_seconds

PAGE = 4096


def xxh3_address() -> int | None:
    try:
        import xxhash._xxhash
    except ImportError:
        return None
    return ctypes.cast(ctypes.CDLL(xxhash._xxhash.__file__).XXH3_64bits, ctypes.c_void_p).value


def best(buffer, rounds, repeat, xxh3):
    runs = [checksum_seconds(buffer, PAGE, rounds, xxh3 or 0, "xxh3") for _ in range(repeat)]
    return {name: min(run[name] for run in runs) for name in runs[0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    xxh3 = xxh3_address()
    if xxh3 is None:
        print("python-xxhash is not installed: no XXH3 to compare with (pip install xxhash)")
    rng = np.random.default_rng(0)
    cases = [("in L1, 4 pages", rng.integers(0, 256, 4 * PAGE, dtype=np.uint8), 80_000),
             ("from memory, 256 MiB", rng.integers(0, 256, 256 << 20, dtype=np.uint8), 2)]
    print(f"{'case':22} {'version':9} {'GB/s':>6} {'xxh3 time / time':>17}")
    for case, buffer, rounds in cases:
        seconds = best(buffer, rounds, args.repeat, xxh3)
        for name, s in seconds.items():
            ratio = f"{seconds['xxh3'] / s:17.2f}" if "xxh3" in seconds else f"{'-':>17}"
            print(f"{case:22} {name:9} {buffer.nbytes * rounds / s / 1e9:6.1f} {ratio}")


if __name__ == "__main__":
    main()
