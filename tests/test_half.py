"""float16 / bfloat16 data (numpy.float16, ml_dtypes.bfloat16) through every normalization.

The contract held here:

* x, dy, residual, ds, out and sum_out have x's half dtype; weight and bias are float32 or x's
  own half dtype (PyTorch's mixed rule); statistics are float32 (returned and taken), as are
  batch norm's running statistics; dx has x's dtype and dweight/dbias weight's dtype. Any other
  dtype raises TypeError naming the argument.
* Results are computed in float32 (statistics in float64) and rounded to nearest even: forward
  outputs are within 1 ulp of the half type of the float64 reference (computed from the half
  values themselves), i.e. at most one representable value away from the correctly rounded
  reference. Float32 evaluation may add a few float32 roundings of the terms that make up a
  result, which matters only where those terms cancel (y near 0 with a bias, dx): that slack is
  allowed explicitly and is far below one half ulp elsewhere.
* The fused add's s = x + residual is the correctly rounded sum, bitwise.
* Results are bitwise identical for 1, 2 and 3 threads, and within 1 ulp across SIMD targets.

All roundings of references happen in tests/reference.py (round_half), from float64, once:
ml_dtypes' own float64 -> bfloat16 cast rounds twice (through float32).
"""

from __future__ import annotations

import numpy as np
import pytest

import channel_calls as calls
import normlab
import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
HALVES = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16")]
OTHER_HALF = {F16: BF16, BF16: F16}
EPS32 = 2.0**-24  # float32 unit roundoff
# Forward results: float32 roundings of the terms allowed on top of the half ulp.
FWD_ROUNDINGS = 8
# dx and the column sums: relative to the size of their terms (the spec's 1e-5).
BWD_REL = 1e-5

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def f64(a):
    with np.errstate(invalid="ignore"):  # bfloat16 NaN patterns
        return np.asarray(a).astype(np.float64)


def param_dtype(dtype, wkind):
    return F32 if wkind == "w32" else dtype


def make_x(rng, shape, dtype, offset=0.0, scale=2.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def make_affine(rng, shape, pdtype):
    w = (1.0 + 0.5 * rng.standard_normal(shape)).astype(pdtype)
    b = rng.standard_normal(shape).astype(pdtype)
    return w, b


def check_half(got, ref64, dtype, what, *, slack=0.0, ulps=1):
    """got has `dtype` and every element is at most `ulps` representable values away from ref64
    correctly rounded to `dtype`, or within `slack` (absolute, broadcastable) of ref64. NaN
    exactly where the reference is NaN."""
    ref64 = np.asarray(ref64, np.float64)
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref64.shape, f"{what}: shape {got.shape}, expected {ref64.shape}"
    g = f64(got)
    nan_got, nan_ref = np.isnan(g), np.isnan(ref64)
    assert np.array_equal(nan_got, nan_ref), (
        f"{what}: NaN mismatch at {np.argwhere(nan_got != nan_ref)[:5].tolist()}"
    )
    dist = ref.half_ulp_distance(got, ref64)
    with np.errstate(invalid="ignore"):
        err = np.where(nan_ref, 0.0, np.abs(g - ref64))
    slack = np.broadcast_to(np.asarray(slack, np.float64), err.shape)
    bad = (dist > ulps) & ~(err <= slack)
    if bad.any():
        idx = np.unravel_index(np.argmax(np.where(bad, dist, -1)), bad.shape)
        rounded = f64(ref.round_half(ref64[idx], dtype))
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} elements more than {ulps} ulp off; worst at {idx}: "
            f"got {g[idx]!r}, reference {ref64[idx]!r} (rounded {rounded!r}), {dist[idx]} ulp, "
            f"error {err[idx]:.3e} > slack {slack[idx]:.3e}"
        )


def check_f32(got, ref64, what, *, rtol=1e-6, atol=0.0):
    ref64 = np.asarray(ref64, np.float64)
    assert got.dtype == F32, f"{what}: dtype {got.dtype}, expected float32"
    assert got.shape == ref64.shape, f"{what}: shape {got.shape}, expected {ref64.shape}"
    err = np.abs(f64(got) - ref64)
    bound = atol + rtol * np.abs(ref64)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {bad.sum()} off; worst error {err.max():.3e} (got {f64(got).flat[np.argmax(err)]!r}, "
        f"reference {ref64.flat[np.argmax(err)]!r})"
    )


def check_param_grad(got, ref64, scale, wdtype, what):
    """dweight/dbias: weight's dtype; within BWD_REL * scale (the sum of |terms| per column) of
    the float64 reference, or (half weight) also within 1 ulp of it."""
    if wdtype == F32:
        check_f32(got, ref64, what, rtol=0.0, atol=BWD_REL * scale)
    else:
        check_half(got, ref64, wdtype, what, slack=BWD_REL * scale)


def expand(stat, ndim):
    stat = f64(stat)
    return stat.reshape(stat.shape + (1,) * (ndim - stat.ndim))


def fwd_slack(y_unbiased_ref, b=None):
    """Float32 evaluation slack of y = xhat * w + b: a few roundings of |xhat * w| + |b|."""
    scale = np.abs(y_unbiased_ref)
    if b is not None:
        scale = scale + np.abs(f64(b))
    return FWD_ROUNDINGS * EPS32 * scale


def lead_axes_of(shape, axis):
    return len(shape) - len(ref.normalized_axes(len(shape), axis))


def check_stats_layer(mean, rstd, ref_mean, ref_rstd, lead):
    assert mean.shape == rstd.shape == lead
    std = 1.0 / ref_rstd
    check_f32(mean, ref_mean, "mean", rtol=1e-7, atol=1e-6 * std)
    check_f32(rstd, ref_rstd, "rstd", rtol=1e-6)


def row_bwd_slack(dy, w, rstd, ndim, norm_ndim):
    """BWD_REL times the largest |rstd * dy * w| of each row (broadcastable against dy)."""
    term = np.abs(f64(dy) * expand(rstd, ndim))
    if w is not None:
        term = term * np.abs(f64(w))
    axes = tuple(range(ndim - norm_ndim, ndim))
    return BWD_REL * term.max(axis=axes, keepdims=True)


# --------------------------------------------------------------------------------------------
# layer_norm / rms_norm
# --------------------------------------------------------------------------------------------

ROW_CASES = [
    ((5, 1), -1),
    ((3, 7), -1),
    ((4, 33), -1),
    ((6, 100), -1),
    ((3, 769), -1),
    ((2, 4099), -1),
    ((13, 4099), -1),  # backward: rows of 8 KiB go in groups of 4 (remainders one by one)
    ((2, 3, 17), -1),
    ((4, 6, 16), (-2, -1)),
    ((1, 16), -1),
    ((2, 64), -1),
    # narrow rows (4, 8 or 16 float vectors) in blocks of 8 rows, with rows left over; rows of
    # 3 vectors (48 with AVX-512) go in blocks one at a time
    ((9, 48), -1),
    ((11, 128), -1),
    ((19, 256), -1),
    # rows of 512 KiB or more, fewer than 4: split across the threads
    ((2, 262147), -1),
]
ROW_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in ROW_CASES]
# Forward only: one row of 512 KiB, split across the threads.
FORWARD_CASES = ROW_CASES + [((1, 262144), -1)]
FORWARD_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in FORWARD_CASES]


