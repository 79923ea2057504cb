import gc
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

import pydedup

# Hypothesis budgets (docs/testing.md). `ci`, the default, is derandomized:
# the same examples every run, so CI never fails on a draw it did not make
# before. `nightly` (--hypothesis-profile nightly, or PYDEDUP_NIGHTLY=1)
# draws fresh examples and runs far more steps.
_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=40, stateful_step_count=50, derandomize=True,
                          **_COMMON)
settings.register_profile("nightly", max_examples=1000, stateful_step_count=200, **_COMMON)
# `quick`: a few examples, no shrinking, for working on the tests themselves.
settings.register_profile("quick", max_examples=5, stateful_step_count=50,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.load_profile("nightly" if os.environ.get("PYDEDUP_NIGHTLY") == "1" else "ci")


def pytest_collection_finish(session):
    # What is imported and collected by now lives for the whole run: keep it
    # out of the collector's passes. Tests and the arena fixture call
    # gc.collect() to free arrays, 400+ times in the quick loop; each walked
    # every object of numpy, hypothesis and pytest (55-80 ms) before this.
    gc.freeze()


def pytest_addoption(parser):
    parser.addoption("--stress", action="store_true",
                     help="run the long stress test (tests/test_stress.py)")


@pytest.fixture
def arena():
    a = pydedup.Arena(size=1 << 30)   # not `with`: that would put the test's numpy in the arena
    yield a
    a.close()
    gc.collect()


@pytest.fixture(params=["uffd", "mprotect"])
def barrier(request):
    """Each write barrier in turn (a test that takes this runs twice); uffd
    skips where this process may not use userfaultfd."""
    if request.param == "uffd" and not pydedup.features()["userfaultfd"]:
        pytest.skip("this process may not use userfaultfd (it takes CAP_SYS_PTRACE or "
                    "vm.unprivileged_userfaultfd=1)")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)
