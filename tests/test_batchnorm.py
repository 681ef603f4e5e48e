"""BatchNorm: forward against a NumPy reference, exact gradients, running statistics, errors."""

from __future__ import annotations

import numpy as np
import pytest

from naive import batch_norm_ref, exact_mean_var, numerical_grad
import streamnorm as sn
from streamnorm import functional as F

SHAPES = [((8, 5), 1), ((6, 3, 7), 1), ((4, 3, 2, 5), 1), ((4, 2, 3, 3), -1), ((3, 4, 5), 2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_forward_matches_reference(rng, dtype, shape, axis):
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    y, cache = F.batch_norm_forward(x, w, b, eps=1e-5, axis=axis)
    ref, mu, var = batch_norm_ref(x, w, b, 1e-5, axis)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(cache.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(cache.var, var, rtol=1e-12)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradients_against_finite_differences(rng, shape, axis, batch_stats, affine):
    C = shape[axis]
    x = rng.standard_normal(shape) * 1.5 + 0.5
    dy = rng.standard_normal(shape)
    w = rng.standard_normal(C) if affine else None
    b = rng.standard_normal(C) if affine else None
    stats = {} if batch_stats else {"mean": rng.standard_normal(C), "var": rng.random(C) + 0.5}

    def f(xx, ww=w, bb=b):
        return F.batch_norm_forward(xx, ww, bb, axis=axis, eps=1e-3, **stats)[0]

    _, cache = F.batch_norm_forward(x, w, b, axis=axis, eps=1e-3, **stats)
    dx, dw, db = F.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(dx, numerical_grad(f, x.copy(), dy), rtol=1e-5, atol=1e-7)
    if affine:
        np.testing.assert_allclose(dw, numerical_grad(lambda ww: f(x, ww, b), w.copy(), dy), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(db, numerical_grad(lambda bb: f(x, w, bb), b.copy(), dy), rtol=1e-5, atol=1e-7)
    # the gradients are not trivially zero: this data can catch a wrong formula
    assert np.abs(dx).max() > 1e-3


def test_layer_backward_fills_grads_and_overwrites(rng):
    bn = sn.BatchNorm(3)
    x = rng.standard_normal((10, 3))
    dy1, dy2 = rng.standard_normal((2, 10, 3))
    bn(x)
    bn.backward(dy1)
    g1 = {k: v.copy() for k, v in bn.grads.items()}
    bn.backward(dy2)
    _, cache = F.batch_norm_forward(x, bn.params["weight"], bn.params["bias"])
    _, dw, db = F.batch_norm_backward(dy2, cache)
    np.testing.assert_allclose(bn.grads["weight"], dw)
    np.testing.assert_allclose(bn.grads["bias"], db)
    assert not np.allclose(g1["bias"], bn.grads["bias"])


def test_running_statistics_follow_pytorch_rule(rng):
    bn = sn.BatchNorm(4, momentum=0.3)
    rm, rv = np.zeros(4), np.ones(4)
    for _ in range(3):
        x = rng.standard_normal((6, 4, 5)) * 2 + 1
        bn(x)
        m = 30
        mu = x.mean((0, 2))
        var = x.var((0, 2)) * m / (m - 1)
        rm, rv = 0.7 * rm + 0.3 * mu, 0.7 * rv + 0.3 * var
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
    assert bn.num_batches_tracked == 3


def test_momentum_none_is_cumulative_average(rng):
    bn = sn.BatchNorm(2, momentum=None)
    xs = [rng.standard_normal((5, 2)) + i for i in range(4)]
    for x in xs:
        bn(x)
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(0) for x in xs], axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean([x.var(0, ddof=1) for x in xs], axis=0), rtol=1e-12)


def test_eval_mode_uses_running_statistics(rng):
    bn = sn.BatchNorm(3)
    bn.load_state_dict(
        {"weight": [1.0, 2.0, 3.0], "bias": [0.0, 1.0, -1.0], "running_mean": [1.0, 2.0, 3.0],
         "running_var": [4.0, 1.0, 0.25], "num_batches_tracked": 5}
    )
    bn.eval()
    x = rng.standard_normal((7, 3))
    before = bn.state_dict()
    y = bn(x)
    ref, _, _ = batch_norm_ref(x, bn.params["weight"], bn.params["bias"], bn.eps, 1,
                               bn.running_mean, bn.running_var)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # batch of one works in eval mode
    assert bn(x[:1]).shape == (1, 3)


def test_no_running_stats_uses_batch_stats_in_eval(rng):
    bn = sn.BatchNorm(3, track_running_stats=False).eval()
    x = rng.standard_normal((9, 3))
    np.testing.assert_allclose(bn(x), batch_norm_ref(x, np.ones(3), np.zeros(3), 1e-5)[0], rtol=1e-12)
    assert set(bn.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channel_gives_exactly_beta(dtype):
    x = np.full((16, 2, 3), dtype(0.7), dtype=dtype)
    x[:, 1] = np.arange(48, dtype=dtype).reshape(16, 3)
    bn = sn.BatchNorm(2)
    bn.params["bias"][:] = [0.25, 0.0]
    y = bn(x)
    assert np.all(y[:, 0] == dtype(0.25))
    assert bn.running_var[0] == 0.9  # (1 - 0.1)·1 + 0.1·0


def test_batch_of_one_in_train_mode_is_a_clear_error_and_changes_nothing():
    bn = sn.BatchNorm(3)
    before = bn.state_dict()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.ones((1, 3)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # (1, C, L>1) is fine: L values per channel
    assert bn(np.arange(6.0).reshape(1, 3, 2)).shape == (1, 3, 2)


def test_bad_input_errors():
    bn = sn.BatchNorm(3)
    with pytest.raises(ValueError, match="3 channels"):
        bn(np.ones((4, 5)))
    with pytest.raises(ValueError, match="at least|shape"):
        bn(np.ones(3))
    with pytest.raises(TypeError, match="complex"):
        bn(np.ones((4, 3), dtype=complex))
    with pytest.raises(TypeError, match="not numeric"):
        bn(np.ones((4, 3), dtype=object))
    with pytest.raises(ValueError, match="4-dimensional"):
        sn.BatchNorm2d(3)(np.ones((4, 3)))
    with pytest.raises(ValueError, match="2 or 3-dimensional"):
        sn.BatchNorm1d(3)(np.ones((4, 3, 2, 2)))
    with pytest.raises(RuntimeError, match="before forward"):
        sn.BatchNorm(3).backward(np.ones((4, 3)))
    bn(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(ValueError, match="dy has shape"):
        bn.backward(np.ones((5, 3)))
    with pytest.raises(ValueError, match="num_features"):
        sn.BatchNorm(0)


def test_state_dict_round_trip_and_errors(rng):
    bn = sn.BatchNorm(3)
    for _ in range(2):
        bn(rng.standard_normal((5, 3)))
    sd = bn.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"] == 2
    other = sn.BatchNorm(3)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    before = other.state_dict()
    with pytest.raises(KeyError, match="missing keys"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "running_var"})
    with pytest.raises(ValueError, match="running_var"):
        other.load_state_dict(dict(sd, running_var=np.ones(4)))
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("make", [np.asfortranarray, lambda a: a[:, ::2], lambda a: a.transpose(0, 1, 3, 2)])
def test_non_contiguous_and_read_only_input(rng, make):
    base = rng.standard_normal((4, 3, 6, 6))
    x = make(base)
    x.flags.writeable = False
    y, cache = F.batch_norm_forward(x)
    np.testing.assert_allclose(y, batch_norm_ref(x, None, None, 1e-5)[0], rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx, _, _ = F.batch_norm_backward(dy, cache)
    dx_ref, _, _ = F.batch_norm_backward(dy, F.batch_norm_forward(np.ascontiguousarray(x))[1])
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)


def test_integer_input_is_cast(rng):
    x = rng.integers(0, 10, size=(8, 3))
    y = sn.BatchNorm(3)(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, batch_norm_ref(x, None, None, 1e-5)[0], rtol=1e-12)


def test_offset_data_float64(rng):
    x = 1e8 + rng.standard_normal((4000, 2))
    y, cache = F.batch_norm_forward(x)
    for j in range(2):
        mu, var = exact_mean_var(x[:, j])
        assert abs(cache.mean[j] - mu) <= 1e-15 * mu
        assert abs(cache.var[j] - var) <= 1e-9 * var
        ref = (x[:, j] - mu) / np.sqrt(var + 1e-5)
        # the input itself is only known to ulp(1e8) ≈ 1.5e-8
        np.testing.assert_allclose(y[:, j], ref, atol=3e-8)


@pytest.mark.parametrize("shape", [(3000, 2), (60, 2, 50)])
def test_offset_data_float32_within_a_few_ulps(rng, shape):
    # float32 outputs are computed in float32 from a two-term mean: on data 1e4 std
    # away from zero they stay within a few ulps of the float64 computation, where a
    # mean rounded to float32 once would cost about a third of the digits
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    w, b = np.array([1.5, -0.5]), np.array([0.25, 3.0])
    y, cache = F.batch_norm_forward(x, w, b)
    view = (1, 2) + (1,) * (x.ndim - 2)
    mu, r = cache.mean.reshape(view), (1 / np.sqrt(cache.var + 1e-5)).reshape(view)
    wv, bv = w.reshape(view), b.reshape(view)
    ref = (x.astype(np.float64) - mu) * r * wv + bv
    eps = np.finfo(np.float32).eps
    bound = 4 * eps * (np.abs(ref - bv) + np.abs(bv))
    assert y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= bound)
    once = (x - mu.astype(np.float32)) * (r * wv).astype(np.float32) + bv.astype(np.float32)
    assert np.any(np.abs(once - ref) > 100 * bound)


def test_float32_backward_within_a_few_ulps(rng):
    # float32 gradients are written in float32 arithmetic from float64 sums and a
    # two-term mean: within a few ulps of the terms of dx = k1·dy + k2·(x - μ) + k3
    x = (1e4 + rng.standard_normal((3000, 2))).astype(np.float32)
    dy = rng.standard_normal((3000, 2)).astype(np.float32)
    w = np.array([1.5, -0.5])
    y, cache = F.batch_norm_forward(x, w, np.zeros(2))
    dx, dw, db = F.batch_norm_backward(dy, cache)
    x64, g64 = x.astype(np.float64), dy.astype(np.float64)
    m = 3000
    r = 1 / np.sqrt(cache.var + 1e-5)
    xhat = (x64 - cache.mean) * r
    k1 = w * r
    terms = np.abs(k1 * g64) + np.abs(k1 * g64.sum(0) / m) + np.abs(k1 * xhat * (g64 * xhat).sum(0) / m)
    ref = k1 * (g64 - g64.sum(0) / m - xhat * (g64 * xhat).sum(0) / m)
    assert dx.dtype == np.float32
    assert np.all(np.abs(dx - ref) <= 8 * np.finfo(np.float32).eps * terms)
    np.testing.assert_allclose(db, g64.sum(0), rtol=1e-12)
    np.testing.assert_allclose(dw, (g64 * xhat).sum(0), rtol=1e-9)


def test_out_buffer_is_written_and_checked(rng):
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    out = np.empty_like(x)
    y, cache = F.batch_norm_forward(x, out=out)
    assert y is out or np.shares_memory(y, out)
    np.testing.assert_array_equal(out, F.batch_norm_forward(x)[0])
    with pytest.raises(ValueError, match="overlap"):
        F.batch_norm_forward(x, out=x)
    with pytest.raises(ValueError, match="dtype"):
        F.batch_norm_forward(x, out=np.empty(x.shape))
    with pytest.raises(ValueError, match="C-contiguous"):
        F.batch_norm_forward(x, out=np.empty((4, 3, 6), np.float32).transpose(2, 1, 0))
    for fwd in (lambda o: F.layer_norm_forward(x, 4, out=o), lambda o: F.rms_norm_forward(x, 4, out=o),
                lambda o: F.group_norm_forward(x, 3, out=o)):
        o = np.empty_like(x)
        y, _ = fwd(o)
        np.testing.assert_array_equal(o, fwd(None)[0])
