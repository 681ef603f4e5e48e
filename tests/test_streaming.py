"""Streaming stores: large outputs are written a cache line at a time with non-temporal
stores.  Same bits as plain stores, only where every row starts on a line."""

import numpy as np
import pytest

import streamnorm as sn
from streamnorm import _kernels_cpu as K
from streamnorm import _memory

DTYPES = [np.float32, np.float64]


def _aligned(rng, shape, dtype):
    """A 64-byte aligned array of random values, whatever its size."""
    n = int(np.prod(shape))
    raw = np.empty(n * np.dtype(dtype).itemsize + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    a = raw[skip : skip + n * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
    a[...] = rng.normal(size=shape)
    assert a.ctypes.data % 64 == 0
    return a


@pytest.fixture
def stream_everything(monkeypatch):
    """Make every output large enough to stream, and count the calls that do."""
    monkeypatch.setattr(_memory, "STREAM_MIN_BYTES", 0)
    calls = []
    plain = _memory.streaming

    def spy(out, row):
        calls.append(plain(out, row))
        return calls[-1]

    monkeypatch.setattr(_memory, "streaming", spy)
    return calls


def test_empty_is_aligned_only_when_it_may_stream(monkeypatch):
    small = _memory.empty((3, 5), np.float32)
    assert small.base is None  # a plain np.empty
    monkeypatch.setattr(_memory, "STREAM_MIN_BYTES", 0)
    for dtype in DTYPES:
        for n in (1, 7, 16, 1000):
            a = _memory.empty((n, 3), dtype)
            assert a.shape == (n, 3) and a.dtype == dtype and a.flags.c_contiguous
            assert a.ctypes.data % _memory.LINE == 0


def test_owner_is_the_allocation_that_every_view_holds(monkeypatch):
    plain = np.empty((4, 6))
    assert _memory.owner(plain.reshape(6, 4)) is plain
    assert _memory.owner(plain[1:]) is None  # a view into something larger
    assert _memory.reuse(plain, (3, 8), np.float64).base is plain
    assert _memory.reuse(plain, (3, 8), np.float32) is None
    monkeypatch.setattr(_memory, "STREAM_MIN_BYTES", 0)
    a = _memory.empty((4, 6), np.float32)
    o = _memory.owner(a.reshape(24))
    assert o is not None and o is a.base and o.nbytes == a.nbytes + _memory.PAD
    b = _memory.reuse(o, (2, 12), np.float32)
    assert b.ctypes.data == a.ctypes.data and b.base is o
    assert _memory.reuse(o, (2, 12), np.float64) is None


def test_lined_vectors_start_on_a_line_with_the_same_values(rng):
    v = rng.standard_normal(40)
    for off in range(0, 64, 8):  # every placement a float64 vector can have
        buf = np.empty(v.nbytes + 128, np.uint8)
        a = buf[(-buf.ctypes.data % 64) + off :][: v.nbytes].view(np.float64)
        a[:] = v
        b = _memory.lined(a)
        assert b.ctypes.data % _memory.LINE == 0 and np.array_equal(b, v)
        assert (b is a) == (off == 0)  # copied only when it has to be
        c = K._lined(a)
        assert c.ctypes.data % _memory.LINE == 0 and np.array_equal(c, v)
        assert not np.may_share_memory(c, a)


def test_large_outputs_sit_half_a_page_from_their_input(monkeypatch):
    monkeypatch.setattr(_memory, "STREAM_MIN_BYTES", 0)
    raw = np.empty(64 * 1024 + _memory.PAGE, np.uint8)
    for off in (0, 16, 64, 2000, 4000):  # the input's place in its page
        x = raw[off:][: 64 * 1024].view(np.float32).reshape(64, 256)
        y = _memory.empty(x.shape, x.dtype, near=x)
        gap = (y.ctypes.data - x.ctypes.data) % _memory.PAGE
        assert y.ctypes.data % _memory.LINE == 0
        assert _memory.PAGE // 2 <= gap < _memory.PAGE // 2 + _memory.LINE
        again = _memory.reuse(_memory.owner(y), x.shape, x.dtype, near=x)
        assert again.ctypes.data == y.ctypes.data
    assert _memory.empty((64, 256), np.float32).ctypes.data % _memory.PAGE == 0


def test_streaming_needs_size_alignment_and_whole_lines(monkeypatch):
    monkeypatch.setattr(_memory, "STREAM_MIN_BYTES", 1024)
    a = _memory.empty((64, 16), np.float32)  # 4 KiB, rows of one line
    assert _memory.streaming(a, 16)
    assert not _memory.streaming(a.reshape(128, 8), 8)  # rows of half a line
    assert not _memory.streaming(a[:8], 16)  # below the size
    raw = np.empty(64 * 16 + 16, np.float32)
    off = raw[1 + (-raw.ctypes.data % 64) // 4 :][: 64 * 16].reshape(64, 16)
    assert off.ctypes.data % 64 != 0 and not _memory.streaming(off, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_kernels_write_the_same_bits_streamed(rng, dtype, nthreads):
    M, C = 37, 48  # rows of 3 lines (float32) or 6 (float64)
    x, dy = (rng.normal(2, 3, (M, C)).astype(dtype) for _ in range(2))
    m, s, b, k3 = (rng.normal(size=C) for _ in range(4))
    for plain_kernel, streamed_kernel, args in (
        (K.apply_cols, K.apply_cols_streamed, (x, m, None, s, b)),
        (K.apply_cols, K.apply_cols_streamed, (x, m, m * 1e-9, s, b)),
        (K.bn_bwd_dx_cols, K.bn_bwd_dx_cols_streamed, (dy, x, m, None, s, b, k3)),
        (K.bn_bwd_dx_cols, K.bn_bwd_dx_cols_streamed, (dy, x, m, m * 1e-9, s, b, k3)),
    ):
        plain, streamed = np.empty((M, C), dtype), _aligned(rng, (M, C), dtype)
        plain_kernel(*args, plain)
        streamed_kernel(*args, streamed, nthreads)
        np.testing.assert_array_equal(streamed, plain)
    # (N, C, L) rows longer than one piece, and a short last piece
    L = K._STREAM_PIECE + 80
    x3, dy3 = (rng.normal(2, 3, (3, 2, L)).astype(dtype) for _ in range(2))
    mc, sc, bc, kc = (rng.normal(size=2) for _ in range(4))
    for plain_kernel, streamed_kernel, args in (
        (K.apply_ncl, K.apply_ncl_streamed, (x3, mc, None, sc, bc)),
        (K.apply_ncl, K.apply_ncl_streamed, (x3, mc, mc * 1e-9, sc, bc)),
        (K.bn_bwd_dx_ncl, K.bn_bwd_dx_ncl_streamed, (dy3, x3, mc, None, sc, bc, kc)),
        (K.bn_bwd_dx_ncl, K.bn_bwd_dx_ncl_streamed, (dy3, x3, mc, mc * 1e-9, sc, bc, kc)),
    ):
        plain, streamed = np.empty(x3.shape, dtype), _aligned(rng, x3.shape, dtype)
        plain_kernel(*args, plain)
        streamed_kernel(*args, streamed, nthreads)
        np.testing.assert_array_equal(streamed, plain)
    # the row-norm backward: rows of one piece and rows of two, odd row counts
    for D in (C, L):
        R = 5
        xr, dyr = (rng.normal(2, 3, (R, D)).astype(dtype) for _ in range(2))
        w = rng.normal(size=D)
        mean, rstd = xr.mean(axis=1, dtype=np.float64), 1 / xr.std(axis=1, dtype=np.float64)
        plain, streamed = np.empty((R, D), dtype), _aligned(rng, (R, D), dtype)
        for center in (True, False):
            gp = K.rownorm_bwd(dyr, xr, w, w, mean, rstd, center, plain, nthreads, False)
            gs = K.rownorm_bwd(dyr, xr, w, w, mean, rstd, center, streamed, nthreads, True)
            np.testing.assert_array_equal(streamed, plain)
            for a, b in zip(gs, gp):
                np.testing.assert_array_equal(a, b)


def _layer_results(make, x, dy):
    layer = make()
    y = layer(x)
    return y, layer.backward(dy)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: sn.BatchNorm(32), (40, 32)),
        (lambda: sn.BatchNorm2d(3), (5, 3, 8, 4)),
        (lambda: sn.OnlineNorm(3).eval(), (5, 3, 32)),
        (lambda: sn.OnlineNorm(3, alpha_fwd=0.9, alpha_bkw=0.8), (5, 3, 32)),
        (lambda: sn.LayerNorm(48), (7, 48)),
        (lambda: sn.RMSNorm(32), (2, 3, 32)),
        (lambda: sn.GroupNorm(2, 4), (3, 4, 8, 8)),
        (lambda: sn.GroupNorm(2, 4), (3, 4, 40, 40)),  # rows longer than one piece
    ],
)
def test_layers_give_the_same_bits_streamed(rng, stream_everything, make, shape):
    x = rng.normal(1, 2, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    streamed = _layer_results(make, x, dy)
    assert any(stream_everything)
    _memory.STREAM_MIN_BYTES = 1 << 62
    plain = _layer_results(make, x, dy)
    for a, b in zip(streamed, plain):
        np.testing.assert_array_equal(a, b)


def test_scaler_transform_streams_with_the_same_bits(rng, stream_everything):
    X = rng.normal(3, 2, (50, 16))
    sc = sn.StreamScaler().partial_fit(X)
    t = sc.transform(X)
    back = sc.inverse_transform(t)
    assert stream_everything == [True, True]
    _memory.STREAM_MIN_BYTES = 1 << 62
    np.testing.assert_array_equal(t, sc.transform(X))
    np.testing.assert_array_equal(back, sc.inverse_transform(t))
    assert stream_everything[2:] == [False, False]


def test_odd_rows_are_never_streamed(rng, stream_everything):
    x = rng.normal(size=(10, 7)).astype(np.float32)  # rows of 28 bytes
    y = sn.BatchNorm(7)(x)
    assert stream_everything == [False]
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-6)
