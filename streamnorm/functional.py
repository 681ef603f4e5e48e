"""Stateless forward/backward pairs: shape checks, canonical views (docs/layers/index.rst), dispatch.

Every forward returns ``(y, cache)`` and every backward takes ``(dy, cache)`` and
returns ``(dx, dweight, dbias)``.  The cache keeps a reference to the input and a few
per-channel or per-row float64 vectors, never an array of the input's size.  None of
these functions touches a layer object: a NumPy user can train with them alone.  The
``sync_batch_norm`` pair also takes a communicator (:mod:`streamnorm.comm`) and makes one
collective call each, forward and backward.

Dtypes: inputs may be float32 or float64 (integers are cast to float64); outputs have
the input's dtype; statistics and parameter gradients are float64.

Examples
--------
One train-mode BatchNorm step without a layer object: the forward's cache goes back
into the backward, which returns the input gradient and the (C,) parameter gradients.

>>> import numpy as np
>>> from streamnorm import functional as F
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(2.0, 3.0, size=(32, 4)).astype(np.float32)
>>> weight, bias = np.ones(4), np.zeros(4)
>>> y, cache = F.batch_norm_forward(x, weight, bias)
>>> dx, dweight, dbias = F.batch_norm_backward(rng.standard_normal((32, 4)).astype(np.float32), cache)
>>> y.dtype, dx.shape, dx.dtype, dweight.shape, dweight.dtype
(dtype('float32'), (32, 4), dtype('float32'), (4,), dtype('float64'))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _kernels_cpu as K
from . import _memory, _moments
from ._backend import is_device
from ._validation import as_float_array, canonical_view, check_positive_float
from .comm import allgather_checked, as_communicator

__all__ = [
    "BatchNormCache",
    "GroupNormCache",
    "OnlineNormCache",
    "RowNormCache",
    "SyncBatchNormCache",
    "batch_moments",
    "batch_norm_forward",
    "batch_norm_backward",
    "sync_batch_norm_forward",
    "sync_batch_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm_forward",
    "instance_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "online_norm_forward",
    "online_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
]


def _gpu():
    """The GPU implementations (loaded on the first GPU input)."""
    from . import _gpu as G

    return G


def _vec(v, n: int, name: str) -> np.ndarray | None:
    """A (n,) float64 vector parameter, or None."""
    if v is None:
        return None
    a = np.asarray(v)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} has dtype {a.dtype}; expected real numbers")
    if a.size != n:
        raise ValueError(f"{name} has {a.size} values, expected {n}")
    return np.ascontiguousarray(a, dtype=np.float64).reshape(n)


def _out_dtype(*arrays: np.ndarray) -> np.dtype:
    return np.result_type(*[a.dtype for a in arrays])


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------


class BatchNormCache(NamedTuple):
    """What :func:`batch_norm_backward` needs from the forward.

    ``x3`` is the input's canonical view, (M, C) when ``cols`` else (N, C, L).  All
    statistics are (C,) float64: ``mean``/``var`` are the ones x was normalized with,
    ``batch_mean``/``batch_var`` the batch's own (biased) ones, or None when the
    statistics were given.  With batch statistics the normalization used
    ``mean = p·prior_mean + (1 − p)·batch_mean`` and
    ``var = p·prior_var + (1 − p)·c·batch_var`` (``p = prior_weight``, ``c`` 1 or
    m/(m − 1)); train mode is ``p = 0, c = 1``.

    Attributes
    ----------
    x3 : ndarray, shape (M, C) or (N, C, L)
        The input's canonical view, in the input's dtype (float32 or float64).
    cols : bool
        True for the (M, C) view, used when nothing follows the channel axis.
    mean, var : ndarray of float64, shape (C,)
        The statistics x was normalized with.
    rstd : ndarray of float64, shape (C,)
        ``1/sqrt(var + eps)``.
    weight : ndarray of float64, shape (C,), or None
        γ, or None for no scale.
    count : int
        m, the number of values per channel.
    batch_stats : bool
        True when the batch's statistics (blended or not) were used.
    shape : tuple of int
        The shape of the forward input.
    batch_mean, batch_var : ndarray of float64, shape (C,), or None
        The batch's own mean and biased variance.
    prior_weight : float
        p, the weight of the prior in the blend.
    var_factor : float
        c, the factor of the batch variance: 1, or m/(m − 1) with ``unbiased=True``.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> y, cache = F.batch_norm_forward(np.arange(12.0).reshape(6, 2))
    >>> cache.count, cache.batch_stats, cache.cols, cache.x3.shape
    (6, True, True, (6, 2))
    >>> cache.batch_mean, cache.batch_var
    (array([5., 6.]), array([11.66666667, 11.66666667]))
    """

    x3: np.ndarray
    cols: bool
    mean: np.ndarray
    var: np.ndarray
    rstd: np.ndarray
    weight: np.ndarray | None
    count: int
    batch_stats: bool
    shape: tuple[int, ...]
    batch_mean: np.ndarray | None = None
    batch_var: np.ndarray | None = None
    prior_weight: float = 0.0
    var_factor: float = 1.0


def _bn_dims(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """(n, c, l) of BatchNorm's canonical view of an input of this shape."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"BatchNorm expects at least 2 dimensions (N, C, ...), got shape {tuple(shape)}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for input of shape {tuple(shape)}")
    ax = axis % ndim
    if ax == 0:
        raise ValueError("the channel axis cannot be the batch axis 0")
    n = int(np.prod(shape[:ax], dtype=np.int64))
    l = int(np.prod(shape[ax + 1 :], dtype=np.int64))
    return n, int(shape[ax]), l


def _bn_stat_mode(mean, var, prior_weight, count: int, shape) -> tuple[bool, float]:
    """(batch statistics?, prior weight p), checked (both backends)."""
    if (mean is None) != (var is None):
        raise ValueError("pass both mean and var (eval mode) or neither (batch statistics)")
    p = float(prior_weight)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prior_weight must be in [0, 1], got {prior_weight!r}")
    if mean is None and count <= 1:
        raise ValueError(
            f"BatchNorm with batch statistics needs more than 1 value per channel, got input of "
            f"shape {tuple(shape)} ({count} value per channel): the variance is undefined"
        )
    return mean is None, p


def _bn_view(x: np.ndarray, axis: int) -> tuple[np.ndarray, bool, int]:
    """Canonical view for BatchNorm: (M, C) if the channel axis is last, else (N, C, L)."""
    n, c, l = _bn_dims(x.shape, axis)
    if l == 1:
        return canonical_view(x, (n, c)), True, c
    # the (N, C, L) kernels reduce rows of L in cache and need them contiguous
    return np.ascontiguousarray(canonical_view(x, (n, c, l))), False, c


def batch_moments(x, axis: int = 1):
    """Per-channel (count, mean, biased var) of x over every axis but the channel axis.

    Parameters
    ----------
    x : array_like, shape (N, C, *S) or, with ``axis=-1``, (N, *S, C)
        float32 or float64; integers are cast to float64.
    axis : int
        The channel axis (1 by default; -1 for channels-last).

    Returns
    -------
    m : int
        The number of values per channel, ``x.size // C``.
    mean, var : ndarray of float64, shape (C,)
        Mean and biased (population) variance per channel; NaN when m is 0.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> F.batch_moments(np.arange(12.0).reshape(6, 2))
    (6, array([5., 6.]), array([11.66666667, 11.66666667]))
    >>> m, mean, var = F.batch_moments(np.ones((2, 5, 3), dtype=np.float32), axis=-1)
    >>> m, mean.shape, mean.dtype
    (10, (3,), dtype('float64'))
    """
    if is_device(x):
        return _gpu().batch_moments(x, axis)
    x = as_float_array(x)
    x3, cols, C = _bn_view(x, axis)
    count = x.size // C if C else 0
    if count == 0:
        return 0, np.full(C, np.nan), np.full(C, np.nan)
    if cols:
        _, mu, m2 = _moments.col_moments(x3.reshape(1, *x3.shape))
    else:
        _, mu, m2 = _moments.ncl_moments(x3)
    return count, mu, m2 / count


