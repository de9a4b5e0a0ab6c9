"""Processes, threads and memory: normlab in fork()ed workers, in many Python threads at once,
and over many calls."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

import normlab
from exercise_all import calls, public_functions
from together import run_together

FORK_TIMEOUT_S = 120


def test_every_public_function_is_exercised():
    assert public_functions() == set(calls("small")), "add the new function to tests/exercise_all.py"


def _results(size):
    return {name: fn() for name, fn in calls(size).items()}


def _same(a, b):
    assert set(a) == set(b)
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for u, v in zip(a[name], b[name]):
            assert u.dtype == v.dtype and u.shape == v.shape, name
            assert np.array_equal(u, v, equal_nan=True), name


def _child_results(size):
    return {"threads": normlab.get_num_threads(), "results": _results(size)}


@pytest.fixture
def parent_used_threads(num_threads):
    """The parent has run every function on a thread team before forking."""
    normlab.set_num_threads(2)
    expected = {size: _results(size) for size in ("small", "large")}
    yield expected


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() exists on POSIX only")
def test_fork_pool_workers_finish_with_correct_results(parent_used_threads):
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        answers = pool.map_async(_child_results, ["small", "large", "large", "small"]).get(FORK_TIMEOUT_S)
    for size, answer in zip(["small", "large", "large", "small"], answers):
        assert answer["threads"] == 1  # documented: forked children run single-threaded
        _same(answer["results"], parent_used_threads[size])


def _process_target(queue, size):
    queue.put(_child_results(size))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() exists on POSIX only")
def test_fork_process_finishes_with_correct_results(parent_used_threads):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_process_target, args=(queue, "large"))
    proc.start()
    try:
        answer = queue.get(timeout=FORK_TIMEOUT_S)
    finally:
        proc.join(FORK_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    _same(answer["results"], parent_used_threads["large"])


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_eight_python_threads_match_serial_calls_and_thread_count_stays_bounded(num_threads):
    normlab.set_num_threads(2)
    expected = {size: _results(size) for size in ("small", "large")}
    before = _os_threads()
    results, peak = [], [0]

    def work():
        for _ in range(3):
            for size in ("large", "small"):
                results.append((size, _results(size)))
                peak[0] = max(peak[0], _os_threads())

    errors = run_together(work, 8)
    assert not errors, errors
    assert len(results) == 8 * 3 * 2
    for size, got in results:
        _same(got, expected[size])
    # Documented bound: GNU libgomp keeps one worker team (num_threads - 1 threads) for each OS
    # thread that has called a parallel kernel.
    bound = before + 8 + 8 * (normlab.get_num_threads() - 1)
    assert peak[0] <= bound, (peak[0], bound)


@pytest.mark.openmp
def test_set_num_threads_from_one_thread_applies_to_calls_from_others(num_threads):
    seen = []
    normlab.set_num_threads(3)
    t = threading.Thread(target=lambda: seen.append(normlab.get_num_threads()))
    t.start()
    t.join()
    assert seen == [3]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's quarantine keeps freed memory; CI runs this test without it")
@pytest.mark.parametrize("name", sorted(calls("small")))
def test_ten_thousand_calls_do_not_grow_memory(name):
    fn = calls("small")[name]
    for _ in range(1000):  # warm up allocator caches
        fn()
    before = _rss_bytes()
    for _ in range(10_000):
        fn()
    grown = _rss_bytes() - before
    assert grown < 1 << 20, f"{name}: RSS grew by {grown} bytes over 10,000 calls"
