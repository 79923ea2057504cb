"""The kernel's own KSM, driven from Python so benchmarks can run it side by
side with pydedup on the same data. Names follow
Documentation/admin-guide/mm/ksm.rst.

    from pydedup.bench import ksm

    if ksm.available() is None:               # else: a one-line reason
        with ksm.KernelKSM(pages_to_scan=10_000, sleep_millisecs=0,
                           use_zero_pages=1) as kernel:
            result = kernel.merge(*arrays)    # MADV_MERGEABLE, run=1, wait
            print(result.seconds, result.cpu_seconds)
            kernel.unmerge(*arrays)           # MADV_UNMERGEABLE
        # every knob is back as it was, and run last

Driving KSM needs a writable /sys/kernel/mm/ksm, that is root. Marking memory
(mergeable(), unmergeable()) needs nothing, but merges nothing while ksmd
does not run.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from pydedup import procfs

SYSFS = "/sys/kernel/mm/ksm"
LOCK_FILE = "/run/lock/pydedup-ksm.lock" if os.path.isdir("/run/lock") else "/tmp/pydedup-ksm.lock"
PAGE = procfs.PAGE_SIZE
MADV_MERGEABLE = getattr(mmap, "MADV_MERGEABLE", 12)
MADV_UNMERGEABLE = getattr(mmap, "MADV_UNMERGEABLE", 13)

# A page merges on ksmd's second visit (the first only records its
# checksum), and memory marked while a scan is under way is put just behind
# the scan's cursor: the first visit may come a full scan later.
SCANS_TO_MERGE = 3

# Knobs the kernel refuses to change (EBUSY) while any page is shared: run=2
# unmerges everything first.
NEEDS_UNMERGED = ("merge_across_nodes", "max_page_sharing")
# Counters of this process's merging (/proc/self/ksm_stat) that change as
# pages merge; the wait ends when they stop changing. Not ksm_rmap_items: it
# still falls a scan after the merge, as rmap items of zero pages are freed.
PROCESS_PROGRESS = ("ksm_merging_pages", "ksm_zero_pages")
GLOBAL_PROGRESS = ("pages_shared", "pages_sharing", "ksm_zero_pages")
# Counters that are 0 when KSM holds nothing (pages_volatile: rmap items left).
HOLDING = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages")


# -- what the kernel offers ------------------------------------------------

def available() -> str | None:
    """None if kernel KSM can be driven here, else a one-line reason why not."""
    if not os.path.isdir(SYSFS):
        return f"no kernel KSM: {SYSFS} is missing (CONFIG_KSM off)"
    path = os.path.join(SYSFS, "run")
    try:
        os.close(os.open(path, os.O_WRONLY))     # open checks permission; nothing written
    except PermissionError:
        return f"kernel KSM needs root: {path} is not writable"
    except OSError as e:
        return f"kernel KSM cannot be driven: {path}: {e.strerror}"
    return None


def _read(name: str) -> str:
    with open(os.path.join(SYSFS, name)) as f:
        text = f.read().strip()
    choice = re.search(r"\[(.*?)\]", text)      # advisor_mode reads "[none] scan-time"
    return choice.group(1) if choice else text


def _write(name: str, value: str):
    with open(os.path.join(SYSFS, name), "w") as f:
        f.write(value)


def _files(writable: bool):
    names = []
    for name in sorted(os.listdir(SYSFS)):
        mode = os.stat(os.path.join(SYSFS, name)).st_mode
        if bool(mode & 0o200) == writable:    # the file's mode, not access(): root may write anything
            names.append(name)
    return names


def knobs() -> dict:
    """Every writable file of /sys/kernel/mm/ksm and its value, as text."""
    return {name: _read(name) for name in _files(writable=True)}


def knobs_at_rest() -> dict:
    """knobs() while no KernelKSM, of this process or another, holds them
    changed: read under the lock each holds from its entry to its restore.
    What to compare before and after a run while another process may be
    benchmarking kernel KSM too."""
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return knobs()


def counters() -> dict:
    """Every read-only file of /sys/kernel/mm/ksm (pages_sharing, full_scans...)."""
    return {name: int(_read(name)) for name in _files(writable=False)}


def process_counters() -> dict:
    """This process's numeric lines of /proc/self/ksm_stat (ksm_merging_pages,
    ksm_zero_pages, ksm_rmap_items...); empty on kernels without it."""
    out = {}
    try:
        with open("/proc/self/ksm_stat") as f:
            for line in f:
                name, _, value = line.replace(":", " ").partition(" ")
                if value.strip().lstrip("-").isdigit():
                    out[name] = int(value)
    except OSError:
        pass
    return out


def ksmd_pid() -> int | None:
    """ksmd's pid, or None where it cannot be seen (another pid namespace)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "ksmd":
                        return int(entry)
            except OSError:
                continue
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def ksmd_cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time ksmd has used since boot (utime + stime), or None if unseen."""
    pid = ksmd_pid() if pid is None else pid
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK     # fields 14 and 15 of stat(5)


# -- marking memory --------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def _span(buffer):
    """[lo, hi) in bytes of a numpy array, a buffer (mmap, bytearray...) or
    an (address, length) pair."""
    if isinstance(buffer, tuple):
        address, length = buffer
        return int(address), int(address) + int(length)
    if not isinstance(buffer, np.ndarray):
        view = np.frombuffer(buffer, dtype=np.uint8)     # holds an export until deleted
        lo = view.__array_interface__["data"][0]
        hi = lo + view.nbytes
        del view
        return lo, hi
    lo = hi = buffer.__array_interface__["data"][0]
    if buffer.size == 0:
        return lo, lo
    for n, stride in zip(buffer.shape, buffer.strides):
        (lo, hi) = (lo + (n - 1) * stride, hi) if stride < 0 else (lo, hi + (n - 1) * stride)
    return lo, hi + buffer.itemsize


def _page_ranges(buffers):
    """The pages the buffers touch, as sorted [lo, hi) ranges, joined where
    they meet (arena arrays are consecutive: one madvise for them all)."""
    ranges = []
    for b in buffers:
        lo, hi = _span(b)
        if hi > lo:
            ranges.append((lo - lo % PAGE, -(-hi // PAGE) * PAGE))
    ranges.sort()
    joined: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if joined and lo <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(hi, joined[-1][1]))
        else:
            joined.append((lo, hi))
    return joined


def _madvise(ranges, advice, ignore_unmapped=False) -> int:
    total = 0
    for lo, hi in ranges:
        if _libc.madvise(lo, hi - lo, advice) != 0:
            err = ctypes.get_errno()
            if ignore_unmapped and err == 12:    # ENOMEM: part of the range is not mapped (anymore)
                continue
            raise OSError(err, f"madvise({lo:#x}, {hi - lo}, {advice}): {os.strerror(err)}")
        total += hi - lo
    return total


def _mergeable_bytes(ranges) -> int:
    """Bytes of the ranges that lie in mappings with VM_MERGEABLE ("mg")."""
    total, span = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                span = int(head.group(1), 16), int(head.group(2), 16)
            elif line.startswith("VmFlags:") and span and " mg" in line:
                for lo, hi in ranges:
                    total += max(0, min(hi, span[1]) - max(lo, span[0]))
    return total


def _check_marked(ranges, wanted):
    marked = _mergeable_bytes(ranges)
    if marked < wanted:
        raise ValueError(f"KSM ignores {wanted - marked} of {wanted} bytes: only private "
                         "anonymous memory merges (mmap.mmap(-1, n) is MAP_SHARED: pass "
                         "flags=mmap.MAP_PRIVATE)")


def mergeable(*buffers) -> int:
    """MADV_MERGEABLE on every page the buffers touch (numpy arrays, mmap
    objects, (address, length) pairs); returns the bytes marked. Raises
    ValueError for memory KSM ignores, such as MAP_SHARED mappings:
    mmap.mmap(-1, n) is one, mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE) is not."""
    ranges = _page_ranges(buffers)
    wanted = _madvise(ranges, MADV_MERGEABLE)
    _check_marked(ranges, wanted)
    return wanted


def unmergeable(*buffers) -> int:
    """MADV_UNMERGEABLE: give every merged page under the buffers its own copy
    again and stop KSM scanning them; returns the bytes unmarked. The
    counters only follow at ksmd's next scan."""
    return _madvise(_page_ranges(buffers), MADV_UNMERGEABLE)


