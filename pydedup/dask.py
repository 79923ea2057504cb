"""A Dask preload: every worker deduplicates, and the cluster sees the saving.

    dask worker tcp://scheduler:8786 --preload pydedup.dask --preload-nanny pydedup.dask
    LocalCluster(n_workers=4, preload=["pydedup.dask"], preload_nanny=["pydedup.dask"])

In a worker, dask_setup() installs an arena (pydedup.worker_init()) so that
the numpy arrays tasks make live in it, with knobs from Dask's configuration
(`pydedup.<knob>`: `pydedup: {run: 1, sleep-millisecs: 50}` in a YAML file,
or DASK_PYDEDUP__SLEEP_MILLISECS=50), else PYDEDUP_<KNOB>, else the defaults,
the background scanner on. It makes the worker report its memory as PSS
(pydedup.workers.PssMeter): distributed reads a worker's memory through
`SystemMonitor.get_process_memory()` both for the `memory` metric the
scheduler and dashboard see and for the memory manager's spill and pause
decisions, so the worker's monitor gets the meter as that method. In a
nanny, it makes the terminate check (`distributed.worker.memory.terminate`)
read the worker process's PSS instead of its RSS.

The workers of a cluster on one machine share a frame store (issue 16),
named after the scheduler's address (cluster_store()), so data every worker
holds is kept once: `pydedup: {shared: name}` names another, `''` none;
PYDEDUP_SHARED does the same.

Tasks run in the worker's thread pool under a copy of the context of the
asyncio task that runs them (distributed.utils.run_in_executor_with_context),
and numpy's handler is a context variable: so the handler is set in the
preload's own context, which every later task of the worker's event loop
copies, and again in each task's context by the worker's execute().

`pydedup.dask.stats()` (`client.run(pydedup.dask.stats)`) returns the
worker's counters; the worker's `pydedup` metric (in the scheduler's
WorkerState.metrics) carries the same, taken at most every 10 s. Without
the preload, Dask is plain; where pydedup cannot work the worker logs why
once and runs plain, still reporting PSS.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from typing import Any, Callable

import dask.config

from pydedup import procfs, workers
from pydedup._handler import set_handler
from pydedup.allocator import installed_arena

logger = logging.getLogger("distributed.pydedup")   # in the worker's log, as configured by Dask

METRICS_INTERVAL = 10.0           # seconds: the worker metric's counters are at most this old

_meter: workers.PssMeter | None = None   # this worker's, once dask_setup() ran


def dask_setup(server: Any) -> None:
    """Called by distributed for `--preload pydedup.dask` (a Worker) and
    `--preload-nanny pydedup.dask` (a Nanny)."""
    from distributed import Nanny, Worker
    if isinstance(server, Worker):
        _setup_worker(server)
    elif isinstance(server, Nanny):
        _setup_nanny(server)
    else:
        raise TypeError(f"pydedup.dask is a preload for workers and nannies, not {type(server).__name__}")


def knobs_from_config() -> dict[str, Any]:
    """The knobs set in Dask's configuration (`pydedup.<knob>`, dashes or
    underscores), by knob name."""
    section = dask.config.get("pydedup", default=None) or {}
    if not isinstance(section, dict):
        raise ValueError(f"Dask configuration 'pydedup' must be a mapping of knobs, not {section!r}")
    return {str(name).replace("-", "_"): value for name, value in section.items()}


def stats() -> dict[str, Any]:
    """This worker's pydedup counters, for `client.run(pydedup.dask.stats)`:
    `installed` (whether its numpy allocations go to an arena), `reason`
    (why not, if not), the process's `process_pss_bytes` and
    `process_rss_bytes`, `memory_reported` (what the worker reports to Dask),
    and, with an arena, every counter of its stats() and its allocator's
    (`allocator_` prefixed)."""
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "installed": False,
        "reason": workers.unavailable(),
        "process_pss_bytes": procfs.process_pss(),
        "process_rss_bytes": procfs.process_rss(),
        "memory_reported": _meter() if _meter is not None else None,
    }
    arena = installed_arena()
    if arena is not None and not arena.closed:
        out["installed"] = True
        out.update(arena.stats().as_dict())
        out.update({f"allocator_{k}": v for k, v in arena.allocator_stats().items()})
    elif out["reason"] is None:
        out["reason"] = "pydedup.worker_init() has not run in this process"
    return out


# -- the worker ---------------------------------------------------------------------

def cluster_store(scheduler_address: str) -> str:
    """The shared store the workers of one cluster name (issue 16): those on
    one machine then keep data they all hold once. From the scheduler's
    address, so another cluster on the machine has its own."""
    return "dask-" + hashlib.sha1(scheduler_address.encode()).hexdigest()[:16]


def _worker_knobs(worker: Any) -> dict[str, Any]:
    """The knobs from Dask's configuration, and `shared` the cluster's store
    unless the configuration or PYDEDUP_SHARED names one ('' for none)."""
    values = knobs_from_config()
    address = getattr(getattr(worker, "scheduler", None), "address", None)
    if "shared" not in values and "PYDEDUP_SHARED" not in os.environ and isinstance(address, str):
        values["shared"] = cluster_store(address)
    return values


def _setup_worker(worker: Any) -> None:
    global _meter
    arena = workers.worker_init(**_worker_knobs(worker))
    if arena is not None:
        # This context (the worker's start) is what the event loop's later
        # tasks copy; worker_init() may have run in another one before.
        set_handler(installed_arena_handler())
        worker.execute = _executing_in_arena(worker.execute)
    _meter = workers.PssMeter()
    worker.monitor.get_process_memory = _meter
    worker.metrics["pydedup"] = _cached(stats, METRICS_INTERVAL)
    logger.info("pydedup: worker %s (pid %d) %s, reporting memory as PSS", worker.address,
                os.getpid(), "allocates in an arena" if arena is not None else "runs plain")


def installed_arena_handler() -> Any:
    """numpy's handler for the installed arena."""
    arena = installed_arena()
    if arena is None:
        raise RuntimeError("pydedup is not installed")
    return arena._numpy_handler()


