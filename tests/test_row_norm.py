"""layer_norm and rms_norm, forward and backward, against float64 references.

Every kernel test takes the ``cpu_target`` fixture, so it runs once per SIMD target this CPU
supports (baseline, avx2, avx512, avx512bf16 on x86-64). Tolerances are in normalized units: an error of
2e-6 in y means 2e-6 standard deviations of the row, whatever the row's scale or offset.
"""

from __future__ import annotations

import tracemalloc
from functools import partial

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import normlab
import reference as ref

DTYPES = [np.float32, np.float64]
# 8-64: rows of 1-4 whole vectors (AVX-512: 16-64, AVX2: 8-32), which have a path of their own
# 64, 128 and 256: rows of 8 and 16 vectors (AVX2, AVX-512), narrow in the forward.
COLS = [1, 2, 3, 7, 8, 15, 16, 17, 24, 31, 32, 33, 48, 64, 100, 128, 256, 768, 1000, 4099]
ROWS = [0, 1, 5, 37]

# float32 outputs: max abs error in normalized units; float64: relative to (1 + |mean| / std).
TOL32 = 2e-6
TOL64 = 1e-10


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_x(rng, shape, dtype, offset=0.0, scale=1.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def make_affine(rng, shape, dtype):
    weight = (1.0 + 0.5 * rng.standard_normal(shape)).astype(dtype)
    bias = rng.standard_normal(shape).astype(dtype)
    return weight, bias


def lead_shape(shape, axis):
    return shape[: len(shape) - len(ref.normalized_axes(len(shape), axis))]


def norm_shape(shape, axis):
    return shape[len(shape) - len(ref.normalized_axes(len(shape), axis)) :]


def expand(stat, ndim):
    stat = np.asarray(stat, dtype=np.float64)
    return stat.reshape(stat.shape + (1,) * (ndim - stat.ndim))


def affine_scale(weight, bias):
    """Elementwise scale of an output's error bound: |w| + 1 (1 without weight). bias adds
    only the final rounding, well inside the bound for biases of order 1."""
    if weight is None:
        return 1.0
    return np.abs(weight.astype(np.float64)) + 1.0


def assert_y_close(y, y_ref, dtype, *, unit=1.0, ratio=1.0):
    """|y - y_ref| <= tol * unit, where unit scales normalized units (weights) and ratio is
    1 + |mean| / std per row (float64 only: the float64 bound is relative to it). float32
    results far out in the tail (|y| > 8) may also be off by 2 units in the last place."""
    assert y.dtype == np.dtype(dtype)
    assert y.shape == y_ref.shape
    err = np.abs(y.astype(np.float64) - y_ref)
    if dtype == np.float32:
        bound = np.maximum(TOL32 * unit, 2 * np.finfo(np.float32).eps * np.abs(y_ref))
    else:
        bound = TOL64 * unit * ratio
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{bad.sum()} of {err.size} elements off; worst error {err.max():.3e}, "
        f"at bound {np.broadcast_to(bound, err.shape).flat[np.argmax(err)]:.3e}"
    )


def check_layer_forward(x, weight=None, bias=None, *, axis=-1, eps=1e-5):
    dtype = x.dtype.type
    y, mean, rstd = normlab.layer_norm(x, weight, bias, axis=axis, eps=eps, return_stats=True)
    y_only = normlab.layer_norm(x, weight, bias, axis=axis, eps=eps)
    y_ref, mean_ref, rstd_ref = ref.layer_norm(x, weight, bias, axis=axis, eps=eps)
    lead = lead_shape(x.shape, axis)
    assert isinstance(y_only, np.ndarray) and np.array_equal(y_only, y, equal_nan=True)
    assert mean.shape == lead and rstd.shape == lead
    assert mean.dtype == x.dtype and rstd.dtype == x.dtype
    std_ref = 1.0 / rstd_ref  # >= sqrt(eps): the row's spread in normalized units
    ratio = expand(1.0 + np.abs(mean_ref) * rstd_ref, x.ndim)
    assert_y_close(y, y_ref, dtype, unit=affine_scale(weight, bias), ratio=ratio)
    rounding = np.finfo(dtype).eps
    # mean: the float64 mean rounded to x's dtype, give or take a small part of the spread.
    mean_err = np.abs(mean.astype(np.float64) - mean_ref)
    mean_tol = 2 * rounding * np.abs(mean_ref) + (TOL32 if dtype == np.float32 else TOL64) * std_ref
    assert np.all(mean_err <= mean_tol)
    rstd_err = np.abs(rstd.astype(np.float64) - rstd_ref) / rstd_ref
    rstd_tol = 4 * rounding if dtype == np.float32 else TOL64 * (1.0 + np.abs(mean_ref) * rstd_ref)
    assert np.all(rstd_err <= rstd_tol)
    return y, mean, rstd


def check_rms_forward(x, weight=None, *, axis=-1, eps=None):
    dtype = x.dtype.type
    y, rstd = normlab.rms_norm(x, weight, axis=axis, eps=eps, return_stats=True)
    y_only = normlab.rms_norm(x, weight, axis=axis, eps=eps)
    y_ref, rstd_ref = ref.rms_norm(x, weight, axis=axis, eps=eps)
    lead = lead_shape(x.shape, axis)
    assert isinstance(y_only, np.ndarray) and np.array_equal(y_only, y, equal_nan=True)
    assert rstd.shape == lead and rstd.dtype == x.dtype
    assert_y_close(y, y_ref, dtype, unit=affine_scale(weight, None))
    rstd_err = np.abs(rstd.astype(np.float64) - rstd_ref) / rstd_ref
    assert np.all(rstd_err <= (4 * np.finfo(dtype).eps if dtype == np.float32 else TOL64))
    return y, rstd


