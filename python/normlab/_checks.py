"""Argument checks shared by the public functions.

Every failure raises TypeError (wrong type or dtype), ValueError (wrong shape, layout or
value) or OverflowError, with a message that names the argument and says what was expected.
"""

from __future__ import annotations

import math

import numpy as np

from ._core import first_overlap

FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
FLOAT16 = np.dtype(np.float16)
DATA_DTYPE_NAMES = "float32, float64, float16 or bfloat16"

# Data dtype -> (kernel suffix, dtype of weight/bias/statistics). ml_dtypes.bfloat16 joins
# when first seen, so that importing normlab does not import ml_dtypes.
_DATA_DTYPES = {FLOAT32: ("f32", FLOAT32), FLOAT64: ("f64", FLOAT64), FLOAT16: ("f16", FLOAT32)}


def _known_dtype(dtype) -> bool:
    if dtype in _DATA_DTYPES:
        return True
    if dtype.name == "bfloat16" and dtype.itemsize == 2:
        try:  # another library's "bfloat16" without ml_dtypes installed is just another dtype
            import ml_dtypes
        except ImportError:
            return False
        if dtype == np.dtype(ml_dtypes.bfloat16):
            _DATA_DTYPES[dtype] = ("bf16", FLOAT32)
            return True
    return False


def param_dtype(dtype) -> np.dtype:
    """The dtype of statistics and gradients of weight/bias for data of `dtype` (a validated
    data dtype): float32 for the half types, else dtype itself."""
    return _DATA_DTYPES[dtype][1]


def half_eps(dtype) -> float:
    """numpy.finfo(dtype).eps, for bfloat16 too."""
    if dtype == FLOAT16:
        return float(np.finfo(np.float16).eps)
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).eps)


class KernelSet(dict):
    """The kernels `names` of normlab._core for each data dtype: name + "_" + suffix, looked up
    once per dtype."""

    def __init__(self, core, *names):
        super().__init__()
        self._core = core
        self._names = names

    def __missing__(self, dtype):
        suffix = _DATA_DTYPES[dtype][0]
        kernels = tuple(getattr(self._core, f"{name}_{suffix}") for name in self._names)
        self[dtype] = kernels
        return kernels


def _type_name(value) -> str:
    return type(value).__name__


