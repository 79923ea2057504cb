"""Counters that claim a measurement agree with an independent read of the
kernel: the process's PSS from /proc/self/smaps_rollup (its anonymous and
shmem part, see kernel.process_pss), and the arena's mappings' Pss, Shared
and Private lines from /proc/self/smaps, parsed here without pydedup.procfs.
With private pages present, frames shared, zero pages, and other memory in
the process."""
import numpy as np
import pytest

from kernel import PAGE, process_pss, touch

PAGE_FLOATS = PAGE // 8
MiB = 1 << 20


def arena_smaps(arena):
    """{field: bytes} summed over the mappings that start in the arena's range."""
    lo, hi = arena._lo, arena._hi
    sums, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                inside = lo <= int(first.split("-")[0], 16) < hi
            elif inside and line.split()[-1] == "kB":
                name, value = line.split()[:2]
                sums[name[:-1]] = sums.get(name[:-1], 0) + int(value) * 1024
    return sums


def random_pages(arena, rng, npages):
    a = arena.empty(npages * PAGE_FLOATS)
    a[:] = rng.random(a.size)
    return a


@pytest.fixture
def elsewhere(rng):
    """Memory of the process outside the arena: 32 MiB written, and a file
    mapping; neither may count for or against the arena."""
    plain = np.empty(32 * MiB // 8)
    plain[:] = rng.random(plain.size)
    return plain


def close(measured, independent, pages=16):
    """Equal but for what the reads themselves allocate (a few pages)."""
    return abs(measured - independent) <= pages * PAGE


def test_private_pages_are_not_savings(arena, rng, elsewhere):
    a = random_pages(arena, rng, 4096)            # 16 MiB, all different
    z = arena.zeros(2048 * PAGE_FLOATS)
    z[:] = 0.0                                     # written: private, not yet merged
    touch(a, z)
    stats = arena.stats()
    smaps = arena_smaps(arena)
    assert close(stats.pss_bytes, smaps["Pss"])
    assert close(stats.pss_bytes, (4096 + 2048) * PAGE)
    assert smaps.get("Shared_Clean", 0) + smaps.get("Shared_Dirty", 0) == 0
    assert stats.bytes_saved == 0
    assert close(stats.pss_bytes_saved, 0)         # it said 763 MiB here before


def test_savings_match_the_drop_of_the_process_pss(arena, rng, elsewhere):
    n = 2048                                        # 8 MiB an array
    unique = random_pages(arena, rng, n)
    a = random_pages(arena, rng, n)
    copies = [arena.array(a) for _ in range(3)]     # frames shared by four pages each
    z = arena.zeros(n * PAGE_FLOATS)
    z[:] = 0.0                                      # zero pages
    touch(unique, a, z, *copies)
    before = process_pss()
    arena.merge()
    touch(unique, a, z, *copies)
    stats = arena.stats()
    dropped = before - process_pss()
    smaps = arena_smaps(arena)
    assert close(stats.pss_bytes, smaps["Pss"])
    assert smaps["Shared_Clean"] + smaps["Shared_Dirty"] >= n * PAGE   # the frames, shared
    assert smaps["Private_Dirty"] >= n * PAGE                          # the unique pages
    # unique pages + the frames, less the frames' share in the core's window
    assert n * PAGE < stats.pss_bytes <= 2 * n * PAGE + 16 * PAGE
    assert abs(stats.pss_bytes_saved - dropped) < max(0.02 * dropped, 128 * PAGE)
    assert abs(stats.pss_bytes_saved - 4 * n * PAGE) < 0.02 * 4 * n * PAGE


def test_savings_shrink_as_merged_pages_are_written(arena, rng, elsewhere):
    n = 2048
    a = random_pages(arena, rng, n)
    b = arena.array(a)
    arena.merge()
    touch(a, b)
    merged = arena.stats()
    before = process_pss()
    b[: b.size // 2] += 1.0                         # copy-on-write: half of b private again
    touch(a, b)
    grown = process_pss() - before
    stats = arena.stats()
    assert close(stats.pss_bytes, arena_smaps(arena)["Pss"])
    # the process's PSS also moves by what Python allocates meanwhile: 128 pages
    assert close(merged.pss_bytes_saved - stats.pss_bytes_saved, grown, pages=128)
    assert close(stats.pss_bytes_saved, n // 2 * PAGE, pages=64)


def test_frames_no_page_maps_count_against_the_savings(arena, rng):
    n = 1024
    a = random_pages(arena, rng, n)
    b = arena.array(a)
    arena.merge()
    a[:] += 1.0                                     # both private again: the frames are
    b[:] += 1.0                                     # unmapped until reclaimed
    touch(a, b)
    stats = arena.stats()
    unmapped = max(0, stats.frame_store_bytes - stats.frames_in_use * PAGE)
    assert close(stats.pss_bytes, arena_smaps(arena)["Pss"])
    assert close(stats.pss_bytes_saved, -unmapped, pages=32)


def test_pages_only_read_are_not_savings(arena, elsewhere):
    """Reading a never-written page maps the kernel's zero page: it holds no
    memory, with or without pydedup (it said 763 MiB saved here, of 509)."""
    z = arena.zeros(4096 * PAGE_FLOATS)
    assert z.sum() == 0                             # read: present, on the zero page
    stats = arena.stats()
    assert stats.zero_pages == 0 and close(stats.pss_bytes, 0)
    assert close(stats.pss_bytes_saved, 0)
    w = arena.zeros(1024 * PAGE_FLOATS)
    w[:] = 0.0
    before = process_pss()
    arena.merge()
    dropped = before - process_pss()
    stats = arena.stats()
    assert abs(stats.pss_bytes_saved - dropped) < max(0.03 * dropped, 128 * PAGE)
    assert close(stats.pss_bytes_saved, 1024 * PAGE)
