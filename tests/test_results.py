"""Large results (32 MiB or more): pages normlab maps itself and keeps for the next result."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pytest

import normlab
from normlab import _core
from together import run_together

ROWS, COLS = 8200, 1024  # 32.03 MiB of float32: above the 32 MiB threshold
F32 = np.dtype(np.float32)


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((ROWS, COLS), dtype=np.float32)
    w = rng.standard_normal(COLS, dtype=np.float32)
    b = rng.standard_normal(COLS, dtype=np.float32)
    expected = np.empty_like(x)
    normlab.layer_norm(x, w, b, out=expected)
    return x, w, b, expected


def test_large_result_is_a_writeable_c_array_equal_to_the_out_result(big):
    x, w, b, expected = big
    y = normlab.layer_norm(x, w, b)
    assert type(y) is np.ndarray and y.dtype == F32 and y.shape == x.shape
    assert y.flags.c_contiguous and y.flags.writeable and y.flags.aligned
    assert y.base is not None  # the capsule that owns normlab's pages (documented)
    assert np.array_equal(y, expected)
    y[...] = 3.0
    assert np.all(y == 3.0) and np.array_equal(normlab.layer_norm(x, w, b), expected)


def test_empty_result_sizes():
    small = _core.empty_result((3, 4), F32)
    assert small.shape == (3, 4) and small.base is None  # NumPy's own allocation below 32 MiB
    assert _core.empty_result((0, ROWS, COLS), F32).shape == (0, ROWS, COLS)
    with pytest.raises(ValueError, match="negative"):
        _core.empty_result((-1, 4), F32)
    with pytest.raises(ValueError, match="too large"):
        _core.empty_result((2**40, 2**40), F32)


_REUSE_SCRIPT = """
import numpy as np
from normlab import _core
shape, f32 = (8200, 1024), np.dtype(np.float32)
a = _core.empty_result(shape, f32)
first = a.ctypes.data
del a
b = _core.empty_result(shape, f32)          # the pages a left
c = _core.empty_result(shape, f32)          # b is alive: fresh pages
b.fill(1.0)
c.fill(2.0)
print(b.ctypes.data == first, c.ctypes.data != b.ctypes.data, not np.shares_memory(b, c), bool(np.all(b == 1.0)))
"""


def test_freed_result_pages_serve_the_next_result_and_live_results_never_share():
    # A fresh process: the kept pages of earlier tests cannot take part.
    out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"] * 4


_STALE_SCRIPT = """
import numpy as np
from normlab import _core
mib, f32 = 1 << 20, np.dtype(np.float32)
def result(size_mib):
    a = _core.empty_result((size_mib * mib // 4,), f32)
    a.fill(1.0)
    return a.ctypes.data
first = result(64)
same = all(result(64) == first for _ in range(5))     # a loop: the same pages every call
hot = _core.kept_result_pages()
result(72)
one_later = _core.kept_result_pages()
result(80)
two_later = _core.kept_result_pages()
again = result(64) == first                             # still kept, and taken back
print(same, hot, one_later, two_later, again, _core.kept_result_pages(), sep="|")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kept result pages are Linux only")
def test_kept_result_pages_are_advised_free_only_once_stale():
    """A result size a loop takes back every call stays kept as it is (advising it MADV_FREE
    cost each call TLB shootdowns); one left unused while two others come back is advised."""
    out = subprocess.run([sys.executable, "-c", _STALE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mib = 1 << 20
    same, hot, one_later, two_later, again, last = out.stdout.strip().split("|")
    assert same == "True" and again == "True"
    assert eval(hot) == [(64 * mib, False)]
    assert eval(one_later) == [(64 * mib, False), (72 * mib, False)]
    assert eval(two_later) == [(64 * mib, True), (72 * mib, False), (80 * mib, False)]
    assert eval(last) == [(64 * mib, False), (72 * mib, True), (80 * mib, False)]


def test_python_threads_allocating_large_results_get_correct_separate_arrays(big, num_threads):
    x, w, b, expected = big
    normlab.set_num_threads(2)
    kept, wrong = [], []

    def work():
        for k in range(3):
            y = normlab.layer_norm(x, w, b)
            if k == 1:
                kept.append(y)  # alive while the others come and go
            elif not np.array_equal(y, expected):
                wrong.append(k)

    errors = run_together(work, 4)
    assert not errors and not wrong, (errors, wrong)
    assert len(kept) == 4
    for i, y in enumerate(kept):
        assert np.array_equal(y, expected)
        for z in kept[i + 1:]:
            assert not np.shares_memory(y, z)


def _child(queue, x, w, b, expected):
    ys = [normlab.layer_norm(x, w, b) for _ in range(2)]
    del ys[0]
    ys.append(normlab.layer_norm(x, w, b))
    queue.put(all(np.array_equal(y, expected) for y in ys) and not np.shares_memory(ys[0], ys[1]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() exists on POSIX only")
def test_forked_child_allocates_large_results_after_the_parent_kept_pages(big):
    x, w, b, expected = big
    normlab.layer_norm(x, w, b)  # dropped at once: the parent now keeps its pages
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, x, w, b, expected))
    proc.start()
    try:
        ok = queue.get(timeout=120)
    finally:
        proc.join(120)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0 and ok
    assert np.array_equal(normlab.layer_norm(x, w, b), expected)