def _executing_in_arena(execute: Callable[..., Any]) -> Callable[..., Any]:
    """Worker.execute, setting numpy's handler first in the asyncio task's
    context that run_in_executor_with_context copies into the task thread."""
    @functools.wraps(execute)
    async def execute_in_arena(*args: Any, **kwargs: Any) -> Any:
        if installed_arena() is not None:
            set_handler(installed_arena_handler())
        return await execute(*args, **kwargs)
    return execute_in_arena


def _cached(read: Callable[[], dict[str, Any]], seconds: float) -> Callable[[Any], dict[str, Any]]:
    """A worker metric (called with the worker at every heartbeat) that
    calls `read` at most every `seconds`: an arena's stats() walks it."""
    last: list[Any] = [None, -float("inf")]

    def metric(worker: Any) -> dict[str, Any]:
        now = time.monotonic()
        if now - last[1] >= seconds:
            last[0], last[1] = read(), now
        return dict(last[0])
    return metric


# -- the nanny ----------------------------------------------------------------------

def _setup_nanny(nanny: Any) -> None:
    callback = nanny.periodic_callbacks.get("memory_monitor")
    if callback is None:                      # no memory limit, or terminate: false
        logger.info("pydedup: nanny %s has no terminate check to measure as PSS", nanny.address)
        return
    callback.callback = functools.partial(_terminate_check, nanny, {})


def _terminate_check(nanny: Any, meters: dict[int, workers.PssMeter]) -> None:
    """distributed's NannyMemoryManager.memory_monitor (2024-2026), with the
    worker's PSS for its RSS: terminate the worker once it is over
    `distributed.worker.memory.terminate` of its limit, kill it if it is
    still there at the next check."""
    from distributed.core import Status
    manager = nanny.memory_manager
    process = getattr(nanny.process, "process", None)
    if nanny.status != Status.running or process is None or process.pid is None:
        return
    pid = process.pid
    if pid not in meters:
        meters.clear()
        meters[pid] = workers.PssMeter(pid)
    limit = manager.memory_limit * manager.memory_terminate_fraction
    try:
        memory = meters[pid]()
        if memory > limit:                    # an estimate between readings: confirm
            memory = meters[pid].read_pss()
    except OSError:                           # the worker has just ended
        return
    if memory <= limit:
        return
    nanny_logger = logging.getLogger("distributed.nanny.memory")
    if manager._last_terminated_pid != pid:
        nanny_logger.warning(
            f"Worker {nanny.worker_address} (pid={pid}) exceeded "
            f"{manager.memory_terminate_fraction * 100:.0f}% memory budget (PSS). Restarting...")
        manager._last_terminated_pid = pid
        nanny.log_event("worker-restart-memory", {"worker": nanny.worker_address, "pid": pid,
                                                  "pss": memory})
        process.terminate()
    else:
        nanny_logger.warning(f"Worker {nanny.worker_address} (pid={pid}) is slow to terminate; "
                             "killing it")
        process.kill()
