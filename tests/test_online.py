"""OnlineNorm against a plain NumPy loop written from docs/layers/onlinenorm.rst, over consecutive calls."""

from __future__ import annotations

import numpy as np
import pytest

from naive import numerical_grad
import streamnorm as sn
from streamnorm import functional as F


class OnlineRef:
    """docs/layers/onlinenorm.rst as a loop over samples, channels and values."""

    def __init__(self, C, af, ab, eps, w, b, ecm=None):
        self.mu, self.var = np.zeros(C), np.ones(C)
        self.u, self.v = np.zeros(C), np.zeros(C)
        self.af, self.ab, self.eps, self.w, self.b, self.ecm = af, ab, eps, w, b, ecm

    def forward(self, x):
        x = x.reshape(x.shape[0], x.shape[1], -1).astype(np.float64)
        N, C, L = x.shape
        y = np.empty_like(x)
        self.scales = np.empty((N, C))
        for t in range(N):
            for c in range(C):
                scale = np.sqrt(self.var[c] + self.eps)
                self.scales[t, c] = scale
                y[t, c] = (x[t, c] - self.mu[c]) / scale
                m, s2 = x[t, c].mean(), x[t, c].var()
                d = m - self.mu[c]
                self.mu[c] += (1 - self.af) * d
                self.var[c] = self.af * self.var[c] + (1 - self.af) * s2 + self.af * (1 - self.af) * d * d
        self.y = y
        out = y * self.w[:, None] + self.b[:, None]
        self.pre = out
        if self.ecm == "ac":
            out = np.clip(out, -5, 5)
        elif self.ecm == "ls":
            self.s = 1 / np.sqrt((out**2).mean(axis=(1, 2), keepdims=True) + 1e-5)
            out = out * self.s
        return out

    def backward(self, dout):
        dout = dout.reshape(self.y.shape).astype(np.float64)
        if self.ecm == "ac":
            dout = np.where(np.abs(self.pre) > 5, 0.0, dout)
        elif self.ecm == "ls":
            a, s = self.pre, self.s
            dout = s * dout - a * s**3 * (dout * a).mean(axis=(1, 2), keepdims=True)
        dw = (dout * self.y).sum((0, 2))
        db = dout.sum((0, 2))
        g_all = dout * self.w[:, None]
        dx = np.empty_like(g_all)
        N, C, L = g_all.shape
        for t in range(N):
            for c in range(C):
                g, y = g_all[t, c], self.y[t, c]
                gt = g - (1 - self.ab) * self.v[c] * y
                self.v[c] += (gt * y).mean()
                gh = gt / self.scales[t, c]
                dx[t, c] = gh - (1 - self.ab) * self.u[c]
                self.u[c] += dx[t, c].mean()
        return dx, dw, db


@pytest.mark.parametrize("shape", [(7, 3), (5, 4, 6), (4, 3, 2, 5), (1, 3, 4)])
@pytest.mark.parametrize("ecm", [None, "ac", "ls"])
def test_matches_spec_loop_over_consecutive_calls(rng, shape, ecm):
    C = shape[1]
    af, ab = 0.9, 0.8  # not the defaults, so the decays are really exercised
    layer = sn.OnlineNorm(C, alpha_fwd=af, alpha_bkw=ab, eps=1e-4, ecm=ecm)
    layer.params["weight"] = rng.standard_normal(C) * (3 if ecm == "ac" else 1)
    layer.params["bias"] = rng.standard_normal(C)
    ref = OnlineRef(C, af, ab, 1e-4, layer.params["weight"], layer.params["bias"], ecm)
    for call in range(4):
        x = rng.standard_normal(shape) * (1 + call) + call
        dy = rng.standard_normal(shape)
        y = layer(x)
        np.testing.assert_allclose(y, ref.forward(x).reshape(shape), rtol=1e-12, atol=1e-12)
        dx = layer.backward(dy)
        rdx, rdw, rdb = ref.backward(dy)
        np.testing.assert_allclose(dx, rdx.reshape(shape), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grads["weight"], rdw, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grads["bias"], rdb, rtol=1e-10, atol=1e-12)
        for k in ("mu", "var", "u", "v"):
            np.testing.assert_allclose(layer.buffers[k], getattr(ref, k), rtol=1e-12, atol=1e-14)
    if ecm == "ac":
        assert np.any(np.abs(ref.pre) > 5)  # clamping was exercised


