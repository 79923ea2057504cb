"""merge() and unmerge(), judged by what the kernel maps afterwards."""
import gc
import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest

import pydedup
from pydedup import testing
from pydedup._fast import Core

from kernel import (
    EXCLUSIVE,
    FILE,
    PAGE,
    PFN,
    PRESENT,
    frame_mappings,
    frame_offsets,
    frame_place,
    page_addresses,
    pagemap,
    pfns_visible,
    process_pss,
    touch,
    zero_page_mapped,
)
from test_faults import run_python
from test_threads import CHUNK_PAGES

PAGE_FLOATS = PAGE // 8
STRIPE_PAGES = Core.stripe_pages()      # consecutive frames in one memfd


def random_pages(arena, rng, npages):
    a = arena.empty(npages * PAGE_FLOATS)
    a[:] = rng.random(a.size)
    return a


def test_new_frames_stripe_over_the_memfds_and_each_page_maps_its_own(arena, rng):
    """New frames go into Core.frame_stripes() memfds, STRIPE_PAGES at a
    time, so that threads write them side by side, each memfd holding its
    stripes one after the other: a copy of more than four stripes maps its
    frames from every memfd in turn, and its fifth stripe follows on the
    first in the first memfd."""
    memfds = [os.fstat(fd).st_ino for fd in testing.core(arena).memfds]
    assert len(memfds) == Core.frame_stripes() == 4
    npages = 4 * STRIPE_PAGES + 7
    a = random_pages(arena, rng, npages)
    b = arena.array(a)
    expected = a.copy()
    report = arena.merge()
    assert report.pages_merged == 2 * npages and report.frames_new == npages
    places = [frame_place(p) for p in range(npages)]
    assert places[4 * STRIPE_PAGES] == (0, STRIPE_PAGES)  # the fifth stripe follows the first
    for array in (a, b):          # the first new frames of an empty store: frame p for page p
        assert frame_mappings(array) == [(memfds[memfd], page * PAGE) for memfd, page in places]
    testing.check_invariants(arena)
    written = (STRIPE_PAGES + 3) * PAGE_FLOATS      # copy-on-write in the second stripe
    a[written] = -1.0
    expected_a = expected.copy()
    expected_a[written] = -1.0
    np.testing.assert_array_equal(a, expected_a)
    np.testing.assert_array_equal(b, expected)
    assert arena.stats().frame_store_bytes == npages * PAGE


def test_pages_on_the_last_frame_of_a_stripe_and_the_next_in_its_memfd_share_a_mapping(arena, rng):
    """Frames 1,023 and 4,096 are neighbours in the first memfd (its first
    and second stripes): the kernel joins the mappings of two pages that
    map them side by side, and the core's records and budget allow for it."""
    npages = 4 * STRIPE_PAGES + 1
    a = random_pages(arena, rng, npages)
    b = arena.array(a)                                   # held: a's frames stay in use
    assert arena.merge().frames_new == npages            # frame p holds page p of a
    pair = np.concatenate([a[(STRIPE_PAGES - 1) * PAGE_FLOATS:STRIPE_PAGES * PAGE_FLOATS],
                           a[4 * STRIPE_PAGES * PAGE_FLOATS:]])
    c = arena.array(pair)
    assert arena.merge().pages_merged == 2
    memfd = os.fstat(testing.core(arena).memfds[0]).st_ino
    assert frame_mappings(c) == [(memfd, (STRIPE_PAGES - 1) * PAGE), (memfd, STRIPE_PAGES * PAGE)]
    start = page_addresses(c)[0]
    with open("/proc/self/maps") as maps:
        (joined,) = [line for line in maps if int(line.split("-")[0], 16) <= start
                     < int(line.split()[0].split("-")[1], 16)]
    assert int(joined.split()[0].split("-")[1], 16) >= start + 2 * PAGE, joined
    testing.check_invariants(arena)
    np.testing.assert_array_equal(c, pair)
    np.testing.assert_array_equal(b, a)


def test_duplicate_pages_share_one_frame(arena, rng):
    a = random_pages(arena, rng, 64)
    b = arena.array(a)
    expected = a.copy()
    report = arena.merge()
    assert report.pages_merged == 128 and report.frames_new == 64
    offsets_a, offsets_b = frame_offsets(a), frame_offsets(b)
    assert None not in offsets_a and offsets_a == offsets_b
    assert len(set(offsets_a)) == 64
    touch(a, b)
    if pfns_visible():
        assert [e & PFN for e in pagemap(a)] == [e & PFN for e in pagemap(b)]
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)


