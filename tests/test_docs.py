"""The documentation builds without a warning, and the reference names every
public function, knob and counter, so it cannot silently fall behind."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

import pydedup
from pydedup import Arena, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference():
    with open(os.path.join(ROOT, "docs", "reference.md")) as f:
        return f.read()


# No -q: mkdocs 1.6 with --quiet does not count warnings, and --strict passes.


def test_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[test]')")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", os.path.join(ROOT, "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "index.html").exists()


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The test above can fail: a page linking to a missing page breaks the build."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[test]')")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\nSee [nothing](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: x\nstrict: true\n")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(tmp_path / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True)
    assert done.returncode != 0


def public_names():
    names = set(pydedup.__all__) - {"KNOBS"}
    names |= {name for name in vars(Arena) if not name.startswith("_")}
    return sorted(names)


@pytest.mark.parametrize("name", public_names())
def test_reference_names_every_public_function(name):
    # `name(...)`, `pydedup.name(...)`, `name` in a list of methods
    assert re.search(rf"`(pydedup\.)?{name}\b", reference()), name


@pytest.mark.parametrize("name", sorted(pydedup.KNOBS))
def test_reference_has_a_row_for_every_knob(name):
    assert f"| `{name}` |" in reference()


@pytest.mark.parametrize("cls", [pydedup.ArenaStats, pydedup.ArrayStats,
                                 pydedup.MergeReport, pydedup.UnmergeReport])
def test_reference_names_every_counter(cls):
    missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in reference()]
    assert not missing, f"{cls.__name__} fields missing from docs/reference.md: {missing}"


def test_reference_counter_tables_are_the_table_of_counters():
    """docs/reference.md's counter tables are pydedup.stats.COUNTERS, row for
    row; PYDEDUP_WRITE_REFERENCE=1 rewrites them instead of failing."""
    path = os.path.join(ROOT, "docs", "reference.md")
    text = reference()
    if os.environ.get("PYDEDUP_WRITE_REFERENCE") == "1":
        with open(path, "w") as f:
            f.write(stats.with_reference_tables(text))
        text = reference()
    tables = stats.reference_tables_in(text)
    assert sorted(tables) == sorted(record.__name__ for record in stats.RECORDS)
    for record, table in tables.items():
        assert table == stats.reference_table(record), (
            f"docs/reference.md's {record} table differs from pydedup/stats.py: "
            "PYDEDUP_WRITE_REFERENCE=1 pytest tests/test_docs.py rewrites it")


def test_the_counter_table_check_can_fail():
    text = reference().replace("| `pages_sharing` |", "| `pages_sharing_typo` |")
    assert stats.reference_tables_in(text)["ArenaStats"] != stats.reference_table("ArenaStats")
    assert stats.with_reference_tables(text) == reference()


def test_every_counter_is_in_the_table_once_with_a_doc():
    for record in stats.RECORDS:
        rows = [c for c in stats.COUNTERS if c.record == record.__name__]
        assert [c.name for c in rows] == [f.name for f in dataclasses.fields(record)]
        assert all(c.doc for c in rows)


def test_every_knob_and_ksm_counter_names_its_ksm_counterpart():
    """Knob rows carry the /sys/kernel/mm/ksm file they mirror (KNOBS[...].ksm)."""
    text = reference()
    for name, knob in pydedup.KNOBS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        if knob.ksm:
            assert f"`{knob.ksm}`" in row.split("|")[4], row


# -- code that runs ------------------------------------------------------------

def python_blocks():
    """(file, line, code) of every ```python block of the README and docs/."""
    files = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(ROOT, "docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
        if name.endswith(".md"))
    blocks = []
    for path in files:
        with open(path) as f:
            text = f.read()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text[: match.start()].count("\n") + 1
            blocks.append((os.path.relpath(path, ROOT), line, match.group(1)))
    return blocks


@pytest.mark.parametrize("path, line, code", python_blocks(),
                         ids=[f"{p}:{n}" for p, n, _ in python_blocks()])
def test_every_python_block_of_the_docs_runs_self_contained(tmp_path, path, line, code):
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path)))
    assert done.returncode == 0, f"{path}:{line}\n{done.stderr}"


def test_the_docs_have_python_blocks_to_run():
    assert len(python_blocks()) >= 5


EXAMPLES = {"sparse_densified.py": "scipy", "pandas_frame.py": "pandas",
            "xarray_landmask.py": "xarray", "image_background.py": "skimage"}


def test_every_example_is_tested():
    names = {n for n in os.listdir(os.path.join(ROOT, "examples")) if not n.startswith("_")}
    assert names == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_run_and_save_memory(tmp_path, name):
    pytest.importorskip(EXAMPLES[name], reason=f"examples/{name} needs {EXAMPLES[name]} "
                        "(pip install -e '.[examples]')")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), "--mib", "16"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    saved = float(re.search(r"([\d,.]+) MiB saved", done.stdout).group(1).replace(",", ""))
    assert saved > 4, done.stdout                 # of about 16 MiB, most of it repeats
    assert "plain numpy" in done.stdout
