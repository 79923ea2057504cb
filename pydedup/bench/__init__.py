"""The pydedup benchmark: every method on the same workloads in one run,
every figure also a ratio against plain numpy and kernel KSM measured in
that run. Memory is PSS (/proc/self/smaps_rollup), never RSS.

Methods: numpy (no merging), merge (Arena.merge()), background (the arena's
scanner, run=1), ksm-fast (kernel KSM at 10,000 pages / 0 ms) and
ksm-default (kernel KSM at its default 100 pages / 20 ms, minutes a GiB:
not in the default, add it with --ksm-defaults); the kernel rows
need root and are skipped with a note otherwise; every /sys/kernel/mm/ksm
knob is restored (pydedup.bench.ksm.KernelKSM).
"""
import argparse
import json
import os
import platform
import sys

import numpy as np

from pydedup.bench import access, methods, report, scaling, workloads
from pydedup.bench.workloads import parse_size  # noqa: F401 - public helper
from pydedup.bench.zero_read import show_zero_read, zero_read

# ksm-default is left out of the default: it needs about two minutes a
# workload here (a full scan of 1 GiB at 100 pages / 20 ms takes 50 s, and
# a merge takes two to three), which would put the default run over two
# minutes. --ksm-defaults (or --methods) adds it.
DEFAULT_METHODS = ["numpy", "merge", "background", "ksm-fast"]


def machine() -> dict:
    """What produced the figures."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": model,
            "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGESIZE") / 2**30, 1),
            "python": platform.python_version(), "numpy": np.__version__}


def run(size, workload_names, method_names, seed=0, progress=None) -> dict:
    """{workload: {"bytes", "theoretical_saved", "rows": {method: figures}}}."""
    progress = progress or report.Progress(len(workload_names) * len(method_names))
    results = {}
    for workload_name in workload_names:
        build_workload = workloads.WORKLOADS[workload_name]
        seen: dict[str, int] = {}

        def build(alloc, build_workload=build_workload, seen=seen):
            # the same bytes for every method: the same seed, built afresh
            w = build_workload(alloc, size, np.random.default_rng(seed))
            seen.update(bytes=w.nbytes, theoretical_saved=w.theoretical_saved)
            return w

        rows = {}
        for name in method_names:
            progress.step(f"{workload_name}: {name}")
            reason = methods.skip_reason(name)
            if reason:
                rows[name] = {"skipped": reason}
            else:
                rows[name] = methods.METHODS[name][0](build, size)
            progress.advance()
        report.add_ratios(rows)
        results[workload_name] = dict(seen, rows=rows)
    progress.close()
    return results


def _workload_size(text):
    """--size: a positive number of bytes, rounded up to whole pages."""
    try:
        size = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 64MiB, 1GiB or bytes)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive, not {text}")
    page = os.sysconf("SC_PAGESIZE")
    return -(-size // page) * page


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pydedup bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", type=_workload_size,
                        help="bytes of each workload, e.g. 64MiB, 1GiB (default 1GiB)")
    parser.add_argument("--workload", choices=[*workloads.WORKLOADS, "all"], default="all",
                        help="structured, scattered, filled, dataframe or all (default)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of: {', '.join(methods.METHODS)} "
                             f"(default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="where bench.json and bench.png go (default ./bench-results)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument("--zero-read", action="store_true",
                        help="also the read throughput of an all-zero array, never written, "
                             "written, merged to the zero page, merged to zero frames")
    parser.add_argument("--access", nargs="?", const="256MiB", type=_workload_size, metavar="SIZE",
                        help="also the access speed (issue 20: gather, transposed copy, sum) "
                             "of numpy, the arena with and without huge pages before and after "
                             "a merge, and kernel KSM after merging, on SIZE of data (default "
                             "256MiB; pydedup.bench.access)")
    parser.add_argument("--scaling", metavar="SIZES",
                        help="instead of the methods: merge() of --workload (default "
                             "structured) at each of these comma-separated sizes, e.g. "
                             "1GiB,4GiB,16GiB, as ratios to the first; a size is merged as often "
                             "as the largest holds it, 3 to 5 times, and its (lower) median "
                             "merge counts (pydedup.bench.scaling)")
    parser.add_argument("--threads", type=int, default=None,
                        help="with --scaling: the threads knob (default: its default)")
    parser.add_argument("--barrier", choices=("auto", "uffd", "mprotect"), default=None,
                        help="with --scaling: the barrier knob (default: its default)")
    # Options of earlier versions, which added methods one by one; kept so
    # that old commands still run. The default now runs them all.
    for flag, name in (("--background", "background"), ("--ksm", "ksm-fast"),
                       ("--ksm-defaults", "ksm-default")):
        parser.add_argument(flag, dest="add", action="append_const", const=name,
                            help=f"make sure {name} is among the methods")
    args = parser.parse_args(argv)

    if args.scaling:
        return _scaling(args, parser)
    size = args.size
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    names += [m for m in args.add or () if m not in names]
    unknown = [m for m in names if m not in methods.METHODS]
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}; methods are: {', '.join(methods.METHODS)}")
    chosen = list(workloads.WORKLOADS) if args.workload == "all" else [args.workload]
    for name in names:
        reason = methods.skip_reason(name)
        if reason:
            print(f"note: {name} skipped: {reason}")

    result = {"command": "python -m pydedup bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "size": size, "seed": args.seed, "methods":
              {n: methods.METHODS[n][1] for n in names},
              "workloads": run(size, chosen, names, args.seed)}
    for workload_name, figures in result["workloads"].items():
        print(report.table(workload_name, figures))
    if args.zero_read:
        result["zero_read"] = zero_read(size, lambda m: print(m, file=sys.stderr))
        print(show_zero_read(result["zero_read"]))
    if args.access:
        result["access"] = _access(args.access)
        print(access.table(result["access"]))

    _write(result, args, "bench.json")
    if not args.no_plot:
        print(report.plot(result["workloads"], os.path.join(args.out, "bench.png")))
    return result


def _access(size):
    """The access rows at SIZE: the gathered array is half of it, the matrix
    and its transposed copy a quarter each; a gather of an eighth of the
    elements."""
    n = max(access.COPIES, size // 2 // 8)
    rows = max(1, int((size // 8 // 8 // 2) ** 0.5))
    return access.run(gather_bytes=n * 8, gathers=max(1, n // 8), matrix=(rows, 2 * rows),
                      progress=lambda m: print(m, file=sys.stderr))


def _scaling(args, parser):
    try:
        sizes = [_workload_size(s) for s in args.scaling.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        parser.error(f"--scaling: {e}")
    if not sizes:
        parser.error("--scaling takes sizes, e.g. 1GiB,4GiB")
    workload = "structured" if args.workload == "all" else args.workload
    result = {"command": "python -m pydedup bench " + " ".join(sys.argv[1:]),
              "machine": machine(), "seed": args.seed,
              "scaling": scaling.run(sizes, workload, args.seed, args.threads,
                                     args.barrier, lambda m: print(m, file=sys.stderr))}
    print(scaling.table(result["scaling"]))
    _write(result, args, "scaling.json")
    return result


def _write(result, args, name):
    """The figures as JSON: `name` in --out, and --json if given."""
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, name)] + ([args.json] if args.json else [])
    for path in paths:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print(f"figures: {', '.join(paths)}")
