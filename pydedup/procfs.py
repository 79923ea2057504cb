"""What the kernel says about this process: mappings, PSS, limits."""
from __future__ import annotations

import os
import re

PAGE_SIZE = os.sysconf("SC_PAGESIZE")


def max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except OSError:
        return 65530                      # the kernel's default


def ksm_running() -> bool:
    """Whether the kernel's KSM runs (/sys/kernel/mm/ksm/run is 1)."""
    try:
        with open("/sys/kernel/mm/ksm/run") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def ksm_stat() -> dict:
    """This process's kernel KSM counters (/proc/self/ksm_stat, Linux 6.1+),
    {} where the kernel has none."""
    try:
        with open("/proc/self/ksm_stat") as f:
            return {name: int(value) for name, value in (line.split() for line in f)
                    if value.lstrip("-").isdigit()}
    except OSError:
        return {}


def count_mappings(lo: int, hi: int):
    """(mappings of the whole process, mappings inside [lo, hi))."""
    total = inside = 0
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            total += 1
            start = int(line[: line.index(b"-")], 16)
            inside += lo <= start < hi
    return total, inside


def smaps_fields(lo: int, hi: int, fields=(b"Pss", b"Pss_Anon", b"Pss_Shmem")):
    """Sums, in bytes, of smaps fields over the mappings inside [lo, hi).
    Only the blocks of those mappings are parsed: a process has hundreds of
    mappings of twenty-odd lines each, and parsing every line in Python was
    most of the time stats() took (40 ms under pytest)."""
    sums = dict.fromkeys(fields, 0)
    with open("/proc/self/smaps", "rb") as f:
        text = f.read()
    headers = list(_SMAPS_HEADER.finditer(text))
    for i, header in enumerate(headers):
        if lo <= int(header.group(1), 16) < hi:
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            for line in text[header.end():end].splitlines():
                name, _, rest = line.partition(b":")
                if name in sums:
                    sums[name] += int(rest.split()[0]) * 1024
    return {k.decode().lower(): v for k, v in sums.items()}


# The first line of a mapping's block in smaps: "start-end perms offset ...".
_SMAPS_HEADER = re.compile(rb"^([0-9a-f]+)-[0-9a-f]+ [^\n]*$", re.MULTILINE)


def read_smaps(pid: int | None = None) -> bytes:
    """The text of /proc/self/smaps, or of `pid`'s (which needs the right to
    read it: the same user, and a process that is dumpable)."""
    with open(f"/proc/{'self' if pid is None else int(pid)}/smaps", "rb") as f:
        return f.read()


def arena_smaps(lo: int, hi: int, store_inodes: list[int], pid: int | None = None,
                text: bytes | None = None) -> dict:
    """What stats() reads of /proc/self/smaps (of `pid`'s, for `pydedup
    stats`), from one read of it (or from `text`, read_smaps() of a process
    with several arenas): a merge cut into 100,000 mappings makes
    that file tens of megabytes, which the kernel takes seconds to write. In
    bytes, but `mappings`:
    - pss, anonhugepages: summed over the mappings inside [lo, hi);
    - mappings: how many mappings lie inside [lo, hi);
    - store_rss, store_pss: of the mappings of the frame store (the files
      `store_inodes`) inside [lo, hi): for a shared store, the memory its
      frames hold for this arena, and this process's share of it;
    - window_pss: of the frame store's mappings outside [lo, hi): the window
      the core reads frames through holds a share of every frame it touched,
      which the arena's own Pss lacks."""
    sums = dict.fromkeys(("pss", "anonhugepages", "mappings", "store_rss", "store_pss", "window_pss"), 0)
    if text is None:
        text = read_smaps(pid)
    headers = list(_SMAPS_HEADER.finditer(text))
    for i, header in enumerate(headers):
        inside = lo <= int(header.group(1), 16) < hi
        fields = header.group(0).split()
        of_store = len(fields) >= 5 and int(fields[4]) in store_inodes
        if not inside and not of_store:
            continue
        sums["mappings"] += inside
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        for line in text[header.end():end].splitlines():
            name, _, rest = line.partition(b":")
            if name not in (b"Rss", b"Pss", b"AnonHugePages"):
                continue
            value = int(rest.split()[0]) * 1024
            if inside and name != b"Rss":
                sums[name.decode().lower()] += value
            if of_store and inside and name != b"AnonHugePages":
                sums["store_" + name.decode().lower()] += value
            elif of_store and name == b"Pss":
                sums["window_pss"] += value
    return sums


def smaps_readings(smaps: dict, shared: bool) -> dict:
    """The readings stats() takes from arena_smaps()."""
    return dict(pss=smaps["pss"], anonhugepages=smaps["anonhugepages"], mappings=smaps["mappings"],
                window_pss=smaps["window_pss"], shared_rss=smaps["store_rss"] if shared else 0,
                shared_pss=smaps["store_pss"] if shared else 0)


def process_pss(pid: int | None = None) -> int:
    """The proportional set size of this process (or of `pid`, which needs
    the right to read its smaps: the same user), in bytes."""
    path = f"/proc/{'self' if pid is None else int(pid)}/smaps_rollup"
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no Pss line in {path}")


def process_rss(pid: int | None = None) -> int:
    """The resident set size of this process (or of `pid`), in bytes, from
    /proc/PID/statm: cheap (no page-table walk), unlike process_pss()."""
    with open(f"/proc/{'self' if pid is None else int(pid)}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE


def zero_page_colours(probe_pages: int = 256) -> int:
    """How many zero pages the kernel colours by address (ZERO_PAGE(vaddr):
    several on MIPS and s390, one on x86-64 and arm64), seen by reading
    fresh anonymous pages and counting the frame numbers they map. Frame
    numbers are hidden without CAP_SYS_ADMIN; then 1, which is right
    everywhere but on those two."""
    import mmap
    import struct
    region = mmap.mmap(-1, probe_pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = memoryview(region)
        for i in range(probe_pages):
            view[i * PAGE_SIZE]                     # a read maps the zero page
        address = _address_of(region)
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(address // PAGE_SIZE * 8)
            entries = struct.unpack(f"{probe_pages}Q", f.read(probe_pages * 8))
        view.release()
    except OSError:
        return 1
    finally:
        region.close()
    pfns = {entry & ((1 << 55) - 1) for entry in entries if entry >> 63}
    return len(pfns) if 0 not in pfns and pfns else 1


def _address_of(region) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(region))


THP = "/sys/kernel/mm/transparent_hugepage"


def thp_mode() -> str:
    """The system's transparent huge page mode: 'always', 'madvise' or
    'never' (the bracketed word of THP's `enabled`); 'absent' without THP."""
    try:
        with open(f"{THP}/enabled") as f:
            text = f.read()
    except OSError:
        return "absent"
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else "absent"


def huge_page_size() -> int:
    """Bytes a transparent huge page maps (hpage_pmd_size); 0 without THP."""
    try:
        with open(f"{THP}/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def numpy_madvises_hugepage() -> bool:
    """Whether numpy asks for huge pages for its big arrays: on by default,
    off with NUMPY_MADVISE_HUGEPAGE=0 (numpy reads it at import)."""
    import numpy as np
    multiarray = getattr(getattr(np, "_core", None) or np.core, "multiarray", None)
    get = getattr(multiarray, "_get_madvise_hugepage", None)
    if get is not None:
        return bool(get())
    return os.environ.get("NUMPY_MADVISE_HUGEPAGE", "1") != "0"
