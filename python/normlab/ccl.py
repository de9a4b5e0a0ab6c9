"""Connected-component labelling of 2-D images: label, component_stats, largest_component,
remove_small_components.

Numbering and statistics follow the peers users compare with:

* labels are 1..count in raster (row-major) order of each component's first pixel, 0 for the
  background: exactly ``scipy.ndimage.label``'s output (connectivity 8: a 3x3 square structure;
  4: scipy's default cross);
* statistics are a table indexed by label with row 0 the background, as
  ``cv2.connectedComponentsWithStats``: ``area`` (int64, shape (count+1,)), ``bbox`` (int64,
  (count+1, 4): top, left, bottom, right, bottom/right exclusive) and ``centroid`` (float64,
  (count+1, 2): mean row, mean column). Row 0 describes the background pixels; when there are
  none it is area 0, bbox (0, 0, 0, 0) and centroid (nan, nan) (OpenCV leaves garbage there).

Data handling:

* The image is any 2-D array of bool or integer dtype, read in place whatever its layout
  (C, Fortran, sliced, negative strides, non-native byte order): it is never copied, except
  an image whose address is off its dtype's alignment (a view at an odd byte offset of a
  buffer), copied once.
  A pixel is foreground when it differs from ``background``.
* Outputs are new C-contiguous arrays or ``out=``, which must be C-contiguous, aligned,
  writeable and of the right dtype and shape; nothing is written to a temporary and copied back.
* Algorithm: run-based two-pass union-find (see cpp/src/ccl/label.cpp): rows become foreground
  bitmasks (SIMD), runs are provisional labels united with the smaller index as root, row
  stripes run in parallel and are merged at their borders. Extra memory is O(runs), never a
  second image. Results are identical for every thread count and SIMD target.
* The GIL is released while the kernel runs (for all but tiny images).
"""

from __future__ import annotations

import operator

import numpy as np

from . import _core
from ._checks import _type_name, output, usable_in_place
from ._checks import flag as _flag

__all__ = ["label", "component_stats", "largest_component", "remove_small_components"]

LABEL_DTYPES = tuple(np.dtype(t) for t in (np.uint16, np.uint32, np.int32, np.int64, np.uint64))
_INT32_LIMIT = 2**31 - 1


class ImageDimensionError(TypeError, ValueError):
    """The image is not 2-D (a TypeError for the issue's contract, a ValueError for NumPy's)."""


def _image(image, name: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a 2-D numpy.ndarray of bool or integer dtype, "
                        f"got {_type_name(image)}")
    if image.dtype.kind not in "biu":
        raise TypeError(f"{name} must have a bool or integer dtype, got {image.dtype}")
    if image.ndim != 2:
        raise ImageDimensionError(f"{name} must be 2-D, got {image.ndim}-D with shape {image.shape}")
    if not image.flags.aligned:  # pixels off their dtype's alignment: copied once, visibly here
        return image.copy()
    return image


def _background_bits(image: np.ndarray, background) -> int:
    """The raw bit pattern of background in image's dtype (and byte order)."""
    if isinstance(background, (bool, np.bool_)):
        value = int(background)
    else:
        try:
            value = operator.index(background)
        except TypeError:
            raise TypeError(f"background must be an int (or bool), got {_type_name(background)}") from None
    dtype = image.dtype
    if dtype.kind == "b":
        if value not in (0, 1):
            raise ValueError(f"background must be 0/False or 1/True for a bool image, got {background!r}")
    else:
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ValueError(f"background {value} is out of range for an image of dtype {dtype} "
                             f"[{info.min}, {info.max}]")
    raw = np.array(value, dtype=dtype).reshape(1)
    return int(raw.view(f"u{dtype.itemsize}")[0])


def _connectivity(connectivity) -> int:
    if isinstance(connectivity, (bool, np.bool_)):
        raise TypeError("connectivity must be the int 4 or 8, got bool")
    try:
        c = operator.index(connectivity)
    except TypeError:
        raise TypeError(f"connectivity must be the int 4 or 8, got {_type_name(connectivity)}") from None
    if c not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {c}")
    return c


def _label_dtype(dtype, image: np.ndarray, out) -> np.dtype:
    if dtype is None:
        if out is not None and isinstance(out, np.ndarray) and out.dtype in LABEL_DTYPES:
            return out.dtype
        return np.dtype(np.int64 if image.size >= _INT32_LIMIT else np.int32)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a NumPy integer dtype (uint16, uint32, int32, int64 or "
                        f"uint64), got {dtype!r}") from None
    if dt not in LABEL_DTYPES or not dt.isnative:
        raise TypeError(f"dtype must be one of uint16, uint32, int32, int64, uint64, got {dt}")
    return dt


def _output(out, name: str, dtype: np.dtype, shape: tuple, image: np.ndarray,
            allow_same: bool = False) -> np.ndarray:
    output(out, name, dtype, shape, ())
    if np.may_share_memory(out, image):
        same = (allow_same and image.flags.c_contiguous and out.dtype == image.dtype
                and out.__array_interface__["data"][0] == image.__array_interface__["data"][0])
        if not same:
            raise ValueError(f"{name} must not overlap image" +
                             (" (except being the image itself, C-contiguous)" if allow_same else ""))
    return out


