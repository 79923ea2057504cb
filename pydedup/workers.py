"""pydedup in the worker processes of a pool: one call per process.

    ProcessPoolExecutor(8, initializer=pydedup.worker_init)
    Parallel(n_jobs=8, backend_kwargs={"initializer": pydedup.worker_init})   # joblib/loky
    multiprocessing.Pool(8, initializer=pydedup.worker_init)

worker_init() installs an arena for the process (pydedup.install()), so
every numpy array the worker's tasks make, in any thread started from then
on, lives in it; its knobs come from the keyword arguments, else the
PYDEDUP_<KNOB> environment variables, else the defaults, but the background
scanner runs (run=1) unless either says otherwise. A process where pydedup
cannot work (no memfd, an old kernel, no room to reserve) logs why, once,
and runs plain numpy.

Memory as the engine should see it: PssMeter reads the process's PSS
(which divides a shared frame among its mappings; RSS counts it in full
every time) at a pace its cost allows, and RSS in between (pydedup.dask
reports it to the scheduler and to the worker's memory manager).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from pydedup import knobs, procfs
from pydedup.allocator import install, installed_arena
from pydedup.arena import Arena

logger = logging.getLogger("pydedup")

_lock = threading.Lock()
_failed: str | None = None        # why worker_init() runs this process plain, once said
_pid: int | None = None           # the process worker_init() installed the arena in

DROP_FRACTION = 16                # PssMeter reads PSS again when RSS fell by 1/16 since the last


def worker_init(**knob_values: Any) -> Arena | None:
    """Install an arena for this worker process (knobs: keyword arguments,
    else PYDEDUP_<KNOB>, else the defaults, with the background scanner on).
    Returns the arena, or None where pydedup cannot work here (the reason is
    logged once, on the "pydedup" logger, and by unavailable()). Calling it
    again returns the same arena; in a child forked from a process that had
    called it, it restarts the background scanner (threads do not survive a
    fork) and returns the inherited arena. Bad knob values raise ValueError
    or TypeError: they are the caller's mistake, not the machine's."""
    global _failed, _pid
    with _lock:
        arena = installed_arena()
        if arena is not None:
            if _pid != os.getpid():                       # forked after worker_init()
                _pid = os.getpid()
                if arena.run == 1:
                    arena.run = 1                          # a thread for this process
            return arena
        if _failed is not None:
            return None
        values = dict(knob_values)
        if "run" not in values and "PYDEDUP_RUN" not in os.environ:
            values["run"] = 1
        knobs.initial(values)                             # bad values raise, before any work
        try:
            arena = Arena(**values)
        except (OSError, RuntimeError, NotImplementedError) as e:
            _failed = f"{type(e).__name__}: {e}"
            logger.warning("pydedup cannot work in this process (pid %d), running plain numpy: %s",
                           os.getpid(), _failed)
            return None
        try:
            install(arena)
        except RuntimeError as e:
            arena.close()
            _failed = str(e)
            logger.warning("pydedup cannot install in this process (pid %d), running plain numpy: %s",
                           os.getpid(), _failed)
            return None
        _pid = os.getpid()
        return arena


def unavailable() -> str | None:
    """Why worker_init() left this process plain, or None."""
    return _failed


class PssMeter:
    """A process's memory as PSS, at a bounded cost.

    Reading PSS walks the process's page tables (/proc/PID/smaps_rollup:
    about 20 ms a GiB here), too slow for a monitor that asks ten times a
    second. So the meter reads PSS again once the time since its last
    reading is at least that reading's cost divided by `cost_share` (so PSS
    costs at most 2% of a core by default) and `min_interval` seconds; in
    between it returns the last PSS
    plus the growth of RSS since then (statm: microseconds). Growth thus
    counts at once, as with RSS; what merging saved counts from the next
    PSS reading on. A page freed lowers PSS by at most what it lowers RSS
    (less when it mapped a shared frame), so a small drop of RSS leaves the
    last PSS as the value, and a drop of more than 1/DROP_FRACTION of RSS
    (data spilled or freed: Dask's memory manager asks again after each key
    it spills) takes a new reading: the value is never less than PSS but
    for what other processes sharing its frames did since the last reading.
    When PSS cannot be read (another user's process, no smaps_rollup), it
    returns RSS and says so once."""

    def __init__(self, pid: int | None = None, *, cost_share: float = 0.02,
                 min_interval: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < cost_share <= 1:
            raise ValueError(f"cost_share must be in (0, 1], not {cost_share!r}")
        self.pid = pid
        self.cost_share = cost_share
        self.min_interval = min_interval
        self._clock = clock
        self._pss = 0                    # the last PSS reading, bytes
        self._rss_then = 0               # RSS when it was taken
        self._next = 0.0                 # when the next PSS reading is due
        self.pss_readings = 0            # how many PSS readings were taken
        self.failed: str | None = None   # why PSS could not be read, if it could not
        self._lock = threading.RLock()

    def __call__(self) -> int:
        """The process's memory in bytes: PSS, or an estimate from the last PSS."""
        with self._lock:
            rss = procfs.process_rss(self.pid)
            if self.failed is not None:
                return rss
            now = self._clock()
            if now >= self._next or rss < self._rss_then - self._rss_then // DROP_FRACTION:
                return self._read_pss()
            return self._pss + max(0, rss - self._rss_then)

    def read_pss(self) -> int:
        """Read PSS now (whatever the pace), and return it."""
        with self._lock:
            return self._read_pss()

    def _read_pss(self) -> int:
        start = time.perf_counter()
        try:
            pss = procfs.process_pss(self.pid)
            rss = procfs.process_rss(self.pid)
        except OSError as e:
            self.failed = f"{type(e).__name__}: {e}"
            logger.warning("cannot read the PSS of %s; memory is reported as RSS: %s",
                           "this process" if self.pid is None else f"pid {self.pid}", self.failed)
            return procfs.process_rss(self.pid)
        cost = time.perf_counter() - start
        self._pss, self._rss_then = pss, rss
        self._next = self._clock() + max(self.min_interval, cost / self.cost_share)
        self.pss_readings += 1
        return pss
