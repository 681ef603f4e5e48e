"""LayerNorm: forward against a NumPy reference, exact gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest

from naive import layer_norm_ref, numerical_grad
import streamnorm as sn
from streamnorm import functional as F


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ns", [((5, 8), (8,)), ((2, 3, 17), (17,)), ((3, 4, 5), (4, 5)), ((6,), (6,))])
def test_forward_matches_reference(rng, dtype, shape, ns):
    x = (rng.standard_normal(shape) * 3 - 1).astype(dtype)
    w, b = rng.standard_normal(ns), rng.standard_normal(ns)
    y, cache = F.layer_norm_forward(x, ns, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, layer_norm_ref(x, len(ns), w, b, 1e-5), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,ns", [((5, 8), (8,)), ((2, 3, 9), (9,)), ((3, 4, 5), (4, 5)), ((1, 3), (3,))])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_gradients_against_finite_differences(rng, shape, ns, affine, bias):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    w = rng.standard_normal(ns) if affine else None
    b = rng.standard_normal(ns) if bias else None

    def f(xx, ww=w, bb=b):
        return F.layer_norm_forward(xx, ns, ww, bb, 1e-3)[0]

    _, cache = F.layer_norm_forward(x, ns, w, b, 1e-3)
    dx, dw, db = F.layer_norm_backward(dy, cache)
    np.testing.assert_allclose(dx, numerical_grad(f, x.copy(), dy), rtol=1e-5, atol=1e-7)
    assert np.abs(dx).max() > 1e-3
    if affine:
        np.testing.assert_allclose(dw, numerical_grad(lambda ww: f(x, ww, b), w.copy(), dy), rtol=1e-5, atol=1e-7)
    else:
        assert dw is None
    if bias:
        np.testing.assert_allclose(db, numerical_grad(lambda bb: f(x, w, bb), b.copy(), dy), rtol=1e-5, atol=1e-7)
    else:
        assert db is None


def test_layer_contract(rng):
    ln = sn.LayerNorm((3, 4))
    assert set(ln.params) == {"weight", "bias"} and ln.params["weight"].shape == (3, 4)
    with pytest.raises(RuntimeError, match="before forward"):
        ln.backward(np.ones((2, 3, 4)))
    x = rng.standard_normal((2, 3, 4))
    ln.params["weight"] = rng.standard_normal((3, 4))
    y = ln(x)
    dy = rng.standard_normal(x.shape)
    dx = ln.backward(dy)
    assert dx.shape == x.shape
    np.testing.assert_allclose(ln.grads["bias"], dy.sum(0))
    assert set(sn.LayerNorm(4, bias=False).params) == {"weight"}
    assert sn.LayerNorm(4, elementwise_affine=False).params == {}
    # eval mode changes nothing for LayerNorm
    np.testing.assert_array_equal(ln.eval()(x), y)
    sd = ln.state_dict()
    ln2 = sn.LayerNorm((3, 4))
    ln2.load_state_dict(sd)
    np.testing.assert_array_equal(ln2(x), y)


def test_constant_row_gives_exactly_bias():
    x = np.full((3, 10), 0.1 * 3, dtype=np.float64)
    b = np.linspace(-1, 1, 10)
    y, _ = F.layer_norm_forward(x, 10, None, b)
    np.testing.assert_array_equal(y, np.broadcast_to(b, y.shape))


def test_offset_rows(rng):
    x = 1e8 + rng.standard_normal((4, 4096))
    y, _ = F.layer_norm_forward(x, 4096)
    mu = x.mean(1, keepdims=True)
    ref = (x - mu) / np.sqrt(((x - mu) ** 2).mean(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, atol=1e-7)


@pytest.mark.parametrize("center", [True, False])
def test_float32_rows_within_a_few_ulps(rng, center):
    # float32 rows are written in float32 arithmetic from a two-term mean: on rows 1e4
    # std away from zero they stay within a few ulps of the float64 computation
    x = (1e4 + rng.standard_normal((6, 512))).astype(np.float32)
    w, b = rng.normal(1, 0.5, 512), rng.normal(size=512)
    if center:
        y, cache = F.layer_norm_forward(x, 512, w, b)
    else:
        y, cache = F.rms_norm_forward(x, 512, w)
        b = np.zeros(512)
    mu, r = cache.mean[:, None], cache.rstd[:, None]
    ref = (x.astype(np.float64) - mu) * r * w + b
    eps = np.finfo(np.float32).eps
    assert y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= 4 * eps * (np.abs(ref - b) + np.abs(b)))


@pytest.mark.parametrize("center", [True, False])
def test_float32_backward_within_a_few_ulps(rng, center):
    # float32 dx is written in float32 arithmetic from float64 row sums
    x = (1e4 + rng.standard_normal((6, 512))).astype(np.float32)
    dy = rng.standard_normal((6, 512)).astype(np.float32)
    w = rng.normal(1, 0.5, 512)
    fwd, bwd = (F.layer_norm_forward, F.layer_norm_backward) if center else (F.rms_norm_forward, F.rms_norm_backward)
    _, cache = fwd(x, 512, w) if not center else fwd(x, 512, w, None)
    dx = bwd(dy, cache)[0]
    mu, r = cache.mean[:, None], cache.rstd[:, None]
    g = dy.astype(np.float64) * w
    xhat = (x.astype(np.float64) - mu) * r
    mg = g.mean(1, keepdims=True) if center else 0.0
    mgx = (g * xhat).mean(1, keepdims=True)
    ref = r * (g - mg - xhat * mgx)
    terms = r * (np.abs(g) + np.abs(mg) + np.abs(xhat * mgx))
    assert dx.dtype == np.float32
    assert np.all(np.abs(dx - ref) <= 8 * np.finfo(np.float32).eps * terms)


def test_constant_float32_row_gives_exactly_bias():
    x = np.full((3, 40), 1e4 / 3, dtype=np.float32)
    b = np.linspace(-1, 1, 40)
    y, _ = F.layer_norm_forward(x, 40, None, b)
    np.testing.assert_array_equal(y, np.broadcast_to(b.astype(np.float32), y.shape))


def test_errors():
    ln = sn.LayerNorm(4)
    with pytest.raises(ValueError, match="normalized_shape"):
        ln(np.ones((3, 5)))
    with pytest.raises(TypeError, match="complex"):
        ln(np.ones((3, 4), dtype=complex))
    ln(np.ones((3, 4)))
    with pytest.raises(ValueError, match="dy has shape"):
        ln.backward(np.ones((2, 4)))
    with pytest.raises(ValueError, match="eps"):
        sn.LayerNorm(4, eps=-1)


@pytest.mark.parametrize("make", [np.asfortranarray, lambda a: a[:, ::2], lambda a: a[::-1]])
def test_non_contiguous_and_read_only(rng, make):
    x = make(rng.standard_normal((6, 10)))
    x.flags.writeable = False
    y, _ = F.layer_norm_forward(x, x.shape[-1])
    np.testing.assert_allclose(y, layer_norm_ref(x, 1, None, None, 1e-5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 11, 23])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("center", [True, False])
def test_parameter_gradients_at_every_row_grouping(rng, rows, nthreads, center):
    # the backward takes rows two at a time, then the row left over: odd and even
    # counts, and thread ranges that split the pairs
    from streamnorm import _kernels_cpu as K

    D = 37
    x = (rng.standard_normal((rows, D)) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal((rows, D)).astype(np.float32)
    w = rng.standard_normal(D)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean = x64.mean(axis=1) if center else np.zeros(rows)
    var = ((x64 - mean[:, None]) ** 2).mean(axis=1)
    rstd = 1 / np.sqrt(var + 1e-5)
    xhat = (x64 - mean[:, None]) * rstd[:, None]
    dx = np.empty_like(x)
    dw, db = K.rownorm_bwd(dy, x, w, w, mean, rstd, center, dx, nthreads, False)
    np.testing.assert_allclose(dw, (dy64 * xhat).sum(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dy64.sum(axis=0), rtol=1e-12, atol=1e-12)
    g = dy64 * w
    mg = g.mean(axis=1, keepdims=True) if center else 0.0
    ref = rstd[:, None] * (g - mg - xhat * (g * xhat).mean(axis=1, keepdims=True))
    np.testing.assert_allclose(dx, ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 64, 1000, 4099])
def test_row_statistics_are_exact_to_1e9_with_a_large_offset(rng, n):
    # the row sums run as several vector partial sums; the terms x - c and (x - μ)²
    # must still be rounded as written (no algebraic rewrite), which the offset exposes
    from naive import fsum_mean_var
    from streamnorm import _kernels_cpu as K

    x = 1e8 + rng.standard_normal(n)
    mu, m2 = K._row_moments(x)
    ref_mu, ref_var = fsum_mean_var(x)
    assert mu == pytest.approx(ref_mu, rel=1e-15)
    if n > 1:
        assert m2 / n == pytest.approx(ref_var, rel=1e-9)
    # a constant row: mean exactly its value, M2 exactly 0
    c = np.full(n, 0.1 * 3)
    assert K._row_moments(c) == (c[0], 0.0)
