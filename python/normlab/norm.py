"""Normalization over trailing axes: layer_norm and rms_norm, forward and backward.

Semantics follow torch.nn.functional (biased variance, eps inside the square root) with NumPy
conventions: ``axis`` names the trailing axes normalized together instead of
``normalized_shape``, and ``out=`` receives the result in place.

Data handling, common to every function here:

* float32, float64, float16 and bfloat16 (``ml_dtypes.bfloat16``) arrays are read in place
  when C-contiguous. A strided input, or one off its dtype's alignment (a view at an odd byte
  offset of a buffer), is copied once to a contiguous array before the kernel (the only
  conversion normlab makes of data, and only of inputs); any other dtype raises
  TypeError.
* Half-precision data (float16, bfloat16) is computed in float32 with float64 statistics and
  rounded to nearest even. Its statistics (and running statistics) are float32; weight and bias
  may be float32 or x's half dtype (converted once to a float32 copy of their few values), and
  dweight/dbias come back in the weight's dtype.
* Results go to new C-contiguous arrays, or to ``out`` which must be a C-contiguous, aligned,
  writeable array of the right dtype and shape that does not overlap an input. Nothing is ever
  written to a temporary and copied back. New results of 32 MiB or more are pages normlab maps
  itself and reuses once the result is freed (the array's ``base`` owns them).
* Statistics are accumulated in float64 with shifted sums, so float32 results stay accurate
  when |mean| >> std. Results are bitwise identical for every thread count.
* Rows are shared out among the threads. Fewer than 4 rows of 512 KiB or more (fewer than 16
  in the backward, and with weight fewer than 64 of 1 MiB or more; where L2 holds 2 MiB or
  more, also backwards of fewer than 256 rows of 0.5-2 MiB, 128 with weight; one image
  normalized over all its axes, say) are each split across all of them instead.
* The GIL is released while a kernel runs (for all but tiny calls).
"""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np

from . import _core
from ._checks import (
    KernelSet,
    flag,
    float_input,
    gradient_like,
    half_eps,
    like_input,
    output,
    param_dtype,
    param_input,
    positive_float,
    row_split,
    stat_input,
)

Axis = Union[int, Tuple[int, ...]]

__all__ = [
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "add_layer_norm",
    "add_layer_norm_backward",
    "add_rms_norm",
    "add_rms_norm_backward",
]

_KERNELS = KernelSet(_core, "layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward")


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
    x : ndarray, float32, float64, float16 or bfloat16, at least 1-D
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
    if type(axis) is int and axis == -1:  # a plain call runs in one C++ step, else None
        result = _core.layer_norm_plain(x, weight, bias, out, eps, return_stats)
        if result is not None:
            return result
    x_in, x = x, float_input(x, "x")
    layer_fwd = _KERNELS[x.dtype][0]
    shape = x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    eps = positive_float(eps, "eps")
    dtype = x.dtype
    if weight is not None:
        weight = param_input(weight, "weight", dtype, normalized)
    if bias is not None:
        bias = param_input(bias, "bias", dtype, normalized)
    if out is None:
        y = _core.empty_result(shape, dtype)
    else:
        y = output(out, "out", dtype, shape, ((x_in, "x"), (weight, "weight"), (bias, "bias")))
    if return_stats is True or flag(return_stats, "return_stats"):
        mean = np.empty(lead, param_dtype(dtype))
        rstd = np.empty(lead, param_dtype(dtype))
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
    x : ndarray, the forward input (float32, float64, float16 or bfloat16)
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
    return _layer_norm_backward(dy, x, mean, rstd, weight, None, axis, out, "x")


