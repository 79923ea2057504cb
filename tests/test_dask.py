"""pydedup.dask, the preload, in real clusters on loopback: LocalCluster
with worker processes, and a `dask worker` process started with the preload
flags. Skipped without distributed (a failure in CI, which installs it)."""
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from test_workers import need

import pydedup
from pydedup import procfs, testing

# Found, not imported: importing distributed at collection would put its
# hundred MiB in the heap of every test of the run (some measure process PSS).
if importlib.util.find_spec("distributed") is None:
    need("distributed")


def Client(*args, **kwargs):
    from distributed import Client
    return Client(*args, **kwargs)


def LocalCluster(*args, **kwargs):
    from distributed import LocalCluster
    return LocalCluster(*args, **kwargs)


def config_set(values):
    import dask.config
    return dask.config.set(values)


def dask_stats():
    """pydedup.dask.stats, run in a worker."""
    import pydedup.dask
    return pydedup.dask.stats()

MiB = 1 << 20
PRELOAD = dict(preload=["pydedup.dask"], preload_nanny=["pydedup.dask"])
# The scheduler's memory for a worker is the worker's reading at its last
# heartbeat; PSS read now differs by what the worker's own Python allocated
# since (comm buffers, the reply): a few MiB. The data below makes RSS and
# PSS differ by 384 MiB, so 16 MiB tells the two apart by a wide margin.
TOLERANCE = 16 * MiB

_HELD: list = []          # in a worker process: data tasks keep between tasks


