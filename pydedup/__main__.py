"""usage: python -m pydedup [demo | bench [options] | stats [PID] | --help]

demo   a mostly-zero matrix and copies of its rows, merged, with the
       counters before and after (the default; 256 MiB)
bench  the benchmark against plain numpy and kernel KSM
       (see `python -m pydedup bench --help`)
stats  the counters of running processes' arenas (of PID if given)
"""
import argparse
import contextlib
import functools
import sys
import time

import numpy as np

import pydedup


def demo():
    with contextlib.closing(pydedup.Arena()) as arena:
        m = arena.zeros((4_000, 8_000))                  # 256 MB, float64
        m[:100] = np.random.default_rng(0).random((100, 8_000))
        m[100:] = 0.0                                    # written: it holds memory now
        copies = [arena.array(m[:100]) for _ in range(10)]
        print(f"{len(copies) + 1} arrays, {arena.stats().bytes_in_use / 2**20:.0f} MiB in use\n")
        print(arena.merge(), end="\n\n")
        print(arena.stats(), end="\n\n")
        before = arena.stats(copies[3]).pages_merged
        copies[3][0, 7] = 1.0                            # copy-on-write: that page alone
        print(f"after one write into a copy: its pages merged {before:,} -> "
              f"{arena.stats(copies[3]).pages_merged:,}")
        report = arena.unmerge()
        print(f"unmerge: {report.pages_unmerged} pages private again in {report.seconds:.3f} s")


def process_pss(pid):
    """PSS of a whole process in bytes, or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def stats(argv):
    from pydedup import procfs, publish
    parser = argparse.ArgumentParser(
        prog="pydedup stats", description="The counters running arenas publish (see "
        "pydedup/publish.py): arenas refresh them at stats(), and at merge() and "
        "in the background scanner for a while after this command asks.")
    parser.add_argument("pid", nargs="?", type=int, help="only this process's arenas")
    parser.add_argument("--wait", type=_non_negative_seconds, default=1.5,
                        help="seconds to give merging arenas to refresh (default 1.5)")
    parser.add_argument("--uid", type=int, help="another user's arenas (root)")
    args = parser.parse_args(argv)
    try:
        asked = publish.request(args.uid)
    except OSError:
        asked = time.time()
    deadline = time.monotonic() + args.wait
    while True:
        records = publish.published(args.pid, args.uid)
        if time.monotonic() >= deadline or (records and all(r["time"] >= asked for r in records)):
            break
        time.sleep(0.1)
    if not records:
        who = f"process {args.pid}" if args.pid else "any running process"
        print(f"no arena of {who} has published counters in {publish.directory(args.uid)} "
              "(an arena publishes at its first merge() or stats() call)")
        return 1
    read_smaps = functools.cache(procfs.read_smaps)   # once a process, for all its arenas
    for r in records:
        try:
            counters = publish.stats_of(r, read_smaps)
        except OSError as e:                     # gone since, or another user's
            print(f"pid {r['pid']}  arena {r['arena']}: {e}\n")
            continue
        except KeyError as e:                    # published by another version
            print(f"pid {r['pid']}  arena {r['arena']}: no reading {e} in its file\n")
            continue
        pss = process_pss(r["pid"])
        measured_now = " (PSS and mappings: now)" if r.get("stats") is None \
            and counters.pss_bytes is not None else ""
        print(f"pid {r['pid']}  arena {r['arena']}  counters {time.time() - r['time']:.1f} s old"
              f"{measured_now}  process PSS {'?' if pss is None else f'{pss / 2**20:,.1f} MiB'}")
        if counters.pss_bytes is None:
            print(f"PSS, mappings and huge pages unknown (None): /proc/{r['pid']}/smaps cannot "
                  "be read (a process that is not dumpable, or /proc mounted with hidepid)")
        if counters.shared_store:                # a store shared by processes (issue 16)
            print(f"shared store {counters.shared_store!r}, members (pids): "
                  + ", ".join(str(pid) for pid in counters.shared_members))
        print("knobs: " + ", ".join(f"{k}={v}" for k, v in r["knobs"].items()))
        print(counters, end="\n\n")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("demo", [])
    if command in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if command == "demo":
        demo()
    elif command == "bench":
        from pydedup.bench import main as bench
        bench(rest)
    elif command == "stats":
        return stats(rest)
    else:
        print(f"pydedup: unknown command {command!r}\n\n{__doc__}", file=sys.stderr)
        return 2
    return 0


def _non_negative_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"seconds must be >= 0, not {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
