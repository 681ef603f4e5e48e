"""Stateless forward/backward pairs: shape checks, canonical views (SPEC §1), dispatch.

Every forward returns ``(y, cache)`` and every backward takes ``(dy, cache)`` and
returns ``(dx, dweight, dbias)``.  The cache keeps a reference to the input and a few
per-channel or per-row float64 vectors, never an array of the input's size.  None of
these functions touches a layer object: a NumPy user can train with them alone.

Dtypes: inputs may be float32 or float64 (integers are cast to float64); outputs have
the input's dtype; statistics and parameter gradients are float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _kernels_cpu as K
from . import _moments
from ._validation import as_float_array, canonical_view, check_positive_float

__all__ = [
    "BatchNormCache",
    "RowNormCache",
    "batch_norm_forward",
    "batch_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
]


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

    ``x3`` is the input's canonical view, (M, C) when ``cols`` else (N, C, L);
    ``mean``, ``rstd``, ``var`` are (C,) float64; ``var`` is the biased batch variance
    when ``batch_stats`` is true, else the variance that was passed in.
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


def _bn_view(x: np.ndarray, axis: int) -> tuple[np.ndarray, bool, int]:
    """Canonical view for BatchNorm: (M, C) if the channel axis is last, else (N, C, L)."""
    if x.ndim < 2:
        raise ValueError(f"BatchNorm expects at least 2 dimensions (N, C, ...), got shape {x.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"channel axis {axis} is out of range for input of shape {x.shape}")
    ax = axis % x.ndim
    if ax == 0:
        raise ValueError("the channel axis cannot be the batch axis 0")
    c = x.shape[ax]
    n = int(np.prod(x.shape[:ax], dtype=np.int64))
    l = int(np.prod(x.shape[ax + 1 :], dtype=np.int64))
    if l == 1:
        return canonical_view(x, (n, c)), True, c
    # the (N, C, L) kernels reduce rows of L in cache and need them contiguous
    return np.ascontiguousarray(canonical_view(x, (n, c, l))), False, c


def batch_norm_forward(
    x,
    weight=None,
    bias=None,
    *,
    mean=None,
    var=None,
    eps: float = 1e-5,
    axis: int = 1,
):
    """Batch normalization forward (SPEC §3).

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

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : BatchNormCache
        ``cache.mean`` and ``cache.var`` are the statistics used (the batch's in train
        mode, for updating running statistics), ``cache.count`` the number of values per
        channel.
    """
    x = as_float_array(x)
    eps = check_positive_float(eps, "eps")
    x3, cols, C = _bn_view(x, axis)
    count = x.size // C if C else 0
    w = _vec(weight, C, "weight")
    b = _vec(bias, C, "bias")
    if (mean is None) != (var is None):
        raise ValueError("pass both mean and var (eval mode) or neither (batch statistics)")
    batch_stats = mean is None
    if batch_stats:
        if count <= 1:
            raise ValueError(
                f"BatchNorm with batch statistics needs more than 1 value per channel, got input of "
                f"shape {x.shape} ({count} value per channel): the variance is undefined"
            )
        if cols:
            _, mu, m2 = _moments.col_moments(x3.reshape(1, *x3.shape))
        else:
            _, mu, m2 = _moments.ncl_moments(x3)
        v = m2 / count
    else:
        mu = _vec(mean, C, "mean")
        v = _vec(var, C, "var")
    rstd = 1.0 / np.sqrt(v + eps)
    scale = rstd if w is None else w * rstd
    shift = np.zeros(C) if b is None else b
    y = np.empty(x3.shape, dtype=x.dtype)
    if y.size:
        (K.apply_cols if cols else K.apply_ncl)(x3, mu, scale, shift, y)
    cache = BatchNormCache(x3, cols, mu, v, rstd, w, count, batch_stats, x.shape)
    return y.reshape(x.shape), cache


def batch_norm_backward(dy, cache: BatchNormCache):
    """Batch normalization backward (SPEC §3), exact and analytic.

    Train mode (batch statistics), per channel over its m values:
    ``dx = (γ r / m)·(m·dy − Σdy − x̂·Σ(dy·x̂))``; eval mode ``dx = γ r dy``.
    In both, ``dγ = Σ dy·x̂`` and ``dβ = Σ dy``.

    Parameters
    ----------
    dy : array_like, the shape of the forward input
    cache : BatchNormCache, from :func:`batch_norm_forward`

    Returns
    -------
    dx : ndarray, the shape of the input, dtype ``result_type(x, dy)``
    dweight, dbias : ndarray of float64, shape (C,)
    """
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
    dx = np.empty(shape, dtype=_out_dtype(x3, dy3))
    sums = K.bn_bwd_sums_cols if cache.cols else K.bn_bwd_sums_ncl
    nt = _moments.nthreads()
    write_dx = not cache.batch_stats
    if dx.size:
        s1, s2 = sums(dy3, x3, cache.mean, k1, dx, write_dx, nt)
    else:
        s1, s2 = np.zeros(C), np.zeros(C)
    dbias = s1
    dweight = r * s2
    if cache.batch_stats and dx.size:
        m = float(cache.count)
        k2 = -g * r * r * dweight / m
        k3 = -k1 * s1 / m
        (K.bn_bwd_dx_cols if cache.cols else K.bn_bwd_dx_ncl)(dy3, x3, cache.mean, k1, k2, k3, dx)
    return dx.reshape(out_shape), dweight, dbias


# ---------------------------------------------------------------------------
# LayerNorm (and the row-wise machinery RMSNorm shares)
# ---------------------------------------------------------------------------


class RowNormCache(NamedTuple):
    """What the row-wise backward needs: the (R, D) input view and (R,) float64 stats."""

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


def _rownorm_forward(x, normalized_shape, weight, bias, eps, center):
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
    y = np.empty((R, D), dtype=x.dtype)
    mean = np.empty(R)
    rstd = np.empty(R)
    if R:
        K.rownorm_fwd(x2, wk, bk, eps, center, y, mean, rstd, _moments.nthreads())
    cache = RowNormCache(x2, mean, rstd, wk, w is not None, b is not None, center, ns, x.shape)
    return y.reshape(x.shape), cache


def _rownorm_backward(dy, cache: RowNormCache):
    x2 = cache.x2
    dy = as_float_array(dy, "dy")
    if dy.shape != cache.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the forward input had shape {cache.shape}")
    dy2 = np.ascontiguousarray(canonical_view(dy, x2.shape))
    dx = np.empty(x2.shape, dtype=_out_dtype(x2, dy2))
    if x2.shape[0]:
        dw, db = K.rownorm_bwd(dy2, x2, cache.weight, cache.mean, cache.rstd, cache.center, dx, _moments.nthreads())
    else:
        dw = np.zeros(x2.shape[1])
        db = np.zeros(x2.shape[1])
    ns = cache.normalized_shape
    dweight = dw.reshape(ns) if cache.has_weight else None
    dbias = db.reshape(ns) if cache.has_bias else None
    return dx.reshape(dy.shape), dweight, dbias


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """Layer normalization forward (SPEC §4).

    Parameters
    ----------
    x : array_like, shape (*B, *normalized_shape), float32 or float64
    normalized_shape : int or tuple of int
        The trailing dimensions D to normalize over.
    weight, bias : array_like of shape normalized_shape, optional
        Elementwise γ and β.
    eps : float

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : RowNormCache
        ``cache.mean`` and ``cache.rstd`` are the (R,) float64 row statistics,
        R = prod(B).
    """
    return _rownorm_forward(x, normalized_shape, weight, bias, eps, True)


def layer_norm_backward(dy, cache: RowNormCache):
    """Layer normalization backward (SPEC §4).

    With ``g = dy·γ``: ``dx = (r/D)·(D·g − Σg − x̂·Σ(g·x̂))``, ``dγ = Σ_rows dy·x̂``,
    ``dβ = Σ_rows dy``.

    Returns
    -------
    dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
    dweight, dbias : float64 arrays of shape normalized_shape, or None where the
        forward had no weight or bias.
    """
    return _rownorm_backward(dy, cache)
