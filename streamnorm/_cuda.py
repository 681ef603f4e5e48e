"""numba.cuda kernels and their launchers.  Private; the only module that imports numba.cuda.

The public API reaches this module through :mod:`streamnorm._backend` when an input
lives on an NVIDIA GPU (it has ``__cuda_array_interface__``).  Kernels take
:class:`View` arguments (address, shape, dtype, owner) on a GPU and numba's simulated
arrays under the simulator; CuPy arrays, PyTorch tensors and numba device arrays are
viewed once per call, without a copy.

Conventions (the same as the CPU kernels, docs/gpu.rst):

* Statistics accumulate in float64 whatever the input dtype.  A thread folds its values
  in with Welford's update (or four values at a time as one exact four-value state),
  threads of a block merge their states with Chan's formula, and the blocks' states are
  merged with Chan's formula again.  The scalar formulas are the very functions the CPU backend compiles
  (:mod:`streamnorm._welford`).
* Reductions go through shared memory, plus warp shuffles in the row kernels on a real
  GPU; under numba's CUDA simulator, which has no shuffles, the same kernels use
  shared-memory trees only, so the simulator runs every kernel.
* Column statistics merge the blocks' states in the last block to finish (an atomic
  arrival count), so a statistics pass is one launch.
* Per-channel and per-row vectors (statistics, parameters, gradients) stay on the device;
  no call synchronizes with the host except where a result must reach the host
  (:class:`~streamnorm.RunningStats` keeps its state in host memory).

numpy 2.5 removed ``np.row_stack``, which numba-cuda 0.30 still references when it
compiles a kernel; the alias is restored (as ``np.vstack``, which it always was) before
numba.cuda is imported.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import threading

import numpy as np

if not hasattr(np, "row_stack"):  # numpy >= 2.5 with numba-cuda <= 0.30
    np.row_stack = np.vstack

try:
    import numba
    from numba import cuda
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "GPU input needs numba's CUDA target: install streamnorm[cuda] (numba-cuda) "
        "and an NVIDIA driver, or run with NUMBA_ENABLE_CUDASIM=1 for the simulator"
    ) from exc

from ._welford import chan_merge, welford_add

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

# Block shapes.  The simulator runs every thread in Python, so it gets tiny blocks; the
# kernels are correct for any power-of-two sizes.
if SIMULATOR:
    TPB, BX, BY, TARGET_BLOCKS, SEGS = 8, 4, 2, 4, 4
else:  # pragma: no cover - needs a GPU
    TPB, BX, BY, TARGET_BLOCKS, SEGS = 256, 32, 8, 1024, 16

F8 = numba.float64
_chan = cuda.jit(device=True)(chan_merge)
_welford = cuda.jit(device=True)(welford_add)

# ---------------------------------------------------------------------------
# Launching.  numba-cuda's own launch makes a device-array object per array argument
# and type-checks every argument on every call: tens of microseconds per kernel, which
# is most of the time of a call at medium sizes.  On a GPU, kernels here take View
# arguments (below) and, once compiled for a signature, go straight to the driver with
# the arguments numba-cuda itself would pass.  If numba-cuda's internals differ from
# what this expects, the regular launch is used instead.
# ---------------------------------------------------------------------------

_FAST_LAUNCH = False
if not SIMULATOR:  # pragma: no cover - needs a GPU
    try:
        from cuda.core import LaunchConfig as _LaunchConfig
        from cuda.core import launch as _core_launch
        from numba.cuda.cudadrv import driver as _driver

        try:
            from numba.cuda._compat import CUDA_CORE_GE_1_0 as _CORE_GE_1
        except ImportError:
            _CORE_GE_1 = True
        _FAST_LAUNCH = hasattr(_driver, "_to_core_stream")
    except ImportError:
        pass

_STREAM = None
_CONFIGS: dict = {}


def _config(cfg):  # pragma: no cover - needs a GPU
    c = _CONFIGS.get(cfg)
    if c is None:
        grid, block = cfg
        if _CORE_GE_1:
            c = _LaunchConfig(grid=grid, block=block, shmem_size=0, is_cooperative=False)
        else:
            c = _LaunchConfig(grid=grid, block=block, shmem_size=0, cooperative_launch=False)
        _CONFIGS[cfg] = c
    return c


def _scalar_slots(args, sig, name: str = "kernel") -> list:
    """[(position in the flat argument list, converter)] for the scalar arguments of a
    kernel compiled for ``sig`` (one numba type per argument).  An array argument takes
    5 + 2·ndim positions (see :meth:`View.kernel_args`); a scalar one, converted to the
    C type it was compiled for."""
    slots, pos = [], 0
    for a, ty in zip(args, sig):
        if type(a) is View:
            pos += 5 + 2 * len(a.shape)
            continue
        t = str(ty)
        if t == "bool":
            conv = bool
        elif t == "float64":
            conv = ctypes.c_double
        elif t == "float32":
            conv = ctypes.c_float
        elif t.startswith(("int", "uint")):
            conv = getattr(ctypes, "c_" + t)
        else:
            raise TypeError(f"{name}: unsupported kernel argument {a!r} of type {t}")
        slots.append((pos, conv))
        pos += 1
    return slots


class _Kernel:
    """A numba CUDA kernel, launched as ``kernel[grid, block](*args)``."""

    def __init__(self, fn):
        self.dispatcher = cuda.jit(fn)
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: dict = {}

    def __getitem__(self, cfg):
        if SIMULATOR:
            return self.dispatcher[cfg]
        return functools.partial(self._launch, cfg)  # pragma: no cover - needs a GPU

    def _compile(self, args):  # pragma: no cover - needs a GPU
        """(driver kernel, scalar slots) for the types of ``args``."""
        d = self.dispatcher
        sig = tuple(d.typeof_pyval(a.numba() if type(a) is View else a) for a in args)
        kernel = d.compile(sig)
        return kernel._codelibrary.get_cufunc().kernel, _scalar_slots(args, sig, self.__name__)

    def _launch(self, cfg, *args):
        global _STREAM
        if not _FAST_LAUNCH:  # pragma: no cover - needs a GPU
            return self.dispatcher[cfg](*[a.numba() if type(a) is View else a for a in args])
        # one pass: the flat argument list, and the array dtypes and ranks that pick the
        # compiled version (scalars are converted to the types it was compiled for)
        kargs: list = []
        key: list = []
        for a in args:
            if type(a) is View:
                key.append(a.dtype.char)
                key.append(len(a.shape))
                k = a._args
                kargs.extend(k if k is not None else a.kernel_args())
            else:
                kargs.append(a)
        key = tuple(key)
        entry = self._compiled.get(key)
        if entry is None:
            entry = self._compiled[key] = self._compile(args)
        kernel, slots = entry
        for i, conv in slots:
            kargs[i] = conv(kargs[i])
        if _STREAM is None:  # pragma: no cover - needs a GPU
            _STREAM = _driver._to_core_stream(0)
        _core_launch(_STREAM, _config(cfg), kernel, *kargs)


# ---------------------------------------------------------------------------
# Arrays: conversion, allocation, and handing results back in the caller's kind
# ---------------------------------------------------------------------------


def _is_simulated(x) -> bool:
    t = type(x)
    return t.__name__ == "FakeCUDAArray" and t.__module__.startswith("numba.cuda.simulator")


_DTYPES: dict = {}


class View:
    """A C-contiguous array in GPU memory, described by its address, shape and dtype.

    This is what the kernels take on a real GPU.  Making one costs a Python object, where
    a numba device array costs several CUDA driver calls; with the launcher below it
    keeps the host work per call small (docs/gpu.rst, "Launch overhead").  ``owner`` is
    the object that owns the memory (a CuPy array, a PyTorch tensor or a numba device
    array): the view keeps it alive.  Under the simulator numba's own arrays are used.
    """

    __slots__ = ("ptr", "shape", "dtype", "owner", "size", "_args")

    def __init__(self, ptr: int, shape: tuple, dtype, owner):
        self.ptr = ptr
        self.shape = shape
        self.dtype = dtype
        self.owner = owner
        n = 1
        for s in shape:
            n *= s
        self.size = n
        self._args = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_c_contiguous(self) -> bool:
        return True

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], tuple):
            shape = shape[0]
        shape = tuple(int(s) for s in shape)
        n = 1
        for s in shape:
            n *= s
        if n != self.size:
            raise ValueError(f"cannot reshape a GPU array of {self.size} values to {shape}")
        return View(self.ptr, shape, self.dtype, self.owner)

    def __getitem__(self, i):
        """``a[i]`` (one index along the first axis) or ``a[start:stop]`` of a 1-D view."""
        if isinstance(i, slice):
            start, stop, step = i.indices(self.shape[0])
            if step != 1 or self.ndim != 1:
                raise IndexError("GPU views take contiguous 1-D slices only")
            return View(self.ptr + start * self.dtype.itemsize, (max(0, stop - start),), self.dtype, self.owner)
        row = self.size // self.shape[0]
        return View(self.ptr + int(i) * row * self.dtype.itemsize, self.shape[1:], self.dtype, self.owner)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "strides": None, "data": (self.ptr, False), "typestr": self.dtype.str,
                "version": 3, "stream": None}

    def kernel_args(self) -> tuple:
        """The flattened argument a numba kernel takes for an array (see numba-cuda's launch)."""
        a = self._args
        if a is None:
            its = self.dtype.itemsize
            strides, acc = [], its
            for s in reversed(self.shape):
                strides.append(acc)
                acc *= s
            a = self._args = (0, 0, self.size, its, self.ptr, *self.shape, *reversed(strides))
        return a

    def numba(self):
        """This memory as a numba device array (the owner itself when it is one)."""
        o = self.owner
        if type(o).__name__ == "DeviceNDArray" and tuple(o.shape) == self.shape and o.dtype == self.dtype:
            if o.__cuda_array_interface__["data"][0] == self.ptr:
                return o
        return cuda.from_cuda_array_interface(self.__cuda_array_interface__, owner=self, sync=False)

    def copy_to_host(self) -> np.ndarray:
        return self.numba().copy_to_host()


def _view(obj, name: str = "x") -> View:
    """A :class:`View` of any object with ``__cuda_array_interface__`` (no copy)."""
    cai = obj.__cuda_array_interface__
    typestr = cai["typestr"]
    dtype = _DTYPES.get(typestr)
    if dtype is None:
        dtype = _DTYPES[typestr] = np.dtype(typestr)
    shape = tuple(int(s) for s in cai["shape"])
    strides = cai.get("strides")
    if strides is not None:
        acc = dtype.itemsize
        for s, st in zip(reversed(shape), reversed(strides)):
            if s > 1 and st != acc:
                raise ValueError(
                    f"{name} on the GPU must be C-contiguous (make it so once, e.g. .contiguous() or "
                    "cupy.ascontiguousarray)"
                )
            acc *= s
    if cai.get("mask") is not None:
        raise ValueError(f"{name} is a masked GPU array; streamnorm takes plain arrays")
    # Work is queued on the legacy default stream, which is ordered after every blocking
    # stream: only an array produced on another stream needs the host to wait for it.
    stream = cai.get("stream")
    if stream not in (None, 1):
        cuda.external_stream(stream).synchronize()
    return View(int(cai["data"][0] or 0), shape, dtype, obj)


def as_device(x, name: str = "x", float_only: bool = True):
    """A view of GPU array ``x`` for the kernels (no copy), with dtype and layout checked.

    GPU input must be float32 or float64 and C-contiguous: anything else would need a
    copy per call, so it raises instead and says what to do.
    """
    if type(x) is View:
        d = x
    elif _is_simulated(x):
        d = x
        if d.size and not d.is_c_contiguous():
            raise ValueError(
                f"{name} on the GPU must be C-contiguous (make it so once, e.g. .contiguous() or "
                "cupy.ascontiguousarray)"
            )
    elif SIMULATOR:
        raise TypeError(f"{name} is a real GPU array, but numba's CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1)")
    else:  # pragma: no cover - needs a GPU
        d = _view(x, name)
    if float_only and d.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} on the GPU has dtype {d.dtype}; streamnorm's GPU kernels take float32 or float64")
    return d


