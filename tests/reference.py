"""float64 NumPy references for the normalization tests, and a finite-difference helper.

Every reference converts its inputs to float64 first and computes in float64, so a float32
kernel is held to the exact answer for the float32 values it was given (never to a float32
re-computation). ``axis`` has the public API's meaning: an int or a tuple naming trailing axes,
normalized together; statistics have the leading shape.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "normalized_axes",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "numerical_gradient",
]


def normalized_axes(ndim: int, axis) -> tuple:
    """The sorted non-negative axes `axis` names (reference-side, no validation beyond asserts)."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(sorted(int(a) % ndim for a in axes))
    assert axes == tuple(range(ndim - len(axes), ndim)), "reference expects trailing axes"
    return axes


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _lead_shape(x, axes):
    return x.shape[: x.ndim - len(axes)]


def layer_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5):
    """(y, mean, rstd) in float64; mean/rstd have the leading shape, biased variance."""
    x = _f64(x)
    axes = normalized_axes(x.ndim, axis)
    mean = x.mean(axis=axes, keepdims=True)
    mean = mean + (x - mean).mean(axis=axes, keepdims=True)  # one refinement step: ~exact
    centred = x - mean
    var = (centred * centred).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + float(eps))
    y = centred * rstd
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    lead = _lead_shape(x, axes)
    return y, mean.reshape(lead), rstd.reshape(lead)


def rms_norm(x, weight=None, *, axis=-1, eps=None):
    """(y, rstd) in float64; eps None means the machine epsilon of x's dtype (as normlab)."""
    if eps is None:
        eps = float(np.finfo(np.asarray(x).dtype).eps)
    x = _f64(x)
    axes = normalized_axes(x.ndim, axis)
    ms = (x * x).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(ms + float(eps))
    y = x * rstd
    if weight is not None:
        y = y * _f64(weight)
    return y, rstd.reshape(_lead_shape(x, axes))


def _expand(stat, ndim):
    """A leading-shape statistic broadcastable against x."""
    stat = _f64(stat)
    return stat.reshape(stat.shape + (1,) * (ndim - stat.ndim))


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1):
    """(dx, dweight, dbias) in float64 from the given statistics (exact gradient of layer_norm
    when mean/rstd are the forward's). dweight/dbias are None without weight."""
    dy, x = _f64(dy), _f64(x)
    axes = normalized_axes(x.ndim, axis)
    lead_axes = tuple(range(x.ndim - len(axes)))
    mean, rstd = _expand(mean, x.ndim), _expand(rstd, x.ndim)
    xhat = (x - mean) * rstd
    g = dy if weight is None else dy * _f64(weight)
    c0 = g.mean(axis=axes, keepdims=True)
    c1 = (g * xhat).mean(axis=axes, keepdims=True)
    dx = rstd * (g - c0 - xhat * c1)
    if weight is None:
        return dx, None, None
    return dx, (dy * xhat).sum(axis=lead_axes), dy.sum(axis=lead_axes)


def rms_norm_backward(dy, x, rstd, weight=None, *, axis=-1):
    """(dx, dweight) in float64 from the given rstd; dweight is None without weight."""
    dy, x = _f64(dy), _f64(x)
    axes = normalized_axes(x.ndim, axis)
    lead_axes = tuple(range(x.ndim - len(axes)))
    rstd = _expand(rstd, x.ndim)
    xhat = x * rstd
    g = dy if weight is None else dy * _f64(weight)
    c1 = (g * xhat).mean(axis=axes, keepdims=True)
    dx = rstd * (g - xhat * c1)
    if weight is None:
        return dx, None
    return dx, (dy * xhat).sum(axis=lead_axes)


def numerical_gradient(f, a, h=1e-6):
    """Central finite differences of the scalar function f() with respect to the float64 array
    `a`, which f reads: each element is perturbed in place by +-h (scaled by max(1, |a_i|)) and
    restored."""
    assert a.dtype == np.float64
    grad = np.empty_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    assert np.shares_memory(flat, a)
    for i in range(flat.size):
        orig = flat[i]
        step = h * max(1.0, abs(orig))
        flat[i] = orig + step
        fp = f()
        flat[i] = orig - step
        fm = f()
        flat[i] = orig
        gflat[i] = (fp - fm) / (2.0 * step)
    return grad


# ---- half precision (float16, bfloat16) ------------------------------------------------------
#
# Helpers for tests of half-precision data. They need no import of ml_dtypes: a bfloat16 array
# is recognised by its dtype's name. Every rounding here is done from float64 by this module
# itself, correctly (ml_dtypes' float64 -> bfloat16 cast goes through float32 and so rounds
# twice: 1 + 2**-8 + 2**-30 becomes 1.0 instead of 1 + 2**-7).

# dtype name -> (explicit mantissa bits, exponent of the smallest normal, largest finite value)
_HALF_FORMATS = {
    "float16": (10, -14, 65504.0),
    "bfloat16": (7, -126, float.fromhex("0x1.fep127")),
}


def half_format(dtype):
    """(nmant, emin, max) of the float16 or bfloat16 dtype."""
    return _HALF_FORMATS[np.dtype(dtype).name]


