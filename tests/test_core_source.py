"""The core's source keeps its shape (uvloop's tests/test_sourcecode.py):
its parts are included in an order in which each calls only the parts
before it, a part calls another through the prototypes that part's .pxd
declares and not through its record's fields, the debug build's bounds
checks are not switched off by a file header, and cython-lint passes."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE = ROOT / "pydedup"

# Records other parts reach only through the owner's functions (Core's
# fields: core.<field>). Core itself (_core.pxi), which holds them, and the
# invariant checker (_check.pxi), which reads them, may touch their fields.
OWNED_RECORDS = {
    "store": "_frames.pxi",
    "tables": ("_pagemap.pxi", "_maps.pxi", "_track.pxi"),
    "wb": "_barrier.pxi",
    "nodes": "_numa.pxi",
    "scan": "_scan.pxi",
    "huge": "_huge.pxi",
}
HOLDERS = ("_core.pxi", "_check.pxi")


def include_order(pyx_text):
    return re.findall(r'^include "([\w.]+)"', pyx_text, re.M)


def code_only(text):
    """The text without comments and string literals (docstrings name
    functions of later parts, and that is fine)."""
    text = re.sub(r'"""(?:.|\n)*?"""', lambda m: "\n" * m.group(0).count("\n"), text)
    text = re.sub(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'', '""', text)
    return re.sub(r"#.*", "", text)


def cdef_functions(text):
    """Names of the module-level cdef functions a file defines or declares."""
    return set(re.findall(r"^cdef\s+(?:inline\s+)?[\w\s\*]*?\b(\w+)\s*\(", code_only(text), re.M))


def defined_functions(text):
    """Module-level cdef functions with a body (a line ending in ':')."""
    names = set()
    for m in re.finditer(r"^cdef\s+(?:inline\s+)?[\w\s\*]*?\b(\w+)\s*\(", code_only(text), re.M):
        depth, i, src = 0, m.end() - 1, code_only(text)
        while True:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
            if depth == 0:
                break
        rest = src[i:src.index("\n", i)]
        if rest.rstrip().endswith(":"):
            names.add(m.group(1))
    return names


def upward_calls(parts):
    """(caller file, callee, callee file) for every call of a cdef function
    defined in a part included after the caller. `parts`: [(file, text)],
    in include order."""
    home = {}
    for name, text in parts:
        for function in defined_functions(text):
            home.setdefault(function, name)
    position = {name: i for i, (name, _) in enumerate(parts)}
    found = []
    for name, text in parts:
        for call in sorted(set(re.findall(r"(?<![\w.])(\w+)\s*\(", code_only(text)))):
            callee = home.get(call)
            if callee is not None and position[callee] > position[name]:
                found.append((name, call, callee))
    return found


def read_parts():
    order = include_order((CORE / "_fast.pyx").read_text())
    return [(name, (CORE / name).read_text()) for name in order]


def test_the_parts_are_included_base_first():
    order = include_order((CORE / "_fast.pyx").read_text())
    assert order[0] == "_base.pxi"
    assert set(order) == {p.name for p in CORE.glob("*.pxi")}, "every .pxi is included once"
    pxd_order = include_order((CORE / "_fast.pxd").read_text())
    parts_with_pxd = [name[:-4] + ".pxi" for name in pxd_order]
    assert [name for name in order if name in parts_with_pxd] == parts_with_pxd, \
        "the .pxd files are included in the order of their parts"


def test_no_part_calls_a_part_included_after_it():
    assert upward_calls(read_parts()) == []


def test_the_check_catches_an_upward_call():
    # The checker itself, on two made-up parts: the lower one calls the upper.
    lower = 'cdef int low(Core c) noexcept nogil:\n    """high() is fine here"""\n    return high(c)\n'
    upper = "cdef int high(Core c) noexcept nogil:\n    return 1  # low(c) in a comment\n"
    assert upward_calls([("_a.pxi", lower), ("_b.pxi", upper)]) == [("_a.pxi", "high", "_b.pxi")]
    assert upward_calls([("_b.pxi", upper), ("_a.pxi", lower)]) == []


def test_calls_between_parts_go_through_a_pxd_prototype():
    parts = read_parts()
    declared = set()
    for pxd in CORE.glob("*.pxd"):
        declared |= cdef_functions(pxd.read_text())
    home = {f: name for name, text in parts for f in defined_functions(text)}
    missing = set()
    for name, text in parts:
        for call in set(re.findall(r"(?<![\w.])(\w+)\s*\(", code_only(text))):
            callee = home.get(call)
            if callee is not None and callee != name and call not in declared:
                missing.add(f"{name} calls {call} of {callee}")
    assert not missing, sorted(missing)


def test_parts_reach_other_records_only_through_their_functions():
    trespass = []
    for name, text in read_parts():
        if name in HOLDERS:
            continue
        for record, owners in OWNED_RECORDS.items():
            owners = (owners,) if isinstance(owners, str) else owners
            if name in owners:
                continue
            for line_no, line in enumerate(code_only(text).splitlines(), 1):
                if re.search(rf"\bc\.{record}\.", line):
                    trespass.append(f"{name}:{line_no}: {line.strip()}")
    assert trespass == []


def test_the_debug_build_decides_bounds_checks():
    # A `# cython: boundscheck=False` header overrides setup.py's directive,
    # and PYDEDUP_DEBUG=1 would build without bounds checks.
    for pyx in CORE.glob("*.pyx"):
        header = [line for line in pyx.read_text().splitlines() if line.startswith("# cython:")]
        assert not any("boundscheck" in line for line in header), pyx.name
    assert '"boundscheck": debug' in (ROOT / "setup.py").read_text()


def test_the_core_calls_the_page_allocator_through_page_owner():
    from pydedup._fast import Block, PageOwner
    from pydedup.pages import Pages

    class Recorder(PageOwner):
        def __init__(self):
            self.given_back = []

        def give_back(self, first, npages):
            self.given_back.append((first, npages))

    pages = Pages(16)
    owner = Recorder()
    pages.core.adopt(2, 3)          # not through the allocator: the Recorder owns them
    block = Block(pages.core, owner, 2, 3, 100)
    del block
    assert owner.given_back == [(2, 3)]
    assert issubclass(Pages, PageOwner)
    with pytest.raises(TypeError):
        Block(pages.core, object(), 0, 1, 1)     # an owner that is no PageOwner
    with pytest.raises(NotImplementedError):
        PageOwner().take_pages(1)


def test_numpy_s_handler_takes_only_a_page_owner():
    from pydedup._handler import Allocator
    with pytest.raises(TypeError):
        Allocator(object(), 0, 16, 4096, 1 << 20, 0)
    source = (CORE / "_handler.pyx").read_text()
    assert '"take_pages"' not in source and '"give_back"' not in source, "no call by method name"