def _wrap(devarray):
    """A kernel argument for a numba device array this module allocated."""
    if SIMULATOR:
        return devarray
    return View(int(devarray.device_ctypes_pointer.value or 0), tuple(devarray.shape), devarray.dtype,
                devarray)  # pragma: no cover - needs a GPU


def like(template, d):
    """Internal array ``d`` as the kind of array ``template`` is (CuPy, PyTorch, numba;
    numba for ``None``), without a copy."""
    mod = type(template).__module__.split(".")[0]
    if type(d) is not View:  # simulator arrays
        return d
    owner = d.owner
    if mod in ("cupy", "torch") and type(owner).__module__.split(".")[0] == mod:  # pragma: no cover - needs a GPU
        if mod == "torch":
            same = owner.data_ptr() == d.ptr and owner.dtype == getattr(sys.modules["torch"], d.dtype.name)
        else:
            same = owner.data.ptr == d.ptr and owner.dtype == d.dtype
        if same and tuple(owner.shape) == d.shape:
            return owner
    if mod == "cupy":  # pragma: no cover - needs a GPU
        return sys.modules["cupy"].asarray(d)
    if mod == "torch":  # pragma: no cover - needs a GPU
        return sys.modules["torch"].as_tensor(d, device=template.device)
    return d.numba()  # pragma: no cover - needs a GPU


def empty(shape, dtype=np.float64):
    return _wrap(cuda.device_array(shape, dtype=dtype))


def output(template, shape, dtype):
    """A new array for a result: ``(object handed to the caller, view of it)``.

    It is allocated by the library the template comes from, so PyTorch and CuPy users
    get their caching allocators (and their own array type back, without a copy).
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    mod = type(template).__module__.split(".")[0]
    if mod == "torch":  # pragma: no cover - needs a GPU
        torch = sys.modules["torch"]
        obj = torch.empty(shape, dtype=getattr(torch, dtype.name), device=template.device)
        return obj, View(obj.data_ptr(), shape, dtype, obj)
    if mod == "cupy":  # pragma: no cover - needs a GPU
        with sys.modules["cupy"].cuda.Device(template.device.id):
            obj = sys.modules["cupy"].empty(shape, dtype=dtype)
        return obj, View(obj.data.ptr, shape, dtype, obj)
    obj = cuda.device_array(shape, dtype=dtype)
    return obj, _wrap(obj)


def vectors(template, k: int, n: int):
    """k float64 vectors of length n in one allocation: (caller's kinds, views)."""
    obj, d = output(template, (k, n), np.float64)
    return [obj[i] for i in range(k)], [d[i] for i in range(k)]


_SCRATCH = threading.local()


def scratch(*shapes):
    """float64 work arrays that live only within one call, carved from a per-thread buffer.

    Kernels run in stream order, so a later call reuses the buffer only after every
    kernel of the earlier call that reads it has run.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    need = max(1, sum(sizes))
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < need:
        buf = _SCRATCH.buf = empty(max(need, 2 * (0 if buf is None else buf.size)))
    out, o = [], 0
    for shp, sz in zip(shapes, sizes):
        out.append(buf[o : o + sz].reshape(*shp) if sz else empty(shp))
        o += sz
    return out


def zeros(shape, dtype=np.float64):
    return _wrap(cuda.to_device(np.zeros(shape, dtype=dtype)))


def to_device(a: np.ndarray, template=None):
    """Host array ``a`` copied to a new device array of ``template``'s kind; returns its view."""
    a = np.ascontiguousarray(a)
    obj, d = output(template, a.shape, a.dtype)
    if a.size:
        (obj if type(d) is not View else d.numba()).copy_to_device(a)
    return d


def to_host(d) -> np.ndarray:
    return as_device(d, float_only=False).copy_to_host()


def copy(d, template=None):
    """A new device copy of view ``d``, allocated as the kind of array ``template`` is."""
    out = output(template, d.shape, d.dtype)[1]
    n = d.size
    if n:
        _k_copy[_blocks(n, TPB), TPB](_flat(d), _flat(out))
    return out


def _flat(d):
    return d.reshape(d.size)


_DUMMY: dict = {}


def _dummy():
    """A one-value float64 device array standing in for an absent optional vector."""
    if "v" not in _DUMMY:
        _DUMMY["v"] = zeros(1)
    return _DUMMY["v"]


def _opt(v):
    return (_dummy(), False) if v is None else (v, True)


def _blocks(n: int, per: int) -> int:
    return max(1, -(-n // per))


def _split(work: int, other_blocks: int, min_per: int) -> tuple[int, int]:
    """(parts, span): split ``work`` items into parts so the grid has about TARGET_BLOCKS blocks."""
    parts = max(1, min(_blocks(work, min_per), _blocks(TARGET_BLOCKS, other_blocks)))
    span = _blocks(work, parts)
    return _blocks(work, span), span


# ---------------------------------------------------------------------------
# Shared-memory tree reductions (device functions)
# ---------------------------------------------------------------------------


@cuda.jit(device=True)
def _tree_chan(sn, smu, sm2, t):
    """Chan-merge the states in sn/smu/sm2[:TPB] into index 0; all threads call it."""
    s = TPB // 2
    while s > 0:
        if t < s:
            n, m, m2 = _chan(sn[t], smu[t], sm2[t], sn[t + s], smu[t + s], sm2[t + s])
            sn[t] = n
            smu[t] = m
            sm2[t] = m2
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True)
def _tree_sum(acc, k, t):
    """Sum the rows acc[0:k, :TPB] into column 0; all threads call it."""
    s = TPB // 2
    while s > 0:
        if t < s:
            for q in range(k):
                acc[q, t] += acc[q, t + s]
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True)
def _tree_chan_y(sn, smu, sm2, ty, tx):
    s = BY // 2
    while s > 0:
        if ty < s:
            n, m, m2 = _chan(sn[ty, tx], smu[ty, tx], sm2[ty, tx], sn[ty + s, tx], smu[ty + s, tx], sm2[ty + s, tx])
            sn[ty, tx] = n
            smu[ty, tx] = m
            sm2[ty, tx] = m2
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True)
def _tree_sum_y(acc, k, ty, tx):
    """Sum acc[0:k, :, tx] over its second axis (a power of two long) into acc[0:k, 0, tx]."""
    s = acc.shape[1] // 2
    while s > 0:
        if ty < s:
            for q in range(k):
                acc[q, ty, tx] += acc[q, ty + s, tx]
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True)
def _block_chan_tree(n, mu, m2, t, sn, smu, sm2):
    """The Chan merge of every thread's state, returned to all threads (shared-memory tree)."""
    sn[t] = n
    smu[t] = mu
    sm2[t] = m2
    cuda.syncthreads()
    _tree_chan(sn, smu, sm2, t)
    return sn[0], smu[0], sm2[0]


@cuda.jit(device=True)
def _block_sum2_tree(a1, a2, t, acc):
    """The block sums of a1 and a2, returned to all threads (shared-memory tree)."""
    acc[0, t] = a1
    acc[1, t] = a2
    cuda.syncthreads()
    _tree_sum(acc, 2, t)
    return acc[0, 0], acc[1, 0]


@cuda.jit(device=True)
def _warp_chan(n, mu, m2):
    off = 16
    while off > 0:
        n2 = cuda.shfl_down_sync(0xFFFFFFFF, n, off)
        mu2 = cuda.shfl_down_sync(0xFFFFFFFF, mu, off)
        q2 = cuda.shfl_down_sync(0xFFFFFFFF, m2, off)
        n, mu, m2 = _chan(n, mu, m2, n2, mu2, q2)
        off //= 2
    return n, mu, m2


