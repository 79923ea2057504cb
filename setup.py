"""Build of pydedup's Cython core and of its numpy memory handler.
PYDEDUP_DEBUG=1 builds them with assertions and bounds checks on, and the
core with the invariant checker (_check.pxi) run after every operation of
an arena."""
import os

import numpy
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

# numpy's memory handler (NEP 49) in an extension of its own: only it needs
# numpy's C API. Built against numpy 2's headers for numpy 1.22 or later
# (PyDataMem_SetHandler's first release).
handler = Extension(
    "pydedup._handler",
    ["pydedup/_handler.pyx"],
    include_dirs=["pydedup", numpy.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION"),
                   ("NPY_TARGET_VERSION", "NPY_1_22_API_VERSION")],
    extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
    undef_macros=["NDEBUG"] if debug else [],
)

setup(
    ext_modules=cythonize(
        [core, handler],
        include_path=["pydedup"],
        # The .pyx headers leave boundscheck out, so that this one decides.
        compiler_directives={"boundscheck": debug, "wraparound": False},
    )
)
