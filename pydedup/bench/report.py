"""Ratios, the printed tables, the progress bar and the PNG plot."""
import os
import sys
import time

MiB = 2**20
SHOWN_RATIOS = ("pss_after/numpy", "read/numpy", "first_write/numpy",
                "seconds/ksm-fast", "cpu/ksm-fast", "seconds/ksm-default")


def add_ratios(rows: dict):
    """Each row's figures as ratios to the plain-numpy row (memory, reads,
    first write) and to the kernel KSM rows (time, CPU, memory, metadata),
    all measured in the same run. A ratio whose baseline is missing or zero
    is left out."""
    for row in rows.values():
        if "skipped" in row:
            continue
        ratios: dict[str, float] = {}
        numpy = rows.get("numpy", {})
        for key, figure in (("pss_after", "pss_after"), ("read", "read_gib_per_second"),
                            ("first_write", "first_write_us")):
            _ratio(ratios, f"{key}/numpy", row, numpy, figure)
        for name in ("ksm-fast", "ksm-default"):
            base = rows.get(name, {})
            for key, figure in (("seconds", "seconds"), ("cpu", "cpu_seconds"),
                                ("pss_after", "pss_after"), ("metadata", "metadata_bytes_per_page")):
                _ratio(ratios, f"{key}/{name}", row, base, figure)
        row["ratios"] = ratios


def _ratio(out, key, row, base, figure):
    if row.get(figure) is not None and base.get(figure):
        out[key] = row[figure] / base[figure]


def _num(value, fmt):
    return format("-", f">{int(float(fmt[:-1]))}") if value is None else format(value, fmt)


LEGEND = """\
  s, CPU s      wall time to the full merge, and CPU time of whoever merged
                (the caller, the scanner thread, ksmd); numpy merges nothing
  PSS before    the process's PSS (smaps_rollup, never RSS), MiB, every page
  after MiB     of the workload mapped, before and after merging
  saved/theor   (before - after) over the most merging could save
  B/page        bookkeeping bytes per workload page
  read GiB/s    reading every byte after merging, best of 3
  1st write us  the first write into a merged page (copy-on-write fault)
  ratios        a row's figure over plain numpy's (memory, read, first
                write) or kernel KSM's (time, CPU); docs/benchmarks.md"""


def table(workload: str, result: dict) -> str:
    rows = result["rows"]
    w = name_width(rows)
    lines = [f"{workload}: {result['bytes'] / 2**30:.2f} GiB, at most "
             f"{result['theoretical_saved'] / MiB:.0f} MiB to save",
             f"  {'method':<{w}}{'s':>8}{'CPU s':>8}{'PSS before':>12}{'after MiB':>10}"
             f"{'saved/theor':>12}{'B/page':>8}{'read GiB/s':>11}{'1st write us':>13}"]
    for name, row in rows.items():
        if "skipped" in row:
            lines.append(f"  {name:<{w}}skipped: {row['skipped']}")
            continue
        lines.append(
            f"  {name:<{w}}{_num(row['seconds'], '8.2f')}{_num(row['cpu_seconds'], '8.2f')}"
            f"{row['pss_before'] / MiB:12.1f}{row['pss_after'] / MiB:10.1f}"
            f"{100 * row['saved_over_theoretical']:11.2f}%{_num(row['metadata_bytes_per_page'], '8.2f')}"
            f"{row['read_gib_per_second']:11.1f}{row['first_write_us']:13.2f}")
    # the ratios that matter most; the JSON has them all
    keys = [k for k in SHOWN_RATIOS if any(k in row.get("ratios", {}) for row in rows.values())]
    if keys:
        lines.append(f"  {'ratios':<{w}}" + "".join(f"{k:>20}" for k in keys))
        for name, row in rows.items():
            if "ratios" in row:
                lines.append(f"  {name:<{w}}" + "".join(
                    f"{_num(row['ratios'].get(k), '20.3f')}" for k in keys))
    lines += phases(rows)
    lines.append(LEGEND)
    return "\n".join(lines)


def name_width(rows: dict) -> int:
    """The width of the method column: its longest name and a space."""
    return max([len(name) + 1 for name in rows] + [12])


def phases(rows: dict) -> list[str]:
    """The merge rows' phases: wall and CPU seconds (every thread's), the
    threads, and the merge in read passes (numpy's OR-reduce over the same
    memory, in the same run)."""
    lines: list[str] = []
    w = name_width(rows)
    for name, row in rows.items():
        if "phase_cpu_seconds" not in row:
            continue
        if not lines:
            lines.append(f"  {'phases':<{w}}{'threads':>8}{'read passes':>12}   "
                         "refresh / decide / apply: wall s (CPU s)")
        wall, cpu = row["phase_seconds"], row["phase_cpu_seconds"]
        lines.append(f"  {name:<{w}}{row['threads']:>8}{row['merge_over_read_pass']:>12.2f}   " + " / ".join(
            f"{wall[p]:.3f} ({cpu[p]:.3f})" for p in ("refresh", "decide", "apply")))
    return lines


class Progress:
    """tqdm if it is installed, else a plain bar on stderr (one line a step
    when stderr is not a terminal)."""

    def __init__(self, total):
        self.total, self.done, self._t0 = total, 0, time.monotonic()
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="step", file=sys.stderr)
        except ImportError:
            self._bar = None
        self._tty = sys.stderr.isatty()

    def step(self, text):
        """Announce the step about to run."""
        if self._bar is not None:
            self._bar.set_description(text)
            return
        filled = 30 * self.done // max(self.total, 1)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{time.monotonic() - self._t0:5.0f} s  {text}")
        print(f"\r{line:<100}" if self._tty else line, end="" if self._tty else "\n",
              file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif self._tty:
            print(file=sys.stderr)


def plot(results: dict, path: str) -> str:
    """One PNG: per workload, PSS over time for each method, and the ratios
    as bars. Returns a note if matplotlib is missing (no plot then)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'pydedup[bench]')"
    workloads = list(results)
    fig, axes = plt.subplots(len(workloads), 2, figsize=(13, 4.2 * len(workloads)), squeeze=False)
    for (left, right), workload in zip(axes, workloads):
        rows = {n: r for n, r in results[workload]["rows"].items() if "skipped" not in r}
        for name, row in rows.items():
            t, pss = zip(*row["pss_samples"]) if row["pss_samples"] else ((), ())
            # time + 0.01 s: a log axis, so that 0.3 s and 20 s both show
            left.plot([x + 0.01 for x in t], [p / MiB for p in pss], marker=".", label=name)
        left.set_xscale("log")
        left.set_xlabel("seconds since the merge began (+0.01)")
        left.set_ylabel("process PSS, MiB")
        left.set_title(f"{workload}: PSS while merging")
        left.legend()
        keys = ["pss_after/numpy", "read/numpy", "seconds/ksm-fast", "cpu/ksm-fast"]
        keys = [k for k in keys if any(k in r.get("ratios", {}) for r in rows.values())]
        width = 0.8 / max(len(rows), 1)
        for i, (name, row) in enumerate(rows.items()):
            values = [row.get("ratios", {}).get(k, float("nan")) for k in keys]
            right.bar([j + i * width for j in range(len(keys))], values, width, label=name)
        right.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
        right.axhline(1.0, color="grey", linewidth=0.8)
        right.set_yscale("log")
        right.set_title(f"{workload}: ratios (lower is better, but read: higher)")
        right.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return f"plot: {path}"