@cuda.jit(device=True)
def _block_chan_shfl(n, mu, m2, t, sn, smu, sm2):  # pragma: no cover - needs a GPU
    """As _block_chan_tree, with warp shuffles: two block barriers instead of log2(TPB)."""
    n, mu, m2 = _warp_chan(n, mu, m2)
    lane = t % 32
    wid = t // 32
    if lane == 0:
        sn[wid] = n
        smu[wid] = mu
        sm2[wid] = m2
    cuda.syncthreads()
    if wid == 0:
        n = 0.0
        mu = 0.0
        m2 = 0.0
        if lane < TPB // 32:
            n = sn[lane]
            mu = smu[lane]
            m2 = sm2[lane]
        n, mu, m2 = _warp_chan(n, mu, m2)
        if lane == 0:
            sn[TPB - 1] = n
            smu[TPB - 1] = mu
            sm2[TPB - 1] = m2
    cuda.syncthreads()
    return sn[TPB - 1], smu[TPB - 1], sm2[TPB - 1]


@cuda.jit(device=True)
def _warp_sum2(a1, a2):
    off = 16
    while off > 0:
        a1 += cuda.shfl_down_sync(0xFFFFFFFF, a1, off)
        a2 += cuda.shfl_down_sync(0xFFFFFFFF, a2, off)
        off //= 2
    return a1, a2


@cuda.jit(device=True)
def _block_sum2_shfl(a1, a2, t, acc):  # pragma: no cover - needs a GPU
    """As _block_sum2_tree, with warp shuffles."""
    a1, a2 = _warp_sum2(a1, a2)
    lane = t % 32
    wid = t // 32
    if lane == 0:
        acc[0, wid] = a1
        acc[1, wid] = a2
    cuda.syncthreads()
    if wid == 0:
        a1 = 0.0
        a2 = 0.0
        if lane < TPB // 32:
            a1 = acc[0, lane]
            a2 = acc[1, lane]
        a1, a2 = _warp_sum2(a1, a2)
        if lane == 0:
            acc[0, TPB - 1] = a1
            acc[1, TPB - 1] = a2
    cuda.syncthreads()
    return acc[0, TPB - 1], acc[1, TPB - 1]


# numba's simulator has no warp shuffles: there the trees run through shared memory only
_block_chan = _block_chan_tree if SIMULATOR else _block_chan_shfl
_block_sum2 = _block_sum2_tree if SIMULATOR else _block_sum2_shfl


# ---------------------------------------------------------------------------
# Moments: per-thread Welford, in-block Chan, then the last block to finish merges all blocks
# ---------------------------------------------------------------------------


