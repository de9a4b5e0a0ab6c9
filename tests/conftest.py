"""Shared fixtures: every kernel test runs on every SIMD target this machine supports."""

import numpy as np
import pytest

import normlab


def pytest_configure(config):
    config.addinivalue_line("markers", "openmp: needs a build with OpenMP threads (skipped without)")
    if not normlab._core.openmp:
        # Tests that compare thread counts still ask for them; the build's warning is expected.
        config.addinivalue_line("filterwarnings", "ignore:normlab was built without OpenMP:RuntimeWarning")


def pytest_collection_modifyitems(config, items):
    """A build without OpenMP runs one thread whatever it is asked: tests of thread counts
    cannot hold there (test_runtime's test_build_without_openmp_* test that build instead)."""
    if normlab._core.openmp:
        return
    skip = pytest.mark.skip(reason="normlab was built without OpenMP: one thread only")
    for item in items:
        if "openmp" in item.keywords:
            item.add_marker(skip)


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