def workers_info(client):
    """The scheduler's record of each worker, asked for now. Not
    client.scheduler_info(): distributed's own periodic refresh of it asks
    for no workers and can land between the sync update and its return,
    leaving "workers" empty (seen with distributed 2026.8)."""
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def cluster(n_workers=2, **kwargs):
    return LocalCluster(n_workers=n_workers, threads_per_worker=2, processes=True,
                        dashboard_address=None, worker_dashboard_address=None, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def environment():
    """A Nanny in this process writes distributed.nanny.pre-spawn-environ
    (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS, ...) into os.environ for the
    worker it spawns; later tests' subprocesses must not inherit it (glibc
    then maps big allocations one by one: tests at the mapping limit fail)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def client(environment):
    with config_set({"pydedup.sleep-millisecs": 77, "pydedup.pages_to_scan": 4096}):
        with cluster(**PRELOAD) as c, Client(c) as client:
            yield client


def made_in_task(seed):
    """Arrays a task makes, in its own thread and in a thread it starts:
    whether they lie in the worker's arena, and the data."""
    import threading
    arena = pydedup.installed_arena()
    lo, hi = testing.address_range(arena)
    a = np.random.default_rng(seed).random((256, 256))
    other = []
    thread = threading.Thread(target=lambda: other.append(np.ones(1 << 15)))
    thread.start()
    thread.join()
    return (lo <= a.ctypes.data < hi, lo <= other[0].ctypes.data < hi,
            threading.current_thread().name, a)


def test_task_arrays_are_in_the_arena_and_round_trip(client):
    futures = [client.submit(made_in_task, seed, pure=False) for seed in range(8)]
    results = client.gather(futures)
    for seed, (in_arena, thread_in_arena, thread, a) in enumerate(results):
        assert in_arena and thread_in_arena, thread
        assert "Dask-Default-Threads" in thread
        assert np.array_equal(a, np.random.default_rng(seed).random((256, 256)))
    assert client.run(os.getpid).keys() == workers_info(client).keys()


def test_dask_array_results_round_trip(client):
    da = need("dask.array")
    x = np.random.default_rng(5).random((600, 500))
    y = da.from_array(x, chunks=(100, 100))
    z = ((y * 2 + 1).T - np.sqrt(y.T)).rechunk((250, 50))       # elementwise: exact as numpy
    assert np.array_equal(z.compute(), (x * 2 + 1).T - np.sqrt(x.T))
    [future] = client.scatter([x])
    assert np.array_equal(client.submit(np.copy, future).result(), x)


def test_knobs_from_dask_config_and_background_scanner(client):
    def knobs():
        arena = pydedup.installed_arena()
        return arena.run, arena.sleep_millisecs, arena.pages_to_scan, arena.scanner.running
    assert set(client.run(knobs).values()) == {(1, 77, 4096, True)}


def hold_merged(n_mib):
    """Keep (in the worker) data of n_mib, three copies of it and n_mib of
    written zeros; merge; read every page, so RSS counts each mapping of a
    shared frame."""
    base = np.random.default_rng(1).random(n_mib * MiB // 8)
    zeros = np.empty_like(base)
    zeros[:] = 0
    held = [base, zeros] + [base.copy() for _ in range(3)]
    pydedup.installed_arena().merge()
    _HELD.append(held)
    return sum(float(a[::512].sum()) for a in held)        # one value a page


def drop_held():
    _HELD.clear()


def test_scheduler_sees_the_workers_pss(client):
    worker = sorted(workers_info(client))[0]
    total = client.submit(hold_merged, 128, workers=[worker], pure=False).result()
    assert total == 4 * float(np.random.default_rng(1).random(16 * MiB)[::512].sum())
    try:
        seen = pss = rss = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = workers_info(client)[worker]["metrics"]["memory"]
            counters = client.run(dask_stats, workers=[worker])[worker]
            pss, rss = counters["process_pss_bytes"], counters["process_rss_bytes"]
            if abs(seen - pss) <= TOLERANCE:
                break
            time.sleep(0.25)
        assert abs(seen - pss) <= TOLERANCE, (seen, pss, rss)
        # RSS counts the four mappings of each merged frame; PSS one share each.
        assert rss - pss > 300 * MiB, (pss, rss)
        assert seen < rss - 300 * MiB
        assert counters["installed"] and counters["pages_sharing"] >= 3 * 128 * MiB // procfs.PAGE_SIZE
        metrics = workers_info(client)[worker]["metrics"]
        assert metrics["pydedup"]["installed"]
    finally:
        client.run(drop_held, workers=[worker])


def test_stats_from_the_client(client):
    counters = client.run(dask_stats)
    assert len(counters) == 2
    for c in counters.values():
        assert c["installed"] and c["reason"] is None
        assert c["memory_reported"] > 0 and c["allocator_allocations"] >= 0
        assert {"pages_shared", "pages_sharing", "pss_bytes_saved"} <= c.keys()


def hold_same_data_and_merge():
    arena = pydedup.installed_arena()
    _HELD.append(arena.array(np.random.default_rng(11).random(MiB)))    # 8 MiB, on every worker
    arena.merge()


def shared_counters():
    s = pydedup.installed_arena().stats()
    return s.shared_store, s.shared_members, s.shared_pages


def test_workers_of_a_cluster_share_one_frame_store(client):
    client.run(hold_same_data_and_merge)
    counters = client.run(shared_counters)
    pids = set(client.run(os.getpid).values())
    stores = {store for store, _, _ in counters.values()}
    assert len(stores) == 1 and stores.pop().startswith("dask-")
    for _store, members, shared_pages in counters.values():
        assert pids <= set(members)
        assert shared_pages >= 8 * MiB // os.sysconf("SC_PAGE_SIZE")   # the data all hold, once


def over_by_rss(n_mib, copies, seconds):
    """Hold data and `copies` copies of it, merged as they are made, reading
    every page again and again for `seconds`: RSS counts each copy, PSS one."""
    arena = pydedup.installed_arena()
    held = [np.random.default_rng(2).random(n_mib * MiB // 8)]
    for _ in range(copies):
        held.append(held[0].copy())
        arena.merge()
    peak_rss = peak_pss = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for a in held:
            a[::512].sum()
        peak_rss = max(peak_rss, procfs.process_rss())
        peak_pss = max(peak_pss, procfs.process_pss())
        time.sleep(0.05)
    return os.getpid(), peak_rss, peak_pss


@pytest.mark.parametrize("terminate_by_pss", [True, False], ids=["preload-nanny", "plain-nanny"])
def test_worker_over_its_limit_by_rss_but_not_pss(terminate_by_pss):
    """The nanny terminates a worker over `terminate` (95%) of its limit: by
    PSS with --preload-nanny pydedup.dask (the worker lives), by RSS without
    (the same task, the worker is killed: the test can tell the two apart)."""
    limit = 600 * MiB
    kwargs = PRELOAD if terminate_by_pss else dict(preload=["pydedup.dask"])
    with config_set({"distributed.scheduler.allowed-failures": 0}):
        with cluster(1, memory_limit=limit, **kwargs) as c, Client(c) as client:
            [before] = client.run(os.getpid).values()
            future = client.submit(over_by_rss, 128, 4, 3.0, pure=False)
            if terminate_by_pss:
                pid, peak_rss, peak_pss = future.result(timeout=60)
                assert pid == before
                assert peak_rss > 0.95 * limit > peak_pss, (peak_rss, peak_pss)
            else:
                with pytest.raises(Exception, match="KilledWorker|died|killed"):
                    future.result(timeout=60)


def test_without_the_preload_dask_is_plain():
    def plain(dask_worker):
        from numpy._core.multiarray import get_handler_name
        return (pydedup.installed_arena() is None, get_handler_name(np.ones(1 << 16)),
                type(dask_worker.monitor).get_process_memory is not None
                and "get_process_memory" not in vars(dask_worker.monitor))
    with cluster(1) as c, Client(c) as client:
        assert list(client.run(plain).values()) == [(True, "default_allocator", True)]


def test_dask_worker_process_with_the_preload_flags(tmp_path):
    log = tmp_path / "worker.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(    # the tasks' functions are this module's
        [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]))
    with LocalCluster(n_workers=0, processes=True, dashboard_address=None) as c, Client(c) as client, \
            open(log, "w") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", c.scheduler_address,
             "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GiB",
             "--preload", "pydedup.dask", "--preload-nanny", "pydedup.dask"],
            stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
        try:
            client.wait_for_workers(1, timeout=60)
            in_arena, _, _, a = client.submit(made_in_task, 11, pure=False).result(timeout=60)
            assert in_arena and np.array_equal(a, np.random.default_rng(11).random((256, 256)))
            [counters] = client.run(dask_stats).values()
            assert counters["installed"]
            [meter] = client.run(lambda dask_worker: type(dask_worker.monitor.get_process_memory)
                                 .__name__).values()
            assert meter == "PssMeter"
            [check] = client.run(lambda dask_worker: dask_worker.periodic_callbacks["memory_monitor"]
                                 .callback.func.__name__, nanny=True).values()
            assert check == "_terminate_check"
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    assert "allocates in an arena, reporting memory as PSS" in log.read_text()


def test_preload_on_a_scheduler_is_refused():
    import pydedup.dask
    with pytest.raises(TypeError, match="workers and nannies"):
        pydedup.dask.dask_setup(object())
