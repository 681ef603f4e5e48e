"""Where an array lives, host memory or an NVIDIA GPU, and the few per-channel operations
the layers need on both.  Private.

This module never imports numba.cuda: it recognizes GPU arrays by the
``__cuda_array_interface__`` protocol (CuPy arrays, PyTorch CUDA tensors, numba device
arrays) or as numba's simulated device arrays, and loads :mod:`streamnorm._cuda` on the
first GPU input.
"""

from __future__ import annotations

import numpy as np

from ._validation import as_float_array


def is_device(x) -> bool:
    """True for an array in GPU memory (or a CUDA-simulator device array)."""
    t = type(x)
    if t is np.ndarray:
        return False
    if hasattr(x, "__cuda_array_interface__"):
        return True
    return t.__name__ == "FakeCUDAArray" and t.__module__.startswith("numba.cuda.simulator")


def gpu():
    """The CUDA backend module, imported on first use."""
    from . import _cuda

    return _cuda


def as_input(x, name: str = "x"):
    """A GPU array unchanged (its backend checks it), anything else as a float ndarray."""
    return x if is_device(x) else as_float_array(x, name)


def device_name(x) -> str:
    return "GPU" if is_device(x) else "host"


def copy(a):
    if is_device(a):
        C = gpu()
        return C.like(a, C.copy(C.as_device(a, float_only=False), a))
    return a.copy()


def to_host(a) -> np.ndarray:
    """A host NumPy copy of ``a`` (a copy for host arrays too)."""
    return gpu().to_host(a) if is_device(a) else np.array(a, copy=True)


def to_device(a, like=None):
    """``a`` (host or GPU) copied to the GPU, as the kind of array ``like`` is (numba
    device array by default)."""
    C = gpu()
    d = C.copy(C.as_device(a, float_only=False), like) if is_device(a) else C.to_device(np.asarray(a), like)
    return C.like(like, d)


def as_kind(a, like):
    """Device array ``a`` as the same kind of array as ``like`` (no copy)."""
    C = gpu()
    return C.like(like, C.as_device(a, float_only=False))


def lerp(a, b, fa: float, fs: float, k: float = 1.0):
    """A new vector ``fa·a + fs·(b·k)``: the running-statistics update, on either side."""
    if is_device(a):
        C = gpu()
        return C.like(a, C.lerp(C.as_device(a), C.as_device(b), fa, fs, k))
    return fa * a + fs * (b * k)
