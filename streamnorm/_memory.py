"""Output memory for the CPU kernels.  Private.

Outputs large enough to be written with streaming stores (``_kernels_cpu``, section
"Streaming stores") are allocated on a 64-byte boundary, and :func:`streaming` says
when a kernel may use them.
"""

from __future__ import annotations

import numpy as np

#: bytes of a cache line, the unit of a streaming store
LINE = 64

#: outputs at least this large are streamed: more than the last-level cache of most
#: CPUs, so that nothing is lost by not leaving them in cache
STREAM_MIN_BYTES = 32 * 2**20


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, on a 64-byte boundary when it may be streamed: then a
    view of a byte buffer one line longer than it (see :func:`owner`)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    nbytes = n * dtype.itemsize
    if nbytes < STREAM_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    return reuse(np.empty(nbytes + LINE, dtype=np.uint8), shape, dtype)


def lined(a: np.ndarray) -> np.ndarray:
    """``a`` (C-contiguous) when it starts on a 64-byte boundary, else a copy that does.

    For the per-feature vectors (weights, biases, scales) that a kernel reads beside
    every row of the data: numpy starts small arrays 16 bytes past a line, and a
    vector load that straddles two lines costs a row-wise forward a sixth of its time
    or more."""
    if a.ctypes.data % LINE == 0:
        return a
    buf = np.empty(a.nbytes + LINE, dtype=np.uint8)
    skip = -buf.ctypes.data % LINE
    out = buf[skip : skip + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def owner(y: np.ndarray) -> np.ndarray | None:
    """The array that owns ``y``'s memory (numpy makes it the ``base`` of every view,
    so that anyone holding a view holds it), when that memory is y's alone: y's own
    allocation, or :func:`empty`'s padded one.  None otherwise."""
    b = y
    while isinstance(b.base, np.ndarray):
        b = b.base
    if b.base is not None:
        return None  # memory from outside numpy
    if b.dtype == y.dtype and b.size == y.size:
        return b
    if b.dtype == np.uint8 and b.nbytes == y.nbytes + LINE:
        return b
    return None


def reuse(buf: np.ndarray, shape, dtype) -> np.ndarray | None:
    """An array of ``shape`` and ``dtype`` in the memory of ``buf`` (from :func:`owner`),
    laid out as :func:`empty` would; None when it does not fit."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    nbytes = n * dtype.itemsize
    if buf.dtype == np.uint8 and buf.nbytes == nbytes + LINE:
        skip = -buf.ctypes.data % LINE
        return buf[skip : skip + nbytes].view(dtype).reshape(shape)
    if buf.dtype == dtype and buf.size == n:
        return buf.reshape(shape)
    return None


def streaming(out: np.ndarray, row: int) -> bool:
    """Whether a kernel may write ``out`` (C-contiguous) with streaming stores, rows of
    ``row`` values each: large enough, and every row starts on a 64-byte boundary."""
    return (
        out.nbytes >= STREAM_MIN_BYTES
        and out.ctypes.data % LINE == 0
        and (row * out.itemsize) % LINE == 0
    )