def _layer_norm_backward(dy, x, mean, rstd, weight, ds, axis, out, x_name):
    if type(axis) is int and axis == -1:  # as in layer_norm
        result = _core.layer_norm_backward_plain(dy, x, mean, rstd, weight, ds, out)
        if result is not None:
            return result
    originals = ((dy, "dy"), (x, x_name), (mean, "mean"), (rstd, "rstd"), (weight, "weight"), (ds, "ds"))
    x = float_input(x, x_name)
    layer_bwd = _KERNELS[x.dtype][1]
    dtype, shape = x.dtype, x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    dy = like_input(dy, "dy", dtype, shape)
    mean = stat_input(mean, "mean", dtype, lead)
    rstd = stat_input(rstd, "rstd", dtype, lead)
    weight_in, weight = weight, param_input(weight, "weight", dtype, normalized)
    ds = None if ds is None else like_input(ds, "ds", dtype, shape)
    if out is None:
        dx = _core.empty_result(shape, dtype)
    else:
        dx = output(out, "out", dtype, shape, originals)
    dweight = dbias = None
    if weight is not None:
        dweight = np.empty(normalized, weight.dtype)
        dbias = np.empty(normalized, weight.dtype)
    layer_bwd(dy, x, mean, rstd, weight, ds, dx, dweight, dbias, rows, cols)
    return dx, gradient_like(dweight, weight_in), gradient_like(dbias, weight_in)


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
    x : ndarray, float32, float64, float16 or bfloat16, at least 1-D
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
    if type(axis) is int and axis == -1:  # as in layer_norm
        result = _core.rms_norm_plain(x, weight, out, eps, return_stats)
        if result is not None:
            return result
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
        weight = param_input(weight, "weight", dtype, normalized)
    if out is None:
        y = _core.empty_result(shape, dtype)
    else:
        y = output(out, "out", dtype, shape, ((x_in, "x"), (weight, "weight")))
    if return_stats is True or flag(return_stats, "return_stats"):
        rstd = np.empty(lead, param_dtype(dtype))
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
    x : ndarray, the forward input (float32, float64, float16 or bfloat16)
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
    return _rms_norm_backward(dy, x, rstd, weight, None, axis, out, "x")


def _rms_norm_backward(dy, x, rstd, weight, ds, axis, out, x_name):
    if type(axis) is int and axis == -1:  # as in layer_norm
        result = _core.rms_norm_backward_plain(dy, x, rstd, weight, ds, out)
        if result is not None:
            return result
    originals = ((dy, "dy"), (x, x_name), (rstd, "rstd"), (weight, "weight"), (ds, "ds"))
    x = float_input(x, x_name)
    rms_bwd = _KERNELS[x.dtype][3]
    dtype, shape = x.dtype, x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    dy = like_input(dy, "dy", dtype, shape)
    rstd = stat_input(rstd, "rstd", dtype, lead)
    weight_in, weight = weight, param_input(weight, "weight", dtype, normalized)
    ds = None if ds is None else like_input(ds, "ds", dtype, shape)
    if out is None:
        dx = _core.empty_result(shape, dtype)
    else:
        dx = output(out, "out", dtype, shape, originals)
    dweight = None if weight is None else np.empty(normalized, weight.dtype)
    rms_bwd(dy, x, rstd, weight, ds, dx, dweight, rows, cols)
    return dx, gradient_like(dweight, weight_in)


def _residual_inputs(x, residual):
    """x and residual as C-contiguous arrays of one float dtype and shape."""
    x = float_input(x, "x")
    residual = like_input(residual, "residual", x.dtype, x.shape)
    return x, residual


def _sum_output(sum_out, x_in, residual_in, shape, dtype, others):
    """A new array for x + residual, or sum_out: x or residual itself (updated in place), or an
    array that overlaps no input."""
    if sum_out is None:
        return _core.empty_result(shape, dtype)
    in_place = sum_out is x_in or sum_out is residual_in or _core.same_view(sum_out, x_in) \
        or _core.same_view(sum_out, residual_in)
    inputs = others if in_place else ((x_in, "x"), (residual_in, "residual")) + others
    return output(sum_out, "sum_out", dtype, shape, inputs)


def add_layer_norm(
    x: np.ndarray,
    residual: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    axis: Axis = -1,
    eps: float = 1e-5,
    out: np.ndarray | None = None,
    sum_out: np.ndarray | None = None,
    return_stats: bool = False,
):
    """Fused residual add and layer normalization ("Add & Norm" of a transformer block).

    ``s = x + residual`` (elementwise, in x's dtype) and ``y = layer_norm(s, weight, bias)``,
    in one pass over memory instead of an add followed by a norm.

    Parameters
    ----------
    x, residual : ndarray, float32, float64, float16 or bfloat16, one dtype and shape
    weight, bias, axis, eps : as in ``layer_norm``
    out : ndarray, optional
        Receives y; must not overlap any input or sum_out.
    sum_out : ndarray, optional
        Receives s. It may be x or residual itself (the residual stream updated in place);
        otherwise it must not overlap an input.
    return_stats : bool
        Also return mean and rstd of s, as ``add_layer_norm_backward`` takes them.

    Returns
    -------
    (y, s), or (y, s, mean, rstd) when return_stats is true.
    """
    if type(axis) is int and axis == -1:  # as in layer_norm
        result = _core.add_layer_norm_plain(x, residual, weight, bias, out, sum_out, eps, return_stats)
        if result is not None:
            return result
    x_in, residual_in = x, residual
    x, residual = _residual_inputs(x, residual)
    kernel = _ADD_KERNELS[x.dtype][0]
    dtype, shape = x.dtype, x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    eps = positive_float(eps, "eps")
    weight = param_input(weight, "weight", dtype, normalized)
    bias = param_input(bias, "bias", dtype, normalized)
    params = ((weight, "weight"), (bias, "bias"))
    s = _sum_output(sum_out, x_in, residual_in, shape, dtype, params)
    if out is None:
        y = _core.empty_result(shape, dtype)
    else:
        y = output(out, "out", dtype, shape, ((x_in, "x"), (residual_in, "residual"), (s, "sum_out")) + params)
    if flag(return_stats, "return_stats"):
        mean = np.empty(lead, param_dtype(dtype))
        rstd = np.empty(lead, param_dtype(dtype))
        kernel(x, residual, weight, bias, y, s, mean, rstd, rows, cols, eps)
        return y, s, mean, rstd
    kernel(x, residual, weight, bias, y, s, None, None, rows, cols, eps)
    return y, s


