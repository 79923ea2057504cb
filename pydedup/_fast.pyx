# cython: language_level=3, wraparound=False, cdivision=True
# (boundscheck comes from setup.py: on in the debug build, off otherwise)
"""The core of pydedup: the rmap items, the frame store and its stable tree,
the merge pass, and the buffer that numpy arrays are made from.

Everything here runs under the arena's lock, which pydedup/pages.py holds;
the loops over pages and the system calls run without the GIL."""
from libc.errno cimport EBADF, EINVAL, ENOENT, ENOMEM, ENOTTY, EOPNOTSUPP
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, realloc, free, qsort
from libc.string cimport memcmp, memcpy, memset
from cpython.buffer cimport PyBUF_FORMAT
from pydedup._os cimport *

# The parts, in include order (_fast.pxd): each calls only the parts before
# it (tests/test_core_source.py).
include "_base.pxi"
include "_numa.pxi"
include "_frames.pxi"
include "_shared.pxi"
include "_pagemap.pxi"
include "_maps.pxi"
include "_track.pxi"
include "_barrier.pxi"
include "_remap.pxi"
include "_huge.pxi"
include "_budget.pxi"
include "_hash.pxi"
include "_scan.pxi"
include "_core.pxi"
include "_block.pxi"
include "_check.pxi"
