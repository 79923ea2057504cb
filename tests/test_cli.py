"""python -m pydedup: demo runs the README's example; stats shows the
counters running arenas publish, and only theirs."""
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pydedup
from pydedup import procfs, publish, stats
from pydedup.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def own_directory(tmp_path, monkeypatch):
    """Arenas of this test publish into a directory of its own."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "pydedup"


def test_demo_merges_and_unmerges(capsys):
    main(["demo"])
    out = capsys.readouterr().out
    report = dict(line.split(None, 1) for line in out.split("\n\n")[1].splitlines())
    assert int(report["pages_merged"].replace(",", "")) > 0
    assert int(report["pages_zeroed"].replace(",", "")) > 0
    assert "unmerge:" in out and "pages private again" in out
    # one write into a merged copy copies that page alone
    merged = out.split("after one write into a copy: its pages merged ")[1].split("\n")[0]
    before, after = (int(n.replace(",", "")) for n in merged.split(" -> "))
    assert after == before - 1


def test_readme_names_the_demo_and_the_bench_extra():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "python -m pydedup demo" in readme
    assert "pip install -e '.[bench]' && python -m pydedup bench" in readme


def test_stats_shows_this_process_arena(arena, capsys, own_directory):
    a = arena.zeros(100_000)
    a[:] = 0.0
    arena.merge()
    arena.stats()
    assert main(["stats", str(os.getpid()), "--wait", "0"]) == 0
    out = capsys.readouterr().out
    assert f"pid {os.getpid()}" in out
    assert "zero_pages" in out and "pages_in_use       196" in out
    arena.close()
    assert os.listdir(own_directory) == ["request"]            # the file went with the arena
    assert main(["stats", "--wait", "0"]) == 1
    assert "no arena" in capsys.readouterr().out


def test_the_published_counters_are_the_table_of_counters(arena):
    """The JSON a stats() writes holds every ArenaStats counter of
    pydedup.stats.COUNTERS, and reads back into the same record."""
    a = arena.zeros(100_000)
    a[:] = 0.0
    arena.merge()
    mine = arena.stats()
    (record,) = publish.published(os.getpid())
    names = [c.name for c in stats.COUNTERS if c.record == "ArenaStats"]
    assert list(record["stats"]) == names
    published = pydedup.ArenaStats.from_published(json.loads(json.dumps(record["stats"])))
    assert published.pages_in_use == mine.pages_in_use == 196
    assert published.zero_pages == mine.zero_pages > 0


def test_a_scanning_arena_refreshes_when_stats_asks(capsys):
    with contextlib.closing(pydedup.Arena(size=1 << 30, run=1, sleep_millisecs=1)) as arena:
        a = arena.zeros(100_000)
        a[:] = 0.0                           # never a stats() call: the scanner must publish
        assert main(["stats", "--wait", "5"]) == 0
        out = capsys.readouterr().out
        assert f"pid {os.getpid()}" in out and "run=1" in out


def test_the_first_merge_publishes_and_later_ones_only_while_watched(arena, own_directory, capsys):
    a = arena.zeros(100_000)
    a[:] = 0.0
    arena.merge()                            # never a stats() call: listed all the same
    [name] = os.listdir(own_directory)
    published = os.stat(own_directory / name).st_mtime_ns
    assert main(["stats", str(os.getpid()), "--wait", "0"]) == 0
    assert "zero_pages         196" in capsys.readouterr().out
    os.unlink(own_directory / "request")     # nobody watches
    arena.merge()
    assert os.stat(own_directory / name).st_mtime_ns == published


def test_a_merge_leaves_reading_smaps_to_the_reader(arena, monkeypatch):
    """A merge publishes without reading /proc/self/smaps (tens of
    megabytes for an arena cut into 100,000 mappings); the reader reads the
    arena's process's smaps and makes the same counters stats() makes."""
    a = arena.zeros(100_000)
    a[:] = 0.0
    b = arena.array(np.arange(50_000, dtype=np.float64))
    c = arena.array(b)
    read = []
    measure = procfs.arena_smaps
    monkeypatch.setattr(procfs, "arena_smaps", lambda *args, **kw: read.append(kw.get("pid"))
                        or measure(*args, **kw))
    arena.merge()
    assert read == []
    assert np.array_equal(b, c)                  # read: their frames count in PSS
    (record,) = publish.published(os.getpid())
    assert record["stats"] is None
    measured = publish.stats_of(json.loads(json.dumps(record)))
    assert read == [os.getpid()]
    mine = arena.stats()
    assert measured.pss_bytes == mine.pss_bytes > 0
    assert measured.mappings == mine.mappings > 1
    assert (measured.zero_pages, measured.pages_sharing) == (mine.zero_pages, mine.pages_sharing)
    assert measured.pages_sharing > 0


def test_a_record_of_a_pydedup_with_one_memfd_a_tier_is_read(arena):
    """An older pydedup named its frame store's one memfd in a record, not
    a list of them (the stripes): a reader of today reads it."""
    b = arena.array(np.arange(50_000, dtype=np.float64))
    c = arena.array(b)
    arena.merge()
    assert np.array_equal(b, c)
    (record,) = publish.published(os.getpid())
    lo, hi, inodes = record["smaps_of"]
    record["smaps_of"] = [lo, hi, inodes[0]]
    assert publish.stats_of(record).pss_bytes == arena.stats().pss_bytes > 0


def test_a_process_smaps_is_read_once_for_all_its_arenas(arena, monkeypatch, capsys):
    with contextlib.closing(pydedup.Arena()) as other:
        arrays = [each.array(np.zeros(50_000)) for each in (arena, other)]
        for each, a in zip((arena, other), arrays):
            a.fill(0.0)
            each.merge()
        read = []
        measure = procfs.read_smaps
        monkeypatch.setattr(procfs, "read_smaps", lambda pid=None: read.append(pid) or measure(pid))
        assert main(["stats", str(os.getpid()), "--wait", "0"]) == 0
    out = capsys.readouterr().out
    assert read == [os.getpid()]
    assert out.count("(PSS and mappings: now)") == 2 and "unknown" not in out


NOT_DUMPABLE = """
import ctypes, sys
import numpy as np
import pydedup
arena = pydedup.Arena()
a = arena.array(np.zeros(50_000))
a.fill(0.0)
arena.merge()
if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:   # PR_SET_DUMPABLE: 0
    sys.exit("prctl failed")
