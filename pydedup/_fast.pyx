# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The core of pydedup: the rmap items, the frame store and its stable tree,
the merge pass, and the buffer that numpy arrays are made from.

Everything here runs under the arena's lock, which pydedup/pages.py holds;
the loops over pages and the system calls run without the GIL."""
from libc.errno cimport EAGAIN, EINVAL, ENOENT, ENOMEM, ENOTTY, EOPNOTSUPP
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, realloc, free, qsort
from libc.string cimport memcmp, memcpy, memset
from cpython.buffer cimport PyBUF_FORMAT
from pydedup._os cimport *

include "_numa.pxi"
include "_frames.pxi"
include "_pagemap.pxi"
include "_track.pxi"
include "_scan.pxi"
include "_barrier.pxi"
include "_remap.pxi"
include "_maps.pxi"
include "_core.pxi"
include "_block.pxi"
include "_check.pxi"
