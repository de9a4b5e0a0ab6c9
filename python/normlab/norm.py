"""Normalization over trailing axes: layer_norm and rms_norm, forward and backward.

Semantics follow torch.nn.functional (biased variance, eps inside the square root) with NumPy
conventions: ``axis`` names the trailing axes normalized together instead of
``normalized_shape``, and ``out=`` receives the result in place.

Data handling, common to every function here:

* float32 and float64 arrays are read in place when C-contiguous. A strided input is copied
  once to a contiguous array before the kernel (the only conversion normlab makes, and only of
  inputs); any other dtype raises TypeError.
* Results go to new C-contiguous arrays, or to ``out`` which must be a C-contiguous, writeable
  array of the right dtype and shape that does not overlap an input. Nothing is ever written to
  a temporary and copied back.
* Statistics are accumulated in float64 with shifted sums, so float32 results stay accurate
  when |mean| >> std. Results are bitwise identical for every thread count.
* The GIL is released while a kernel runs (for all but tiny calls).
"""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np

from . import _core
from ._checks import (
    flag,
    float_input,
    like_input,
    optional_like_input,
    output,
    positive_float,
    row_split,
)

Axis = Union[int, Tuple[int, ...]]

__all__ = ["layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward"]

_KERNELS = {
    np.dtype(np.float32): (
        _core.layer_norm_f32,
        _core.layer_norm_backward_f32,
        _core.rms_norm_f32,
        _core.rms_norm_backward_f32,
    ),
    np.dtype(np.float64): (
        _core.layer_norm_f64,
        _core.layer_norm_backward_f64,
        _core.rms_norm_f64,
        _core.rms_norm_backward_f64,
    ),
}


