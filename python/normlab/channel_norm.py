"""Normalization per channel: batch_norm, instance_norm and group_norm, forward and backward.

Semantics follow torch.nn.functional (biased variance for normalizing, eps inside the square
root, PyTorch's running-statistics update) with NumPy conventions: ``channel_axis`` says where
the channels are and ``out=`` receives the result in place.

Layouts: x is ``(N, C, *spatial)`` with ``channel_axis=1`` (channels-first) or
``(N, *spatial, C)`` with ``channel_axis=-1`` (channels-last), with any number of spatial
dims (none for batch_norm's ``(N, C)``). Channels-last input is normalized in its own layout:
no transposing copy, and results come back in the same layout.

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
  writeable array of x's dtype and shape (for channels-last, the ``(N, *spatial, C)`` array
  itself is C-contiguous) that does not overlap an input. Nothing is ever written to a
  temporary and copied back; running statistics are updated in place and so must be
  C-contiguous, aligned and writeable.
* Statistics are accumulated in float64 from sums shifted by a few elements of each set, over
  fixed blocks added in a fixed order: float32 results stay accurate when |mean| >> std, and
  results are bitwise identical for every thread count.
* The GIL is released while a kernel runs (for all but tiny calls).
"""

from __future__ import annotations

import math

import numpy as np

from . import _core
from ._checks import (
    flag,
    float_input,
    KernelSet,
    gradient_like,
    like_input,
    param_dtype,
    param_input,
    stat_input,
    output,
    positive_float,
)

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "group_norm",
    "group_norm_backward",
]

_KERNELS = KernelSet(_core, "batch_norm", "batch_norm_backward", "group_norm", "group_norm_backward")


def _layout(shape: tuple, channel_axis, min_ndim: int = 2):
    """(N, C, S, channels_last) of x's shape with the channels at channel_axis."""
    ndim = len(shape)
    if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis must be an int (1 or -1), got {type(channel_axis).__name__}")
    if ndim < min_ndim:
        raise ValueError(
            f"x must have at least {min_ndim} dimensions (N, C, ...), got shape {shape}"
        )
    axis = int(channel_axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel_axis {axis} is out of bounds for an array of {ndim} dimensions")
    axis %= ndim
    if axis == 1:
        return shape[0], shape[1], math.prod(shape[2:]), False
    if axis == ndim - 1:
        return shape[0], shape[-1], math.prod(shape[1:-1]), True
    raise ValueError(
        f"channel_axis must be 1 (channels-first) or -1 (channels-last), got {channel_axis}"
    )


def _channels(c: int) -> int:
    if c == 0:
        raise ValueError("x has zero channels: nothing to normalize")
    return c


def _running(a, name: str, dtype, c: int, others: tuple) -> np.ndarray:
    """A running statistic: (C,) of x's dtype (float32 for half x), updated in place, so
    checked like an output."""
    return output(a, name, param_dtype(dtype), (c,), others)


def _momentum(value) -> float:
    if value is None:
        raise TypeError("momentum must be a real number in [0, 1]; None (cumulative average) is not supported")
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"momentum must be a real number, got {type(value).__name__}")
    try:
        m = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"momentum must be a real number, got {type(value).__name__}") from None
    except OverflowError:
        raise ValueError(f"momentum must be in [0, 1], got {value!r}") from None
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {value!r}")
    return m