# --------------------------------------------------------------------------------------------
# forward vs reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
def test_layer_norm_forward_shapes(cpu_target, rng, dtype, rows, cols):
    x = make_x(rng, (rows, cols), dtype, offset=0.5)
    weight, bias = make_affine(rng, (cols,), dtype)
    check_layer_forward(x)
    check_layer_forward(x, weight)
    check_layer_forward(x, None, bias)
    check_layer_forward(x, weight, bias)
    check_layer_forward(x, weight, bias, eps=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_forward_shapes(cpu_target, rng, dtype, rows, cols):
    x = make_x(rng, (rows, cols), dtype, offset=0.5)
    weight, _ = make_affine(rng, (cols,), dtype)
    check_rms_forward(x)
    check_rms_forward(x, weight)
    check_rms_forward(x, weight, eps=1e-3)


AXES_3D = [
    ((2, 3, 5), -1),
    ((2, 3, 5), 2),
    ((2, 3, 5), (-1,)),
    ((2, 3, 5), (-2, -1)),
    ((2, 3, 5), (1, 2)),
    ((2, 3, 5), (-1, -2)),
    ((2, 3, 5), (2, 1)),
    ((2, 3, 5), (0, 1, 2)),
    ((4, 6, 17), -1),
    ((4, 6, 17), (-2, -1)),
    ((3, 8, 40), (1, 2)),
    ((2, 3, 4, 5), (-3, -2, -1)),
    ((7,), 0),
    ((7,), -1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", AXES_3D)
def test_layer_norm_forward_axes(cpu_target, rng, dtype, shape, axis):
    x = make_x(rng, shape, dtype, offset=-2.0, scale=3.0)
    weight, bias = make_affine(rng, norm_shape(shape, axis), dtype)
    check_layer_forward(x, axis=axis)
    check_layer_forward(x, weight, bias, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", AXES_3D)
def test_rms_norm_forward_axes(cpu_target, rng, dtype, shape, axis):
    x = make_x(rng, shape, dtype, offset=-2.0, scale=3.0)
    weight, _ = make_affine(rng, norm_shape(shape, axis), dtype)
    check_rms_forward(x, axis=axis)
    check_rms_forward(x, weight, axis=axis)


def test_axis_forms_agree(cpu_target, rng):
    """-1, last positive index, (-1,), and the tuple of the last two in any order all agree
    with the reshaped 2-D call."""
    x = make_x(rng, (4, 6, 17), np.float64)
    y2d = normlab.layer_norm(x.reshape(24, 17))
    for axis in (-1, 2, (-1,), (2,), np.int64(-1)):
        assert np.array_equal(normlab.layer_norm(x, axis=axis), y2d.reshape(x.shape))
    y2d = normlab.rms_norm(x.reshape(4, 102))
    for axis in ((-2, -1), (1, 2), (-1, -2), (2, 1)):
        assert np.array_equal(normlab.rms_norm(x, axis=axis), y2d.reshape(x.shape))


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("cols", [2, 3, 16, 33, 48, 64, 128, 256, 768, 4099])
def test_layer_norm_float32_large_offset(cpu_target, rng, offset, cols):
    """Rows with |mean| / std = 1e4 and 1e5: float32 results stay within 2e-6 std."""
    x = make_x(rng, (5, cols), np.float32, offset=offset)
    weight, bias = make_affine(rng, (cols,), np.float32)
    check_layer_forward(x)
    check_layer_forward(x, weight, bias)
    check_layer_forward(-x, weight, bias)


@pytest.mark.parametrize("offset", [1e4, 1e8])
@pytest.mark.parametrize("cols", [3, 33, 1000])
def test_layer_norm_float64_large_offset(cpu_target, rng, offset, cols):
    x = make_x(rng, (5, cols), np.float64, offset=offset)
    weight, bias = make_affine(rng, (cols,), np.float64)
    check_layer_forward(x)
    check_layer_forward(x, weight, bias)


@pytest.mark.parametrize("leading", [1, 3])
@pytest.mark.parametrize("cols", [32, 64, 4099, 65536, 131072])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_first_element_outlier(cpu_target, rng, dtype, cols, leading):
    """Rows whose first `leading` elements lie far from the rest (N(0,1) plus 1e3 or 1e4): the
    statistics must not depend on which elements come first, and float64 results stay within
    the same 1e-10 std as every other float64 test. Sums are shifted by the first element (float
    rows summed one at a time) or the median of the first three (row_shift: rows in blocks, and
    float64), so three outliers put every path's shift far from the mean and the row is summed
    again about its mean; without that, the float64 error is ~1e-8 and float32 loses all digits."""
    x = make_x(rng, (2, cols), dtype)
    x[:, :leading] += np.array([[1e3], [1e4]], dtype=dtype)
    check_layer_forward(np.ascontiguousarray(x[:, ::-1]))  # outlier last
    check_layer_forward(x)  # outlier first


# Rows of 512 KiB or more, fewer than 4 of them (float32 from 131072 elements, float64 from
# 65536), are split across the threads: summed by chunks of 64 KiB whose sums are added in
# order, then normalized chunk by chunk.
LONG_ROWS = [(1, 131072), (3, 300001)]


@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("shape", LONG_ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_split_across_threads(cpu_target, rng, dtype, shape, offset):
    x = make_x(rng, shape, dtype, offset=offset)
    weight, bias = make_affine(rng, shape[-1:], dtype)
    for w, b in ((None, None), (weight, None), (None, bias), (weight, bias)):
        check_layer_forward(x, w, b)
        check_rms_forward(x, w)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_long_float32_rows_of_extreme_scale(cpu_target, rng, scale):
    """Split rows whose float squares would overflow or underflow are summed again in double."""
    x = make_x(rng, (3, 131072), np.float32, offset=0.5 * scale, scale=scale)
    assert np.all(np.isfinite(x))
    weight, bias = make_affine(rng, (131072,), np.float32)
    small_eps = 1e-6 * scale * scale
    y, mean, rstd = check_layer_forward(x, weight, bias, eps=small_eps)
    assert np.all(np.isfinite(y)) and np.all(rstd > 0)
    y, rstd = check_rms_forward(x, weight, eps=small_eps)
    assert np.all(np.isfinite(y)) and np.all(rstd > 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("position", [0, 70000, 131071])
def test_long_rows_nonfinite_values_stay_in_their_row(cpu_target, rng, dtype, bad, position):
    x = make_x(rng, (3, 131072), dtype)
    weight, bias = make_affine(rng, (131072,), dtype)
    x[1, position] = bad
    good = [0, 2]
    xg = np.ascontiguousarray(x[good])
    y, mean, rstd = normlab.layer_norm(x, weight, bias, return_stats=True)
    yg, meang, rstdg = normlab.layer_norm(xg, weight, bias, return_stats=True)
    assert np.array_equal(y[good], yg) and np.array_equal(mean[good], meang) and np.array_equal(rstd[good], rstdg)
    assert not np.all(np.isfinite(y[1]))
    y, rstd = normlab.rms_norm(x, weight, return_stats=True)
    yg, rstdg = normlab.rms_norm(xg, weight, return_stats=True)
    assert np.array_equal(y[good], yg) and np.array_equal(rstd[good], rstdg)
    assert not np.all(np.isfinite(y[1]))


def test_long_constant_rows_give_bias_exactly(cpu_target, rng):
    for dtype in DTYPES:
        x = np.empty((3, 131072), dtype)
        x[:] = np.array([1.0, -3.5, 12345.678], dtype)[:, None]
        weight, bias = make_affine(rng, (131072,), dtype)
        assert np.array_equal(normlab.layer_norm(x, weight, bias), np.broadcast_to(bias, x.shape))


# --------------------------------------------------------------------------------------------
# special values
# --------------------------------------------------------------------------------------------

CONSTANTS = [0.0, 1.0, -3.5, 12345.678, 1e30, -1e-30, 7e-45]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 3, 16, 33, 64, 128, 256, 1000])
def test_layer_norm_constant_rows_give_bias_exactly(cpu_target, rng, dtype, cols):
    x = np.empty((len(CONSTANTS), cols), dtype)
    x[:] = np.array(CONSTANTS, dtype)[:, None]
    weight, bias = make_affine(rng, (cols,), dtype)
    expected_bias = np.broadcast_to(bias, x.shape)
    zeros = np.zeros(x.shape, dtype)
    assert np.array_equal(normlab.layer_norm(x), zeros)
    assert np.array_equal(normlab.layer_norm(x, weight), zeros)
    assert np.array_equal(normlab.layer_norm(x, None, bias), expected_bias)
    y, mean, rstd = normlab.layer_norm(x, weight, bias, return_stats=True)
    assert np.array_equal(y, expected_bias)
    assert np.array_equal(mean, np.array(CONSTANTS, dtype))
    assert np.allclose(rstd, 1.0 / np.sqrt(1e-5), rtol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 3, 16, 33, 64, 128, 256, 1000])
def test_rms_norm_constant_and_zero_rows(cpu_target, rng, dtype, cols):
    x = np.empty((len(CONSTANTS), cols), dtype)
    x[:] = np.array(CONSTANTS, dtype)[:, None]
    weight, _ = make_affine(rng, (cols,), dtype)
    check_rms_forward(x, weight)
    check_rms_forward(x)
    zeros = np.zeros((3, cols), dtype)
    assert np.array_equal(normlab.rms_norm(zeros), zeros)
    y, rstd = normlab.rms_norm(zeros, weight, return_stats=True)
    assert np.array_equal(y, zeros)
    assert np.all(np.isfinite(rstd))


@pytest.mark.parametrize("scale", [1e30, 1e20, 1e-20, 1e-30])
@pytest.mark.parametrize("cols", [3, 16, 33, 48, 128, 256, 1000])
def test_float32_extreme_scales(cpu_target, rng, scale, cols):
    """float32 rows of magnitude 1e30 .. 1e-30 neither overflow nor underflow: their squares are
    taken in double. With eps small next to the variance the results are normalized values."""
    x = make_x(rng, (5, cols), np.float32, offset=0.5 * scale, scale=scale)
    assert np.all(np.isfinite(x))
    weight, bias = make_affine(rng, (cols,), np.float32)
    small_eps = 1e-6 * scale * scale  # a double: 1e54 .. 1e-66
    for w, b in ((None, None), (weight, bias)):
        y, mean, rstd = check_layer_forward(x, w, b, eps=small_eps)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(mean)) and np.all(np.isfinite(rstd))
        assert np.all(rstd > 0)
        y, rstd = check_rms_forward(x, w, eps=small_eps)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(rstd)) and np.all(rstd > 0)
        # the default eps: for tiny rows eps dominates, results still match the reference
        y = check_layer_forward(x, w, b)[0]
        assert np.all(np.isfinite(y))
        y = check_rms_forward(x, w)[0]
        assert np.all(np.isfinite(y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", [0, 7, 32])
@pytest.mark.parametrize("cols", [33, 48, 128, 256])
def test_nonfinite_values_stay_in_their_row(cpu_target, rng, dtype, bad, position, cols):
    rows, bad_row = 6, 2
    x = make_x(rng, (rows, cols), dtype)
    dy = make_x(rng, (rows, cols), dtype)
    weight, bias = make_affine(rng, (cols,), dtype)
    x[bad_row, position] = bad
    good = np.delete(np.arange(rows), bad_row)
    xg, dyg = np.ascontiguousarray(x[good]), np.ascontiguousarray(dy[good])

    y, mean, rstd = normlab.layer_norm(x, weight, bias, return_stats=True)
    yg, meang, rstdg = normlab.layer_norm(xg, weight, bias, return_stats=True)
    assert np.array_equal(y[good], yg) and np.array_equal(mean[good], meang)
    assert np.array_equal(rstd[good], rstdg)
    assert not np.all(np.isfinite(y[bad_row]))
    dx = normlab.layer_norm_backward(dy, x, mean, rstd)[0]
    dxg = normlab.layer_norm_backward(dyg, xg, meang, rstdg)[0]
    assert np.array_equal(dx[good], dxg)

    y, rstd = normlab.rms_norm(x, weight, return_stats=True)
    yg, rstdg = normlab.rms_norm(xg, weight, return_stats=True)
    assert np.array_equal(y[good], yg) and np.array_equal(rstd[good], rstdg)
    assert not np.all(np.isfinite(y[bad_row]))
    dx = normlab.rms_norm_backward(dy, x, rstd)[0]
    dxg = normlab.rms_norm_backward(dyg, xg, rstdg)[0]
    assert np.array_equal(dx[good], dxg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((0, 8), -1), ((2, 0, 8), -1), ((0, 3, 4), (-2, -1))])
def test_zero_rows_give_empty_results(cpu_target, dtype, shape, axis):
    x = np.empty(shape, dtype)
    ns, lead = norm_shape(shape, axis), lead_shape(shape, axis)
    weight, bias = np.ones(ns, dtype), np.zeros(ns, dtype)
    y, mean, rstd = normlab.layer_norm(x, weight, bias, axis=axis, return_stats=True)
    assert y.shape == shape and mean.shape == lead and rstd.shape == lead
    assert y.dtype == mean.dtype == rstd.dtype == np.dtype(dtype)
    dx, dweight, dbias = normlab.layer_norm_backward(x, x, mean, rstd, weight, axis=axis)
    assert dx.shape == shape and dx.dtype == np.dtype(dtype)
    assert np.array_equal(dweight, np.zeros(ns, dtype)) and np.array_equal(dbias, np.zeros(ns, dtype))
    y, rstd = normlab.rms_norm(x, weight, axis=axis, return_stats=True)
    assert y.shape == shape and rstd.shape == lead
    dx, dweight = normlab.rms_norm_backward(x, x, rstd, weight, axis=axis)
    assert dx.shape == shape and np.array_equal(dweight, np.zeros(ns, dtype))


@pytest.mark.parametrize("shape, axis", [((4, 0), -1), ((0, 0), -1), ((3, 2, 0), (-2, -1)), ((0,), 0)])
def test_zero_length_normalized_axis_raises(shape, axis):
    x = np.empty(shape, np.float32)
    with pytest.raises(ValueError, match="axis"):
        normlab.layer_norm(x, axis=axis)
    with pytest.raises(ValueError, match="axis"):
        normlab.rms_norm(x, axis=axis)
    lead = lead_shape(shape, axis)
    stat = np.empty(lead, np.float32)
    with pytest.raises(ValueError, match="axis"):
        normlab.layer_norm_backward(x, x, stat, stat, axis=axis)
    with pytest.raises(ValueError, match="axis"):
        normlab.rms_norm_backward(x, x, stat, axis=axis)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

BACKWARD_CASES = [
    ((5, 33), -1),
    ((37, 100), -1),
    ((1, 1), -1),
    ((3, 1), -1),
    ((6, 16), -1),
    ((4, 1000), -1),
    ((2, 3, 5), (-2, -1)),
    ((4, 6, 17), -1),
    ((9,), -1),
    # rows of 1-4 and 8 whole vectors stay in registers between the passes (with weight, so do
    # the column sums over each stage of 16 rows, in blocks of 8: 9-10 rows per column-sum block
    # here, 17-18 in the second)
    ((600, 64), -1),
    ((600, 128), -1),
    ((1130, 128), -1),
    ((1130, 64), -1),
    ((530, 48), -1),
    ((520, 32), -1),
    ((515, 24), -1),
    # rows of 8 KiB or more go in groups of 4 for the column sums (remainders one by one)
    ((21, 2053), -1),
    ((40, 4096), -1),
    # rows of 512 KiB or more, fewer than 4 (the backward: fewer than 16): split across the threads
    # (the backward with weight in groups of 16 rows; test_backward_of_many_long_rows_split: more)
    ((2, 131075), -1),
    ((7, 131075), -1),
]


def _backward_inputs(rng, shape, axis, dtype, offset=0.5):
    x = make_x(rng, shape, dtype, offset=offset, scale=2.0)
    dy = make_x(rng, shape, dtype)
    weight, bias = make_affine(rng, norm_shape(shape, axis), dtype)
    return x, dy, weight, bias


def _assert_grad_close(got, want, rtol, what):
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    assert err <= rtol * scale, f"{what}: error {err:.3e} > {rtol:.1e} * {scale:.3e}"


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("shape, axis", BACKWARD_CASES)
def test_layer_norm_backward_float64_vs_reference(cpu_target, rng, shape, axis, with_weight):
    x, dy, weight, bias = _backward_inputs(rng, shape, axis, np.float64)
    w = weight if with_weight else None
    _, mean, rstd = normlab.layer_norm(x, w, bias if with_weight else None, axis=axis, return_stats=True)
    dx, dweight, dbias = normlab.layer_norm_backward(dy, x, mean, rstd, w, axis=axis)
    dx_ref, dweight_ref, dbias_ref = ref.layer_norm_backward(dy, x, mean, rstd, w, axis=axis)
    assert dx.dtype == np.float64 and dx.shape == shape
    _assert_grad_close(dx, dx_ref, 1e-12, "dx")
    if with_weight:
        assert dweight.dtype == dbias.dtype == np.float64
        _assert_grad_close(dweight, dweight_ref, 1e-12, "dweight")
        _assert_grad_close(dbias, dbias_ref, 1e-12, "dbias")
    else:
        assert dweight is None and dbias is None


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("shape, axis", BACKWARD_CASES)
def test_rms_norm_backward_float64_vs_reference(cpu_target, rng, shape, axis, with_weight):
    x, dy, weight, _ = _backward_inputs(rng, shape, axis, np.float64)
    w = weight if with_weight else None
    _, rstd = normlab.rms_norm(x, w, axis=axis, return_stats=True)
    dx, dweight = normlab.rms_norm_backward(dy, x, rstd, w, axis=axis)
    dx_ref, dweight_ref = ref.rms_norm_backward(dy, x, rstd, w, axis=axis)
    _assert_grad_close(dx, dx_ref, 1e-12, "dx")
    if with_weight:
        _assert_grad_close(dweight, dweight_ref, 1e-12, "dweight")
    else:
        assert dweight is None


FD_CASES = [((3, 7), -1), ((2, 1), -1), ((1, 16), -1), ((2, 3, 4), (-2, -1)), ((5,), 0)]


@pytest.mark.parametrize("shape, axis", FD_CASES)
def test_layer_norm_backward_finite_differences(cpu_target, rng, shape, axis):
    """The backward is the gradient of the forward: d/d(x, w, b) of sum(layer_norm(x) * g)."""
    x, g, weight, bias = _backward_inputs(rng, shape, axis, np.float64)
    eps = 1e-3

    def loss():
        return float(np.sum(normlab.layer_norm(x, weight, bias, axis=axis, eps=eps) * g))

    num_dx = ref.numerical_gradient(loss, x)
    num_dw = ref.numerical_gradient(loss, weight)
    num_db = ref.numerical_gradient(loss, bias)
    _, mean, rstd = normlab.layer_norm(x, weight, bias, axis=axis, eps=eps, return_stats=True)
    dx, dweight, dbias = normlab.layer_norm_backward(g, x, mean, rstd, weight, axis=axis)
    _assert_grad_close(dx, num_dx, 1e-6, "dx")
    _assert_grad_close(dweight, num_dw, 1e-6, "dweight")
    _assert_grad_close(dbias, num_db, 1e-6, "dbias")

    def loss_plain():
        return float(np.sum(normlab.layer_norm(x, axis=axis, eps=eps) * g))

    num_dx = ref.numerical_gradient(loss_plain, x)
    _, mean, rstd = normlab.layer_norm(x, axis=axis, eps=eps, return_stats=True)
    dx, dweight, dbias = normlab.layer_norm_backward(g, x, mean, rstd, axis=axis)
    _assert_grad_close(dx, num_dx, 1e-6, "dx without weight")
    assert dweight is None and dbias is None


@pytest.mark.parametrize("shape, axis", FD_CASES)
def test_rms_norm_backward_finite_differences(cpu_target, rng, shape, axis):
    x, g, weight, _ = _backward_inputs(rng, shape, axis, np.float64)
    eps = 1e-3

    def loss():
        return float(np.sum(normlab.rms_norm(x, weight, axis=axis, eps=eps) * g))

    num_dx = ref.numerical_gradient(loss, x)
    num_dw = ref.numerical_gradient(loss, weight)
    _, rstd = normlab.rms_norm(x, weight, axis=axis, eps=eps, return_stats=True)
    dx, dweight = normlab.rms_norm_backward(g, x, rstd, weight, axis=axis)
    _assert_grad_close(dx, num_dx, 1e-6, "dx")
    _assert_grad_close(dweight, num_dw, 1e-6, "dweight")

    def loss_plain():
        return float(np.sum(normlab.rms_norm(x, axis=axis, eps=eps) * g))

    num_dx = ref.numerical_gradient(loss_plain, x)
    _, rstd = normlab.rms_norm(x, axis=axis, eps=eps, return_stats=True)
    dx, dweight = normlab.rms_norm_backward(g, x, rstd, axis=axis)
    _assert_grad_close(dx, num_dx, 1e-6, "dx without weight")
    assert dweight is None


def _assert_dx32_close(dx, dx_ref, rstd, g, axis):
    """float32 dx: error within 1e-6 of the row's gradient scale rstd * max|dy * w|."""
    axes = ref.normalized_axes(dx.ndim, axis)
    row_scale = expand(rstd, dx.ndim) * np.abs(g).max(axis=axes, keepdims=True)
    err = np.abs(dx.astype(np.float64) - dx_ref)
    assert np.all(err <= 1e-6 * row_scale + 1e-30), f"worst {np.max(err / row_scale):.3e}"


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("shape, axis", BACKWARD_CASES)
def test_layer_norm_backward_float32(cpu_target, rng, shape, axis, with_weight, offset):
    x, dy, weight, _ = _backward_inputs(rng, shape, axis, np.float32, offset=offset)
    w = weight if with_weight else None
    _, mean, rstd = normlab.layer_norm(x, w, axis=axis, return_stats=True)
    dx, dweight, dbias = normlab.layer_norm_backward(dy, x, mean, rstd, w, axis=axis)
    dx_ref, dweight_ref, dbias_ref = ref.layer_norm_backward(dy, x, mean, rstd, w, axis=axis)
    assert dx.dtype == np.float32
    g = dy.astype(np.float64) * (1.0 if w is None else w.astype(np.float64))
    _assert_dx32_close(dx, dx_ref, rstd, g, axis)
    if not with_weight:
        assert dweight is None and dbias is None
        return
    assert dweight.dtype == dbias.dtype == np.float32
    lead_axes = tuple(range(x.ndim - len(ref.normalized_axes(x.ndim, axis))))
    xhat = (x.astype(np.float64) - expand(mean, x.ndim)) * expand(rstd, x.ndim)
    dw_scale = np.abs(dy.astype(np.float64) * xhat).sum(axis=lead_axes)
    db_scale = np.abs(dy.astype(np.float64)).sum(axis=lead_axes)
    assert np.all(np.abs(dweight - dweight_ref) <= 1e-6 * dw_scale)
    assert np.all(np.abs(dbias - dbias_ref) <= 1e-6 * db_scale)


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("shape, axis", BACKWARD_CASES)
def test_rms_norm_backward_float32(cpu_target, rng, shape, axis, with_weight):
    x, dy, weight, _ = _backward_inputs(rng, shape, axis, np.float32)
    w = weight if with_weight else None
    _, rstd = normlab.rms_norm(x, w, axis=axis, return_stats=True)
    dx, dweight = normlab.rms_norm_backward(dy, x, rstd, w, axis=axis)
    dx_ref, dweight_ref = ref.rms_norm_backward(dy, x, rstd, w, axis=axis)
    g = dy.astype(np.float64) * (1.0 if w is None else w.astype(np.float64))
    _assert_dx32_close(dx, dx_ref, rstd, g, axis)
    if not with_weight:
        assert dweight is None
        return
    lead_axes = tuple(range(x.ndim - len(ref.normalized_axes(x.ndim, axis))))
    xhat = x.astype(np.float64) * expand(rstd, x.ndim)
    dw_scale = np.abs(dy.astype(np.float64) * xhat).sum(axis=lead_axes)
    assert dweight.dtype == np.float32
    assert np.all(np.abs(dweight - dweight_ref) <= 1e-6 * dw_scale)


# 20000 and 131075 (rows split across the threads, in one group with weight): rstd over 1.2,
# where rstd * dy alone would overflow float
@pytest.mark.parametrize("cols", [16, 32, 48, 64, 128, 1000, 20000, 131075])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_float32_backward_sums_that_overflow(cpu_target, rng, norm, cols):
    """A row whose float products dy * w * xhat overflow, though its dx is in range, is summed
    again in double, and its dx computed without an overflowing intermediate; the rows beside
    it, in the same block of narrow rows (or group of split rows), are not disturbed."""
    x, dy, _, _ = _backward_inputs(rng, (11, cols), -1, np.float32)
    x[3] = 0.0
    x[3, 0] = 100.0  # xhat[0] near sqrt(cols)
    dy[3, 0] = 3.0e38
    for w in (None, np.full(cols, 0.75, np.float32)):
        if norm == "layer":
            _, mean, rstd = normlab.layer_norm(x, w, return_stats=True)
            dx = normlab.layer_norm_backward(dy, x, mean, rstd, w)[0]
            dx_ref = ref.layer_norm_backward(dy, x, mean, rstd, w)[0]
        else:
            _, rstd = normlab.rms_norm(x, w, return_stats=True)
            dx = normlab.rms_norm_backward(dy, x, rstd, w)[0]
            dx_ref = ref.rms_norm_backward(dy, x, rstd, w)[0]
        assert np.all(np.isfinite(dx))
        g = dy.astype(np.float64) * (1.0 if w is None else w.astype(np.float64))
        _assert_dx32_close(dx, dx_ref, rstd, g, -1)


@pytest.mark.parametrize("dtype, cols", [(np.float32, 2053), (np.float32, 16411), (np.float16, 4099),
                                         ("bfloat16", 4099)])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("fused", [False, True])
def test_backward_rows_in_groups_equal_rows_alone(cpu_target, rng, dtype, cols, norm, fused):
    """Rows of 8 KiB or more share their column-sum stage in groups (of 4; pairs for half rows
    and float rows over 16384), dx written for the group side by side: each row's dx is bitwise
    the dx of that row on its own (one row goes alone), with weight, with ds (the fused
    backward) and with a tail shorter than a vector."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = make_x(rng, (22, cols), np.float32, offset=0.5).astype(dtype)
    dy = make_x(rng, x.shape, np.float32).astype(dtype)
    ds = make_x(rng, x.shape, np.float32).astype(dtype) if fused else None
    weight = make_affine(rng, (cols,), np.float32)[0]
    if norm == "layer":
        _, mean, rstd = normlab.layer_norm(x, weight, return_stats=True)
        stats = (mean, rstd)
        backward = normlab.add_layer_norm_backward if fused else normlab.layer_norm_backward
    else:
        _, rstd = normlab.rms_norm(x, weight, return_stats=True)
        stats = (rstd,)
        backward = normlab.add_rms_norm_backward if fused else normlab.rms_norm_backward

    def call(rows):
        kw = {"ds": ds[rows]} if fused else {}
        return backward(dy[rows], x[rows], *(s[rows] for s in stats), weight, **kw)

    together = call(slice(None))
    for i in range(x.shape[0]):
        alone = call(slice(i, i + 1))
        assert np.array_equal(together[0][i].view(np.uint8), alone[0][0].view(np.uint8)), f"row {i}"
    want = (ref.layer_norm_backward if norm == "layer" else ref.rms_norm_backward)(dy, x, *stats, weight)
    xhat = x.astype(np.float64) * expand(rstd, 2)
    if norm == "layer":
        xhat -= expand(mean.astype(np.float64) * rstd, 2)
    scale = np.abs(dy.astype(np.float64) * xhat).sum(axis=0)
    assert np.all(np.abs(together[1] - want[1]) <= 1e-6 * scale)


# Rows enough for column-sum blocks of 17-25 rows: a full stage of 16 in groups of 4, then rows
# left over a group. Widths that are no whole number of 8 or 16 vectors (those rows go narrow).
@pytest.mark.parametrize("shape", [(1100, 136), (203, 770), (101, 2000)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_layer_norm_backward_cached_rows_in_groups_equal_rows_alone(cpu_target, num_threads, rng, shape, threads):
    """float32 layer_norm_backward rows under 8 KiB with weight, in a tensor that fits the cache,
    take their sums in groups of 4, the column-sum stage added there: each row's dx is bitwise
    the dx of that row on its own, and dweight and dbias bitwise those of the fused backward,
    whose rows go one by one, for 1-3 threads, with rows left over a group and a tail shorter
    than a vector."""
    normlab.set_num_threads(threads)
    cols = shape[1]
    x = make_x(rng, shape, np.float32, offset=0.5)
    dy = make_x(rng, x.shape, np.float32)
    weight = make_affine(rng, (cols,), np.float32)[0]
    _, mean, rstd = normlab.layer_norm(x, weight, return_stats=True)
    dx, dweight, dbias = normlab.layer_norm_backward(dy, x, mean, rstd, weight)
    for i in range(x.shape[0]):
        alone = normlab.layer_norm_backward(dy[i : i + 1], x[i : i + 1], mean[i : i + 1], rstd[i : i + 1], weight)
        assert np.array_equal(dx[i].view(np.uint8), alone[0][0].view(np.uint8)), f"row {i}"
    one_by_one = normlab.add_layer_norm_backward(dy, x, mean, rstd, weight, ds=np.zeros_like(x))
    assert np.array_equal(dweight.view(np.uint8), one_by_one[1].view(np.uint8))
    assert np.array_equal(dbias.view(np.uint8), one_by_one[2].view(np.uint8))
    assert np.array_equal(dx, one_by_one[0])
    want = ref.layer_norm_backward(dy, x, mean, rstd, weight)
    scale = np.abs(dy.astype(np.float64) * (x - expand(mean, 2)) * expand(rstd, 2)).sum(axis=0)
    assert np.all(np.abs(dweight - want[1]) <= 1e-6 * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
@pytest.mark.parametrize("cols", [8192, 8200])
@pytest.mark.parametrize("affine", ["weight and bias", "weight", "bias"])
@pytest.mark.parametrize("out_offset", [0, 3])
def test_layer_norm_long_rows_in_pairs_equal_rows_alone(cpu_target, rng, dtype, cols, affine, out_offset):
    """Rows whose weight row holds 32 KiB or more are normalized in pairs (one read of weight
    and bias for both; rows that start at different distances from a line, as rows of 8200
    floats do, and the last of an odd count go alone): each row's y, mean and rstd are bitwise
    those of the row on its own, into an out= off its lines too."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = make_x(rng, (5, cols), np.float32, offset=0.5).astype(dtype)
    weight, bias = make_affine(rng, (cols,), np.float32)
    w = weight if "weight" in affine else None
    b = bias if "bias" in affine else None
    buffer = np.zeros(x.size + out_offset + 7, dtype)
    out = buffer[out_offset : out_offset + x.size].reshape(x.shape)
    y, mean, rstd = normlab.layer_norm(x, w, b, out=out, return_stats=True)
    assert y is out
    for i in range(x.shape[0]):
        alone, mean_i, rstd_i = normlab.layer_norm(x[i : i + 1], w, b, return_stats=True)
        assert np.array_equal(y[i].view(np.uint8), alone[0].view(np.uint8)), f"row {i}"
        assert mean[i] == mean_i[0] and rstd[i] == rstd_i[0], f"row {i}"
    assert not buffer[:out_offset].any() and not buffer[out_offset + x.size :].any()


@pytest.mark.parametrize("offset", [1, 5, 8, 15])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_backward_grouped_rows_into_out_off_its_lines(cpu_target, rng, norm, offset):
    """Grouped float rows whose dx starts off a cache line (out= a view offset by some floats,
    the same for every row) are written from the first aligned element: dx is bitwise the dx
    written into a fresh array, the elements before and after out untouched."""
    x = make_x(rng, (9, 4096 + 16), np.float32, offset=0.5)
    dy = make_x(rng, x.shape, np.float32)
    weight = make_affine(rng, (x.shape[1],), np.float32)[0]
    if norm == "layer":
        _, mean, rstd = normlab.layer_norm(x, weight, return_stats=True)
        call = partial(normlab.layer_norm_backward, dy, x, mean, rstd, weight)
    else:
        _, rstd = normlab.rms_norm(x, weight, return_stats=True)
        call = partial(normlab.rms_norm_backward, dy, x, rstd, weight)
    fresh = call()[0]
    buffer = np.full(x.size + 32, -7.0, np.float32)
    line = (-(buffer.ctypes.data // 4)) % 16
    out = buffer[line + offset: line + offset + x.size].reshape(x.shape)
    assert call(out=out)[0] is out
    assert np.array_equal(out.view(np.uint32), fresh.view(np.uint32))
    assert np.all(buffer[: line + offset] == -7.0) and np.all(buffer[line + offset + x.size:] == -7.0)


# --------------------------------------------------------------------------------------------
# determinism across thread counts
# --------------------------------------------------------------------------------------------


def _all_results(norm, x, dy, weight, bias):
    if norm == "layer":
        y, mean, rstd = normlab.layer_norm(x, weight, bias, return_stats=True)
        y_plain = normlab.layer_norm(x)
        dx, dweight, dbias = normlab.layer_norm_backward(dy, x, mean, rstd, weight)
        dx_plain = normlab.layer_norm_backward(dy, x, mean, rstd)[0]
        return [y, mean, rstd, y_plain, dx, dweight, dbias, dx_plain]
    y, rstd = normlab.rms_norm(x, weight, return_stats=True)
    y_plain = normlab.rms_norm(x)
    dx, dweight = normlab.rms_norm_backward(dy, x, rstd, weight)
    dx_plain = normlab.rms_norm_backward(dy, x, rstd)[0]
    return [y, rstd, y_plain, dx, dweight, dx_plain]


@pytest.mark.openmp
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
# (6, 20000): few long rows, column sums in blocks of 1 and 2 rows (kMinColumnSumBlocks).
# (3, 131075): rows of 512 KiB or more, fewer than 4, split across the threads; (7, 131075): in
# the backward only (fewer than 16).
@pytest.mark.parametrize("shape", [(3000, 257), (64, 4096), (1000, 128), (1000, 64), (1000, 32), (6, 20000),
                                   (3, 131075), (7, 131075)])
def test_bitwise_identical_for_every_thread_count(cpu_target, num_threads, rng, norm, dtype, shape):
    x = make_x(rng, shape, dtype, offset=3.0)
    dy = make_x(rng, shape, dtype)
    weight, bias = make_affine(rng, shape[-1:], dtype)
    normlab.set_num_threads(1)
    expected = _all_results(norm, x, dy, weight, bias)
    for n in (2, 3, 1, 3):
        normlab.set_num_threads(n)
        assert normlab.get_num_threads() == n
        got = _all_results(norm, x, dy, weight, bias)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a.dtype == b.dtype and np.array_equal(a, b), f"output {i} differs with {n} threads"


# With weight, up to 63 rows of 1 MiB or more are split too: 17 of them end a stage of 16 rows
# in double partials and leave one row for a last stage. Where L2 holds 2 MiB or more, 17 such
# rows split without weight too (in groups that fit L2); elsewhere they go one per thread.
@pytest.mark.openmp
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype, shape", [(np.float32, (17, 262147)), (np.float64, (17, 131075))])
def test_backward_of_many_long_rows_split(cpu_target, num_threads, rng, norm, dtype, shape, with_weight):
    x, dy, weight, bias = _backward_inputs(rng, shape, -1, dtype)
    if not with_weight:
        weight = bias = None
    normlab.set_num_threads(1)
    if norm == "layer":
        _, mean, rstd = normlab.layer_norm(x, weight, bias, return_stats=True)
        grads = lambda: normlab.layer_norm_backward(dy, x, mean, rstd, weight)  # noqa: E731
        want = ref.layer_norm_backward(dy, x, mean, rstd, weight)
        xhat = (x.astype(np.float64) - mean[:, None]) * rstd[:, None]
        scales = [np.abs(dy * xhat).sum(axis=0), np.abs(dy.astype(np.float64)).sum(axis=0)]
    else:
        _, rstd = normlab.rms_norm(x, weight, return_stats=True)
        grads = lambda: normlab.rms_norm_backward(dy, x, rstd, weight)  # noqa: E731
        want = ref.rms_norm_backward(dy, x, rstd, weight)
        scales = [np.abs(dy * (x.astype(np.float64) * rstd[:, None])).sum(axis=0)]
    got = grads()
    if not with_weight:
        assert all(g is None for g in got[1:])
        got, want = got[:1], want[:1]
    if dtype == np.float32:
        g64 = dy.astype(np.float64) * (1.0 if weight is None else weight)
        _assert_dx32_close(got[0], want[0], rstd, g64, -1)
        for g, w, scale in zip(got[1:], want[1:], scales):
            assert np.all(np.abs(g - w) <= 1e-6 * scale)
    else:
        for g, w in zip(got, want):
            _assert_grad_close(g, w, 1e-12, "gradient")
    for n in (2, 3):
        normlab.set_num_threads(n)
        for a, b in zip(grads(), got):
            assert np.array_equal(a, b), f"differs with {n} threads"


# --------------------------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_receives_result_and_is_returned(cpu_target, rng, dtype):
    x = make_x(rng, (7, 33), dtype)
    dy = make_x(rng, (7, 33), dtype)
    weight, bias = make_affine(rng, (33,), dtype)

    out = np.full_like(x, np.nan)
    y = normlab.layer_norm(x, weight, bias, out=out)
    assert y is out and np.array_equal(out, normlab.layer_norm(x, weight, bias))
    out = np.full_like(x, np.nan)
    y, mean, rstd = normlab.layer_norm(x, weight, bias, out=out, return_stats=True)
    assert y is out and np.array_equal(out, normlab.layer_norm(x, weight, bias))
    out = np.full_like(x, np.nan)
    dx = normlab.layer_norm_backward(dy, x, mean, rstd, weight, out=out)[0]
    assert dx is out and np.array_equal(out, normlab.layer_norm_backward(dy, x, mean, rstd, weight)[0])

    out = np.full_like(x, np.nan)
    y = normlab.rms_norm(x, weight, out=out)
    assert y is out and np.array_equal(out, normlab.rms_norm(x, weight))
    out = np.full_like(x, np.nan)
    y, rstd = normlab.rms_norm(x, weight, out=out, return_stats=True)
    assert y is out
    out = np.full_like(x, np.nan)
    dx = normlab.rms_norm_backward(dy, x, rstd, weight, out=out)[0]
    assert dx is out and np.array_equal(out, normlab.rms_norm_backward(dy, x, rstd, weight)[0])

    # a C-contiguous view into a larger buffer is a fine out
    buf = np.zeros((3, 7, 33), dtype)
    y = normlab.layer_norm(x, out=buf[1])
    assert y.base is buf and np.array_equal(buf[1], normlab.layer_norm(x))
    assert not buf[0].any() and not buf[2].any()


def _calls_with_out(x, out):
    """Each public function called with out=; x is 2-D float."""
    lead = x.shape[:-1]
    stat = np.ones(lead, x.dtype)
    dy = np.ones_like(x)
    return [
        lambda: normlab.layer_norm(x, out=out),
        lambda: normlab.layer_norm(x, out=out, return_stats=True),
        lambda: normlab.rms_norm(x, out=out),
        lambda: normlab.layer_norm_backward(dy, x, stat, stat, out=out),
        lambda: normlab.rms_norm_backward(dy, x, stat, out=out),
    ]


def test_out_wrong_dtype_raises_type_error(rng):
    x = make_x(rng, (4, 8), np.float32)
    for bad in (np.empty((4, 8), np.float64), np.empty((4, 8), np.int32), [[0.0] * 8] * 4):
        for call in _calls_with_out(x, bad):
            with pytest.raises(TypeError, match=r"\bout\b"):
                call()


def test_out_bad_layout_raises_value_error(rng):
    x = make_x(rng, (4, 8), np.float32)
    readonly = np.empty((4, 8), np.float32)
    readonly.flags.writeable = False
    bads = [
        np.empty((4, 9), np.float32),
        np.empty((32,), np.float32),
        np.empty((8, 4), np.float32),
        np.empty((4, 8), np.float32, order="F"),
        np.empty((4, 16), np.float32)[:, ::2],
        readonly,
    ]
    for bad in bads:
        for call in _calls_with_out(x, bad):
            with pytest.raises(ValueError, match=r"\bout\b"):
                call()


def test_out_overlapping_an_input_raises_value_error(rng):
    x = make_x(rng, (4, 8), np.float64)
    dy = make_x(rng, (4, 8), np.float64)
    weight, bias = make_affine(rng, (8,), np.float64)
    _, mean, rstd = normlab.layer_norm(x, return_stats=True)
    x_before = x.copy()
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.layer_norm(x, out=x)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.rms_norm(x, out=x)
    # a partial overlap
    big = make_x(rng, (5, 8), np.float64)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.layer_norm(big[:4], out=big[1:])
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.rms_norm(big[1:], out=big[:4])
    # overlapping weight / bias
    wb = np.zeros((4, 8))
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.layer_norm(x, wb[1], out=wb)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.layer_norm(x, weight, wb[2], out=wb)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.rms_norm(x, wb[3], out=wb)
    # backward: dx must not overlap dy or x
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.layer_norm_backward(dy, x, mean, rstd, weight, out=dy)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.layer_norm_backward(dy, x, mean, rstd, out=x)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.rms_norm_backward(dy, x, rstd, weight, out=dy)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.rms_norm_backward(dy, x, rstd, out=x)
    assert np.array_equal(x, x_before)


def test_out_overlapping_a_strided_input_raises_value_error(rng):
    """The overlap check must look at the caller's array, not at normlab's contiguous copy of
    it: otherwise out silently overwrites a strided x (or dy) that it overlaps."""
    base = make_x(rng, (4, 16), np.float64)
    x = base[:, ::2]  # strided, copied internally
    out = base.reshape(-1)[:32].reshape(4, 8)  # C-contiguous, overlaps x
    assert np.shares_memory(x, out)
    x_before = x.copy()
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.layer_norm(x, out=out)
    assert np.array_equal(x, x_before)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.rms_norm(x, out=out)
    assert np.array_equal(x, x_before)
    xc = np.ascontiguousarray(x_before)
    _, mean, rstd = normlab.layer_norm(xc, return_stats=True)
    with pytest.raises(ValueError, match=r"\bout\b"):
        normlab.layer_norm_backward(x, xc, mean, rstd, out=out)  # dy = strided view of base


def test_overlap_check_agrees_with_numpy_bounds_test(rng):
    """The out= overlap check (_core.first_overlap) is numpy.may_share_memory's bounds test:
    compare them over views with negative, zero and large strides, empty views and non-arrays."""
    from normlab._core import first_overlap

    base = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    views = [base, base[1:3], base[::-1], base[:, ::-2, 1:], base[2, :, 3], base[3:, 2:],
             base[:0], base[::3, ::5, ::4], np.broadcast_to(base[0, 0], (7, 5)), base[..., ::-1],
             np.zeros(5, np.float32), base.reshape(-1)[7:8]]
    outs = [base[0], base[3], base.reshape(-1)[60:90], base[:, 5], base[1:2, 1:2], base[:0]]
    for out in outs:
        for view in views:
            expected = "v" if np.may_share_memory(out, view) else None
            assert first_overlap(out, ((None, "none"), ([1.0], "list"), (view, "v"))) == expected
        assert first_overlap(out, ()) is None


# --------------------------------------------------------------------------------------------
# argument checks: each error names the argument
# --------------------------------------------------------------------------------------------


def _all_forward(x, **kw):
    return [lambda: normlab.layer_norm(x, **kw), lambda: normlab.rms_norm(x, **kw)]


@pytest.mark.parametrize(
    "bad",
    [
        [[1.0, 2.0], [3.0, 4.0]],
        (1.0, 2.0),
        3.0,
        None,
        np.ones((2, 3), np.int32),
        np.ones((2, 3), np.int64),
        np.ones((2, 3), np.complex128),
        np.ones((2, 3), np.int16),
        np.ones((2, 3), np.dtype(">f2")),
        np.ones((2, 3), np.bool_),
        np.ones((2, 3), np.dtype(">f8")),
        np.ones((2, 3), np.longdouble) if np.dtype(np.longdouble) != np.float64 else np.ones(3, object),
    ],
    ids=lambda b: type(b).__name__ if not isinstance(b, np.ndarray) else str(b.dtype),
)
def test_x_wrong_type_raises_type_error(bad):
    for call in _all_forward(bad):
        with pytest.raises(TypeError, match=r"\bx\b"):
            call()
    dy = np.ones((2, 3))
    stat = np.ones(2)
    with pytest.raises(TypeError, match=r"\bx\b"):
        normlab.layer_norm_backward(dy, bad, stat, stat)
    with pytest.raises(TypeError, match=r"\bx\b"):
        normlab.rms_norm_backward(dy, bad, stat)


def test_zero_dim_x_raises_value_error():
    for dtype in DTYPES:
        x = np.array(1.0, dtype)
        for call in _all_forward(x):
            with pytest.raises(ValueError, match=r"\bx\b"):
                call()
        with pytest.raises(ValueError, match=r"\bx\b"):
            normlab.layer_norm_backward(x, x, x, x)
        with pytest.raises(ValueError, match=r"\bx\b"):
            normlab.rms_norm_backward(x, x, x)


def test_weight_and_bias_checks(rng):
    x = make_x(rng, (4, 8), np.float32)
    for name in ("weight", "bias"):
        for bad_shape in ((9,), (1, 8), (4, 8), ()):
            kw = {name: np.ones(bad_shape, np.float32)}
            with pytest.raises(ValueError, match=name):
                normlab.layer_norm(x, **kw)
            if name == "weight":
                with pytest.raises(ValueError, match=name):
                    normlab.rms_norm(x, **kw)
        for bad in (np.ones(8, np.float64), np.ones(8, np.int32), [1.0] * 8):
            with pytest.raises(TypeError, match=name):
                normlab.layer_norm(x, **{name: bad})
            if name == "weight":
                with pytest.raises(TypeError, match=name):
                    normlab.rms_norm(x, **{name: bad})
    # weight for axis=(-2, -1) has the shape of both axes
    x3 = make_x(rng, (2, 3, 4), np.float64)
    with pytest.raises(ValueError, match="weight"):
        normlab.layer_norm(x3, np.ones(12), axis=(-2, -1))
    with pytest.raises(ValueError, match="weight"):
        normlab.rms_norm(x3, np.ones(4), axis=(-2, -1))
    # backward weight
    stat = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="weight"):
        normlab.layer_norm_backward(x, x, stat, stat, np.ones(7, np.float32))
    with pytest.raises(TypeError, match="weight"):
        normlab.rms_norm_backward(x, x, stat, np.ones(8, np.float64))


def test_backward_statistics_and_dy_checks(rng):
    x = make_x(rng, (4, 8), np.float64)
    dy = make_x(rng, (4, 8), np.float64)
    _, mean, rstd = normlab.layer_norm(x, return_stats=True)
    for bad in (np.ones(5), np.ones((4, 1)), np.ones(()), np.ones((4, 8))):
        with pytest.raises(ValueError, match="mean"):
            normlab.layer_norm_backward(dy, x, bad, rstd)
        with pytest.raises(ValueError, match="rstd"):
            normlab.layer_norm_backward(dy, x, mean, bad)
        with pytest.raises(ValueError, match="rstd"):
            normlab.rms_norm_backward(dy, x, bad)
    for bad in (np.ones((4, 9)), np.ones((8, 4)), np.ones(32), np.ones((1, 8))):
        with pytest.raises(ValueError, match="dy"):
            normlab.layer_norm_backward(bad, x, mean, rstd)
        with pytest.raises(ValueError, match="dy"):
            normlab.rms_norm_backward(bad, x, rstd)
    f32 = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="mean"):
        normlab.layer_norm_backward(dy, x, f32, rstd)
    with pytest.raises(TypeError, match="rstd"):
        normlab.rms_norm_backward(dy, x, f32)
    with pytest.raises(TypeError, match="dy"):
        normlab.layer_norm_backward(dy.astype(np.float32), x, mean, rstd)
    with pytest.raises(TypeError, match="dy"):
        normlab.rms_norm_backward(dy.tolist(), x, rstd)


@pytest.mark.parametrize("eps", [0, 0.0, -1, -1e-5, float("nan"), float("inf"), -float("inf")])
def test_eps_bad_value_raises_value_error(eps):
    x = np.ones((2, 4), np.float32)
    for call in _all_forward(x, eps=eps):
        with pytest.raises(ValueError, match="eps"):
            call()


@pytest.mark.parametrize("eps", ["a", [1e-5], object(), 1j])
def test_eps_bad_type_raises_type_error(eps):
    x = np.ones((2, 4), np.float32)
    for call in _all_forward(x, eps=eps):
        with pytest.raises(TypeError, match="eps"):
            call()


def test_eps_accepts_real_numbers(rng):
    x = make_x(rng, (3, 5), np.float64)
    y = normlab.layer_norm(x, eps=1e-3)
    assert np.array_equal(normlab.layer_norm(x, eps=np.float64(1e-3)), y)
    assert np.array_equal(normlab.rms_norm(x, eps=1), normlab.rms_norm(x, eps=1.0))
    # rms eps None is the dtype's machine epsilon
    for dtype in DTYPES:
        xd = x.astype(dtype)
        assert np.array_equal(normlab.rms_norm(xd), normlab.rms_norm(xd, eps=float(np.finfo(dtype).eps)))


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((4, 8), 0),
        ((4, 8), (0,)),
        ((2, 3, 4), (0, 2)),
        ((2, 3, 4), (0, 1)),
        ((2, 3, 4), 1),
        ((4, 8), (-1, -1)),
        ((4, 8), (1, -1)),
        ((4, 8), 2),
        ((4, 8), -3),
        ((4, 8), (-1, 5)),
    ],
)
def test_axis_bad_value_raises_value_error(shape, axis):
    x = np.ones(shape)
    for call in _all_forward(x, axis=axis):
        with pytest.raises((ValueError,), match="axis"):
            call()