def test_a_copied_array_maps_back_in_one_mapping(arena, rng):
    a = random_pages(arena, rng, 256)
    copies = [arena.array(a) for _ in range(3)]
    arena.merge()
    offsets = frame_offsets(copies[1])
    assert offsets == [offsets[0] + i * PAGE for i in range(256)]   # consecutive frames
    assert arena.stats().mappings <= 2 * 4 + 1


def test_zero_pages_map_the_kernel_zero_page(arena):
    a = arena.zeros(32 * PAGE_FLOATS)
    a[:] = 0.0                                   # written: each page has memory of its own
    assert not any(zero_page_mapped(a) or [True])
    report = arena.merge()
    assert report.pages_zeroed == 32 and report.frames_new == 0
    touch(a)
    zero = zero_page_mapped(a)
    if zero is None:
        pytest.skip("this kernel has no PAGEMAP_SCAN to show the zero page")
    assert all(zero)
    assert frame_offsets(a) == [None] * 32
    assert arena.stats().zero_pages == 32


def test_a_zeroed_page_of_a_merged_mapping_still_goes_to_the_zero_page(arena, rng):
    a = random_pages(arena, rng, 4)
    b = arena.array(a)
    arena.merge()
    b[PAGE_FLOATS:2 * PAGE_FLOATS] = 0.0         # a private copy inside the frame mapping
    report = arena.merge()
    assert report.pages_zeroed == 1
    touch(b)
    assert frame_offsets(b)[1] is None          # MADV_DONTNEED would have brought the frame back
    zero = zero_page_mapped(b)
    if zero is None:
        pytest.skip("this kernel has no PAGEMAP_SCAN to show the zero page")
    assert zero == [False, True, False, False]
    assert not b[PAGE_FLOATS:2 * PAGE_FLOATS].any()
    np.testing.assert_array_equal(b[2 * PAGE_FLOATS:], a[2 * PAGE_FLOATS:])


def test_pages_never_written_are_left_alone(arena):
    a = arena.zeros(32 * PAGE_FLOATS)
    a[:PAGE_FLOATS] = 1.0
    report = arena.merge()
    assert report.pages_scanned == 1 and report.pages_zeroed == 0
    assert arena.stats().zero_pages == 0


def test_use_zero_pages_off_merges_zeros_into_one_frame(arena):
    arena.use_zero_pages = False
    arena.tile_pages = 1                # no tiles: test_tiles.py has the run on a tile
    a = arena.zeros(16 * PAGE_FLOATS)
    a[:] = 0.0
    report = arena.merge()
    assert report.pages_zeroed == 0 and report.pages_merged == 16 and report.frames_new == 1
    assert len(set(frame_offsets(a))) == 1
    assert not a.any()


@pytest.mark.parametrize("colours", [1, 4])
def test_zero_frames_are_shared_only_within_a_colour(arena, colours):
    """use_zero_pages off: a zero frame backs pages of one colour only (the
    virtual page number modulo zero_page_colours), as coloured zero pages do."""
    arena.use_zero_pages = False
    arena.zero_page_colours = colours
    arena.tile_pages = 1                # one frame a colour, not a tile
    z = arena.zeros(64 * PAGE_FLOATS)
    z[:] = 0.0
    report = arena.merge()
    assert report.pages_merged == 64 and report.frames_new == colours
    colours_of_frame = {}
    for page, offset in zip(page_addresses(z), frame_offsets(z)):
        colours_of_frame.setdefault(offset, set()).add(page // PAGE % colours)
    assert None not in colours_of_frame and len(colours_of_frame) == colours
    assert all(len(seen) == 1 for seen in colours_of_frame.values())
    assert arena.merge().pages_merged == 0          # a second pass changes nothing
    assert not z.any()


def test_pss_drops_by_what_was_merged(arena, rng):
    n = 2048                                     # 8 MiB each
    a = random_pages(arena, rng, n)
    copies = [arena.array(a) for _ in range(3)]
    z = arena.zeros(n * PAGE_FLOATS)
    z[:] = 0.0
    touch(a, z, *copies)
    before = process_pss()
    arena.merge()
    touch(a, z, *copies)
    saved = before - process_pss()
    ideal = (3 + 1) * n * PAGE                    # three copies and the zeros
    assert saved > 0.95 * ideal
    stats = arena.stats()
    assert stats.bytes_saved == ideal
    assert abs(stats.pss_bytes_saved - ideal) < 0.02 * ideal


def test_a_write_to_a_merged_page_changes_only_that_array(arena, rng):
    a = random_pages(arena, rng, 8)
    b, c = arena.array(a), arena.array(a)
    expected = a.copy()
    arena.merge()
    b[3 * PAGE_FLOATS + 5] = -1.0
    assert b[3 * PAGE_FLOATS + 5] == -1.0
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(c, expected)
    offsets = frame_offsets(b)
    assert offsets[3] is not None               # still the file mapping, now with a private copy
    assert pagemap(b)[3] & (PRESENT | FILE) == PRESENT
    assert arena.stats(b).pages_merged == 7
    assert arena.stats(b).pages_private == 1


def test_a_write_to_a_zero_page_lowers_the_count_without_a_pass(arena):
    a = arena.zeros(8 * PAGE_FLOATS)
    a[:] = 0.0
    arena.merge()
    a[2 * PAGE_FLOATS] = 7.0
    assert arena.stats().zero_pages == 7
    assert arena.stats(a).pages_private == 1


def test_unmerge_leaves_no_shared_page_and_the_same_contents(arena, rng):
    a = random_pages(arena, rng, 16)
    b = arena.array(a)
    z = arena.zeros(16 * PAGE_FLOATS)
    z[:] = 0.0
    expected = a.copy()
    arena.merge()
    report = arena.unmerge()
    assert report.pages_unmerged == 48
    for array in (a, b, z):
        entries = pagemap(array)
        assert all(e & (PRESENT | EXCLUSIVE | FILE) == PRESENT | EXCLUSIVE for e in entries)
        assert not any(zero_page_mapped(array) or [False])
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)
    assert not z.any()
    stats = arena.stats()
    assert (stats.pages_shared, stats.pages_sharing, stats.zero_pages) == (0, 0, 0)
    assert stats.frame_store_bytes == 0


