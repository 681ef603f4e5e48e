"""The CUDA backend against the CPU backend: functional pairs, layers, RunningStats.

Runs on an NVIDIA GPU at realistic sizes, or under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda.py``) on small shapes; it
skips where neither is available.  The CPU backend is the reference: it is itself
checked against finite differences, exact statistics and PyTorch in the other tests.
"""

import subprocess
import sys

import numpy as np
import pytest

import streamnorm as sn
import streamnorm.functional as F

try:
    import numba
    from numba import cuda

    SIM = bool(numba.config.ENABLE_CUDASIM)
    HAVE_CUDA = SIM or cuda.is_available()
except ImportError:  # numba-cuda is not installed
    SIM, HAVE_CUDA = False, False

needs_cuda = pytest.mark.skipif(
    not HAVE_CUDA, reason="needs an NVIDIA GPU, or numba-cuda with NUMBA_ENABLE_CUDASIM=1 (see docs/gpu.rst)"
)

# shapes: tiny for the simulator (it runs every thread in Python), realistic on a GPU
if SIM:
    # the larger shapes take the kernels' four-at-a-time paths as well as their tails
    BN_SHAPES = [((6, 3), 1), ((4, 3, 5), 1), ((3, 4, 2, 3), -1), ((2, 3, 1), 1), ((160, 3), 1), ((40, 2, 8), 1)]
    ROW_SHAPES = [((5, 7), 7), ((2, 3, 2, 4), (2, 4)), ((3, 70), 70)]
    GN_SHAPES = [((3, 4, 5), 2), ((3, 4, 5), 4), ((3, 4), 2), ((2, 4, 20), 2)]
    ONLINE_SHAPES = [(6, 3), (5, 3, 4), (13, 5)]  # (13, 5): the time-scan kernels
    STATS_SHAPE = (9, 3, 2)
else:
    BN_SHAPES = [((4096, 256), 1), ((32, 64, 28, 28), 1), ((16, 14, 14, 96), -1), ((512, 33, 1), 1)]
    ROW_SHAPES = [((2048, 1024), 1024), ((8, 16, 3, 100), (3, 100))]
    GN_SHAPES = [((16, 64, 32, 32), 32), ((16, 64, 32, 32), 64), ((512, 64), 8)]
    ONLINE_SHAPES = [(5, 256), (64, 32, 49), (1027, 256)]
    STATS_SHAPE = (5000, 30, 7)

TOL = {np.float64: dict(rtol=1e-9, atol=1e-10), np.float32: dict(rtol=1e-5, atol=1e-6)}


def D(a):
    return cuda.to_device(np.ascontiguousarray(a))


def H(a):
    return None if a is None else a.copy_to_host()


def close(gpu_value, cpu_value, dtype=np.float64):
    if cpu_value is None:
        assert gpu_value is None
        return
    np.testing.assert_allclose(H(gpu_value), cpu_value, **TOL[dtype])


# ------------------------------------------------------------------ functional


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, axis", BN_SHAPES)
def test_batch_norm_train_eval_and_blend(rng, shape, axis, dtype):
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    C = shape[axis]
    w, b, rm, rv = rng.normal(size=C), rng.normal(size=C), rng.normal(size=C), rng.uniform(0.5, 2, C)
    dy = rng.normal(size=shape).astype(dtype)
    for kw_cpu in (
        {},
        {"mean": rm, "var": rv},
        {"prior_mean": rm, "prior_var": rv, "prior_weight": 0.3, "unbiased": True},
    ):
        kw_gpu = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in kw_cpu.items()}
        y, c = F.batch_norm_forward(x, w, b, axis=axis, **kw_cpu)
        yd, cd = F.batch_norm_forward(D(x), D(w), D(b), axis=axis, **kw_gpu)
        assert H(yd).dtype == dtype and yd.shape == y.shape
        close(yd, y, dtype)
        close(cd.mean, c.mean, dtype)
        close(cd.var, c.var, dtype)
        close(cd.batch_mean, c.batch_mean, dtype)
        for gd, g in zip(F.batch_norm_backward(D(dy), cd), F.batch_norm_backward(dy, c)):
            close(gd, g, dtype)