@pytest.mark.parametrize("axis", [1.5, "1", None, (1.5,), (-1, "a"), [[-1]], True, (True,)])
def test_axis_bad_type_raises_type_error(axis):
    x = np.ones((4, 8))
    for call in _all_forward(x, axis=axis):
        with pytest.raises(TypeError, match="axis"):
            call()


def test_axis_type_check_does_not_depend_on_earlier_calls():
    """A float or bool axis is a TypeError even after the equal int axis was used (the
    validation cache must not treat -1.0 or True like -1 or 1)."""
    x = np.ones((4, 8))
    normlab.layer_norm(x, axis=-1)
    normlab.layer_norm(x, axis=1)
    normlab.rms_norm(x, axis=(-1,))
    for axis in (-1.0, 1.0, True, np.True_, (-1.0,)):
        for call in _all_forward(x, axis=axis):
            with pytest.raises(TypeError, match="axis"):
                call()


def test_return_stats_must_be_bool(rng):
    x = make_x(rng, (2, 4), np.float64)
    for bad in ("yes", None, 1.0):
        for call in _all_forward(x, return_stats=bad):
            with pytest.raises(TypeError, match="return_stats"):
                call()
    assert len(normlab.layer_norm(x, return_stats=np.bool_(True))) == 3
    assert isinstance(normlab.rms_norm(x, return_stats=np.bool_(False)), np.ndarray)


