"""The tools as tests (uvloop's tests/test_sourcecode.py): ruff, mypy and
cython-lint pass over the tree with the configuration in pyproject.toml, and code that uses
pydedup type-checks under `mypy --strict` and sees real types, not Any.

ruff, mypy and cython-lint come with the `test` extra; where they are missing the tests
skip, except in CI, where that is a failure."""
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(module):
    """`python -m module`, or a skip (a failure in CI) if it is not installed."""
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    return [sys.executable, "-m", module]


def run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


def test_ruff_passes():
    done = run([*tool("ruff"), "check", "--no-cache", ROOT], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cython_lint_passes():
    """Over every .pyx, .pxi and .pxd of the core, configured in pyproject.toml."""
    tool("cython_lint")
    core = os.path.join(ROOT, "pydedup")
    files = sorted(os.path.join(core, f) for f in os.listdir(core) if f.endswith((".pyx", ".pxi", ".pxd")))
    lint = "import sys; from cython_lint.cython_lint import main; sys.exit(main(sys.argv[1:]))"
    done = run([sys.executable, "-c", lint, *files], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_finds_what_it_is_configured_to(tmp_path):
    """The test above can fail: the configured rules catch an unused import,
    a bugbear finding and an import out of order."""
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\n\ndef f(x=[]):\n    return x\n")
    done = run([*tool("ruff"), "check", "--no-cache", "--config",
                os.path.join(ROOT, "pyproject.toml"), str(bad)], cwd=tmp_path)
    assert done.returncode == 1
    for rule in ("F401", "B006", "I001"):
        assert rule in done.stdout, done.stdout


@pytest.mark.slow
def test_mypy_passes_over_the_package():
    done = run([*tool("mypy"), "--cache-dir", os.path.join(ROOT, ".mypy_cache")], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


# What a user writes. reveal_type() makes mypy print the type it sees.
USER_CODE = """
    from typing import Any

    import numpy as np
    import numpy.typing as npt

    import pydedup


    def dedup(rows: npt.NDArray[np.float64]) -> int:
        with pydedup.Arena(size=1 << 26, max_page_sharing=64) as arena:
            a = arena.zeros((8, 512))
            b = arena.array(rows)
            arena.full_like(b, 1.5, node=None)
            arena.max_page_sharing = 128
            report = arena.merge()
            stats = arena.stats()
            one = arena.stats(a)
            reveal_type(arena)
            reveal_type(a)
            reveal_type(report)
            reveal_type(report.pages_merged)
            reveal_type(report.skipped)
            reveal_type(stats.pages_sharing)
            reveal_type(stats.barrier)
            reveal_type(one.bytes_saved)
            reveal_type(arena.unmerge().pages_unmerged)
            reveal_type(arena.max_page_sharing)
            reveal_type(arena.use_zero_pages)
            return report.pages_merged + stats.pages_sharing + one.pages_merged


    with pydedup.arena(alloc_threshold=1 << 20) as ar:
        reveal_type(ar)
        reveal_type(pydedup.installed_arena())
        x: npt.NDArray[Any] = np.zeros(10)
        ar.unmergeable(x)
    """

REVEALED = [
    "pydedup.arena.Arena",
    "numpy.ndarray[...]",          # its shape parameter is spelt differently by numpy versions
    "pydedup.stats.MergeReport",
    "int",
    "dict[str, int]",
    "int",
    "str",
    "int",
    "int",
    "int",
    "bool",
    "pydedup.arena.Arena",
    "pydedup.arena.Arena | None",
]


def mypy_strict(tmp_path, code):
    """mypy --strict on `code`, with pydedup found as an installed package
    is: its own modules are read (and their types used), their internals'
    messages are not the user's."""
    (tmp_path / "user.py").write_text(textwrap.dedent(code))
    (tmp_path / "mypy.ini").write_text("[mypy]\nstrict = True\n\n[mypy-pydedup.*]\nignore_errors = True\n")
    env = dict(os.environ, MYPYPATH=ROOT)   # an editable install hides it from mypy otherwise
    return run([*tool("mypy"), "--config-file", "mypy.ini", "--cache-dir",
                os.path.join(ROOT, ".mypy_cache", "user"), "user.py"], cwd=tmp_path, env=env)


@pytest.mark.slow
def test_user_code_type_checks_strictly_and_sees_real_types(tmp_path):
    done = mypy_strict(tmp_path, USER_CODE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error:" not in done.stdout, done.stdout
    revealed = [line.split('Revealed type is "', 1)[1].rstrip('"').replace("builtins.", "")
                for line in done.stdout.splitlines() if "Revealed type is" in line]
    revealed = ["numpy.ndarray[...]" if r.startswith("numpy.ndarray[") else r for r in revealed]
    assert revealed == REVEALED, done.stdout


@pytest.mark.slow
def test_mypy_strict_catches_a_misused_counter(tmp_path):
    """The test above can fail: with real types a wrong use is an error."""
    done = mypy_strict(tmp_path, """
        import pydedup

        with pydedup.Arena(size=1 << 26) as arena:
            name: str = arena.merge().pages_merged
            arena.stats().no_such_counter
        """)
    assert done.returncode == 1, done.stdout
    assert 'Incompatible types in assignment (expression has type "int", variable has type "str")' \
        in done.stdout, done.stdout
    assert '"ArenaStats" has no attribute "no_such_counter"' in done.stdout, done.stdout


def test_the_stubs_ship_with_the_package():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert '"*.pyi"' in f.read()
    for stub in ("_fast.pyi", "_handler.pyi", "py.typed"):
        assert os.path.exists(os.path.join(ROOT, "pydedup", stub)), stub


def test_the_stubs_name_what_the_compiled_modules_export():
    """Every public name of _fast and _handler is in its stub, and the
    stub promises nothing they lack (methods and properties included)."""
    import ast

    from pydedup import _fast, _handler
    for module in (_fast, _handler):
        with open(os.path.join(ROOT, "pydedup", module.__name__.split(".")[-1] + ".pyi")) as f:
            tree = ast.parse(f.read())
        stubbed = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                stubbed[node.name] = node
            elif isinstance(node, ast.AnnAssign):
                stubbed[node.target.id] = node
        public = {name for name, value in vars(module).items() if not name.startswith("_")
                  and not isinstance(value, types.ModuleType)
                  and getattr(value, "__module__", module.__name__) == module.__name__}
        assert public <= set(stubbed), f"{module.__name__}: not in the stub: {public - set(stubbed)}"
        for name, node in stubbed.items():
            if name.startswith("_"):
                continue
            assert hasattr(module, name), f"the stub of {module.__name__} has {name}, the module not"
            if isinstance(node, ast.ClassDef):
                cls = getattr(module, name)
                members = {n.name if isinstance(n, ast.FunctionDef) else n.target.id
                           for n in node.body if isinstance(n, (ast.FunctionDef, ast.AnnAssign))}
                missing = {m for m in members if not m.startswith("_") and not hasattr(cls, m)}
                assert not missing, f"{module.__name__}.{name} lacks {missing}, which its stub has"
                exported = {m for m in vars(cls) if not m.startswith("_")}
                assert exported <= members, \
                    f"{module.__name__}.{name}: not in the stub: {exported - members}"


def test_pre_commit_runs_the_same_linters():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (mkdocs brings it)")
    with open(os.path.join(ROOT, ".pre-commit-config.yaml")) as f:
        config = yaml.safe_load(f)
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert set(hooks) == {"ruff", "mypy", "cython-lint"}
    assert hooks["ruff"]["entry"].startswith("python -m ruff check")
    assert hooks["mypy"]["entry"] == "python -m mypy" and not hooks["mypy"]["pass_filenames"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_no_build_product_is_tracked():
    done = run(["git", "ls-files", "pydedup"], cwd=ROOT)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = done.stdout.split()
    assert not [f for f in tracked if f.endswith((".so", ".c"))], tracked