@pytest.mark.parametrize("wkind", ["w32", "whalf"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape, axis", FORWARD_CASES, ids=FORWARD_IDS)
def test_layer_norm_forward(cpu_target, rng, shape, axis, dtype, wkind):
    x = make_x(rng, shape, dtype, offset=0.5)
    nshape = shape[lead_axes_of(shape, axis):]
    lead = shape[: lead_axes_of(shape, axis)]
    w, b = make_affine(rng, nshape, param_dtype(dtype, wkind))
    y, mean, rstd = normlab.layer_norm(x, w, b, axis=axis, return_stats=True)
    y_ref, m_ref, r_ref = ref.layer_norm(x, w, b, axis=axis)
    yw_ref = ref.layer_norm(x, w, None, axis=axis)[0]
    check_half(y, y_ref, dtype, "y", slack=fwd_slack(yw_ref, b))
    check_stats_layer(mean, rstd, m_ref, r_ref, lead)
    assert same_bits(normlab.layer_norm(x, w, b, axis=axis), y)
    # no affine, weight only, bias only
    y0 = normlab.layer_norm(x, axis=axis)
    y0_ref = ref.layer_norm(x, axis=axis)[0]
    check_half(y0, y0_ref, dtype, "y (no affine)", slack=fwd_slack(y0_ref))
    check_half(normlab.layer_norm(x, w, axis=axis), yw_ref, dtype, "y (weight only)",
               slack=fwd_slack(yw_ref))
    check_half(normlab.layer_norm(x, None, b, axis=axis), ref.layer_norm(x, None, b, axis=axis)[0],
               dtype, "y (bias only)", slack=fwd_slack(y0_ref, b))


@pytest.mark.parametrize("wkind", ["w32", "whalf"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape, axis", FORWARD_CASES, ids=FORWARD_IDS)
def test_rms_norm_forward(cpu_target, rng, shape, axis, dtype, wkind):
    x = make_x(rng, shape, dtype, offset=0.5)
    nshape = shape[lead_axes_of(shape, axis):]
    lead = shape[: lead_axes_of(shape, axis)]
    w, _ = make_affine(rng, nshape, param_dtype(dtype, wkind))
    eps = 1e-5
    y, rstd = normlab.rms_norm(x, w, axis=axis, eps=eps, return_stats=True)
    y_ref, r_ref = ref.rms_norm(x, w, axis=axis, eps=eps)
    check_half(y, y_ref, dtype, "y", slack=fwd_slack(y_ref))
    assert rstd.shape == lead
    check_f32(rstd, r_ref, "rstd", rtol=1e-6)
    y0_ref = ref.rms_norm(x, axis=axis, eps=eps)[0]
    check_half(normlab.rms_norm(x, axis=axis, eps=eps), y0_ref, dtype, "y (no weight)",
               slack=fwd_slack(y0_ref))


@pytest.mark.parametrize("dtype", HALVES)
def test_rms_norm_default_eps_is_the_half_dtypes_epsilon(rng, dtype):
    """eps=None means finfo(x.dtype).eps, as torch.nn.functional.rms_norm: rows of tiny values
    make eps dominate, so float32's epsilon instead would show."""
    eps = float(ml_dtypes.finfo(dtype).eps)
    x = make_x(rng, (4, 40), dtype, scale=0.01)
    y_ref = ref.rms_norm(x, eps=eps)[0]
    y = normlab.rms_norm(x)
    check_half(y, y_ref, dtype, "y (eps=None)", slack=fwd_slack(y_ref))
    y_other = ref.rms_norm(x, eps=float(np.finfo(np.float32).eps))[0]
    assert np.max(ref.half_ulp_distance(y, y_other)) > 1  # the test can tell the two apart


@pytest.mark.parametrize("wkind", ["w32", "whalf", "none"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape, axis", ROW_CASES, ids=ROW_IDS)
def test_layer_norm_backward(cpu_target, rng, shape, axis, dtype, wkind):
    x = make_x(rng, shape, dtype, offset=0.5)
    dy = make_x(rng, shape, dtype, scale=1.0)
    k = lead_axes_of(shape, axis)
    nshape = shape[k:]
    w = None if wkind == "none" else make_affine(rng, nshape, param_dtype(dtype, wkind))[0]
    _, mean, rstd = normlab.layer_norm(x, w, axis=axis, return_stats=True)
    dx, dw, db = normlab.layer_norm_backward(dy, x, mean, rstd, w, axis=axis)
    dx_ref, dw_ref, db_ref = ref.layer_norm_backward(dy, x, mean, rstd, w, axis=axis)
    check_half(dx, dx_ref, dtype, "dx", slack=row_bwd_slack(dy, w, rstd, x.ndim, len(nshape)))
    if w is None:
        assert dw is None and db is None
        return
    assert dw.shape == db.shape == nshape
    xhat = (f64(x) - expand(mean, x.ndim)) * expand(rstd, x.ndim)
    lead = tuple(range(k))
    check_param_grad(dw, dw_ref, np.abs(f64(dy) * xhat).sum(lead), w.dtype, "dweight")
    check_param_grad(db, db_ref, np.abs(f64(dy)).sum(lead), w.dtype, "dbias")
    out = np.full(shape, np.nan, dtype)
    got = normlab.layer_norm_backward(dy, x, mean, rstd, w, axis=axis, out=out)
    assert got[0] is out and same_bits(out, dx)


@pytest.mark.parametrize("wkind", ["w32", "whalf", "none"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape, axis", ROW_CASES, ids=ROW_IDS)
def test_rms_norm_backward(cpu_target, rng, shape, axis, dtype, wkind):
    x = make_x(rng, shape, dtype, offset=0.5)
    dy = make_x(rng, shape, dtype, scale=1.0)
    k = lead_axes_of(shape, axis)
    nshape = shape[k:]
    w = None if wkind == "none" else make_affine(rng, nshape, param_dtype(dtype, wkind))[0]
    _, rstd = normlab.rms_norm(x, w, axis=axis, eps=1e-5, return_stats=True)
    dx, dw = normlab.rms_norm_backward(dy, x, rstd, w, axis=axis)
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x, rstd, w, axis=axis)
    check_half(dx, dx_ref, dtype, "dx", slack=row_bwd_slack(dy, w, rstd, x.ndim, len(nshape)))
    if w is None:
        assert dw is None
        return
    assert dw.shape == nshape
    xhat = f64(x) * expand(rstd, x.ndim)
    check_param_grad(dw, dw_ref, np.abs(f64(dy) * xhat).sum(tuple(range(k))), w.dtype, "dweight")


# --------------------------------------------------------------------------------------------
# fused add + norm
# --------------------------------------------------------------------------------------------

ADD_SHAPES = [(1, 1), (3, 7), (5, 33), (4, 100), (2, 769), (2, 3, 17), (11, 64), (9, 256), (2, 262147)]


def _add_y_candidates(x, r, s, w, b, layer, eps):
    """(name, y reference, y slack, stats references) for y normalized from the exact float64
    sum x + r, and from the returned (rounded) s: either is an acceptable definition of y, as
    long as the whole result follows one of them."""
    out = []
    for name, src in (("exact x + r", f64(x) + f64(r)), ("rounded s", f64(s))):
        if layer:
            y_ref, m_ref, r_ref = ref.layer_norm(src, w, b, eps=eps)
            yw = ref.layer_norm(src, w, None, eps=eps)[0]
            out.append((name, y_ref, fwd_slack(yw, b), (m_ref, r_ref)))
        else:
            y_ref, r_ref = ref.rms_norm(src, w, eps=eps)
            out.append((name, y_ref, fwd_slack(y_ref), (r_ref,)))
    return out


def _check_one_of(candidates, check):
    errors = []
    for name, *rest in candidates:
        try:
            check(*rest)
            return name
        except AssertionError as e:
            errors.append(f"[{name}] {e}")
    raise AssertionError("y matches neither reference:\n" + "\n".join(errors))


@pytest.mark.parametrize("wkind", ["w32", "whalf"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", ADD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_layer_norm_forward_and_backward(cpu_target, rng, shape, dtype, wkind):
    x = make_x(rng, shape, dtype, offset=1.0)
    r = make_x(rng, shape, dtype, scale=1.0)
    w, b = make_affine(rng, shape[-1:], param_dtype(dtype, wkind))
    y, s, mean, rstd = normlab.add_layer_norm(x, r, w, b, return_stats=True)
    assert same_bits(s, ref.round_half(f64(x) + f64(r), dtype)), "s is not x + residual rounded once"
    assert mean.dtype == rstd.dtype == F32 and mean.shape == rstd.shape == shape[:-1]

    def check(y_ref, slack, stats):
        check_half(y, y_ref, dtype, "y", slack=slack)
        check_stats_layer(mean, rstd, stats[0], stats[1], shape[:-1])

    _check_one_of(_add_y_candidates(x, r, s, w, b, True, 1e-5), check)
    y2, s2 = normlab.add_layer_norm(x, r, w, b)
    assert same_bits(y2, y) and same_bits(s2, s)

    dy = make_x(rng, shape, dtype, scale=1.0)
    ds = make_x(rng, shape, dtype, scale=1.0)
    for d in (None, ds):
        dx, dw, db = normlab.add_layer_norm_backward(dy, s, mean, rstd, w, ds=d)
        dx_ref, dw_ref, db_ref = ref.layer_norm_backward(dy, s, mean, rstd, w)
        if d is not None:
            dx_ref = dx_ref + f64(d)
        check_half(dx, dx_ref, dtype, f"dx (ds={'yes' if d is not None else 'no'})",
                   slack=row_bwd_slack(dy, w, rstd, s.ndim, 1))
        xhat = (f64(s) - expand(mean, s.ndim)) * expand(rstd, s.ndim)
        lead = tuple(range(s.ndim - 1))
        check_param_grad(dw, dw_ref, np.abs(f64(dy) * xhat).sum(lead), w.dtype, "dweight")
        check_param_grad(db, db_ref, np.abs(f64(dy)).sum(lead), w.dtype, "dbias")


@pytest.mark.parametrize("wkind", ["w32", "whalf"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", ADD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm_forward_and_backward(cpu_target, rng, shape, dtype, wkind):
    x = make_x(rng, shape, dtype, offset=1.0)
    r = make_x(rng, shape, dtype, scale=1.0)
    w, _ = make_affine(rng, shape[-1:], param_dtype(dtype, wkind))
    y, s, rstd = normlab.add_rms_norm(x, r, w, eps=1e-5, return_stats=True)
    assert same_bits(s, ref.round_half(f64(x) + f64(r), dtype)), "s is not x + residual rounded once"

    def check(y_ref, slack, stats):
        check_half(y, y_ref, dtype, "y", slack=slack)
        check_f32(rstd, stats[0], "rstd", rtol=1e-6)

    _check_one_of(_add_y_candidates(x, r, s, w, None, False, 1e-5), check)

    dy = make_x(rng, shape, dtype, scale=1.0)
    ds = make_x(rng, shape, dtype, scale=1.0)
    dx, dw = normlab.add_rms_norm_backward(dy, s, rstd, w, ds=ds)
    dx_ref, dw_ref = ref.rms_norm_backward(dy, s, rstd, w)
    check_half(dx, dx_ref + f64(ds), dtype, "dx", slack=row_bwd_slack(dy, w, rstd, s.ndim, 1))
    xhat = f64(s) * expand(rstd, s.ndim)
    check_param_grad(dw, dw_ref, np.abs(f64(dy) * xhat).sum(tuple(range(s.ndim - 1))), w.dtype,
                     "dweight")


@pytest.mark.parametrize("dtype", HALVES)
def test_out_and_sum_out_in_place(cpu_target, rng, dtype):
    x = make_x(rng, (6, 40), dtype)
    r = make_x(rng, (6, 40), dtype)
    w, b = make_affine(rng, (40,), F32)
    y_new, s_new = normlab.add_layer_norm(x, r, w, b)
    out = np.full(x.shape, np.nan, dtype)
    xs = x.copy()
    y, s = normlab.add_layer_norm(xs, r, w, b, out=out, sum_out=xs)
    assert y is out and s is xs
    assert same_bits(out, y_new) and same_bits(xs, s_new)
    out = np.full(x.shape, np.nan, dtype)
    assert normlab.rms_norm(x, w, out=out) is out and same_bits(out, normlab.rms_norm(x, w))
    # a strided half input is read as its values (copied once), same result as contiguous
    wide = np.zeros((6, 80), dtype)
    wide[:, ::2] = x
    assert same_bits(normlab.layer_norm(wide[:, ::2], w, b), normlab.layer_norm(x, w, b))


# Rows of every forward store path: narrow rows of 4, 8 and 16 vectors, rows one at a time with
# an unaligned head and a partial tail, and rows of 8192 with weight and bias (in pairs).
SUBNORMAL_ROW_SHAPES = [(16, 64), (9, 128), (9, 256), (5, 769), (3, 2053), (3, 8192)]


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", SUBNORMAL_ROW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_subnormal_outputs_round_exactly(cpu_target, rng, shape, dtype):
    """Outputs of subnormal size in the half type, scattered among normal ones, round as the
    others do. vcvtneps2bf16 reads subnormal floats as zero, so bfloat16 stores test their vectors
    for them (several vectors at a time): a vector that holds one must not be flushed to 0."""
    tiny = 1e-39 if dtype == BF16 else 1e-6  # |y| below the half type's smallest normal
    x = make_x(rng, shape, dtype, offset=0.5)
    cols = shape[-1]
    w = (1.0 + 0.5 * rng.standard_normal(cols)).astype(F32)
    small = rng.random(cols) < 1 / 40
    small[rng.integers(0, cols)] = True
    w[small] = (tiny * (1 + rng.random(small.sum()))).astype(F32)
    b = np.where(small, 0.0, rng.standard_normal(cols)).astype(F32)
    r = make_x(rng, shape, dtype)
    out = np.empty(x.size + 1, dtype)[1:].reshape(shape)  # off the vector width: a head
    s_out = np.empty_like(x)
    y_ref = ref.layer_norm(x, w, b)[0]
    subnormal = np.abs(y_ref) < 2.0 ** ref.half_format(dtype)[1]
    assert subnormal.any() and not subnormal.all()
    yw_ref = ref.layer_norm(x, w, None)[0]
    for o in (None, out):
        check_half(normlab.layer_norm(x, w, b, out=o), y_ref, dtype, "layer_norm y", slack=fwd_slack(yw_ref, b))
        rms_ref = ref.rms_norm(x, w, eps=1e-5)[0]
        check_half(normlab.rms_norm(x, w, eps=1e-5, out=o), rms_ref, dtype, "rms_norm y", slack=fwd_slack(rms_ref))
        y, s = normlab.add_layer_norm(x, r, w, b, out=o, sum_out=s_out)
        add_ref = ref.layer_norm(s, w, b)[0]
        check_half(y, add_ref, dtype, "add_layer_norm y",
                   slack=fwd_slack(ref.layer_norm(s, w, None)[0], b))


# Rows of every backward store path: narrow rows of 4 and 8 vectors in blocks, rows one at a time
# with a partial tail, and rows of 4099 (8 KiB) in groups of four with weight, the rest one by one.
SUBNORMAL_BACKWARD_ROW_SHAPES = [(16, 64), (9, 128), (5, 769), (3, 2053), (9, 4099)]


def tiny_gradient(rng, shape, dtype):
    """dy (or ds) of about 8 times the half type's smallest normal: about a tenth of the dx it
    gives is subnormal in the half type, scattered among normal values."""
    return (8 * 2.0 ** ref.half_format(dtype)[1] * rng.standard_normal(shape)).astype(dtype)


def check_some_subnormal(ref64, dtype):
    subnormal = np.abs(ref64) < 2.0 ** ref.half_format(dtype)[1]
    assert subnormal.any() and not subnormal.all()


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", SUBNORMAL_BACKWARD_ROW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_subnormal_gradients_round_exactly(cpu_target, rng, shape, dtype):
    """As test_subnormal_outputs_round_exactly, for dx of the row-norm backwards: bfloat16 dx is
    tested for subnormal floats several vectors at a time too."""
    x = make_x(rng, shape, dtype, offset=0.5)
    dy = tiny_gradient(rng, shape, dtype)
    ds = tiny_gradient(rng, shape, dtype)
    w = make_affine(rng, shape[-1:], F32)[0]
    out = np.empty(x.size + 1, dtype)[1:].reshape(shape)  # off the vector width: a head
    _, mean, rstd = normlab.layer_norm(x, w, return_stats=True)
    _, rms_rstd = normlab.rms_norm(x, w, eps=1e-5, return_stats=True)
    for wt in (w, None):
        slack = row_bwd_slack(dy, wt, rstd, x.ndim, 1)
        dx_ref = ref.layer_norm_backward(dy, x, mean, rstd, wt)[0]
        check_some_subnormal(dx_ref, dtype)
        rms_ref = ref.rms_norm_backward(dy, x, rms_rstd, wt)[0]
        rms_slack = row_bwd_slack(dy, wt, rms_rstd, x.ndim, 1)
        for o in (None, out):
            check_half(normlab.layer_norm_backward(dy, x, mean, rstd, wt, out=o)[0], dx_ref, dtype,
                       "layer_norm_backward dx", slack=slack)
            check_half(normlab.rms_norm_backward(dy, x, rms_rstd, wt, out=o)[0], rms_ref, dtype,
                       "rms_norm_backward dx", slack=rms_slack)
            check_half(normlab.add_layer_norm_backward(dy, x, mean, rstd, wt, ds=ds, out=o)[0],
                       dx_ref + f64(ds), dtype, "add_layer_norm_backward dx", slack=slack)


# --------------------------------------------------------------------------------------------
# batch / instance / group norm
# --------------------------------------------------------------------------------------------

CHANNEL_CASES = [
    # (kind, n, c, spatial, groups)
    ("batch", 5, 6, (), None),
    ("batch", 3, 5, (7,), None),
    ("batch", 2, 6, (5, 4), None),
    ("batch", 2, 37, (3,), None),
    ("instance", 3, 5, (7,), None),
    ("instance", 2, 6, (5, 4), None),
    ("instance", 2, 19, (33,), None),
    ("group", 4, 6, (), 2),
    ("group", 3, 6, (7,), 3),
    ("group", 2, 12, (5, 4), 1),
    ("group", 2, 12, (5, 4), 4),
    ("group", 2, 12, (5, 4), 12),
    ("group", 2, 66, (3, 5), 6),
]
CHANNEL_IDS = [f"{k}-{n}x{c}x{'x'.join(map(str, sp)) or 'none'}-g{g}" for k, n, c, sp, g in CHANNEL_CASES]


def chan_shape(n, c, spatial, cl):
    return (n, *spatial, c) if cl else (n, c, *spatial)


def chan_vec(v, ndim, cl):
    """A per-channel vector broadcastable against x in its own layout."""
    v = f64(v)
    return v if cl else v.reshape((-1,) + (1,) * (ndim - 2))


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("wkind", ["w32", "whalf"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("kind, n, c, spatial, groups", CHANNEL_CASES, ids=CHANNEL_IDS)
def test_channel_norm_forward(cpu_target, rng, kind, n, c, spatial, groups, dtype, wkind, cl):
    x = make_x(rng, chan_shape(n, c, spatial, cl), dtype, offset=1.0)
    w, b = make_affine(rng, (c,), param_dtype(dtype, wkind))
    ax = -1 if cl else 1
    y, mean, rstd = calls.forward(kind, x, w, b, cl, groups)
    y_ref, m_ref, r_ref, _ = ref.channel_norm(x, kind, groups, w, b, channel_axis=ax)
    yw_ref = ref.channel_norm(x, kind, groups, w, None, channel_axis=ax)[0]
    check_half(y, y_ref, dtype, "y", slack=fwd_slack(yw_ref, chan_vec(b, x.ndim, cl)))
    shape = calls.stats_shape(kind, n, c, groups)
    assert mean.shape == rstd.shape == shape
    check_f32(mean.reshape(-1), m_ref, "mean", rtol=1e-7, atol=1e-6 / r_ref)
    check_f32(rstd.reshape(-1), r_ref, "rstd", rtol=1e-6)
    y0 = calls.forward(kind, x, None, None, cl, groups)[0]
    y0_ref = ref.channel_norm(x, kind, groups, channel_axis=ax)[0]
    check_half(y0, y0_ref, dtype, "y (no affine)", slack=fwd_slack(y0_ref))


# Channels-first planes of whole vectors and channels-last rows wider than a tile.
SUBNORMAL_CHANNEL_CASES = [
    (False, (2, 5, 40, 41)), (True, (2, 9, 7, 200)), (True, (2, 3, 5, 520)), (True, (2, 4, 6, 48)),
]


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("cl, shape", SUBNORMAL_CHANNEL_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else ("NSC" if v else "NCS"))
def test_channel_norm_subnormal_outputs_round_exactly(cpu_target, rng, cl, shape, kind, dtype):
    """As test_subnormal_outputs_round_exactly, for the channel norms: weights of about 100 times
    the half type's smallest normal make about 1% of those channels' outputs subnormal."""
    x = make_x(rng, shape, dtype, offset=1.0)
    c = shape[-1] if cl else shape[1]
    emin = ref.half_format(dtype)[1]
    w = np.where(np.arange(c) % 3 == 0, 1.0, 100 * 2.0**emin).astype(F32)
    ax = -1 if cl else 1
    y = calls.forward(kind, x, w, None, cl, 1)[0]
    y_ref = ref.channel_norm(x, kind, 1, w, None, channel_axis=ax)[0]
    subnormal = np.abs(y_ref) < 2.0**emin
    assert subnormal.any() and not subnormal.all()
    check_half(y, y_ref, dtype, "y", slack=fwd_slack(y_ref))


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("cl, shape", SUBNORMAL_CHANNEL_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else ("NSC" if v else "NCS"))
def test_channel_norm_subnormal_gradients_round_exactly(cpu_target, rng, cl, shape, kind, dtype):
    """As test_subnormal_gradients_round_exactly, for dx of the channel-norm backwards."""
    x = make_x(rng, shape, dtype, offset=1.0)
    dy = tiny_gradient(rng, shape, dtype)
    c = shape[-1] if cl else shape[1]
    w = make_affine(rng, (c,), F32)[0]
    ax = -1 if cl else 1
    _, mean, rstd = calls.forward(kind, x, w, None, cl, 1)
    dx = calls.backward(kind, dy, x, mean, rstd, w, cl, 1)[0]
    dx_ref, _, _, term = ref.channel_norm_backward(dy, x, mean, rstd, kind, 1, w, channel_axis=ax)
    check_some_subnormal(dx_ref, dtype)
    check_half(dx, dx_ref, dtype, "dx", slack=BWD_REL * term.max())


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("wkind", ["w32", "whalf", "none"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("kind, n, c, spatial, groups", CHANNEL_CASES, ids=CHANNEL_IDS)
def test_channel_norm_backward(cpu_target, rng, kind, n, c, spatial, groups, dtype, wkind, cl):
    x = make_x(rng, chan_shape(n, c, spatial, cl), dtype, offset=1.0)
    dy = make_x(rng, x.shape, dtype, scale=1.0)
    w = None if wkind == "none" else make_affine(rng, (c,), param_dtype(dtype, wkind))[0]
    ax = -1 if cl else 1
    _, mean, rstd = calls.forward(kind, x, w, None, cl, groups)
    dx, dw, db = calls.backward(kind, dy, x, mean, rstd, w, cl, groups)
    dx_ref, dw_ref, db_ref, term = ref.channel_norm_backward(dy, x, mean, rstd, kind, groups, w,
                                                             channel_axis=ax)
    check_half(dx, dx_ref, dtype, "dx", slack=BWD_REL * term.max())
    if w is None:
        assert dw is None and db is None
        return
    assert dw.shape == db.shape == (c,)
    # the sums of |terms| of each channel's gradients
    xc = f64(x) if not cl else np.moveaxis(f64(x), -1, 1)
    dyc = f64(dy) if not cl else np.moveaxis(f64(dy), -1, 1)
    t, back = ref.channel_sets(xc, kind, groups)
    xhat = back((t - f64(mean).reshape(-1)[:, None]) * f64(rstd).reshape(-1)[:, None])
    axes = (0,) + tuple(range(2, xc.ndim))
    check_param_grad(dw, dw_ref, np.abs(dyc * xhat).sum(axes), w.dtype, "dweight")
    check_param_grad(db, db_ref, np.abs(dyc).sum(axes), w.dtype, "dbias")


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("dtype", HALVES)
def test_batch_norm_running_stats_and_inference(cpu_target, rng, dtype, cl):
    n, c, spatial = 6, 3, (4, 5)
    ax = -1 if cl else 1
    x = make_x(rng, chan_shape(n, c, spatial, cl), dtype, offset=1.0)
    rm = np.full(c, 0.5, F32)
    rv = np.full(c, 2.0, F32)
    normlab.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.25, channel_axis=ax)
    _, bm, _, bvar = ref.channel_norm(x, "batch", channel_axis=ax)
    m = n * np.prod(spatial)
    assert rm.dtype == rv.dtype == F32
    check_f32(rm, 0.75 * 0.5 + 0.25 * bm, "running_mean", rtol=1e-6)
    check_f32(rv, 0.75 * 2.0 + 0.25 * bvar * m / (m - 1), "running_var", rtol=1e-6)
    # inference: normalized with the running statistics
    w, b = make_affine(rng, (c,), F32)
    y, mean, invstd = normlab.batch_norm(x, w, b, rm, rv, training=False, channel_axis=ax,
                                         return_stats=True)
    assert mean.dtype == invstd.dtype == F32
    inv_ref = 1.0 / np.sqrt(f64(rv) + 1e-5)
    check_f32(invstd, inv_ref, "invstd", rtol=1e-6)
    assert np.array_equal(mean, rm)
    xhat = (f64(x) - chan_vec(rm, x.ndim, cl)) * chan_vec(inv_ref, x.ndim, cl)
    yw = xhat * chan_vec(w, x.ndim, cl)
    check_half(y, yw + chan_vec(b, x.ndim, cl), dtype, "y (inference)",
               slack=fwd_slack(yw, chan_vec(b, x.ndim, cl)))
    dy = make_x(rng, x.shape, dtype, scale=1.0)
    dx, dw, db = normlab.batch_norm_backward(dy, x, mean, invstd, w, training=False, channel_axis=ax)
    dx_ref, dw_ref, db_ref, term = ref.channel_norm_backward(dy, x, mean, invstd, "batch", None, w,
                                                             channel_axis=ax, training=False)
    check_half(dx, dx_ref, dtype, "dx (inference)", slack=BWD_REL * term.max())
    assert dw.dtype == db.dtype == F32


@pytest.mark.parametrize("dtype", HALVES)
def test_output_rounding_is_to_nearest_even(cpu_target, rng, dtype):
    """batch_norm in inference with running_var + eps == 1 and weight 1 computes y = x + bias
    exactly in float32; biases of half an ulp of y (and a hair more / less) then show how the
    result is rounded: ties to even, otherwise to nearest (truncation or ties away fail)."""
    nmant = ref.half_format(dtype)[0]
    c = 4
    x = np.empty((64, c), dtype)
    x[:] = (1.0 + rng.integers(0, 2**nmant, (64, c)) * 2.0**-nmant).astype(dtype)  # [1, 2)
    x[::2] = -f64(x[::2])  # both signs
    half = 2.0 ** (-nmant - 1)
    bias = np.array([half, -half, half * (1 + 2**-10), half * (1 - 2**-10)], F32)
    ones = np.ones(c, F32)
    y = normlab.batch_norm(x, ones, bias, np.zeros(c, F32), np.full(c, 0.75, F32), training=False,
                           eps=0.25, channel_axis=-1)
    exact = f64(x) + f64(bias)
    expect = ref.round_half(exact, dtype)
    assert same_bits(y, expect), (
        f"{np.sum(bits(y) != bits(expect))} results not rounded to nearest even; e.g. "
        f"{exact[bits(y) != bits(expect)][:4]} -> {f64(y)[bits(y) != bits(expect)][:4]}"
    )
    if dtype == F16:  # numpy's own float64 -> float16 cast rounds once, to nearest even
        assert same_bits(y, exact.astype(F16))
    # the data did exercise ties both ways
    ties = np.abs(exact[:, :2]) / ref.half_quantum(exact[:, :2], dtype) % 1 == 0.5
    assert ties.mean() > 0.9  # all but sums like 1 - half an ulp, exact in the binade below
    assert (f64(y)[:, :2] > exact[:, :2]).any() and (f64(y)[:, :2] < exact[:, :2]).any()


# --------------------------------------------------------------------------------------------
# special values and magnitudes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wkind", ["w32", "whalf"])
@pytest.mark.parametrize("dtype", HALVES)
def test_constant_rows_and_sets_give_exactly_bias(cpu_target, rng, dtype, wkind):
    pd = param_dtype(dtype, wkind)
    big = 60000.0 if dtype == F16 else 1e30
    values = np.array([1000.5, -3.25, 0.0, 7.1e-3, big], np.float64).astype(dtype)
    cols = 37
    x = np.repeat(values[:, None], cols, axis=1)
    w, b = make_affine(rng, (cols,), pd)
    expect = np.broadcast_to(ref.round_half(f64(b), dtype), x.shape)
    assert same_bits(normlab.layer_norm(x, w, b), np.ascontiguousarray(expect))
    y, s = normlab.add_layer_norm(x, np.zeros_like(x), w, b)
    assert same_bits(y, np.ascontiguousarray(expect))
    y0 = normlab.layer_norm(x)
    assert np.all(f64(y0) == 0)
    # channel norms: every set constant
    c = 5
    img = np.empty((2, c, 3, 7), dtype)
    img[:] = values[None, :, None, None]
    wc, bc = make_affine(rng, (c,), pd)
    expect_c = np.ascontiguousarray(np.broadcast_to(ref.round_half(f64(bc), dtype)[None, :, None, None], img.shape))
    for kind, g in (("batch", None), ("instance", None), ("group", 5)):
        y = calls.forward(kind, img, wc, bc, False, g)[0]
        assert same_bits(y, expect_c), kind
        yl = calls.forward(kind, np.ascontiguousarray(np.moveaxis(img, 1, -1)), wc, bc, True, g)[0]
        assert same_bits(np.ascontiguousarray(np.moveaxis(yl, -1, 1)), expect_c), kind + " channels-last"


@pytest.mark.parametrize("shape", [(6, 45), (11, 64)], ids=["6x45", "11x64"])
@pytest.mark.parametrize("dtype", HALVES)
def test_nan_affects_only_its_row_or_set(cpu_target, rng, dtype, shape):
    x = make_x(rng, shape, dtype)
    r = make_x(rng, shape, dtype)
    w, b = make_affine(rng, (shape[1],), F32)
    bad = x.copy()
    bad[2, 17] = np.nan
    others = np.ones(shape, bool)
    others[2] = False
    for name, f in (
        ("layer_norm", lambda a: normlab.layer_norm(a, w, b)),
        ("rms_norm", lambda a: normlab.rms_norm(a, w)),
        ("add_layer_norm", lambda a: normlab.add_layer_norm(a, r, w, b)[0]),
        ("add_rms_norm", lambda a: normlab.add_rms_norm(a, r, w)[0]),
    ):
        clean, dirty = f(x), f(bad)
        assert np.array_equal(bits(clean)[others], bits(dirty)[others]), name
        assert np.isnan(f64(dirty[2])).all(), name
    _, mean, rstd = normlab.layer_norm(bad, w, b, return_stats=True)
    dy = make_x(rng, shape, dtype)
    dx = normlab.layer_norm_backward(dy, bad, mean, rstd)[0]
    dx_clean = normlab.layer_norm_backward(dy, x, *normlab.layer_norm(x, return_stats=True)[1:])[0]
    assert np.array_equal(bits(dx)[others], bits(dx_clean)[others])
    # group norm: one (sample, group) set; batch norm: one channel
    img = make_x(rng, (3, 8, 5, 4), dtype)
    img_bad = img.copy()
    img_bad[1, 5, 2, 3] = np.nan
    for cl in (False, True):
        a, a_bad = img, img_bad
        if cl:
            a, a_bad = (np.ascontiguousarray(np.moveaxis(v, 1, -1)) for v in (img, img_bad))
        for kind, g, affected in (
            ("group", 4, (slice(1, 2), slice(4, 6))),
            ("batch", None, (slice(None), slice(5, 6))),
        ):
            clean = calls.forward(kind, a, None, None, cl, g)[0]
            dirty = calls.forward(kind, a_bad, None, None, cl, g)[0]
            if cl:
                clean, dirty = np.moveaxis(clean, -1, 1), np.moveaxis(dirty, -1, 1)
            mask = np.ones(img.shape, bool)
            mask[affected] = False
            assert np.array_equal(bits(clean)[mask], bits(dirty)[mask]), (kind, cl)
            assert np.isnan(f64(dirty)[~mask]).all(), (kind, cl)


def _check_rows(x, dtype, w, b, eps=1e-5):
    """layer_norm and rms_norm (forward, and backward for layer_norm) of x against the
    references."""
    y, mean, rstd = normlab.layer_norm(x, w, b, eps=eps, return_stats=True)
    y_ref, m_ref, r_ref = ref.layer_norm(x, w, b, eps=eps)
    check_half(y, y_ref, dtype, "layer_norm y", slack=fwd_slack(ref.layer_norm(x, w, None, eps=eps)[0], b))
    check_stats_layer(mean, rstd, m_ref, r_ref, x.shape[:-1])
    yr, rr = normlab.rms_norm(x, w, eps=eps, return_stats=True)
    yr_ref, rr_ref = ref.rms_norm(x, w, eps=eps)
    check_half(yr, yr_ref, dtype, "rms_norm y", slack=fwd_slack(yr_ref))
    check_f32(rr, rr_ref, "rms rstd", rtol=1e-6)
    dy = np.random.default_rng(7).standard_normal(x.shape).astype(dtype)
    dx, dw, db = normlab.layer_norm_backward(dy, x, mean, rstd, w)
    dx_ref, dw_ref, _ = ref.layer_norm_backward(dy, x, mean, rstd, w)
    check_half(dx, dx_ref, dtype, "layer_norm dx", slack=row_bwd_slack(dy, w, rstd, x.ndim, 1))
    xhat = (f64(x) - expand(mean, 2)) * expand(rstd, 2)
    check_param_grad(dw, dw_ref, np.abs(f64(dy) * xhat).sum(0), w.dtype, "dweight")


@pytest.mark.parametrize("cols", [100, 128])
@pytest.mark.parametrize("dtype", HALVES)
def test_large_magnitudes_do_not_overflow(cpu_target, rng, dtype, cols):
    """float16 values up to 65504 (their squares and sums overflow float16) and bfloat16 values
    of 1e30 (their squares overflow float32); rows of 128 go narrow."""
    if dtype == F16:
        rows = [
            rng.uniform(60000, 65504, cols),
            rng.choice([-1, 1], cols) * rng.uniform(50000, 65504, cols),
            65504.0 - 32 * rng.integers(0, 4, cols),
        ]
    else:
        rows = [
            1e30 * (1 + 0.1 * rng.standard_normal(cols)),
            rng.choice([-1, 1], cols) * 1e30 * rng.uniform(0.5, 1, cols),
            -1e30 + 1e27 * rng.standard_normal(cols),
        ]
    x = np.array(rows).astype(dtype)
    assert np.isfinite(f64(x)).all()
    w, b = make_affine(rng, (cols,), F32)
    _check_rows(x, dtype, w, b)
    y = normlab.rms_norm(x)
    assert np.isfinite(f64(y)).all()
    # channel norms on the same values: one set per (sample, group) and per channel
    img = x.reshape(3, 4, cols // 4)
    for kind, g in (("group", 2), ("batch", None), ("instance", None)):
        yc = calls.forward(kind, img, None, None, False, g)[0]
        check_half(yc, ref.channel_norm(img, kind, g)[0], dtype, kind,
                   slack=fwd_slack(ref.channel_norm(img, kind, g)[0]))


@pytest.mark.parametrize("cols", [77, 64])
@pytest.mark.parametrize("sigma", [0.5, 4.0])
@pytest.mark.parametrize("dtype", HALVES)
def test_large_mean_rows(cpu_target, rng, dtype, sigma, cols):
    """Rows 1000 + N(0, sigma) rounded to half: |mean| >> std, and still 1 ulp (rows of 64
    go narrow)."""
    shape = (40, cols)
    x = make_x(rng, shape, dtype, offset=1000.0, scale=sigma)
    x[10:20] = -f64(x[10:20])  # samples 1 and 3 of the (4, 10, 77) images below: negative
    x[30:] = -f64(x[30:])
    w, b = make_affine(rng, (cols,), dtype)
    _check_rows(x, dtype, w, b)
    r = make_x(rng, shape, dtype, scale=sigma)
    y, s = normlab.add_layer_norm(x, r, w, b)
    assert same_bits(s, ref.round_half(f64(x) + f64(r), dtype))
    _check_one_of(_add_y_candidates(x, r, s, w, b, True, 1e-5),
                  lambda y_ref, slack, _: check_half(y, y_ref, dtype, "add_layer_norm y", slack=slack))
    img = x.reshape(4, 10, cols)
    for cl in (False, True):
        a = np.ascontiguousarray(np.moveaxis(img, 1, -1)) if cl else img
        ax = -1 if cl else 1
        for kind, g in (("group", 5), ("batch", None), ("instance", None)):
            y = calls.forward(kind, a, None, None, cl, g)[0]
            y_ref = ref.channel_norm(a, kind, g, channel_axis=ax)[0]
            check_half(y, y_ref, dtype, f"{kind} y", slack=fwd_slack(y_ref))


# --------------------------------------------------------------------------------------------
# half <-> float conversion: every bit pattern, and rounding of the fused sum
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALVES)
def test_every_bit_pattern_round_trips(cpu_target, dtype):
    """All 65536 patterns through add_layer_norm / add_rms_norm with residual -0.0: x + (-0.0)
    is x for every x (including -0.0), so s must be x bitwise (NaN stays NaN), which checks
    half -> float -> half of every value, subnormals included. Rows free of Inf/NaN (each row
    holds 256 consecutive patterns: narrow ranges, |mean| >> std, subnormals, near the largest
    values) also check y against the reference."""
    x = np.arange(65536, dtype=np.uint16).view(dtype).reshape(256, 256)
    r = np.full(x.shape, -0.0, dtype)
    xv = f64(x)
    nan = np.isnan(xv)
    for name, f in (("add_layer_norm", normlab.add_layer_norm), ("add_rms_norm", normlab.add_rms_norm)):
        y, s = f(x, r)
        assert np.array_equal(bits(s)[~nan], bits(x)[~nan]), (
            f"{name}: {np.sum(bits(s)[~nan] != bits(x)[~nan])} values changed, e.g. bits "
            f"{[hex(v) for v in bits(x)[~nan][bits(s)[~nan] != bits(x)[~nan]][:5]]}"
        )
        assert np.isnan(f64(s)[nan]).all(), name
    finite = np.isfinite(xv).all(axis=1)
    xf = x[finite]
    y, s = normlab.add_layer_norm(xf, np.full(xf.shape, -0.0, dtype))
    y_ref = ref.layer_norm(xf)[0]
    check_half(y, y_ref, dtype, "add_layer_norm y", slack=fwd_slack(y_ref))
    y = normlab.rms_norm(xf, eps=1e-5)
    y_ref = ref.rms_norm(xf, eps=1e-5)[0]
    check_half(y, y_ref, dtype, "rms_norm y", slack=fwd_slack(y_ref))


@pytest.mark.parametrize("dtype", HALVES)
def test_fused_sum_rounds_half_to_even(cpu_target, rng, dtype):
    """residual chosen so that x + residual lies exactly halfway between two half values: s must
    round to the even one (as numpy / ml_dtypes' casts do for these sums, exact in float32)."""
    nmant, emin, _ = ref.half_format(dtype)
    shape = (16, 67)
    exps = rng.integers(-4, 8, shape)
    mant = 1.0 + rng.integers(0, 2**nmant, shape) * 2.0**-nmant
    sign = rng.choice([-1.0, 1.0], shape)
    xv = sign * mant * 2.0**exps
    x = xv.astype(dtype)
    assert np.array_equal(f64(x), xv)
    quantum = 2.0 ** (exps - nmant)
    odd = 2 * rng.integers(0, 8, shape) + 1  # 1, 3, .., 15: a few ulps away, or crossing binades
    rv = rng.choice([-1.0, 1.0], shape) * odd * quantum / 2
    r = rv.astype(dtype)
    assert np.array_equal(f64(r), rv)
    exact = xv + rv
    expect = ref.round_half(exact, dtype)
    assert same_bits(expect, exact.astype(np.float32).astype(dtype))  # exact in float32: one rounding
    for f in (normlab.add_layer_norm, normlab.add_rms_norm):
        _, s = f(x, r)
        wrong = bits(s) != bits(expect)
        assert not wrong.any(), (
            f"{f.__name__}: {wrong.sum()} sums misrounded, e.g. {exact[wrong][:4]} -> {f64(s)[wrong][:4]} "
            f"(expected {f64(expect)[wrong][:4]})"
        )
    ties = np.abs(exact) / ref.half_quantum(exact, dtype) % 1 == 0.5
    assert ties.mean() > 0.5
    up, down = np.abs(f64(expect)) > np.abs(exact), np.abs(f64(expect)) < np.abs(exact)
    assert (ties & up).any() and (ties & down).any()


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------


def _torch_dtype(torch, dtype):
    return torch.float16 if dtype == F16 else torch.bfloat16


def _to_torch(torch, a, tdtype):
    return torch.from_numpy(f64(a).astype(np.float32)).to(tdtype)  # exact: half values


def _from_torch(t, dtype):
    return t.float().numpy().astype(dtype)  # exact: half values


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", [(8, 33), (4, 769), (2, 4099)], ids=lambda s: "x".join(map(str, s)))
def test_matches_torch(rng, dtype, shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    td = _torch_dtype(torch, dtype)
    n = shape[-1]
    x = make_x(rng, shape, dtype, offset=0.5)
    w, b = make_affine(rng, (n,), dtype)
    tx, tw, tb = (_to_torch(torch, a, td) for a in (x, w, b))
    with torch.no_grad():
        t_ln = _from_torch(F.layer_norm(tx, (n,), tw, tb, 1e-5), dtype)
        t_rms = _from_torch(F.rms_norm(tx, (n,), tw, 1e-5), dtype)
        xg = x.reshape(2, shape[0] // 2, n)  # (N, C, S)
        c = xg.shape[1]
        wg, bg = w[:c], b[:c]
        g = 2 if c % 2 == 0 else 1
        t_gn = _from_torch(F.group_norm(_to_torch(torch, xg, td), g, _to_torch(torch, wg, td),
                                        _to_torch(torch, bg, td), 1e-5), dtype)
    for name, got, want in (
        ("layer_norm", normlab.layer_norm(x, w, b), t_ln),
        ("rms_norm", normlab.rms_norm(x, w, eps=1e-5), t_rms),
        ("group_norm", normlab.group_norm(xg, g, wg, bg), t_gn),
    ):
        assert got.dtype == dtype
        d = np.abs(ref.half_ordinal(got) - ref.half_ordinal(want))
        assert d.max() <= 2, f"{name}: {np.sum(d > 2)} elements more than 2 ulp from torch (max {d.max()})"


@pytest.mark.parametrize("dtype", HALVES)
def test_matches_torch_mixed_float32_weight(rng, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    td = _torch_dtype(torch, dtype)
    x = make_x(rng, (6, 100), dtype)
    w, b = make_affine(rng, (100,), F32)
    with torch.no_grad():
        t = F.layer_norm(_to_torch(torch, x, td), (100,), torch.from_numpy(w), torch.from_numpy(b), 1e-5)
    assert t.dtype == td
    d = np.abs(ref.half_ordinal(normlab.layer_norm(x, w, b)) - ref.half_ordinal(_from_torch(t, dtype)))
    assert d.max() <= 2


# --------------------------------------------------------------------------------------------
# determinism: threads and SIMD targets
# --------------------------------------------------------------------------------------------


def _everything(dtype, rng_seed=3):
    """Every function on half data big enough to run on several threads, results in order."""
    rng = np.random.default_rng(rng_seed)
    x = make_x(rng, (96, 769), dtype, offset=2.0)
    r = make_x(rng, x.shape, dtype)
    dy = make_x(rng, x.shape, dtype, scale=1.0)
    w32, b32 = make_affine(rng, (769,), F32)
    wh = w32.astype(dtype)
    out = []
    y, mean, rstd = normlab.layer_norm(x, w32, b32, return_stats=True)
    out += [("layer y", y), ("layer mean", mean), ("layer rstd", rstd)]
    out += list(zip(("layer dx", "layer dw", "layer db"), normlab.layer_norm_backward(dy, x, mean, rstd, w32)))
    out += list(zip(("layer dx h", "layer dw h", "layer db h"), normlab.layer_norm_backward(dy, x, mean, rstd, wh)))
    y, rs = normlab.rms_norm(x, wh, return_stats=True)
    out += [("rms y", y), ("rms rstd", rs)]
    out += list(zip(("rms dx", "rms dw"), normlab.rms_norm_backward(dy, x, rs, w32)))
    y, s, m2, r2 = normlab.add_layer_norm(x, r, wh, b32.astype(dtype), return_stats=True)
    out += [("add y", y), ("add s", s), ("add mean", m2), ("add rstd", r2)]
    out += list(zip(("add dx", "add dw", "add db"), normlab.add_layer_norm_backward(dy, s, m2, r2, w32, ds=r)))
    y, s, r3 = normlab.add_rms_norm(x, r, w32, return_stats=True)
    out += [("addrms y", y), ("addrms s", s), ("addrms rstd", r3)]
    out += list(zip(("addrms dx", "addrms dw"), normlab.add_rms_norm_backward(dy, s, r3, wh, ds=r)))
    xn = make_x(rng, (2003, 64), dtype, offset=2.0)  # narrow rows, blocks split across threads
    rn = make_x(rng, xn.shape, dtype)
    yn, mn, rsn = normlab.layer_norm(xn, w32[:64], b32[:64], return_stats=True)
    out += [("narrow y", yn), ("narrow mean", mn), ("narrow rstd", rsn)]
    out += [("narrow rms y", normlab.rms_norm(xn, wh[:64]))]
    out += list(zip(("narrow add y", "narrow add s"), normlab.add_layer_norm(xn, rn, w32[:64], b32[:64])))
    out += list(zip(("narrow addrms y", "narrow addrms s"), normlab.add_rms_norm(xn, rn, wh[:64])))
    out += list(zip(("narrow dx", "narrow dw", "narrow db"), normlab.layer_norm_backward(rn, xn, mn, rsn, w32[:64])))
    _, rms_n = normlab.rms_norm(xn, return_stats=True)
    out += list(zip(("narrow rms dx", "narrow rms dw"), normlab.rms_norm_backward(rn, xn, rms_n, wh[:64])))
    out += list(zip(("narrow add dx", "narrow add dw", "narrow add db"),
                    normlab.add_layer_norm_backward(rn, xn, mn, rsn, w32[:64], ds=rn)))
    xl = make_x(rng, (3, 262147), dtype, offset=2.0)  # long rows split across threads
    wl, bl = make_affine(rng, (262147,), F32)
    yl, ml, rl = normlab.layer_norm(xl, wl, bl, return_stats=True)
    out += [("long y", yl), ("long mean", ml), ("long rstd", rl), ("long rms y", normlab.rms_norm(xl, wl))]
    dyl = make_x(rng, xl.shape, dtype)
    out += list(zip(("long dx", "long dw", "long db"), normlab.layer_norm_backward(dyl, xl, ml, rl, wl)))
    out += list(zip(("long add y", "long add s"), normlab.add_layer_norm(xl, dyl, wl, bl)))
    img = x.reshape(8, 12, 769)[:, :, :768].copy().reshape(8, 12, 32, 24)
    dimg = dy.reshape(8, 12, 769)[:, :, :768].copy().reshape(img.shape)
    for cl in (False, True):
        a = np.ascontiguousarray(np.moveaxis(img, 1, -1)) if cl else img
        da = np.ascontiguousarray(np.moveaxis(dimg, 1, -1)) if cl else dimg
        for kind, g in (("batch", None), ("instance", None), ("group", 3)):
            wc, bc = (w32[:12], b32[:12]) if kind != "group" else (wh[:12], b32[:12].astype(dtype))
            y, m, rr = calls.forward(kind, a, wc, bc, cl, g)
            out += [(f"{kind} {cl} y", y), (f"{kind} {cl} mean", m), (f"{kind} {cl} rstd", rr)]
            grads = calls.backward(kind, da, a, m, rr, wc, cl, g)
            out += list(zip((f"{kind} {cl} dx", f"{kind} {cl} dw", f"{kind} {cl} db"), grads))
    rm, rv = np.zeros(12, F32), np.ones(12, F32)
    out += [("bn train y", normlab.batch_norm(img, w32[:12], None, rm, rv)), ("rm", rm), ("rv", rv)]
    out += [("bn eval y", normlab.batch_norm(img, w32[:12], None, rm, rv, training=False))]
    return out


@pytest.mark.openmp
@pytest.mark.parametrize("dtype", HALVES)
def test_bitwise_identical_for_1_2_3_threads(cpu_target, num_threads, dtype):
    normlab.set_num_threads(1)
    expected = _everything(dtype)
    for n in (2, 3, 1):
        normlab.set_num_threads(n)
        assert normlab.get_num_threads() == n
        for (name, a), (_, e) in zip(_everything(dtype), expected):
            assert same_bits(a, e), f"{name} differs with {n} threads"


@pytest.fixture
def restore_target():
    previous = normlab.get_cpu_target()
    yield
    normlab.set_cpu_target(previous)


@pytest.mark.parametrize("dtype", HALVES)
def test_targets_agree_with_baseline(restore_target, dtype):
    """Each SIMD target's half results within 1 ulp of the baseline target's (or, where terms
    cancel, within the float32 slack the reference tests allow); float32 statistics and
    gradients within their tolerances. s, the rounded sum, is bitwise the same."""
    targets = normlab.cpu_targets()
    assert "baseline" in targets
    normlab.set_cpu_target("baseline")
    base = _everything(dtype)
    for target in targets:
        if target == "baseline":
            continue
        normlab.set_cpu_target(target)
        for (name, a), (_, e) in zip(_everything(dtype), base):
            what = f"{target} vs baseline: {name}"
            assert a.dtype == e.dtype and a.shape == e.shape, what
            if name.endswith(" s"):
                assert same_bits(a, e), what
            elif a.dtype.itemsize == 2:
                ev = f64(e)
                rel = BWD_REL if (" dx" in name or " dw" in name or " db" in name) else 2 * FWD_ROUNDINGS * EPS32
                check_half(a, ev, a.dtype, what, slack=rel * np.abs(ev).max())
            elif " dw" in name or " db" in name:
                check_f32(a, f64(e), what, rtol=0.0, atol=BWD_REL * np.abs(f64(e)).max())
            else:
                check_f32(a, f64(e), what, rtol=2e-6)


# --------------------------------------------------------------------------------------------
# dtypes of arguments and results; errors naming the argument
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALVES)
def test_result_dtypes(rng, dtype):
    x = make_x(rng, (4, 10), dtype)
    dy = make_x(rng, (4, 10), dtype)
    for wd in (F32, dtype):
        w, b = make_affine(rng, (10,), wd)
        y, mean, rstd = normlab.layer_norm(x, w, b, return_stats=True)
        assert (y.dtype, mean.dtype, rstd.dtype) == (dtype, F32, F32)
        dx, dw, db = normlab.layer_norm_backward(dy, x, mean, rstd, w)
        assert (dx.dtype, dw.dtype, db.dtype) == (dtype, wd, wd)
        y, rstd = normlab.rms_norm(x, w, return_stats=True)
        assert (y.dtype, rstd.dtype) == (dtype, F32)
        dx, dw = normlab.rms_norm_backward(dy, x, rstd, w)
        assert (dx.dtype, dw.dtype) == (dtype, wd)
        y, s, mean, rstd = normlab.add_layer_norm(x, dy, w, b, return_stats=True)
        assert (y.dtype, s.dtype, mean.dtype, rstd.dtype) == (dtype, dtype, F32, F32)
        dx, dw, db = normlab.add_layer_norm_backward(dy, s, mean, rstd, w, ds=dy)
        assert (dx.dtype, dw.dtype, db.dtype) == (dtype, wd, wd)
        y, s, rstd = normlab.add_rms_norm(x, dy, w, return_stats=True)
        assert (y.dtype, s.dtype, rstd.dtype) == (dtype, dtype, F32)
        dx, dw = normlab.add_rms_norm_backward(dy, s, rstd, w, ds=dy)
        assert (dx.dtype, dw.dtype) == (dtype, wd)
        img = x.reshape(2, 4, 5)
        dimg = dy.reshape(2, 4, 5)
        for kind, g, sshape in (("batch", None, (4,)), ("instance", None, (2, 4)), ("group", 2, (2, 2))):
            y, m, r = calls.forward(kind, img, w[:4], b[:4], False, g)
            assert (y.dtype, m.dtype, r.dtype) == (dtype, F32, F32) and m.shape == sshape
            dx, dw, db = calls.backward(kind, dimg, img, m, r, w[:4], False, g)
            assert (dx.dtype, dw.dtype, db.dtype) == (dtype, wd, wd)


def _bad_calls(dtype):
    o = OTHER_HALF[dtype]
    x = np.ones((4, 8), dtype)
    w32 = np.ones(8, F32)
    st = np.ones(4, F32)
    img = np.ones((2, 4, 5), dtype)
    c4 = np.ones(4, F32)
    s24 = np.ones((2, 4), F32)
    s22 = np.ones((2, 2), F32)
    nl = normlab
    return [
        ("weight", lambda: nl.layer_norm(x, np.ones(8, F64))),
        ("weight", lambda: nl.layer_norm(x, np.ones(8, o))),
        ("bias", lambda: nl.layer_norm(x, w32, np.ones(8, F64))),
        ("bias", lambda: nl.layer_norm(x, None, np.ones(8, o))),
        ("out", lambda: nl.layer_norm(x, out=np.empty((4, 8), o))),
        ("out", lambda: nl.layer_norm(x, out=np.empty((4, 8), F32))),
        ("dy", lambda: nl.layer_norm_backward(np.ones((4, 8), F32), x, st, st)),
        ("dy", lambda: nl.layer_norm_backward(np.ones((4, 8), o), x, st, st)),
        ("mean", lambda: nl.layer_norm_backward(x, x, st.astype(dtype), st)),
        ("mean", lambda: nl.layer_norm_backward(x, x, st.astype(F64), st)),
        ("rstd", lambda: nl.layer_norm_backward(x, x, st, st.astype(dtype))),
        ("weight", lambda: nl.layer_norm_backward(x, x, st, st, np.ones(8, o))),
        ("out", lambda: nl.layer_norm_backward(x, x, st, st, out=np.empty((4, 8), o))),
        ("weight", lambda: nl.rms_norm(x, np.ones(8, F64))),
        ("out", lambda: nl.rms_norm(x, out=np.empty((4, 8), o))),
        ("rstd", lambda: nl.rms_norm_backward(x, x, st.astype(dtype))),
        ("dy", lambda: nl.rms_norm_backward(np.ones((4, 8), F64), x, st)),
        ("residual", lambda: nl.add_layer_norm(x, np.ones((4, 8), o))),
        ("residual", lambda: nl.add_layer_norm(x, np.ones((4, 8), F32))),
        ("sum_out", lambda: nl.add_layer_norm(x, x.copy(), sum_out=np.empty((4, 8), F32))),
        ("out", lambda: nl.add_layer_norm(x, x.copy(), out=np.empty((4, 8), o))),
        ("weight", lambda: nl.add_layer_norm(x, x.copy(), np.ones(8, o))),
        ("residual", lambda: nl.add_rms_norm(x, np.ones((4, 8), o))),
        ("sum_out", lambda: nl.add_rms_norm(x, x.copy(), sum_out=np.empty((4, 8), o))),
        ("ds", lambda: nl.add_layer_norm_backward(x, x, st, st, ds=np.ones((4, 8), F32))),
        ("mean", lambda: nl.add_layer_norm_backward(x, x, st.astype(dtype), st)),
        ("ds", lambda: nl.add_rms_norm_backward(x, x, st, ds=np.ones((4, 8), o))),
        ("dy", lambda: nl.add_rms_norm_backward(np.ones((4, 8), F32), x, st)),
        ("weight", lambda: nl.batch_norm(img, np.ones(4, F64))),
        ("bias", lambda: nl.batch_norm(img, None, np.ones(4, o))),
        ("running_mean", lambda: nl.batch_norm(img, running_mean=np.zeros(4, dtype), running_var=c4.copy())),
        ("running_var", lambda: nl.batch_norm(img, running_mean=c4.copy(), running_var=np.ones(4, F64))),
        ("out", lambda: nl.batch_norm(img, out=np.empty(img.shape, F32))),
        ("mean", lambda: nl.batch_norm_backward(img, img, c4.astype(dtype), c4)),
        ("invstd", lambda: nl.batch_norm_backward(img, img, c4, c4.astype(dtype))),
        ("dy", lambda: nl.batch_norm_backward(np.ones(img.shape, o), img, c4, c4)),
        ("weight", lambda: nl.instance_norm(img, np.ones(4, o))),
        ("rstd", lambda: nl.instance_norm_backward(img, img, s24, s24.astype(dtype))),
        ("out", lambda: nl.instance_norm_backward(img, img, s24, s24, out=np.empty(img.shape, F32))),
        ("weight", lambda: nl.group_norm(img, 2, np.ones(4, F64))),
        ("out", lambda: nl.group_norm(img, 2, out=np.empty(img.shape, o))),
        ("mean", lambda: nl.group_norm_backward(img, img, s22.astype(F64), s22, 2)),
        ("weight", lambda: nl.group_norm_backward(img, img, s22, s22, 2, np.ones(4, o))),
        # float32 data takes float32 weights only: the half rule is for half data
        ("weight", lambda: nl.layer_norm(np.ones((4, 8), F32), np.ones(8, dtype))),
        ("residual", lambda: nl.add_layer_norm(np.ones((4, 8), F32), x)),
    ]


@pytest.mark.parametrize("dtype", HALVES)
def test_wrong_dtypes_raise_type_error_naming_the_argument(dtype):
    for name, call in _bad_calls(dtype):
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            call()


@pytest.mark.parametrize("dtype", HALVES)
def test_accepted_parameter_dtypes(dtype):
    """The calls next to the failing ones work: float32 or x's dtype for weight/bias."""
    x = np.ones((4, 8), dtype)
    for wd in (F32, dtype):
        normlab.layer_norm(x, np.ones(8, wd), np.zeros(8, wd))
        normlab.rms_norm(x, np.ones(8, wd))
        normlab.group_norm(x.reshape(2, 4, 4), 2, np.ones(4, wd), np.zeros(4, wd))