@cuda.jit(device=True)
def _quad(a0, a1, a2, a3):
    """The exact (mean, M2) of four values (two passes in registers)."""
    m = ((a0 + a1) + (a2 + a3)) * 0.25
    d0 = a0 - m
    d1 = a1 - m
    d2 = a2 - m
    d3 = a3 - m
    return m, (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


@cuda.jit(device=True)
def _arrive(count, slot, parts, flag, t):
    """Called by every thread of a block once its partial results are written: True in
    the block that arrives last among the ``parts`` blocks sharing ``count[slot]``, which
    then merges them all in the same launch (and resets the count for the next launch)."""
    cuda.threadfence()
    cuda.syncthreads()
    if t == 0:
        flag[0] = 1 if cuda.atomic.add(count, slot, 1) == parts - 1 else 0
    cuda.syncthreads()
    last = flag[0] == 1
    if last and t == 0:
        count[slot] = 0
    return last


_COUNT: list = []


def _counter(n: int):
    """Zeroed int32 arrival counts for at least n slots; every kernel leaves its slots at zero."""
    if not _COUNT or _COUNT[0].size < n:
        _COUNT[:] = [zeros(max(n, 1024), np.int32)]
    return _COUNT[0]


@cuda.jit(device=True)
def _cols_state(x, w, use_w, omit, rows, sn, smu, sm2):
    """Block (blockIdx.x, blockIdx.y, blockIdx.z) of x (A, M, B): the state of its BX
    features over row range blockIdx.y, left in sn/smu/sm2[0, tx].

    Unweighted values are read four at a time (four loads in flight per thread) and
    merged as one exact four-value state; weighted or NaN-omitting input goes value by
    value through Welford's update.
    """
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    b = cuda.blockIdx.x * BX + tx
    a = cuda.blockIdx.z
    B = x.shape[2]
    r0 = cuda.blockIdx.y * rows
    r1 = min(r0 + rows, x.shape[1])
    n = 0.0
    mu = 0.0
    m2 = 0.0
    if b < B:
        r = r0 + ty
        if not (use_w or omit):
            while r + 3 * BY < r1:
                a0 = F8(x[a, r, b])
                a1 = F8(x[a, r + BY, b])
                a2 = F8(x[a, r + 2 * BY, b])
                a3 = F8(x[a, r + 3 * BY, b])
                m4, q4 = _quad(a0, a1, a2, a3)
                n, mu, m2 = _chan(n, mu, m2, 4.0, m4, q4)
                r += 4 * BY
        while r < r1:
            v = F8(x[a, r, b])
            wt = F8(w[r]) if use_w else 1.0
            if wt > 0.0 and not (omit and v != v):
                n, mu, m2 = _welford(n, mu, m2, v, wt)
            r += BY
    _chan_y(n, mu, m2, ty, tx, sn, smu, sm2)


@cuda.jit(device=True)
def _merge_parts(pn, pmu, pm2, f, ty, tx, sn, smu, sm2):
    """Chan-merge the partial states pn/pmu/pm2[:, f]: thread row ty takes every BY-th
    partial, then the rows merge in shared memory.  The result is in sn/smu/sm2[0, tx]."""
    n = 0.0
    mu = 0.0
    m2 = 0.0
    if f < pn.shape[1]:
        for q in range(ty, pn.shape[0], BY):
            n, mu, m2 = _chan(n, mu, m2, pn[q, f], pmu[q, f], pm2[q, f])
    _chan_y(n, mu, m2, ty, tx, sn, smu, sm2)


@cuda.jit(device=True)
def _cols_merged(x, w, use_w, omit, rows, pn, pmu, pm2, count, sn, smu, sm2, flag):
    """_cols_state, its partial written to pn/pmu/pm2[blockIdx.y, f]; True in the last
    block of the column block, which holds the merge over all row ranges in
    sn/smu/sm2[0, tx]."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    B = x.shape[2]
    b = cuda.blockIdx.x * BX + tx
    _cols_state(x, w, use_w, omit, rows, sn, smu, sm2)
    f = cuda.blockIdx.z * B + b
    if ty == 0 and b < B:
        p = cuda.blockIdx.y
        pn[p, f] = sn[0, tx]
        pmu[p, f] = smu[0, tx]
        pm2[p, f] = sm2[0, tx]
    slot = cuda.blockIdx.z * cuda.gridDim.x + cuda.blockIdx.x
    if _arrive(count, slot, cuda.gridDim.y, flag, ty * BX + tx):
        _merge_parts(pn, pmu, pm2, f if b < B else pn.shape[1], ty, tx, sn, smu, sm2)
        return True
    return False


@cuda.jit(device=True)
def _row4(x, r, j, s):
    """x[r, j + k·s] for k = 0..3 as float64: four loads issued before any is used."""
    return F8(x[r, j]), F8(x[r, j + s]), F8(x[r, j + 2 * s]), F8(x[r, j + 3 * s])


@cuda.jit(device=True)
def _col4(x, r, k, s):
    """x[r + i·s, k] for i = 0..3 as float64: four loads issued before any is used."""
    return F8(x[r, k]), F8(x[r + s, k]), F8(x[r + 2 * s, k]), F8(x[r + 3 * s, k])


@cuda.jit(device=True)
def _chan_y(n, mu, m2, ty, tx, sn, smu, sm2):
    """Chan-merge every thread row's state (n, mu, m2) into sn/smu/sm2[0, tx]."""
    sn[ty, tx] = n
    smu[ty, tx] = mu
    sm2[ty, tx] = m2
    cuda.syncthreads()
    _tree_chan_y(sn, smu, sm2, ty, tx)


@_Kernel
def _k_moments_cols(x, w, use_w, omit, rows, pn, pmu, pm2, count, n_out, mu_out, m2_out):
    """x (A, M, B): the state of every feature (a, b) over M, in one launch."""
    sn = cuda.shared.array((BY, BX), F8)
    smu = cuda.shared.array((BY, BX), F8)
    sm2 = cuda.shared.array((BY, BX), F8)
    flag = cuda.shared.array(1, numba.int32)
    if _cols_merged(x, w, use_w, omit, rows, pn, pmu, pm2, count, sn, smu, sm2, flag):
        tx = cuda.threadIdx.x
        b = cuda.blockIdx.x * BX + tx
        if cuda.threadIdx.y == 0 and b < x.shape[2]:
            f = cuda.blockIdx.z * x.shape[2] + b
            n_out[f] = sn[0, tx]
            mu_out[f] = smu[0, tx]
            m2_out[f] = sm2[0, tx]


@cuda.jit(device=True)
def _next(i, l, di, dl, L):
    """(i, l) of flat index i·L + l advanced by di·L + dl (dl < L), without a division."""
    l += dl
    i += di
    if l >= L:
        l -= L
        i += 1
    return i, l


@cuda.jit(device=True)
def _ncl_start(x, span):
    """Where thread t of block (c, p) starts in its span of x (N, C, L) viewed as N·L flat
    values: (j, j1, i, l, di, dl), flat index j = i·L + l, span end j1, and the (i, l)
    step of one TPB stride."""
    L = x.shape[2]
    j0 = cuda.blockIdx.y * span
    j = j0 + cuda.threadIdx.x
    i = j // L
    di = TPB // L
    return j, min(j0 + span, x.shape[0] * L), i, j - i * L, di, TPB - di * L


@cuda.jit(device=True)
def _ncl4(x, c, i, l, di, dl):
    """Four values of channel c a TPB stride apart from (i, l), loaded together; with the
    sample index of each and the (i, l) after them."""
    L = x.shape[2]
    i1, l1 = _next(i, l, di, dl, L)
    i2, l2 = _next(i1, l1, di, dl, L)
    i3, l3 = _next(i2, l2, di, dl, L)
    i4, l4 = _next(i3, l3, di, dl, L)
    return F8(x[i, c, l]), F8(x[i1, c, l1]), F8(x[i2, c, l2]), F8(x[i3, c, l3]), i1, i2, i3, i4, l4


@cuda.jit(device=True)
def _ncl_state(x, span, sn, smu, sm2):
    """Block (c, p) of x (N, C, L): the state of channel c over flat values
    span·p + [0, span), left in sn/smu/sm2[0].

    Thread t takes flat values j = j0 + t + k·TPB, four at a time; (sample, position)
    pairs advance by additions only.
    """
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    L = x.shape[2]
    j, j1, i, l, di, dl = _ncl_start(x, span)
    n = 0.0
    mu = 0.0
    m2 = 0.0
    while j + 3 * TPB < j1:
        a0, a1, a2, a3, _, _, _, i, l = _ncl4(x, c, i, l, di, dl)
        m4, q4 = _quad(a0, a1, a2, a3)
        n, mu, m2 = _chan(n, mu, m2, 4.0, m4, q4)
        j += 4 * TPB
    while j < j1:
        n, mu, m2 = _welford(n, mu, m2, F8(x[i, c, l]), 1.0)
        i, l = _next(i, l, di, dl, L)
        j += TPB
    sn[t] = n
    smu[t] = mu
    sm2[t] = m2
    cuda.syncthreads()
    _tree_chan(sn, smu, sm2, t)


@cuda.jit(device=True)
def _ncl_merged(x, span, pn, pmu, pm2, count, sn, smu, sm2, flag):
    """_ncl_state, its partial written to pn/pmu/pm2[p, c]; True in the last block of
    channel c, which holds the merge over all spans in sn/smu/sm2[0]."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    _ncl_state(x, span, sn, smu, sm2)
    if t == 0:
        p = cuda.blockIdx.y
        pn[p, c] = sn[0]
        pmu[p, c] = smu[0]
        pm2[p, c] = sm2[0]
    if _arrive(count, c, cuda.gridDim.y, flag, t):
        n = 0.0
        mu = 0.0
        m2 = 0.0
        for q in range(t, pn.shape[0], TPB):
            n, mu, m2 = _chan(n, mu, m2, pn[q, c], pmu[q, c], pm2[q, c])
        sn[t] = n
        smu[t] = mu
        sm2[t] = m2
        cuda.syncthreads()
        _tree_chan(sn, smu, sm2, t)
        return True
    return False


@_Kernel
def _k_moments_ncl(x, span, pn, pmu, pm2, count, n_out, mu_out, m2_out):
    """x (N, C, L): the state of every channel over N and L, in one launch."""
    sn = cuda.shared.array(TPB, F8)
    smu = cuda.shared.array(TPB, F8)
    sm2 = cuda.shared.array(TPB, F8)
    flag = cuda.shared.array(1, numba.int32)
    if _ncl_merged(x, span, pn, pmu, pm2, count, sn, smu, sm2, flag) and cuda.threadIdx.x == 0:
        c = cuda.blockIdx.x
        n_out[c] = sn[0]
        mu_out[c] = smu[0]
        m2_out[c] = sm2[0]


def _cols_launch(x3):
    """(grid, block, rows, partial buffers, counts) for the column-statistics kernels on x3 (A, M, B)."""
    A, M, B = x3.shape
    gx = _blocks(B, BX)
    P, rows = _split(M, gx * A, BY)
    return (gx, P, A), (BX, BY), rows, scratch(*[(P, A * B)] * 3), _counter(gx * A)


def _ncl_launch(x3):
    N, C, L = x3.shape
    P, span = _split(N * L, C, TPB)
    return (C, P), TPB, span, scratch(*[(P, C)] * 3), _counter(C)


def moments(x3, cols: bool, w=None, omit: bool = False, template=None):
    """(n, mean, M2) device float64 vectors: of x3 (A, M, B) over M if ``cols``, else of (N, C, L) over N and L."""
    if cols:
        grid, block, rows, parts, count = _cols_launch(x3)
        out = vectors(template, 3, x3.shape[0] * x3.shape[2])[1]
        wd, use_w = _opt(w)
        _k_moments_cols[grid, block](x3, wd, use_w, omit, rows, *parts, count, *out)
    else:
        grid, block, span, parts, count = _ncl_launch(x3)
        out = vectors(template, 3, x3.shape[1])[1]
        _k_moments_ncl[grid, block](x3, span, *parts, count, *out)
    return out


# ---------------------------------------------------------------------------
# Sums for the backward passes: Σdy and Σdy·(x − center[s])·scale[s] per channel
# The statistic index of value (r, c) is s = r·sn + c // cdiv: BatchNorm (sn=0, cdiv=1)
# per channel, LayerNorm (sn=1, cdiv=D) per row, GroupNorm (sn=G, cdiv=C/G) per group.
# ---------------------------------------------------------------------------


@cuda.jit(device=True)
def _centered(xv, s, center, scale, use_center, use_scale):
    if use_center:
        xv -= center[s]
    if use_scale:
        xv *= scale[s]
    return xv


@cuda.jit(device=True)
def _bwd_finish1(f, a1, a2, center, mean, rstd, w, use_w, batch, m, q, cvar, dw, k1, k2, k3):
    """BatchNorm backward, channel f: from Σdy and Σdy·(x − center), dweight and the
    coefficients of dx = k1·dy + k2·(x − center) + k3 (docs/math.rst)."""
    r = rstd[f]
    g = w[f] if use_w else 1.0
    if batch:
        a2 = a2 + (center[f] - mean[f]) * a1
    dweight = r * a2
    dw[f] = dweight
    kk = g * r
    k1[f] = kk
    if batch:
        k2[f] = -g * r * r * q * cvar * dweight / m
        k3[f] = -kk * q * a1 / m


@cuda.jit(device=True)
def _sums_done(a1, a2, p1, p2, f, valid, count, slot, acc, flag, ty, tx, s1, s2, bn, center, mean, rstd, w, use_w,
               batch, m, q, cvar, dw, k1, k2, k3):
    """Block-sum (a1, a2) over thread rows, write the block's partial, and in the last
    block of the slot sum all partials into s1, s2[f] (and finish BatchNorm's backward
    coefficients when ``bn``)."""
    acc[0, ty, tx] = a1
    acc[1, ty, tx] = a2
    cuda.syncthreads()
    _tree_sum_y(acc, 2, ty, tx)
    p = cuda.blockIdx.y
    if ty == 0 and valid:
        p1[p, f] = acc[0, 0, tx]
        p2[p, f] = acc[1, 0, tx]
    if _arrive(count, slot, cuda.gridDim.y, flag, ty * acc.shape[2] + tx):
        a1 = 0.0
        a2 = 0.0
        if valid:
            for k in range(ty, p1.shape[0], acc.shape[1]):
                a1 += p1[k, f]
                a2 += p2[k, f]
        cuda.syncthreads()
        acc[0, ty, tx] = a1
        acc[1, ty, tx] = a2
        cuda.syncthreads()
        _tree_sum_y(acc, 2, ty, tx)
        if ty == 0 and valid:
            s1[f] = acc[0, 0, tx]
            s2[f] = acc[1, 0, tx]
            if bn:
                _bwd_finish1(f, acc[0, 0, tx], acc[1, 0, tx], center, mean, rstd, w, use_w, batch, m, q, cvar,
                             dw, k1, k2, k3)


@_Kernel
def _k_sums_cols(dy, x, center, scale, use_center, use_scale, sn, cdiv, rows, p1, p2, count, s1, s2,
                 bn, mean, rstd, w, use_w, batch, m, q, cvar, dw, k1, k2, k3):
    """dy, x (M, C): (Σdy, Σdy·x̃) per column, in one launch: row ranges blockIdx.y,
    four rows at a time, then the last block of each column block sums the ranges."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.x * BX + tx
    C = x.shape[1]
    r0 = cuda.blockIdx.y * rows
    r1 = min(r0 + rows, x.shape[0])
    a1 = 0.0
    a2 = 0.0
    if c < C:
        cs = c // cdiv
        r = r0 + ty
        while r + 3 * BY < r1:
            g0, g1, g2, g3 = _col4(dy, r, c, BY)
            v0, v1, v2, v3 = _col4(x, r, c, BY)
            a1 += (g0 + g1) + (g2 + g3)
            a2 += g0 * _centered(v0, r * sn + cs, center, scale, use_center, use_scale)
            a2 += g1 * _centered(v1, (r + BY) * sn + cs, center, scale, use_center, use_scale)
            a2 += g2 * _centered(v2, (r + 2 * BY) * sn + cs, center, scale, use_center, use_scale)
            a2 += g3 * _centered(v3, (r + 3 * BY) * sn + cs, center, scale, use_center, use_scale)
            r += 4 * BY
        while r < r1:
            g = F8(dy[r, c])
            a1 += g
            a2 += g * _centered(F8(x[r, c]), r * sn + cs, center, scale, use_center, use_scale)
            r += BY
    acc = cuda.shared.array((2, BY, BX), F8)
    flag = cuda.shared.array(1, numba.int32)
    _sums_done(a1, a2, p1, p2, c, c < C, count, cuda.blockIdx.x, acc, flag, ty, tx, s1, s2, bn, center, mean, rstd,
               w, use_w, batch, m, q, cvar, dw, k1, k2, k3)


@_Kernel
def _k_sums_ncl(dy, x, center, scale, use_center, use_scale, sn, cdiv, span, p1, p2, count, s1, s2,
                bn, mean, rstd, w, use_w, batch, m, q, cvar, dw, k1, k2, k3):
    """dy, x (N, C, L): (Σdy, Σdy·x̃) of channel ``blockIdx.x``, in one launch: spans of
    its values walked as in _ncl_state, then the last block of the channel sums them."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    L = x.shape[2]
    cs = c // cdiv
    j, j1, i, l, di, dl = _ncl_start(x, span)
    a1 = 0.0
    a2 = 0.0
    while j + 3 * TPB < j1:
        g0, g1, g2, g3, _, _, _, _, _ = _ncl4(dy, c, i, l, di, dl)
        v0, v1, v2, v3, i1, i2, i3, i4, l4 = _ncl4(x, c, i, l, di, dl)
        a1 += (g0 + g1) + (g2 + g3)
        a2 += g0 * _centered(v0, i * sn + cs, center, scale, use_center, use_scale)
        a2 += g1 * _centered(v1, i1 * sn + cs, center, scale, use_center, use_scale)
        a2 += g2 * _centered(v2, i2 * sn + cs, center, scale, use_center, use_scale)
        a2 += g3 * _centered(v3, i3 * sn + cs, center, scale, use_center, use_scale)
        i = i4
        l = l4
        j += 4 * TPB
    while j < j1:
        g = F8(dy[i, c, l])
        a1 += g
        a2 += g * _centered(F8(x[i, c, l]), i * sn + cs, center, scale, use_center, use_scale)
        i, l = _next(i, l, di, dl, L)
        j += TPB
    # one "column" per block: the (2, TPB, 1) view of the sums tree
    acc = cuda.shared.array((2, TPB, 1), F8)
    flag = cuda.shared.array(1, numba.int32)
    _sums_done(a1, a2, p1, p2, c, True, count, c, acc, flag, t, 0, s1, s2, bn, center, mean, rstd, w, use_w,
               batch, m, q, cvar, dw, k1, k2, k3)


def grad_sums(dy3, x3, cols: bool, center=None, scale=None, sn: int = 0, cdiv: int = 1, out=None, bn=None):
    """(Σdy, Σdy·(x − center)·scale) per channel, as (C,) float64 device vectors, in one launch.

    ``cols``: dy3, x3 are (M, C); else (N, C, L).  ``out``: two (C,) vectors to write.
    ``bn``: (mean, rstd, weight, batch, m, q, cvar, dw, k1, k2, k3) to finish BatchNorm's
    backward coefficients in the same launch (see bn_backward).
    """
    cd, uc = _opt(center)
    sd, us = _opt(scale)
    if bn is None:
        d = _dummy()
        bn = (False, d, d, d, False, False, 1.0, 1.0, 1.0, d, d, d, d)
    else:
        mean, rstd, w, batch, m, q, cvar, dw, k1, k2, k3 = bn
        wd, uw = _opt(w)
        bn = (True, mean, rstd, wd, uw, bool(batch), float(m), float(q), float(cvar), dw, k1, k2, k3)
    if cols:
        M, C = x3.shape
        gx = _blocks(C, BX)
        P, rows = _split(M, gx, BY)
        grid, block, span, count = (gx, P), (BX, BY), rows, _counter(gx)
    else:
        N, C, L = x3.shape
        P, span = _split(N * L, C, TPB)
        grid, block, count = (C, P), TPB, _counter(C)
    p1, p2 = scratch((P, C), (P, C))
    s1, s2 = vectors(None, 2, C)[1] if out is None else out
    kernel = _k_sums_cols if cols else _k_sums_ncl
    kernel[grid, block](dy3, x3, cd, sd, uc, us, sn, cdiv, span, p1, p2, count, s1, s2, *bn)
    return s1, s2


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------


@cuda.jit(device=True)
def _bn_finish1(f, n, mu, m2, batch, mean_in, var_in, prior_m, prior_v, p, c, w, b, use_w, use_b, eps,
                mean, var, rstd, bmean, bvar, scale, shift):
    """Channel f: the batch state (n, mu, m2) or the given statistics, blended with the
    prior; writes the statistics and the affine coefficients."""
    if batch:
        bv = m2 / n
        bmean[f] = mu
        bvar[f] = bv
        m = mu
        v = bv * c
        if p > 0.0:
            m = p * prior_m[f] + (1.0 - p) * mu
            v = p * prior_v[f] + (1.0 - p) * v
    else:
        m = mean_in[f]
        v = var_in[f]
    r = 1.0 / math.sqrt(v + eps)
    mean[f] = m
    var[f] = v
    rstd[f] = r
    scale[f] = w[f] * r if use_w else r
    shift[f] = b[f] if use_b else 0.0


@_Kernel
def _k_bn_stats_cols(x, rows, pn, pmu, pm2, count, prior_m, prior_v, p, c, w, b, use_w, use_b, eps,
                     mean, var, rstd, bmean, bvar, scale, shift):
    """x (1, M, C): batch statistics and affine coefficients of every channel, in one launch."""
    sn = cuda.shared.array((BY, BX), F8)
    smu = cuda.shared.array((BY, BX), F8)
    sm2 = cuda.shared.array((BY, BX), F8)
    flag = cuda.shared.array(1, numba.int32)
    # (no weights: ``mean`` stands in for the weight vector, which is not read)
    if _cols_merged(x, mean, False, False, rows, pn, pmu, pm2, count, sn, smu, sm2, flag):
        tx = cuda.threadIdx.x
        f = cuda.blockIdx.x * BX + tx
        if cuda.threadIdx.y == 0 and f < x.shape[2]:
            _bn_finish1(f, sn[0, tx], smu[0, tx], sm2[0, tx], True, mean, var, prior_m, prior_v, p, c, w, b,
                        use_w, use_b, eps, mean, var, rstd, bmean, bvar, scale, shift)


@_Kernel
def _k_bn_stats_ncl(x, span, pn, pmu, pm2, count, prior_m, prior_v, p, c, w, b, use_w, use_b, eps,
                    mean, var, rstd, bmean, bvar, scale, shift):
    """x (N, C, L): batch statistics and affine coefficients of every channel, in one launch."""
    sn = cuda.shared.array(TPB, F8)
    smu = cuda.shared.array(TPB, F8)
    sm2 = cuda.shared.array(TPB, F8)
    flag = cuda.shared.array(1, numba.int32)
    if _ncl_merged(x, span, pn, pmu, pm2, count, sn, smu, sm2, flag) and cuda.threadIdx.x == 0:
        f = cuda.blockIdx.x
        _bn_finish1(f, sn[0], smu[0], sm2[0], True, mean, var, prior_m, prior_v, p, c, w, b, use_w, use_b, eps,
                    mean, var, rstd, bmean, bvar, scale, shift)


@_Kernel
def _k_bn_given(mean_in, var_in, w, b, use_w, use_b, eps, mean, var, rstd, scale, shift):
    """Per channel: the given statistics and the affine coefficients (evaluation)."""
    f = cuda.grid(1)
    if f < mean.shape[0]:
        _bn_finish1(f, 0.0, 0.0, 0.0, False, mean_in, var_in, mean_in, var_in, 0.0, 1.0, w, b, use_w, use_b, eps,
                    mean, var, rstd, mean, var, scale, shift)


@cuda.jit(device=True)
def _affine1(v, r, k, C, ch_is_col, mean, scale, shift):
    ch = k if ch_is_col else r % C
    return (v - mean[ch]) * scale[ch] + shift[ch]


@_Kernel
def _k_affine(x, mean, scale, shift, C, ch_is_col, y):
    """y = (x − mean[ch])·scale[ch] + shift[ch] over a 2-D view (R, K): ch = k if
    ``ch_is_col`` (channels last), else r % C (rows of the (N·C, L) view).  Each thread
    walks its column four rows at a time, the four loads issued before any store."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    R, Kc = x.shape
    st = cuda.gridDim.y * BY
    for k in range(cuda.blockIdx.x * BX + tx, Kc, cuda.gridDim.x * BX):
        r = cuda.blockIdx.y * BY + ty
        while r + 3 * st < R:
            a0, a1, a2, a3 = _col4(x, r, k, st)
            y[r, k] = _affine1(a0, r, k, C, ch_is_col, mean, scale, shift)
            y[r + st, k] = _affine1(a1, r + st, k, C, ch_is_col, mean, scale, shift)
            y[r + 2 * st, k] = _affine1(a2, r + 2 * st, k, C, ch_is_col, mean, scale, shift)
            y[r + 3 * st, k] = _affine1(a3, r + 3 * st, k, C, ch_is_col, mean, scale, shift)
            r += 4 * st
        while r < R:
            y[r, k] = _affine1(F8(x[r, k]), r, k, C, ch_is_col, mean, scale, shift)
            r += st


@cuda.jit(device=True)
def _dx1(g, v, r, k, C, ch_is_col, batch, center, k1, k2, k3):
    ch = k if ch_is_col else r % C
    o = k1[ch] * g
    if batch:
        o += k2[ch] * (v - center[ch]) + k3[ch]
    return o


@_Kernel
def _k_bn_dx(dy, x, center, k1, k2, k3, C, ch_is_col, batch, dx):
    """dx = k1·dy (+ k2·(x − center) + k3 with batch statistics), per channel, 2-D view
    and four-row walk as in _k_affine."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    R, Kc = x.shape
    st = cuda.gridDim.y * BY
    for k in range(cuda.blockIdx.x * BX + tx, Kc, cuda.gridDim.x * BX):
        r = cuda.blockIdx.y * BY + ty
        while r + 3 * st < R:
            g0, g1, g2, g3 = _col4(dy, r, k, st)
            v0 = 0.0
            v1 = 0.0
            v2 = 0.0
            v3 = 0.0
            if batch:
                v0, v1, v2, v3 = _col4(x, r, k, st)
            dx[r, k] = _dx1(g0, v0, r, k, C, ch_is_col, batch, center, k1, k2, k3)
            dx[r + st, k] = _dx1(g1, v1, r + st, k, C, ch_is_col, batch, center, k1, k2, k3)
            dx[r + 2 * st, k] = _dx1(g2, v2, r + 2 * st, k, C, ch_is_col, batch, center, k1, k2, k3)
            dx[r + 3 * st, k] = _dx1(g3, v3, r + 3 * st, k, C, ch_is_col, batch, center, k1, k2, k3)
            r += 4 * st
        while r < R:
            v = F8(x[r, k]) if batch else 0.0
            dx[r, k] = _dx1(F8(dy[r, k]), v, r, k, C, ch_is_col, batch, center, k1, k2, k3)
            r += st


def _grid2(R: int, K: int) -> tuple[tuple[int, int], tuple[int, int]]:
    gx = min(_blocks(K, BX), 64)
    gy = min(_blocks(R, BY), _blocks(TARGET_BLOCKS * 4, gx))
    return (gx, gy), (BX, BY)


def _view2(a, cols: bool):
    """The 2-D (R, K) view the elementwise kernels walk: (M, C) as is, (N, C, L) as (N·C, L)."""
    return a if cols else a.reshape(a.shape[0] * a.shape[1], a.shape[2])


def bn_forward(x3, cols, y3, w, b, eps, mean_in=None, var_in=None, prior_m=None, prior_v=None, p=0.0, c=1.0,
               template=None):
    """BatchNorm forward into ``y3``; returns (mean, var, rstd, batch_mean, batch_var) device vectors.

    batch statistics when ``mean_in`` is None (then batch_mean/var are the batch's own,
    biased), else the given statistics (batch_mean/var None).  Two launches: statistics
    with the per-channel finish, then the affine map.
    """
    C = x3.shape[1]
    batch = mean_in is None
    mean, var, rstd, bmean, bvar, scale, shift = vectors(template, 7, C)[1]
    wd, uw = _opt(w)
    bd, ub = _opt(b)
    if batch:
        pm, _ = _opt(prior_m)
        pv, _ = _opt(prior_v)
        coef = (pm, pv, float(p), float(c), wd, bd, uw, ub, float(eps), mean, var, rstd, bmean, bvar, scale, shift)
        if cols:
            x1 = x3.reshape(1, *x3.shape)
            grid, block, rows, parts, count = _cols_launch(x1)
            _k_bn_stats_cols[grid, block](x1, rows, *parts, count, *coef)
        else:
            grid, block, span, parts, count = _ncl_launch(x3)
            _k_bn_stats_ncl[grid, block](x3, span, *parts, count, *coef)
    else:
        _k_bn_given[_blocks(C, TPB), TPB](mean_in, var_in, wd, bd, uw, ub, float(eps), mean, var, rstd, scale, shift)
    if x3.size:
        x2, y2 = _view2(x3, cols), _view2(y3, cols)
        _k_affine[_grid2(*x2.shape)](x2, mean, scale, shift, C, cols, y2)
    return mean, var, rstd, (bmean if batch else None), (bvar if batch else None)


def bn_backward(dy3, x3, cols, dx3, center, mean, rstd, w, batch, m, q, cvar, template=None):
    """BatchNorm backward into ``dx3``; returns (dweight, dbias) device vectors (docs/math.rst).

    Two launches: the sums with the per-channel coefficients, then dx.
    """
    C = mean.shape[0]
    s1, s2, dw, k1, k2, k3 = vectors(template, 6, C)[1]
    if x3.size:
        grad_sums(dy3, x3, cols, center, out=(s1, s2),
                  bn=(mean, rstd, w, batch, float(max(m, 1)), q, cvar, dw, k1, k2, k3))
        x2, dy2, dx2 = _view2(x3, cols), _view2(dy3, cols), _view2(dx3, cols)
        _k_bn_dx[_grid2(*x2.shape)](dy2, x2, center, k1, k2, k3, C, cols, batch, dx2)
    else:  # nothing to sum: dweight and dbias are zero
        fill(s1, 0.0)
        fill(dw, 0.0)
    return dw, s1


# ---------------------------------------------------------------------------
# Row normalizations: LayerNorm, RMSNorm, GroupNorm (and InstanceNorm) — one block a row
# Row r of the (R, D) view belongs to group g = r % G; value j of it to parameter
# g·Cg + j // L (LayerNorm: G = 1, Cg = D, L = 1).
# ---------------------------------------------------------------------------


@cuda.jit(device=True)
def _pidx(g, Cg, L, j):
    return g * Cg + (j if L == 1 else j // L)


@cuda.jit(device=True)
def _row_out(v, m, rs, w, b, use_w, use_b, g, Cg, L, j):
    o = (v - m) * rs
    if use_w or use_b:
        q = _pidx(g, Cg, L, j)
        if use_w:
            o *= w[q]
        if use_b:
            o += b[q]
    return o


@_Kernel
def _k_row_fwd(x, w, b, use_w, use_b, eps, center, G, Cg, L, y, mean, var, rstd):
    """One block per row of x (R, D): statistics, then the normalized row.  Threads
    read their values four at a time (four loads in flight); the second sweep reads the
    row again from cache."""
    r = cuda.blockIdx.x
    t = cuda.threadIdx.x
    D = x.shape[1]
    n = 0.0
    mu = 0.0
    m2 = 0.0
    j = t
    while j + 3 * TPB < D:
        a0, a1, a2, a3 = _row4(x, r, j, TPB)
        if center:
            m4, q4 = _quad(a0, a1, a2, a3)
            n, mu, m2 = _chan(n, mu, m2, 4.0, m4, q4)
        else:
            m2 += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
        j += 4 * TPB
    while j < D:
        v = F8(x[r, j])
        if center:
            n, mu, m2 = _welford(n, mu, m2, v, 1.0)
        else:
            m2 += v * v
        j += TPB
    sn = cuda.shared.array(TPB, F8)
    smu = cuda.shared.array(TPB, F8)
    sm2 = cuda.shared.array(TPB, F8)
    if center:
        n, m, m2 = _block_chan(n, mu, m2, t, sn, smu, sm2)
    else:
        acc = cuda.shared.array((2, TPB), F8)
        m2, _ = _block_sum2(m2, 0.0, t, acc)
        m = 0.0
    v = m2 / D
    rs = 1.0 / math.sqrt(v + eps)
    if t == 0:
        mean[r] = m
        var[r] = v
        rstd[r] = rs
    g = r % G
    j = t
    while j + 3 * TPB < D:
        a0, a1, a2, a3 = _row4(x, r, j, TPB)
        y[r, j] = _row_out(a0, m, rs, w, b, use_w, use_b, g, Cg, L, j)
        y[r, j + TPB] = _row_out(a1, m, rs, w, b, use_w, use_b, g, Cg, L, j + TPB)
        y[r, j + 2 * TPB] = _row_out(a2, m, rs, w, b, use_w, use_b, g, Cg, L, j + 2 * TPB)
        y[r, j + 3 * TPB] = _row_out(a3, m, rs, w, b, use_w, use_b, g, Cg, L, j + 3 * TPB)
        j += 4 * TPB
    while j < D:
        y[r, j] = _row_out(F8(x[r, j]), m, rs, w, b, use_w, use_b, g, Cg, L, j)
        j += TPB


@cuda.jit(device=True)
def _row_g(dy, r, j, w, use_w, g, Cg, L):
    gv = F8(dy[r, j])
    if use_w:
        gv *= w[_pidx(g, Cg, L, j)]
    return gv


@cuda.jit(device=True)
def _row_dx(gv, v, m, rs, sg, sgx, D, center):
    xh = (v - m) * rs
    if center:
        return (rs / D) * (D * gv - sg - xh * sgx)
    return rs * (gv - xh * sgx / D)


@_Kernel
def _k_row_bwd(dy, x, w, use_w, mean, rstd, center, G, Cg, L, dx):
    r = cuda.blockIdx.x
    t = cuda.threadIdx.x
    D = x.shape[1]
    m = mean[r] if center else 0.0
    rs = rstd[r]
    g = r % G
    a1 = 0.0
    a2 = 0.0
    j = t
    while j + 3 * TPB < D:
        v0, v1, v2, v3 = _row4(x, r, j, TPB)
        g0 = _row_g(dy, r, j, w, use_w, g, Cg, L)
        g1 = _row_g(dy, r, j + TPB, w, use_w, g, Cg, L)
        g2 = _row_g(dy, r, j + 2 * TPB, w, use_w, g, Cg, L)
        g3 = _row_g(dy, r, j + 3 * TPB, w, use_w, g, Cg, L)
        a1 += (g0 + g1) + (g2 + g3)
        a2 += ((g0 * (v0 - m) + g1 * (v1 - m)) + (g2 * (v2 - m) + g3 * (v3 - m))) * rs
        j += 4 * TPB
    while j < D:
        gv = _row_g(dy, r, j, w, use_w, g, Cg, L)
        a1 += gv
        a2 += gv * (F8(x[r, j]) - m) * rs
        j += TPB
    acc = cuda.shared.array((2, TPB), F8)
    sg, sgx = _block_sum2(a1, a2, t, acc)
    j = t
    while j + 3 * TPB < D:
        v0, v1, v2, v3 = _row4(x, r, j, TPB)
        g0 = _row_g(dy, r, j, w, use_w, g, Cg, L)
        g1 = _row_g(dy, r, j + TPB, w, use_w, g, Cg, L)
        g2 = _row_g(dy, r, j + 2 * TPB, w, use_w, g, Cg, L)
        g3 = _row_g(dy, r, j + 3 * TPB, w, use_w, g, Cg, L)
        dx[r, j] = _row_dx(g0, v0, m, rs, sg, sgx, D, center)
        dx[r, j + TPB] = _row_dx(g1, v1, m, rs, sg, sgx, D, center)
        dx[r, j + 2 * TPB] = _row_dx(g2, v2, m, rs, sg, sgx, D, center)
        dx[r, j + 3 * TPB] = _row_dx(g3, v3, m, rs, sg, sgx, D, center)
        j += 4 * TPB
    while j < D:
        dx[r, j] = _row_dx(_row_g(dy, r, j, w, use_w, g, Cg, L), F8(x[r, j]), m, rs, sg, sgx, D, center)
        j += TPB


def row_forward(x2, y2, w, b, eps, center, G=1, Cg=None, L=1, template=None):
    """Row normalization of x2 (R, D) into y2; returns (mean, var, rstd) (R,) device vectors."""
    R, D = x2.shape
    mean, var, rstd = vectors(template, 3, R)[1]
    wd, uw = _opt(w)
    bd, ub = _opt(b)
    if R and D:
        _k_row_fwd[R, TPB](x2, wd, bd, uw, ub, float(eps), bool(center), G, D if Cg is None else Cg, L,
                           y2, mean, var, rstd)
    return mean, var, rstd


def row_backward(dy2, x2, dx2, w, mean, rstd, center, G=1, Cg=None, L=1, template=None, param_grads=True):
    """Row normalization backward into dx2 (R, D); returns per-parameter (dweight, dbias)
    (None, None without ``param_grads``).

    LayerNorm/RMSNorm (G = 1): (D,) vectors.  GroupNorm: (C,) vectors, C = G·Cg.
    """
    R, D = x2.shape
    wd, uw = _opt(w)
    Cg = D if Cg is None else Cg
    if R and D:
        _k_row_bwd[R, TPB](dy2, x2, wd, uw, mean, rstd, bool(center), G, Cg, L, dx2)
    if not param_grads:  # only dx is wanted
        return None, None
    cen = mean if center else None
    if G == 1 and L == 1:  # parameters index columns: a column reduction with per-row statistics
        if R == 0:
            return zeros(D), zeros(D)
        db, dw = grad_sums(dy2, x2, True, cen, rstd, sn=1, cdiv=D, out=vectors(template, 2, D)[1])
        return dw, db
    N = R // G
    C = G * Cg
    if N == 0:
        return zeros(C), zeros(C)
    if L == 1:  # (N, C): channels are columns
        db, dw = grad_sums(dy2.reshape(N, C), x2.reshape(N, C), True, cen, rstd, sn=G, cdiv=Cg,
                           out=vectors(template, 2, C)[1])
    else:
        db, dw = grad_sums(dy2.reshape(N, C, L), x2.reshape(N, C, L), False, cen, rstd, sn=G, cdiv=Cg,
                           out=vectors(template, 2, C)[1])
    return dw, db


# ---------------------------------------------------------------------------
# Small per-channel and elementwise kernels
# ---------------------------------------------------------------------------


@_Kernel
def _k_lerp(a, src, fa, fs, k, out):
    """out = fa·a + fs·(src·k), the running-statistics update."""
    i = cuda.grid(1)
    if i < a.shape[0]:
        out[i] = fa * a[i] + fs * (src[i] * k)


def lerp(a, src, fa: float, fs: float, k: float = 1.0):
    """A new vector ``fa·a + fs·(src·k)``."""
    n = a.shape[0]
    out = empty(n)
    if n:
        _k_lerp[_blocks(n, TPB), TPB](a, src, float(fa), float(fs), float(k), out)
    return out


@_Kernel
def _k_copy(a, out):
    i = cuda.grid(1)
    if i < a.shape[0]:
        out[i] = a[i]


@_Kernel
def _k_fill(out, value):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = value


def fill(v, value: float):
    """Set every value of the 1-D device vector ``v``."""
    if v.shape[0]:
        _k_fill[_blocks(v.shape[0], TPB), TPB](v, float(value))


@_Kernel
def _k_divide(src, d, out):
    i = cuda.grid(1)
    if i < src.shape[0]:
        out[i] = src[i] / d


def divide(src, d: float):
    out = empty(src.shape[0])
    if src.shape[0]:
        _k_divide[_blocks(src.shape[0], TPB), TPB](src, float(d), out)
    return out


@_Kernel
def _k_instance_running(mean_nc, var_nc, k, out_m, out_v):
    """Per channel: the average over samples of the instance means and of var·k."""
    c = cuda.grid(1)
    N, C = mean_nc.shape
    if c < C:
        a = 0.0
        b = 0.0
        for n in range(N):
            a += mean_nc[n, c]
            b += var_nc[n, c] * k
        out_m[c] = a / N
        out_v[c] = b / N


def instance_running(mean_nc, var_nc, k: float):
    N, C = mean_nc.shape
    m, v = empty(C), empty(C)
    _k_instance_running[_blocks(C, TPB), TPB](mean_nc, var_nc, float(k), m, v)
    return m, v


@_Kernel
def _k_clip(a, lim, out):
    i = cuda.grid(1)
    if i < a.shape[0]:
        out[i] = min(max(a[i], -lim), lim)


@_Kernel
def _k_clip_grad(g, a, lim, out):
    i = cuda.grid(1)
    if i < a.shape[0]:
        out[i] = 0.0 if abs(a[i]) > lim else g[i]


def clip(a, lim: float, out=None):
    out = empty(a.shape, a.dtype) if out is None else out
    n = a.size
    if n:
        _k_clip[_blocks(n, TPB), TPB](_flat(a), float(lim), _flat(out))
    return out


def clip_grad(g, a, lim: float):
    out = empty(a.shape, g.dtype)
    n = a.size
    if n:
        _k_clip_grad[_blocks(n, TPB), TPB](_flat(g), _flat(a), float(lim), _flat(out))
    return out


# ---------------------------------------------------------------------------
# Online Normalization: sequential over time, parallel over channels (and over the L
# values of a channel within a block)
# ---------------------------------------------------------------------------


@cuda.jit(device=True)
def _advance(xv, m, v, a):
    """One sample (L = 1) into the carried statistics: (μ, σ²) after it."""
    d = xv - m
    return m + (1.0 - a) * d, a * v + a * (1.0 - a) * d * d


@cuda.jit(device=True)
def _control(go, g, yv, inv, uc, vcc, cb):
    """One sample's backward control step (L = 1): (dx, u, v) after it."""
    gt = go * g - cb * vcc * yv
    vcc += gt * yv
    d = gt * inv - cb * uc
    return d, uc + d, vcc


@_Kernel
def _k_online_fwd_cols(x, mu, var, a, eps, w, b, use_w, use_b, y):
    c = cuda.grid(1)
    if c < x.shape[1]:
        m = mu[c]
        v = var[c]
        g = w[c] if use_w else 1.0
        bb = b[c] if use_b else 0.0
        for n in range(x.shape[0]):
            xv = F8(x[n, c])
            y[n, c] = (xv - m) * (g / math.sqrt(v + eps)) + bb
            m, v = _advance(xv, m, v, a)
        mu[c] = m
        var[c] = v


@_Kernel
def _k_online_fwd_ncl(x, mu, var, a, eps, w, b, use_w, use_b, y):
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    L = x.shape[2]
    m = mu[c]
    v = var[c]
    g = w[c] if use_w else 1.0
    bb = b[c] if use_b else 0.0
    sn = cuda.shared.array(TPB, F8)
    smu = cuda.shared.array(TPB, F8)
    sm2 = cuda.shared.array(TPB, F8)
    for n in range(x.shape[0]):
        k = g / math.sqrt(v + eps)
        qn = 0.0
        qm = 0.0
        q2 = 0.0
        for l in range(t, L, TPB):
            xv = F8(x[n, c, l])
            y[n, c, l] = (xv - m) * k + bb
            qn, qm, q2 = _welford(qn, qm, q2, xv, 1.0)
        sn[t] = qn
        smu[t] = qm
        sm2[t] = q2
        cuda.syncthreads()
        _tree_chan(sn, smu, sm2, t)
        mt = smu[0]
        st = sm2[0] / L
        cuda.syncthreads()
        d = mt - m
        m = m + (1.0 - a) * d
        v = a * v + (1.0 - a) * st + a * (1.0 - a) * d * d
    if t == 0:
        mu[c] = m
        var[c] = v


@_Kernel
def _k_online_bwd_cols(gout, x, mu, var, u, vc, a, ab, eps, w, use_w, update, dx, dw, db):
    c = cuda.grid(1)
    if c < x.shape[1]:
        cb = 1.0 - ab
        m = mu[c]
        vv = var[c]
        uc = u[c]
        vcc = vc[c]
        g = w[c] if use_w else 1.0
        sw = 0.0
        sb = 0.0
        for n in range(x.shape[0]):
            inv = 1.0 / math.sqrt(vv + eps)
            xv = F8(x[n, c])
            y = (xv - m) * inv
            go = F8(gout[n, c])
            sw += go * y
            sb += go
            if update:
                d, uc, vcc = _control(go, g, y, inv, uc, vcc, cb)
                dx[n, c] = d
                m, vv = _advance(xv, m, vv, a)
            else:
                dx[n, c] = go * g * inv
        dw[c] = sw
        db[c] = sb
        u[c] = uc
        vc[c] = vcc


@_Kernel
def _k_online_bwd_ncl(gout, x, mu, var, u, vc, a, ab, eps, w, use_w, update, dx, dw, db):
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    L = x.shape[2]
    cb = 1.0 - ab
    m = mu[c]
    vv = var[c]
    uc = u[c]
    vcc = vc[c]
    g = w[c] if use_w else 1.0
    sw = 0.0
    sb = 0.0
    acc = cuda.shared.array((4, TPB), F8)
    sn = cuda.shared.array(TPB, F8)
    smu = cuda.shared.array(TPB, F8)
    sm2 = cuda.shared.array(TPB, F8)
    for n in range(x.shape[0]):
        inv = 1.0 / math.sqrt(vv + eps)
        a_gy = 0.0
        a_dyy = 0.0
        a_dy = 0.0
        a_u = 0.0
        qn = 0.0
        qm = 0.0
        q2 = 0.0
        for l in range(t, L, TPB):
            xv = F8(x[n, c, l])
            y = (xv - m) * inv
            go = F8(gout[n, c, l])
            a_dy += go
            a_dyy += go * y
            if update:
                gt = go * g - cb * vcc * y
                a_gy += gt * y
                d = gt * inv - cb * uc
                dx[n, c, l] = d
                a_u += d
                qn, qm, q2 = _welford(qn, qm, q2, xv, 1.0)
            else:
                dx[n, c, l] = go * g * inv
        acc[0, t] = a_gy
        acc[1, t] = a_dyy
        acc[2, t] = a_dy
        acc[3, t] = a_u
        sn[t] = qn
        smu[t] = qm
        sm2[t] = q2
        cuda.syncthreads()
        _tree_sum(acc, 4, t)
        if update:
            _tree_chan(sn, smu, sm2, t)
        sw += acc[1, 0]
        sb += acc[2, 0]
        if update:
            vcc = vcc + acc[0, 0] / L
            uc = uc + acc[3, 0] / L
            d = smu[0] - m
            m = m + (1.0 - a) * d
            vv = a * vv + (1.0 - a) * (sm2[0] / L) + a * (1.0 - a) * d * d
        cuda.syncthreads()
    if t == 0:
        dw[c] = sw
        db[c] = sb
        u[c] = uc
        vc[c] = vcc


# Scan-parallel OnlineNorm for (N, C) input (docs/gpu.rst).  Once δ_t is known, every
# recurrence is affine in the state, so each of the SEGS threads of a channel composes
# the maps of its run of time steps, one thread chains the SEGS compositions from the
# call's start state, and every thread then replays its run exactly from its own start
# state.  Blocks are (BX channels) × (SEGS runs): reads stay coalesced across channels.
#
# Mean, in the shifted variable μ̃ = μ − k (k = μ at the call's start):
#     μ̃_t = A_t·μ̃_s + B_t
# Variance (s² = 0 for L = 1), with e_t = x̃_t − B_t and δ_t = e_t − A_t·μ̃_s:
#     σ²_end = α^len·σ²_s + P + Q·μ̃_s + R·μ̃_s²
# Backward, with the forward replayed: v_t = Av_t·v_s + Bv_t and
#     u_end = α_b^len·u_s + Bu + Qu·v_s.


@cuda.jit(device=True)
def _seg_span(N, j):
    seg = (N + SEGS - 1) // SEGS
    return min(j * seg, N), min((j + 1) * seg, N)


@cuda.jit(device=True)
def _seg_forward_maps(x, c, k, a, t0, t1):
    A = 1.0
    B = 0.0
    P = 0.0
    Q = 0.0
    R = 0.0
    ca = a * (1.0 - a)
    for t in range(t0, t1):
        xt = F8(x[t, c]) - k
        e = xt - B
        P = a * P + ca * e * e
        Q = a * Q - 2.0 * ca * e * A
        R = a * R + ca * A * A
        B = a * B + (1.0 - a) * xt
        A = a * A
    return A, B, P, Q, R


@cuda.jit(device=True)
def _seg_forward_starts(x, mu, var, a, c, valid, tx, ty, s0, s1, s2, s3, s4, sm, sv):
    """Fill sm, sv[ty, tx] with the (μ, σ²) at the start of every run of channel c."""
    N = x.shape[0]
    t0, t1 = _seg_span(N, ty)
    k = mu[c] if valid else 0.0
    A, B, P, Q, R = _seg_forward_maps(x, c, k, a, t0, t1) if valid else (1.0, 0.0, 0.0, 0.0, 0.0)
    s0[ty, tx] = A
    s1[ty, tx] = B
    s2[ty, tx] = P
    s3[ty, tx] = Q
    s4[ty, tx] = R
    cuda.syncthreads()
    if ty == 0 and valid:
        m = 0.0
        v = var[c]
        for j in range(SEGS):
            sm[j, tx] = m + k
            sv[j, tx] = v
            v = s0[j, tx] * v + s2[j, tx] + s3[j, tx] * m + s4[j, tx] * m * m
            m = s0[j, tx] * m + s1[j, tx]
    cuda.syncthreads()


@_Kernel
def _k_online_fwd_scan(x, mu, var, a, eps, w, b, use_w, use_b, y):
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.x * BX + tx
    N, C = x.shape
    valid = c < C
    s0 = cuda.shared.array((SEGS, BX), F8)
    s1 = cuda.shared.array((SEGS, BX), F8)
    s2 = cuda.shared.array((SEGS, BX), F8)
    s3 = cuda.shared.array((SEGS, BX), F8)
    s4 = cuda.shared.array((SEGS, BX), F8)
    sm = cuda.shared.array((SEGS, BX), F8)
    sv = cuda.shared.array((SEGS, BX), F8)
    _seg_forward_starts(x, mu, var, a, c, valid, tx, ty, s0, s1, s2, s3, s4, sm, sv)
    t0, t1 = _seg_span(N, ty)
    if valid and t0 < t1:
        m = sm[ty, tx]
        v = sv[ty, tx]
        g = w[c] if use_w else 1.0
        bb = b[c] if use_b else 0.0
        for t in range(t0, t1):
            xv = F8(x[t, c])
            y[t, c] = (xv - m) * (g / math.sqrt(v + eps)) + bb
            m, v = _advance(xv, m, v, a)
        if t1 == N:  # the run that ends the call carries the state on
            mu[c] = m
            var[c] = v


@_Kernel
def _k_online_bwd_scan(gout, x, mu, var, u, vc, a, ab, eps, w, use_w, dx, dw, db):
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.x * BX + tx
    N, C = x.shape
    valid = c < C
    cb = 1.0 - ab
    s0 = cuda.shared.array((SEGS, BX), F8)
    s1 = cuda.shared.array((SEGS, BX), F8)
    s2 = cuda.shared.array((SEGS, BX), F8)
    s3 = cuda.shared.array((SEGS, BX), F8)
    s4 = cuda.shared.array((SEGS, BX), F8)
    sm = cuda.shared.array((SEGS, BX), F8)
    sv = cuda.shared.array((SEGS, BX), F8)
    su = cuda.shared.array((SEGS, BX), F8)
    sc = cuda.shared.array((SEGS, BX), F8)
    _seg_forward_starts(x, mu, var, a, c, valid, tx, ty, s0, s1, s2, s3, s4, sm, sv)
    t0, t1 = _seg_span(N, ty)
    g = (w[c] if use_w else 1.0) if valid else 0.0
    # maps of the control process over this run, with the forward replayed exactly
    Av = 1.0
    Bv = 0.0
    Au = 1.0
    Bu = 0.0
    Qu = 0.0
    if valid:
        m = sm[ty, tx]
        vv = sv[ty, tx]
        for t in range(t0, t1):
            inv = 1.0 / math.sqrt(vv + eps)
            xv = F8(x[t, c])
            yv = (xv - m) * inv
            gg = F8(gout[t, c]) * g
            Bu = ab * Bu + (gg - cb * Bv * yv) * inv
            Qu = ab * Qu - cb * Av * yv * inv
            Au = ab * Au
            f = 1.0 - cb * yv * yv
            Bv = f * Bv + gg * yv
            Av = f * Av
            m, vv = _advance(xv, m, vv, a)
    cuda.syncthreads()
    s0[ty, tx] = Av
    s1[ty, tx] = Bv
    s2[ty, tx] = Au
    s3[ty, tx] = Bu
    s4[ty, tx] = Qu
    cuda.syncthreads()
    if ty == 0 and valid:
        us = u[c]
        vs = vc[c]
        for j in range(SEGS):
            su[j, tx] = us
            sc[j, tx] = vs
            us = s2[j, tx] * us + s3[j, tx] + s4[j, tx] * vs
            vs = s0[j, tx] * vs + s1[j, tx]
    cuda.syncthreads()
    sw = 0.0
    sb = 0.0
    if valid and t0 < t1:
        m = sm[ty, tx]
        vv = sv[ty, tx]
        uc = su[ty, tx]
        vcc = sc[ty, tx]
        for t in range(t0, t1):
            inv = 1.0 / math.sqrt(vv + eps)
            xv = F8(x[t, c])
            yv = (xv - m) * inv
            go = F8(gout[t, c])
            sw += go * yv
            sb += go
            d, uc, vcc = _control(go, g, yv, inv, uc, vcc, cb)
            dx[t, c] = d
            m, vv = _advance(xv, m, vv, a)
        if t1 == N:
            u[c] = uc
            vc[c] = vcc
    cuda.syncthreads()
    s0[ty, tx] = sw
    s1[ty, tx] = sb
    cuda.syncthreads()
    if ty == 0 and valid:
        tw = 0.0
        tb = 0.0
        for j in range(SEGS):
            tw += s0[j, tx]
            tb += s1[j, tx]
        dw[c] = tw
        db[c] = tb


def _use_scan(N: int) -> bool:
    """Time runs pay off once every run has a few steps."""
    return N >= 2 * SEGS


def online_forward(x3, y3, mu, var, alpha, eps, w, b):
    """Advance mu, var (C,) float64 device vectors in place over x3 (N, C, L); writes y3."""
    N, C, L = x3.shape
    wd, uw = _opt(w)
    bd, ub = _opt(b)
    if L == 1 and _use_scan(N):
        _k_online_fwd_scan[_blocks(C, BX), (BX, SEGS)](x3.reshape(N, C), mu, var, float(alpha), float(eps), wd, bd,
                                                       uw, ub, y3.reshape(N, C))
    elif L == 1:
        _k_online_fwd_cols[_blocks(C, TPB), TPB](x3.reshape(N, C), mu, var, float(alpha), float(eps), wd, bd, uw, ub,
                                                 y3.reshape(N, C))
    else:
        _k_online_fwd_ncl[C, TPB](x3, mu, var, float(alpha), float(eps), wd, bd, uw, ub, y3)


def online_backward(g3, x3, dx3, mu, var, u, v, alpha, alpha_b, eps, w, update, template=None):
    """Replay the forward from (mu, var) and run the control process; u, v advance in place.

    Returns (dweight, dbias) (C,) device vectors; mu and var are consumed (advanced).
    """
    N, C, L = x3.shape
    wd, uw = _opt(w)
    dw, db = vectors(template, 2, C)[1]
    args = (mu, var, u, v, float(alpha), float(alpha_b), float(eps), wd, uw, bool(update))
    if L == 1 and update and _use_scan(N):
        _k_online_bwd_scan[_blocks(C, BX), (BX, SEGS)](g3.reshape(N, C), x3.reshape(N, C), mu, var, u, v, float(alpha),
                                                       float(alpha_b), float(eps), wd, uw, dx3.reshape(N, C), dw, db)
    elif L == 1:
        _k_online_bwd_cols[_blocks(C, TPB), TPB](g3.reshape(N, C), x3.reshape(N, C), *args, dx3.reshape(N, C), dw, db)
    else:
        _k_online_bwd_ncl[C, TPB](g3, x3, *args, dx3, dw, db)
    return dw, db
