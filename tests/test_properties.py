"""Hypothesis property tests of every public function against float64 / SciPy references:
random shapes, strides, axes, layouts, dtypes, magnitudes from 1e-30 to 1e30, NaN/Inf, constant
blocks. Bounded for CI; HYPOTHESIS_PROFILE=thorough runs 10x more examples."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import normlab
import reference as ref

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [np.float32, np.float64]


@st.composite
def float_blocks(draw, ndim_range=(2, 3), max_side=12):
    """A float array with one scale per row (1e-30 .. 1e30), an offset relative to it, optional
    constant rows and NaN/Inf, possibly a strided or transposed view."""
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(*ndim_range))
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    exponent = draw(st.integers(-30, 30)) if dtype == np.float32 else draw(st.integers(-100, 100))
    scale = 10.0**exponent
    offset = draw(st.sampled_from([0.0, 1.0, 1e3]))
    x = (rng.standard_normal(shape) + offset) * scale
    if draw(st.booleans()):  # constant rows
        x.reshape(-1, shape[-1])[:: max(1, draw(st.integers(1, 3)))] = scale
    x = x.astype(dtype)
    special = draw(st.sampled_from([None, np.nan, np.inf]))
    if special is not None:
        x.flat[draw(st.integers(0, x.size - 1))] = special
    layout = draw(st.sampled_from(["c", "fortran", "strided"]))
    if layout == "fortran":
        x = np.asfortranarray(x)
    elif layout == "strided":
        wide = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x


def _finite_rows(x2d):
    return np.all(np.isfinite(x2d), axis=1)


def _close(got, want, dtype, scale):
    tol = 2e-6 if dtype == np.float32 else 1e-9
    return np.all(np.abs(got.astype(np.float64) - want) <= tol * scale + 2 * np.finfo(dtype).eps * np.abs(want))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy reference meets NaN/Inf rows
@given(x=float_blocks(), use_affine=st.booleans(), two_axes=st.booleans())
def test_layer_and_rms_norm_match_the_float64_reference(x, use_affine, two_axes):
    axis = (-2, -1) if two_axes and x.ndim >= 2 else -1
    k = 2 if axis == (-2, -1) else 1
    norm_shape = x.shape[-k:]
    dtype = x.dtype.type
    w = np.linspace(-2, 2, int(np.prod(norm_shape))).reshape(norm_shape).astype(dtype) if use_affine else None
    b = np.linspace(1, -1, int(np.prod(norm_shape))).reshape(norm_shape).astype(dtype) if use_affine else None
    unit = 1.0 if w is None else np.abs(w.astype(np.float64)) + 1.0
    rows = x.reshape(-1, int(np.prod(norm_shape))) if x.flags.c_contiguous else np.ascontiguousarray(x).reshape(
        -1, int(np.prod(norm_shape)))
    finite = _finite_rows(rows)
    eps = 1e-5 * float(np.max(np.abs(rows[finite]))) ** 2 if finite.any() else 1e-5
    eps = max(eps, 1e-300) if dtype == np.float64 else min(max(eps, 1e-40), 1e30)

    y = normlab.layer_norm(x, w, b, axis=axis, eps=eps)
    y_ref, _, _ = ref.layer_norm(x, w, b, axis=axis, eps=eps)
    y2 = y.reshape(rows.shape)
    y_ref2 = np.asarray(y_ref).reshape(rows.shape)
    unit2 = np.broadcast_to(unit, norm_shape).reshape(-1) if w is not None else 1.0
    assert _close(y2[finite], y_ref2[finite], dtype, unit2)

    r = normlab.rms_norm(x, w, axis=axis, eps=eps)
    r_ref, _ = ref.rms_norm(x, w, axis=axis, eps=eps)
    assert _close(r.reshape(rows.shape)[finite], np.asarray(r_ref).reshape(rows.shape)[finite], dtype, unit2)


@given(x=float_blocks(ndim_range=(2, 2)), seed=st.integers(0, 2**32 - 1))
def test_fused_add_norms_equal_the_unfused_composition(x, seed):
    residual = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    s_ref = np.ascontiguousarray(x) + residual
    y, s = normlab.add_layer_norm(x, residual)
    assert np.array_equal(s, s_ref, equal_nan=True)
    assert np.array_equal(y, normlab.layer_norm(s_ref), equal_nan=True)
    y, s = normlab.add_rms_norm(x, residual)
    assert np.array_equal(y, normlab.rms_norm(s_ref), equal_nan=True)


@given(
    n=st.integers(1, 3), c=st.integers(1, 6), spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    channels_last=st.booleans(), dtype=st.sampled_from(DTYPES), exponent=st.integers(-20, 20),
    seed=st.integers(0, 2**32 - 1), data=st.data(),
)
def test_channel_norms_match_the_float64_reference(n, c, spatial, channels_last, dtype, exponent, seed, data):
    rng = np.random.default_rng(seed)
    scale = 10.0**exponent
    shape = (n, c, *spatial)
    x = ((rng.standard_normal(shape) + 2.0) * scale).astype(dtype)
    x64 = x.astype(np.float64)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    groups = data.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    eps = 1e-5 * scale * scale

    def affine(y64):
        return y64 * w.reshape((1, c) + (1,) * len(spatial)) + b.reshape((1, c) + (1,) * len(spatial))

    def normalize(axes_stats):
        m = x64.mean(axis=axes_stats, keepdims=True)
        v = ((x64 - m) ** 2).mean(axis=axes_stats, keepdims=True)
        return (x64 - m) / np.sqrt(v + eps)

    sp_axes = tuple(range(2, 2 + len(spatial)))
    expected = {}
    if n * int(np.prod(spatial)) > 1:
        expected["batch_norm"] = affine(normalize((0,) + sp_axes))
    if int(np.prod(spatial)) > 1:
        expected["instance_norm"] = affine(normalize(sp_axes))
    grouped = x64.reshape((n, groups, c // groups) + tuple(spatial))
    gm = grouped.mean(axis=tuple(range(2, grouped.ndim)), keepdims=True)
    gv = ((grouped - gm) ** 2).mean(axis=tuple(range(2, grouped.ndim)), keepdims=True)
    expected["group_norm"] = affine(((grouped - gm) / np.sqrt(gv + eps)).reshape(shape))

    def to_layout(a):
        return np.moveaxis(a, 1, -1).copy() if channels_last else a

    axis = -1 if channels_last else 1
    xin = to_layout(x)
    for name, want in expected.items():
        if name == "group_norm":
            got = normlab.group_norm(xin, groups, w, b, eps=eps, channel_axis=axis)
        else:
            got = getattr(normlab, name)(xin, w, b, eps=eps, channel_axis=axis)
        unit = np.abs(w).max() + 1.0
        assert _close(got, to_layout(want), dtype, unit), name


@st.composite
def images(draw):
    h = draw(st.integers(0, 24))
    w = draw(st.integers(0, 24))
    density = draw(st.floats(0.05, 0.95))
    seed = draw(st.integers(0, 2**32 - 1))
    img = np.random.default_rng(seed).random((h, w)) < density
    kind = draw(st.sampled_from(["bool", "uint8", "int32", "fortran", "strided"]))
    if kind == "uint8":
        img = img.astype(np.uint8) * 7
    elif kind == "int32":
        img = img.astype(np.int32) - 1  # background -1 below
    elif kind == "fortran":
        img = np.asfortranarray(img)
    elif kind == "strided":
        wide = np.zeros((h, 2 * w), bool)
        wide[:, ::2] = img
        img = wide[:, ::2]
    return img


def _foreground(img):
    return img != (-1 if img.dtype == np.int32 else 0)


@given(img=images(), connectivity=st.sampled_from([4, 8]), min_size=st.integers(0, 6))
def test_labelling_functions_match_scipy(img, connectivity, min_size):
    background = -1 if img.dtype == np.int32 else 0
    fg = _foreground(img)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    want, want_count = ndimage.label(fg, structure=structure) if fg.size else (np.zeros(fg.shape, np.int32), 0)
    labels, count, stats = normlab.label(img, connectivity, background=background, return_stats=True)
    assert count == want_count and np.array_equal(labels, want)

    areas = np.bincount(want.ravel(), minlength=count + 1) if fg.size else np.zeros(1, np.int64)
    assert np.array_equal(stats["area"], areas)
    again = normlab.component_stats(labels, count)
    for key in ("area", "bbox"):
        assert np.array_equal(again[key], stats[key])

    keep = areas[want] >= min_size if fg.size else np.zeros(fg.shape, bool)
    kept = normlab.remove_small_components(img, min_size, connectivity, background=background)
    assert kept.dtype == img.dtype and kept.shape == img.shape
    assert np.array_equal(_foreground(kept), fg & keep)

    largest = normlab.largest_component(img, connectivity, background=background)
    if count == 0:
        assert not largest.any()
    else:
        biggest = int(np.argmax(areas[1:])) + 1  # ties: the lowest label
        assert np.array_equal(largest, want == biggest)


@given(x=float_blocks(ndim_range=(2, 2), max_side=20), seed=st.integers(0, 2**32 - 1),
       use_weight=st.booleans(), with_ds=st.booleans())
def test_row_norm_backwards_match_the_float64_reference(x, seed, use_weight, with_ds):
    x = np.ascontiguousarray(x)
    if not np.all(np.isfinite(x)):
        return  # NaN rows: covered by the forward property
    dtype = x.dtype.type
    rng = np.random.default_rng(seed)
    scale = float(np.max(np.abs(x))) or 1.0
    dy = rng.standard_normal(x.shape).astype(dtype)
    ds = rng.standard_normal(x.shape).astype(dtype) if with_ds else None
    w = rng.standard_normal(x.shape[-1]).astype(dtype) if use_weight else None
    eps = 1e-5 * scale * scale if dtype == np.float64 else min(1e-5 * scale * scale, 1e30)
    tol = (1e-3 if dtype == np.float32 else 1e-7)
    _, mean, rstd = normlab.layer_norm(x, w, eps=eps, return_stats=True)
    got = normlab.add_layer_norm_backward(dy, x, mean, rstd, w, ds=ds)
    want = ref.layer_norm_backward(dy, x, mean, rstd, w)
    extra = 0.0 if ds is None else ds.astype(np.float64)
    g = np.abs(dy.astype(np.float64) * (1.0 if w is None else w.astype(np.float64)))
    # errors are relative to the size of the terms rstd * dy * w, which cancel in dx
    dx_scale = np.max(rstd.astype(np.float64)[:, None] * g) + 1e-300
    assert np.max(np.abs(got[0] - (want[0] + extra))) <= tol * (dx_scale + np.max(np.abs(extra)))
    _, rms_rstd = normlab.rms_norm(x, w, eps=eps, return_stats=True)
    got = normlab.add_rms_norm_backward(dy, x, rms_rstd, w, ds=ds)
    want = ref.rms_norm_backward(dy, x, rms_rstd, w)
    dx_scale = np.max(rms_rstd.astype(np.float64)[:, None] * g) + 1e-300
    assert np.max(np.abs(got[0] - (want[0] + extra))) <= tol * (dx_scale + np.max(np.abs(extra)))


@given(
    kind=st.sampled_from(["batch", "instance", "group"]), n=st.integers(1, 3), c=st.integers(1, 6),
    spatial=st.lists(st.integers(2, 5), min_size=1, max_size=3), channels_last=st.booleans(),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1), use_weight=st.booleans(),
)
def test_channel_norm_backwards_match_the_float64_reference(kind, n, c, spatial, channels_last, dtype, seed,
                                                            use_weight):
    from channel_calls import backward, forward
    from test_channel_norm import _groups, _shape, ref_backward

    rng = np.random.default_rng(seed)
    shape = _shape(n, c, spatial, channels_last)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(c).astype(dtype) if use_weight else None
    groups = _groups(kind, c)
    _, mean, rstd = forward(kind, x, w, cl=channels_last, groups=groups)
    dx, dw, db = backward(kind, dy, x, mean, rstd, w, cl=channels_last, groups=groups)
    rdx, rdw, rdb = ref_backward(dy, x, mean, rstd, kind, groups=groups, w=w, cl=channels_last)
    tol = 1e-4 if dtype == np.float32 else 1e-9
    assert np.max(np.abs(dx - rdx)) <= tol * (np.max(np.abs(rdx)) + 1)
    if use_weight:
        assert np.max(np.abs(dw - rdw)) <= tol * (np.max(np.abs(rdw)) + 1)
        assert np.max(np.abs(db - rdb)) <= tol * (np.max(np.abs(rdb)) + 1)
    else:
        assert dw is None and db is None