def test_a_second_merge_finds_pages_broken_and_remerges_them(arena, rng):
    a = random_pages(arena, rng, 4)
    b = arena.array(a)
    arena.merge()
    b[0] = 42.0
    b[0] = a[0]                                  # written, but equal again
    assert arena.stats(b).pages_private == 1
    report = arena.merge()
    assert report.pages_merged == 1
    assert frame_offsets(a) == frame_offsets(b)


def test_max_page_sharing_caps_pages_per_frame(arena, rng):
    arena.max_page_sharing = 4
    a = random_pages(arena, rng, 2)
    copies = [arena.array(a) for _ in range(9)]
    arena.merge()
    per_page = [{frame_offsets(x)[i] for x in [a] + copies} for i in range(2)]
    assert all(len(frames) == 3 for frames in per_page)    # 10 pages, at most 4 on each
    for x in copies:
        np.testing.assert_array_equal(x, a)


def test_the_mapping_budget_is_kept_and_zero_pages_still_merge(arena, rng):
    # Every other page the same: each merge is a scattered run of one page.
    a = arena.empty(400 * PAGE_FLOATS)
    a[:] = rng.random(a.size)
    a.reshape(400, PAGE_FLOATS)[::2] = 1.0
    z = arena.zeros(64 * PAGE_FLOATS)
    z[:] = 0.0
    expected = a.copy()
    mappings_before = arena.stats().mappings
    arena.max_mappings = mappings_before + 20
    report = arena.merge()
    assert report.skipped["mapping_budget"] > 0
    assert report.pages_zeroed == 64
    assert arena.stats().mappings <= arena.max_mappings
    np.testing.assert_array_equal(a, expected)


def test_freeing_arrays_frees_their_frames(arena, rng):
    a = random_pages(arena, rng, 32)
    b = arena.array(a)
    arena.merge()
    assert arena.stats().frame_store_bytes == 32 * PAGE
    del a
    gc.collect()
    assert arena.stats().frame_store_bytes == 32 * PAGE   # b still maps them
    del b
    gc.collect()
    stats = arena.stats()
    assert (stats.frames_in_use, stats.frame_store_bytes, stats.pages_in_use) == (0, 0, 0)


def test_freed_pages_come_back_zeroed(arena, rng):
    a = random_pages(arena, rng, 8)
    b = arena.array(a)
    arena.merge()
    del a, b
    gc.collect()
    c = arena.empty(16 * PAGE_FLOATS)
    assert not c.any()
    assert frame_offsets(c) == [None] * 16


def test_unmergeable_arrays_are_unmerged_and_skipped(arena, rng):
    a = random_pages(arena, rng, 4)
    b = arena.array(a)
    arena.merge()
    arena.unmergeable(b)
    assert arena.stats(b).pages_merged == 0 and arena.stats(b).pages_unmergeable == 4
    report = arena.merge()
    assert report.skipped["unmergeable"] == 4 and report.pages_merged == 0
    arena.mergeable(b)
    assert arena.merge().pages_merged == 4


