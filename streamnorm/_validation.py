"""Input checks shared by every public entry point.  Private."""

from __future__ import annotations

import numpy as np

_FLOATS = (np.float32, np.float64)


def as_float_array(x, name: str = "x") -> np.ndarray:
    """Return ``x`` as a float32 or float64 ndarray, copying only when it must.

    float32 and float64 arrays pass through untouched (any memory layout, read-only
    included).  Integer and boolean input is cast to float64, float16 to float32.
    Complex, object, string and other dtypes raise ``TypeError``.
    """
    a = np.asarray(x)
    dt = a.dtype
    if dt in _FLOATS:
        return a
    if dt == np.float16:
        return a.astype(np.float32)
    if dt.kind in "iub":
        return a.astype(np.float64)
    if dt.kind == "f":  # longdouble: statistics are float64 anyway
        return a.astype(np.float64)
    if dt.kind == "c":
        raise TypeError(f"{name} has complex dtype {dt}; streamnorm normalizes real data only")
    raise TypeError(f"{name} has dtype {dt}, which is not numeric; pass a float or integer array")


def as_param(value, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A float64 C-contiguous copy of a parameter or buffer, with its shape checked."""
    a = np.asarray(value)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} has dtype {a.dtype}; expected a real number array")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    return np.array(a, dtype=np.float64, order="C", copy=True)


def canonical_view(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` reshaped to ``shape`` without a copy when its strides allow, else copied once."""
    try:
        return x.reshape(shape, copy=False)
    except ValueError:
        return np.ascontiguousarray(x).reshape(shape)


def check_positive_float(value, name: str) -> float:
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_axis(ndim: int, axis) -> int:
    """A sample axis normalized to [0, ndim), or ValueError naming the problem."""
    if ndim == 0:
        raise ValueError("x must have at least one dimension when axis is given")
    ax = int(axis)
    if not -ndim <= ax < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    return ax % ndim