# --------------------------------------------------------------------------------------------
# strided inputs and zero-copy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_match_contiguous_copies(cpu_target, rng, dtype):
    base = make_x(rng, (6, 34), dtype, offset=1.0)
    wide_w = make_x(rng, (34,), dtype, offset=1.0)
    wide_b = make_x(rng, (34,), dtype)
    variants = [
        base[:, ::2],
        np.asfortranarray(base[:, :17]),
        base[::2, 1::2],
        base[:, 17:][:, ::-1],
    ]
    weight, bias = wide_w[::2], wide_b[::2]
    for x in variants:
        assert not x.flags.c_contiguous
        xc = np.ascontiguousarray(x)
        w, b = np.ascontiguousarray(weight[: x.shape[1]]), np.ascontiguousarray(bias[: x.shape[1]])
        ws, bs = weight[: x.shape[1]], bias[: x.shape[1]]  # strided too
        dy = np.asfortranarray(make_x(rng, x.shape, dtype))
        dyc = np.ascontiguousarray(dy)
        x_before = x.copy()

        got = normlab.layer_norm(x, ws, bs, return_stats=True)
        want = normlab.layer_norm(xc, w, b, return_stats=True)
        assert all(np.array_equal(g, e) for g, e in zip(got, want))
        assert got[0].flags.c_contiguous
        _, mean, rstd = want
        mean_strided = np.repeat(mean, 2)[::2]
        assert not mean_strided.flags.c_contiguous or mean.size <= 1
        got = normlab.layer_norm_backward(dy, x, mean_strided, rstd, ws)
        want = normlab.layer_norm_backward(dyc, xc, mean, rstd, w)
        assert all(np.array_equal(g, e) for g, e in zip(got, want))

        got = normlab.rms_norm(x, ws, return_stats=True)
        want = normlab.rms_norm(xc, w, return_stats=True)
        assert all(np.array_equal(g, e) for g, e in zip(got, want))
        rstd = want[1]
        got = normlab.rms_norm_backward(dy, x, rstd, ws)
        want = normlab.rms_norm_backward(dyc, xc, rstd, w)
        assert all(np.array_equal(g, e) for g, e in zip(got, want))
        assert np.array_equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_and_broadcast_inputs(cpu_target, rng, dtype):
    """Inputs are only read: read-only arrays work, and a zero-stride broadcast x is copied
    like any strided input."""
    x = make_x(rng, (5, 17), dtype)
    dy = make_x(rng, (5, 17), dtype)
    weight, bias = make_affine(rng, (17,), dtype)
    want = normlab.layer_norm(x, weight, bias, return_stats=True)
    want_bwd = normlab.layer_norm_backward(dy, x, want[1], want[2], weight)
    want_rms = normlab.rms_norm(x, weight, return_stats=True)
    want_rms_bwd = normlab.rms_norm_backward(dy, x, want_rms[1], weight)
    for a in (x, dy, weight, bias, *want[1:], want_rms[1]):
        a.flags.writeable = False
    got = normlab.layer_norm(x, weight, bias, return_stats=True)
    assert all(np.array_equal(g, e) for g, e in zip(got, want))
    got = normlab.layer_norm_backward(dy, x, want[1], want[2], weight)
    assert all(np.array_equal(g, e) for g, e in zip(got, want_bwd))
    got = normlab.rms_norm(x, weight, return_stats=True)
    assert all(np.array_equal(g, e) for g, e in zip(got, want_rms))
    got = normlab.rms_norm_backward(dy, x, want_rms[1], weight)
    assert all(np.array_equal(g, e) for g, e in zip(got, want_rms_bwd))

    row = make_x(rng, (17,), dtype)
    xb = np.broadcast_to(row, (4, 17))
    assert xb.strides[0] == 0
    y = normlab.layer_norm(xb, weight, bias)
    assert np.array_equal(y, normlab.layer_norm(np.ascontiguousarray(xb), weight, bias))
    assert np.array_equal(y[0], y[3])
    assert np.array_equal(normlab.rms_norm(xb), normlab.rms_norm(np.ascontiguousarray(xb)))


