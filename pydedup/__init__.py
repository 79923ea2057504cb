"""pydedup: kernel samepage merging inside one process, for numpy arrays.

    arena = pydedup.Arena()
    m = arena.zeros((20_000, 20_000))
    ...
    arena.merge()

    with pydedup.arena() as arena:       # numpy's own allocations go to the arena
        m = np.zeros((20_000, 20_000))
    arena.merge()                        # the arena outlives the block; close() ends it
"""
from typing import Any

from pydedup.arena import Arena
# After the submodule pydedup.arena: the name pydedup.arena is the function.
from pydedup.allocator import FallbackWarning, arena, install, installed_arena, uninstall
from pydedup.knobs import KNOBS
from pydedup.stats import ArenaStats, ArrayStats, MergeReport, UnmergeReport

__all__ = ["Arena", "ArenaStats", "ArrayStats", "FallbackWarning", "KNOBS", "MergeReport",
           "UnmergeReport", "arena", "features", "install", "installed_arena", "uninstall", "worker_init"]
__version__ = "0.1.0"


def worker_init(**knob_values: Any) -> Arena | None:
    """Install an arena for this worker process of a pool, the background
    scanner on; see pydedup.workers.worker_init. (Imported when called: the
    module and its logging stay out of processes that never use a pool.)"""
    from pydedup.workers import worker_init as init
    return init(**knob_values)


def features() -> dict:
    """What this kernel offers pydedup, as found by probing it."""
    from pydedup import numa, procfs
    from pydedup._fast import userfaultfd_allowed
    from pydedup.pages import Pages
    core = Pages(16).core
    return {
        "page_size": procfs.PAGE_SIZE,
        "pagemap_scan": core.has_pagemap_scan,
        "procmap_query": core.has_procmap_query,
        "userfaultfd": userfaultfd_allowed(),
        "max_map_count": procfs.max_map_count(),
        "numa_nodes": len(numa.topology().nodes),
    }