def _output(out, x: np.ndarray, shape3: tuple[int, ...], dtype=None, reads=()) -> np.ndarray:
    """The output in its canonical shape: a new array, or ``out`` after checking it.

    ``out`` must be a writable C-contiguous ndarray of x's shape and of ``dtype`` (x's
    by default) that overlaps neither x (the backward reads x) nor the other arrays in
    ``reads``.  Writing into a reused buffer saves the operating system's zeroing of
    freshly allocated pages, about one write pass.
    """
    dtype = x.dtype if dtype is None else np.dtype(dtype)
    if out is None:
        return _memory.empty(shape3, dtype, near=x)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != dtype:
        raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}; expected {x.shape} and {dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writable")
    if any(np.may_share_memory(out, a) for a in (x, *reads)):
        raise ValueError("out must not overlap the arrays the computation reads (x, and dy in a backward)")
    return out.reshape(shape3)


def _bn_normalize(x, x3, cols, mu, var, w, b, eps, out=None):
    """``y = (x - μ)·γ/sqrt(σ² + eps) + β`` per channel, in x's shape and dtype; returns (y, rstd)."""
    rstd = 1.0 / np.sqrt(var + eps)
    scale = rstd if w is None else w * rstd
    shift = np.zeros(mu.shape[0]) if b is None else b
    y = _output(out, x, x3.shape)
    if y.size:
        K.affine(x3, mu, scale, shift, y)
    return y.reshape(x.shape), rstd


def batch_norm_forward(
    x,
    weight=None,
    bias=None,
    *,
    mean=None,
    var=None,
    eps: float = 1e-5,
    axis: int = 1,
    prior_mean=None,
    prior_var=None,
    prior_weight: float = 0.0,
    unbiased: bool = False,
    out: np.ndarray | None = None,
):
    """Batch normalization forward (docs/math.rst, and the blends of docs/streams.rst).

    Parameters
    ----------
    x : array_like, shape (N, C, *S) or, with ``axis=-1``, (N, *S, C)
        float32 or float64; integers are cast to float64.
    weight, bias : array_like of shape (C,), optional
        Affine parameters γ and β (γ = 1, β = 0 when None).
    mean, var : array_like of shape (C,), optional
        Statistics to normalize with (eval mode).  When both are None the batch's own
        statistics are used (train mode): the biased variance over every axis but the
        channel axis.
    eps : float
        Added to the variance under the square root.
    axis : int
        The channel axis (1 by default; -1 for channels-last).
    prior_mean, prior_var : array_like of shape (C,), optional
        With batch statistics, blend them with these: ``μ = p·prior_mean + (1-p)·μ_b``,
        ``σ² = p·prior_var + (1-p)·σ²_b`` with ``p = prior_weight``; the backward is
        exact for the blend.  Test-time adaptation is built on this.
    prior_weight : float in [0, 1]
        p, the weight of the prior; 0 (the default) uses the batch's statistics alone.
    unbiased : bool
        Blend the batch's unbiased variance ``σ²_b·m/(m-1)`` instead of the biased one.
    out : ndarray, optional
        A preallocated C-contiguous output of x's shape and dtype, not overlapping x;
        written and returned instead of a new array.

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : BatchNormCache
        ``cache.mean`` and ``cache.var`` are the statistics used; ``cache.batch_mean``
        and ``cache.batch_var`` the batch's own (biased) ones, for updating running
        statistics; ``cache.count`` the number of values per channel.

    Examples
    --------
    Batch statistics (train mode): every channel comes out with mean 0 and variance 1,
    in the input's dtype, while the statistics are float64.

    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(3.0, 2.0, size=(256, 4)).astype(np.float32)
    >>> y, cache = F.batch_norm_forward(x)
    >>> y.shape, y.dtype, cache.mean.dtype, cache.count
    ((256, 4), dtype('float32'), dtype('float64'), 256)
    >>> np.allclose(y.mean(axis=0), 0, atol=1e-5), np.allclose(y.var(axis=0), 1, atol=1e-3)
    (True, True)

    Given statistics (eval mode), with γ and β:

    >>> y, _ = F.batch_norm_forward([[1.0, 4.0]], [2.0, 2.0], [1.0, 1.0], mean=[1.0, 2.0], var=[1.0, 4.0])
    >>> y.round(4)
    array([[1., 3.]])

    Channels-last input with ``axis=-1`` gives what channels-first input gives:

    >>> x4 = rng.standard_normal((2, 3, 3, 4))                      # (N, H, W, C)
    >>> y_last, _ = F.batch_norm_forward(x4, axis=-1)
    >>> y_first, _ = F.batch_norm_forward(x4.transpose(0, 3, 1, 2))  # (N, C, H, W)
    >>> np.allclose(y_last, y_first.transpose(0, 2, 3, 1))
    True

    A blend with a prior, as test-time adaptation uses it:

    >>> _, cache = F.batch_norm_forward(x, prior_mean=np.zeros(4), prior_var=np.ones(4), prior_weight=0.25)
    >>> np.allclose(cache.mean, 0.75 * cache.batch_mean)
    True
    """
    if is_device(x):
        return _gpu().batch_norm_forward(
            x, weight, bias, mean=mean, var=var, eps=eps, axis=axis, prior_mean=prior_mean, prior_var=prior_var,
            prior_weight=prior_weight, unbiased=unbiased, out=out,
        )
    x = as_float_array(x)
    eps = check_positive_float(eps, "eps")
    x3, cols, C = _bn_view(x, axis)
    count = x.size // C if C else 0
    w = _vec(weight, C, "weight")
    b = _vec(bias, C, "bias")
    batch_stats, p = _bn_stat_mode(mean, var, prior_weight, count, x.shape)
    bmu = bvar = None
    c = 1.0
    if batch_stats:
        _, bmu, bvar = batch_moments(x3, axis=1)
        c = count / (count - 1) if unbiased else 1.0
        mu, v = bmu, bvar * c
        if p > 0.0:
            pm, pv = _vec(prior_mean, C, "prior_mean"), _vec(prior_var, C, "prior_var")
            if pm is None or pv is None:
                raise ValueError("prior_weight > 0 needs prior_mean and prior_var")
            mu = p * pm + (1.0 - p) * bmu
            v = p * pv + (1.0 - p) * v
    else:
        mu = _vec(mean, C, "mean")
        v = _vec(var, C, "var")
    y, rstd = _bn_normalize(x, x3, cols, mu, v, w, b, eps, out)
    cache = BatchNormCache(x3, cols, mu, v, rstd, w, count, batch_stats, x.shape, bmu, bvar, p, c)
    return y, cache


def batch_norm_backward(dy, cache: BatchNormCache, out: np.ndarray | None = None):
    """Batch normalization backward (docs/math.rst), exact and analytic.

    Train mode (batch statistics), per channel over its m values:
    ``dx = (γ r / m)·(m·dy − Σdy − x̂·Σ(dy·x̂))``; eval mode ``dx = γ r dy``.
    In both, ``dγ = Σ dy·x̂`` and ``dβ = Σ dy``.  For blended statistics (see
    :func:`batch_norm_forward`) the statistics' terms are scaled by ``(1 − p)`` and the
    variance term by ``c``:
    ``dx = γr·dy − γr(1−p)·Σdy/m − γr³(1−p)c·(x − μ_b)·Σdy(x − μ)/m``.

    Parameters
    ----------
    dy : array_like, the shape of the forward input
        float32 or float64.
    cache : BatchNormCache, from :func:`batch_norm_forward`
        The forward's cache; it holds a reference to the input.
    out : ndarray, optional
        A preallocated C-contiguous array for dx (the input's shape, dtype
        ``result_type(x, dy)``) that overlaps neither x nor dy.

    Returns
    -------
    dx : ndarray, the shape of the input, dtype ``result_type(x, dy)``
    dweight, dbias : ndarray of float64, shape (C,)

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((64, 3)), rng.standard_normal((64, 3))
    >>> w = np.array([1.0, 2.0, 0.5])
    >>> y, cache = F.batch_norm_forward(x, w)
    >>> dx, dweight, dbias = F.batch_norm_backward(dy, cache)
    >>> dx.shape, dx.dtype, dweight.shape, dbias.dtype
    ((64, 3), dtype('float64'), (3,), dtype('float64'))
    >>> np.allclose(dbias, dy.sum(axis=0)), np.allclose(dx.sum(axis=0), 0)
    (True, True)

    ``dx`` is the exact gradient of the loss ``Σ y·dy``; a central difference agrees:

    >>> loss = lambda x: (F.batch_norm_forward(x, w)[0] * dy).sum()
    >>> e = np.zeros_like(x)
    >>> e[5, 1] = 1e-6
    >>> np.allclose((loss(x + e) - loss(x - e)) / 2e-6, dx[5, 1], rtol=1e-5)
    True

    With given statistics (eval mode) the statistics are constants: ``dx = γ·r·dy``.

    >>> _, cache = F.batch_norm_forward(x, w, mean=np.zeros(3), var=np.full(3, 4.0))
    >>> dx, _, _ = F.batch_norm_backward(dy, cache)
    >>> np.allclose(dx, w * dy / np.sqrt(4.0 + 1e-5))
    True
    """
    if is_device(cache.x3):
        return _gpu().batch_norm_backward(dy, cache, out)
    x3 = cache.x3
    shape = x3.shape
    dy = as_float_array(dy, "dy")
    if dy.shape != cache.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the forward input had shape {cache.shape}")
    out_shape = dy.shape
    dy3 = canonical_view(dy, shape)
    if not cache.cols:
        dy3 = np.ascontiguousarray(dy3)
    C = cache.mean.shape[0]
    r = cache.rstd
    g = np.ones(C) if cache.weight is None else cache.weight
    k1 = g * r
    dx = _output(out, dy, shape, _out_dtype(x3, dy3), (x3,))
    # the sums are taken around the batch mean where there is one (the dx kernel needs
    # x - μ_b), and Σdy(x - μ) follows from Σdy(x - μ_b) + (μ_b - μ)·Σdy
    center = cache.batch_mean if cache.batch_stats else cache.mean
    if dx.size:
        s1, s2 = K.bn_sums(dy3, x3, center, k1, dx, not cache.batch_stats)
    else:
        s1, s2 = np.zeros(C), np.zeros(C)
    if cache.batch_stats:
        s2 = s2 + (center - cache.mean) * s1
    dbias = s1
    dweight = r * s2
    if cache.batch_stats and dx.size:
        m = float(cache.count)
        q = 1.0 - cache.prior_weight
        k2 = -g * r * r * q * cache.var_factor * dweight / m
        k3 = -k1 * q * s1 / m
        K.bn_dx(dy3, x3, center, k1, k2, k3, dx)
    return dx.reshape(out_shape), dweight, dbias


# ---------------------------------------------------------------------------
# Synchronized BatchNorm: one BatchNorm over the union of the ranks' batches
# ---------------------------------------------------------------------------


class SyncBatchNormCache(NamedTuple):
    """What :func:`sync_batch_norm_backward` needs from the forward.

    ``local`` is the cache of this rank's batch, normalized with the global statistics:
    its ``mean``, ``var`` (biased) and ``rstd`` are the (C,) float64 statistics of the
    union of every rank's batch, its ``count`` the values per channel on this rank.
    ``count`` is m, the values per channel over all ranks, and ``counts`` each rank's
    share, in rank order.

    Attributes
    ----------
    local : BatchNormCache
        This rank's cache; ``local.mean``, ``local.var`` and ``local.rstd`` are (C,)
        float64 and the same on every rank.
    count : int
        m, the number of values per channel over all ranks.
    counts : tuple of int
        Each rank's number of values per channel, in rank order.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> _, cache = F.sync_batch_norm_forward(np.arange(12.0).reshape(6, 2))   # one process
    >>> cache.count, cache.counts, cache.local.mean
    (6, (6,), array([5., 6.]))
    """

    local: BatchNormCache
    count: int
    counts: tuple[int, ...]


def sync_batch_norm_forward(x, weight=None, bias=None, comm=None, *, eps: float = 1e-5, axis: int = 1):
    """Batch normalization forward with statistics over every rank's batch (docs/math.rst).

    Each rank reduces its batch to per-channel moments ``(n, μ, M2)``, the ranks
    allgather them, and every rank merges the list with Chan's formula in rank order,
    so every rank holds the same global ``(m, μ, M2)``, bit for bit.  Each rank then
    normalizes its own batch with ``μ`` and the biased ``σ² = M2/m``: the result is
    one train-mode BatchNorm over the concatenation of the ranks' batches, in rank
    order.  A rank with an empty batch (N = 0) contributes nothing and still takes
    part.  One collective call; it sends 2C + 1 numbers per rank.

    Parameters
    ----------
    x : array_like, shape (N, C, *S) or, with ``axis=-1``, (N, *S, C)
        This rank's batch, float32 or float64 (integers are cast to float64).  N may
        differ between ranks and may be 0.
    weight, bias : array_like of shape (C,), optional
        γ and β (γ = 1, β = 0 when None); the same on every rank.
    comm : Communicator, optional
        See :mod:`streamnorm.comm`; None is a single process.  Every rank must call
        with the same C.
    eps : float
        Added to the variance under the square root.
    axis : int
        The channel axis (1 by default; -1 for channels-last).

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : SyncBatchNormCache
        ``cache.local.mean`` and ``cache.local.var`` are the global mean and biased
        variance, (C,) float64; ``cache.count`` the global number of values per channel.

    Raises
    ------
    ValueError
        When the global count m is 0 or 1 (the variance is undefined), or the ranks
        disagree on C: on every rank alike.
    RuntimeError
        On every other rank, when one rank's input is invalid (that rank raises its own
        error): no rank is left waiting in a later collective.

    Examples
    --------
    Without a communicator (a single process) it is :func:`batch_norm_forward` in train
    mode; with one, every rank runs the same lines on its own batch
    (:doc:`/sync_batchnorm` shows an MPI job).

    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(1.0, 2.0, size=(16, 3, 5)).astype(np.float32)
    >>> y, cache = F.sync_batch_norm_forward(x, np.ones(3), np.zeros(3))
    >>> y.shape, y.dtype, cache.count, cache.local.var.dtype
    ((16, 3, 5), dtype('float32'), 80, dtype('float64'))
    >>> np.allclose(y, F.batch_norm_forward(x, np.ones(3), np.zeros(3))[0], atol=1e-6)
    True
    """
    comm = as_communicator(comm)
    try:
        if is_device(x):
            raise TypeError(
                "sync_batch_norm_forward takes host arrays: its statistics travel through the "
                "communicator as NumPy buffers, and GPU input is not supported"
            )
        x = as_float_array(x)
        eps = check_positive_float(eps, "eps")
        x3, cols, C = _bn_view(x, axis)
        w = _vec(weight, C, "weight")
        b = _vec(bias, C, "bias")
        state = _bn_state(x3, cols, C)
        error = None
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised
        state, error = None, exc
    states = allgather_checked(comm, state, error, what="SyncBatchNorm forward")
    shapes = [s[1].shape for s in states]
    if any(shp != (C,) for shp in shapes):
        raise ValueError(f"SyncBatchNorm: the ranks disagree on the number of channels: {[s[0] for s in shapes]}")
    counts = tuple(int(s[0]) for s in states)
    m = sum(counts)
    if m <= 1:
        raise ValueError(
            f"SyncBatchNorm with batch statistics needs more than 1 value per channel over all ranks, "
            f"got {m} (values per channel on ranks 0..{len(counts) - 1}: {list(counts)}): the variance "
            f"is undefined"
        )
    # Chan's merge in rank order: the same sequence of operations, hence the same bits,
    # on every rank; a rank with n = 0 leaves the state exactly as it was
    n, mu, m2 = np.zeros(C), np.zeros(C), np.zeros(C)
    for cnt, smu, sm2 in states:
        if cnt:
            n, mu, m2 = K.merge_states(n, mu, m2, np.full(C, float(cnt)), smu, sm2)
    var = m2 / float(m)
    y, rstd = _bn_normalize(x, x3, cols, mu, var, w, b, eps)
    local = BatchNormCache(x3, cols, mu, var, rstd, w, counts[comm.rank], False, x.shape)
    return y, SyncBatchNormCache(local, m, counts)


def _bn_state(x3: np.ndarray, cols: bool, C: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) per channel of a BatchNorm canonical view; zeros when empty."""
    count = x3.size // C if C else 0
    if count == 0:
        return 0, np.zeros(C), np.zeros(C)
    if cols:
        _, mu, m2 = _moments.col_moments(x3.reshape(1, *x3.shape))
    else:
        _, mu, m2 = _moments.ncl_moments(x3)
    return count, mu, m2


def sync_batch_norm_backward(dy, cache: SyncBatchNormCache, comm=None):
    """Backward of :func:`sync_batch_norm_forward`, exact and analytic.

    Each rank forms ``Σdy`` and ``Σdy·(x − μ)`` per channel over its batch; the ranks
    allgather them and every rank adds them up in rank order (the same bits on every
    rank).  With m and the sums global, and r = 1/sqrt(σ² + eps),
    ``dx = γr·dy − γr·Σdy/m − γr³(x − μ)·Σdy(x − μ)/m``,
    ``dγ = r·Σdy(x − μ)`` and ``dβ = Σdy``.  ``dx`` is this rank's slice of the input
    gradient of the global BatchNorm; ``dγ`` and ``dβ`` are the gradients over the
    whole global batch, on every rank, as if they had been allreduced.  One collective
    call; it sends 2C numbers per rank.

    Parameters
    ----------
    dy : array_like, the shape of this rank's forward input
        float32 or float64.
    cache : SyncBatchNormCache, from :func:`sync_batch_norm_forward`
        The forward's cache.
    comm : Communicator, optional
        The communicator of the forward.

    Returns
    -------
    dx : ndarray, the shape of the input, dtype ``result_type(x, dy)``
    dweight, dbias : ndarray of float64, shape (C,)
        The global sums, identical on every rank.

    Examples
    --------
    In a single process it is the train-mode :func:`batch_norm_backward`:

    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((16, 3)), rng.standard_normal((16, 3))
    >>> _, cache = F.sync_batch_norm_forward(x)
    >>> dx, dweight, dbias = F.sync_batch_norm_backward(dy, cache)
    >>> dx.shape, dweight.shape, dbias.dtype
    ((16, 3), (3,), dtype('float64'))
    >>> _, ref_cache = F.batch_norm_forward(x)
    >>> all(np.allclose(a, b) for a, b in zip((dx, dweight, dbias), F.batch_norm_backward(dy, ref_cache)))
    True
    """
    comm = as_communicator(comm)
    loc = cache.local
    x3 = loc.x3
    C = loc.mean.shape[0]
    g = np.ones(C) if loc.weight is None else loc.weight
    r = loc.rstd
    k1 = g * r
    try:
        dy = as_float_array(dy, "dy")
        if dy.shape != loc.shape:
            raise ValueError(f"dy has shape {dy.shape}, but the forward input had shape {loc.shape}")
        dy3 = canonical_view(dy, x3.shape)
        if not loc.cols:
            dy3 = np.ascontiguousarray(dy3)
        dx = _memory.empty(x3.shape, _out_dtype(x3, dy3), near=x3)
        if dx.size:
            part = K.bn_sums(dy3, x3, loc.mean, k1, dx, False)
        else:
            part = (np.zeros(C), np.zeros(C))
        error = None
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised
        part, error = None, exc
    parts = allgather_checked(comm, part, error, what="SyncBatchNorm backward")
    s1, s2 = np.zeros(C), np.zeros(C)
    for p1, p2 in parts:
        s1 = s1 + p1
        s2 = s2 + p2
    dbias = s1
    dweight = r * s2
    if dx.size:
        m = float(cache.count)
        k2 = -g * r * r * dweight / m
        k3 = -k1 * s1 / m
        K.bn_dx(dy3, x3, loc.mean, k1, k2, k3, dx)
    return dx.reshape(dy.shape), dweight, dbias


# ---------------------------------------------------------------------------
# LayerNorm (and the row-wise machinery RMSNorm shares)
# ---------------------------------------------------------------------------


class RowNormCache(NamedTuple):
    """What the row-wise backward needs: the (R, D) input view and (R,) float64 stats.

    R is the number of rows, ``prod(B)`` for input (*B, *normalized_shape), and D the
    number of values per row, ``prod(normalized_shape)``.

    Attributes
    ----------
    x2 : ndarray, shape (R, D)
        The input's contiguous row view, in the input's dtype (float32 or float64).
    mean : ndarray of float64, shape (R,)
        Row means (zeros for RMSNorm, which does not center).
    rstd : ndarray of float64, shape (R,)
        ``1/sqrt(var + eps)`` per row, or ``1/sqrt(mean(x²) + eps)`` for RMSNorm.
    weight : ndarray of float64, shape (D,)
        γ, flattened (ones when the forward had none).
    has_weight, has_bias : bool
        Whether the forward had a weight and a bias.
    center : bool
        True for LayerNorm, False for RMSNorm.
    normalized_shape : tuple of int
        The trailing shape normalized together.
    shape : tuple of int
        The shape of the forward input.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> y, cache = F.layer_norm_forward(np.zeros((2, 3, 4), dtype=np.float32), (3, 4))
    >>> cache.x2.shape, cache.mean.shape, cache.rstd.dtype, cache.has_weight
    ((2, 12), (2,), dtype('float64'), False)
    """

    x2: np.ndarray
    mean: np.ndarray
    rstd: np.ndarray
    weight: np.ndarray
    has_weight: bool
    has_bias: bool
    center: bool
    normalized_shape: tuple[int, ...]
    shape: tuple[int, ...]


def _norm_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    shp = tuple(int(s) for s in normalized_shape)
    if any(s <= 0 for s in shp) or not shp:
        raise ValueError(f"normalized_shape must be a non-empty tuple of positive sizes, got {normalized_shape!r}")
    return shp


def _rownorm_forward(x, normalized_shape, weight, bias, eps, center, out=None):
    if is_device(x):
        return _gpu().rownorm_forward(x, normalized_shape, weight, bias, eps, center, out)
    x = as_float_array(x)
    ns = _norm_shape(normalized_shape)
    k = len(ns)
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != ns:
        raise ValueError(f"input of shape {x.shape} does not end with normalized_shape {ns}")
    eps = check_positive_float(eps, "eps")
    D = int(np.prod(ns, dtype=np.int64))
    R = x.size // D
    x2 = np.ascontiguousarray(canonical_view(x, (R, D)))  # rows must be contiguous
    w = _vec(weight, D, "weight")
    b = _vec(bias, D, "bias")
    wk = np.ones(D) if w is None else w
    bk = np.zeros(D) if b is None else b
    y = _output(out, x, (R, D))
    mean = np.empty(R)
    rstd = np.empty(R)
    if R:
        # γ and β are read beside every row: on a cache line (see _memory.lined), in
        # float32 where the row is written in float32 arithmetic (K._row_out)
        pdt = np.float32 if x2.dtype == np.float32 and y.dtype == np.float32 else np.float64
        wl = _memory.lined(np.asarray(wk, dtype=pdt))
        bl = _memory.lined(np.asarray(bk, dtype=pdt))
        stream = _memory.streaming(y, D)
        K.rownorm_fwd(x2, wl, bl, eps, center, y.reshape(R, D), mean, rstd, _moments.nthreads(), stream)
    cache = RowNormCache(x2, mean, rstd, wk, w is not None, b is not None, center, ns, x.shape)
    return y.reshape(x.shape), cache


def _rownorm_backward(dy, cache: RowNormCache, out=None):
    if is_device(cache.x2):
        return _gpu().rownorm_backward(dy, cache, out)
    x2 = cache.x2
    dy = as_float_array(dy, "dy")
    if dy.shape != cache.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the forward input had shape {cache.shape}")
    dy2 = np.ascontiguousarray(canonical_view(dy, x2.shape))
    dx = _output(out, dy, x2.shape, _out_dtype(x2, dy2), (x2,))
    if x2.shape[0]:
        single = x2.dtype == dy2.dtype == dx.dtype == np.float32  # dx in float32 (K._row_dx)
        wdx = _memory.lined(np.asarray(cache.weight, dtype=np.float32 if single else np.float64))
        dw, db = K.rownorm_bwd(
            dy2, x2, _memory.lined(cache.weight), wdx, cache.mean, cache.rstd, cache.center, dx,
            _moments.nthreads(), _memory.streaming(dx, x2.shape[1]),
        )
    else:
        dw = np.zeros(x2.shape[1])
        db = np.zeros(x2.shape[1])
    ns = cache.normalized_shape
    dweight = dw.reshape(ns) if cache.has_weight else None
    dbias = db.reshape(ns) if cache.has_bias else None
    return dx.reshape(dy.shape), dweight, dbias


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5, out=None):
    """Layer normalization forward (docs/layers).

    Parameters
    ----------
    x : array_like, shape (*B, *normalized_shape), float32 or float64
        The input; integers are cast to float64.
    normalized_shape : int or tuple of int
        The trailing dimensions D to normalize over.
    weight, bias : array_like of shape normalized_shape, optional
        Elementwise γ and β.
    eps : float
        Added to the variance under the square root.
    out : ndarray, optional
        A preallocated C-contiguous output of x's shape and dtype, not overlapping x.

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : RowNormCache
        ``cache.mean`` and ``cache.rstd`` are the (R,) float64 row statistics,
        R = prod(B).

    Examples
    --------
    Each row of D values comes out with mean 0 and variance 1:

    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> y, cache = F.layer_norm_forward(np.array([[1.0, 2.0, 3.0]]), 3)
    >>> y.round(4), cache.mean, cache.rstd.round(4)
    (array([[-1.2247,  0.    ,  1.2247]]), array([2.]), array([1.2247]))

    A batch of sequences, normalized over the feature axis, with γ and β:

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(5.0, 2.0, size=(2, 3, 8)).astype(np.float32)   # (batch, time, features)
    >>> y, cache = F.layer_norm_forward(x, 8, np.ones(8), np.zeros(8))
    >>> y.shape, y.dtype, cache.mean.shape
    ((2, 3, 8), dtype('float32'), (6,))
    >>> np.allclose(y.mean(axis=-1), 0, atol=1e-6), np.allclose(y.var(axis=-1), 1, atol=1e-4)
    (True, True)
    """
    return _rownorm_forward(x, normalized_shape, weight, bias, eps, True, out)


def layer_norm_backward(dy, cache: RowNormCache, out: np.ndarray | None = None):
    """Layer normalization backward (docs/layers).

    With ``g = dy·γ``: ``dx = (r/D)·(D·g − Σg − x̂·Σ(g·x̂))``, ``dγ = Σ_rows dy·x̂``,
    ``dβ = Σ_rows dy``.  ``out``: as in :func:`batch_norm_backward`.

    Parameters
    ----------
    dy : array_like, the shape of the forward input
        float32 or float64.
    cache : RowNormCache, from :func:`layer_norm_forward`
        The forward's cache.
    out : ndarray, optional
        A preallocated C-contiguous array for dx.

    Returns
    -------
    dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
    dweight, dbias : float64 arrays of shape normalized_shape, or None where the
        forward had no weight or bias.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    >>> y, cache = F.layer_norm_forward(x, 6, np.full(6, 2.0), np.zeros(6))
    >>> dx, dweight, dbias = F.layer_norm_backward(dy, cache)
    >>> dx.shape, dweight.shape, dbias.dtype
    ((4, 6), (6,), dtype('float64'))
    >>> np.allclose(dx.sum(axis=-1), 0), np.allclose(dbias, dy.sum(axis=0))
    (True, True)

    Without a weight or bias in the forward, their gradients are None:

    >>> _, cache = F.layer_norm_forward(x, 6)
    >>> F.layer_norm_backward(dy, cache)[1:]
    (None, None)
    """
    return _rownorm_backward(dy, cache, out)


def rms_norm_forward(x, normalized_shape, weight=None, eps: float | None = None, out=None):
    """RMS normalization forward (docs/layers): ``y = γ·x / sqrt(mean(x²) + eps)``.

    Parameters
    ----------
    x : array_like, shape (*B, *normalized_shape), float32 or float64
        The input; integers are cast to float64.
    normalized_shape : int or tuple of int
        The trailing dimensions D to normalize over.
    weight : array_like of shape normalized_shape, optional
        Elementwise γ.
    eps : float or None
        None means the machine epsilon of x's dtype, as PyTorch does.
    out : ndarray, optional
        A preallocated C-contiguous output of x's shape and dtype, not overlapping x.

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : RowNormCache
        ``cache.rstd`` is the (R,) float64 ``1/sqrt(mean(x²) + eps)`` of each row.

    Examples
    --------
    Each row is divided by its root mean square; nothing is subtracted:

    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> y, cache = F.rms_norm_forward(np.array([[3.0, 4.0], [1.0, -1.0]]), 2)
    >>> y.round(4)
    array([[ 0.8485,  1.1314],
           [ 1.    , -1.    ]])
    >>> cache.rstd.round(4)
    array([0.2828, 1.    ])
    >>> y, _ = F.rms_norm_forward(np.ones((2, 5, 4), dtype=np.float32), 4, weight=np.full(4, 0.5))
    >>> y.shape, y.dtype, round(float(y.max()), 6)
    ((2, 5, 4), dtype('float32'), 0.5)
    """
    if not is_device(x):
        x = as_float_array(x)
        if eps is None:
            eps = float(np.finfo(x.dtype).eps)
    return _rownorm_forward(x, normalized_shape, weight, None, eps, False, out)


def rms_norm_backward(dy, cache: RowNormCache, out: np.ndarray | None = None):
    """RMS normalization backward: with ``g = dy·γ``, ``dx = r·(g − x̂·mean(g·x̂))``.

    Parameters
    ----------
    dy : array_like, the shape of the forward input
        float32 or float64.
    cache : RowNormCache, from :func:`rms_norm_forward`
        The forward's cache.
    out : ndarray, optional
        A preallocated C-contiguous array for dx, as in :func:`batch_norm_backward`.

    Returns
    -------
    dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
    dweight : float64 array of shape normalized_shape, or None without a weight

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((4, 8)), rng.standard_normal((4, 8))
    >>> y, cache = F.rms_norm_forward(x, 8, np.ones(8))
    >>> dx, dweight = F.rms_norm_backward(dy, cache)
    >>> dx.shape, dweight.shape, dweight.dtype
    ((4, 8), (8,), dtype('float64'))
    >>> np.allclose(dweight, (dy * y).sum(axis=0))
    True
    """
    dx, dw, _ = _rownorm_backward(dy, cache, out)
    return dx, dw


# ---------------------------------------------------------------------------
# GroupNorm and InstanceNorm
# ---------------------------------------------------------------------------


class GroupNormCache(NamedTuple):
    """The contiguous (N*G, C/G, L) input view, (N*G,) float64 statistics, γ, shape.

    Attributes
    ----------
    x3 : ndarray, shape (N*G, C/G, L)
        The input's contiguous view, in the input's dtype (float32 or float64);
        L = prod(S).
    mean, var : ndarray of float64, shape (N*G,)
        Mean and biased variance of each (sample, group) block.
    rstd : ndarray of float64, shape (N*G,)
        ``1/sqrt(var + eps)``.
    weight : ndarray of float64, shape (C,)
        γ (ones when the forward had none).
    num_groups : int
        G.
    shape : tuple of int
        The shape of the forward input.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> _, cache = F.group_norm_forward(np.zeros((2, 6, 5)), 3)
    >>> cache.x3.shape, cache.mean.shape, cache.num_groups
    ((6, 2, 5), (6,), 3)
    """

    x3: np.ndarray
    mean: np.ndarray
    rstd: np.ndarray
    var: np.ndarray
    weight: np.ndarray
    num_groups: int
    shape: tuple[int, ...]


def group_norm_forward(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, out=None):
    """Group normalization forward (docs/layers): LayerNorm over each (sample, group) block.

    Parameters
    ----------
    x : array_like, shape (N, C, *S), float32 or float64
        The input; integers are cast to float64.
    num_groups : int
        G; C must be divisible by G.
    weight, bias : array_like of shape (C,), optional
        Per-channel γ and β.
    eps : float
        Added to the variance under the square root.
    out : ndarray, optional
        A preallocated C-contiguous output of x's shape and dtype, not overlapping x.

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : GroupNormCache
        ``cache.mean`` and ``cache.var`` (biased) are (N*G,) float64.

    Examples
    --------
    Four channels in two groups: each (sample, group) block of 2·3·3 values comes out
    with mean 0 and variance 1.

    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(2.0, 3.0, size=(2, 4, 3, 3)).astype(np.float32)
    >>> y, cache = F.group_norm_forward(x, 2, np.ones(4), np.zeros(4))
    >>> y.shape, y.dtype, cache.mean.shape, cache.var.dtype
    ((2, 4, 3, 3), dtype('float32'), (4,), dtype('float64'))
    >>> blocks = y.reshape(2, 2, -1)                  # (N, G, C/G·H·W)
    >>> np.allclose(blocks.mean(axis=-1), 0, atol=1e-6), np.allclose(blocks.var(axis=-1), 1, atol=1e-4)
    (True, True)
    """
    if is_device(x):
        return _gpu().group_norm_forward(x, num_groups, weight, bias, eps, out)
    x = as_float_array(x)
    if x.ndim < 2:
        raise ValueError(f"GroupNorm expects input of shape (N, C, ...), got {x.shape}")
    N, C = x.shape[:2]
    G = int(num_groups)
    if G <= 0 or C % G:
        raise ValueError(f"{C} channels cannot be split into {num_groups} groups of equal size")
    eps = check_positive_float(eps, "eps")
    L = int(np.prod(x.shape[2:], dtype=np.int64))
    x3 = np.ascontiguousarray(canonical_view(x, (N * G, C // G, L)))
    w = _vec(weight, C, "weight")
    b = _vec(bias, C, "bias")
    wk = np.ones(C) if w is None else w
    bk = np.zeros(C) if b is None else b
    y = _output(out, x, x3.shape)
    mean = np.empty(N * G)
    rstd = np.empty(N * G)
    var = np.empty(N * G)
    if x3.size:
        stream = _memory.streaming(y, x3.shape[2])
        K.groupnorm_fwd(x3, wk, bk, G, eps, y, mean, var, rstd, _moments.nthreads(), stream)
    return y.reshape(x.shape), GroupNormCache(x3, mean, rstd, var, wk, G, x.shape)


def group_norm_backward(dy, cache: GroupNormCache, out: np.ndarray | None = None):
    """Group normalization backward: the LayerNorm formulas per (sample, group) block.

    Parameters
    ----------
    dy : array_like, the shape of the forward input
        float32 or float64.
    cache : GroupNormCache, from :func:`group_norm_forward`
        The forward's cache.
    out : ndarray, optional
        A preallocated C-contiguous array for dx, as in :func:`batch_norm_backward`.

    Returns
    -------
    dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
    dweight, dbias : float64 arrays of shape (C,)

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 4, 5))
    >>> _, cache = F.group_norm_forward(x, 2)
    >>> dx, dweight, dbias = F.group_norm_backward(dy, cache)
    >>> dx.shape, dweight.shape, dbias.dtype
    ((2, 4, 5), (4,), dtype('float64'))
    >>> np.allclose(dx.reshape(2, 2, -1).sum(axis=-1), 0), np.allclose(dbias, dy.sum(axis=(0, 2)))
    (True, True)
    """
    if is_device(cache.x3):
        return _gpu().group_norm_backward(dy, cache, out)
    dy = as_float_array(dy, "dy")
    if dy.shape != cache.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the forward input had shape {cache.shape}")
    x3 = cache.x3
    dy3 = np.ascontiguousarray(canonical_view(dy, x3.shape))
    dx = _output(out, dy, x3.shape, _out_dtype(x3, dy3), (x3,))
    C = cache.weight.shape[0]
    if x3.size:
        dw, db = K.groupnorm_bwd(
            dy3, x3, cache.weight, cache.num_groups, cache.mean, cache.rstd, dx, _moments.nthreads(),
            _memory.streaming(dx, x3.shape[2]),
        )
    else:
        dw, db = np.zeros(C), np.zeros(C)
    return dx.reshape(dy.shape), dw, db


def instance_norm_forward(x, weight=None, bias=None, *, mean=None, var=None, eps: float = 1e-5, out=None):
    """Instance normalization forward: per (sample, channel) statistics over *S.

    With ``mean`` and ``var`` of shape (C,) (running statistics, eval mode) every
    instance is normalized with them instead, exactly like BatchNorm in eval mode.

    Parameters
    ----------
    x : array_like, shape (N, C, *S) with prod(S) > 1 for instance statistics
        float32 or float64; integers are cast to float64.
    weight, bias : array_like of shape (C,), optional
        Per-channel γ and β.
    mean, var : array_like of shape (C,), optional
        Statistics to normalize every instance with (eval mode with running statistics).
    eps : float
        Added to the variance under the square root.
    out : ndarray, optional
        A preallocated C-contiguous output of x's shape and dtype, not overlapping x.

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : GroupNormCache (instance statistics) or BatchNormCache (given statistics)
        For instance statistics, ``cache.mean`` and ``cache.var`` are (N*C,) float64.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(1.0, 2.0, size=(2, 3, 16)).astype(np.float32)   # (N, C, L)
    >>> y, cache = F.instance_norm_forward(x)
    >>> y.dtype, type(cache).__name__, cache.mean.shape
    (dtype('float32'), 'GroupNormCache', (6,))
    >>> np.allclose(y.mean(axis=-1), 0, atol=1e-6), np.allclose(y.var(axis=-1), 1, atol=1e-4)
    (True, True)

    With given statistics every instance is normalized with them:

    >>> y, cache = F.instance_norm_forward(x, mean=np.ones(3), var=np.full(3, 4.0))
    >>> type(cache).__name__, np.allclose(y, (x - 1.0) / np.sqrt(4.0 + 1e-5), atol=1e-6)
    ('BatchNormCache', True)
    """
    if not is_device(x):
        x = as_float_array(x)
    if x.ndim < 3:
        raise ValueError(f"InstanceNorm expects input of shape (N, C, *S) with spatial dims, got {x.shape}")
    if mean is not None or var is not None:
        return batch_norm_forward(x, weight, bias, mean=mean, var=var, eps=eps, axis=1, out=out)
    L = int(np.prod(tuple(x.shape[2:]), dtype=np.int64))
    if L <= 1:
        raise ValueError(
            f"InstanceNorm with instance statistics needs more than 1 spatial value per channel, "
            f"got input of shape {x.shape}"
        )
    return group_norm_forward(x, x.shape[1], weight, bias, eps, out=out)


def instance_norm_backward(dy, cache, out: np.ndarray | None = None):
    """Instance normalization backward; dispatches on the cache type of the forward.

    Parameters
    ----------
    dy : array_like, the shape of the forward input
        float32 or float64.
    cache : GroupNormCache or BatchNormCache, from :func:`instance_norm_forward`
        The forward's cache.
    out : ndarray, optional
        A preallocated C-contiguous array for dx, as in :func:`batch_norm_backward`.

    Returns
    -------
    dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
    dweight, dbias : float64 arrays of shape (C,)

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    >>> _, cache = F.instance_norm_forward(x, np.ones(3), np.zeros(3))
    >>> dx, dweight, dbias = F.instance_norm_backward(dy, cache)
    >>> dx.shape, dweight.shape
    ((2, 3, 8), (3,))
    >>> np.allclose(dx.sum(axis=-1), 0), np.allclose(dbias, dy.sum(axis=(0, 2)))
    (True, True)
    """
    if isinstance(cache, BatchNormCache):
        return batch_norm_backward(dy, cache, out)
    return group_norm_backward(dy, cache, out)


# ---------------------------------------------------------------------------
# Online Normalization
# ---------------------------------------------------------------------------


class OnlineNormCache(NamedTuple):
    """The (N, C, L) input view and the (C,) state *before* the forward call.

    Attributes
    ----------
    x3 : ndarray, shape (N, C, L)
        The input's contiguous view, in the input's dtype (float32 or float64);
        L = prod(S).
    mu0, var0 : ndarray of float64, shape (C,)
        The carried statistics before the forward call.
    weight : ndarray of float64, shape (C,)
        γ (ones when the forward had none).
    alpha_fwd, eps : float
        The forward's options.
    training : bool
        True when the forward updated the statistics.
    ecm : {None, 'ac', 'ls'}
        The forward's error compensation.
    out : ndarray, shape (N, C, L), or None
        The affine output before error compensation (with ``'ac'`` or ``'ls'`` only).
    shape : tuple of int
        The shape of the forward input.
    ls_rstd : optional
        GPU input with ``ecm='ls'`` only: each sample's 1/RMS from the forward.
    moments : ndarray of float64, shape (N, C, 2), or None
        CPU input, train mode, L > 1 only: each sample's mean and sum of squared
        deviations per channel, from which the backward replays the state.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> *_, cache = F.online_norm_forward(np.ones((4, 2, 3)), np.zeros(2), np.ones(2))
    >>> cache.x3.shape, cache.mu0, cache.training
    ((4, 2, 3), array([0., 0.]), True)
    """

    x3: np.ndarray
    mu0: np.ndarray
    var0: np.ndarray
    weight: np.ndarray
    alpha_fwd: float
    eps: float
    training: bool
    ecm: str | None
    out: np.ndarray | None  # the affine output before error compensation ('ac', 'ls')
    shape: tuple[int, ...]
    ls_rstd: Any = None  # GPU, ecm='ls': each sample's 1/RMS from the forward
    moments: np.ndarray | None = None  # CPU, train, L > 1: each sample's (mean, M2)


_ECM_CLIP = 5.0
_NO_MOMENTS = np.empty((0, 0, 2))  # a cache without them: the backward recomputes them
_ECM_LS_EPS = 1e-5


def _online_checks(mu0, var0, alpha_fwd, ecm, eps) -> float:
    """The scalar and state checks of :func:`online_norm_forward` (both backends); returns eps."""
    if mu0 is None or var0 is None:
        raise ValueError("mu and var are required (start from zeros(C) and ones(C))")
    if not 0.0 <= alpha_fwd < 1.0:
        raise ValueError(f"alpha_fwd must be in [0, 1), got {alpha_fwd!r}")
    if ecm not in (None, "ac", "ls"):
        raise ValueError(f"ecm must be None, 'ac' or 'ls', got {ecm!r}")
    return check_positive_float(eps, "eps")


def _online_threads(x3: np.ndarray) -> int:
    """Threads for the (N, C) kernels, which split the channels: each thread takes at
    least 1 KiB of every row.  Narrower slices leave the cores prefetching and writing
    each other's cache lines, which made two threads slower than one."""
    return max(1, min(_moments.nthreads(), x3.shape[1] * x3.itemsize // 1024))


def _online_view(x: np.ndarray) -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(f"OnlineNorm expects input of shape (N, C, ...), got {x.shape}")
    N, C = x.shape[:2]
    L = int(np.prod(x.shape[2:], dtype=np.int64))
    return np.ascontiguousarray(canonical_view(x, (N, C, L)))


def online_norm_forward(
    x,
    mu,
    var,
    weight=None,
    bias=None,
    *,
    alpha_fwd: float = 0.999,
    eps: float = 1e-5,
    training: bool = True,
    ecm: str | None = None,
    out: np.ndarray | None = None,
):
    """Online Normalization forward (Chiley et al. 2019; docs/layers/onlinenorm.rst).  Stateless.

    The batch axis is time: sample t is normalized with the statistics carried from
    the samples before it, then the statistics take sample t in.

    Parameters
    ----------
    x : array_like, shape (N, C, *S), float32 or float64
        N samples in time order; integers are cast to float64.
    mu, var : array_like of shape (C,)
        The carried statistics before this call (start: zeros and ones).
    weight, bias : array_like of shape (C,), optional
        Per-channel γ and β.
    alpha_fwd : float in [0, 1)
        Forward decay α_f.
    eps : float
        Added to the variance under the square root.
    training : bool
        False normalizes every sample with ``mu``, ``var`` and returns them unchanged.
    ecm : {None, 'ac', 'ls'}
        Error compensation after the affine: activation clamping to [-5, 5] or layer
        scaling by the RMS over each sample's C·L values.
    out : ndarray, optional
        A preallocated C-contiguous output of x's shape and dtype, not overlapping x
        (a GPU array for GPU input).  With ``ecm`` the affine output before the
        compensation, which the backward needs, still goes to a new array.

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    new_mu, new_var : float64 ndarrays of shape (C,)
        The statistics after the last sample (copies of ``mu``, ``var`` in eval mode).
    cache : OnlineNormCache

    Examples
    --------
    The first sample is normalized with the starting statistics (mean 0, variance 1);
    each later one with the exponential averages of the samples before it:

    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])            # (N, C): three time steps
    >>> y, mu, var, cache = F.online_norm_forward(x, np.zeros(2), np.ones(2), alpha_fwd=0.5)
    >>> y.round(4)
    array([[1.    , 2.    ],
           [2.8867, 2.4495],
           [2.3349, 2.0207]])
    >>> mu, var
    (array([3.375, 4.25 ]), array([3.609375, 4.5625  ]))

    Eval mode normalizes with the given statistics and returns them unchanged:

    >>> y, mu2, var2, _ = F.online_norm_forward(x, mu, var, training=False)
    >>> np.allclose(y, (x - mu) / np.sqrt(var + 1e-5)), np.array_equal(mu2, mu)
    (True, True)

    Over a long stream the statistics follow the data's:

    >>> rng = np.random.default_rng(0)
    >>> stream = rng.normal(3.0, 2.0, size=(4000, 2)).astype(np.float32)
    >>> y, mu, var, _ = F.online_norm_forward(stream, np.zeros(2), np.ones(2), alpha_fwd=0.99)
    >>> y.dtype, mu.round(1), var.round(1)
    (dtype('float32'), array([3.3, 3.1]), array([4.7, 4.1]))
    """
    if is_device(x):
        return _gpu().online_norm_forward(
            x, mu, var, weight, bias, alpha_fwd=alpha_fwd, eps=eps, training=training, ecm=ecm, out=out
        )
    x = as_float_array(x)
    x3 = _online_view(x)
    C = x3.shape[1]
    mu0 = _vec(mu, C, "mu")
    var0 = _vec(var, C, "var")
    eps = _online_checks(mu0, var0, alpha_fwd, ecm, eps)
    w = _vec(weight, C, "weight")
    b = _vec(bias, C, "bias")
    wk = np.ones(C) if w is None else w
    bk = np.zeros(C) if b is None else b
    out3 = None if out is None else _output(out, x, x3.shape)
    # with error compensation the affine output is kept for the backward: a new array
    y = _memory.empty(x3.shape, x.dtype, near=x3) if out3 is None or ecm is not None else out3
    new_mu, new_var = mu0.copy(), var0.copy()
    moments = None
    if x3.size:
        if training and x3.shape[2] == 1:
            K.online_fwd_cols(
                x3[:, :, 0], new_mu, new_var, float(alpha_fwd), eps, wk, bk, y[:, :, 0], _online_threads(x3),
                x.dtype == np.float32,
            )
        elif training:
            moments = np.empty((*x3.shape[:2], 2))
            K.online_fwd(x3, new_mu, new_var, float(alpha_fwd), eps, wk, bk, y, moments, _moments.nthreads())
        else:
            K.affine(x3, mu0, wk / np.sqrt(var0 + eps), bk, y)
    pre = None
    if ecm == "ac":
        pre = y
        y = np.clip(pre, -_ECM_CLIP, _ECM_CLIP, out=out3)
    elif ecm == "ls":
        pre = y
        y = np.multiply(pre, _ls_factor(pre), out=np.empty_like(pre) if out3 is None else out3, casting="same_kind")
    cache = OnlineNormCache(x3, mu0, var0, wk, float(alpha_fwd), eps, bool(training), ecm, pre, x.shape, None, moments)
    return y.reshape(x.shape), new_mu, new_var, cache


def _ls_factor(a: np.ndarray) -> np.ndarray:
    """1/sqrt(mean(a², over each sample) + eps) as a float64 (N, 1, 1) array."""
    ms = np.einsum("ncl,ncl->n", a, a, dtype=np.float64) / (a.shape[1] * a.shape[2])
    return (1.0 / np.sqrt(ms + _ECM_LS_EPS)).reshape(-1, 1, 1)


def online_norm_backward(dy, cache: OnlineNormCache, u, v, *, alpha_bkw: float = 0.99, out: np.ndarray | None = None):
    """Online Normalization backward (docs/layers/onlinenorm.rst), in the forward's sample order.

    Parameters
    ----------
    dy : array_like, the shape of the forward input
        float32 or float64.
    cache : OnlineNormCache
        From :func:`online_norm_forward`.
    u, v : array_like of shape (C,)
        The backward control state before this call (start: zeros).
    alpha_bkw : float in [0, 1)
        Backward decay α_b.
    out : ndarray, optional
        A preallocated C-contiguous dx of dy's shape and dtype ``result_type(x, dy)``,
        overlapping neither x nor dy (a GPU array for GPU input).

    Returns
    -------
    dx : ndarray, the shape of ``dy``
    dweight, dbias : float64 arrays of shape (C,)
    new_u, new_v : float64 arrays of shape (C,)
        Unchanged in eval mode, where ``dx = γ·dy/sqrt(var + eps)``.

    Examples
    --------
    The control state ``u``, ``v`` is carried from call to call, as ``mu``, ``var`` are
    in the forward:

    >>> import numpy as np
    >>> from streamnorm import functional as F
    >>> x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> dy = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> y, mu, var, cache = F.online_norm_forward(x, np.zeros(2), np.ones(2), alpha_fwd=0.5)
    >>> dx, dweight, dbias, u, v = F.online_norm_backward(dy, cache, np.zeros(2), np.zeros(2), alpha_bkw=0.5)
    >>> dx.round(4)
    array([[ 1.    ,  0.    ],
           [-2.1666,  0.8165],
           [ 3.9576, -1.2598]])
    >>> dbias, u.round(4), v.round(4)
    (array([2., 2.]), array([ 2.7909, -0.4433]), array([ 7.7997, -0.5308]))

    After an eval-mode forward, ``dx = γ·dy/sqrt(var + eps)`` and the state stays put:

    >>> _, _, _, cache = F.online_norm_forward(x, mu, var, training=False)
    >>> dx, _, _, u2, v2 = F.online_norm_backward(dy, cache, u, v)
    >>> np.allclose(dx, dy / np.sqrt(var + 1e-5)), np.array_equal(u2, u)
    (True, True)
    """
    if is_device(cache.x3):
        return _gpu().online_norm_backward(dy, cache, u, v, alpha_bkw=alpha_bkw, out=out)
    dy = as_float_array(dy, "dy")
    if dy.shape != cache.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the forward input had shape {cache.shape}")
    if not 0.0 <= alpha_bkw < 1.0:
        raise ValueError(f"alpha_bkw must be in [0, 1), got {alpha_bkw!r}")
    x3 = cache.x3
    C = x3.shape[1]
    kept = cache.moments
    if kept is not None and (
        kept.shape != (*x3.shape[:2], 2) or kept.dtype != np.float64 or not kept.flags.c_contiguous
    ):
        raise ValueError(
            f"cache.moments must be a C-contiguous float64 array of shape {(*x3.shape[:2], 2)} (or None), "
            f"got {kept.dtype} of shape {kept.shape}"
        )
    new_u = _vec(u, C, "u").copy()
    new_v = _vec(v, C, "v").copy()
    g = np.ascontiguousarray(canonical_view(dy, x3.shape))
    if cache.ecm == "ac":
        g = np.where(np.abs(cache.out) > _ECM_CLIP, 0.0, g).astype(g.dtype, copy=False)
    elif cache.ecm == "ls":
        a = cache.out
        s = _ls_factor(a)
        m = np.einsum("ncl,ncl->n", g, a, dtype=np.float64).reshape(-1, 1, 1) / (a.shape[1] * a.shape[2])
        g = (s * (g - a * (s * s) * m)).astype(g.dtype, copy=False)
    dx = _output(out, dy, x3.shape, _out_dtype(x3, g), (x3, g))
    if x3.size and x3.shape[2] == 1:
        dw, db = K.online_bwd_cols(
            g[:, :, 0], x3[:, :, 0], cache.mu0.copy(), cache.var0.copy(), new_u, new_v, cache.alpha_fwd,
            float(alpha_bkw), cache.eps, cache.weight, cache.training, dx[:, :, 0], _online_threads(x3),
            dx.dtype == np.float32,
        )
    elif x3.size:
        dw, db = K.online_bwd(
            g, x3, cache.mu0.copy(), cache.var0.copy(), new_u, new_v, cache.alpha_fwd, float(alpha_bkw),
            cache.eps, cache.weight, cache.training, _NO_MOMENTS if kept is None else kept, dx,
            _moments.nthreads(), _memory.streaming(dx, x3.shape[2]),
        )
    else:
        dw, db = np.zeros(C), np.zeros(C)
    return dx.reshape(dy.shape), dw, db, new_u, new_v