def test_arrays_outlive_a_closed_arena(rng):
    arena = pydedup.Arena(size=1 << 28)
    a = random_pages(arena, rng, 4)
    b = arena.array(a)
    arena.merge()
    arena.close()
    del arena
    gc.collect()
    b[0] = 5.0
    assert a[0] != 5.0 and b[0] == 5.0
    np.testing.assert_array_equal(a[1:], b[1:])


def test_a_closed_arena_refuses_work(rng):
    arena = pydedup.Arena(size=1 << 28)
    a = arena.zeros(10)
    arena.close()
    for call in (lambda: arena.zeros(3), arena.merge, arena.unmerge, arena.stats,
                 lambda: arena.stats(a)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_views_of_arena_arrays_merge_and_report(arena, rng):
    a = random_pages(arena, rng, 8).reshape(8, PAGE_FLOATS)
    b = arena.array(a)
    view = b[1::3, ::7]
    expected = view.copy()
    arena.merge()
    np.testing.assert_array_equal(view, expected)
    assert arena.stats(view).pages == 7         # rows 1 to 7
    assert arena.stats(view).pages_merged == 7


@pytest.mark.slow
def test_methods_are_safe_from_several_threads(arena):
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                a = arena.full(rng.integers(1, 40) * PAGE_FLOATS, float(seed))
                b = arena.array(a)
                arena.merge()
                assert (b == seed).all() and (a == seed).all()
                arena.stats()
                del a, b
        except Exception as e:                  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    gc.collect()
    arena.merge()
    assert arena.stats().pages_in_use == 0


NOTE_FIRST_PWRITE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/types.h>

/* At the first pwrite (a new frame: nothing else in a private arena
 * pwrites), how many pages of [PD_ZERO_AT) are still resident, into the
 * file PD_NOTE. */
static void note(void)
{
    static int noted;
    const char *at = getenv("PD_ZERO_AT"), *out = getenv("PD_NOTE");
    unsigned long addr, length;
    if (__atomic_fetch_add(&noted, 1, __ATOMIC_RELAXED) || at == NULL || out == NULL
            || sscanf(at, "%lx:%lx", &addr, &length) != 2)
        return;
    size_t n = length / 4096, resident = 0;
    unsigned char *vec = malloc(n);
    if (vec == NULL || mincore((void *)addr, length, vec) != 0)
        return;
    for (size_t i = 0; i < n; i++)
        resident += vec[i] & 1;
    FILE *f = fopen(out, "w");
    fprintf(f, "%zu\n", resident);
    fclose(f);
    free(vec);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
{
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (real == NULL)
        real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
    note();
    return real(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset)
{
    return pwrite(fd, buf, count, offset);
}
"""


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc to build the pwrite that looks")
@pytest.mark.parametrize("threads, huge_pages", [(1, "off"), (2, "off"), (2, "on")])
def test_a_merge_frees_the_zero_pages_it_has_looked_at_before_it_writes_later_frames(
        tmp_path, threads, huge_pages):
    """A chunk of zero pages, then a copied array: by the first frame the
    merge writes, the zero pages are freed, so that the frames take their
    memory (_remap.pxi free_zero_runs); with huge pages, in whole blocks.
    pwrite looks, from a preloaded library."""
    source, shim, note = tmp_path / "note.c", tmp_path / "note.so", tmp_path / "note"
    source.write_text(NOTE_FIRST_PWRITE)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(shim), str(source), "-ldl"],
                   check=True)
    done = run_python(f"""
        import json, os
        import numpy as np
        import pydedup
        with pydedup.Arena(size=1 << 29, threads={threads}, huge_pages={huge_pages!r}) as arena:
            zeros = arena.empty({CHUNK_PAGES * PAGE_FLOATS})
            zeros[:] = 0.0                              # resident, a chunk of them
            a = arena.array(np.random.default_rng(1).random(64 * {PAGE_FLOATS}))
            b = arena.array(a)
            os.environ["PD_ZERO_AT"] = f"{{zeros.ctypes.data:x}}:{{zeros.nbytes:x}}"
            report = arena.merge()
            print(json.dumps(dict(zeroed=report.pages_zeroed, merged=report.pages_merged,
                                  equal=bool(np.array_equal(a, b)), zero=not zeros.any())))
        """, env={"LD_PRELOAD": str(shim), "PD_NOTE": str(note)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out == dict(zeroed=CHUNK_PAGES, merged=2 * 64, equal=True, zero=True)
    # The zeros fill the first chunk (most of it, were they to begin later
    # in it); the copies lie after them.
    assert int(note.read_text()) < CHUNK_PAGES // 2
