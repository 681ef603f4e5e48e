"""Work is dealt in blocks that each thread claims as it finishes the last, and every
reduction keeps one partial result per block, combined in block order: the results are
the same bits on any number of threads, whichever thread took which block."""

import numba
import numpy as np
import pytest

import streamnorm as sn
from streamnorm import _kernels_cpu as K


def _on_threads(n, fn):
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(n)
        return fn()
    finally:
        numba.set_num_threads(old)


def _layer_run(make, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)

    def run():
        layer = make()
        out = [layer(x).copy()]
        out.append(layer.backward(dy).copy())
        out += [np.array(g, copy=True) for g in layer.grads.values()]
        out += [np.array(b, copy=True) for b in layer.buffers.values()]
        return out

    return run


LAYERS = {
    "BatchNorm1d (M, C)": (lambda: sn.BatchNorm1d(24), (3001, 24)),
    "BatchNorm2d": (lambda: sn.BatchNorm2d(6), (40, 6, 9, 11)),
    "LayerNorm": (lambda: sn.LayerNorm(96), (2049, 96)),
    "RMSNorm": (lambda: sn.RMSNorm(96), (2049, 96)),
    "GroupNorm": (lambda: sn.GroupNorm(3, 12), (37, 12, 7, 5)),
    "OnlineNorm (N, C)": (lambda: sn.OnlineNorm(2048), (33, 2048)),
    "OnlineNorm (N, C, L)": (lambda: sn.OnlineNorm(16), (9, 16, 50)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_give_the_same_bits_on_any_thread_count(name, dtype):
    make, shape = LAYERS[name]
    run = _layer_run(make, shape, dtype)
    one = _on_threads(1, run)
    for _ in range(3):  # blocks go to whichever thread is free: repeat
        many = _on_threads(numba.config.NUMBA_NUM_THREADS, run)
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)


def test_statistics_give_the_same_bits_on_any_thread_count():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6001, 33)) + 7
    x32 = x.astype(np.float32)
    xn = x.copy()
    xn[rng.random(x.shape) < 0.05] = np.nan
    w = rng.random(6001)

    def run():
        return [
            sn.RunningStats().update(x).state_dict(),
            sn.RunningStats().update(x32).state_dict(),
            sn.RunningStats(nan_policy="omit").update(xn).state_dict(),
            sn.RunningStats().update(x, weights=w).state_dict(),
        ]

    one = _on_threads(1, run)
    many = _on_threads(numba.config.NUMBA_NUM_THREADS, run)
    for a, b in zip(one, many):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("nthreads", [1, 3, 8])
def test_kernels_cover_every_row_once_whatever_thread_count_they_are_told(nthreads):
    """A kernel told of more threads than run its loop still deals every block once
    (a thread that finds none left stops), and its reduction does not change."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1000, 64))
    dy = rng.standard_normal((1000, 64))
    w = rng.standard_normal(64)
    b = rng.standard_normal(64)
    out = np.full_like(x, np.nan)
    mean = np.full(1000, np.nan)
    rstd = np.full(1000, np.nan)
    K.rownorm_fwd(x, w, b, 1e-5, True, out, mean, rstd, nthreads, False)
    mu = x.mean(1)
    r = 1 / np.sqrt(x.var(1) + 1e-5)
    np.testing.assert_allclose(out, (x - mu[:, None]) * r[:, None] * w + b, rtol=1e-12, atol=1e-12)
    dx = np.full_like(x, np.nan)
    dw, db = K.rownorm_bwd(dy, x, w, w, mean, rstd, True, dx, nthreads, False)
    dw1, db1 = K.rownorm_bwd(dy, x, w, w, mean, rstd, True, dx.copy(), 1, False)
    assert np.isfinite(dx).all()
    np.testing.assert_array_equal(dw, dw1)
    np.testing.assert_array_equal(db, db1)
    n, m, m2 = K.col_moments(x.reshape(1, 1000, 64), nthreads, 8)
    n1, m1, m21 = K.col_moments(x.reshape(1, 1000, 64), 1, 8)
    np.testing.assert_array_equal(n, np.full(64, 1000.0))
    np.testing.assert_array_equal(m, m1)
    np.testing.assert_array_equal(m2, m21)
    np.testing.assert_allclose(m, x.mean(0), rtol=1e-13)


def test_block_counts():
    # blocks of separate outputs: about 256 KiB each, at least one per thread, at most one per item
    assert K._deal_blocks(65536, 2, 4096) == 1024
    assert K._deal_blocks(10, 4, 4096) == 4
    assert K._deal_blocks(3, 8, 4096) == 3
    # reductions: independent of the thread count, 2 to 16 blocks
    assert K._reduce_blocks(1, 16) == 1
    assert K._reduce_blocks(5, 16) == 2
    assert K._reduce_blocks(4096, 16) == 16
    assert K._reduce_blocks(100, 16) == 6
    # (N, C) channels: slices of 32 KiB or more, at least one per thread
    assert K._col_blocks(16384, 2, 4) == 2
    assert K._col_blocks(65536, 2, 4) == 8
    assert K._col_blocks(256, 2, 4) == 2
    assert K._col_blocks(256, 1, 4) == 1
