"""Seams for tests: what a test of pydedup, or of code built on it, may see
and drive inside an arena without reaching into the Arena's private
attributes. The one place that does reach into them is this module, so the
Arena can change inside while tests keep working.

    from pydedup import testing

    testing.check_invariants(arena)       # InvariantError naming what is broken
    merged, sleep = testing.scan_step(arena)

Every function but address_range() takes an open Arena and raises
ValueError("the arena is closed") for a closed one. Nothing here is needed
to use pydedup, and the core (`core()`) has no compatibility promise: it is
for tests that check kernel effects (the frame store's memfd, its tiers, the
fork fence). docs/testing.md lists the seams.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydedup._fast import DEBUG_CHECKS, InvariantError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from pydedup._fast import Core
    from pydedup.arena import Arena
    from pydedup.pages import Pages

__all__ = ["DEBUG_CHECKS", "InvariantError", "address_range", "check_invariants", "core",
           "free_pages", "page_range", "pages", "scan_step", "set_debug_checks", "simulate_numa"]


def pages(arena: Arena) -> Pages:
    """The arena's pages (pydedup/pages.py: the core, the free extents and
    their lock). It lives while the arena or any of its arrays does."""
    found = arena._pages
    if found is None:
        raise ValueError("the arena is closed")
    return found


def check_invariants(arena: Arena) -> None:
    """Walk every record of the core, the frame store, the process's
    mappings and the free extents; raise InvariantError (an AssertionError)
    naming the invariant and the page or frame that breaks it."""
    pages(arena).check_invariants()


def set_debug_checks(arena: Arena, on: bool) -> None:
    """From now on, check the invariants after every operation on the arena
    (on=True, what a PYDEDUP_DEBUG=1 build does from the start), or never
    (on=False: for a test that breaks the arena on purpose)."""
    pages(arena).debug_checks = on


def core(arena: Arena) -> Core:
    """The arena's Cython core (pydedup._fast.Core), for tests that check
    what the kernel sees: its frame-store memfds and tiers, the fork fence,
    whether writes are tracked. Call its methods only while no other thread
    uses the arena (they run under the arena's lock otherwise)."""
    return pages(arena).core


def scan_step(arena: Arena) -> tuple[int, float]:
    """One step of the background scan, as the scanner thread takes it:
    (pages it merged or zeroed, seconds the scanner would sleep next)."""
    pages(arena)
    return arena._scan_step()


def page_range(arena: Arena, array: Any) -> tuple[int, int]:
    """(first arena page, page count) that the array's bytes span."""
    pages(arena)
    return arena._page_range(array)


def address_range(arena: Arena) -> tuple[int, int]:
    """[lo, hi): the addresses the arena reserved (also once it is closed:
    its arrays may still live there)."""
    return arena._lo, arena._hi


def free_pages(arena: Arena) -> int:
    """Arena pages that no array holds (nor numpy's allocator caches)."""
    return pages(arena).extents.free_pages


def simulate_numa(arena: Arena, nnodes: int) -> npt.NDArray[np.uint16]:
    """On a machine of one node: the arena believes in `nnodes` nodes and
    takes each page's node from the array returned (writable, one entry a
    page, all 0 at first) instead of the kernel; node= of the constructors
    writes it."""
    pages(arena)
    return arena._simulate_numa(nnodes)

