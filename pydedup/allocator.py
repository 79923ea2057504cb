"""numpy's own allocations in an arena (NEP 49): code that calls np.zeros,
scipy, np.load or matmul gets its arrays deduplicated unchanged.

    with pydedup.arena() as ar:          # or pydedup.arena(existing_arena)
        b = np.zeros((50_000, 50_000))   # arena pages: untouched, no memory
        ar.merge()

numpy keeps its current memory handler in a context variable. So a block
covers the code running in its context: the thread that entered it, and
asyncio tasks created inside it (they copy the context). Threads started
inside it begin with an empty context, hence numpy's default allocator;
install() covers them too.

Arrays keep the handler they were made with: they work after the block, and
the arena's memory lives until the last of them is freed."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Callable

from pydedup._handler import set_handler
from pydedup.arena import Arena


@contextlib.contextmanager
def arena(existing: Arena | None = None, **knob_values: Any) -> Iterator[Arena]:
    """Inside the block, numpy allocations of at least `alloc_threshold`
    bytes take pages of `existing`, or of a new Arena(**knob_values) that is
    closed at the end of the block (no more arrays; live ones stay). Yields
    the arena. Blocks nest; the end of one restores the handler before it."""
    ar = _arena_for(existing, knob_values)
    previous = set_handler(ar._numpy_handler())
    try:
        yield ar
    finally:
        set_handler(previous)
        if existing is None:
            ar.close()
        # An existing arena keeps its cache for the next block: flushing here
        # made a benchmark that enters a block per round 1.10x slower, not 0.8x.


def _arena_for(existing: object, knob_values: dict[str, Any]) -> Arena:
    if existing is None:
        return Arena(**knob_values)
    if not isinstance(existing, Arena):
        raise TypeError(f"pydedup.arena() takes a pydedup.Arena, not {type(existing).__name__}")
    if knob_values:
        raise TypeError("knobs are for a new arena; set them as attributes of an existing one")
    if existing.closed:
        raise ValueError("the arena is closed")
    return existing


# -- process-wide ---------------------------------------------------------------

class _Installed:
    def __init__(self, ar: Arena, made_here: bool, previous: Any):
        self.arena = ar
        self.made_here = made_here
        self.previous = previous          # the handler install() replaced
        self.handler = ar._numpy_handler()


_installed: _Installed | None = None
_install_lock = threading.Lock()
# Private to threading, but where a new thread starts before run(); if a
# Python lacks it, install() says so instead of covering threads silently.
_thread_bootstrap: Callable[[threading.Thread], None] | None = getattr(
    threading.Thread, "_bootstrap_inner", None)


def _bootstrap_with_handler(thread: threading.Thread) -> None:
    """threading.Thread's start, in the new thread: set the handler first."""
    installed = _installed
    if installed is not None:
        set_handler(installed.handler)
    _thread_bootstrap(thread)  # type: ignore[misc]  # install() checked it


def install(arena: Arena | None = None) -> Arena:
    """Put numpy's allocations in `arena` (default: a new Arena, closed by
    uninstall()) from now on: in the calling context, and in every
    threading.Thread started afterwards (their start is patched, since numpy
    has no process-wide handler). Not covered: threads that were already
    running, and threads not started through threading (_thread, C code).
    Returns the arena."""
    global _installed
    with _install_lock:
        if _installed is not None:
            raise RuntimeError("pydedup is already installed; call pydedup.uninstall() first")
        if _thread_bootstrap is None:
            raise RuntimeError("install() cannot reach new threads on this Python "
                               "(threading.Thread._bootstrap_inner is gone); use pydedup.arena()")
        ar = _arena_for(arena, {})
        installed = _Installed(ar, arena is None, None)
        installed.previous = set_handler(installed.handler)
        _installed = installed
        threading.Thread._bootstrap_inner = _bootstrap_with_handler  # type: ignore[attr-defined]
    return ar


def uninstall() -> None:
    """Undo install(): the calling context gets back the handler install()
    replaced, new threads start with numpy's default; an arena install()
    made is closed (live arrays stay). Threads still running keep allocating
    in the arena until they end."""
    global _installed
    with _install_lock:
        installed = _installed
        if installed is None:
            raise RuntimeError("pydedup is not installed")
        threading.Thread._bootstrap_inner = _thread_bootstrap  # type: ignore[attr-defined]
        _installed = None
        set_handler(installed.previous)
        if installed.made_here:
            installed.arena.close()
        else:
            installed.arena._flush_allocator_cache()


def installed_arena() -> Arena | None:
    """The arena install() put numpy's allocations in, or None."""
    installed = _installed
    return None if installed is None else installed.arena
