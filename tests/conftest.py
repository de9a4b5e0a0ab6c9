"""Shared fixtures: every kernel test runs on every SIMD target this machine supports."""

import numpy as np
import pytest

import normlab


@pytest.fixture(params=normlab.cpu_targets())
def cpu_target(request):
    """Runs the test with normlab's kernels switched to each supported SIMD target."""
    previous = normlab.get_cpu_target()
    normlab.set_cpu_target(request.param)
    yield request.param
    normlab.set_cpu_target(previous)


@pytest.fixture
def num_threads():
    """Restores normlab's thread count after a test that changes it."""
    previous = normlab.get_num_threads()
    yield previous
    normlab.set_num_threads(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
