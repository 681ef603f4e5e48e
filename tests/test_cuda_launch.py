"""The GPU backend's array views and direct kernel launch, checked without a GPU.

On a GPU, kernels take :class:`streamnorm._cuda.View` arguments and are launched with
the flat argument list numba-cuda itself would build (docs/gpu.rst, "Launch overhead").
Those are plain Python; this file checks them with a recorded launch in place of the
driver, so that the continuous integration, which has no GPU, covers them too.
"""

import ctypes

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="needs numba-cuda (streamnorm[cuda])")

from numba.core import types  # noqa: E402

from streamnorm import _cuda  # noqa: E402
from streamnorm._cuda import View  # noqa: E402

F4 = np.dtype(np.float32)
F8 = np.dtype(np.float64)


class _Owner:
    """Stands in for the array that owns the memory."""


def test_view_rows_slices_and_reshapes_address_the_right_bytes():
    owner = _Owner()
    v = View(1000, (3, 4), F4, owner)
    assert v.size == 12 and v.ndim == 2 and v.is_c_contiguous()
    row = v[2]
    assert (row.ptr, row.shape, row.owner) == (1000 + 2 * 4 * 4, (4,), owner)
    flat = v.reshape(12)
    assert flat.shape == (12,) and flat.ptr == 1000
    part = flat[3:7]
    assert (part.ptr, part.shape) == (1000 + 3 * 4, (4,))
    assert flat[10:20].shape == (2,) and flat[20:30].shape == (0,)
    assert v.reshape((2, 6)).shape == (2, 6) and v.reshape(2, 2, 3).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="12 values"):
        v.reshape(5, 3)
    with pytest.raises(IndexError, match="contiguous 1-D"):
        flat[::2]


def test_view_kernel_args_are_numbas_flattened_array():
    # meminfo, parent, size, itemsize, data pointer, shape..., strides in bytes...
    v = View(4096, (5, 3, 2), F8, None)
    assert v.kernel_args() == (0, 0, 30, 8, 4096, 5, 3, 2, 48, 16, 8)
    assert View(64, (7,), F4, None).kernel_args() == (0, 0, 7, 4, 64, 7, 4)


def test_view_array_interface_round_trips_through_view():
    v = View(2048, (6, 2), F4, None)
    cai = v.__cuda_array_interface__
    assert cai["data"] == (2048, False) and cai["shape"] == (6, 2) and cai["typestr"] == F4.str
    assert cai["strides"] is None and cai["version"] == 3
    w = _cuda._view(v)
    assert (w.ptr, w.shape, w.dtype, w.owner) == (2048, (6, 2), F4, v)


class _Foreign:
    """An array of some other library, seen through its ``__cuda_array_interface__``."""

    def __init__(self, shape, typestr="<f4", strides=None, ptr=512):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "strides": strides,
                                         "data": (ptr, False), "version": 3, "stream": None}


def test_foreign_arrays_are_viewed_without_a_copy_and_checked():
    a = _Foreign((4, 3))
    v = _cuda._view(a)
    assert (v.ptr, v.shape, v.dtype, v.owner) == (512, (4, 3), F4, a)
    # explicit C strides are fine, and a length-1 axis may carry any stride
    assert _cuda._view(_Foreign((4, 3), strides=(12, 4))).shape == (4, 3)
    assert _cuda._view(_Foreign((1, 3), strides=(999, 4))).shape == (1, 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        _cuda._view(_Foreign((4, 3), strides=(4, 16)), "weight")
    if not _cuda.SIMULATOR:  # the simulator refuses real GPU arrays outright
        with pytest.raises(TypeError, match="int32"):
            _cuda.as_device(_Foreign((4,), typestr="<i4"), "x")


def test_scalar_slots_follow_the_array_arguments():
    x, w = View(0, (8, 4), F4, None), View(0, (4,), F8, None)
    sig = (types.Array(types.float32, 2, "C"), types.float64, types.boolean, types.Array(types.float64, 1, "C"),
           types.int64, types.float32)
    slots = _cuda._scalar_slots((x, 1.5, True, w, 3, 2.0), sig)
    # x takes 5 + 2·2 positions, w 5 + 2·1
    assert [(p, c) for p, c in slots] == [(9, ctypes.c_double), (10, bool), (18, ctypes.c_int64), (19, ctypes.c_float)]
    with pytest.raises(TypeError, match="unsupported"):
        _cuda._scalar_slots(("a",), (types.unicode_type,), "k")


def _double(x, out, k):  # a kernel body; it is never compiled here
    pass


def test_direct_launch_passes_the_flat_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(_cuda, "_FAST_LAUNCH", True)
    monkeypatch.setattr(_cuda, "_STREAM", "stream")
    monkeypatch.setattr(_cuda, "_config", lambda cfg: ("config", cfg))
    monkeypatch.setattr(_cuda, "_core_launch", lambda *a: calls.append(a), raising=False)
    kernel = _cuda._Kernel(_double)
    compiled = []

    def compile_(args):
        sig = tuple(types.Array(types.float32, a.ndim, "C") if type(a) is View else types.float64 for a in args)
        compiled.append(sig)
        return "driver-kernel", _cuda._scalar_slots(args, sig)

    monkeypatch.setattr(kernel, "_compile", compile_)
    x, out = View(256, (2, 3), F4, None), View(1024, (2, 3), F4, None)
    kernel._launch((4, 32), x, out, 2.5)
    kernel._launch((4, 32), x.reshape(6).reshape(2, 3), out, 3)  # same signature: compiled once
    assert len(compiled) == 1
    stream, config, driver_kernel, *flat = calls[0]
    assert (stream, config, driver_kernel) == ("stream", ("config", (4, 32)), "driver-kernel")
    assert flat[:9] == [0, 0, 6, 4, 256, 2, 3, 12, 4] and flat[9:18] == [0, 0, 6, 4, 1024, 2, 3, 12, 4]
    assert isinstance(flat[18], ctypes.c_double) and flat[18].value == 2.5
    assert isinstance(calls[1][-1], ctypes.c_double) and calls[1][-1].value == 3.0
    kernel._launch((1, 8), View(0, (6,), F4, None), out, 1.0)  # another rank: compiled anew
    assert len(compiled) == 2