def _peak_bytes(fn):
    fn()  # warm up: caches, lazily created objects
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous_input_is_not_copied(rng, dtype):
    """With out= and no statistics nothing x-sized is allocated (NumPy reports its data
    allocations to tracemalloc, so a hidden copy would show in the peak)."""
    x = make_x(rng, (2048, 1024 if dtype == np.float32 else 512), dtype)
    assert x.nbytes >= 4 * 2**20
    weight, bias = make_affine(rng, x.shape[-1:], dtype)
    out = np.empty_like(x)
    limit = x.nbytes // 16
    assert _peak_bytes(lambda: normlab.layer_norm(x, weight, bias, out=out)) < limit
    assert _peak_bytes(lambda: normlab.layer_norm(x, out=out)) < limit
    assert _peak_bytes(lambda: normlab.rms_norm(x, weight, out=out)) < limit
    assert _peak_bytes(lambda: normlab.rms_norm(x, out=out)) < limit
    dy = make_x(rng, x.shape, dtype)
    _, mean, rstd = normlab.layer_norm(x, return_stats=True)
    assert _peak_bytes(lambda: normlab.layer_norm_backward(dy, x, mean, rstd, weight, out=out)) < limit
    assert _peak_bytes(lambda: normlab.rms_norm_backward(dy, x, rstd, weight, out=out)) < limit


