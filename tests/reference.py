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
