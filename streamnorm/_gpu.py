"""The functional API on GPU arrays: the checks and canonical views of
:mod:`streamnorm.functional`, with the kernels of :mod:`streamnorm._cuda`.  Private.

Every function here is reached from its namesake in :mod:`streamnorm.functional` when
the input lives on the GPU, and returns the same cache types.  Caches hold
:class:`streamnorm._cuda.View` device vectors (they expose ``__cuda_array_interface__``);
outputs come back as the kind of array the input was (CuPy, PyTorch, numba).
Vectors the caller passes (weights, statistics) must be on the GPU too: streamnorm
never copies them between host and device behind the caller's back.
"""

from __future__ import annotations

import numpy as np

from . import _cuda as C
from ._backend import is_device
from ._validation import check_positive_float
from .functional import (
    _ECM_CLIP,
    _ECM_LS_EPS,
    BatchNormCache,
    GroupNormCache,
    OnlineNormCache,
    RowNormCache,
    _bn_dims,
    _bn_stat_mode,
    _norm_shape,
    _online_checks,
)


def _vec(v, n: int, name: str):
    """A (n,) device vector, or None; host arrays are refused with a clear message."""
    if v is None:
        return None
    if not is_device(v):
        raise TypeError(
            f"{name} is in host memory but x is on the GPU: pass {name} as a GPU array "
            f"(for a layer, call layer.to('cuda') once); streamnorm does not copy it on every call"
        )
    d = C.as_device(v, name)
    if d.size != n:
        raise ValueError(f"{name} has {d.size} values, expected {n}")
    return d.reshape(n)


def _out(out, template, shape, dtype):
    """(object returned, device view): a new array of the template's kind, or ``out``
    checked (on the GPU, this shape and dtype, C-contiguous)."""
    if out is None:
        return C.output(template, shape, dtype)
    if not is_device(out):
        raise TypeError("out must be a GPU array when the input is on the GPU")
    od = C.as_device(out, "out")
    if tuple(od.shape) != tuple(shape) or od.dtype != dtype:
        raise ValueError(f"out has shape {od.shape} and dtype {od.dtype}; expected {tuple(shape)} and {dtype}")
    return out, od


def _result_dtype(a, b):
    return np.result_type(a.dtype, b.dtype)


def _dy(dy, shape):
    d = C.as_device(dy, "dy")
    if d.shape != tuple(shape):
        raise ValueError(f"dy has shape {d.shape}, but the forward input had shape {tuple(shape)}")
    return d


# --------------------------------------------------------------------- BatchNorm


def batch_moments(x, axis: int = 1):
    xd = C.as_device(x)
    n, c, l = _bn_dims(xd.shape, axis)
    count = n * l
    if count == 0 or c == 0:
        nan = C.to_device(np.full(c, np.nan), x)
        return 0, C.like(x, nan), C.like(x, C.copy(nan, x))
    _, mu, m2 = C.moments(xd.reshape(1, n, c) if l == 1 else xd.reshape(n, c, l), l == 1, template=x)
    return count, C.like(x, mu), C.like(x, C.divide(m2, float(count)))


def batch_norm_forward(x, weight, bias, *, mean, var, eps, axis, prior_mean, prior_var, prior_weight, unbiased, out):
    xd = C.as_device(x)
    eps = check_positive_float(eps, "eps")
    shape = tuple(xd.shape)
    n, c, l = _bn_dims(shape, axis)
    cols = l == 1
    x3 = xd.reshape(n, c) if cols else xd.reshape(n, c, l)
    count = n * l
    w = _vec(weight, c, "weight")
    b = _vec(bias, c, "bias")
    batch_stats, p = _bn_stat_mode(mean, var, prior_weight, count, shape)
    cf = 1.0
    pm = pv = mi = vi = None
    if batch_stats:
        cf = count / (count - 1) if unbiased else 1.0
        if p > 0.0:
            pm, pv = _vec(prior_mean, c, "prior_mean"), _vec(prior_var, c, "prior_var")
            if pm is None or pv is None:
                raise ValueError("prior_weight > 0 needs prior_mean and prior_var")
    else:
        mi, vi = _vec(mean, c, "mean"), _vec(var, c, "var")
    yo, y = _out(out, x, xd.shape, xd.dtype)
    y3 = y.reshape(x3.shape)
    pw = p if batch_stats else 0.0
    mu, v, rstd, bmu, bvar = C.bn_forward(x3, cols, y3, w, b, eps, mi, vi, pm, pv, pw, cf, template=x)
    cache = BatchNormCache(x3, cols, mu, v, rstd, w, count, batch_stats, shape, bmu, bvar, pw, cf)
    return yo, cache


