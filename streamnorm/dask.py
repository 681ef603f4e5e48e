"""Dask arrays: moments as a tree reduction of mergeable states, lazy transforms.

A dask array is a grid of NumPy blocks, possibly spread over many machines.  The
moments of docs/math.rst suit it exactly: every block is reduced where it lives, by
the same numba kernel :class:`~streamnorm.RunningStats` uses for a NumPy chunk, to a
``(count, mean, M2)`` state per feature; the states are merged with Chan's formula up
a tree (``dask.array.reduction`` with ``split_every``), so no worker ever holds more
than a few states and no block travels.  Chan's merge is exact up to rounding and
associative, so the tree's shape, the chunking and the order in which workers finish
change the result only in the last bits (~1e-16 relative), never by cancellation.

The state travels as a NumPy structured array with fields ``n``, ``mean`` and ``m2``
(:data:`STATE_DTYPE`): dask's reduction machinery concatenates, slices and pickles it
like any other array, and it keeps the feature axes, so chunking along the features as
well as the rows works (only the reduced axis is merged; feature chunks stay apart).

Normally nothing here is called directly: :meth:`RunningStats.update
<streamnorm.RunningStats.update>`, :meth:`StreamScaler.partial_fit
<streamnorm.StreamScaler.partial_fit>` / ``fit`` and ``transform`` /
``inverse_transform`` dispatch here when they are given a dask array.  :func:`moments`
is public for code that wants the lazy state, to compute it together with something
else.

Threads: dask runs one task per worker thread, so each block's kernel runs on one
numba thread (``numba.set_num_threads`` is per calling thread, and is restored
afterwards); the parallelism comes from the blocks.  This module imports dask; the
rest of streamnorm does not.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import partial

import dask
import dask.array as da
import numba
import numpy as np

from . import _kernels_cpu as K
from . import _memory, _moments
from ._validation import as_float_array, canonical_view, check_axis

__all__ = ["STATE_DTYPE", "moments", "chunk_moments"]

#: One per-feature moments state: weight sum (a count when unweighted), mean, and the
#: sum of squared deviations from the mean.  The empty state is all zeros.
STATE_DTYPE = np.dtype([("n", np.float64), ("mean", np.float64), ("m2", np.float64)])

_NAN_POLICIES = ("propagate", "omit", "raise")
_INF_MESSAGE = "Input X contains infinity or a value too large for dtype('float64')."

# Numba threads per dask task: dask already runs one task per worker thread.
_TASK_THREADS = 1


# ---------------------------------------------------------------------------
# Running a parallel kernel inside a dask task
# ---------------------------------------------------------------------------

# numba's 'workqueue' threading layer (the fallback where neither TBB nor OpenMP is
# available) aborts the process when two threads launch parallel kernels at once, which
# dask's threaded scheduler does.  Launches are serialized until the first one has
# shown which layer this process loaded, and from then on only under 'workqueue'.
_LAUNCH_LOCK = threading.Lock()
_LAUNCH_NEEDS_LOCK: bool | None = None  # unknown until the first launch


@contextmanager
def _task_threads(n: int):
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(prev)


def _launch(kernel, *args):
    """Call a numba parallel kernel from a dask task, on ``_TASK_THREADS`` threads."""
    global _LAUNCH_NEEDS_LOCK
    with _task_threads(_TASK_THREADS):
        if _LAUNCH_NEEDS_LOCK is False:
            return kernel(*args)
        with _LAUNCH_LOCK:
            out = kernel(*args)
            try:
                _LAUNCH_NEEDS_LOCK = numba.threading_layer() == "workqueue"
            except ValueError:  # nothing was launched (an empty block): still unknown
                pass
        return out


# ---------------------------------------------------------------------------
# The reduction: chunk -> combine* -> aggregate, over structured states
# ---------------------------------------------------------------------------


def _block_view(x: np.ndarray, axes: tuple[int, ...]):
    """(x3, ax): ``x`` as (A, M, B) with the reduced values along M.

    One reduced axis ``ax`` gives the features before and after it as A and B; all axes
    reduced (``axis=None``) pools the block into (1, size, 1) and ``ax`` is None.
    """
    if len(axes) == 1:
        ax = axes[0]
        a = int(np.prod(x.shape[:ax], dtype=np.int64))
        b = int(np.prod(x.shape[ax + 1 :], dtype=np.int64))
        return canonical_view(x, (a, x.shape[ax], b)), ax
    return canonical_view(x, (1, x.size, 1)), None


def _chunk_state(
    block,
    weights=None,
    axis=(0,),
    keepdims=True,
    nan_policy="propagate",
    check_inf=False,
    computing_meta=False,
):
    """The moments state of one block, shaped like the block with the reduced axes at 1.

    Exactly what :meth:`RunningStats.chunk_moments` does for a NumPy chunk: the same
    kernel (``_moments.col_moments``), the same weight checks, the same NaN policies.
    ``weights`` is the block of the weights broadcast against x (dask's reduction hands
    it over that way); the per-row weights are read off its reduced axis.  With
    ``check_inf`` (StreamScaler's fit) a block holding ±inf raises, as the NumPy path
    does; the block is scanned only when its state says it may hold one.
    """
    axes = tuple(axis)
    if computing_meta:
        return np.empty((0,) * np.ndim(block), dtype=STATE_DTYPE)
    x = as_float_array(block)
    out_shape = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
    if x.size == 0:  # an empty block (or dask probing the output type): empty states
        return np.zeros(out_shape, dtype=STATE_DTYPE)
    x3, ax = _block_view(x, axes)
    w = None
    if weights is not None:
        sel = tuple(slice(None) if i == ax else 0 for i in range(x.ndim))
        w = np.ascontiguousarray(np.asarray(weights)[sel], dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite and non-negative")
    n, mean, m2 = _launch(_moments.col_moments, x3, w, nan_policy == "omit")
    finite = bool(np.all(np.isfinite(mean)) and np.all(np.isfinite(m2)))
    if nan_policy == "raise" and not finite and np.isnan(x).any():
        raise ValueError("x contains NaN and nan_policy='raise'")
    if check_inf:
        # inf with a non-zero weight makes the state non-finite; a zero-weight inf only
        # shows in a scan, which the NumPy path makes unless NaNs are omitted
        zero_w = w is not None and nan_policy != "omit" and not np.all(w)
        if (not finite or zero_w) and np.isinf(x).any():
            raise ValueError(_INF_MESSAGE)
    out = np.empty(out_shape, dtype=STATE_DTYPE)
    out["n"] = n.reshape(out_shape)
    out["mean"] = mean.reshape(out_shape)
    out["m2"] = m2.reshape(out_shape)
    return out


def _merge_states(parts, axis=(0,), keepdims=False):
    """Chan-merge the states ``parts`` along the reduced axes, in block order.

    ``parts`` is the concatenation of several ``_chunk_state`` (or earlier merge)
    outputs; the result keeps the feature axes as they are.
    """
    axes = tuple(axis)
    parts = np.asarray(parts)
    if parts.size == 0:  # dask asks for the output's type with an empty array
        if keepdims:
            return np.empty(tuple(1 if i in axes else s for i, s in enumerate(parts.shape)), dtype=STATE_DTYPE)
        return np.empty(tuple(s for i, s in enumerate(parts.shape) if i not in axes), dtype=STATE_DTYPE)
    lead = tuple(range(len(axes)))
    moved = np.moveaxis(parts, axes, lead)
    fshape = moved.shape[len(axes) :]
    k = int(np.prod(moved.shape[: len(axes)], dtype=np.int64))
    flat = moved.reshape((k, int(np.prod(fshape, dtype=np.int64))))
    n, mean, m2 = K._merge_partials(
        np.ascontiguousarray(flat["n"]), np.ascontiguousarray(flat["mean"]), np.ascontiguousarray(flat["m2"])
    )
    out_shape = tuple(1 if i in axes else s for i, s in enumerate(parts.shape)) if keepdims else fshape
    out = np.empty(out_shape, dtype=STATE_DTYPE)
    out["n"] = n.reshape(out_shape)
    out["mean"] = mean.reshape(out_shape)
    out["m2"] = m2.reshape(out_shape)
    return out


def _float_dask(x, name: str = "x"):
    """``x`` as a float32/float64 dask array, cast lazily as :func:`as_float_array` would."""
    if not isinstance(x, da.Array):
        raise TypeError(f"{name} must be a dask array, not {type(x).__name__}")
    dt = x.dtype
    if dt in (np.float32, np.float64):
        return x
    if dt == np.float16:
        return x.astype(np.float32)
    if dt.kind in "iubf":
        return x.astype(np.float64)
    if dt.kind == "c":
        raise TypeError(f"{name} has complex dtype {dt}; streamnorm normalizes real data only")
    raise TypeError(f"{name} has dtype {dt}, which is not numeric; pass a float or integer array")


def _row_weights(weights, x, ax: int):
    """Per-sample weights as a dask array broadcast against ``x`` along axis ``ax``.

    The weights are rechunked to x's chunks along ``ax`` (never x to theirs), and the
    broadcast blocks are stride-0 views, so they cost no memory.
    """
    m = x.shape[ax]
    w = weights if isinstance(weights, da.Array) else np.asarray(weights)
    if w.dtype.kind not in "iufb":
        raise TypeError(f"weights has dtype {w.dtype}; expected real numbers")
    if w.shape != (m,):
        raise ValueError(f"weights has shape {w.shape}; expected ({m},), one weight per sample along the axis")
    if isinstance(w, da.Array):
        w = w.astype(np.float64).rechunk((x.chunks[ax],))
    else:
        w = da.from_array(np.ascontiguousarray(w, dtype=np.float64), chunks=(x.chunks[ax],))
    shape = [1] * x.ndim
    shape[ax] = m
    return da.broadcast_to(w.reshape(tuple(shape)), x.shape, chunks=x.chunks)


@contextmanager
def local_client(n_workers: int = 2):
    """A ``dask.distributed`` client on a LocalCluster of single-threaded worker processes.

    Loopback only, no dashboard: the cluster the tests and ``bench-dask`` use.
    """
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers, processes=True, threads_per_worker=1, dashboard_address=None, host="127.0.0.1"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def moments(x, axis: int | None = 0, weights=None, nan_policy: str = "propagate", split_every=None, *, check_inf=False):
    """The lazy per-feature moments state of a dask array.

    Parameters
    ----------
    x : dask.array.Array, float32 or float64 (integers are cast to float64)
        Samples run along ``axis``; the other axes are features and may be chunked.
    axis : int or None
        The sample axis; ``None`` pools every value into one scalar feature.
    weights : 1-D dask array or array_like, optional
        Non-negative per-sample weights, aligned with ``axis``.
    nan_policy : {'propagate', 'omit', 'raise'}
        As :class:`~streamnorm.RunningStats`: ``'raise'`` raises ``ValueError`` when the
        graph is computed.
    split_every : int, optional
        At most this many states enter each merge (dask's default when None).

    Returns
    -------
    dask.array.Array of dtype :data:`STATE_DTYPE`, shape (*features)
        One ``(n, mean, M2)`` record per feature, chunked like x's feature axes.
        Nothing is computed.
    """
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {_NAN_POLICIES}, got {nan_policy!r}")
    x = _float_dask(x)
    if axis is None:
        axes = tuple(range(x.ndim))
        if weights is not None:
            raise ValueError("weights need a sample axis; got axis=None")
    else:
        axes = (check_axis(x.ndim, axis),)
    w = None if weights is None else _row_weights(weights, x, axes[0])
    chunk = partial(_chunk_state, nan_policy=nan_policy, check_inf=bool(check_inf))
    return da.reduction(
        x,
        chunk,
        _merge_states,
        axis=axes,
        keepdims=False,
        dtype=STATE_DTYPE,
        split_every=split_every,
        combine=_merge_states,
        concatenate=True,
        weights=w,
        name="streamnorm-moments",
        meta=np.empty((0,) * (x.ndim - len(axes)), dtype=STATE_DTYPE),
    )


def _unpack(state: np.ndarray):
    """Flat float64 (n, mean, M2) arrays of a computed state, in C order of the features."""
    state = np.asarray(state)
    return tuple(np.ascontiguousarray(state[f], dtype=np.float64).ravel() for f in ("n", "mean", "m2"))


def chunk_moments(x, axis: int | None = 0, weights=None, nan_policy: str = "propagate", split_every=None):
    """Compute the moments of a dask array as one chunk: ``(feature_shape, n, mean, M2)``.

    The same return value as :meth:`RunningStats.chunk_moments
    <streamnorm.RunningStats.chunk_moments>` on the NumPy array, from one
    ``.compute()`` of :func:`moments` (on the active ``dask.distributed`` client, if
    any).

    Parameters
    ----------
    x : dask array, float32 or float64, any chunking
    axis : int or None
        The sample axis (None pools every value into one feature).
    weights : 1-D dask or NumPy array of shape (x.shape[axis],), optional
    nan_policy : {'propagate', 'omit', 'raise'}
    split_every : int, optional
        The fan-in of the merge tree (dask's default when None).

    Returns
    -------
    feature_shape : tuple of int
        ``x.shape`` without ``axis`` (``()`` for ``axis=None``).
    n, mean, m2 : float64 ndarrays of shape (F,), F = prod(feature_shape)
        Weight sums (counts), means and sums of squared deviations.
    """
    state = moments(x, axis=axis, weights=weights, nan_policy=nan_policy, split_every=split_every)
    return (state.shape, *_unpack(state.compute()))


# ---------------------------------------------------------------------------
# StreamScaler support
# ---------------------------------------------------------------------------


def check_X(X):
    """StreamScaler's dtype checks, lazily: a float32/float64 dask array."""
    if X.dtype.kind == "c":
        raise ValueError(f"Complex data not supported: X has dtype {X.dtype}")
    if X.dtype.kind == "O":
        raise TypeError("X has dtype object; convert the dask array to a float dtype first")
    X = _float_dask(X, "X")
    if any(np.isnan(s) for s in X.shape[1:]):
        raise ValueError(f"X has unknown feature sizes {X.shape}; call X.compute_chunk_sizes() first")
    return X


def scaler_moments(X, sample_weight, nan_policy: str):
    """The chunk state for ``StreamScaler.partial_fit``: one compute, the scaler's checks.

    Raises as the NumPy path does: NaN under 'raise', ±inf in X, negative or non-finite
    weights, and all-zero weights (checked in the same compute).
    """
    state = moments(X, axis=0, weights=sample_weight, nan_policy=nan_policy, check_inf=True)
    if sample_weight is not None and isinstance(sample_weight, da.Array):
        state, any_w = dask.compute(state, (sample_weight != 0).any())
    else:
        any_w = True
        if sample_weight is not None:
            w = np.asarray(sample_weight, dtype=np.float64)
            any_w = not w.size or bool(np.any(w))
        if any_w:
            state = state.compute()
    if not any_w:
        raise ValueError("sample_weight is all zeros: at least one sample must have a non-zero weight")
    return (tuple(state.shape), *_unpack(state))


def _affine_block(block, params, check_inf):
    """``(x - sub) * mul + add`` per feature on one block, in the block's float dtype."""
    x = as_float_array(block, "X")
    if check_inf and np.isinf(x).any():
        raise ValueError(_INF_MESSAGE)
    out = _memory.empty(x.shape, x.dtype, near=x)
    if x.size:
        p = np.asarray(params)
        _launch(
            K.affine,
            x,
            np.ascontiguousarray(p["sub"]),
            np.ascontiguousarray(p["mul"]),
            np.ascontiguousarray(p["add"]),
            out,
        )
    return out


_PARAM_DTYPE = np.dtype([("sub", np.float64), ("mul", np.float64), ("add", np.float64)])


def affine(X, sub, mul, add, *, check_inf=True):
    """Lazy ``(X - sub) * mul + add`` per feature of a 2-D dask array.

    The three float64 vectors are packed into one small array and put into the graph
    once, split by X's feature chunks: every row block of a feature chunk reads the
    same key.  The output has X's chunks and float dtype; NaNs stay NaN.
    """
    X = _float_dask(X, "X")
    F = X.shape[1]
    params = np.empty(F, dtype=_PARAM_DTYPE)
    params["sub"], params["mul"], params["add"] = sub, mul, add
    p = da.from_array(params, chunks=(X.chunks[1],))
    return da.map_blocks(
        _affine_block,
        X,
        p,
        check_inf=check_inf,
        dtype=X.dtype,
        meta=np.empty((0, 0), dtype=X.dtype),
        token="streamnorm-affine",
    )
