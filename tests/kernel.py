"""What the kernel says about pages, read independently of pydedup's core:
which file page each address maps (/proc/self/maps), pagemap entries, and
the PAGEMAP_SCAN categories."""
import ctypes
import os
import struct

import numpy as np

PAGE = os.sysconf("SC_PAGESIZE")
FRAME_STORE = "memfd:pydedup-frames"


def address(array) -> int:
    return array.__array_interface__["data"][0]


def page_addresses(array):
    lo = address(array)
    return range(lo - lo % PAGE, lo + array.nbytes, PAGE)


def frame_offsets(array):
    """For each page of `array`: the frame-store offset it maps, or None."""
    return [None if m is None else m[1] for m in frame_mappings(array)]


def frame_mappings(array):
    """For each page of `array`: (inode, offset) of the frame-store memfd page
    it maps, or None. After a fork a process may map several such memfds,
    all of the same name: the inode tells them apart."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            path = " ".join(fields[5:])
            maps.append((lo, hi, int(fields[2], 16), int(fields[4]), path))
    out = []
    for page in page_addresses(array):
        for lo, hi, offset, inode, path in maps:
            if lo <= page < hi:
                out.append((inode, offset + page - lo) if path.startswith(f"/{FRAME_STORE}") else None)
                break
    return out


def frame_place(frame):
    """(memfd of its tier, page in that memfd) where the frame store keeps
    frame `frame`: Core.stripe_pages() frames to each of its memfds in
    turn, each memfd holding its stripes one after the other."""
    from pydedup._fast import Core
    stripes, run = Core.frame_stripes(), Core.stripe_pages()
    return frame // run % stripes, frame // (run * stripes) * run + frame % run


def pagemap(array):
    entries = []
    with open("/proc/self/pagemap", "rb") as f:
        for page in page_addresses(array):
            f.seek(page // PAGE * 8)
            entries.append(struct.unpack("<Q", f.read(8))[0])
    return entries


PRESENT, EXCLUSIVE, FILE = 1 << 63, 1 << 56, 1 << 61
PFN = (1 << 55) - 1


def pfns_visible() -> bool:
    return os.geteuid() == 0


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_PFNZERO = 1 << 2, 1 << 3, 1 << 5
_PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_ScanArg) << 16) | (ord("f") << 8) | 16


def zero_page_mapped(array):
    """For each page of `array`: does it map the kernel's zero page? None if
    this kernel has no PAGEMAP_SCAN."""
    pages = page_addresses(array)
    regions = (_Region * 1024)()
    arg = _ScanArg(size=ctypes.sizeof(_ScanArg), start=pages.start, end=pages.stop,
                   vec=ctypes.addressof(regions), vec_len=1024,
                   category_anyof_mask=PAGE_IS_PFNZERO, return_mask=PAGE_IS_PFNZERO)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        found = libc.ioctl(fd, ctypes.c_ulong(_PAGEMAP_SCAN), ctypes.byref(arg))
    finally:
        os.close(fd)
    if found < 0:
        return None
    zero = [False] * len(pages)
    for region in regions[:found]:
        for i in range((region.start - pages.start) // PAGE, (region.end - pages.start) // PAGE):
            zero[i] = True
    return zero


def touch(*arrays):
    """Read every page, so merged pages are mapped and PSS counts them."""
    for a in arrays:
        a.view(np.uint8).reshape(-1)[::PAGE].sum()


def process_pss() -> int:
    """PSS of the memory the process holds itself: Pss_Anon + Pss_Shmem of
    /proc/self/smaps_rollup (the frame store is shmem, a memfd), without
    Pss_File. Merging never changes the file-backed part (the Python binary,
    shared libraries), but its share moves whenever another process maps or
    unmaps the same files: with the system Python, shared by every process
    running it, one such process exiting between two readings made the PSS
    drop 1.1 MB less than merging saved. Pss where the kernel lacks the split."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Pss", "Pss_Anon", "Pss_Shmem"):
                fields[name] = int(rest.split()[0]) * 1024
    if "Pss_Anon" in fields and "Pss_Shmem" in fields:
        return fields["Pss_Anon"] + fields["Pss_Shmem"]
    if "Pss" in fields:
        return fields["Pss"]
    raise AssertionError("no Pss in smaps_rollup")


def process_data() -> int:
    """What RLIMIT_DATA counts (Linux 4.7+): private writable mappings, VmData."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmData in /proc/self/status")