def _num_groups(value, c: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {type(value).__name__}")
    g = int(value)
    if g <= 0:
        raise ValueError(f"num_groups must be > 0, got {g}")
    if c % g:
        raise ValueError(f"num_groups ({g}) must divide the number of channels ({c})")
    return g


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *, training=True,
               momentum=0.1, eps=1e-5, channel_axis=1, out=None, return_stats=False):
    """Batch normalization: statistics per channel over every other axis.

    ``y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]``, as
    ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ``(N, C, *spatial)`` or ``(N, *spatial, C)``
    weight, bias : ndarray of x's dtype and shape ``(C,)``, optional
    running_mean, running_var : ndarray of x's dtype and shape ``(C,)``, optional
        C-contiguous and writeable. In training, when given, updated in place as PyTorch does:
        ``new = (1 - momentum) * old + momentum * batch`` with the unbiased batch variance for
        running_var. Required when ``training`` is false: they are then the statistics used.
    training : bool
        True: normalize with the batch statistics (more than one value per channel needed).
        False: normalize with running_mean and running_var.
    momentum : float in [0, 1]
    eps : float > 0
    channel_axis : 1 (channels-first) or -1 (channels-last)
    out : ndarray, optional
        C-contiguous, writeable, x's dtype and shape, not overlapping an input.
    return_stats : bool
        Also return ``mean`` and ``invstd = 1 / sqrt(var + eps)``, each of shape ``(C,)``, as
        ``batch_norm_backward`` takes them (in inference: running_mean and
        ``1 / sqrt(running_var + eps)``).

    Returns
    -------
    y, or (y, mean, invstd) when return_stats is true.

    Channels that are constant give exactly ``bias`` (0 without bias).
    """
    result = _core.batch_norm_plain(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                    channel_axis, out, return_stats)
    if result is not None:  # a plain call runs in one C++ step
        return result
    x_in, x = x, float_input(x, "x")
    dtype, shape = x.dtype, x.shape
    n, c, s, cl = _layout(shape, channel_axis)
    _channels(c)
    fwd = _KERNELS[dtype][0]
    training = flag(training, "training")
    eps = positive_float(eps, "eps")
    momentum = _momentum(momentum)
    if weight is not None:
        weight = param_input(weight, "weight", dtype, (c,))
    if bias is not None:
        bias = param_input(bias, "bias", dtype, (c,))
    inputs = ((x_in, "x"), (weight, "weight"), (bias, "bias"))
    if out is None:
        y = _core.empty_result(shape, dtype)
    else:
        y = output(out, "out", dtype, shape, inputs)
    if running_mean is not None:
        running_mean = _running(running_mean, "running_mean", dtype, c, inputs + ((y, "out"),))
    if running_var is not None:
        running_var = _running(running_var, "running_var", dtype, c,
                               inputs + ((y, "out"), (running_mean, "running_mean")))
    if training:
        if n * s <= 1:
            raise ValueError(
                f"batch_norm in training needs more than 1 value per channel, got x of shape {shape}"
            )
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training is False")
    mean = invstd = None
    if return_stats is True or flag(return_stats, "return_stats"):
        mean = np.empty(c, param_dtype(dtype))
        invstd = np.empty(c, param_dtype(dtype))
    fwd(x, weight, bias, y, mean, invstd, running_mean, running_var, n, c, s, cl, training,
        momentum, eps)
    if mean is not None:
        return y, mean, invstd
    return y


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, channel_axis=1, out=None):
    """Gradients of ``batch_norm``: returns ``(dx, dweight, dbias)``.

    Parameters
    ----------
    dy : ndarray, the gradient of y, x's dtype and shape
    x : ndarray, the forward input (float32, float64, float16 or bfloat16)
    mean, invstd : ndarray of x's dtype and shape ``(C,)``
        As returned by ``batch_norm(..., return_stats=True)``; in inference, the running mean
        and ``1 / sqrt(running_var + eps)``.
    weight : ndarray of x's dtype and shape ``(C,)``, optional
    training : bool
        As in the forward call. In inference ``dx = weight * invstd * dy``.
    channel_axis : 1 or -1, as in the forward call
    out : ndarray, optional
        Receives dx: C-contiguous, writeable, x's dtype and shape, not overlapping an input.

    Returns
    -------
    dx : ndarray like x (``out`` when given)
    dweight, dbias : ndarray of shape ``(C,)``, or None when weight is None (summed in a fixed
        order: identical for every thread count).
    """
    result = _core.batch_norm_backward_plain(dy, x, mean, invstd, weight, training, channel_axis, out)
    if result is not None:  # as in batch_norm
        return result
    originals = ((dy, "dy"), (x, "x"), (mean, "mean"), (invstd, "invstd"), (weight, "weight"))
    x = float_input(x, "x")
    dtype, shape = x.dtype, x.shape
    n, c, s, cl = _layout(shape, channel_axis)
    _channels(c)
    bwd = _KERNELS[dtype][1]
    training = flag(training, "training")
    dy = like_input(dy, "dy", dtype, shape)
    mean = stat_input(mean, "mean", dtype, (c,))
    invstd = stat_input(invstd, "invstd", dtype, (c,))
    weight_in, weight = weight, param_input(weight, "weight", dtype, (c,))
    if training and n * s <= 1:
        raise ValueError(
            f"batch_norm in training needs more than 1 value per channel, got x of shape {shape}"
        )
    dx, dweight, dbias = _gradients(out, dtype, shape, c, weight, originals)
    bwd(dy, x, mean, invstd, weight, dx, dweight, dbias, n, c, s, cl, training)
    return dx, gradient_like(dweight, weight_in), gradient_like(dbias, weight_in)


