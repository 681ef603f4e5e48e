"""TENT pieces: the entropy objective, Adam on affine parameters, episodic resets; the demo."""

from __future__ import annotations

import numpy as np
import pytest

from naive import numerical_grad
import streamnorm as sn
from streamnorm.tta import Adam, Tent, entropy


def test_entropy_value_and_gradient(rng):
    z = rng.standard_normal((5, 4)) * 3
    H, g = entropy(z)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert H == pytest.approx(np.mean(-(p * np.log(p)).sum(1)), rel=1e-12)
    num = numerical_grad(lambda zz: np.array(entropy(zz)[0]), z.copy(), np.array(1.0))
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-9)


def test_entropy_is_stable_for_huge_logits():
    H, g = entropy(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.isfinite(H) and np.all(np.isfinite(g))
    assert H == pytest.approx(np.log(2) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        entropy(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        entropy(np.array([[np.nan, 1.0]]))


def test_adam_matches_reference_steps(rng):
    bn = sn.BatchNorm(3)
    opt = Adam([bn], lr=0.1)
    w = bn.params["weight"].copy()
    m = v = np.zeros(3)
    for t in range(1, 4):
        g = rng.standard_normal(3)
        bn.grads["weight"] = g
        bn.grads["bias"] = g * 0
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(bn.params["weight"], w, rtol=1e-12)


def _net(rng):
    bn = sn.BatchNorm(4)
    bn.load_state_dict({"weight": rng.random(4) + 0.5, "bias": rng.standard_normal(4),
                        "running_mean": np.zeros(4), "running_var": np.ones(4), "num_batches_tracked": 1})
    W = rng.standard_normal((4, 3))
    return bn, W


def test_tent_lowers_entropy_and_touches_only_affine(rng):
    bn, W = _net(rng)
    tent = Tent([bn], lr=1e-2)
    assert bn.adaptation == "batch" and not bn.training
    x = rng.standard_normal((32, 4)) * 2 + 3
    stats = (bn.running_mean.copy(), bn.running_var.copy())
    Hs = []
    for _ in range(30):
        z = bn(x) @ W
        H, dz = entropy(z)
        bn.backward(dz @ W.T)
        tent.step()
        Hs.append(H)
    assert Hs[-1] < Hs[0] * 0.9
    np.testing.assert_array_equal(bn.running_mean, stats[0])
    np.testing.assert_array_equal(bn.running_var, stats[1])


def test_tent_episodic_restores_source_before_each_batch(rng):
    bn, W = _net(rng)
    source = bn.state_dict()
    tent = Tent([bn], lr=1e-2, episodic=True)
    x = rng.standard_normal((16, 4))
    outs = []
    for _ in range(3):
        tent.begin()
        z = bn(x) @ W
        outs.append(z)
        bn.backward(entropy(z)[1] @ W.T)
        tent.step()
    np.testing.assert_array_equal(outs[0], outs[2])  # every batch starts from the source
    tent.reset()
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, source[k])


def test_tent_errors():
    with pytest.raises(ValueError, match="at least one"):
        Tent([])
    with pytest.raises(TypeError, match="BatchNorm"):
        Tent([sn.LayerNorm(3)])
    with pytest.raises(ValueError, match="affine"):
        Tent([sn.BatchNorm(3, affine=False)])
    bn = sn.BatchNorm(3)
    t = Tent([bn])
    bn.grads.clear()
    with pytest.raises(RuntimeError, match="backward"):
        t.step()


def test_demo_runs_and_reports_every_method(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from streamnorm._demo import main

    assert main(["--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("no normalization", "adapt 'batch'", "adapt 'prior'", "adapt 'ema'", "adapt 'cumulative'",
                 "adapt 'dua'", "TENT", "OnlineNorm, streaming statistics"):
        assert name in out
    for png in ("convergence.png", "shift.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