def float_input(x, name: str) -> np.ndarray:
    """x as a C-contiguous array of a data dtype (float32, float64, float16, bfloat16).

    Strided or misaligned input (an address off its dtype's alignment, as a view at a byte
    offset of a buffer can be) is copied once, visibly here, to a contiguous array; the caller
    never writes to it. Any other dtype is a TypeError: normlab never converts data silently.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of {DATA_DTYPE_NAMES}, got {_type_name(x)}")
    dtype = x.dtype
    if dtype is not FLOAT32 and dtype is not FLOAT64 and not _known_dtype(dtype):
        raise TypeError(f"{name} must have dtype {DATA_DTYPE_NAMES}, got {dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d array")
    return x if usable_in_place(x) else x.copy()


def usable_in_place(a: np.ndarray) -> bool:
    """Whether the kernels can take `a` as it is: C-contiguous, and aligned to its dtype (they
    load whole elements; a misaligned one is undefined behaviour in C++)."""
    flags = a.flags
    return flags.c_contiguous and flags.aligned


def like_input(a, name: str, dtype: np.dtype, shape: tuple, why: str = "the dtype of x") -> np.ndarray:
    """a, which must be an array of `dtype` and `shape`, as a C-contiguous, aligned array."""
    if type(a) is np.ndarray and a.dtype is dtype and a.shape == shape and usable_in_place(a):
        return a
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of {dtype}, got {_type_name(a)}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} ({why}), got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a if usable_in_place(a) else a.copy()


def optional_like_input(a, name: str, dtype: np.dtype, shape: tuple):
    return None if a is None else like_input(a, name, dtype, shape)


def stat_input(a, name: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """A statistic (mean, rstd, invstd) for data of `dtype`: float32 for half data."""
    pdtype = _DATA_DTYPES[dtype][1]
    why = "the dtype of x" if pdtype is dtype else "statistics of half-precision data are float32"
    return like_input(a, name, pdtype, shape, why)


def param_input(a, name: str, dtype: np.dtype, shape: tuple):
    """weight or bias for data of `dtype`, as the kernel takes it, or None.

    float32/float64 data: an array of x's dtype. Half data (PyTorch's mixed rule): float32, or
    x's own half dtype, which is converted here, visibly, to a float32 copy of the C values.
    """
    if a is None:
        return None
    if (dtype is FLOAT32 or dtype is FLOAT64) and type(a) is np.ndarray and a.dtype is dtype \
            and a.shape == shape and usable_in_place(a):
        return a  # the common case, checked first
    pdtype = _DATA_DTYPES[dtype][1]
    if pdtype is dtype or not isinstance(a, np.ndarray) or a.dtype == pdtype:
        why = "the dtype of x" if pdtype is dtype else "or x's half-precision dtype"
        return like_input(a, name, pdtype, shape, why)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype float32 or {dtype} (the dtype of x), got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a.astype(FLOAT32)


def gradient_like(grad, weight):
    """dweight/dbias (computed as float32 for half data) in the dtype of the weight the caller
    passed: converted back when that weight was half."""
    if grad is None or weight is None or weight.dtype == grad.dtype:
        return grad
    return grad.astype(weight.dtype)


def output(out, name: str, dtype: np.dtype, shape: tuple, inputs: tuple) -> np.ndarray:
    """`out` after checking it can take the result in place (callers make new arrays)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or None, got {_type_name(out)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    flags = out.flags
    if not flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (results are never written to a hidden copy)")
    if not flags.aligned:
        raise ValueError(f"{name} must be aligned to its dtype's {out.dtype.alignment} bytes, got "
                         f"address {out.ctypes.data:#x} (results are never written to a hidden copy)")
    if not flags.writeable:
        raise ValueError(f"{name} is read-only")
    if inputs:
        overlapped = first_overlap(out, inputs)
        if overlapped is not None:
            raise ValueError(f"{name} must not overlap {overlapped}")
    return out


def positive_float(value, name: str) -> float:
    if type(value) is float and 0.0 < value < math.inf:
        return value
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)}") from None
    except OverflowError:
        raise OverflowError(f"{name} must be finite and > 0, got {value!r}, too large for a float") from None
    if not (v > 0.0 and v < math.inf):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def flag(value, name: str) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)}")
    return bool(value)


def trailing_axes(ndim: int, axis, name: str = "axis") -> int:
    """How many trailing axes `axis` (an int or a tuple of ints) names; validates it."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a tuple of ints, got bool")
    if isinstance(axis, (int, np.integer)):
        axes = (int(axis),)
    elif isinstance(axis, (tuple, list)) and axis and all(
        isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) for a in axis
    ):
        axes = tuple(int(a) for a in axis)
    else:
        raise TypeError(f"{name} must be an int or a non-empty tuple of ints, got {axis!r}")
    normalized = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name} {a} is out of bounds for an array of {ndim} dimensions")
        normalized.append(a % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name} repeats an axis: {axis!r}")
    count = len(normalized)
    if sorted(normalized) != list(range(ndim - count, ndim)):
        raise ValueError(
            f"{name} must name trailing axes (e.g. -1 or (-2, -1)) of an array of "
            f"{ndim} dimensions, got {axis!r}"
        )
    return count


def split_rows(shape: tuple, count: int, name: str = "axis"):
    """(rows, cols, leading shape, normalized shape) of normalizing the last `count` axes."""
    lead, normalized = shape[: len(shape) - count], shape[len(shape) - count :]
    cols = math.prod(normalized)
    if cols == 0:
        raise ValueError(f"the axes named by {name} have zero length {normalized}: nothing to normalize")
    return math.prod(lead), cols, lead, normalized


_row_split_cache: dict = {}


def row_split(shape: tuple, axis, name: str = "axis"):
    """split_rows() of normalizing the trailing axes `axis` names in an array of `shape`."""
    if type(axis) is int:
        key = (shape, axis)
        try:
            return _row_split_cache[key]
        except KeyError:
            pass
        result = split_rows(shape, trailing_axes(len(shape), axis, name), name)
        if len(_row_split_cache) >= 4096:
            _row_split_cache.clear()
        _row_split_cache[key] = result
        return result
    return split_rows(shape, trailing_axes(len(shape), axis, name), name)
