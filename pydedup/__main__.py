"""python -m pydedup [demo | bench [options]]

demo   the README's example: a mostly-zero matrix and copies of its rows,
       merged, with the counters before and after (the default)
bench  the merge benchmark (see `python -m pydedup bench --help`)
"""
import sys

import numpy as np

import pydedup


def demo():
    with pydedup.Arena() as arena:
        m = arena.zeros((4_000, 8_000))                  # 256 MB, float64
        m[:100] = np.random.default_rng(0).random((100, 8_000))
        m[100:] = 0.0                                    # written: it holds memory now
        copies = [arena.array(m[:100]) for _ in range(10)]
        print(f"{len(copies) + 1} arrays, {arena.stats().bytes_in_use / 2**20:.0f} MiB in use\n")
        print(arena.merge(), end="\n\n")
        print(arena.stats(), end="\n\n")
        m[2_000, 7] = 1.0                                # copy-on-write: one page
        print(f"after one write: zero_pages {arena.stats().zero_pages}")
        report = arena.unmerge()
        print(f"unmerge: {report.pages_unmerged} pages private again in {report.seconds:.3f} s")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("demo", [])
    if command == "demo":
        demo()
    elif command == "bench":
        from pydedup.bench import main as bench
        bench(rest)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
