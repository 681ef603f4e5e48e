"""Test-time adaptation of BatchNorm (docs/streams.rst) and its exact backward."""

from __future__ import annotations

import numpy as np
import pytest

from naive import numerical_grad
import streamnorm as sn
from streamnorm import functional as F


def source_bn(rng, C=3):
    bn = sn.BatchNorm(C)
    bn.load_state_dict({
        "weight": rng.standard_normal(C), "bias": rng.standard_normal(C),
        "running_mean": rng.standard_normal(C), "running_var": rng.random(C) + 0.5, "num_batches_tracked": 10,
    })
    return bn.eval()


def normalized(x, bn, mu, var):
    """Per-channel normalization with channel axis 1 for (N, C) or (N, C, L) input."""
    shp = (1, -1) + (1,) * (x.ndim - 2)
    mu, var = np.reshape(mu, shp), np.reshape(var, shp)
    w, b = bn.params["weight"].reshape(shp), bn.params["bias"].reshape(shp)
    return (x - mu) / np.sqrt(var + bn.eps) * w + b


@pytest.mark.parametrize("p,unbiased", [(0.0, False), (0.3, True), (0.7, False), (1.0, True)])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)])
def test_blended_backward_is_exact(rng, p, unbiased, shape):
    C = 3
    x = rng.standard_normal(shape) * 2 + 1
    dy = rng.standard_normal(shape)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    pm, pv = rng.standard_normal(C), rng.random(C) + 0.5
    kw = dict(prior_mean=pm, prior_var=pv, prior_weight=p, unbiased=unbiased, eps=1e-3)

    def f(xx, ww=w, bb=b):
        return F.batch_norm_forward(xx, ww, bb, **kw)[0]

    dx, dw, db = F.batch_norm_backward(dy, F.batch_norm_forward(x, w, b, **kw)[1])
    np.testing.assert_allclose(dx, numerical_grad(f, x.copy(), dy), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, numerical_grad(lambda ww: f(x, ww, b), w.copy(), dy), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, numerical_grad(lambda bb: f(x, w, bb), b.copy(), dy), rtol=1e-5, atol=1e-7)


def test_batch_mode_uses_batch_statistics_and_updates_nothing(rng):
    bn = source_bn(rng).adapt("batch")
    before = bn.state_dict()
    x = rng.standard_normal((8, 3)) + 5
    np.testing.assert_allclose(bn(x), normalized(x, bn, x.mean(0), x.var(0)), rtol=1e-12)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_prior_mode_mixes_and_never_changes_source(rng):
    bn = source_bn(rng)
    src_m, src_v = bn.running_mean.copy(), bn.running_var.copy()
    bn.adapt("prior", prior_strength=8)
    for n in (4, 12):
        x = rng.standard_normal((n, 3, 2)) * 3 + 2
        p = 8 / (8 + n)
        m = x.shape[0] * x.shape[2]
        mu = p * src_m + (1 - p) * x.mean((0, 2))
        var = p * src_v + (1 - p) * x.var((0, 2)) * m / (m - 1)
        np.testing.assert_allclose(bn(x), normalized(x, bn, mu, var), rtol=1e-12)
        np.testing.assert_array_equal(bn.running_mean, src_m)
        np.testing.assert_array_equal(bn.running_var, src_v)


@pytest.mark.parametrize("mode", ["ema", "cumulative", "dua"])
def test_running_modes_follow_their_recurrences(rng, mode):
    bn = source_bn(rng)
    src_m, src_v = bn.running_mean.copy(), bn.running_var.copy()
    bn.adapt(mode, momentum=0.2, m0=0.3, omega=0.5, m_min=0.01)
    mu, var = src_m.copy(), src_v.copy()
    means, vars_ = [], []
    for k in range(1, 5):
        x = rng.standard_normal((5, 3)) * k + k
        bm, bv = x.mean(0), x.var(0, ddof=1)
        means.append(bm)
        vars_.append(bv)
        if mode == "cumulative":
            mu, var = np.mean(means, 0), np.mean(vars_, 0)
        else:
            mom = 0.2 if mode == "ema" else 0.3 * 0.5**k + 0.01
            mu, var = (1 - mom) * mu + mom * bm, (1 - mom) * var + mom * bv
        y = bn(x)
        np.testing.assert_allclose(bn.running_mean, mu, rtol=1e-12)
        np.testing.assert_allclose(bn.running_var, var, rtol=1e-12)
        np.testing.assert_allclose(y, normalized(x, bn, mu, var), rtol=1e-12)
    bn.reset_adaptation()
    np.testing.assert_array_equal(bn.running_mean, src_m)
    np.testing.assert_array_equal(bn.running_var, src_v)
    # the schedule restarts too: the next batch is batch 1 again
    x = rng.standard_normal((5, 3))
    bn(x)
    if mode == "cumulative":
        np.testing.assert_allclose(bn.running_mean, x.mean(0), rtol=1e-12)


def test_stop_and_errors(rng):
    bn = source_bn(rng)
    with pytest.raises(ValueError, match="unknown adaptation mode"):
        bn.adapt("tent")
    with pytest.raises(RuntimeError, match="eval"):
        sn.BatchNorm(3).adapt("batch")
    with pytest.raises(ValueError, match="track_running_stats"):
        sn.BatchNorm(3, track_running_stats=False).eval().adapt("batch")
    bn.adapt("ema")
    before = bn.state_dict()
    with pytest.raises(ValueError, match="3 channels"):
        bn(np.ones((4, 2)))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(np.ones((1, 3)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert bn.adaptation == "ema"
    bn(rng.standard_normal((4, 3)))
    adapted = bn.running_mean.copy()
    bn.adapt(None)
    assert bn.adaptation is None
    np.testing.assert_array_equal(bn.running_mean, adapted)  # stopping keeps what was learnt
    x = rng.standard_normal((4, 3))
    np.testing.assert_allclose(bn(x), normalized(x, bn, bn.running_mean, bn.running_var), rtol=1e-12)


def test_layer_backward_in_adapt_mode_matches_functional(rng):
    bn = source_bn(rng).adapt("prior", prior_strength=4)
    x, dy = rng.standard_normal((2, 6, 3))
    bn(x)
    dx = bn.backward(dy)
    _, cache = F.batch_norm_forward(x, bn.params["weight"], bn.params["bias"], prior_mean=bn.running_mean,
                                    prior_var=bn.running_var, prior_weight=0.4, unbiased=True)
    np.testing.assert_allclose(dx, F.batch_norm_backward(dy, cache)[0], rtol=1e-12)