def test_tracemalloc_sees_the_copy_of_a_strided_input(rng):
    """The converse of the zero-copy test, so that test can fail: a strided x is copied once,
    and tracemalloc reports that copy."""
    base = make_x(rng, (2048, 2048), np.float32)
    x = base[:, ::2]
    out = np.empty(x.shape, np.float32)
    peak = _peak_bytes(lambda: normlab.layer_norm(x, out=out))
    assert peak >= x.size * 4


def test_empty_axis_tuple_raises():
    x = np.ones((4, 8))
    for call in _all_forward(x, axis=()):
        with pytest.raises((TypeError, ValueError), match="axis"):
            call()


# --------------------------------------------------------------------------------------------
# property-based: arbitrary finite values
# --------------------------------------------------------------------------------------------

def _rows_strategy(dtype):
    width = 32 if dtype == np.float32 else 64
    elements = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=width)
    shapes = st.tuples(st.integers(1, 4), st.integers(1, 40))
    return hnp.arrays(dtype, shapes, elements=elements)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_arbitrary_values(cpu_target, dtype):
    """Rows of arbitrary finite values (near-constant rows, huge spreads, mixed magnitudes)
    match the reference."""

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(x=_rows_strategy(dtype), use_affine=st.booleans())
    def check(x, use_affine):
        cols = x.shape[1]
        weight = np.linspace(-2.0, 2.0, cols).astype(dtype) if use_affine else None
        bias = np.linspace(1.0, -1.0, cols).astype(dtype) if use_affine else None
        check_layer_forward(x, weight, bias)
        check_rms_forward(x, weight)

    check()


