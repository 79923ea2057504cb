import gc

import numpy as np
import pytest

import pydedup


@pytest.fixture
def arena():
    with pydedup.Arena(size=1 << 30) as a:
        yield a
    gc.collect()


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)
