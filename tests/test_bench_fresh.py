"""pydedup.bench.fresh: the memory condition benchmarks time merges under
(free page reporting of a guest). The sysfs counter is replaced by a file
of the test's, so every path runs with or without page reporting."""
import os
import resource
import threading
import time

import pytest

from pydedup import procfs
from pydedup.bench import fresh


def put(path, value):
    """Write the counter as the kernel shows it: whole, never a file half
    written (write_text truncates first, and a reader could see it empty)."""
    part = path.with_name(path.name + ".part")
    part.write_text(f"{value}\n")
    os.replace(part, path)


@pytest.fixture
def counter(tmp_path, monkeypatch):
    path = tmp_path / "reported_kib"
    path.write_text("1000\n")
    monkeypatch.setattr(fresh, "REPORTED_KIB", str(path))
    return path


def test_reported_kib_reads_the_counter_or_says_none(counter, monkeypatch):
    assert fresh.reported_kib() == 1000
    counter.write_text("not a number\n")
    assert fresh.reported_kib() is None
    monkeypatch.setattr(fresh, "REPORTED_KIB", str(counter) + ".missing")
    assert fresh.reported_kib() is None


def test_wait_quiet_returns_at_once_without_page_reporting(monkeypatch, tmp_path):
    monkeypatch.setattr(fresh, "REPORTED_KIB", str(tmp_path / "missing"))
    start = time.monotonic()
    assert fresh.wait_quiet(seconds=5.0) == 0.0
    assert time.monotonic() - start < 1.0


def test_wait_quiet_waits_until_reporting_holds_still(counter):
    # The counter moves for 0.6 s, then holds: the wait ends 0.3 s after its
    # last change, not 0.3 s after the start.
    def report():
        for i in range(6):
            time.sleep(0.1)
            put(counter, 2000 + i)
    writer = threading.Thread(target=report)
    writer.start()
    waited = fresh.wait_quiet(seconds=0.3, timeout=10.0, poll=0.02)
    writer.join()
    assert 0.85 <= waited < 5.0


def test_wait_quiet_gives_up_at_the_timeout(counter):
    stop = threading.Event()

    def report():
        i = 0
        while not stop.is_set():
            i += 1
            put(counter, i)
            time.sleep(0.01)
    writer = threading.Thread(target=report)
    writer.start()
    try:
        waited = fresh.wait_quiet(seconds=5.0, timeout=0.4, poll=0.02)
    finally:
        stop.set()
        writer.join()
    assert 0.4 <= waited < 2.0


def test_warm_touches_then_gives_back_its_memory():
    before = procfs.process_pss()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fresh.warm(64)
    touched = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert touched >= (64 << 20) // fresh.PAGE             # a fault a page: every page taken
    assert procfs.process_pss() - before < 16 << 20       # unmapped: nothing kept
    fresh.warm(0)


@pytest.mark.parametrize("call", [lambda: fresh.warm(-1),
                                  lambda: fresh.wait_quiet(seconds=-1),
                                  lambda: fresh.wait_quiet(poll=0)])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