@pytest.mark.parametrize("n", [1, 7, 24, 48, 64, 100, 513])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_row_results_do_not_depend_on_neighbouring_rows(cpu_target, rng, n, dtype):
    """Each row comes out bitwise as when it is normalized alone, whatever its neighbours
    (also for the fused add)."""
    x = (rng.standard_normal((11, n)) * 3 + 1e3 * (np.arange(11) % 2)[:, None]).astype(dtype)
    r = rng.standard_normal((11, n)).astype(dtype)
    w = rng.standard_normal(n).astype(np.float64 if dtype == np.float64 else np.float32)
    for call in (
        lambda a, b: normlab.layer_norm(a, w, return_stats=True),
        lambda a, b: normlab.rms_norm(a, w, return_stats=True),
        lambda a, b: normlab.add_layer_norm(a, b, w, return_stats=True),
        lambda a, b: normlab.add_rms_norm(a, b, w, return_stats=True),
    ):
        together = call(x, r)
        alone = [call(x[i : i + 1], r[i : i + 1]) for i in range(11)]
        for k, out in enumerate(together):
            assert out.tobytes() == np.concatenate([a[k] for a in alone]).tobytes()


# --------------------------------------------------------------------------------------------
# the plain call: common calls run in one C++ step (_core.layer_norm_plain / rms_norm_plain),
# every other call goes through the full checks of the Python layer
# --------------------------------------------------------------------------------------------

import ml_dtypes  # noqa: E402

from normlab import _core  # noqa: E402

# Plain calls take the half types too, with float32 parameters and statistics.
PLAIN_DTYPES = DTYPES + [np.float16, ml_dtypes.bfloat16]


def _param_dtype(dtype):
    return np.float32 if np.dtype(dtype).itemsize == 2 else dtype


def _machine_eps(dtype):
    return float(ml_dtypes.finfo(dtype).eps)


def _same(a, b):
    """Bitwise equality of two results (arrays or tuples of arrays)."""
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return len(a) == len(b) and all(
        p.dtype == q.dtype and p.shape == q.shape and np.array_equal(p.reshape(-1).view(np.uint8), q.reshape(-1).view(np.uint8))
        for p, q in zip(a, b)
    )


