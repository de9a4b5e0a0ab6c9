"""Processes, threads and memory: normlab in fork()ed workers, in many Python threads at once,
and over many calls."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import sys
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


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_bytes_in_use():
    """glibc's count of the bytes malloc has handed out and not had back (C++ new, NumPy's
    buffers, large Python objects); None where the C library has no mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CALLS = 10_000


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's quarantine keeps freed memory; CI runs this test without it")
@pytest.mark.parametrize("name", sorted(calls("small")))
def test_ten_thousand_calls_do_not_grow_memory(name):
    # Counted in allocations, not pages: the resident size jumps by up to 2 MiB whenever the
    # kernel merges heap pages into a transparent huge page (CI once saw 504 pages at once).
    # A leak of one allocation per call grows the counts by CALLS blocks or CALLS * 16+ bytes;
    # the first interval after warm-up also fills Python's free lists (up to 2,000 blocks here).
    fn = calls("small")[name]
    for _ in range(1000):  # warm up allocator caches
        fn()
    malloc_before, blocks_before = _malloc_bytes_in_use(), sys.getallocatedblocks()
    rss_before = _rss_bytes() if malloc_before is None and os.path.exists("/proc/self/statm") else None
    for _ in range(CALLS):
        fn()
    blocks = sys.getallocatedblocks() - blocks_before
    assert blocks < CALLS // 2, f"{name}: {blocks} more Python blocks over {CALLS} calls"
    if malloc_before is not None:
        grown = _malloc_bytes_in_use() - malloc_before
        assert grown < CALLS * 16, f"{name}: malloc holds {grown} more bytes after {CALLS} calls"
    elif rss_before is not None:
        grown = _rss_bytes() - rss_before
        assert grown < 4 << 20, f"{name}: RSS grew by {grown} bytes over {CALLS} calls"


try:
    import ml_dtypes

    DATA_DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
except ImportError:  # a test dependency; without it the bfloat16 case is not collected
    DATA_DTYPES = [np.float32, np.float64, np.float16]


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A copy of `a` at an address one byte past its dtype's alignment (as a view at an odd byte
    offset of a buffer is); one-byte dtypes are always aligned and come back as they are."""
    if a.dtype.alignment == 1:
        return a
    buf = np.empty(a.nbytes + 1, np.uint8)
    m = buf[1:].view(a.dtype).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned and m.flags.c_contiguous
    return m


@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("size", ["small", "large"])
def test_misaligned_inputs_give_the_aligned_results(cpu_target, num_threads, rng, dtype, size):
    """Every norm given misaligned data, weights and statistics returns bitwise what it returns
    for aligned copies of them (the kernels load whole elements, so misaligned ones are copied
    first; under UBSan, CI's sanitizer stage, a misaligned load would fail the test)."""
    from exercise_all import _as_tuple, _norm_calls

    normlab.set_num_threads(1 if size == "small" else 2)
    rows, cols, n, c, hw = (8, 64, 2, 8, 6) if size == "small" else (256, 1024, 4, 16, 64)
    pdtype = np.float64 if dtype is np.float64 else np.float32
    data = [(rng.standard_normal(s) * 3 + 1).astype(dtype)
            for s in [(rows, cols)] * 3 + [(n, c, hw, hw)] * 2]
    params = [rng.standard_normal(k).astype(pdtype) for k in (cols, cols, c, c)]
    expected = _norm_calls(*data[:3], *params[:2], *data[3:], *params[2:])
    got = _norm_calls(*map(_misaligned, data[:3]), *map(_misaligned, params[:2]),
                      *map(_misaligned, data[3:]), *map(_misaligned, params[2:]))
    for name in expected:
        want, result = _as_tuple(expected[name]()), _as_tuple(got[name]())
        assert len(result) == len(want), name
        for u, v in zip(want, result):
            np.testing.assert_array_equal(v, u, err_msg=name)
    x, dy, w = data[0], data[1], params[0]
    _, mean, rstd = normlab.layer_norm(x, w, w, return_stats=True)
    for want, result in zip(normlab.layer_norm_backward(dy, x, mean, rstd, w),
                            normlab.layer_norm_backward(dy, x, _misaligned(mean), _misaligned(rstd), w)):
        np.testing.assert_array_equal(result, want)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
def test_misaligned_images_and_labels_give_the_aligned_results(cpu_target, rng, dtype):
    image = (rng.random((300, 200)) < 0.45).astype(dtype) * 7
    labels, count, stats = normlab.label(image, 8, return_stats=True)
    got, got_count, got_stats = normlab.label(_misaligned(image), 8, return_stats=True)
    assert got_count == count
    np.testing.assert_array_equal(got, labels)
    for key, value in normlab.component_stats(_misaligned(labels), count).items():
        np.testing.assert_array_equal(value, stats[key], err_msg=key)
        np.testing.assert_array_equal(got_stats[key], stats[key], err_msg=key)
    np.testing.assert_array_equal(normlab.largest_component(_misaligned(image)), normlab.largest_component(image))
    np.testing.assert_array_equal(normlab.remove_small_components(_misaligned(image), 5),
                                  normlab.remove_small_components(image, 5))


def test_misaligned_out_is_refused_by_name():
    """A misaligned ``out`` is a ValueError naming it: results are never written to a hidden
    copy, and the kernels store whole elements."""
    x = np.ones((4, 64), np.float32)
    img = np.ones((2, 3, 4, 4), np.float32)
    image = np.ones((5, 6), np.uint8)
    calls = [
        (lambda o: normlab.layer_norm(x, out=o), x),
        (lambda o: normlab.rms_norm(x, out=o), x),
        (lambda o: normlab.batch_norm(img, out=o), img),
        (lambda o: normlab.label(image, out=o), np.zeros((5, 6), np.int32)),
    ]
    for call, out in calls:
        with pytest.raises(ValueError, match=r"^out must be aligned to its dtype's \d bytes"):
            call(_misaligned(out))
    with pytest.raises(ValueError, match=r"^sum_out must be aligned to its dtype's 4 bytes"):
        normlab.add_layer_norm(x, x, sum_out=_misaligned(x))
    with pytest.raises(ValueError, match=r"^out must be aligned to its dtype's 4 bytes"):
        normlab.layer_norm_backward(x, x, np.zeros(4, np.float32), np.ones(4, np.float32), out=_misaligned(x))
    mean = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"^running_mean must be aligned"):
        normlab.batch_norm(img, running_mean=_misaligned(mean), running_var=np.ones(3, np.float32),
                           training=True)