def layer_norm(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    axis: Axis = -1,
    eps: float = 1e-5,
    out: np.ndarray | None = None,
    return_stats: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer normalization over the trailing axes named by ``axis``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` where mean and the biased variance are
    taken over the normalized axes, as ``torch.nn.functional.layer_norm``.

    Parameters
    ----------
    x : ndarray, float32 or float64, at least 1-D
    weight, bias : ndarray of x's dtype with the shape of the normalized axes, optional
    axis : int or tuple of int
        The trailing axes normalized together: -1 (the last), (-2, -1) (the last two), ...
    eps : float > 0
    out : ndarray, optional
        C-contiguous, writeable, x's dtype and shape, not overlapping an input.
    return_stats : bool
        Also return mean and rstd = 1 / sqrt(var + eps), each with the leading shape of x and
        x's dtype, as ``layer_norm_backward`` takes them.

    Returns
    -------
    y, or (y, mean, rstd) when return_stats is true.

    Rows that are constant give exactly ``bias`` (0 without bias); NaN or Inf in a row affect
    only that row. A leading shape with zero elements gives empty results.
    """
    x_in, x = x, float_input(x, "x")
    layer_fwd = _KERNELS[x.dtype][0]
    shape = x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    eps = positive_float(eps, "eps")
    dtype = x.dtype
    if weight is not None:
        weight = like_input(weight, "weight", dtype, normalized)
    if bias is not None:
        bias = like_input(bias, "bias", dtype, normalized)
    if out is None:
        y = np.empty(shape, dtype)
    else:
        y = output(out, "out", dtype, shape, ((x_in, "x"), (weight, "weight"), (bias, "bias")))
    if return_stats is True or flag(return_stats, "return_stats"):
        mean = np.empty(lead, dtype)
        rstd = np.empty(lead, dtype)
        layer_fwd(x, weight, bias, y, mean, rstd, rows, cols, eps)
        return y, mean, rstd
    layer_fwd(x, weight, bias, y, None, None, rows, cols, eps)
    return y


def layer_norm_backward(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None = None,
    *,
    axis: Axis = -1,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of ``layer_norm``: returns ``(dx, dweight, dbias)``.

    Parameters
    ----------
    dy : ndarray, the gradient of y, x's dtype and shape
    x : ndarray, the forward input (float32 or float64)
    mean, rstd : ndarray, x's dtype, the leading shape of x
        As returned by ``layer_norm(..., return_stats=True)``.
    weight : ndarray, optional, x's dtype, the shape of the normalized axes
    axis : int or tuple of int, as in the forward call
    out : ndarray, optional
        Receives dx: C-contiguous, writeable, x's dtype and shape, not overlapping an input.

    Returns
    -------
    dx : ndarray like x (``out`` when given)
    dweight, dbias : ndarray with the shape of the normalized axes, or None when weight is None
        (summed over the leading axes in a fixed order: identical for every thread count).
    """
    originals = ((dy, "dy"), (x, "x"), (mean, "mean"), (rstd, "rstd"), (weight, "weight"))
    x = float_input(x, "x")
    layer_bwd = _KERNELS[x.dtype][1]
    dtype, shape = x.dtype, x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    dy = like_input(dy, "dy", dtype, shape)
    mean = like_input(mean, "mean", dtype, lead)
    rstd = like_input(rstd, "rstd", dtype, lead)
    weight = optional_like_input(weight, "weight", dtype, normalized)
    if out is None:
        dx = np.empty(shape, dtype)
    else:
        dx = output(out, "out", dtype, shape, originals)
    dweight = dbias = None
    if weight is not None:
        dweight = np.empty(normalized, dtype)
        dbias = np.empty(normalized, dtype)
    layer_bwd(dy, x, mean, rstd, weight, dx, dweight, dbias, rows, cols)
    return dx, dweight, dbias


def rms_norm(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    *,
    axis: Axis = -1,
    eps: float | None = None,
    out: np.ndarray | None = None,
    return_stats: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Root-mean-square normalization over the trailing axes named by ``axis``.

    ``y = x / sqrt(mean(x**2) + eps) * weight``, as ``torch.nn.functional.rms_norm``.

    Parameters
    ----------
    x : ndarray, float32 or float64, at least 1-D
    weight : ndarray of x's dtype with the shape of the normalized axes, optional
    axis : int or tuple of int, the trailing axes normalized together
    eps : float > 0, optional
        None means ``numpy.finfo(x.dtype).eps``, as in PyTorch.
    out : ndarray, optional
        C-contiguous, writeable, x's dtype and shape, not overlapping an input.
    return_stats : bool
        Also return rstd = 1 / sqrt(mean(x**2) + eps) with the leading shape of x.

    Returns
    -------
    y, or (y, rstd) when return_stats is true.
    """
    x_in, x = x, float_input(x, "x")
    rms_fwd = _KERNELS[x.dtype][2]
    shape = x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    dtype = x.dtype
    if eps is None:
        eps = _EPS[dtype]
    else:
        eps = positive_float(eps, "eps")
    if weight is not None:
        weight = like_input(weight, "weight", dtype, normalized)
    if out is None:
        y = np.empty(shape, dtype)
    else:
        y = output(out, "out", dtype, shape, ((x_in, "x"), (weight, "weight")))
    if return_stats is True or flag(return_stats, "return_stats"):
        rstd = np.empty(lead, dtype)
        rms_fwd(x, weight, y, rstd, rows, cols, eps)
        return y, rstd
    rms_fwd(x, weight, y, None, rows, cols, eps)
    return y


def rms_norm_backward(
    dy: np.ndarray,
    x: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None = None,
    *,
    axis: Axis = -1,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Gradients of ``rms_norm``: returns ``(dx, dweight)``.

    Parameters
    ----------
    dy : ndarray, the gradient of y, x's dtype and shape
    x : ndarray, the forward input (float32 or float64)
    rstd : ndarray, x's dtype, the leading shape of x, as ``rms_norm(..., return_stats=True)``
    weight : ndarray, optional, x's dtype, the shape of the normalized axes
    axis : int or tuple of int, as in the forward call
    out : ndarray, optional
        Receives dx: C-contiguous, writeable, x's dtype and shape, not overlapping an input.

    Returns
    -------
    dx : ndarray like x (``out`` when given)
    dweight : ndarray with the shape of the normalized axes, or None when weight is None.
    """
    originals = ((dy, "dy"), (x, "x"), (rstd, "rstd"), (weight, "weight"))
    x = float_input(x, "x")
    rms_bwd = _KERNELS[x.dtype][3]
    dtype, shape = x.dtype, x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    dy = like_input(dy, "dy", dtype, shape)
    rstd = like_input(rstd, "rstd", dtype, lead)
    weight = optional_like_input(weight, "weight", dtype, normalized)
    if out is None:
        dx = np.empty(shape, dtype)
    else:
        dx = output(out, "out", dtype, shape, originals)
    dweight = None if weight is None else np.empty(normalized, dtype)
    rms_bwd(dy, x, rstd, weight, dx, dweight, rows, cols)
    return dx, dweight


_EPS = {dtype: float(np.finfo(dtype).eps) for dtype in _KERNELS}