def add_layer_norm_backward(
    dy: np.ndarray,
    s: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None = None,
    *,
    ds: np.ndarray | None = None,
    axis: Axis = -1,
    out: np.ndarray | None = None,
):
    """Gradients of ``add_layer_norm``: returns ``(dx, dweight, dbias)``.

    dx is the gradient of both x and residual (their sum's gradient): the layer-norm gradient
    plus ``ds``, the gradient reaching s from its later use (the residual stream), when given.
    s, mean and rstd are as ``add_layer_norm(..., return_stats=True)`` returned them.
    """
    return _layer_norm_backward(dy, s, mean, rstd, weight, ds, axis, out, "s")


def add_rms_norm(
    x: np.ndarray,
    residual: np.ndarray,
    weight: np.ndarray | None = None,
    *,
    axis: Axis = -1,
    eps: float | None = None,
    out: np.ndarray | None = None,
    sum_out: np.ndarray | None = None,
    return_stats: bool = False,
):
    """Fused residual add and RMS normalization: ``s = x + residual``, ``y = rms_norm(s)``.

    Arguments as in ``add_layer_norm`` (eps=None means ``numpy.finfo(dtype).eps``).

    Returns
    -------
    (y, s), or (y, s, rstd) when return_stats is true.
    """
    if type(axis) is int and axis == -1:  # as in layer_norm
        result = _core.add_rms_norm_plain(x, residual, weight, out, sum_out, eps, return_stats)
        if result is not None:
            return result
    x_in, residual_in = x, residual
    x, residual = _residual_inputs(x, residual)
    kernel = _ADD_KERNELS[x.dtype][1]
    dtype, shape = x.dtype, x.shape
    rows, cols, lead, normalized = row_split(shape, axis)
    eps = _EPS[dtype] if eps is None else positive_float(eps, "eps")
    weight = param_input(weight, "weight", dtype, normalized)
    params = ((weight, "weight"),)
    s = _sum_output(sum_out, x_in, residual_in, shape, dtype, params)
    if out is None:
        y = _core.empty_result(shape, dtype)
    else:
        y = output(out, "out", dtype, shape, ((x_in, "x"), (residual_in, "residual"), (s, "sum_out")) + params)
    if flag(return_stats, "return_stats"):
        rstd = np.empty(lead, param_dtype(dtype))
        kernel(x, residual, weight, y, s, rstd, rows, cols, eps)
        return y, s, rstd
    kernel(x, residual, weight, y, s, None, rows, cols, eps)
    return y, s


def add_rms_norm_backward(
    dy: np.ndarray,
    s: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None = None,
    *,
    ds: np.ndarray | None = None,
    axis: Axis = -1,
    out: np.ndarray | None = None,
):
    """Gradients of ``add_rms_norm``: returns ``(dx, dweight)``, dx including ``ds``."""
    return _rms_norm_backward(dy, s, rstd, weight, ds, axis, out, "s")


class _DefaultEps(dict):
    """rms_norm's eps=None: numpy.finfo(dtype).eps (bfloat16's from ml_dtypes), as PyTorch."""

    def __missing__(self, dtype):
        eps = half_eps(dtype) if dtype.itemsize == 2 else float(np.finfo(dtype).eps)
        self[dtype] = eps
        return eps


_EPS = _DefaultEps()

_ADD_KERNELS = KernelSet(_core, "add_layer_norm", "add_rms_norm")