def batch_norm_backward(dy, cache: BatchNormCache, out=None):
    x3 = cache.x3
    d = _dy(dy, cache.shape)
    dy3 = d.reshape(x3.shape)
    dxo, dx = _out(out, dy, cache.shape, _result_dtype(x3, d))
    center = cache.batch_mean if cache.batch_stats else cache.mean
    dw, db = C.bn_backward(
        dy3, x3, cache.cols, dx.reshape(x3.shape), center, cache.mean, cache.rstd, cache.weight, cache.batch_stats,
        cache.count, 1.0 - cache.prior_weight, cache.var_factor, template=dy,
    )
    return dxo, C.like(dy, dw), C.like(dy, db)


# --------------------------------------------------------------- row normalizations


def rownorm_forward(x, normalized_shape, weight, bias, eps, center, out):
    xd = C.as_device(x)
    ns = _norm_shape(normalized_shape)
    k = len(ns)
    shape = tuple(xd.shape)
    if len(shape) < k or shape[len(shape) - k :] != ns:
        raise ValueError(f"input of shape {shape} does not end with normalized_shape {ns}")
    if eps is None:
        eps = float(np.finfo(xd.dtype).eps)
    eps = check_positive_float(eps, "eps")
    D = int(np.prod(ns, dtype=np.int64))
    R = xd.size // D
    x2 = xd.reshape(R, D)
    w = _vec(weight, D, "weight")
    b = _vec(bias, D, "bias")
    yo, y = _out(out, x, xd.shape, xd.dtype)
    mean, _, rstd = C.row_forward(x2, y.reshape(R, D), w, b, eps, center, template=x)
    cache = RowNormCache(x2, mean, rstd, w, w is not None, b is not None, center, ns, shape)
    return yo, cache


def rownorm_backward(dy, cache: RowNormCache, out=None):
    x2 = cache.x2
    d = _dy(dy, cache.shape)
    dxo, dx = _out(out, dy, cache.shape, _result_dtype(x2, d))
    dw, db = C.row_backward(d.reshape(x2.shape), x2, dx.reshape(x2.shape), cache.weight, cache.mean, cache.rstd,
                            cache.center, template=dy)
    ns = cache.normalized_shape
    dweight = C.like(dy, dw.reshape(ns)) if cache.has_weight else None
    dbias = C.like(dy, db.reshape(ns)) if cache.has_bias else None
    return dxo, dweight, dbias


