"""Type stubs of pydedup._handler, the NEP 49 numpy memory handler
(_handler.pyx): what Python sees of it."""
from typing import Any

from pydedup.pages import Pages

class Allocator:
    """The numpy handler of one arena. `capsule` is what numpy is given."""

    @property
    def capsule(self) -> Any: ...
    def __init__(self, pages: Pages, base: int, npages: int, page_size: int,
                 threshold: int, cache_limit: int) -> None: ...
    threshold: int
    cache_limit: int
    cache_base: int
    cache_auto: bool
    def trim(self) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def counters(self) -> dict[str, int]: ...

def set_handler(handler: Any) -> Any:
    """numpy's PyDataMem_SetHandler for the current context: returns the
    handler it replaces (a PyCapsule)."""

def current_handler() -> Any:
    """numpy's handler of the current context (a PyCapsule)."""

def default_handler() -> Any: ...
