"""Build of pydedup's Cython core. PYDEDUP_DEBUG=1 builds it with assertions
and bounds checks on, and with the invariant checker (_check.pxi) run after
every operation of an arena."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("PYDEDUP_DEBUG") == "1"

core = Extension(
    "pydedup._fast",
    ["pydedup/_fast.pyx"],
    include_dirs=["pydedup"],
    extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
    undef_macros=["NDEBUG"] if debug else [],
    define_macros=[("PYDEDUP_DEBUG_CHECKS", "1")] if debug else [],
)

setup(
    ext_modules=cythonize(
        [core],
        include_path=["pydedup"],
        compiler_directives={"boundscheck": debug, "wraparound": False},
    )
)