def group_norm_forward(x, num_groups, weight, bias, eps, out):
    xd = C.as_device(x)
    shape = tuple(xd.shape)
    if len(shape) < 2:
        raise ValueError(f"GroupNorm expects input of shape (N, C, ...), got {shape}")
    N, Ch = shape[:2]
    G = int(num_groups)
    if G <= 0 or Ch % G:
        raise ValueError(f"{Ch} channels cannot be split into {num_groups} groups of equal size")
    eps = check_positive_float(eps, "eps")
    L = int(np.prod(shape[2:], dtype=np.int64))
    x2 = xd.reshape(N * G, (Ch // G) * L)
    w = _vec(weight, Ch, "weight")
    b = _vec(bias, Ch, "bias")
    yo, y = _out(out, x, xd.shape, xd.dtype)
    mean, var, rstd = C.row_forward(x2, y.reshape(x2.shape), w, b, eps, True, G, Ch // G, L, template=x)
    return yo, GroupNormCache(x2, mean, rstd, var, w, G, shape)


def group_norm_backward(dy, cache: GroupNormCache, out=None):
    x2 = cache.x3
    d = _dy(dy, cache.shape)
    N, Ch = cache.shape[:2]
    G = cache.num_groups
    L = x2.shape[1] // (Ch // G) if Ch else 1
    dxo, dx = _out(out, dy, cache.shape, _result_dtype(x2, d))
    dw, db = C.row_backward(d.reshape(x2.shape), x2, dx.reshape(x2.shape), cache.weight, cache.mean, cache.rstd,
                            True, G, Ch // G, L, template=dy)
    return dxo, C.like(dy, dw), C.like(dy, db)


# ------------------------------------------------------------------- OnlineNorm


def online_norm_forward(x, mu, var, weight, bias, *, alpha_fwd, eps, training, ecm, out=None):
    xd = C.as_device(x)
    shape = tuple(xd.shape)
    if len(shape) < 2:
        raise ValueError(f"OnlineNorm expects input of shape (N, C, ...), got {shape}")
    N, Ch = shape[:2]
    L = int(np.prod(shape[2:], dtype=np.int64))
    x3 = xd.reshape(N, Ch, L)
    mu0 = _vec(mu, Ch, "mu")
    var0 = _vec(var, Ch, "var")
    eps = _online_checks(mu0, var0, alpha_fwd, ecm, eps)
    w = _vec(weight, Ch, "weight")
    b = _vec(bias, Ch, "bias")
    # with error compensation the affine output is kept for the backward: a new array
    yo, y = C.output(x, shape, xd.dtype) if ecm is not None else _out(out, x, shape, xd.dtype)
    y3 = y.reshape(x3.shape)
    new_mu, new_var = C.copy(mu0, x), C.copy(var0, x)
    if x3.size:
        if training:
            C.online_forward(x3, y3, new_mu, new_var, alpha_fwd, eps, w, b)
        else:
            cols = L == 1
            v3 = x3.reshape(N, Ch) if cols else x3
            C.bn_forward(v3, cols, y3.reshape(v3.shape), w, b, eps, mu0, var0)
    pre = ls_rstd = None
    if ecm is not None:  # the affine output is kept for the backward; y is a new array
        pre = y3
        yo, y = _out(out, x, shape, xd.dtype)
        if ecm == "ac":
            C.clip(pre, _ECM_CLIP, out=y)
        else:
            _, _, ls_rstd = C.row_forward(pre.reshape(N, Ch * L), y.reshape(N, Ch * L), None, None, _ECM_LS_EPS, False)
    cache = OnlineNormCache(x3, mu0, var0, w, float(alpha_fwd), eps, bool(training), ecm, pre, shape, ls_rstd)
    return yo, C.like(x, new_mu), C.like(x, new_var), cache


def online_norm_backward(dy, cache: OnlineNormCache, u, v, *, alpha_bkw, out=None):
    x3 = cache.x3
    d = _dy(dy, cache.shape)
    if not 0.0 <= alpha_bkw < 1.0:
        raise ValueError(f"alpha_bkw must be in [0, 1), got {alpha_bkw!r}")
    N, Ch, L = x3.shape
    u0 = _vec(u, Ch, "u")
    v0 = _vec(v, Ch, "v")
    g3 = d.reshape(x3.shape)
    if cache.ecm == "ac":
        g3 = C.clip_grad(g3, cache.out, _ECM_CLIP)
    elif cache.ecm == "ls":
        a2 = cache.out.reshape(N, Ch * L)
        g2 = C.empty(a2.shape, g3.dtype)
        # RMS backward (no centring: the mean argument is not read)
        C.row_backward(g3.reshape(a2.shape), a2, g2, None, cache.ls_rstd, cache.ls_rstd, False, param_grads=False)
        g3 = g2.reshape(x3.shape)
    new_u, new_v = C.copy(u0, dy), C.copy(v0, dy)
    dxo, dx = _out(out, dy, cache.shape, _result_dtype(x3, g3))
    if x3.size:
        dw, db = C.online_backward(
            g3, x3, dx.reshape(x3.shape), C.copy(cache.mu0), C.copy(cache.var0), new_u, new_v, cache.alpha_fwd,
            alpha_bkw, cache.eps, cache.weight, cache.training, template=dy,
        )
    else:
        dw, db = C.zeros(Ch), C.zeros(Ch)
    return dxo, C.like(dy, dw), C.like(dy, db), C.like(dy, new_u), C.like(dy, new_v)


# ----------------------------------------------------------------- RunningStats


def chunk_moments(x, axis, weights, nan_policy):
    """One chunk's (feature_shape, n, mean, M2) as host float64 arrays (see RunningStats.chunk_moments)."""
    from ._validation import check_axis

    xd = C.as_device(x)
    shape = tuple(xd.shape)
    if axis is None:
        x3 = xd.reshape(1, xd.size, 1)
        fshape: tuple[int, ...] = ()
        m = xd.size
    else:
        ax = check_axis(len(shape), axis)
        m = shape[ax]
        a = int(np.prod(shape[:ax], dtype=np.int64))
        b = int(np.prod(shape[ax + 1 :], dtype=np.int64))
        fshape = shape[:ax] + shape[ax + 1 :]
        x3 = xd.reshape(a, m, b)
    w = None
    if weights is not None:
        if not is_device(weights):
            raise TypeError("weights is in host memory but x is on the GPU: pass weights as a GPU array")
        w = C.as_device(weights, "weights")
        if tuple(w.shape) != (m,):
            raise ValueError(f"weights has shape {tuple(w.shape)}; expected ({m},), one weight per sample along the axis")
        wh = w.copy_to_host()  # m values: checked on the host before anything is computed
        if not np.all(np.isfinite(wh)) or np.any(wh < 0):
            raise ValueError("weights must be finite and non-negative")
    if m == 0 or x3.size == 0:
        z = np.zeros(int(np.prod(fshape, dtype=np.int64)))
        return fshape, z, z.copy(), z.copy()
    n, mean, m2 = (C.to_host(a) for a in C.moments(x3, True, w, nan_policy == "omit"))
    if nan_policy == "raise" and not (np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))):
        n_omit = C.to_host(C.moments(x3, True, w, True)[0])
        if np.any(n_omit != n):
            raise ValueError("x contains NaN and nan_policy='raise'")
    return fshape, n, mean, m2
