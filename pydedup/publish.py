"""Arenas publish their counters so that `python -m pydedup stats` can show
them from another process (which cannot read this one's Python objects).

Each arena writes one small JSON file, <pid>-<arena id>.json, in a directory
of its user's: $XDG_RUNTIME_DIR/pydedup if set, else /dev/shm/pydedup-<uid>
(memory, gone at reboot). stats() writes it every time (the counters are
computed anyway), and so does an arena's first merge (by merge() or the
scanner), so that every arena that merged is listed. After that, merge()
and the background scanner refresh it only while someone is reading:
`pydedup stats` touches a request file in the directory, and for the next
WATCH seconds they refresh it at most once every INTERVAL seconds.

A merge publishes the readings the counters are made from, but not those
of /proc/self/smaps (PSS, mappings), whose reading would cost the merge
10 ms for a 1 GiB arena of few mappings and a second or more for one cut
into 100,000 (tens of megabytes of text): it says where they are instead,
and the reader reads /proc/<pid>/smaps itself (stats_of). close() and
garbage collection remove the file; readers, and an arena's first write,
remove those of processes that are gone (killed). Publishing is best
effort: a directory that cannot be written only means nothing is shown.
"""
import json
import os
import tempfile
import threading
import time
import weakref

from pydedup import procfs

INTERVAL = 1.0        # seconds between refreshes while watched
WATCH = 10.0          # seconds a request keeps arenas refreshing
REQUEST = "request"   # the file readers touch


def directory(uid=None) -> str:
    """Where this user's arenas publish (root: pass uid to look at another user's)."""
    uid = os.getuid() if uid is None else uid
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and uid == os.getuid():
        return os.path.join(runtime, "pydedup")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"pydedup-{uid}")


class Publisher:
    """The published file of one arena. Holds no reference to the arena;
    `knobs` is the arena's live knob dict, read when writing."""

    def __init__(self, arena, knobs):
        self._lock = threading.Lock()
        self._path = None               # the file written, with the pid that wrote it
        self._pid = None
        self._last = -INTERVAL          # time.monotonic() of the last write
        self._id = id(arena)
        self._knobs = knobs
        weakref.finalize(arena, self.remove)

    def due(self) -> bool:
        """Whether merge() and the scanner should publish now: a reader asked
        in the last WATCH seconds, and the last refresh is INTERVAL old."""
        if time.monotonic() - self._last < INTERVAL:
            return False
        try:
            asked = os.stat(os.path.join(directory(), REQUEST)).st_mtime
        except OSError:
            return False
        return time.time() - asked < WATCH

    def publish(self, stats, scanner=None):
        """Write `stats` (an ArenaStats) and the knobs; never raises OSError."""
        self._write({"stats": stats.as_dict()}, scanner)

    def publish_unmeasured(self, readings, smaps_of, scanner=None):
        """Write the readings an ArenaStats is made from but those of
        procfs.arena_smaps(*smaps_of), which the reader measures."""
        self._write({"stats": None, "readings": readings, "smaps_of": list(smaps_of)}, scanner)

    def _write(self, counters, scanner):
        record = {
            "pid": os.getpid(), "arena": f"{self._id:x}", "time": time.time(),
            "knobs": dict(self._knobs), **counters,
            "scanner_cpu_seconds": None if scanner is None else scanner.cpu_seconds,
        }
        with self._lock:
            self._last = time.monotonic()
            path = os.path.join(directory(), f"{os.getpid()}-{self._id:x}.json")
            try:
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                if self._path is None:      # this arena's first file: clear away the killed's
                    _living_files(os.path.dirname(path))
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    json.dump(record, f)
                os.replace(tmp, path)       # readers never see half a file
            except OSError:
                return
            self._path, self._pid = path, os.getpid()   # a forked child: a file of its own

    def remove(self):
        """Remove the file this process wrote (never a parent's, after fork)."""
        with self._lock:
            path, self._path = self._path, None
            if path and self._pid == os.getpid():
                try:
                    os.unlink(path)
                except OSError:
                    pass


def request(uid=None) -> float:
    """Ask running arenas to refresh their files; returns the time asked."""
    folder = directory(uid)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, REQUEST)
    with open(path, "a"):
        pass
    os.utime(path)
    return os.stat(path).st_mtime


def published(pid=None, uid=None) -> list:
    """The records of live processes' arenas (of one pid if given), oldest
    process first. Files of processes that are gone are removed."""
    folder = directory(uid)
    try:
        names = _living_files(folder)
    except OSError:
        return []
    records = []
    for name in names:
        if pid is not None and _owner(name) != pid:
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, ValueError):
            continue                        # removed or replaced meanwhile
    return records


def stats_of(record, read_smaps=procfs.read_smaps):
    """The ArenaStats of a published record: as written by stats(), or made
    from a merge's readings and read_smaps(pid), the text of the arena's
    process's /proc/PID/smaps, read now. If that file cannot be read (the
    process is not dumpable, or /proc hides it), the counters made from it
    (PSS, mappings, huge pages) are None; OSError if the process is gone."""
    from pydedup.stats import ArenaStats
    if record.get("stats") is not None:
        return ArenaStats.from_published(record["stats"])
    readings = dict(record["readings"])
    lo, hi, store_inodes = record["smaps_of"]
    if isinstance(store_inodes, int):   # published by a pydedup of one memfd a tier
        store_inodes = [store_inodes]
    try:
        found = procfs.arena_smaps(lo, hi, store_inodes, pid=record["pid"],
                                   text=read_smaps(record["pid"]))
    except PermissionError:
        return ArenaStats.made_from(readings, partial=True)
    readings.update(procfs.smaps_readings(found, bool(readings["shared_store"])))
    return ArenaStats.made_from(readings)


def _owner(name):
    """The pid a published file's name begins with; None if not one's."""
    head = name.split("-", 1)[0]
    return int(head) if name.endswith(".json") and head.isdigit() else None


def _living_files(folder) -> list:
    """The published files in `folder` of processes that live, sorted; the
    files of processes that are gone (killed: close() never ran) are
    removed."""
    living = []
    for name in sorted(os.listdir(folder)):
        owner = _owner(name)
        if owner is not None and _alive(owner):
            living.append(name)
        elif owner is not None:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
    return living


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