def half_quantum(v, dtype):
    """The spacing of `dtype`'s values in the binade of each float64 |v| (the smallest subnormal
    spacing below the normal range): one ulp of dtype at v."""
    nmant, emin, _ = half_format(dtype)
    v = np.asarray(v, np.float64)
    with np.errstate(invalid="ignore"):
        _, e = np.frexp(np.where(np.isfinite(v), v, 0.0))
    return np.ldexp(1.0, np.maximum(e - 1, emin) - nmant)


def round_half(v, dtype):
    """float64 values rounded once, to nearest even, to `dtype` (float16 or bfloat16); values
    beyond the largest finite one by half an ulp or more become +-Inf, as IEEE rounding does."""
    _, _, fmax = half_format(dtype)
    v = np.asarray(v, np.float64)
    q = half_quantum(v, dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.round(v / q) * q  # exact scaling by a power of two; np.round ties to even
        r = np.where(np.isfinite(v), r, v)
        r = np.where(np.abs(r) > fmax, np.copysign(np.inf, v), r)
    return r.astype(dtype)  # every value is representable: the cast is exact


def half_ordinal(a):
    """int32 ordinals of a float16/bfloat16 array: consecutive representable values differ by 1
    (+0 and -0 are both 0), so ordinal differences count ulps. Meaningless for NaN."""
    a = np.asarray(a)
    assert a.dtype.itemsize == 2, a.dtype
    bits = a.view(np.uint16).astype(np.int32)
    mag = bits & 0x7FFF
    return np.where(bits & 0x8000, -mag, mag)


def half_ulp_distance(got, ref64):
    """|ordinal(got) - ordinal(ref64 rounded to got's dtype)|: 0 when got is the correctly rounded
    value, 1 when it is a neighbour of it. Entries where either is NaN give 0 (check NaN apart)."""
    got = np.asarray(got)
    expect = round_half(ref64, got.dtype)
    dist = np.abs(half_ordinal(got) - half_ordinal(expect))
    nan = np.isnan(got.astype(np.float64)) | np.isnan(np.asarray(ref64, np.float64))
    return np.where(nan, 0, dist)


def channel_sets(xc, kind, groups=None):
    """A channels-first float64 array (N, C, *spatial) viewed as (sets, set size): one row per
    channel for "batch", per (sample, channel) for "instance", per (sample, group) for "group";
    and a function mapping such a (sets, set size) array back to xc's shape."""
    n, c = xc.shape[:2]
    if kind == "batch":
        t = np.moveaxis(xc, 1, 0).reshape(c, -1)
        return t, lambda v: np.moveaxis(np.asarray(v).reshape((c, n) + xc.shape[2:]), 0, 1)
    g = c if kind == "instance" else groups
    return xc.reshape(n * g, -1), lambda v: np.asarray(v).reshape(xc.shape)


def _channels_first(a, channel_axis):
    a = _f64(a)
    return a if channel_axis % a.ndim == 1 else np.moveaxis(a, -1, 1)


def _channels_back(a, channel_axis):
    return a if channel_axis % a.ndim == 1 else np.moveaxis(a, 1, -1)


def channel_norm(x, kind, groups=None, weight=None, bias=None, *, eps=1e-5, channel_axis=1):
    """batch ("batch"), instance ("instance") or group ("group") norm in float64: (y, mean, rstd,
    var) with mean/rstd/var flat per set (biased var)."""
    xc = _channels_first(x, channel_axis)
    t, back = channel_sets(xc, kind, groups)
    mean = t.mean(1)
    mean = mean + (t - mean[:, None]).mean(1)
    var = ((t - mean[:, None]) ** 2).mean(1)
    rstd = 1.0 / np.sqrt(var + float(eps))
    y = back((t - mean[:, None]) * rstd[:, None])
    per_channel = (1, -1) + (1,) * (xc.ndim - 2)
    if weight is not None:
        y = y * _f64(weight).reshape(per_channel)
    if bias is not None:
        y = y + _f64(bias).reshape(per_channel)
    return _channels_back(y, channel_axis), mean, rstd, var


def channel_norm_backward(dy, x, mean, rstd, kind, groups=None, weight=None, *, channel_axis=1,
                          training=True):
    """(dx, dweight, dbias, term) in float64 from the given statistics (flat or set-shaped);
    term = |rstd * dy * weight| elementwise in x's layout, the size of dx's terms."""
    xc = _channels_first(x, channel_axis)
    dyc = _channels_first(dy, channel_axis)
    per_channel = (1, -1) + (1,) * (xc.ndim - 2)
    wv = np.ones(xc.shape[1]) if weight is None else _f64(weight)
    g = dyc * wv.reshape(per_channel)
    t, back = channel_sets(xc, kind, groups)
    gt, _ = channel_sets(g, kind, groups)
    mean = _f64(mean).reshape(-1)[:, None]
    rstd = _f64(rstd).reshape(-1)[:, None]
    xhat = (t - mean) * rstd
    if training:
        dx = rstd * (gt - gt.mean(1, keepdims=True) - xhat * (gt * xhat).mean(1, keepdims=True))
    else:
        dx = rstd * gt
    axes = (0,) + tuple(range(2, xc.ndim))
    dweight = (dyc * back(xhat)).sum(axes)
    dbias = dyc.sum(axes)
    term = np.abs(back(rstd * gt))
    return _channels_back(back(dx), channel_axis), dweight, dbias, _channels_back(term, channel_axis)
