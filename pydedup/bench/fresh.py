"""Fresh memory under free page reporting, for benchmarks that time merges.

A guest whose kernel reports free pages to its host (virtio-balloon free
page reporting, /sys/module/page_reporting) gives memory back a couple of
seconds after it is freed; the host drops it, and the guest's next use of
such a page faults in the host and waits for a zeroed page. Memory freed
moments ago and not reported yet costs nothing of that. A merge that
writes a frame for every page (a first member of a shared store) takes
all of its frames fresh, so its time depends on what the machine freed
before it: benchmarks/fresh_memory.py measures this without pydedup.

Memory reported in a burst while a merge runs slows it most (the host
takes the vCPUs' time: steal); reported_kib() before and after a merge
says whether one did. A benchmark can also time every merge, and its
baselines, under one of two conditions:

- warm(mib): touch and free `mib` MiB just before, so the merge's new
  memory is memory the guest holds, as on a machine without reporting;
- wait_quiet(): wait until reporting holds still, so all free memory is
  the host's and every new page faults in the host.

Without free page reporting both hold anyway and wait_quiet() returns at
once.
"""
from __future__ import annotations

import mmap
import time

import numpy as np

REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"
PAGE = mmap.PAGESIZE
MiB = 1 << 20


def reported_kib() -> int | None:
    """KiB the guest has reported to its host as free since boot; None
    without free page reporting (or where it cannot be read)."""
    try:
        with open(REPORTED_KIB) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def warm(mib: int) -> None:
    """Touch `mib` MiB of new anonymous memory, a write a page, and unmap it:
    the allocations right after take these pages, which the guest holds."""
    if mib < 0:
        raise ValueError(f"warm: mib must be >= 0, not {mib}")
    if mib == 0:
        return
    m = mmap.mmap(-1, mib * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = np.frombuffer(m, dtype=np.uint8)
        view[::PAGE] = 1
        del view
    finally:
        m.close()


def wait_quiet(seconds: float = 3.0, timeout: float = 60.0, poll: float = 0.25) -> float:
    """Wait until the guest has reported nothing for `seconds` (all memory
    freed before is then the host's), at most `timeout` seconds; returns the
    seconds waited, 0 without free page reporting."""
    if seconds < 0 or timeout < 0 or poll <= 0:
        raise ValueError("wait_quiet: seconds and timeout >= 0, poll > 0")
    last = reported_kib()
    if last is None:
        return 0.0
    start = since = time.monotonic()
    while True:
        now = time.monotonic()
        if now - since >= seconds or now - start >= timeout:
            return now - start
        time.sleep(poll)
        value = reported_kib()
        if value != last:
            last, since = value, time.monotonic()