print("merged", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads the smaps of every process")
def test_a_process_whose_smaps_cannot_be_read_shows_the_other_counters(capsys):
    """A process that is not dumpable hides /proc/PID/smaps from its own
    user: `pydedup stats` shows the counters not made from it, and says so."""
    with subprocess.Popen([sys.executable, "-c", NOT_DUMPABLE], cwd=ROOT, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout.readline() == "merged\n"
            assert main(["stats", str(child.pid), "--wait", "0"]) == 0
        finally:
            child.stdin.close()
    out = capsys.readouterr().out
    assert f"/proc/{child.pid}/smaps cannot be read" in out
    table = {name: value.strip() for name, _, value in
             (line.partition(" ") for line in out.split("\n\n")[0].splitlines()[3:])}
    assert table["zero_pages"] == "98" and table["pages_in_use"] == "98"
    assert table["pss_bytes"] == table["mappings"] == table["general_profit"] == "None"


def test_a_forked_child_leaves_the_parent_file(arena, own_directory):
    arena.stats()
    parent_files = os.listdir(own_directory)
    pid = os.fork()
    if pid == 0:
        try:
            arena.stats()                    # the child's own file...
            arena.close()                    # ...removed; the parent's stays
            os._exit(0 if os.listdir(own_directory) == parent_files else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    records = publish.published()
    assert [r["pid"] for r in records] == [os.getpid()]


def test_files_of_dead_processes_are_ignored_and_removed(own_directory):
    own_directory.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = own_directory / f"{dead}-1.json"
    stale.write_text(json.dumps({"pid": int(dead)}))
    assert publish.published() == []
    assert not stale.exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pydedup", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_help_goes_to_stdout_and_succeeds():
    done = run_cli("--help")
    assert done.returncode == 0 and done.stderr == ""
    assert "usage" in done.stdout and "demo" in done.stdout and "stats" in done.stdout


def test_unknown_command_says_so_and_prints_usage(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nope'" in err and "demo" in err and "stats" in err


@pytest.mark.parametrize("args, message", [
    (["bench", "--size", "abc"], "not a size: 'abc'"),
    (["bench", "--size", "-5"], "must be positive"),
    (["bench", "--size", "0"], "must be positive"),
    (["stats", "--wait", "-1"], "seconds must be >= 0"),
    (["stats", "--wait", "nan"], "seconds must be >= 0"),
    (["stats", "--wait", "soon"], "not a number of seconds"),
])
def test_bad_options_are_one_clear_line_not_a_traceback(args, message):
    done = run_cli(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