@pytest.mark.parametrize("dtype", PLAIN_DTYPES)
@pytest.mark.parametrize("shape", [(33,), (4, 64), (3, 5, 48), (37, 100)])
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("stats", [False, True])
def test_plain_calls_match_the_checked_path(cpu_target, rng, dtype, shape, with_out, stats):
    x = make_x(rng, shape, dtype, offset=3.0)
    weight, bias = make_affine(rng, shape[-1:], _param_dtype(dtype))
    eps = 1e-3
    for w, b in ((None, None), (weight, None), (None, bias), (weight, bias)):
        out = np.full_like(x, np.nan) if with_out else None
        plain = _core.layer_norm_plain(x, w, b, out, eps, stats)
        assert plain is not None
        assert (plain[0] if stats else plain) is out or not with_out
        # axis=(-1,) is not a plain call: the Python layer checks it and calls the kernel
        checked = normlab.layer_norm(x, w, b, axis=(-1,), eps=eps, return_stats=stats)
        assert _same(plain, checked)
        assert _same(normlab.layer_norm(x, w, b, eps=eps, out=out, return_stats=stats), checked)

        out = np.full_like(x, np.nan) if with_out else None
        plain = _core.rms_norm_plain(x, w, out, None, stats)
        assert plain is not None
        # eps=None is the dtype's machine epsilon on both paths
        checked = normlab.rms_norm(x, w, axis=(-1,), eps=_machine_eps(dtype), return_stats=stats)
        assert _same(plain, checked)
        assert _same(normlab.rms_norm(x, w, out=out, return_stats=stats), checked)


class _Subclass(np.ndarray):
    pass


def _not_plain_calls():
    """(label, layer_norm_plain arguments) of calls the plain path must turn down."""
    x = np.ones((4, 8), np.float32)
    w = np.ones(8, np.float32)
    out = np.empty((4, 8), np.float32)
    read_only = np.empty((4, 8), np.float32)
    read_only.flags.writeable = False
    calls = [
        ("strided x", (np.ones((4, 16), np.float32)[:, ::2], w, None, None, 1e-5, False)),
        ("subclass x", (x.view(_Subclass), w, None, None, 1e-5, False)),
        ("float16 x with float16 weight", (x.astype(np.float16), w.astype(np.float16), None, None, 1e-5, False)),
        ("bfloat16 x with float16 out", (x.astype(ml_dtypes.bfloat16), None, None, np.empty((4, 8), np.float16),
                                         1e-5, False)),
        ("float16 x with float32 out", (x.astype(np.float16), None, None, out, 1e-5, False)),
        ("int x", (x.astype(np.int32), None, None, None, 1e-5, False)),
        ("big-endian x", (x.astype(">f4"), None, None, None, 1e-5, False)),
        ("0-d x", (np.array(1.0, np.float32), None, None, None, 1e-5, False)),
        ("list x", (x.tolist(), None, None, None, 1e-5, False)),
        ("no rows", (np.ones((0, 8), np.float32), None, None, None, 1e-5, False)),
        ("no cols", (np.ones((4, 0), np.float32), None, None, None, 1e-5, False)),
        ("float64 weight", (x, w.astype(np.float64), None, None, 1e-5, False)),
        ("2-d weight", (x, w.reshape(1, 8), None, None, 1e-5, False)),
        ("short weight", (x, w[:4], None, None, 1e-5, False)),
        ("strided weight", (x, np.ones(16, np.float32)[::2], None, None, 1e-5, False)),
        ("list bias", (x, None, [0.0] * 8, None, 1e-5, False)),
        ("read-only out", (x, None, None, read_only, 1e-5, False)),
        ("out is x", (x, None, None, x, 1e-5, False)),
        ("out is weight's buffer", (x, out[0], None, out, 1e-5, False)),
        ("float64 out", (x, None, None, out.astype(np.float64), 1e-5, False)),
        ("reshaped out", (x, None, None, out.reshape(8, 4), 1e-5, False)),
        ("strided out", (x, None, None, np.empty((4, 16), np.float32)[:, ::2], 1e-5, False)),
        ("list out", (x, None, None, out.tolist(), 1e-5, False)),
        ("return_stats 1", (x, None, None, None, 1e-5, 1)),
        ("return_stats numpy bool", (x, None, None, None, 1e-5, np.True_)),
    ]
    for eps in (0.0, -1e-5, float("nan"), float("inf"), 1, np.float32(1e-5), True, "1e-5", None):
        calls.append((f"eps {eps!r}", (x, None, None, None, eps, False)))
    return calls


@pytest.mark.parametrize("label, args", _not_plain_calls(), ids=[c[0] for c in _not_plain_calls()])
def test_calls_that_are_not_plain_are_turned_down(label, args):
    x, w, b, out, eps, stats = args
    assert _core.layer_norm_plain(x, w, b, out, eps, stats) is None
    if eps is None:  # rms_norm's default
        return
    assert _core.rms_norm_plain(x, w if w is not None else b, out, eps, stats) is None


@pytest.mark.parametrize("dtype", PLAIN_DTYPES)
@pytest.mark.parametrize("shape", [(33,), (4, 64), (3, 5, 48)])
@pytest.mark.parametrize("stats", [False, True])
def test_plain_fused_and_backward_calls_match_the_checked_path(cpu_target, rng, dtype, shape, stats):
    x, r, dy, ds = (make_x(rng, shape, dtype, offset=2.0) for _ in range(4))
    weight, bias = make_affine(rng, shape[-1:], _param_dtype(dtype))
    lead = shape[:-1]
    for w, b in ((None, None), (weight, None), (weight, bias)):
        for sum_to in ("new", "x", "residual", "other"):
            xs, rs = x.copy(), r.copy()
            sum_out = {"new": None, "x": xs, "residual": rs, "other": np.empty_like(x)}[sum_to]
            out = np.empty_like(x)
            plain = _core.add_layer_norm_plain(xs, rs, w, b, out, sum_out, 1e-4, stats)
            assert plain is not None and plain[0] is out and (sum_out is None or plain[1] is sum_out)
            checked = normlab.add_layer_norm(x, r, w, b, axis=(-1,), eps=1e-4, return_stats=stats)
            assert _same(plain, checked)
            xs, rs = x.copy(), r.copy()
            sum_out = {"new": None, "x": xs, "residual": rs, "other": np.empty_like(x)}[sum_to]
            plain = _core.add_rms_norm_plain(xs, rs, w, None, sum_out, None, stats)
            assert plain is not None
            checked = normlab.add_rms_norm(x, r, w, axis=(-1,), return_stats=stats)
            assert _same(plain, checked)

        pdtype = _param_dtype(dtype)
        mean, rstd = np.array(rng.standard_normal(lead), pdtype), np.array(rng.random(lead) + 0.5, pdtype)
        for extra in (None, ds):
            for out in (None, np.empty_like(x)):
                plain = _core.layer_norm_backward_plain(dy, x, mean, rstd, w, extra, out)
                assert plain is not None and (out is None or plain[0] is out)
                if extra is None:
                    checked = normlab.layer_norm_backward(dy, x, mean, rstd, w, axis=(-1,))
                else:
                    checked = normlab.add_layer_norm_backward(dy, x, mean, rstd, w, ds=extra, axis=(-1,))
                if w is None:
                    assert plain[1:] == (None, None)
                assert _same(tuple(a for a in plain if a is not None), tuple(a for a in checked if a is not None))
                plain = _core.rms_norm_backward_plain(dy, x, rstd, w, extra, out)
                assert plain is not None
                checked = normlab.add_rms_norm_backward(dy, x, rstd, w, ds=extra, axis=(-1,)) if extra is not None \
                    else normlab.rms_norm_backward(dy, x, rstd, w, axis=(-1,))
                assert _same(tuple(a for a in plain if a is not None), tuple(a for a in checked if a is not None))


def _not_plain_fused_and_backward_calls():
    """(label, function name, arguments) of fused and backward calls the plain path turns down."""
    x = np.ones((4, 8), np.float32)
    r = np.ones((4, 8), np.float32)
    w = np.ones(8, np.float32)
    st = np.ones(4, np.float32)
    read_only = np.ones((4, 8), np.float32)
    read_only.flags.writeable = False
    out = np.empty((4, 8), np.float32)
    return [
        ("float64 residual", "add_layer_norm_plain", (x, r.astype(np.float64), w, None, None, None, 1e-5, False)),
        ("short residual", "add_layer_norm_plain", (x, r[:2], w, None, None, None, 1e-5, False)),
        ("read-only x as sum_out", "add_layer_norm_plain", (read_only, r, w, None, None, read_only, 1e-5, False)),
        ("sum_out overlapping x", "add_layer_norm_plain", (x, r, w, None, None, x[1:3], 1e-5, False)),
        ("sum_out is weight's buffer", "add_rms_norm_plain", (x, r, out[0], None, out, None, False)),
        ("out is sum_out", "add_rms_norm_plain", (x, r, w, out, out, None, False)),
        ("out is residual", "add_layer_norm_plain", (x, r, w, None, r, None, 1e-5, False)),
        ("list residual", "add_rms_norm_plain", (x, r.tolist(), w, None, None, None, False)),
        ("float64 mean", "layer_norm_backward_plain", (x, x, st.astype(np.float64), st, w, None, None)),
        ("2-d rstd", "layer_norm_backward_plain", (x, x, st, st.reshape(4, 1), w, None, None)),
        ("short dy", "layer_norm_backward_plain", (x[:2], x, st, st, w, None, None)),
        ("float64 ds", "rms_norm_backward_plain", (x, x, st, w, x.astype(np.float64), None)),
        ("out is dy", "rms_norm_backward_plain", (x, r, st, w, None, x)),
        ("out overlapping ds", "layer_norm_backward_plain", (x, r, st, st, w, out, out)),
        ("list rstd", "rms_norm_backward_plain", (x, x, st.tolist(), w, None, None)),
    ]


@pytest.mark.parametrize("label, name, args", _not_plain_fused_and_backward_calls(),
                         ids=[c[0] for c in _not_plain_fused_and_backward_calls()])
def test_fused_and_backward_calls_that_are_not_plain_are_turned_down(label, name, args):
    assert getattr(_core, name)(*args) is None