def _group_forward(x, groups, weight, bias, eps, channel_axis, out, return_stats, instance):
    result = _core.group_norm_plain(x, groups, weight, bias, eps, channel_axis, out, return_stats, instance)
    if result is not None:  # as in batch_norm
        return result
    x_in, x = x, float_input(x, "x")
    dtype, shape = x.dtype, x.shape
    n, c, s, cl = _layout(shape, channel_axis)
    _channels(c)
    fwd = _KERNELS[dtype][2]
    if instance:
        g = c
        if s <= 1 and n > 0:
            raise ValueError(
                f"instance_norm needs more than 1 spatial element per channel, got x of shape {shape}"
            )
    else:
        g = _num_groups(groups, c)
    if s == 0 and n > 0:
        raise ValueError(f"x has zero spatial elements {shape}: nothing to normalize")
    eps = positive_float(eps, "eps")
    if weight is not None:
        weight = param_input(weight, "weight", dtype, (c,))
    if bias is not None:
        bias = param_input(bias, "bias", dtype, (c,))
    if out is None:
        y = _core.empty_result(shape, dtype)
    else:
        y = output(out, "out", dtype, shape, ((x_in, "x"), (weight, "weight"), (bias, "bias")))
    if return_stats is True or flag(return_stats, "return_stats"):
        mean = np.empty((n, g), param_dtype(dtype))
        rstd = np.empty((n, g), param_dtype(dtype))
        fwd(x, weight, bias, y, mean, rstd, n, c, s, g, cl, eps)
        return y, mean, rstd
    fwd(x, weight, bias, y, None, None, n, c, s, g, cl, eps)
    return y


def _gradients(out, dtype, shape, c, weight, originals):
    """dx (new, or `out` checked against the caller's arrays) and, with a weight, dweight/dbias
    of the weight's (kernel) dtype."""
    dx = _core.empty_result(shape, dtype) if out is None else output(out, "out", dtype, shape, originals)
    if weight is None:
        return dx, None, None
    return dx, np.empty(c, weight.dtype), np.empty(c, weight.dtype)