def label(image, connectivity=8, *, background=0, dtype=None, out=None, return_stats=False):
    """Label the connected components of a 2-D image.

    Parameters
    ----------
    image : 2-D ndarray of bool or any integer dtype, any layout (read in place)
        Pixels that differ from ``background`` are foreground.
    connectivity : 4 or 8
        8: pixels touching by an edge or a corner are connected; 4: by an edge only.
    background : int or bool
        The background value, representable in image's dtype (default 0).
    dtype : uint16, uint32, int32, int64 or uint64, optional
        Label dtype. Default: ``out.dtype`` when ``out`` is given, else int32 (int64 for images
        of 2**31 - 1 pixels or more). A count that does not fit raises OverflowError (labels
        never wrap; ``out`` is then left untouched).
    out : ndarray, optional
        C-contiguous, writeable, image's shape, the label dtype; must not overlap the image.
    return_stats : bool
        Also return the statistics table (see ``component_stats``), computed from the runs the
        labelling found, not from a second pass over the image.

    Returns
    -------
    (labels, count) or (labels, count, stats)
        labels: 1..count in raster order of each component's first pixel, 0 for the background
        (identical to ``scipy.ndimage.label``); count: a Python int.
    """
    image = _image(image)
    conn = _connectivity(connectivity)
    bits = _background_bits(image, background)
    want_stats = _flag(return_stats, "return_stats")
    dt = _label_dtype(dtype, image, out)
    if out is None:
        labels = _core.empty_result(image.shape, dt)
    else:
        labels = _output(out, "out", dt, image.shape, image)
    count, stats = _core.ccl_label(image, bits, conn, labels, want_stats)
    if want_stats:
        return labels, count, stats
    return labels, count


def component_stats(labels, count=None):
    """Statistics of each label of a label image, as ``cv2.connectedComponentsWithStats``.

    Parameters
    ----------
    labels : 2-D ndarray of integer dtype
        Values in [0, count]; 0 is the background. A non-C-contiguous or misaligned array is
        copied once.
    count : int, optional
        The number of labels (default: ``labels.max()``, 0 for an empty image).

    Returns
    -------
    dict of ndarrays indexed by label, row 0 the background:
        ``area`` int64 (count+1,); ``bbox`` int64 (count+1, 4): top, left, bottom, right
        (bottom/right exclusive); ``centroid`` float64 (count+1, 2): mean row, mean column.
        A label with no pixel (the background when there is none, or a gap in the numbering)
        gets area 0, bbox (0, 0, 0, 0) and centroid (nan, nan).
    """
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a 2-D numpy.ndarray of integer dtype, got {_type_name(labels)}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 2:
        raise ImageDimensionError(f"labels must be 2-D, got {labels.ndim}-D with shape {labels.shape}")
    if not labels.dtype.isnative:
        labels = labels.astype(labels.dtype.newbyteorder("="))
    if not usable_in_place(labels):
        labels = labels.copy()
    if count is None:
        count = int(labels.max()) if labels.size else 0
        if count < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    else:
        if isinstance(count, (bool, np.bool_)):
            raise TypeError("count must be an int, got bool")
        try:
            count = operator.index(count)
        except TypeError:
            raise TypeError(f"count must be an int or None, got {_type_name(count)}") from None
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
    if count > np.iinfo(np.int64).max:
        raise ValueError(f"count {count} exceeds the number of pixels")
    return _core.ccl_component_stats(labels, count)


def largest_component(image, connectivity=8, *, background=0, out=None):
    """A bool mask of the largest connected component of ``image``.

    Ties go to the component with the lowest label (first in raster order). Without foreground
    the mask is all False. ``image``, ``connectivity`` and ``background`` are as in ``label``;
    ``out`` is an optional C-contiguous, writeable bool array of the image's shape.
    """
    image = _image(image)
    conn = _connectivity(connectivity)
    bits = _background_bits(image, background)
    dt = np.dtype(bool)
    mask = _core.empty_result(image.shape, dt) if out is None else _output(out, "out", dt, image.shape, image)
    _core.ccl_largest_component(image, bits, conn, mask)
    return mask


def remove_small_components(image, min_size, connectivity=8, *, background=0, out=None):
    """``image`` with every component of fewer than ``min_size`` pixels set to ``background``.

    Other pixels keep their values. Returns a new C-contiguous array of image's dtype and shape,
    or ``out`` (C-contiguous, writeable, image's dtype and shape). ``out`` may be the image
    itself when the image is C-contiguous (filtering in place); it must not overlap it otherwise.
    """
    image = _image(image)
    if isinstance(min_size, (bool, np.bool_)):
        raise TypeError("min_size must be an int, got bool")
    try:
        min_size = operator.index(min_size)
    except TypeError:
        raise TypeError(f"min_size must be an int, got {_type_name(min_size)}") from None
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    min_size = min(min_size, 2**62)
    conn = _connectivity(connectivity)
    bits = _background_bits(image, background)
    if out is None:
        result = _core.empty_result(image.shape, image.dtype)
    else:
        result = _output(out, "out", image.dtype, image.shape, image, allow_same=True)
    _core.ccl_remove_small_components(image, bits, min_size, conn, result)
    return result