@needs_cuda
def test_batch_norm_without_affine_and_into_out(rng):
    shape = BN_SHAPES[1][0]
    x = rng.normal(size=shape)
    y, c = F.batch_norm_forward(x)
    out = cuda.device_array(shape)
    yd, cd = F.batch_norm_forward(D(x), out=out)
    np.testing.assert_allclose(H(out), y, rtol=1e-12, atol=1e-12)
    dy = rng.normal(size=shape)
    for gd, g in zip(F.batch_norm_backward(D(dy), cd), F.batch_norm_backward(dy, c)):
        close(gd, g)
    count, mu, var = F.batch_moments(D(x))
    count_h, mu_h, var_h = F.batch_moments(x)
    assert count == count_h
    close(mu, mu_h)
    close(var, var_h)


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, ns", ROW_SHAPES)
def test_layer_norm_and_rms_norm(rng, shape, ns, dtype):
    x = rng.normal(1.0, 2.0, shape).astype(dtype)
    dshape = (ns,) if isinstance(ns, int) else ns
    w, b = rng.normal(size=dshape), rng.normal(size=dshape)
    dy = rng.normal(size=shape).astype(dtype)
    for fwd, bwd, params in (
        (F.layer_norm_forward, F.layer_norm_backward, (w, b)),
        (F.layer_norm_forward, F.layer_norm_backward, (None, None)),
        (F.rms_norm_forward, F.rms_norm_backward, (w,)),
    ):
        y, c = fwd(x, ns, *params)
        yd, cd = fwd(D(x), ns, *[None if p is None else D(p) for p in params])
        close(yd, y, dtype)
        for gd, g in zip(bwd(D(dy), cd), bwd(dy, c)):
            close(gd, g, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, G", GN_SHAPES)
def test_group_norm(rng, shape, G, dtype):
    x = rng.normal(-1.0, 3.0, shape).astype(dtype)
    C = shape[1]
    w, b = rng.normal(size=C), rng.normal(size=C)
    dy = rng.normal(size=shape).astype(dtype)
    y, c = F.group_norm_forward(x, G, w, b)
    yd, cd = F.group_norm_forward(D(x), G, D(w), D(b))
    close(yd, y, dtype)
    close(cd.mean, c.mean, dtype)
    close(cd.var, c.var, dtype)
    for gd, g in zip(F.group_norm_backward(D(dy), cd), F.group_norm_backward(dy, c)):
        close(gd, g, dtype)


@needs_cuda
def test_instance_norm(rng):
    shape = GN_SHAPES[0][0]
    x = rng.normal(size=shape)
    C = shape[1]
    w, b, rm, rv = rng.normal(size=C), rng.normal(size=C), rng.normal(size=C), rng.uniform(0.5, 2, C)
    dy = rng.normal(size=shape)
    for kw in ({}, {"mean": rm, "var": rv}):
        y, c = F.instance_norm_forward(x, w, b, **kw)
        yd, cd = F.instance_norm_forward(D(x), D(w), D(b), **{k: D(v) for k, v in kw.items()})
        close(yd, y)
        for gd, g in zip(F.instance_norm_backward(D(dy), cd), F.instance_norm_backward(dy, c)):
            close(gd, g)


@needs_cuda
@pytest.mark.parametrize("ecm", [None, "ac", "ls"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", ONLINE_SHAPES)
def test_online_norm_two_calls(rng, shape, ecm, training):
    C = shape[1]
    w, b = rng.normal(size=C), rng.normal(size=C)
    mu, var, u, v = rng.normal(size=C), rng.uniform(0.5, 2, C), rng.normal(size=C) * 0.1, rng.normal(size=C) * 0.1
    state = (mu, var, u, v)
    dstate = tuple(D(s) for s in state)
    for call in range(2):  # the state carries across calls; the second writes into out
        x = rng.normal(1.0, 2.0, shape)
        dy = rng.normal(size=shape)
        kw = dict(alpha_fwd=0.9, eps=1e-5, training=training, ecm=ecm)
        y, m1, v1, c = F.online_norm_forward(x, state[0], state[1], w, b, **kw)
        out = cuda.device_array(shape) if call else None
        yd, m1d, v1d, cd = F.online_norm_forward(D(x), dstate[0], dstate[1], D(w), D(b), out=out, **kw)
        assert out is None or yd is out
        close(yd, y)
        close(m1d, m1)
        close(v1d, v1)
        dx, dw, db, u1, vv1 = F.online_norm_backward(dy, c, state[2], state[3], alpha_bkw=0.8)
        out = cuda.device_array(shape) if call else None
        dxd, dwd, dbd, u1d, vv1d = F.online_norm_backward(D(dy), cd, dstate[2], dstate[3], alpha_bkw=0.8, out=out)
        assert out is None or dxd is out
        for gd, g in ((dxd, dx), (dwd, dw), (dbd, db), (u1d, u1), (vv1d, vv1)):
            close(gd, g)
        state, dstate = (m1, v1, u1, vv1), (m1d, v1d, u1d, vv1d)


# ----------------------------------------------------------------- RunningStats


@needs_cuda
@pytest.mark.parametrize("axis", [0, 1, None])
def test_running_stats_on_gpu_matches_host(rng, axis):
    a = sn.RunningStats()
    g = sn.RunningStats()
    for _ in range(3):
        x = rng.normal(1e3, 1.0, STATS_SHAPE)
        a.update(x, axis=axis)
        g.update(D(x), axis=axis)
    assert g.shape == a.shape
    np.testing.assert_array_equal(g.count, a.count)
    np.testing.assert_allclose(g.mean, a.mean, rtol=1e-13)
    np.testing.assert_allclose(g.var, a.var, rtol=1e-10)


@needs_cuda
def test_running_stats_weights_and_nan_policies(rng):
    x = rng.normal(size=STATS_SHAPE[:2])
    w = rng.uniform(0, 2, STATS_SHAPE[0])
    w[1] = 0.0
    a, g = sn.RunningStats().update(x, weights=w), sn.RunningStats().update(D(x), weights=D(w))
    np.testing.assert_allclose(g.count, a.count, rtol=1e-13)
    np.testing.assert_allclose(g.mean, a.mean, rtol=1e-12)
    np.testing.assert_allclose(g.var, a.var, rtol=1e-10)
    with pytest.raises(TypeError, match="host memory"):
        sn.RunningStats().update(D(x), weights=w)
    x[2, 1] = np.nan
    a, g = sn.RunningStats(nan_policy="omit").update(x), sn.RunningStats(nan_policy="omit").update(D(x))
    np.testing.assert_array_equal(g.count, a.count)
    np.testing.assert_allclose(g.var, a.var, rtol=1e-10)
    r = sn.RunningStats(nan_policy="raise").update(D(np.ones((3, x.shape[1]))))
    before = r.state_dict()
    with pytest.raises(ValueError, match="NaN"):
        r.update(D(x))
    for k, v in r.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# ---------------------------------------------------------------------- layers


def _sgd_step(layer, lr=0.1):
    """Plain SGD on host copies (works for CPU and numba device parameters alike)."""
    for k in list(layer.params):
        p, g = layer.params[k], layer.grads[k]
        new = (H(p) if layer.device == "cuda" else p) - lr * (H(g) if layer.device == "cuda" else g)
        layer.params[k] = D(new) if layer.device == "cuda" else new


def _pair(make):
    cpu = make()
    gpu = make().to("cuda")
    return cpu, gpu


LAYERS = [
    ("bn", lambda: sn.BatchNorm(BN_SHAPES[1][0][1]), BN_SHAPES[1][0]),
    ("bn_last", lambda: sn.BatchNorm(BN_SHAPES[2][0][-1], axis=-1, momentum=None), BN_SHAPES[2][0]),
    ("ln", lambda: sn.LayerNorm(ROW_SHAPES[1][1]), ROW_SHAPES[1][0]),
    ("rms", lambda: sn.RMSNorm(ROW_SHAPES[0][1]), ROW_SHAPES[0][0]),
    ("gn", lambda: sn.GroupNorm(GN_SHAPES[0][1], GN_SHAPES[0][0][1]), GN_SHAPES[0][0]),
    ("in", lambda: sn.InstanceNorm(GN_SHAPES[0][0][1], affine=True, track_running_stats=True), GN_SHAPES[0][0]),
    ("online", lambda: sn.OnlineNorm(ONLINE_SHAPES[1][1], alpha_fwd=0.9, alpha_bkw=0.8), ONLINE_SHAPES[1]),
]


@needs_cuda
@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_layer_on_gpu_trains_like_on_cpu(rng, name, make, shape):
    cpu, gpu = _pair(make)
    assert gpu.device == "cuda" and cpu.device == "cpu"
    for step in range(2):
        x = rng.normal(0.5, 2.0, shape)
        dy = rng.normal(size=shape)
        y, yd = cpu(x), gpu(D(x))
        close(yd, y)
        close(gpu.backward(D(dy)), cpu.backward(dy))
        for k in cpu.grads:
            close(gpu.grads[k], cpu.grads[k])
        _sgd_step(cpu)
        _sgd_step(gpu)
    cpu.eval()
    gpu.eval()
    x = rng.normal(size=shape)
    close(gpu(D(x)), cpu(x))
    sd_cpu, sd_gpu = cpu.state_dict(), gpu.state_dict()
    assert sd_cpu.keys() == sd_gpu.keys()
    for k, v in sd_gpu.items():
        assert isinstance(v, np.ndarray)
        np.testing.assert_allclose(v, sd_cpu[k], rtol=1e-10, atol=1e-12)


@needs_cuda
def test_to_moves_both_ways_and_state_dict_loads_on_device(rng):
    bn = sn.BatchNorm(3)
    bn.load_state_dict({"weight": [1.0, 2.0, 3.0], "bias": [0.0, 1.0, 2.0], "running_mean": [1.0, 1.0, 1.0],
                        "running_var": [2.0, 2.0, 2.0], "num_batches_tracked": 4})
    ref = bn.state_dict()
    bn.to("cuda")
    assert not isinstance(bn.params["weight"], np.ndarray)
    assert bn.buffers["num_batches_tracked"] == 4
    bn.load_state_dict(ref)
    assert not isinstance(bn.buffers["running_mean"], np.ndarray)
    back = bn.to("cpu").state_dict()
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k])
    assert isinstance(bn.params["weight"], np.ndarray)
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        bn.to("tpu")


@needs_cuda
def test_mixing_host_and_gpu_is_an_error(rng):
    x = rng.normal(size=(4, 3))
    with pytest.raises(TypeError, match=r"layer.to\('cuda'\)"):
        sn.BatchNorm(3)(D(x))
    with pytest.raises(TypeError, match=r"on 'cuda'"):
        sn.LayerNorm(3).to("cuda")(x)
    with pytest.raises(TypeError, match="weight is in host memory"):
        F.batch_norm_forward(D(x), np.ones(3))
    with pytest.raises(TypeError, match="host arrays"):
        F.sync_batch_norm_forward(D(x))
    with pytest.raises(TypeError, match="float32 or float64"):
        F.layer_norm_forward(D(np.ones((4, 3), dtype=np.int32)), 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        F.layer_norm_forward(D(np.ones((4, 6)))[:, ::2] if not SIM else _strided(), 3)


def _strided():
    """A non-contiguous device array (the simulator's view of a transposed array)."""
    return cuda.to_device(np.ones((3, 4))).T


@needs_cuda
def test_failed_gpu_forward_keeps_state(rng):
    bn = sn.BatchNorm(3).to("cuda")
    bn(D(rng.normal(size=(5, 3))))
    before = bn.state_dict()
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(D(rng.normal(size=(1, 3))))
    with pytest.raises(ValueError, match="3 channels"):
        bn(D(rng.normal(size=(5, 4))))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@needs_cuda
@pytest.mark.parametrize("mode", ["batch", "prior", "ema", "cumulative", "dua"])
def test_adaptation_modes_on_gpu(rng, mode):
    shape = BN_SHAPES[1][0]
    cpu, gpu = _pair(lambda: sn.BatchNorm(shape[1]))
    x = rng.normal(size=shape)
    cpu(x)
    gpu(D(x))
    cpu.eval().adapt(mode)
    gpu.eval().adapt(mode)
    for _ in range(3):
        x = rng.normal(1.0, 2.0, shape)
        close(gpu(D(x)), cpu(x))
        dy = rng.normal(size=shape)
        close(gpu.backward(D(dy)), cpu.backward(dy))
    cpu.reset_adaptation()
    gpu.reset_adaptation()
    for k, v in gpu.state_dict().items():
        np.testing.assert_allclose(v, cpu.state_dict()[k], **TOL[np.float64])


@needs_cuda
@pytest.mark.skipif(SIM, reason="PyTorch and CuPy arrays need a real GPU")
def test_foreign_gpu_arrays_come_back_as_their_kind(rng):  # pragma: no cover - needs a GPU
    torch = pytest.importorskip("torch")
    x = torch.randn(64, 32, device="cuda")
    y = F.layer_norm_forward(x, 32)[0]
    assert isinstance(y, torch.Tensor) and y.is_cuda
    ref = torch.nn.functional.layer_norm(x, (32,))
    assert torch.allclose(y, ref, atol=1e-5)
    bn = sn.BatchNorm(32).to("cuda", like=x)
    assert isinstance(bn.params["weight"], torch.Tensor)
    ref = torch.nn.BatchNorm1d(32).cuda().double()
    xr = x.double().detach().requires_grad_(True)
    dy = torch.randn_like(x)
    y = bn(x)
    dx = bn.backward(dy)
    ref(xr).backward(dy.double())
    assert isinstance(y, torch.Tensor) and isinstance(dx, torch.Tensor)
    assert torch.allclose(y.double(), ref(xr.detach()), atol=1e-5)
    assert torch.allclose(dx.double(), xr.grad, atol=1e-5)
    assert torch.allclose(bn.grads["weight"], ref.weight.grad, atol=1e-4)
    assert isinstance(bn.grads["weight"], torch.Tensor)
    bn.params["weight"] -= 0.1 * bn.grads["weight"]  # a torch-style optimizer step works in place


@needs_cuda
@pytest.mark.skipif(SIM, reason="CuPy arrays need a real GPU")
def test_cupy_arrays_come_back_as_cupy(rng):  # pragma: no cover - needs a GPU
    cp = pytest.importorskip("cupy")
    xh = rng.normal(size=(300, 40))
    dyh = rng.normal(size=xh.shape)
    wh, bh = rng.normal(size=40), rng.normal(size=40)
    y, c = F.batch_norm_forward(cp.asarray(xh), cp.asarray(wh), cp.asarray(bh))
    dx, dw, db = F.batch_norm_backward(cp.asarray(dyh), c)
    assert all(isinstance(a, cp.ndarray) for a in (y, dx, dw, db))
    yr, cr = F.batch_norm_forward(xh, wh, bh)
    for got, want in zip((y, dx, dw, db), (yr, *F.batch_norm_backward(dyh, cr))):
        np.testing.assert_allclose(cp.asnumpy(got), want, **TOL[np.float64])


@needs_cuda
@pytest.mark.skipif(SIM, reason="the launch path differs only on a real GPU")
def test_regular_numba_launch_gives_the_same_results(rng, monkeypatch):  # pragma: no cover - needs a GPU
    """The direct launcher and numba-cuda's own launch (its fallback) agree."""
    from streamnorm import _cuda

    x = rng.normal(size=(500, 48))
    dy = rng.normal(size=x.shape)
    w, b = rng.normal(size=48), rng.normal(size=48)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(_cuda, "_FAST_LAUNCH", fast)
        y, c = F.layer_norm_forward(D(x), 48, D(w), D(b))
        results.append([H(a) for a in (y, *F.layer_norm_backward(D(dy), c))])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------- import costs


def test_import_does_not_load_numba_cuda():
    code = "import sys, streamnorm; streamnorm.BatchNorm(3)(__import__('numpy').ones((4, 3))); " \
           "print('numba.cuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_cuda
def test_bench_gpu_reports_every_selected_row(capsys):
    from streamnorm._bench_gpu import main

    assert main(["--ops", "layernorm forward,batchnorm forward, train", "--repeat", "1", "--inner", "1", "--json",
                 "--copy-mib", "16"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    ops = [r["operation"] for r in rep["rows"]]
    assert ops.count("LayerNorm forward") == 2 and ops.count("BatchNorm forward, train") == 3
    assert all(r["streamnorm_us"] > 0 and r["of_bound"] > 0 for r in rep["rows"])
    assert rep["copy_TB/s"] > 0
