"""pydedup.worker_init() in the stdlib's and joblib's process pools, and in a
process where pydedup cannot work. Real pools, real processes."""
import concurrent.futures
import importlib
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pydedup
from pydedup import procfs, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def need(module):
    """Import `module`, or skip (a failure in CI, which installs the test extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def in_worker(seed):
    """What a pool's task sees: whether the array it makes, and one a thread
    of its own makes, are in the process's arena; its scanner; the data."""
    import threading
    arena = pydedup.installed_arena()
    a = np.random.default_rng(seed).random(1 << 16)          # 512 KiB
    from_thread = []
    thread = threading.Thread(target=lambda: from_thread.append(np.zeros(1 << 16)))
    thread.start()
    thread.join()
    lo, hi = testing.address_range(arena) if arena is not None else (0, 0)
    return dict(pid=os.getpid(), in_arena=lo <= a.ctypes.data < hi,
                thread_in_arena=lo <= from_thread[0].ctypes.data < hi,
                again_same=pydedup.worker_init() is arena,
                run=None if arena is None else arena.run,
                scanning=bool(arena is not None and arena.scanner is not None
                              and arena.scanner.running),
                data=a)


def check(results, seeds):
    assert results, "no task ran"
    for seed, r in zip(seeds, results):
        assert r["in_arena"] and r["thread_in_arena"], r
        assert r["again_same"] and r["run"] == 1 and r["scanning"], r
        assert np.array_equal(r["data"], np.random.default_rng(seed).random(1 << 16))


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_process_pool_executor(method):
    seeds = list(range(4))
    context = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context,
                                                initializer=pydedup.worker_init) as pool:
        results = list(pool.map(in_worker, seeds))
    check(results, seeds)
    assert os.getpid() not in {r["pid"] for r in results}


def test_process_pool_forked_from_a_worker():
    """A pool forked from a process that called worker_init(): the child keeps
    the inherited arena and gets a scanner thread of its own."""
    script = textwrap.dedent(f"""
        import concurrent.futures, multiprocessing, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import pydedup, test_workers
        parent = pydedup.worker_init()
        assert parent is not None and parent.scanner.running
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context,
                                                    initializer=pydedup.worker_init) as pool:
            results = list(pool.map(test_workers.in_worker, [7]))
        test_workers.check(results, [7])
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_multiprocessing_pool():
    seeds = [3, 4]
    with multiprocessing.get_context("spawn").Pool(2, initializer=pydedup.worker_init) as pool:
        results = pool.map(in_worker, seeds)
    check(results, seeds)


def test_joblib_loky():
    joblib = need("joblib")
    seeds = list(range(4))
    results = joblib.Parallel(n_jobs=2, backend="loky", initializer=pydedup.worker_init)(
        joblib.delayed(in_worker)(seed) for seed in seeds)
    check(results, seeds)


def test_knobs_from_the_environment_and_arguments():
    script = textwrap.dedent("""
        import pydedup
        a = pydedup.worker_init(pages_to_scan=123)
        print(a.run, a.pages_to_scan, a.sleep_millisecs)
    """)
    env = dict(os.environ, PYDEDUP_SLEEP_MILLISECS="77", PYDEDUP_PAGES_TO_SCAN="5")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "123", "77"]
    env["PYDEDUP_RUN"] = "0"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.stdout.split()[0] == "0", done.stderr


def test_bad_knob_is_the_callers_error():
    with pytest.raises(ValueError, match="knob run accepts"):
        pydedup.worker_init(run=5)
    with pytest.raises(TypeError, match="unknown knob"):
        pydedup.worker_init(runn=1)
    assert pydedup.installed_arena() is None


def test_where_pydedup_cannot_work_it_logs_once_and_runs_plain():
    """No file descriptor left for the frame store's memfd: a real failure of
    the kernel call, as on a kernel without memfd."""
    script = textwrap.dedent("""
        import logging, os, resource
        import numpy as np
        import pydedup
        from pydedup import workers
        logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        assert pydedup.worker_init() is None
        assert pydedup.worker_init() is None
        a = np.ones(1 << 20)
        assert a.sum() == 1 << 20 and pydedup.installed_arena() is None
        print("REASON", workers.unavailable())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    logged = [line for line in done.stderr.splitlines() if line.startswith("LOG pydedup")]
    assert len(logged) == 1 and "running plain numpy" in logged[0], done.stderr
    assert "REASON OSError" in done.stdout


def test_pss_meter_reads_pss_at_its_pace():
    """The meter's value is PSS when it reads it, and last PSS plus RSS growth
    in between; a big drop of RSS, or its pace (a time source the test
    drives), takes a new reading."""
    now = [0.0]
    meter = pydedup.workers.PssMeter(min_interval=10.0, clock=lambda: now[0])
    first = meter()
    assert meter.pss_readings == 1
    assert abs(first - procfs.process_pss()) < 8 << 20
    grown = np.ones(64 << 17)                     # 64 MiB written: RSS and PSS grow alike
    estimate = meter()
    assert meter.pss_readings == 1
    assert abs(estimate - procfs.process_pss()) < 8 << 20
    now[0] = 11.0                                 # its pace: read again
    meter()
    assert meter.pss_readings == 2
    del grown                                     # RSS drops by more than 1/16: read again
    after = meter()
    assert meter.pss_readings == 3
    assert abs(after - procfs.process_pss()) < 8 << 20
    meter()
    assert meter.pss_readings == 3
    with pytest.raises(ValueError, match="cost_share"):
        pydedup.workers.PssMeter(cost_share=0)


def test_pss_meter_of_an_ended_process_raises():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    meter = pydedup.workers.PssMeter(child.pid)
    with pytest.raises(OSError):
        meter()


def on_the_store(seed):
    """A pool task: make data (in the worker's arena), merge, and wait until
    another worker on the same store maps the same frames (so the pool's two
    tasks run in two workers); the data and what the arena's stats say."""
    import time
    arena = pydedup.installed_arena()
    assert arena is not None, "worker_init() installed no arena"
    a = np.random.default_rng(seed).random(1 << 19)           # 4 MiB
    deadline = time.monotonic() + 30.0
    while True:
        arena.merge()
        s = arena.stats()
        if (len(s.shared_members) == 2 and s.shared_pages > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return dict(pid=os.getpid(), store=s.shared_store, members=sorted(s.shared_members),
                shared_pages=s.shared_pages, data=a)


@pytest.mark.parametrize("how", ["initargs", "environment"])
def test_pool_workers_share_one_store(how, monkeypatch):
    """ProcessPoolExecutor (spawn) with pydedup.worker_init naming a shared
    store, by argument or PYDEDUP_SHARED: two workers loading the same data
    end up on one store, their pages on the same frames, the results exact."""
    import functools
    import uuid
    name = f"test-pool-{uuid.uuid4().hex[:8]}"
    if how == "environment":
        monkeypatch.setenv("PYDEDUP_SHARED", name)
        initializer = pydedup.worker_init
    else:
        initializer = functools.partial(pydedup.worker_init, shared=name)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context,
                                                initializer=initializer) as pool:
        results = list(pool.map(on_the_store, [5, 5]))
    pids = {r["pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids, results
    expected = np.random.default_rng(5).random(1 << 19)
    for r in results:
        assert r["store"] == name
        assert r["members"] == sorted(pids), r["members"]
        assert r["shared_pages"] > 0, r
        assert np.array_equal(r["data"], expected)
