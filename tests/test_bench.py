"""The benchmark: its workloads hold the mix they claim, every method gives
the same figures, the ratios are against rows of the same run, JSON and plot
come out, kernel KSM rows are skipped with a reason where KSM cannot run.
Sizes are tiny; nothing here asserts a timing."""
import json
import os
import sys

import numpy as np
import pytest

from pydedup import bench
from pydedup.bench import ksm, report, workloads
from pydedup.bench.workloads import PAGE, PAGE_FLOATS

FIGURES = {"seconds", "cpu_seconds", "pss_before", "pss_after", "saved_over_theoretical",
           "metadata_bytes_per_page", "read_gib_per_second", "first_write_us", "pss_samples", "ratios"}


def page_rows(workload):
    """Every whole page of the workload's arrays (a last partial page left out)."""
    return np.concatenate([a[:a.size // PAGE_FLOATS * PAGE_FLOATS].reshape(-1, PAGE_FLOATS)
                           for a in workload.arrays])


def test_parse_size():
    assert workloads.parse_size("16MiB") == 16 << 20
    assert workloads.parse_size("1GiB") == 1 << 30
    assert workloads.parse_size("4096") == 4096


def test_scattered_workload_is_the_ksm_mix_shuffled_page_by_page():
    w = workloads.scattered(np.empty, 16 << 20, np.random.default_rng(1))
    pages = page_rows(w)
    n = len(pages)
    zero = ~pages.any(axis=1)
    _, first, counts = np.unique(pages[~zero], axis=0, return_index=True, return_counts=True)
    repeated = counts > 1
    assert zero.sum() == n // 2
    assert repeated.sum() <= workloads.DISTINCT                   # copies of at most 1,024 pages
    assert counts[repeated].sum() == n // 4                         # a quarter are those copies
    assert (~repeated).sum() == n - n // 2 - n // 4                 # the rest unique
    assert 0.3 < zero[: n // 2].mean() < 0.7                        # shuffled, not in blocks
    assert w.theoretical_saved == (n - repeated.sum() - (~repeated).sum()) * PAGE


def test_structured_workload_duplicates_whole_arrays():
    w = workloads.structured(np.empty, 16 << 20, np.random.default_rng(1))
    pages = page_rows(w)
    distinct_nonzero = len(np.unique(pages[pages.any(axis=1)], axis=0))
    assert w.theoretical_saved == (len(pages) - distinct_nonzero) * PAGE
    first_copy = 2 + workloads.SOURCES
    sources, copies = w.arrays[2], w.arrays[first_copy:first_copy + workloads.COPIES - 1]
    assert all(np.array_equal(sources, c) for c in copies)


def runs_of_equal_pages(pages):
    """Lengths of the runs of consecutive equal pages."""
    bits = pages.view(np.uint64)                # NaN equals NaN, bit for bit
    same = np.all(bits[1:] == bits[:-1], axis=1)
    runs, n = [], 1
    for s in same:
        if s:
            n += 1
        else:
            runs.append(n)
            n = 1
    return runs + [n]


def test_filled_workload_repeats_fills_within_arrays():
    w = workloads.filled(np.empty, 16 << 20, np.random.default_rng(1))
    nan, ones, sentinel, mixed = w.arrays
    assert np.isnan(nan).all() and (ones == 1.0).all() and (sentinel == -9999.0).all()
    assert nan.nbytes == 2 * ones.nbytes == 2 * sentinel.nbytes == mixed.nbytes // 2
    filled_share = np.isnan(mixed).mean() + (mixed == -9999.0).mean()
    assert 0.3 < filled_share < 1 and np.isnan(mixed).any() and (mixed == -9999.0).any()
    runs = runs_of_equal_pages(mixed.reshape(-1, PAGE_FLOATS))
    assert max(runs) > 64 and len(runs) > 8               # runs inside, between random pages
    pages = np.ascontiguousarray(page_rows(w)).view(np.uint8).reshape(-1, PAGE)
    distinct = len({row.tobytes() for row in pages})
    assert w.theoretical_saved == (len(pages) - distinct) * PAGE   # no zero page here


def test_dataframe_workload_is_column_blocks_and_a_copy():
    w = workloads.dataframe(np.empty, 16 << 20, np.random.default_rng(1))
    block, copy = w.arrays
    assert np.array_equal(block, copy, equal_nan=True)
    columns = block.reshape(100, -1)
    kinds = [("zero" if not c.any() else "nan" if np.isnan(c).all()
              else "constant" if (c == c[0]).all() else "random") for c in columns]
    assert [kinds.count(k) for k, _ in workloads.COLUMNS] == [n for _, n in workloads.COLUMNS]
    assert columns.shape[1] % PAGE_FLOATS                  # columns cross page boundaries
    pages = page_rows(w)
    nonzero = pages[pages.any(axis=1)]
    distinct = len({row.tobytes() for row in nonzero})
    assert w.theoretical_saved == (len(pages) - distinct) * PAGE


@pytest.mark.parametrize("name", ["structured", "scattered", "filled", "dataframe"])
def test_pages_whose_first_write_is_timed_are_duplicated(name):
    w = workloads.WORKLOADS[name](np.empty, 16 << 20, np.random.default_rng(1))
    pages = page_rows(w)
    counts = {row.tobytes(): 0 for row in pages}
    for row in pages:
        counts[row.tobytes()] += 1
    for index, offsets in w.write_sample:
        a = w.arrays[index]
        sample = a[:a.size // PAGE_FLOATS * PAGE_FLOATS].reshape(-1, PAGE_FLOATS)[offsets // PAGE]
        assert all(counts[row.tobytes()] > 1 for row in sample)


def run_bench(tmp_path, *args):
    out = tmp_path / "out"
    result = bench.main(["--size", "16MiB", "--out", str(out), *args])
    with open(out / "bench.json") as f:
        return result, json.load(f), out


def test_bench_figures_and_ratios_for_every_workload(tmp_path, capsys):
    result, saved, out = run_bench(tmp_path, "--methods", "numpy,merge,background", "--no-plot")
    assert set(saved["workloads"]) == {"structured", "scattered", "filled", "dataframe"}
    assert saved["machine"]["kernel"] and saved["command"].startswith("python -m pydedup bench")
    for name, figures in saved["workloads"].items():
        rows = figures["rows"]
        assert list(rows) == ["numpy", "merge", "background"]
        for row in rows.values():
            assert FIGURES <= set(row)
        numpy, merge = rows["numpy"], rows["merge"]
        assert numpy["seconds"] is None and numpy["ratios"]["pss_after/numpy"] == 1.0
        for row in (merge, rows["background"]):
            assert row["pss_after"] < row["pss_before"]
            assert row["saved_over_theoretical"] > 0.5, (name, row)
            assert row["ratios"]["pss_after/numpy"] == row["pss_after"] / numpy["pss_after"]
            assert 0 < row["metadata_bytes_per_page"] < 64
    assert not (out / "bench.png").exists()
    printed = capsys.readouterr().out
    assert "structured:" in printed and "scattered:" in printed and "pss_after/numpy" in printed


def test_bench_one_workload_and_the_json_option(tmp_path):
    extra = tmp_path / "extra.json"
    _, saved, _ = run_bench(tmp_path, "--workload", "scattered", "--methods", "numpy,merge",
                            "--no-plot", "--json", str(extra))
    assert list(saved["workloads"]) == ["scattered"]
    assert json.loads(extra.read_text()) == saved


def test_kernel_ksm_rows_are_skipped_with_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ksm, "available", lambda: "kernel KSM needs root: test")
    _, saved, _ = run_bench(tmp_path, "--workload", "structured", "--methods", "numpy",
                            "--ksm", "--ksm-defaults", "--no-plot")
    rows = saved["workloads"]["structured"]["rows"]
    assert rows["ksm-fast"] == {"skipped": "kernel KSM needs root: test"}
    assert rows["ksm-default"] == {"skipped": "kernel KSM needs root: test"}
    printed = capsys.readouterr().out
    assert "note: ksm-fast skipped: kernel KSM needs root: test" in printed


@pytest.mark.skipif(ksm.available() is not None, reason=str(ksm.available()))
def test_kernel_ksm_row_merges_and_restores_every_knob(tmp_path):
    before = ksm.knobs_at_rest()
    _, saved, _ = run_bench(tmp_path, "--workload", "structured", "--methods", "numpy,ksm-fast", "--no-plot")
    assert ksm.knobs_at_rest() == before
    row = saved["workloads"]["structured"]["rows"]["ksm-fast"]
    assert row["saved_over_theoretical"] > 0.5
    assert row["ratios"]["seconds/ksm-fast"] == 1.0


def test_plot_is_a_png_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the bench extra)")
    _, _, out = run_bench(tmp_path, "--workload", "structured", "--methods", "numpy,merge")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import fails
    _, _, out = run_bench(tmp_path, "--workload", "structured", "--methods", "numpy")
    assert not (out / "bench.png").exists()
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().out


def test_unknown_method_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--methods", "numpy,nope", "--out", str(tmp_path)])


def test_ratios_leave_out_missing_baselines():
    rows = {"numpy": {"pss_after": 100, "read_gib_per_second": 10.0, "first_write_us": 0.5,
                      "seconds": None, "cpu_seconds": None, "metadata_bytes_per_page": 0.0},
            "merge": {"pss_after": 50, "read_gib_per_second": 20.0, "first_write_us": 2.0,
                      "seconds": 1.0, "cpu_seconds": 0.5, "metadata_bytes_per_page": 12.0},
            "ksm-fast": {"skipped": "no"}}
    report.add_ratios(rows)
    assert rows["merge"]["ratios"] == {"pss_after/numpy": 0.5, "read/numpy": 2.0, "first_write/numpy": 4.0}
    assert "ratios" not in rows["ksm-fast"]


def test_progress_without_tqdm_prints_a_line_a_step(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    progress = report.Progress(2)
    progress.step("structured: numpy")
    progress.advance()
    progress.step("structured: merge")
    progress.advance()
    progress.close()
    err = capsys.readouterr().err
    assert "0/2" in err and "1/2" in err and "structured: merge" in err


def test_scaling_reports_time_ratios_and_read_passes(tmp_path, capsys):
    result = bench.main(["--scaling", "8MiB,32MiB,64MiB", "--workload", "structured",
                         "--threads", "2", "--barrier", "mprotect", "--out", str(tmp_path)])
    rows = result["scaling"]["rows"]
    assert [r["size_ratio"] for r in rows] == [1.0, 4.0, 8.0]
    # as often as the largest holds it, 3 to 5 times
    assert [r["merges"] for r in rows] == [5, 3, 3]
    assert rows[0]["time_ratio"] == 1.0 and rows[2]["time_ratio"] > 0
    assert rows[0]["read_ratio"] == 1.0 and rows[2]["read_ratio"] > 0
    assert all(r["threads"] == 2 and r["barrier"] == "mprotect" and r["read_passes"] > 0
               for r in rows)
    assert set(rows[2]["phase_cpu_seconds"]) == {"refresh", "decide", "apply"}
    out = capsys.readouterr().out
    assert "x time" in out and "x read" in out and "mprotect" in out
    assert (tmp_path / "scaling.json").exists()


def test_merge_rows_report_threads_and_phases(tmp_path, capsys):
    result, _, _ = run_bench(tmp_path, "--workload", "structured",
                             "--methods", "merge,merge-1thr", "--no-plot")
    rows = result["workloads"]["structured"]["rows"]
    assert rows["merge-1thr"]["threads"] == 1
    assert rows["merge"]["threads"] == min(len(os.sched_getaffinity(0)), 256)
    for row in rows.values():
        assert set(row["phase_cpu_seconds"]) == {"refresh", "decide", "apply"}
        assert row["merge_over_read_pass"] > 0
    assert "read passes" in capsys.readouterr().out


# -- access speed (issue 20) --------------------------------------------------------------

ACCESS_ROWS = ["arena, huge pages", "arena, huge pages", "arena, 4 KiB pages", "arena, 4 KiB pages"]


def test_access_rows_come_out_of_bench_with_every_operation(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ksm, "available", lambda: "kernel KSM needs root: test")
    _, saved, _ = run_bench(tmp_path, "--workload", "structured", "--methods", "numpy",
                            "--no-plot", "--access", "9MiB")    # a matrix of no whole pages
    found = saved["access"]
    assert found["config"]["gather_bytes"] == 9 << 19 and found["config"]["gathers"] > 0
    assert found["skipped"] == {"kernel KSM": "kernel KSM needs root: test"}
    for content in ("unique", "merged"):
        rows = [r for r in found["rows"] if r["data"] == content]
        assert [r["memory"] for r in rows] == ACCESS_ROWS + ["numpy"]
        assert [r["when"] for r in rows[:2]] == ["before merge", "after merge"]
        for row in rows:
            assert set(row["ops"]) == {"gather", "transpose", "sum"}
            for op in row["ops"].values():
                assert op["seconds"] > 0 and op["over_numpy"] == op["seconds"] / op["numpy_seconds"]
        # huge_pages="off": not one byte of the arrays on a huge page
        assert all(r["huge_bytes"] == 0 for r in rows if r["memory"] == "arena, 4 KiB pages")
    printed = capsys.readouterr().out
    assert "access speed: gather" in printed and "kernel KSM: skipped: kernel KSM needs root: test" in printed


@pytest.mark.skipif(ksm.available() is not None, reason=str(ksm.available()))
def test_access_rows_of_kernel_ksm_merge_and_restore_every_knob():
    from pydedup.bench import access
    before = ksm.knobs_at_rest()
    found = access.run(gather_bytes=4 << 20, gathers=1000, matrix=(64, 128), repeat=1)
    assert ksm.knobs_at_rest() == before
    assert found["skipped"] == {}
    rows = {r["data"]: r for r in found["rows"] if r["memory"] == "kernel KSM"}
    assert set(rows) == {"unique", "merged"}
    # seven of the eight copies of the gathered array's block merge, at least
    assert rows["merged"]["ksm_merging_pages"] >= 7 * (4 << 20) // 8 // PAGE
    assert "kernel KSM, merged:" in access.table(found)


def test_access_refuses_sizes_that_are_not_positive(tmp_path):
    from pydedup.bench import access
    with pytest.raises(ValueError, match="must be positive"):
        access.run(gather_bytes=1 << 20, gathers=10, matrix=(0, 4), kernel=False)
    with pytest.raises(SystemExit):
        bench.main(["--access", "0", "--out", str(tmp_path)])
