"""Output memory for the CPU kernels.  Private.

Outputs large enough to be written with streaming stores (``_kernels_cpu``, section
"Streaming stores") are allocated on a 64-byte boundary, half a page away from the
input they are computed from (:func:`empty`), and :func:`streaming` says when a kernel
may use them.
"""

from __future__ import annotations

import numpy as np

#: bytes of a cache line, the unit of a streaming store
LINE = 64

#: bytes of a page: a load whose address matches a pending store's in its low 12 bits
#: may wait for that store (x86 cores compare those bits first, "4K aliasing")
PAGE = 4096

#: a large output is a view of a byte buffer this much longer than it (see :func:`owner`)
PAD = PAGE

#: outputs at least this large are streamed: more than the last-level cache of most
#: CPUs, so that nothing is lost by not leaving them in cache
STREAM_MIN_BYTES = 32 * 2**20


def empty(shape, dtype, near: np.ndarray | None = None) -> np.ndarray:
    """``np.empty(shape, dtype)``; when it may be streamed, a view of a byte buffer
    ``PAD`` bytes longer than it (see :func:`owner`), placed by :func:`reuse`."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    nbytes = n * dtype.itemsize
    if nbytes < STREAM_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    return reuse(np.empty(nbytes + PAD, dtype=np.uint8), shape, dtype, near)


def lined(a: np.ndarray) -> np.ndarray:
    """``a`` (C-contiguous) when it starts on a 64-byte boundary, else a copy that does.

    For the per-feature vectors (weights, biases, scales) that a kernel reads beside
    every row of the data: numpy starts small arrays 16 bytes past a line, and a
    vector load that straddles two lines costs a row-wise forward a sixth of its time
    or more."""
    if a.ctypes.data % LINE == 0:
        return a
    out = reuse(np.empty(a.nbytes + PAD, dtype=np.uint8), a.shape, a.dtype)
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
    if b.dtype == np.uint8 and b.nbytes == y.nbytes + PAD:
        return b
    return None


def reuse(buf: np.ndarray, shape, dtype, near: np.ndarray | None = None) -> np.ndarray | None:
    """An array of ``shape`` and ``dtype`` in the memory of ``buf`` (from :func:`owner`),
    laid out as :func:`empty` would; None when it does not fit.

    In a padded buffer the array starts on a 64-byte boundary half a page from the
    start of ``near`` (the input it will be computed from; the start of a page without
    one), modulo a page.  A kernel that reads ``near[i]`` and writes ``out[i]`` then
    keeps every load half a page from the stores around it, never a few bytes: on
    x86 such a load can stall behind an unrelated store to the same place in another
    page.  With a numpy input 48 bytes before the output in their pages, that cost
    the OnlineNorm ``(N, C)`` layer about 6 % of its time."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    nbytes = n * dtype.itemsize
    if buf.dtype == np.uint8 and buf.nbytes == nbytes + PAD:
        target = 0 if near is None else (near.ctypes.data + PAGE // 2 + LINE - 1) // LINE * LINE
        skip = (target - buf.ctypes.data) % PAGE
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
