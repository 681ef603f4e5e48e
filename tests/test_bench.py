"""The ``python -m streamnorm bench`` report: a small run end to end, and its NumPy peers
against streamnorm on small inputs."""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np
import pytest

import streamnorm as sn
from streamnorm import _bench as B

EXPECTED_OPS = {
    "RunningStats.update (64 chunks)",
    "StreamScaler.partial_fit (64 chunks)",
    "BatchNorm forward, train",
    "BatchNorm forward, eval",
    "BatchNorm forward+backward, train",
    "LayerNorm forward",
    "LayerNorm forward+backward",
    "RMSNorm forward",
    "RMSNorm forward+backward",
    "GroupNorm (32 groups) forward",
    "GroupNorm (32 groups) forward+backward",
    "OnlineNorm forward",
    "OnlineNorm forward+backward",
}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# tolerances of a NumPy peer against streamnorm: float32 peers compute in float32
TOL = {np.float64: dict(rtol=1e-9, atol=1e-9), np.float32: dict(rtol=2e-4, atol=2e-4)}
DTYPES = [np.float64, np.float32]


# ---------------------------------------------------------------------------
# The report, end to end
# ---------------------------------------------------------------------------


def test_small_report_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert B.main(["--size-mib", "4", "--repeat", "1", "--json", str(out), "--plot", str(png)]) == 0

    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == EXPECTED_OPS
    # BatchNorm runs on (N, C) and on (N, C, H, W): two rows of each kind
    assert len(rows) == len(EXPECTED_OPS) + 5
    assert len({r["shape"] for r in rows if r["op"].startswith("BatchNorm")}) == 2
    # OnlineNorm on the feature maps and on wide (N, C) rows: two of each
    assert len({r["shape"] for r in rows if r["op"].startswith("OnlineNorm")}) == 2
    assert data["bandwidth_Bps"] > 0
    for r in rows:
        assert r["streamnorm_ms"] > 0 and r["gbps"] > 0 and r["bound_fraction"] > 0, r
        # the bound's copy is timed in the row's own rounds, and is not a peer
        assert r["copy_gbps"] > 0 and "copy" not in r["peers_ms"], r
        # the bound uses the higher of the run's and the row's copy bandwidth
        assert r["bound_fraction"] == pytest.approx(r["gbps"] / max(r["copy_gbps"], data["bandwidth_Bps"] / 1e9))
        # every round is kept; the medians and the best round follow from them
        rounds = r["rounds_ms"]
        assert set(rounds) == {"ours", "copy", *r["peers_ms"]}
        assert all(len(v) == 1 and v[0] > 0 for v in rounds.values()), rounds
        assert r["streamnorm_ms"] == pytest.approx(statistics.median(rounds["ours"]))
        traffic_gb = r["gbps"] * r["streamnorm_ms"] / 1e3
        copy_gb = r["copy_gbps"] * statistics.median(rounds["copy"]) / 1e3  # bytes of one copy
        best_bw = max(copy_gb / (min(rounds["copy"]) / 1e3), data["bandwidth_Bps"] / 1e9)
        assert r["best_fraction"] == pytest.approx(traffic_gb / best_bw / (min(rounds["ours"]) / 1e3))
        assert "NumPy" in r["peers_ms"], r["op"]
        assert set(r["speedup"]) == set(r["peers_ms"])
        for peer, ms in r["peers_ms"].items():
            assert ms > 0 and r["speedup"][peer] > 0, (r["op"], peer)
            assert r["speedup"][peer] == pytest.approx(ms / r["streamnorm_ms"])

    table = capsys.readouterr().out
    assert "NumPy ms" in table and "vs NumPy" in table

    blob = png.read_bytes()
    assert blob[:8] == PNG_SIGNATURE
    assert len(blob) > 10_000


