"""numpy's own allocations in an arena (NEP 49): code that calls np.zeros,
scipy, np.load or matmul gets its arrays deduplicated unchanged.

    with pydedup.arena() as ar:          # or pydedup.arena(existing_arena)
        b = np.zeros((50_000, 50_000))   # arena pages: untouched, no memory
    ar.merge()                           # the arena outlives the block

A block scopes where allocations go; it does not end the arena. The arena
lives while the user or its arrays hold it (merge(), stats() and the
background scanner keep working after the block); close() ends it.

numpy keeps its current memory handler in a context variable. So a block
covers the code running in its context: the thread that entered it, asyncio
tasks created inside it (they copy the context), and threads started inside
it: threading.Thread.start is hooked while a block is active (as install()
does), so a ThreadPoolExecutor's or joblib's worker started in the block
allocates in the arena too, for as long as it runs. Threads started before
the block keep their own handler.

Arrays keep the handler they were made with: they work after the block, and
the arena's memory lives until the last of them is freed.

Allocations the arena cannot take (bigger than its largest free run, the
arena closed, or made by pydedup itself inside an arena operation) go to
numpy's default allocator; allocator_stats() counts them by reason and a
FallbackWarning says so once per arena and reason, at the end of the block
(or at uninstall())."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Callable

from pydedup._handler import current_handler, set_handler
from pydedup.arena import Arena

try:
    from numpy._core.multiarray import get_handler_name
except ImportError:                           # numpy 1.x
    from numpy.core.multiarray import get_handler_name  # type: ignore[no-redef]


class FallbackWarning(UserWarning):
    """numpy allocations meant for an arena went to numpy's default allocator."""


@contextlib.contextmanager
def arena(existing: Arena | None = None, *, merge: bool = False,
          **knob_values: Any) -> Iterator[Arena]:
    """Inside the block, numpy allocations of at least `alloc_threshold`
    bytes, in this thread and in threads started inside the block, take pages
    of `existing`, or of a new Arena(**knob_values). Yields the arena, which
    outlives the block: merge() and stats() work on it afterwards, and
    close() ends it. merge=True merges at the end of a block that did not
    raise. Blocks nest; the end of one restores the handler before it."""
    ar = _arena_for(existing, knob_values)
    scope = _Scope(ar)
    try:
        yield ar
    finally:
        scope.end(stacklevel=4)
    if merge:
        ar.merge()


class _Scope:
    """One block: the handler it replaced, the thread hook it holds, and the
    allocator's fallback counters when it began (for the warning at its end)."""

    def __init__(self, ar: Arena) -> None:
        self.arena = ar
        self.fell_back = _fallbacks(ar)
        self.previous = set_handler(ar._numpy_handler())
        _hook_threads(True)

    def end(self, stacklevel: int) -> None:
        """`stacklevel`: of the user's `with`, seen from here."""
        _hook_threads(False)
        set_handler(self.previous)
        self.arena._warn_fallbacks(self.fell_back, stacklevel + 1)
        # Trimmed, not flushed: an arena keeps some cache for the next block
        # (flushing here made a benchmark that enters a block per round 1.10x
        # slower, not 0.8x), but no more than plain numpy would hold + 16 MiB.
        self.arena._trim_allocator_cache()


def _fallbacks(ar: Arena) -> dict[str, int]:
    counters = ar.allocator_stats()
    return {k: v for k, v in counters.items() if k.startswith("fell_back_")}


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


# -- threads ------------------------------------------------------------------------

# Private to threading, but where a new thread starts before run(); if a
# Python lacks them, blocks cover only their own thread and install() says so.
_thread_bootstrap: Callable[[threading.Thread], None] | None = getattr(
    threading.Thread, "_bootstrap_inner", None)
_thread_start = threading.Thread.start
_hooks = 0                    # active blocks, plus one while installed
_hooks_lock = threading.Lock()


def _hook_threads(on: bool) -> None:
    """Count a block (or install()) in or out; threading is patched while any is active."""
    global _hooks
    if _thread_bootstrap is None:
        return
    with _hooks_lock:
        _hooks += 1 if on else -1
        if _hooks == 1 and on:
            threading.Thread.start = _start_with_handler  # type: ignore[method-assign,assignment]
            threading.Thread._bootstrap_inner = _bootstrap_with_handler  # type: ignore[attr-defined]
        elif _hooks == 0:
            threading.Thread.start = _thread_start  # type: ignore[method-assign]
            threading.Thread._bootstrap_inner = _thread_bootstrap  # type: ignore[attr-defined]


def _start_with_handler(thread: threading.Thread) -> None:
    """threading.Thread.start, in the starting thread: note pydedup's handler
    if the starting context has one (a block is active there)."""
    if not getattr(thread, "_pydedup_exempt", False) and get_handler_name() == "pydedup":
        thread._pydedup_handler = current_handler()  # type: ignore[attr-defined]
    _thread_start(thread)


def _bootstrap_with_handler(thread: threading.Thread) -> None:
    """threading.Thread's start, in the new thread: set the handler first:
    the starting block's, else install()'s."""
    handler = getattr(thread, "_pydedup_handler", None)
    installed = _installed
    if handler is None and installed is not None and not getattr(thread, "_pydedup_exempt", False):
        handler = installed.handler
    if handler is not None:
        set_handler(handler)
    _thread_bootstrap(thread)  # type: ignore[misc]  # hooked only where it exists


# -- process-wide ---------------------------------------------------------------

class _Installed:
    def __init__(self, ar: Arena, made_here: bool, previous: Any):
        self.arena = ar
        self.made_here = made_here
        self.previous = previous          # the handler install() replaced
        self.handler = ar._numpy_handler()
        self.fell_back = _fallbacks(ar)


_installed: _Installed | None = None
_install_lock = threading.Lock()


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
        _hook_threads(True)
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
        _installed = None
        _hook_threads(False)
        set_handler(installed.previous)
        installed.arena._warn_fallbacks(installed.fell_back, 3)
        if installed.made_here:
            installed.arena.close()
        else:
            installed.arena._flush_allocator_cache()


def installed_arena() -> Arena | None:
    """The arena install() put numpy's allocations in, or None."""
    installed = _installed
    return None if installed is None else installed.arena