def test_float32_input(rng):
    layer = sn.OnlineNorm(4, alpha_fwd=0.5)
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    y = layer(x)
    assert y.dtype == np.float32
    ref = OnlineRef(4, 0.5, 0.99, 1e-5, np.ones(4), np.zeros(4))
    np.testing.assert_allclose(y, ref.forward(x).reshape(x.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ecm", [None, "ac", "ls"])
def test_eval_mode_gradient_is_exact_and_state_frozen(rng, ecm):
    C = 3
    mu, var = rng.standard_normal(C), rng.random(C) + 0.5
    w, b = rng.standard_normal(C) * 4, rng.standard_normal(C)
    x = rng.standard_normal((4, C, 5))
    dy = rng.standard_normal(x.shape)

    def f(xx, ww=w, bb=b):
        return F.online_norm_forward(xx, mu, var, ww, bb, training=False, ecm=ecm)[0]

    y, nmu, nvar, cache = F.online_norm_forward(x, mu, var, w, b, training=False, ecm=ecm)
    np.testing.assert_array_equal(nmu, mu)
    np.testing.assert_array_equal(nvar, var)
    dx, dw, db, u, v = F.online_norm_backward(dy, cache, np.ones(C), np.ones(C))
    np.testing.assert_array_equal(u, np.ones(C))
    np.testing.assert_allclose(dx, numerical_grad(f, x.copy(), dy), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numerical_grad(lambda ww: f(x, ww, b), w.copy(), dy), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, numerical_grad(lambda bb: f(x, w, bb), b.copy(), dy), rtol=1e-6, atol=1e-8)


def test_affine_gradients_are_exact_in_train_mode(rng):
    C = 3
    x = rng.standard_normal((5, C, 4))
    dy = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    mu, var = np.zeros(C), np.ones(C)
    f = lambda ww, bb: F.online_norm_forward(x, mu, var, ww, bb, alpha_fwd=0.7)[0]  # noqa: E731
    _, _, _, cache = F.online_norm_forward(x, mu, var, w, b, alpha_fwd=0.7)
    _, dw, db, _, _ = F.online_norm_backward(dy, cache, np.zeros(C), np.zeros(C))
    np.testing.assert_allclose(dw, numerical_grad(lambda ww: f(ww, b), w.copy(), dy), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, numerical_grad(lambda bb: f(w, bb), b.copy(), dy), rtol=1e-6, atol=1e-8)


def test_batch_of_one_reset_and_state_dict(rng):
    layer = sn.OnlineNorm(3, alpha_fwd=0.5)
    for _ in range(3):
        layer(rng.standard_normal((1, 3)))
        layer.backward(rng.standard_normal((1, 3)))
    sd = layer.state_dict()
    assert {"mu", "var", "u", "v", "weight", "bias"} <= set(sd)
    assert not np.allclose(sd["mu"], 0) and not np.allclose(sd["u"], 0)
    other = sn.OnlineNorm(3, alpha_fwd=0.5)
    other.load_state_dict(sd)
    x = rng.standard_normal((2, 3))
    np.testing.assert_array_equal(other(x), layer(x))
    layer.reset()
    np.testing.assert_array_equal(layer.buffers["var"], np.ones(3))
    np.testing.assert_array_equal(layer.buffers["u"], np.zeros(3))


def test_eval_updates_nothing(rng):
    layer = sn.OnlineNorm(3)
    layer(rng.standard_normal((4, 3)))
    layer.eval()
    before = layer.state_dict()
    layer(rng.standard_normal((4, 3)))
    layer.backward(rng.standard_normal((4, 3)))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_errors_leave_state_alone(rng):
    layer = sn.OnlineNorm(3)
    layer(rng.standard_normal((4, 3)))
    before = layer.state_dict()
    with pytest.raises(ValueError, match="3 channels"):
        layer(np.ones((4, 2)))
    with pytest.raises(ValueError, match="dy has shape"):
        layer.backward(np.ones((5, 3)))
    with pytest.raises(TypeError, match="complex"):
        layer(np.ones((4, 3), dtype=complex))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(ValueError, match="alpha_fwd"):
        sn.OnlineNorm(3, alpha_fwd=1.0)
    with pytest.raises(ValueError, match="ecm"):
        sn.OnlineNorm(3, ecm="xx")


# ---- the (N, C) kernels: float32 scale path, its exact fallback, thread splits


def _fwd_cols(x, mu, var, w, b, nthreads, approx, eps=1e-5, alpha=0.9):
    from streamnorm import _kernels_cpu as K

    y = np.empty_like(x)
    mu, var = mu.copy(), var.copy()
    K.online_fwd_cols(x, mu, var, alpha, eps, w, b, y, nthreads, approx)
    return y, mu, var


def _bwd_cols(g, x, mu, var, w, nthreads, approx, eps=1e-5):
    from streamnorm import _kernels_cpu as K

    C = x.shape[1]
    dx = np.empty_like(x)
    u, v = np.full(C, 0.3), np.full(C, -0.2)
    dw, db = K.online_bwd_cols(g, x, mu.copy(), var.copy(), u, v, 0.9, 0.8, eps, w, True, dx, nthreads, approx)
    return dx, dw, db, u, v


def test_float32_scale_path_is_within_a_rounding_of_the_exact_one(rng):
    N, C = 300, 37
    x = (rng.standard_normal((N, C)) * rng.uniform(0.01, 100, C) + 5).astype(np.float32)
    g = rng.standard_normal((N, C)).astype(np.float32)
    mu, var = rng.standard_normal(C), rng.uniform(0.1, 10, C)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    ya, mua, vara = _fwd_cols(x, mu, var, w, b, 1, True)
    ye, mue, vare = _fwd_cols(x, mu, var, w, b, 1, False)
    # the state does not depend on the scale: identical
    np.testing.assert_array_equal(mua, mue)
    np.testing.assert_array_equal(vara, vare)
    # outputs: the same float32 value, or its neighbour when the exact value lies within
    # ~2^-42 (relative) of a rounding boundary
    ulps = np.abs(ya.view(np.int32).astype(np.int64) - ye.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1 and np.count_nonzero(ulps) <= 2
    dxa, dwa, dba, ua, va = _bwd_cols(g, x, mu, var, w, 1, True)
    dxe, dwe, dbe, ue, ve = _bwd_cols(g, x, mu, var, w, 1, False)
    np.testing.assert_allclose(dxa, dxe, rtol=2**-22, atol=0)
    for a, e in ((dwa, dwe), (dba, dbe), (ua, ue), (va, ve)):
        np.testing.assert_allclose(a, e, rtol=1e-11, atol=1e-11)
    # the float32 start was really taken: the float64 control state differs in its last bits
    assert not np.array_equal(ua, ue)


# beyond float32's largest value, and below its smallest normal one: the float32 start
# would be inf or a subnormal, and the scale wrong; a negative start can bring
# var + eps to 0 (an infinite scale, a NaN after the Newton step)
@pytest.mark.parametrize("var0, eps", [(1e39, 1e-5), (0.0, 1e-45), (-1e-5, 1e-5)])
def test_variance_outside_the_float32_range_falls_back_to_the_exact_scale(rng, var0, eps):
    N, C = 5, 300  # 1200 bytes a row: above one thread's minimum share
    x = rng.standard_normal((N, C)).astype(np.float32)
    g = rng.standard_normal((N, C)).astype(np.float32)
    mu, var = np.zeros(C), np.full(C, var0)
    w, b = np.ones(C), np.zeros(C)
    # the kernels recompute with the exact scale: the same bits as asking for it
    for a, e in zip(_fwd_cols(x, mu, var, w, b, 1, True, eps=eps), _fwd_cols(x, mu, var, w, b, 1, False, eps=eps)):
        np.testing.assert_array_equal(a, e)
    for a, e in zip(_bwd_cols(g, x, mu, var, w, 1, True, eps=eps), _bwd_cols(g, x, mu, var, w, 1, False, eps=eps)):
        np.testing.assert_array_equal(a, e)
    # and so does the functional API, which asks for the float32 start on float32 data
    ye, mue, vare = _fwd_cols(x, mu, var, w, b, 1, False, eps=eps)
    y, nmu, nvar, cache = F.online_norm_forward(x, mu, var, w, b, alpha_fwd=0.9, eps=eps)
    np.testing.assert_array_equal(y, ye)
    np.testing.assert_array_equal(nmu, mue)
    np.testing.assert_array_equal(nvar, vare)
    dx, dw, db, u, v = F.online_norm_backward(g, cache, np.full(C, 0.3), np.full(C, -0.2), alpha_bkw=0.8)
    for a, e in zip((dx, dw, db, u, v), _bwd_cols(g, x, mu, var, w, 1, False, eps=eps)):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("approx", [True, False])
def test_cols_backward_replays_the_forward_state_bit_for_bit(rng, approx):
    # the backward recomputes the state sample by sample; with its multiply-adds fused
    # explicitly it must end on the very bits the forward carried out
    from streamnorm import _kernels_cpu as K

    N, C = 11, 2100
    x = (rng.standard_normal((N, C)) * 3 + 1).astype(np.float32)
    g = rng.standard_normal((N, C)).astype(np.float32)
    mu, var = rng.standard_normal(C), rng.uniform(0.1, 10, C)
    w = rng.standard_normal(C)
    for nt in (1, 2):
        _, fmu, fvar = _fwd_cols(x, mu, var, w, np.zeros(C), nt, approx, alpha=0.7)
        bmu, bvar = mu.copy(), var.copy()
        K.online_bwd_cols(g, x, bmu, bvar, np.zeros(C), np.zeros(C), 0.7, 0.8, 1e-5, w, True, np.empty_like(x), nt, approx)
        np.testing.assert_array_equal(bmu, fmu)
        np.testing.assert_array_equal(bvar, fvar)


@pytest.mark.parametrize("C", [23, 2100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cols_kernels_give_the_same_bits_for_every_thread_split(rng, dtype, C):
    # with 2100 channels, one or two threads own enough of them to take several samples
    # per sweep (N = 9 leaves a tail of one sample), three or five do not: the two loops
    # must agree bit for bit
    from streamnorm._kernels_cpu import _ONLINE_WIDE

    assert C // 2 >= _ONLINE_WIDE or C < _ONLINE_WIDE
    N = 9
    x = rng.standard_normal((N, C)).astype(dtype)
    g = rng.standard_normal((N, C)).astype(dtype)
    mu, var = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    approx = dtype == np.float32
    ref_f = _fwd_cols(x, mu, var, w, b, 1, approx)
    ref_b = _bwd_cols(g, x, mu, var, w, 1, approx)
    for nt in (2, 3, 5):
        for a, e in zip(_fwd_cols(x, mu, var, w, b, nt, approx), ref_f):
            np.testing.assert_array_equal(a, e)
        for a, e in zip(_bwd_cols(g, x, mu, var, w, nt, approx), ref_b):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maps_forward_keeps_the_moments_that_advanced_its_state(rng, dtype):
    # (N, C, L): the forward keeps each sample's mean and M2 per channel; the backward
    # replays the state from them, so they must be the very numbers the forward
    # advanced its state with (bit for bit) and the sample's moments (to rounding)
    from fractions import Fraction

    N, C, L, a = 9, 5, 37, 0.7
    x = (rng.standard_normal((N, C, L)) * 3 + 100).astype(dtype)
    mu, var = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    _, new_mu, new_var, cache = F.online_norm_forward(x, mu, var, alpha_fwd=a)
    kept = cache.moments
    assert kept.shape == (N, C, 2) and kept.dtype == np.float64
    m, v = mu.copy(), var.copy()
    for t in range(N):  # _online_advance, written out: the same operations in float64
        d = kept[t, :, 0] - m
        m, v = m + (1.0 - a) * d, a * v + (1.0 - a) * (kept[t, :, 1] / L) + a * (1.0 - a) * d * d
    np.testing.assert_array_equal(m, new_mu)
    np.testing.assert_array_equal(v, new_var)
    for t, c in ((0, 0), (4, 2), (N - 1, C - 1)):
        vals = [Fraction(float(e)) for e in x[t, c]]
        mean = sum(vals) / L
        m2 = sum((e - mean) ** 2 for e in vals)
        assert kept[t, c, 0] == pytest.approx(float(mean), rel=1e-15)
        assert kept[t, c, 1] == pytest.approx(float(m2), rel=1e-12)


def test_maps_backward_recomputes_moments_missing_from_the_cache(rng):
    N, C, L = 6, 4, 50
    x = rng.standard_normal((N, C, L)) * 2 + 1
    dy = rng.standard_normal((N, C, L))
    *_, cache = F.online_norm_forward(x, np.zeros(C), np.ones(C), alpha_fwd=0.8)
    u, v = np.full(C, 0.1), np.full(C, -0.3)
    kept = F.online_norm_backward(dy, cache, u, v, alpha_bkw=0.9)
    again = F.online_norm_backward(dy, cache._replace(moments=None), u, v, alpha_bkw=0.9)
    for a, e in zip(kept, again):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)
    for bad in (cache.moments[:-1], cache.moments.astype(np.float32), np.asfortranarray(cache.moments)):
        with pytest.raises(ValueError, match="cache.moments must be"):
            F.online_norm_backward(dy, cache._replace(moments=bad), u, v)


def test_narrow_rows_run_on_one_thread():
    import numba

    from streamnorm.functional import _online_threads

    assert _online_threads(np.empty((4, 255, 1), np.float32)) == 1
    assert _online_threads(np.empty((4, 128, 1), np.float64)) == 1
    assert _online_threads(np.empty((4, 4096, 1), np.float32)) == min(16, numba.get_num_threads())


@pytest.mark.parametrize("ecm", [None, "ac", "ls"])
@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3)])
def test_functional_out_receives_the_result(rng, shape, ecm):
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[1]
    y, mu, var, cache = F.online_norm_forward(x, np.zeros(C), np.ones(C), ecm=ecm)
    out = np.empty_like(x)
    y2, mu2, var2, cache2 = F.online_norm_forward(x, np.zeros(C), np.ones(C), ecm=ecm, out=out)
    assert y.dtype == np.float32 and np.shares_memory(y2, out)
    np.testing.assert_array_equal(out, y)
    np.testing.assert_array_equal(mu2, mu)
    dx, *_ = F.online_norm_backward(dy, cache, np.zeros(C), np.zeros(C))
    dout = np.empty_like(x)
    dx2, *_ = F.online_norm_backward(dy, cache2, np.zeros(C), np.zeros(C), out=dout)
    assert np.shares_memory(dx2, dout)
    np.testing.assert_array_equal(dout, dx)
    with pytest.raises(ValueError, match="out has shape"):
        F.online_norm_forward(x, np.zeros(C), np.ones(C), out=np.empty(shape))
    with pytest.raises(ValueError, match="overlap"):
        F.online_norm_backward(dy, cache, np.zeros(C), np.zeros(C), out=x)
