"""GroupNorm, InstanceNorm and RMSNorm: references, exact gradients, running stats, errors."""

from __future__ import annotations

import numpy as np
import pytest

from naive import layer_norm_ref, numerical_grad
import streamnorm as sn
from streamnorm import functional as F


def group_norm_ref(x, G, w, b, eps):
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    mu = xg.mean(-1, keepdims=True)
    var = ((xg - mu) ** 2).mean(-1, keepdims=True)
    y = ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape)
    shp = (1, C) + (1,) * (x.ndim - 2)
    return y * w.reshape(shp) + b.reshape(shp)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,G", [((3, 6, 5), 3), ((2, 4, 3, 3), 2), ((4, 8), 4), ((2, 6, 300), 1), ((1, 5, 7), 5)])
def test_group_norm_forward(rng, dtype, shape, G):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    C = shape[1]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    y, cache = F.group_norm_forward(x, G, w, b, 1e-5)
    assert y.dtype == dtype
    tol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, group_norm_ref(x.astype(np.float64), G, w, b, 1e-5), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,G", [((3, 6, 5), 3), ((2, 4, 3, 2), 2), ((4, 6), 3), ((1, 4, 5), 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_gradients(rng, shape, G, affine):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    C = shape[1]
    w = rng.standard_normal(C) if affine else None
    b = rng.standard_normal(C) if affine else None

    def f(xx, ww=w, bb=b):
        return F.group_norm_forward(xx, G, ww, bb, 1e-3)[0]

    dx, dw, db = F.group_norm_backward(dy, F.group_norm_forward(x, G, w, b, 1e-3)[1])
    np.testing.assert_allclose(dx, numerical_grad(f, x.copy(), dy), rtol=1e-5, atol=1e-7)
    assert np.abs(dx).max() > 1e-3
    if affine:
        np.testing.assert_allclose(dw, numerical_grad(lambda ww: f(x, ww, b), w.copy(), dy), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(db, numerical_grad(lambda bb: f(x, w, bb), b.copy(), dy), rtol=1e-5, atol=1e-7)


def test_group_norm_errors_and_contract(rng):
    with pytest.raises(ValueError, match="multiple of num_groups"):
        sn.GroupNorm(4, 6)
    gn = sn.GroupNorm(2, 4)
    with pytest.raises(ValueError, match="4 channels"):
        gn(np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="cannot be split"):
        F.group_norm_forward(np.ones((2, 6, 3)), 4)
    with pytest.raises(RuntimeError, match="before forward"):
        gn.backward(np.ones((2, 4, 5)))
    x = rng.standard_normal((1, 4, 5))  # batch of one is fine
    dy = rng.standard_normal(x.shape)
    gn(x)
    gn.backward(dy)
    assert gn.grads["weight"].shape == (4,)
    np.testing.assert_allclose(gn.grads["bias"], dy.sum((0, 2)))


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_gradients(rng, shape, affine):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    C = shape[1]
    w = rng.standard_normal(C) if affine else None
    b = rng.standard_normal(C) if affine else None
    f = lambda xx: F.instance_norm_forward(xx, w, b, eps=1e-3)[0]  # noqa: E731
    dx, dw, db = F.instance_norm_backward(dy, F.instance_norm_forward(x, w, b, eps=1e-3)[1])
    np.testing.assert_allclose(dx, numerical_grad(f, x.copy(), dy), rtol=1e-5, atol=1e-7)
    # eval mode with running statistics
    rm, rv = rng.standard_normal(C), rng.random(C) + 0.5
    g = lambda xx: F.instance_norm_forward(xx, w, b, mean=rm, var=rv, eps=1e-3)[0]  # noqa: E731
    dx, _, _ = F.instance_norm_backward(dy, F.instance_norm_forward(x, w, b, mean=rm, var=rv, eps=1e-3)[1])
    np.testing.assert_allclose(dx, numerical_grad(g, x.copy(), dy), rtol=1e-5, atol=1e-7)


def test_instance_norm_running_stats(rng):
    inn = sn.InstanceNorm(3, momentum=0.2, track_running_stats=True)
    x = rng.standard_normal((4, 3, 10)) * 2 + 1
    inn(x)
    mu = x.mean(-1).mean(0)
    var = x.var(-1, ddof=1).mean(0)
    np.testing.assert_allclose(inn.buffers["running_mean"], 0.2 * mu, rtol=1e-12)
    np.testing.assert_allclose(inn.buffers["running_var"], 0.8 + 0.2 * var, rtol=1e-12)
    inn.eval()
    y = inn(x[:1])
    rm, rv = inn.buffers["running_mean"], inn.buffers["running_var"]
    np.testing.assert_allclose(y, (x[:1] - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5), rtol=1e-12)


def test_instance_norm_errors():
    inn = sn.InstanceNorm(3)
    with pytest.raises(ValueError, match="spatial"):
        inn(np.ones((4, 3)))
    with pytest.raises(ValueError, match="more than 1 spatial value"):
        inn(np.ones((4, 3, 1)))
    with pytest.raises(ValueError, match="3 channels"):
        inn(np.ones((4, 2, 5)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ns", [((5, 8), (8,)), ((2, 3, 40), (40,)), ((3, 4, 5), (4, 5))])
def test_rms_norm_forward(rng, dtype, shape, ns):
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(ns)
    y, _ = F.rms_norm_forward(x, ns, w)
    eps = float(np.finfo(dtype).eps)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, layer_norm_ref(x, len(ns), w, None, eps, center=False), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,ns", [((5, 8), (8,)), ((2, 3, 9), (9,)), ((3, 4, 5), (4, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_gradients(rng, shape, ns, affine):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    w = rng.standard_normal(ns) if affine else None
    f = lambda xx, ww=w: F.rms_norm_forward(xx, ns, ww, 1e-3)[0]  # noqa: E731
    dx, dw = F.rms_norm_backward(dy, F.rms_norm_forward(x, ns, w, 1e-3)[1])
    np.testing.assert_allclose(dx, numerical_grad(f, x.copy(), dy), rtol=1e-5, atol=1e-7)
    if affine:
        np.testing.assert_allclose(dw, numerical_grad(lambda ww: f(x, ww), w.copy(), dy), rtol=1e-5, atol=1e-7)
    else:
        assert dw is None


def test_rms_norm_layer(rng):
    rn = sn.RMSNorm(6)
    assert set(rn.params) == {"weight"}
    x = rng.standard_normal((3, 6)).astype(np.float32)
    y = rn(x)
    assert y.dtype == np.float32
    dx = rn.backward(np.ones_like(x) * rng.standard_normal(6).astype(np.float32))
    assert dx.shape == x.shape and rn.grads["weight"].shape == (6,)
    with pytest.raises(ValueError, match="normalized_shape"):
        rn(np.ones((3, 5)))


def test_groupnorm_float32_offset_within_a_few_ulps(rng):
    # float32 blocks are written in float32 arithmetic from a two-term mean
    x = (1e4 + rng.standard_normal((3, 4, 50))).astype(np.float32)
    w, b = rng.normal(1, 0.5, 4), rng.normal(size=4)
    y, cache = F.group_norm_forward(x, 2, w, b)
    mu = np.repeat(cache.mean.reshape(3, 2), 2, axis=1)[:, :, None]
    r = np.repeat(cache.rstd.reshape(3, 2), 2, axis=1)[:, :, None]
    ref = (x.astype(np.float64) - mu) * r * w[:, None] + b[:, None]
    bv = np.broadcast_to(b[:, None], ref.shape)
    eps = np.finfo(np.float32).eps
    assert y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= 4 * eps * (np.abs(ref - bv) + np.abs(bv)))


def test_groupnorm_float32_backward_within_a_few_ulps(rng):
    # float32 dx is written in float32 arithmetic from float64 block sums
    x = (1e4 + rng.standard_normal((3, 4, 50))).astype(np.float32)
    dy = rng.standard_normal((3, 4, 50)).astype(np.float32)
    w = rng.normal(1, 0.5, 4)
    _, cache = F.group_norm_forward(x, 2, w, np.zeros(4))
    dx = F.group_norm_backward(dy, cache)[0]
    mu = np.repeat(cache.mean.reshape(3, 2), 2, axis=1)[:, :, None]
    r = np.repeat(cache.rstd.reshape(3, 2), 2, axis=1)[:, :, None]
    g = dy.astype(np.float64) * w[:, None]
    xhat = (x.astype(np.float64) - mu) * r

    def group_mean(a):  # mean over each (sample, group) block, broadcast back
        m = a.reshape(3, 2, 100).mean(axis=2)
        return np.repeat(m, 2, axis=1)[:, :, None]

    mg, mgx = group_mean(g), group_mean(g * xhat)
    ref = r * (g - mg - xhat * mgx)
    terms = r * (np.abs(g) + np.abs(mg) + np.abs(xhat * mgx))
    assert dx.dtype == np.float32
    assert np.all(np.abs(dx - ref) <= 8 * np.finfo(np.float32).eps * terms)