def _group_backward(dy, x, mean, rstd, groups, weight, channel_axis, out, instance):
    result = _core.group_norm_backward_plain(dy, x, mean, rstd, groups, weight, channel_axis, out, instance)
    if result is not None:  # as in batch_norm
        return result
    originals = ((dy, "dy"), (x, "x"), (mean, "mean"), (rstd, "rstd"), (weight, "weight"))
    x = float_input(x, "x")
    dtype, shape = x.dtype, x.shape
    n, c, s, cl = _layout(shape, channel_axis)
    _channels(c)
    bwd = _KERNELS[dtype][3]
    g = c if instance else _num_groups(groups, c)
    if s == 0 and n > 0:
        raise ValueError(f"x has zero spatial elements {shape}: nothing to normalize")
    dy = like_input(dy, "dy", dtype, shape)
    mean = stat_input(mean, "mean", dtype, (n, g))
    rstd = stat_input(rstd, "rstd", dtype, (n, g))
    weight_in, weight = weight, param_input(weight, "weight", dtype, (c,))
    dx, dweight, dbias = _gradients(out, dtype, shape, c, weight, originals)
    bwd(dy, x, mean, rstd, weight, dx, dweight, dbias, n, c, s, g, cl)
    return dx, gradient_like(dweight, weight_in), gradient_like(dbias, weight_in)


def instance_norm(x, weight=None, bias=None, *, eps=1e-5, channel_axis=1, out=None,
                  return_stats=False):
    """Instance normalization: statistics per (sample, channel) over the spatial axes.

    As ``torch.nn.functional.instance_norm`` with ``use_input_stats=True`` (no running
    statistics): ``y = (x - mean[n, c]) / sqrt(var[n, c] + eps) * weight[c] + bias[c]``.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ``(N, C, *spatial)`` or ``(N, *spatial, C)`` with more
        than one spatial element
    weight, bias : ndarray of x's dtype and shape ``(C,)``, optional
    eps : float > 0
    channel_axis : 1 (channels-first) or -1 (channels-last)
    out : ndarray, optional
        C-contiguous, writeable, x's dtype and shape, not overlapping an input.
    return_stats : bool
        Also return ``mean`` and ``rstd = 1 / sqrt(var + eps)``, each of shape ``(N, C)``.

    Returns
    -------
    y, or (y, mean, rstd) when return_stats is true.
    """
    return _group_forward(x, None, weight, bias, eps, channel_axis, out, return_stats, True)


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, channel_axis=1, out=None):
    """Gradients of ``instance_norm``: returns ``(dx, dweight, dbias)``.

    mean and rstd, of shape ``(N, C)``, are as ``instance_norm(..., return_stats=True)``
    returns them; dweight and dbias (shape ``(C,)``) are None when weight is None. ``out``
    receives dx as in ``batch_norm_backward``.
    """
    return _group_backward(dy, x, mean, rstd, None, weight, channel_axis, out, True)


def group_norm(x, num_groups, weight=None, bias=None, *, eps=1e-5, channel_axis=1, out=None,
               return_stats=False):
    """Group normalization: statistics per (sample, group of C / num_groups channels).

    As ``torch.nn.functional.group_norm``:
    ``y = (x - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c]`` where channel c is in
    group ``g = c // (C // num_groups)``.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ``(N, C, *spatial)`` or ``(N, *spatial, C)``
    num_groups : int > 0 dividing C
    weight, bias : ndarray of x's dtype and shape ``(C,)``, optional
    eps : float > 0
    channel_axis : 1 (channels-first) or -1 (channels-last)
    out : ndarray, optional
        C-contiguous, writeable, x's dtype and shape, not overlapping an input.
    return_stats : bool
        Also return ``mean`` and ``rstd``, each of shape ``(N, num_groups)``, as
        ``torch.ops.aten.native_group_norm`` returns them.

    Returns
    -------
    y, or (y, mean, rstd) when return_stats is true.
    """
    return _group_forward(x, num_groups, weight, bias, eps, channel_axis, out, return_stats, False)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, channel_axis=1, out=None):
    """Gradients of ``group_norm``: returns ``(dx, dweight, dbias)``.

    mean and rstd, of shape ``(N, num_groups)``, are as ``group_norm(..., return_stats=True)``
    returns them; dweight and dbias (shape ``(C,)``) are None when weight is None. ``out``
    receives dx as in ``batch_norm_backward``.
    """
    return _group_backward(dy, x, mean, rstd, num_groups, weight, channel_axis, out, False)