def test_ops_selects_rows_case_insensitively(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert B.main(["--size-mib", "1", "--repeat", "1", "--ops", "rmsNORM", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["RMSNorm forward", "RMSNorm forward+backward"]
    assert "LayerNorm" not in capsys.readouterr().out


def test_ops_matching_nothing_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--size-mib", "1", "--repeat", "1", "--ops", "no such op"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "matches no operation" in err and "LayerNorm forward" in err


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        B.plot_report([], str(tmp_path / "x.png"))
    with pytest.raises(SystemExit) as e:
        B.main(["--size-mib", "1", "--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_feature_maps_have_two_samples_at_small_sizes():
    for mib in (1, 4, 8, 256):
        shape = B._feature_map_shape(mib * B.MiB // 4)
        assert shape[0] >= 2 and shape[1] == 64
    assert B._feature_map_shape(256 * B.MiB // 4) == (64, 64, 128, 128)


def test_rounds_rotate_so_that_ours_does_not_always_follow_the_same_peer():
    calls = []

    class Probe(B.CopyProbe):
        def __init__(self):
            self.nbytes = 2 * B.MiB

        def __call__(self):
            calls.append("copy")

    case = B.Case("op", (2, 2), "float32", 16, 1, lambda: calls.append("ours"),
                  {"NumPy": lambda: calls.append("NumPy"), "PyTorch": lambda: calls.append("PyTorch")})
    row = B.run_case(case, 1e9, 3, Probe())
    rounds = [calls[i : i + 4] for i in range(4, 16, 4)]  # after the warm-up calls
    assert rounds == [
        ["ours", "copy", "NumPy", "PyTorch"],
        ["NumPy", "PyTorch", "ours", "copy"],
        ["PyTorch", "ours", "copy", "NumPy"],
    ]
    assert set(row.peers_ms) == {"NumPy", "PyTorch"}
    assert {k: len(v) for k, v in row.rounds_ms.items()} == {"ours": 3, "copy": 3, "NumPy": 3, "PyTorch": 3}


def test_best_round_pairs_the_fastest_call_with_the_fastest_copy(monkeypatch):
    """Medians for the headline fraction; the fastest round of ours against the fastest
    copy for the best one, each bandwidth floored by the run's."""
    ticks = iter([0.0, 4.0, 4.0, 6.0,  # ours 4 s, copy 2 s
                  6.0, 8.0, 8.0, 9.0,  # ours 2 s, copy 1 s
                  9.0, 12.0, 12.0, 16.0])  # ours 3 s, copy 4 s
    monkeypatch.setattr(B.time, "perf_counter", lambda: next(ticks))

    class Probe(B.CopyProbe):
        def __init__(self):
            self.nbytes = 8.0  # bytes per copy

        def __call__(self):
            pass

    case = B.Case("op", (2, 2), "float32", 2, 3, lambda: None, {})  # traffic 6 bytes
    row = B.run_case(case, 1.0, 3, Probe())
    assert row.rounds_ms == {"ours": [4e3, 2e3, 3e3], "copy": [2e3, 1e3, 4e3]}
    assert row.streamnorm_ms == pytest.approx(3e3)
    assert row.copy_gbps == pytest.approx(8.0 / 2.0 / 1e9)  # median copy 2 s
    assert row.bound_fraction == pytest.approx((6.0 / 4.0) / 3.0)  # bound at 4 B/s over 3 s
    assert row.best_fraction == pytest.approx((6.0 / 8.0) / 2.0)  # bound at 8 B/s over 2 s
    # a run bandwidth above every copy's sets both bounds
    ticks = iter([0.0, 4.0, 4.0, 6.0, 6.0, 8.0, 8.0, 9.0, 9.0, 12.0, 12.0, 16.0])
    row = B.run_case(case, 100.0, 3, Probe())
    assert row.bound_fraction == pytest.approx((6.0 / 100.0) / 3.0)
    assert row.best_fraction == pytest.approx((6.0 / 100.0) / 2.0)


def test_table_puts_numpy_first():
    row = B.Row("op", "2×2", "float32", 1, 1.0, 1.0, 0.5, {"scikit-learn": 3.0, "PyTorch": 2.0, "NumPy": 4.0},
                {"scikit-learn": 3.0, "PyTorch": 2.0, "NumPy": 4.0})
    head = B.format_table([row], 1e9, 1).splitlines()[0]
    assert head.index("NumPy ms") < head.index("PyTorch ms") < head.index("scikit-learn ms")


# ---------------------------------------------------------------------------
# Each NumPy peer against streamnorm
# ---------------------------------------------------------------------------


def _data(rng, shape, dtype):
    return (rng.standard_normal(shape) * 1.5 + 0.7).astype(dtype)


def _affine(layer, rng, C):
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    layer.params["weight"][...] = w
    if "bias" in layer.params:
        layer.params["bias"][...] = b
    return w, b


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_moments_match_running_stats_and_stream_scaler(rng, dtype):
    x = (rng.standard_normal((1000, 7)) * rng.uniform(0.1, 10, 7) + rng.uniform(-20, 20, 7)).astype(dtype)
    chunks = np.array_split(x, 9)
    rs, sc = sn.RunningStats(), sn.StreamScaler()
    for c in chunks:
        rs.update(c)
        sc.partial_fit(c)
    n, mean, var = B.numpy_chunk_moments(chunks)
    assert n == 1000
    np.testing.assert_allclose(mean, rs.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, rs.var, rtol=1e-12)
    n, mean, var, scale = B.numpy_stream_scaler_fit(chunks)
    assert n == sc.n_samples_seen_
    np.testing.assert_allclose(mean, sc.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, sc.var_, rtol=1e-12)
    np.testing.assert_allclose(scale, sc.scale_, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 5), (6, 4, 3, 5)])
def test_numpy_batch_norm_matches(rng, dtype, shape):
    tol = TOL[dtype]
    x, dy = _data(rng, shape, dtype), _data(rng, shape, dtype)
    C = shape[1]
    bn = sn.BatchNorm(C)
    w, b = _affine(bn, rng, C)

    y, mu, var = B.numpy_batch_norm(x, w, b, bn.eps)
    y_sn = bn(x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, y_sn, **tol)
    np.testing.assert_allclose(mu, bn._cache.batch_mean, **tol)
    np.testing.assert_allclose(var, bn._cache.batch_var, **tol)

    y, dx, dw, db = B.numpy_batch_norm_fb(x, dy, w, b, bn.eps)
    dx_sn = bn.backward(dy)
    assert dx.dtype == dtype
    np.testing.assert_allclose(y, y_sn, **tol)
    np.testing.assert_allclose(dx, dx_sn, **tol)
    np.testing.assert_allclose(dw, bn.grads["weight"], **tol)
    np.testing.assert_allclose(db, bn.grads["bias"], **tol)

    bn.eval()
    y = B.numpy_batch_norm_eval(x, bn.running_mean, bn.running_var, w, b, bn.eps)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, bn(x), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_layer_norm_matches(rng, dtype):
    tol = TOL[dtype]
    x, dy = _data(rng, (12, 48), dtype), _data(rng, (12, 48), dtype)
    ln = sn.LayerNorm(48)
    w, b = _affine(ln, rng, 48)
    y_sn = ln(x)
    dx_sn = ln.backward(dy)
    y = B.numpy_layer_norm(x, w, b, ln.eps)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_sn, **tol)
    y, dx, dw, db = B.numpy_layer_norm_fb(x, dy, w, b, ln.eps)
    assert dx.dtype == dtype
    np.testing.assert_allclose(y, y_sn, **tol)
    np.testing.assert_allclose(dx, dx_sn, **tol)
    np.testing.assert_allclose(dw, ln.grads["weight"], **tol)
    np.testing.assert_allclose(db, ln.grads["bias"], **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_numpy_rms_norm_matches(rng, dtype, eps):
    tol = TOL[dtype]
    x, dy = _data(rng, (12, 48), dtype), _data(rng, (12, 48), dtype)
    rms = sn.RMSNorm(48, eps=eps)
    w, _ = _affine(rms, rng, 48)
    y_sn = rms(x)
    dx_sn = rms.backward(dy)
    y = B.numpy_rms_norm(x, w, rms.eps)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_sn, **tol)
    y, dx, dw = B.numpy_rms_norm_fb(x, dy, w, rms.eps)
    assert dx.dtype == dtype
    np.testing.assert_allclose(y, y_sn, **tol)
    np.testing.assert_allclose(dx, dx_sn, **tol)
    np.testing.assert_allclose(dw, rms.grads["weight"], **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_group_norm_matches(rng, dtype):
    tol = TOL[dtype]
    shape = (3, 12, 4, 5)
    x, dy = _data(rng, shape, dtype), _data(rng, shape, dtype)
    gn = sn.GroupNorm(4, 12)
    w, b = _affine(gn, rng, 12)
    y_sn = gn(x)
    dx_sn = gn.backward(dy)
    y = B.numpy_group_norm(x, 4, w, b, gn.eps)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(y, y_sn, **tol)
    y, dx, dw, db = B.numpy_group_norm_fb(x, dy, 4, w, b, gn.eps)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_allclose(y, y_sn, **tol)
    np.testing.assert_allclose(dx, dx_sn, **tol)
    np.testing.assert_allclose(dw, gn.grads["weight"], **tol)
    np.testing.assert_allclose(db, gn.grads["bias"], **tol)


@pytest.mark.parametrize("shape", [(40, 6), (12, 6, 2, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_online_norm_matches(rng, dtype, shape):
    tol = TOL[dtype]
    on = sn.OnlineNorm(6, alpha_fwd=0.9, alpha_bkw=0.8)
    w, b = _affine(on, rng, 6)
    for step in range(2):  # the second call starts from a carried, non-trivial state
        x, dy = _data(rng, shape, dtype), _data(rng, shape, dtype)
        s = {k: v.copy() for k, v in on.buffers.items()}
        y_sn = on(x)
        dx_sn = on.backward(dy)
        y, dx, dw, db, (mu, var, u, v) = B.numpy_online_norm_fb(
            x, dy, s["mu"], s["var"], s["u"], s["v"], w, b, alpha_fwd=0.9, alpha_bkw=0.8, eps=on.eps
        )
        assert y.dtype == dtype and dx.dtype == dtype
        np.testing.assert_allclose(y, y_sn, **tol)
        np.testing.assert_allclose(dx, dx_sn, **tol)
        np.testing.assert_allclose(dw, on.grads["weight"], **tol)
        np.testing.assert_allclose(db, on.grads["bias"], **tol)
        for name, ours in (("mu", mu), ("var", var), ("u", u), ("v", v)):
            np.testing.assert_allclose(ours, on.buffers[name], rtol=1e-9, atol=1e-12, err_msg=name)
        # the forward alone stores nothing for a backward, and gives the same output and state
        y1, xhat1, rstd1, (mu1, var1) = B.numpy_online_norm(x, s["mu"], s["var"], w, b, alpha_fwd=0.9, eps=on.eps, keep=False)
        assert xhat1 is None and rstd1 is None
        np.testing.assert_array_equal(y1, y)
        np.testing.assert_array_equal(mu1, mu)
        np.testing.assert_array_equal(var1, var)


def test_bench_peers_agree_with_ours_on_the_bench_cases():
    """Every row's NumPy peer, called the way the report calls it, gives streamnorm's result."""
    cases = B.build_cases(1, np.float64)
    checked = 0
    for case in cases:
        ours, theirs = case.ours(), case.peers["NumPy"]()
        if isinstance(ours, sn.RunningStats):
            np.testing.assert_allclose(theirs[1], ours.mean, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(theirs[2], ours.var, rtol=1e-10)
        elif hasattr(ours, "scale_"):
            np.testing.assert_allclose(theirs[3], ours.scale_, rtol=1e-10)
        elif case.op.startswith("OnlineNorm"):
            continue  # ours advanced the carried state the peer starts from; checked above
        else:
            y = theirs[1] if "backward" in case.op else theirs[0] if isinstance(theirs, tuple) else theirs
            np.testing.assert_allclose(y, ours, rtol=1e-7, atol=1e-7, err_msg=case.op)
        checked += 1
    assert checked == len(cases) - sum(c.op.startswith("OnlineNorm") for c in cases)
