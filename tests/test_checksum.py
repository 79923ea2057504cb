"""The page checksum (_checksum.h): every version this CPU runs gives the
same answer, for any page size; it spreads pages that differ by one bit; it
is the same in every process; and it does not change unnoticed."""
import subprocess
import sys

import numpy as np
import pytest

from pydedup._fast import checksum_seconds, page_checksums

PAGE = 4096


def one(page):
    answers = set(page_checksums(page).values())
    assert len(answers) == 1, page_checksums(page)
    return answers.pop()


@pytest.mark.parametrize("size", [64, PAGE, 2 * PAGE, 16 * PAGE + 64])
def test_every_version_gives_the_same_checksum(size):
    rng = np.random.default_rng(size)
    for page in [np.zeros(size, np.uint8), np.full(size, 0xFF, np.uint8),
                 rng.integers(0, 256, size, dtype=np.uint8),
                 np.frombuffer(np.full(size // 8, np.nan).tobytes(), np.uint8)]:
        one(page)


def test_an_x86_cpu_runs_the_vector_versions():
    import platform
    if platform.machine() != "x86_64":
        pytest.skip(f"no SSE2 or AVX2 on {platform.machine()}: the portable version only")
    assert list(page_checksums(np.zeros(64, np.uint8)))[-2:] == ["sse2", "portable"]


def test_pages_that_differ_in_one_bit_have_different_checksums():
    page = np.random.default_rng(3).integers(0, 256, PAGE, dtype=np.uint8)
    seen = {one(page)}
    for bit in range(PAGE * 8):
        flipped = page.copy()
        flipped[bit // 8] ^= 1 << (bit % 8)
        seen.add(one(flipped))
    assert len(seen) == PAGE * 8 + 1


def test_the_low_32_bits_spread_pages():
    # The trees use the low 32 bits: 20,000 pages of few distinct words (a
    # sparse matrix's rows: mostly zero, a few ones) must not bunch up.
    # A random function of 32 bits gives 20,000 pages 0.05 collisions.
    rng = np.random.default_rng(4)
    pages, sums = set(), set()
    for _ in range(20_000):
        page = np.zeros(PAGE // 8)
        page[rng.integers(0, PAGE // 8, 3)] = 1.0
        pages.add(page.tobytes())
        sums.add(one(page.view(np.uint8)) & 0xFFFFFFFF)
    assert len(sums) >= len(pages) - 1


def test_the_checksum_is_the_same_in_another_process():
    page = np.random.default_rng(5).integers(0, 256, PAGE, dtype=np.uint8)
    out = subprocess.run(
        [sys.executable, "-c", "import sys, numpy as np; from pydedup._fast import page_checksums; "
         "print(page_checksums(np.frombuffer(sys.stdin.buffer.read(), np.uint8)))"],
        input=page.tobytes(), capture_output=True, check=True)
    assert out.stdout.decode().strip() == str(page_checksums(page))


def test_the_checksum_is_pinned():
    # Processes sharing a store must agree on it: a change to the checksum
    # changes SHARED_VERSION (_shared.pxd) with these values.
    assert one(np.zeros(PAGE, np.uint8)) == 3387910307819238277
    assert one(np.arange(PAGE, dtype=np.uint32).view(np.uint8)[:PAGE]) == 4219038211077913355


def test_a_length_that_is_not_whole_lines_is_refused():
    with pytest.raises(ValueError, match="multiple of 64 bytes"):
        page_checksums(np.zeros(100, np.uint8))


def test_checksum_seconds_times_every_version_and_refuses_a_bad_page_size():
    pages = np.zeros(2 * PAGE, np.uint8)
    seconds = checksum_seconds(pages, PAGE, 2)
    assert set(seconds) == set(page_checksums(pages[:PAGE]))
    assert all(s >= 0 for s in seconds.values())
    with pytest.raises(ValueError, match="whole pages"):
        checksum_seconds(pages, 100, 1)
