"""Run the state machine of test_state_machine.py outside pytest and say how
many examples, steps and forks it made (docs/testing.md quotes it):

    python tests/state_machine_steps.py ci                 # a profile of conftest.py
    python tests/state_machine_steps.py nightly 200 100    # its examples x steps, random

Steps are counted through the invariant checker, which the machine calls
once after every step and twice more an example (before the first step and
in teardown); forks through os.fork."""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from hypothesis import settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

import pydedup.pages  # noqa: E402

import conftest  # noqa: E402,F401 - registers the profiles
import test_state_machine  # noqa: E402

counts = dict(checks=0, forks=0, examples=0)


def counting(function, key):
    def counted(*args, **kwargs):
        counts[key] += 1
        return function(*args, **kwargs)
    return counted


def main(profile, examples=None, steps=None):
    pydedup.pages.Pages.check_invariants = counting(pydedup.pages.Pages.check_invariants, "checks")
    os.fork = counting(os.fork, "forks")
    machine = test_state_machine.ArenaMachine
    machine.__init__ = counting(machine.__init__, "examples")
    size = {} if examples is None else dict(max_examples=int(examples),
                                           stateful_step_count=int(steps), derandomize=False)
    start = time.perf_counter()
    run_state_machine_as_test(machine, settings=settings(settings.get_profile(profile), **size))
    print(f"profile {profile} {size}: {counts['examples']} examples, "
          f"{counts['checks'] - 2 * counts['examples']} steps, {counts['forks']} forks, "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
