"""The background scanner: ksmd inside the process.

A thread takes the arena's scan a step at a time (pages_to_scan pages), then
sleeps sleep_millisecs. The step runs in the Cython core without the GIL and
under the arena's lock, so merge(), stats() and allocation interleave with
it. It holds only a weak reference to its arena, and stops at close(), when
the arena is collected, and at interpreter exit."""
import atexit
import threading
import time
import weakref


class Scanner:
    """Runs `step(arena)` (one step: (pages merged, seconds to sleep)) in a
    thread until stopped or the arena is gone."""

    def __init__(self, arena, step):
        self._arena = weakref.ref(arena)
        self._step = step
        self._stopping = threading.Event()
        self.error = None             # what stopped it, if not a request
        self.cpu_seconds = 0.0        # CPU time spent in steps, its hashing threads' too
        self.last_merge = None        # time.monotonic() of the last step that merged
        self.last_merge_cpu = 0.0     # cpu_seconds then
        self._thread = threading.Thread(target=self._run, name="pydedup-scanner", daemon=True)
        self._thread._pydedup_exempt = True  # type: ignore[attr-defined]  # not numpy's allocations in the arena it scans
        _RUNNING.add(self)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self):
        """Stop after the current step; returns when the thread has ended."""
        self._stopping.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        _RUNNING.discard(self)

    def _run(self):
        while not self._stopping.is_set():
            arena = self._arena()
            if arena is None or arena.closed:
                return
            start = time.thread_time()
            try:
                merged, sleep = self._step(arena)
            except Exception as e:        # noqa: BLE001 - kept for stats() and the user
                self.error = e
                return
            finally:
                self.cpu_seconds += time.thread_time() - start + arena._scan_helper_cpu
            if merged:
                self.last_merge, self.last_merge_cpu = time.monotonic(), self.cpu_seconds
            del arena
            self._stopping.wait(sleep)


_RUNNING: weakref.WeakSet[Scanner] = weakref.WeakSet()


@atexit.register
def _stop_all():
    for scanner in list(_RUNNING):
        scanner.stop()