# -- driving ksmd ----------------------------------------------------------

@dataclass(frozen=True)
class MergeResult:
    seconds: float                 # wall time from MADV_MERGEABLE to the last change the merge made
    cpu_seconds: float | None   # ksmd's CPU time over the same span (None: ksmd unseen)
    waited_seconds: float          # wall time until the merge was seen complete
    full_scans: int                # full scans ksmd completed before that last change
    bytes_mergeable: int           # bytes madvise()d
    counters: dict                 # /sys/kernel/mm/ksm counters at the end (whole system)
    process: dict                  # /proc/self/ksm_stat at the end (this process)
    pss_samples: list = field(default_factory=list)   # (seconds, PSS bytes) while waiting

    def as_dict(self) -> dict:
        return asdict(self)


class KSMTimeout(TimeoutError):
    """The merge did not complete in time; .result holds what was seen."""

    def __init__(self, message, result: MergeResult):
        super().__init__(message)
        self.result = result


class KernelKSM:
    """Context manager over /sys/kernel/mm/ksm: on enter it saves every
    writable knob and sets those given (e.g. pages_to_scan=10000,
    sleep_millisecs=0, use_zero_pages=1); on exit, exceptions and Ctrl-C
    included, it unmarks the memory merge() marked and restores every knob,
    run last.

    If KSM was stopped with nothing merged on enter, exit also drops what it
    built meanwhile (run=2, then run=0): merged pages, and rmap items, which
    with ksmd stopped would outlive even this process.
    merge_across_nodes and max_page_sharing can only change while nothing is
    shared: changing or restoring them writes run=2 first when needed, which
    unmerges every process's pages. Setting pages_to_scan while the scan-time
    advisor is on turns the advisor off (the kernel refuses it otherwise).
    """

    def __init__(self, **knob_values):
        self._wanted = {name: _text(value) for name, value in knob_values.items()}
        self.saved: dict | None = None       # the knobs as found, set on enter
        self._found: dict | None = None      # the counters as found
        self._ranges: list = []
        self._ksmd: int | None = None

    def __enter__(self):
        if self.saved is not None:
            raise RuntimeError("KernelKSM is not reentrant")
        reason = available()
        if reason:
            raise PermissionError(reason)
        # Two users saving and restoring the same knobs at once would restore
        # each other's settings: one KernelKSM at a time, machine-wide.
        self._lock = open(LOCK_FILE, "a")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.saved, self._found = knobs(), counters()
        self._ksmd = ksmd_pid()
        try:
            self.set(**self._wanted)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc):
        self._restore()

    def set(self, **knob_values):
        """Set knobs, in an order the kernel accepts; run is written last."""
        saved = self._check_entered()
        wanted = {name: _text(value) for name, value in knob_values.items()}
        unknown = sorted(set(wanted) - set(saved))
        if unknown:
            raise ValueError(f"not a writable KSM knob: {', '.join(unknown)} "
                             f"(there are: {', '.join(sorted(saved))})")
        if "pages_to_scan" in wanted and "advisor_mode" in saved:
            wanted.setdefault("advisor_mode", "none")
        run = wanted.pop("run", None)
        if int(_read("pages_shared")) and any(
                name in NEEDS_UNMERGED and _read(name) != value for name, value in wanted.items()):
            run = run if run is not None else _read("run")
            _unmerge_all()
        for name in _ordered(wanted):
            if _read(name) != wanted[name]:
                _write(name, wanted[name])
        if run is not None and _read("run") != run:
            _write("run", run)

    def merge(self, *buffers, timeout: float = 300.0, pss_interval: float | None = 0.1,
              on_sample: Callable[[float, int], None] | None = None) -> MergeResult:
        """Mark the buffers' pages mergeable, set run=1 and wait until ksmd has
        merged all it will: full_scans advanced by 3 or more (two visits, and
        the scan under way) and this process's ksm_merging_pages and
        ksm_zero_pages unchanged over a whole full scan; result.seconds runs
        to their last change. PSS is sampled every pss_interval seconds (None:
        not at all), each sample also passed to on_sample(seconds, pss_bytes).
        Raises KSMTimeout after timeout seconds. With no buffers: runs ksmd
        over what is marked already, and waits."""
        self._check_entered()
        watch = PROCESS_PROGRESS if "ksm_merging_pages" in process_counters() else GLOBAL_PROGRESS
        scans0, cpu0 = int(_read("full_scans")), self._cpu()
        t0 = time.perf_counter()
        ranges = _page_ranges(buffers)
        self._ranges.extend(ranges)
        nbytes = _madvise(ranges, MADV_MERGEABLE)
        if _read("run") != "1":
            _write("run", "1")
        _check_marked(ranges, nbytes)                    # ksmd already at work meanwhile

        samples, next_pss = [], t0
        last = None                      # (values, when, cpu, full_scans) at the last change
        while True:
            now = time.perf_counter()
            scans = int(_read("full_scans"))
            values = _progress(watch)
            if last is None or values != last[0]:
                last = (values, now, self._cpu(), scans)
            if pss_interval is not None and now >= next_pss:
                sample = (now - t0, procfs.process_pss())
                samples.append(sample)
                if on_sample:
                    on_sample(*sample)
                next_pss = now + pss_interval
            # done: a whole scan without a change, after the scans any merge takes
            done = scans >= scans0 + SCANS_TO_MERGE and scans >= last[3] + 2
            if done or now - t0 > timeout:
                cpu = None if cpu0 is None or last[2] is None else last[2] - cpu0
                result = MergeResult(
                    seconds=last[1] - t0, cpu_seconds=cpu, waited_seconds=now - t0,
                    full_scans=last[3] - scans0, bytes_mergeable=nbytes,
                    counters=counters(), process=process_counters(), pss_samples=samples)
                if not done:
                    raise KSMTimeout(f"kernel KSM did not finish merging {nbytes} bytes in "
                                     f"{timeout} s ({scans - scans0} full scans)", result)
                return result
            time.sleep(0.01)

    def unmerge(self, *buffers) -> int:
        """MADV_UNMERGEABLE on the buffers: their pages get their own copies at
        once; pages_shared, ksm_merging_pages... only follow at ksmd's next
        scan (or at run=2)."""
        ranges = _page_ranges(buffers)
        done = _madvise(ranges, MADV_UNMERGEABLE)
        self._ranges = [r for r in self._ranges if r not in ranges]
        return done

    # -- restoring ---------------------------------------------------------

    def _cpu(self) -> float | None:
        return None if self._ksmd is None else ksmd_cpu_seconds(self._ksmd)

    def _check_entered(self) -> dict:
        """The knobs as found on enter; RuntimeError outside the with block."""
        if self.saved is None:
            raise RuntimeError("use KernelKSM as a context manager: with KernelKSM(...) as k")
        return self.saved

    def _restore(self):
        if self.saved is None:
            return
        blocked = {signal.SIGINT, signal.SIGTERM}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)   # a second Ctrl-C waits
        try:
            self._restore_knobs()
        finally:
            self.saved = None
            self._lock.close()          # releases the flock
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _restore_knobs(self):
        saved, found = self._check_entered(), self._found
        assert found is not None            # set on enter, with saved
        errors = []
        ranges, self._ranges = self._ranges, []
        try:
            _madvise(ranges, MADV_UNMERGEABLE, ignore_unmapped=True)
        except OSError as e:
            errors.append(f"MADV_UNMERGEABLE: {e}")

        now = counters()
        # what KSM holds: merged pages, and rmap items (which, with ksmd
        # stopped, outlive even the process they describe)
        held = any(now.get(name, 0) for name in HOLDING)
        found_clean = (saved["run"] != "1" and not found["pages_shared"]
                       and not found.get("ksm_zero_pages", 0))
        knob_blocked = now["pages_shared"] and any(
            name in saved and _read(name) != saved[name] for name in NEEDS_UNMERGED)
        try:
            if knob_blocked or (found_clean and held):
                _unmerge_all()
            elif _read("run") != saved["run"]:
                _write("run", "0")
        except OSError as e:
            errors.append(f"run: {e}")

        advisor_on = saved.get("advisor_mode", "none") != "none"
        for name in _ordered(saved):
            if name == "run" or (name == "pages_to_scan" and advisor_on):
                continue                  # the scan-time advisor owns pages_to_scan
            try:
                if _read(name) != saved[name]:
                    _write(name, saved[name])
            except OSError as e:
                errors.append(f"{name}={saved[name]}: {e}")
        try:
            if _read("run") != saved["run"]:
                _write("run", saved["run"])
        except OSError as e:
            errors.append(f"run={saved['run']}: {e}")

        left = {name: value for name, value in knobs().items()
                if value != saved.get(name, value) and not (name == "pages_to_scan" and advisor_on)}
        if errors or left:
            raise RuntimeError(f"could not restore /sys/kernel/mm/ksm: {'; '.join(errors)} "
                               f"still differing: {left}")


def _text(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def _ordered(names):
    """advisor_mode first: changing it resets pages_to_scan."""
    return sorted(names, key=lambda name: name != "advisor_mode")


def _unmerge_all():
    """run=2: stop ksmd and unmerge every page of every process."""
    if _read("run") == "2":
        _write("run", "0")            # writing the value run already has does nothing
    _write("run", "2")


def _progress(watch):
    source = process_counters() if watch is PROCESS_PROGRESS else counters()
    return tuple(source.get(name, 0) for name in watch)
