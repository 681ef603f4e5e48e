"""``python -m streamnorm bench``: each kernel next to its peers, in one process.

For every operation the report gives the median time over repeats (after a warm-up
call, so numba compilation is excluded), the effective bandwidth under docs/math.rst's
pass-count model, the fraction of the memory-traffic bound, and the speed-up over each
peer measured in the same run on the same data: the same operation written by hand in
plain NumPy (always there), PyTorch CPU and scikit-learn (when installed).

The bound is ``passes × bytes / B`` with ``B`` the copy bandwidth of ``np.copyto`` on a
large array (read + write bytes over time), measured at the start of the run.  Each row
also times the copy in its own rounds, right after our kernel, and the bound uses the
higher of the two bandwidths: a busy spell of a shared machine then shows in the row's
copy column, and a slow copy never flatters a kernel.  A second fraction, from the
fastest of the row's rounds against its fastest copy, shows what the kernel reaches
when the machine is quiet; ``--json`` keeps every round's times.

The NumPy peers (the ``numpy_*`` functions below, each callable on given arrays) are
what a careful NumPy user writes: whole-array ufuncs and reductions, the per-channel
factors of an affine folded into one scale and one shift where the formula allows it,
in-place updates of the output instead of fresh temporaries, and no Python loop except
over time in OnlineNorm, whose recurrences need one.  They compute in the input's
dtype, as NumPy does by itself: for float32 input the statistics, the normalized values
and the gradient sums are float32 (NumPy reduces float32 with float32 accumulators,
pairwise only along the contiguous axis), and the small per-channel vectors (weights,
biases, given statistics) are cast to the input's dtype so that the full-size
arithmetic stays in it.  Two places use float64, because that is what a user writes for
statistics: the chunk moments of RunningStats and StreamScaler
(``c.mean(0, dtype=np.float64)``, ``c.var(0, dtype=np.float64)``, merged across chunks
with Chan's formula), and the carried statistics of OnlineNorm (float64 (C,) vectors,
like the layer's buffers; each row of the input is promoted when it meets them).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numba
import numpy as np

import streamnorm as sn

MiB = 1 << 20

#: the order of the peers' columns in the table and of their bars in the plot
PEER_ORDER = ("NumPy", "PyTorch", "scikit-learn")


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: compilation, page faults, allocator
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class CopyProbe:
    """``np.copyto`` between two float64 arrays of ``nbytes`` each: the bound's copy."""

    def __init__(self, nbytes: int = 256 * MiB):
        self.src = np.ones(nbytes // 8)
        self.dst = np.empty_like(self.src)
        self.nbytes = 2 * self.src.nbytes  # read + write

    def __call__(self) -> None:
        np.copyto(self.dst, self.src)

    def bandwidth(self, seconds: float) -> float:
        """Bytes per second for one copy that took ``seconds``."""
        return self.nbytes / seconds


# ---------------------------------------------------------------------------
# The NumPy peers: plain NumPy, on given arrays
# ---------------------------------------------------------------------------


def _channel_axes(x: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For (N, C, *S): the reduction axes (all but 1) and the broadcast shape of a (C,) vector."""
    return (0,) + tuple(range(2, x.ndim)), (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _as(v, shape, dtype) -> np.ndarray:
    """A small parameter vector reshaped for broadcasting, in the input's dtype."""
    return np.asarray(v).reshape(shape).astype(dtype, copy=False)


def _chan_merge(n, mean, m2, nb, mb, m2b):
    """Chan et al.'s merge of two (count, mean, M2) states; counts are Python numbers."""
    if n == 0:
        return nb, mb, m2b
    tot = n + nb
    d = mb - mean
    return tot, mean + d * (nb / tot), m2 + m2b + d * d * (n * nb / tot)


def numpy_chunk_moments(chunks) -> tuple[int, np.ndarray, np.ndarray]:
    """``(count, mean, var)`` over the rows of a sequence of (n_i, C) chunks.

    Per chunk ``c.mean(0)`` and ``c.var(0)`` in float64, merged with Chan's formula:
    RunningStats.update chunk by chunk, in NumPy.  NaNs are not skipped.
    """
    n, mean, m2 = 0, None, None
    for c in chunks:
        nb = c.shape[0]
        if nb:
            n, mean, m2 = _chan_merge(n, mean, m2, nb, c.mean(axis=0, dtype=np.float64),
                                      c.var(axis=0, dtype=np.float64) * nb)
    return n, mean, m2 / n


def numpy_stream_scaler_fit(chunks, min_scale: float = 1e-8) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, var, scale)`` after fitting chunk by chunk, like StreamScaler.partial_fit.

    :func:`numpy_chunk_moments`' merge, with the fitted attributes refreshed after every
    chunk as ``partial_fit`` does: ``scale = max(sqrt(var), min_scale)``.
    """
    n, mean, m2 = 0, None, None
    var = scale = None
    for c in chunks:
        nb = c.shape[0]
        if nb:
            n, mean, m2 = _chan_merge(n, mean, m2, nb, c.mean(axis=0, dtype=np.float64),
                                      c.var(axis=0, dtype=np.float64) * nb)
            var = m2 / n
            scale = np.maximum(np.sqrt(var), min_scale)
    return n, mean, var, scale


def numpy_batch_norm(x, weight, bias, eps: float = 1e-5):
    """BatchNorm train forward on (N, C, *S): returns ``(y, mean, var)`` (biased var, x's dtype).

    ``mu = x.mean(axes)``, ``var = x.var(axes)``, then the per-channel
    ``scale = w / sqrt(var + eps)`` and ``shift = b - mu·scale`` are applied in two passes.
    """
    axes, shp = _channel_axes(x)
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    scale = _as(weight, shp, x.dtype) / np.sqrt(var + eps)
    y = x * scale
    y += _as(bias, shp, x.dtype) - mu * scale
    return y, mu.reshape(-1), var.reshape(-1)


def numpy_batch_norm_eval(x, mean, var, weight, bias, eps: float = 1e-5):
    """BatchNorm eval forward on (N, C, *S) with given (C,) statistics."""
    _, shp = _channel_axes(x)
    scale = np.asarray(weight) / np.sqrt(np.asarray(var) + eps)
    shift = np.asarray(bias) - np.asarray(mean) * scale
    y = x * _as(scale, shp, x.dtype)
    y += _as(shift, shp, x.dtype)
    return y


def numpy_batch_norm_fb(x, dy, weight, bias, eps: float = 1e-5):
    """BatchNorm train forward and analytic backward: ``(y, dx, dweight, dbias)``.

    ``dx = γr·(dy − Σdy/m − x̂·Σ(dy·x̂)/m)``, ``dγ = Σ dy·x̂``, ``dβ = Σ dy`` per channel.
    """
    axes, shp = _channel_axes(x)
    m = x.size // x.shape[1]
    w = _as(weight, shp, x.dtype)
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    xhat = x - mu
    xhat *= rstd
    y = xhat * w
    y += _as(bias, shp, x.dtype)
    dbias = dy.sum(axis=axes, keepdims=True)
    dx = dy * xhat
    dweight = dx.sum(axis=axes, keepdims=True)
    np.multiply(xhat, dweight / m, out=dx)
    np.subtract(dy, dx, out=dx)
    dx -= dbias / m
    dx *= w * rstd
    return y, dx, dweight.reshape(-1), dbias.reshape(-1)


def numpy_layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm forward over the last axis."""
    mu = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    y = x - mu
    y *= 1 / np.sqrt(var + eps)
    y *= _as(weight, -1, x.dtype)
    y += _as(bias, -1, x.dtype)
    return y


def _row_backward(dy, xhat, rstd, w, lead, center: bool):
    """The row-wise backward of LayerNorm (``center``) and RMSNorm, with ``g = dy·γ``:
    ``dx = r·(g − mean(g) − x̂·mean(g·x̂))`` (no ``mean(g)`` for RMSNorm)."""
    gx = dy * xhat
    dweight = gx.sum(axis=lead)
    gx *= w  # g·x̂
    c2 = gx.mean(axis=-1, keepdims=True)
    g = dy * w
    if center:
        g -= g.mean(axis=-1, keepdims=True)
    np.multiply(xhat, c2, out=gx)
    g -= gx
    g *= rstd
    return g, dweight


def numpy_layer_norm_fb(x, dy, weight, bias, eps: float = 1e-5):
    """LayerNorm forward and analytic backward over the last axis: ``(y, dx, dweight, dbias)``."""
    lead = tuple(range(x.ndim - 1))
    w = _as(weight, -1, x.dtype)
    mu = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    xhat = x - mu
    xhat *= rstd
    y = xhat * w
    y += _as(bias, -1, x.dtype)
    dx, dweight = _row_backward(dy, xhat, rstd, w, lead, True)
    return y, dx, dweight, dy.sum(axis=lead)


def numpy_rms_norm(x, weight, eps: float | None = None):
    """RMSNorm forward over the last axis; ``eps=None`` is the machine epsilon of x's dtype."""
    eps = float(np.finfo(x.dtype).eps) if eps is None else eps
    y = x * (1 / np.sqrt(np.square(x).mean(axis=-1, keepdims=True) + eps))
    y *= _as(weight, -1, x.dtype)
    return y


def numpy_rms_norm_fb(x, dy, weight, eps: float | None = None):
    """RMSNorm forward and analytic backward over the last axis: ``(y, dx, dweight)``."""
    eps = float(np.finfo(x.dtype).eps) if eps is None else eps
    w = _as(weight, -1, x.dtype)
    rstd = 1 / np.sqrt(np.square(x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    y = xhat * w
    dx, dweight = _row_backward(dy, xhat, rstd, w, tuple(range(x.ndim - 1)), False)
    return y, dx, dweight


def numpy_group_norm(x, num_groups: int, weight, bias, eps: float = 1e-5):
    """GroupNorm forward on (N, C, *S): group statistics, then one per-(sample, channel)
    scale and shift applied in two passes."""
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    mu = xg.mean(axis=-1)
    rstd = 1 / np.sqrt(xg.var(axis=-1) + eps)
    k = C // num_groups
    scale = np.repeat(rstd, k, axis=1) * _as(weight, C, x.dtype)  # (N, C)
    shift = _as(bias, C, x.dtype) - np.repeat(mu, k, axis=1) * scale
    y = x.reshape(N, C, -1) * scale[:, :, None]
    y += shift[:, :, None]
    return y.reshape(x.shape)


def numpy_group_norm_fb(x, dy, num_groups: int, weight, bias, eps: float = 1e-5):
    """GroupNorm forward and analytic backward (LayerNorm's per (sample, group) block):
    ``(y, dx, dweight, dbias)``."""
    N, C = x.shape[:2]
    G = num_groups
    w = _as(weight, (C, 1), x.dtype)
    xg = x.reshape(N, G, -1)
    mu = xg.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt(xg.var(axis=-1, keepdims=True) + eps)
    xhat = xg - mu
    xhat *= rstd
    xh3 = xhat.reshape(N, C, -1)
    y = xh3 * w
    y += _as(bias, (C, 1), x.dtype)
    dy3 = dy.reshape(N, C, -1)
    gx = dy3 * xh3
    dweight = gx.sum(axis=(0, 2))
    dbias = dy3.sum(axis=(0, 2))
    gx *= w  # g·x̂
    gxg = gx.reshape(N, G, -1)
    c2 = gxg.mean(axis=-1, keepdims=True)
    g = (dy3 * w).reshape(N, G, -1)
    g -= g.mean(axis=-1, keepdims=True)
    np.multiply(xhat, c2, out=gxg)
    g -= gxg
    g *= rstd
    return y.reshape(x.shape), g.reshape(x.shape), dweight, dbias


def numpy_online_norm(x, mu, var, weight, bias, *, alpha_fwd=0.999, eps=1e-5, keep=True):
    """OnlineNorm train forward on (N, C, *S): a loop over time, vectorized over channels
    and values.

    Sample t is normalized with the statistics carried from the samples before it, then
    with the sample's per-channel mean m_t and variance s²_t over its values,
    ``d = m_t − μ``, ``μ += (1 − α_f)·d``, ``σ² = α_f·σ² + (1 − α_f)·s²_t + α_f(1 − α_f)·d²``.

    Returns ``(y, xhat, rstd, (mu, var))``: the output, each step's normalized sample
    (float64, (N, C, L)) and ``1/sqrt(σ² + eps)`` ((N, C)) for the backward, and the
    state after the call as float64 (C,) vectors.  Without ``keep`` (a forward alone)
    ``xhat`` and ``rstd`` are not stored and come back as None.
    """
    N, C = x.shape[:2]
    x3 = x.reshape(N, C, -1)
    a = float(alpha_fwd)
    w = np.asarray(weight, dtype=np.float64)[:, None]
    b = np.asarray(bias, dtype=np.float64)[:, None]
    mu = np.array(mu, dtype=np.float64)
    var = np.array(var, dtype=np.float64)
    y = np.empty_like(x3)
    xhat = np.empty(x3.shape) if keep else None
    rstd = np.empty((N, C)) if keep else None
    for t in range(N):
        r = 1 / np.sqrt(var + eps)
        h = (x3[t] - mu[:, None]) * r[:, None]
        y[t] = h * w + b
        if keep:
            xhat[t] = h
            rstd[t] = r
        m = x3[t].mean(axis=1, dtype=np.float64)
        d = m - mu
        mu += (1 - a) * d
        var *= a
        var += (1 - a) * x3[t].var(axis=1, dtype=np.float64) + (a * (1 - a)) * (d * d)
    return y.reshape(x.shape), xhat, rstd, (mu, var)


def numpy_online_norm_fb(x, dy, mu, var, u, v, weight, bias, *, alpha_fwd=0.999, alpha_bkw=0.99, eps=1e-5):
    """OnlineNorm train forward (:func:`numpy_online_norm`) and backward on (N, C, *S).

    The backward runs the control recurrences in the forward's order, with
    ``c = 1 − α_b`` and ``⟨·⟩`` the mean over a sample's values of a channel:
    ``g̃ = dy_t·γ − c·v·x̂_t``, ``v += ⟨g̃·x̂_t⟩``, ``dx_t = g̃·r_t − c·u``, ``u += ⟨dx_t⟩``.

    Returns ``(y, dx, dweight, dbias, (mu, var, u, v))``, the state after the call as
    float64 (C,) vectors.
    """
    y, xhat, rstd, (mu, var) = numpy_online_norm(x, mu, var, weight, bias, alpha_fwd=alpha_fwd, eps=eps)
    N, C, L = xhat.shape
    cb = 1.0 - float(alpha_bkw)
    u = np.array(u, dtype=np.float64)
    v = np.array(v, dtype=np.float64)
    dy3 = dy.reshape(N, C, L)
    dweight = np.einsum("ncl,ncl->c", dy3, xhat)
    dbias = dy3.sum(axis=(0, 2), dtype=np.float64)
    g = dy3 * np.asarray(weight, dtype=np.float64)[:, None]
    dx = np.empty(dy3.shape, dtype=np.result_type(x, dy))
    for t in range(N):
        h = xhat[t]
        gt = g[t] - (cb * v)[:, None] * h
        v += (gt * h).mean(axis=1)
        dt = gt * rstd[t][:, None] - (cb * u)[:, None]
        dx[t] = dt
        u += dt.mean(axis=1)
    return y, dx.reshape(dy.shape), dweight, dbias, (mu, var, u, v)


# ---------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One row: our callable, the peers' callables, and the traffic model."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    passes: int
    ours: Callable[[], object]
    peers: dict[str, Callable[[], object]] = field(default_factory=dict)
    per_second: tuple[int, str] | None = None  # (items per call, unit) for a throughput note


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    passes: int
    streamnorm_ms: float
    gbps: float
    bound_fraction: float
    peers_ms: dict[str, float]
    speedup: dict[str, float]
    throughput: str = ""
    copy_gbps: float = 0.0  # the copy bandwidth timed in the row's own rounds
    #: the fastest round of ours against the bound at the fastest copy of the row's
    #: rounds (or the run's bandwidth, whichever is higher): each at its quietest
    best_fraction: float = 0.0
    #: every round's time in ms, per function ("ours", "copy", each peer), in order
    rounds_ms: dict[str, list[float]] = field(default_factory=dict)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _sklearn_scaler():
    try:
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return None
    return StandardScaler


def _layer_cases(label, layer, make_torch, x, dy, dname, torch, *, numpy_fwd, numpy_fb, numpy_eval=None) -> list[Case]:
    """Forward (train), forward (eval) where ``numpy_eval`` is given, and forward+backward
    rows for one layer.

    ``make_torch(dtype)`` builds the PyTorch module measured beside it, on the same data
    (``torch.from_numpy`` shares the memory).  ``numpy_fwd(x)``, ``numpy_fb(x, dy)`` and
    ``numpy_eval(x)`` are the NumPy peers.
    """
    eval_too = numpy_eval is not None

    def ours_fb():
        layer.train()
        layer(x)
        return layer.backward(dy)

    def ours_fwd():
        layer.train()
        return layer(x)

    def ours_eval():
        layer.eval()
        return layer(x)

    peers: dict[str, dict[str, Callable[[], object]]] = {
        "fwd": {"NumPy": lambda: numpy_fwd(x)},
        "eval": {"NumPy": lambda: numpy_eval(x)} if eval_too else {},
        "fb": {"NumPy": lambda: numpy_fb(x, dy)},
    }
    if torch is not None:
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        tmod = make_torch(tx.dtype)

        def t_fwd(train=True):
            tmod.train(train)
            with torch.no_grad():
                return tmod(tx)

        def t_fb():
            tmod.train()
            xg = tx.detach().requires_grad_(True)
            tmod(xg).backward(tdy)
            return xg.grad

        peers["fwd"]["PyTorch"] = t_fwd
        peers["eval"]["PyTorch"] = lambda: t_fwd(False)
        peers["fb"]["PyTorch"] = t_fb
    train = ", train" if eval_too else ""
    cases = [Case(f"{label} forward{train}", x.shape, dname, x.nbytes, 3 if eval_too else 2, ours_fwd, peers["fwd"])]
    if eval_too:
        cases.append(Case(f"{label} forward, eval", x.shape, dname, x.nbytes, 2, ours_eval, peers["eval"]))
    cases.append(
        Case(f"{label} forward+backward{train}", x.shape, dname, x.nbytes, 8 if eval_too else 5, ours_fb, peers["fb"])
    )
    return cases


def _feature_map_shape(n_values: int) -> tuple[int, int, int, int]:
    """(N, 64, H, W) feature maps of at most ``n_values`` values: 128×128 maps, smaller
    ones when fewer than two samples of those fit (small ``--size-mib``)."""
    side = 128
    while side > 1 and n_values // (64 * side * side) < 2:
        side //= 2
    return (n_values // (64 * side * side), 64, side, side)


def build_cases(size_mib: int, dtype=np.float32, seed: int = 0) -> list[Case]:
    """The operations of the report, each on an input of about ``size_mib`` MiB.

    Pass counts (docs/math.rst): BatchNorm train forward 3, eval forward 2, train
    forward+backward 3 + 5; LayerNorm, RMSNorm and GroupNorm forward 2 and
    forward+backward 2 + 3; moments update 1; OnlineNorm forward 2, forward+backward
    2 + 3.
    """
    rng = np.random.default_rng(seed)
    torch = _torch()
    Scaler = _sklearn_scaler()
    itemsize = np.dtype(dtype).itemsize
    dname = np.dtype(dtype).name
    n_values = size_mib * MiB // itemsize
    cases: list[Case] = []

    def data(shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dtype, copy=False)

    # ---- RunningStats.update and StreamScaler.partial_fit over 64 chunks, vs scikit-learn
    C = 256
    N = n_values // C
    x = data((N, C))
    dy = data((N, C))
    chunks = np.array_split(x, 64)

    def rs_update():
        rs = sn.RunningStats()
        for c in chunks:
            rs.update(c)
        return rs

    def ss_fit():
        s = sn.StreamScaler()
        for c in chunks:
            s.partial_fit(c)
        return s

    rs_peers: dict[str, Callable[[], object]] = {"NumPy": lambda: numpy_chunk_moments(chunks)}
    ss_peers: dict[str, Callable[[], object]] = {"NumPy": lambda: numpy_stream_scaler_fit(chunks)}
    if Scaler is not None:

        def sk_fit():
            s = Scaler()
            for c in chunks:
                s.partial_fit(c)
            return s

        rs_peers["scikit-learn"] = ss_peers["scikit-learn"] = sk_fit
    cases.append(Case("RunningStats.update (64 chunks)", x.shape, dname, x.nbytes, 1, rs_update, rs_peers))
    cases.append(Case("StreamScaler.partial_fit (64 chunks)", x.shape, dname, x.nbytes, 1, ss_fit, ss_peers))

    # ---- BatchNorm on (N, C) and on (N, C, H, W) feature maps
    nchw = _feature_map_shape(n_values)
    n_map = int(np.prod(nchw))
    for shape in ((N, C), nchw):
        if shape[0] < 2:
            continue
        size = int(np.prod(shape))
        xs, dys = x.reshape(-1)[:size].reshape(shape), dy.reshape(-1)[:size].reshape(shape)
        cls = "BatchNorm1d" if len(shape) <= 3 else "BatchNorm2d"
        bn = sn.BatchNorm(shape[1])
        cases += _layer_cases(
            "BatchNorm", bn, lambda dt, c=shape[1], cls=cls: getattr(torch.nn, cls)(c).to(dt),
            xs, dys, dname, torch,
            numpy_fwd=lambda a, bn=bn: numpy_batch_norm(a, bn.params["weight"], bn.params["bias"], bn.eps),
            numpy_eval=lambda a, bn=bn: numpy_batch_norm_eval(
                a, bn.running_mean, bn.running_var, bn.params["weight"], bn.params["bias"], bn.eps
            ),
            numpy_fb=lambda a, g, bn=bn: numpy_batch_norm_fb(a, g, bn.params["weight"], bn.params["bias"], bn.eps),
        )

    # ---- row-wise and group normalizations
    D = 1024
    xl, dyl = x.reshape(-1, D), dy.reshape(-1, D)
    ln, rms = sn.LayerNorm(D), sn.RMSNorm(D)
    cases += _layer_cases(
        "LayerNorm", ln, lambda dt: torch.nn.LayerNorm(D).to(dt), xl, dyl, dname, torch,
        numpy_fwd=lambda a: numpy_layer_norm(a, ln.params["weight"], ln.params["bias"], ln.eps),
        numpy_fb=lambda a, g: numpy_layer_norm_fb(a, g, ln.params["weight"], ln.params["bias"], ln.eps),
    )
    cases += _layer_cases(
        "RMSNorm", rms, lambda dt: torch.nn.RMSNorm(D).to(dt), xl, dyl, dname, torch,
        numpy_fwd=lambda a: numpy_rms_norm(a, rms.params["weight"], rms.eps),
        numpy_fb=lambda a, g: numpy_rms_norm_fb(a, g, rms.params["weight"], rms.eps),
    )
    maps = []
    if nchw[0] >= 1:
        xg, dyg = x.reshape(-1)[:n_map].reshape(nchw), dy.reshape(-1)[:n_map].reshape(nchw)
        maps.append((xg, dyg))
        gn = sn.GroupNorm(32, 64)
        cases += _layer_cases(
            "GroupNorm (32 groups)", gn, lambda dt: torch.nn.GroupNorm(32, 64).to(dt), xg, dyg, dname, torch,
            numpy_fwd=lambda a: numpy_group_norm(a, 32, gn.params["weight"], gn.params["bias"], gn.eps),
            numpy_fb=lambda a, g: numpy_group_norm_fb(a, g, 32, gn.params["weight"], gn.params["bias"], gn.eps),
        )

    # ---- OnlineNorm (time is the batch axis) on the feature maps, where each sample's
    # values of a channel are normalized together, and on (N, C) with wide rows
    Cw = 16384
    if x.size >= 2 * Cw:
        nw = x.size // Cw * Cw
        maps.append((x.reshape(-1)[:nw].reshape(-1, Cw), dy.reshape(-1)[:nw].reshape(-1, Cw)))
    for xo, dyo in maps:
        cases += _online_cases(sn.OnlineNorm(xo.shape[1]), xo, dyo, dname)
    return cases


def _online_cases(on, xo, dyo, dname) -> list[Case]:
    """OnlineNorm train forward and forward+backward rows on ``xo``, with the NumPy loop
    over time as the peer.  Each call starts from the state the layer carries."""
    per = (xo.shape[0] * xo.shape[1], "channel-samples") if xo.ndim == 2 else None

    def fwd():
        return on(xo)

    def fb():
        on(xo)
        return on.backward(dyo)

    def numpy_fwd():
        s, p = on.buffers, on.params
        return numpy_online_norm(xo, s["mu"], s["var"], p["weight"], p["bias"], alpha_fwd=on.alpha_fwd, eps=on.eps, keep=False)

    def numpy_fb():
        s, p = on.buffers, on.params
        return numpy_online_norm_fb(
            xo, dyo, s["mu"], s["var"], s["u"], s["v"], p["weight"], p["bias"],
            alpha_fwd=on.alpha_fwd, alpha_bkw=on.alpha_bkw, eps=on.eps,
        )

    return [
        Case("OnlineNorm forward", xo.shape, dname, xo.nbytes, 2, fwd, {"NumPy": numpy_fwd}, per_second=per),
        Case("OnlineNorm forward+backward", xo.shape, dname, xo.nbytes, 5, fb, {"NumPy": numpy_fb}, per_second=per),
    ]


def select_cases(cases: list[Case], ops: str | None) -> list[Case]:
    """The cases whose operation name contains ``ops``, case-insensitively (all for None)."""
    if not ops:
        return list(cases)
    return [c for c in cases if ops.lower() in c.op.lower()]


# ---------------------------------------------------------------------------
# Measuring and reporting
# ---------------------------------------------------------------------------


def run_case(case: Case, bandwidth: float, repeat: int, probe: CopyProbe | None = None) -> Row:
    """Time ours and every peer, interleaved repeat by repeat (so that a slow spell of a
    shared machine hits all of them alike), and report medians.

    Each round starts one place further along the list (ours, then each peer), so
    that no function always runs right after the same one: whatever a call leaves
    behind (freed memory the system is still reclaiming, cold caches) falls on every
    function in turn.

    ``bandwidth`` is the run's copy bandwidth in bytes per second.  With a ``probe``,
    the copy is also timed in every round, right after ours; the bound then uses the
    higher of the two bandwidths, so that a slow copy never flatters a kernel, and the
    row reports the copy bandwidth of its own rounds.

    Beside the medians the row gives the fraction of the bound in the quietest rounds
    (``best_fraction``: the fastest round of ours against the fastest copy, with the
    same rule for the bandwidth) and every round's times (``rounds_ms``), so that a
    report from a shared machine shows how far its noise moved each row.
    """
    fns: dict[str, Callable[[], object]] = {"ours": case.ours}
    if probe is not None:
        fns["copy"] = probe
    fns.update(case.peers)
    for fn in fns.values():
        fn()  # warm-up: compilation, page faults, allocator
    times: dict[str, list[float]] = {k: [] for k in fns}
    # ours and the copy stay together; the units rotate from round to round
    units = [[k for k in ("ours", "copy") if k in fns]] + [[k] for k in case.peers]
    for r in range(repeat):
        for unit in units[r % len(units) :] + units[: r % len(units)]:
            for k in unit:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    rounds_ms = {k: [v * 1e3 for v in ts] for k, ts in times.items()}
    t = statistics.median(times["ours"])
    row_bandwidth = best_bandwidth = bandwidth
    if probe is not None:
        copies = times.pop("copy")
        row_bandwidth = probe.bandwidth(statistics.median(copies))
        best_bandwidth = max(bandwidth, probe.bandwidth(min(copies)))
        bandwidth = max(bandwidth, row_bandwidth)
    traffic = case.passes * case.nbytes
    bound = traffic / bandwidth
    peers_ms, speedup = {}, {}
    for name in case.peers:
        tp = statistics.median(times[name])
        peers_ms[name] = tp * 1e3
        speedup[name] = tp / t
    note = ""
    if case.per_second is not None:
        note = f"{case.per_second[0] / t / 1e6:.0f} M {case.per_second[1]}/s"
    return Row(
        case.op,
        "×".join(str(s) for s in case.shape),
        case.dtype,
        case.passes,
        t * 1e3,
        traffic / t / 1e9,
        bound / t,
        peers_ms,
        speedup,
        note,
        row_bandwidth / 1e9,
        traffic / best_bandwidth / min(times["ours"]),
        rounds_ms,
    )


def _peer_names(rows: list[Row]) -> list[str]:
    present = {p for r in rows for p in r.peers_ms}
    return [p for p in PEER_ORDER if p in present] + sorted(present - set(PEER_ORDER))


def format_table(rows: list[Row], bandwidth: float, threads: int) -> str:
    peer_names = _peer_names(rows)
    head = ["operation", "shape", "dtype", "passes", "streamnorm ms", "GB/s", "copy GB/s", "of bound", "best round"]
    for p in peer_names:
        head += [f"{p} ms", f"vs {p}"]
    lines = [head]
    for r in rows:
        line = [r.op, r.shape, r.dtype, str(r.passes), f"{r.streamnorm_ms:.1f}", f"{r.gbps:.1f}",
                f"{r.copy_gbps:.1f}", f"{r.bound_fraction:.0%}", f"{r.best_fraction:.0%}"]
        for p in peer_names:
            if p in r.peers_ms:
                line += [f"{r.peers_ms[p]:.1f}", f"{r.speedup[p]:.1f}×"]
            else:
                line += ["–", "–"]
        lines.append(line)
    if any(r.throughput for r in rows):
        lines[0].append("throughput")
        for line, r in zip(lines[1:], rows):
            line.append(r.throughput or "–")
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    out = []
    for k, l in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


_MATPLOTLIB_MISSING = "the plot needs matplotlib, which is not installed: pip install matplotlib"


def _require_matplotlib():
    """matplotlib's Figure and Agg canvas classes, imported on first use (no pyplot, no global backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError(_MATPLOTLIB_MISSING) from e
    return Figure, FigureCanvasAgg


_PEER_COLORS = {"NumPy": "#4477AA", "PyTorch": "#EE6677", "scikit-learn": "#228833"}


def plot_report(rows: list[Row], path: str, title: str = "") -> None:
    """Write a PNG: the speed-up over each peer per operation (log scale), and streamnorm's
    fraction of the memory-traffic bound per operation.

    Raises RuntimeError when matplotlib is not installed.
    """
    Figure, FigureCanvasAgg = _require_matplotlib()
    from matplotlib.ticker import NullFormatter, PercentFormatter

    if not rows:
        raise ValueError("no rows to plot")
    peers = _peer_names(rows)
    n = len(rows)
    labels = [f"{r.op}\n{r.shape}, {r.dtype}" for r in rows]
    fig = Figure(figsize=(15, 1.8 + 0.62 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    ypos = np.arange(n)

    # speed-ups, one bar per peer, grouped by operation
    band = 0.8
    bh = band / max(1, len(peers))
    values = []
    for k, peer in enumerate(peers):
        off = -band / 2 + bh * (k + 0.5)
        ys = [i + off for i, r in enumerate(rows) if peer in r.speedup]
        ss = [r.speedup[peer] for r in rows if peer in r.speedup]
        values += ss
        ax1.barh(ys, ss, height=bh * 0.92, color=_PEER_COLORS.get(peer, "#BBBBBB"), label=f"vs {peer}")
        for yv, sv in zip(ys, ss):
            ax1.text(sv * 1.04, yv, f"{sv:.1f}×", va="center", ha="left", fontsize=8)
    lo = min(values + [1.0]) / 1.5
    hi = max(values + [1.0]) * 1.8
    ax1.set_xscale("log")
    ax1.set_xlim(lo, hi)
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= t <= hi]
    ax1.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.axvline(1.0, color="black", lw=1.2, ls="--", label="parity (1×)")
    ax1.set_xlabel("speed-up of streamnorm over the peer: peer time / streamnorm time (log scale)", fontsize=10)
    ax1.set_title("Speed-up over each peer (right of the dashed line: streamnorm is faster)", fontsize=11)
    ax1.grid(axis="x", which="both", alpha=0.3)
    ax1.set_yticks(ypos, labels, fontsize=9)
    ax1.set_ylim(n - 0.5, -0.5)  # first row at the top

    # fraction of the memory-traffic bound
    frac = [r.bound_fraction for r in rows]
    best = [r.best_fraction for r in rows]
    ax2.barh(ypos, frac, height=0.6, color="#66CCEE", edgecolor="#336677", label="median round")
    ax2.plot(best, ypos, ls="none", marker="|", markersize=14, mew=2, color="#222222", label="best round")
    for i, f in enumerate(frac):
        ax2.text(max(f, best[i]) + 0.015, i, f"{f:.0%}", va="center", ha="left", fontsize=8)
    ax2.axvline(1.0, color="#CC3311", lw=1.5, ls="--", label="memory-traffic bound (copy bandwidth)")
    ax2.set_xlim(0, max(1.2, max(frac + best) * 1.15))
    ax2.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax2.set_xlabel("bound time (passes × bytes / copy bandwidth) / streamnorm time", fontsize=10)
    ax2.set_title("streamnorm: fraction of the memory-traffic bound", fontsize=11)
    ax2.grid(axis="x", alpha=0.3)
    handles, names = [], []
    for ax in (ax1, ax2):
        h, l = ax.get_legend_handles_labels()
        handles += h
        names += l
    try:  # one legend for both panels, below them (matplotlib >= 3.7)
        fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=10, frameon=False)
    except ValueError:
        ax1.legend(loc="best", fontsize=9)
        ax2.legend(loc="best", fontsize=9)
    ax2.tick_params(axis="y", labelleft=False)
    if title:
        fig.suptitle(textwrap.fill(title, 170), fontsize=9)
    fig.savefig(path, dpi=120, format="png")


def machine_line(bandwidth: float, threads: int) -> str:
    torch = _torch()
    peers = [f"numpy {np.__version__} (NumPy peers)"]
    if torch is not None:
        peers.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    try:
        import sklearn

        peers.append(f"scikit-learn {sklearn.__version__}")
    except ImportError:
        pass
    return (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}"
        + f", {threads} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s"
        + f"; peers: {', '.join(peers)}"
    )


def scaler_agreement(size_mib: int, dtype) -> str:
    """How closely StreamScaler's fitted statistics match StandardScaler's, float64 data."""
    Scaler = _sklearn_scaler()
    if Scaler is None:
        return ""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((min(size_mib, 64) * MiB // 8 // 256, 256)) * rng.uniform(0.1, 10, 256) + rng.uniform(-50, 50, 256)
    ours, theirs = sn.StreamScaler(), Scaler()
    for c in np.array_split(x, 64):
        ours.partial_fit(c)
        theirs.partial_fit(c)
    dm = np.max(np.abs(ours.mean_ - theirs.mean_) / np.abs(theirs.mean_))
    dv = np.max(np.abs(ours.var_ - theirs.var_) / theirs.var_)
    return (
        f"StreamScaler vs scikit-learn StandardScaler, same 64 chunks of {x.shape[0]}×256 float64: "
        f"max relative difference mean_ {dm:.1e}, var_ {dv:.1e}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamnorm bench", description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256, help="input size per operation (default 256)")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per operation; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="numba (and PyTorch) threads; default: all")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--ops", metavar="SUBSTRING",
                   help="run only the operations whose name contains SUBSTRING (case-insensitive)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="also write a PNG chart: speed-up over each peer and fraction of the bound (needs matplotlib)")
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        p.error("--size-mib and --repeat must be at least 1")
    if args.plot:
        try:
            _require_matplotlib()
        except RuntimeError as e:
            p.error(f"--plot: {e}")
    if args.threads is not None:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
    dtype = np.dtype(args.dtype).type
    all_cases = build_cases(args.size_mib, dtype)
    cases = select_cases(all_cases, args.ops)
    if not cases:
        names = ", ".join(dict.fromkeys(c.op for c in all_cases))
        p.error(f"--ops {args.ops!r} matches no operation; the operations are: {names}")
    probe = CopyProbe(max(256, args.size_mib) * MiB)
    bandwidth = probe.bandwidth(_median_time(probe, 7))
    print(machine_line(bandwidth, threads))
    print(f"medians of {args.repeat} runs after a warm-up call; 'vs X' is X's time over ours; 'copy GB/s' is "
          "the copy timed in the row's rounds; the bound uses it or the header's, whichever is higher; "
          "'best round' is the fastest round against the fastest copy\n",
          flush=True)
    rows = []
    for case in cases:
        rows.append(run_case(case, bandwidth, args.repeat, probe))
        print(f"  measured {case.op}", file=sys.stderr, flush=True)
    print(format_table(rows, bandwidth, threads))
    if any(c.op.startswith("StreamScaler") for c in cases):
        agreement = scaler_agreement(args.size_mib, dtype)
        if agreement:
            print(f"\n{agreement}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine_line(bandwidth, threads), "bandwidth_Bps": bandwidth, "threads": threads,
                 "rows": [asdict(r) for r in rows]},
                f,
                indent=2,
            )
    if args.plot:
        plot_report(
            rows, args.plot,
            f"python -m streamnorm bench: {args.size_mib} MiB per operation, {args.dtype}, medians of "
            f"{args.repeat} runs.  {machine_line(bandwidth, threads)}",
        )
        print(f"\nplot written to {args.plot}")
    return 0
