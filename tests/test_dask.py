"""Dask arrays on a real two-process cluster: the same statistics and transforms as NumPy.

Every comparison is against the single-machine result on the same data: RunningStats /
StreamScaler on the NumPy array, and plain NumPy (``mean``, ``var``, ``nanmean``,
weighted averages) as an independent oracle.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

import dask  # noqa: E402
import dask.array as da  # noqa: E402
from dask.core import get_dependencies  # noqa: E402

import streamnorm.dask as sd  # noqa: E402
from naive import exact_mean_var  # noqa: E402
from streamnorm import RunningStats  # noqa: E402
from streamnorm.scaler import StreamScaler  # noqa: E402

REL = 1e-12
N, F = 600, 7

# rows only, rows and features, uneven blocks (one of them a single row) in both axes
CHUNKINGS = {
    "rows": (100, F),
    "rows+features": (128, 3),
    "uneven": ((37, 1, 200, 162, 200), (2, 4, 1)),
}


@pytest.fixture(scope="module")
def client():
    with sd.local_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(20261125)
    # features of very different offsets and spreads, so relative errors mean something;
    # |mean|/std stays below ~1e3 here, where 1e-12 is what any chunking must reproduce
    # (test_offset_1e8_against_exact covers the ill-conditioned case)
    scale = np.array([1.0, 1e-3, 50.0, 2.0, 1e3, 0.5, 7.0])
    offset = np.array([0.0, 0.5, -3.0, 1e3, 5.0, -2e2, 1.0])
    return rng.standard_normal((N, F)) * scale + offset


def assert_state_close(a: RunningStats, b: RunningStats, rel=REL):
    """Counts equal; var to ``rel`` relative; the mean to ``rel`` of the data's magnitude
    (|mean| + std: a mean near 0 is only known that well).  NaN where the other is NaN."""
    np.testing.assert_allclose(a.count, b.count, rtol=1e-15, atol=0)  # weight sums round
    np.testing.assert_array_equal(np.isnan(a.mean), np.isnan(b.mean))
    np.testing.assert_array_equal(np.isnan(a.var), np.isnan(b.var))
    mag = np.nan_to_num(np.abs(b.mean) + np.sqrt(b.var))
    dm = np.nan_to_num(np.abs(a.mean - b.mean))
    assert np.all(dm <= rel * mag), f"mean differs by {dm} (allowed {rel * mag})"
    np.testing.assert_allclose(a.var, b.var, rtol=rel, atol=0, equal_nan=True, err_msg="var")


# ---------------------------------------------------------------------------
# RunningStats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunks", list(CHUNKINGS.values()), ids=list(CHUNKINGS))
def test_stats_match_numpy(client, data, dtype, chunks):
    x = data.astype(dtype)
    dx = da.from_array(x, chunks=chunks)
    rs = RunningStats().update(dx)
    assert rs.shape == (F,)
    assert_state_close(rs, RunningStats().update(x))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(rs.mean, x64.mean(axis=0), rtol=REL)
    np.testing.assert_allclose(rs.var, x64.var(axis=0), rtol=1e-11)
    np.testing.assert_array_equal(rs.count, np.full(F, N))


def test_offset_1e8_against_exact(client):
    # data 1e8 + N(0, 1) gives var within 1e-9 of the exact answer, however it is cut
    rng = np.random.default_rng(5)
    x = 1e8 + rng.standard_normal((3000, 2))
    for chunks in ((1000, 2), ((7, 993, 1500, 500), (1, 1)), (64, 1)):
        rs = RunningStats().update(da.from_array(x, chunks=chunks), axis=0)
        for j in range(2):
            mu, var = exact_mean_var(x[:, j])
            assert rs.mean[j] == pytest.approx(mu, rel=1e-15)  # within an ulp or two of 1e8
            assert rs.var[j] == pytest.approx(var, rel=1e-9)


@pytest.mark.parametrize("split_every", [2, 3, 64])
def test_tree_shape_does_not_change_the_result(client, data, split_every):
    dx = da.from_array(data, chunks=(23, 4))  # 27 row blocks: a deep tree for split_every=2
    state = sd.moments(dx, split_every=split_every)
    dsk = dict(state.__dask_graph__())
    merges = [
        k
        for k in dsk
        if isinstance(k, tuple) and k[0].startswith(("streamnorm-moments-partial", "streamnorm-moments-aggregate"))
    ]
    assert merges, "the reduction has no merge steps"
    for k in merges:  # no merge ever gathers all the blocks' states in one place
        assert len(get_dependencies(dsk, k)) <= split_every
    if split_every == 2:
        assert any(k[0].startswith("streamnorm-moments-partial") for k in merges)
    got = RunningStats()._fold(state.shape, *sd._unpack(state.compute()))
    assert_state_close(got, RunningStats().update(data))


def test_nan_policies(client, data):
    x = data.copy()
    rng = np.random.default_rng(1)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[:, 3] = np.nan  # a feature with no value at all
    x[:250, 5] = np.nan  # whole blocks without a value
    for chunks in CHUNKINGS.values():
        dx = da.from_array(x, chunks=chunks)
        omit = RunningStats(nan_policy="omit").update(dx)
        assert_state_close(omit, RunningStats(nan_policy="omit").update(x))
        np.testing.assert_array_equal(omit.count, np.sum(~np.isnan(x), axis=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NumPy on the all-NaN feature
            mean, var = np.nanmean(x, axis=0), np.nanvar(x, axis=0)
        np.testing.assert_allclose(omit.mean, mean, rtol=REL, equal_nan=True)
        np.testing.assert_allclose(omit.var, var, rtol=1e-11, equal_nan=True)

    y = data.copy()
    y[[3, 450], 2] = np.nan
    for chunks in CHUNKINGS.values():
        prop = RunningStats().update(da.from_array(y, chunks=chunks))
        assert_state_close(prop, RunningStats().update(y))
        np.testing.assert_array_equal(np.isnan(prop.mean), np.isnan(y).any(axis=0))

    before = RunningStats(nan_policy="raise").update(data[:10])
    with pytest.raises(ValueError, match="nan_policy='raise'"):
        before.update(da.from_array(y, chunks=(100, 3)))
    assert_state_close(before, RunningStats().update(data[:10]), rel=0)  # the state is kept


@pytest.mark.parametrize("dask_weights", [False, True])
@pytest.mark.parametrize("chunks", list(CHUNKINGS.values()), ids=list(CHUNKINGS))
def test_weights(client, data, chunks, dask_weights):
    rng = np.random.default_rng(2)
    w = rng.integers(0, 4, size=N).astype(np.float64)  # zero weights included
    dx = da.from_array(data, chunks=chunks)
    dw = da.from_array(w, chunks=151) if dask_weights else w  # weight chunks differ from x's
    rs = RunningStats().update(dx, weights=dw)
    assert_state_close(rs, RunningStats().update(data, weights=w))
    mean = np.average(data, axis=0, weights=w)
    np.testing.assert_allclose(rs.mean, mean, rtol=REL)
    np.testing.assert_allclose(rs.var, np.average((data - mean) ** 2, axis=0, weights=w), rtol=1e-11)
    np.testing.assert_array_equal(rs.count, np.full(F, w.sum()))


def test_weights_with_nan_omit_and_bad_weights(client, data):
    x = data.copy()
    x[::7, 2] = np.nan
    w = np.linspace(0.0, 2.0, N)
    dx = da.from_array(x, chunks=(64, 3))
    rs = RunningStats(nan_policy="omit").update(dx, weights=da.from_array(w, chunks=100))
    assert_state_close(rs, RunningStats(nan_policy="omit").update(x, weights=w))
    with pytest.raises(ValueError, match="finite and non-negative"):
        RunningStats().update(dx, weights=-w)
    with pytest.raises(ValueError, match="one weight per sample"):
        RunningStats().update(dx, weights=w[:-1])


def test_other_axes_and_pooling(client):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 90, 4)) * 3 + 1
    dx = da.from_array(x, chunks=(2, 25, 3))
    for axis in (0, 1, -1, None):
        got = RunningStats().update(dx, axis=axis)
        ref = RunningStats().update(x, axis=axis)
        assert got.shape == ref.shape
        assert_state_close(got, ref)


def test_chunks_of_unknown_size_and_integers(client, data):
    dx = da.from_array(data, chunks=(100, F))
    kept = dx[dx[:, 0] > 0]  # row chunk sizes unknown until computed
    assert np.isnan(kept.shape[0])
    assert_state_close(RunningStats().update(kept), RunningStats().update(data[data[:, 0] > 0]))
    with_empty = da.from_array(data, chunks=((0, 300, 0, 300), (3, 4)))  # blocks of 0 rows
    assert_state_close(RunningStats().update(with_empty), RunningStats().update(data))
    xi = np.arange(N * 3).reshape(N, 3) % 17
    got = RunningStats().update(da.from_array(xi, chunks=(50, 2)))
    assert_state_close(got, RunningStats().update(xi))


def test_dask_chunks_merge_with_numpy_chunks_and_decay(client, data):
    mixed = RunningStats().update(data[:100]).update(da.from_array(data[100:500], chunks=(77, 3))).update(data[500:])
    assert_state_close(mixed, RunningStats().update(data))
    for decay in (0.3, 1.0):
        a = RunningStats(decay=decay).update(data[:100]).update(da.from_array(data[100:], chunks=(64, 5)))
        b = RunningStats(decay=decay).update(data[:100]).update(data[100:])
        assert_state_close(a, b)


def test_moments_are_lazy_and_structured(client, data):
    state = sd.moments(da.from_array(data, chunks=(100, 3)))
    assert isinstance(state, da.Array)
    assert state.dtype == sd.STATE_DTYPE
    assert state.shape == (F,) and state.chunks == ((3, 3, 1),)
    s = state.compute()
    np.testing.assert_allclose(s["mean"], data.mean(axis=0), rtol=REL)
    np.testing.assert_allclose(s["m2"] / s["n"], data.var(axis=0), rtol=1e-11)


# ---------------------------------------------------------------------------
# StreamScaler
# ---------------------------------------------------------------------------


def assert_scaler_close(a: StreamScaler, b: StreamScaler, rel=REL):
    assert a.n_features_in_ == b.n_features_in_
    np.testing.assert_allclose(a.n_samples_seen_, b.n_samples_seen_, rtol=1e-15, atol=0)
    assert_state_close(a._stats, b._stats, rel=rel)
    np.testing.assert_allclose(a.scale_, b.scale_, rtol=rel, atol=0)


def assert_transform_close(got, ref, x, scale, dtype):
    """``(x - mean)/scale`` is known to ~eps·|x|/scale (the subtraction's rounding), so the
    bound per feature is 1e-12 of that for float64 output; float32 output adds its own
    rounding (6e-8 of the value)."""
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    bound = REL * np.nanmax(np.abs(x.astype(np.float64)), axis=0) / scale
    if dtype == np.float32:
        bound = bound + 1e-6 * np.abs(np.nan_to_num(ref.astype(np.float64)))
    diff = np.nan_to_num(np.abs(got.astype(np.float64) - ref.astype(np.float64)))
    assert np.all(diff <= bound), f"max excess {np.max(diff - bound)}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunks", list(CHUNKINGS.values()), ids=list(CHUNKINGS))
def test_scaler_fit_and_transforms(client, data, dtype, chunks):
    x = data.astype(dtype)
    x[5, 1] = x[300, 4] = np.nan  # skipped in fit (nan_policy='omit'), kept in transform
    dx = da.from_array(x, chunks=chunks)
    sc = StreamScaler().fit(dx)
    ref = StreamScaler().fit(x)
    assert_scaler_close(sc, ref)

    y = sc.transform(dx)
    assert isinstance(y, da.Array)  # lazy
    assert y.dtype == dtype and y.chunks == dx.chunks
    yc = y.compute()
    assert_transform_close(yc, ref.transform(x), x, ref.scale_, dtype)
    # and against plain NumPy in float64
    x64 = x.astype(np.float64)
    expect = (x64 - np.nanmean(x64, axis=0)) / np.nanstd(x64, axis=0)
    assert_transform_close(yc, expect.astype(dtype), x, ref.scale_, dtype)

    back = sc.inverse_transform(y)
    assert isinstance(back, da.Array) and back.dtype == dtype
    bc = back.compute()
    np.testing.assert_array_equal(np.isnan(bc), np.isnan(x))
    tol = REL if dtype == np.float64 else 1e-6
    atol = tol * np.nanmax(np.abs(x64), axis=0)
    assert np.all(np.nan_to_num(np.abs(bc.astype(np.float64) - x64)) <= atol + tol * np.nan_to_num(np.abs(x64)))


def test_scaler_transform_does_not_compute(client, data):
    sc = StreamScaler().fit(data)
    calls = []

    def counting(block):
        calls.append(1)
        return block

    dx = da.from_array(data, chunks=(100, 3)).map_blocks(counting, dtype=data.dtype)
    calls.clear()  # map_blocks may have called it once on an empty array
    with dask.config.set(scheduler="sync"):
        z = sc.inverse_transform(sc.transform(dx))
        assert calls == []
        np.testing.assert_allclose(z.compute(), data, rtol=REL, atol=REL * np.abs(data).max())
    assert len(calls) == dx.npartitions

    # the statistics enter the graph once per feature chunk, not once per block
    dx = da.from_array(data, chunks=(20, 3))
    dsk = dict(sc.transform(dx).__dask_graph__())
    tasks = [k for k in dsk if isinstance(k, tuple) and k[0].startswith("streamnorm-affine")]
    assert len(tasks) == dx.npartitions == 30 * 3
    params = {d for k in tasks for d in get_dependencies(dsk, k) if not (isinstance(d, tuple) and d[0] == dx.name)}
    assert len(params) == 3


def test_scaler_weights_partial_fit_and_checks(client, data):
    w = np.random.default_rng(4).random(N)
    dx = da.from_array(data, chunks=(128, 3))
    for dw in (w, da.from_array(w, chunks=200)):
        assert_scaler_close(StreamScaler().fit(dx, sample_weight=dw), StreamScaler().fit(data, sample_weight=w))

    sc = StreamScaler().partial_fit(data[:50]).partial_fit(dx[50:400]).partial_fit(data[400:])
    assert_scaler_close(sc, StreamScaler().fit(data))

    with pytest.raises(ValueError, match="all zeros"):
        StreamScaler().fit(dx, sample_weight=da.zeros(N, chunks=100))
    with pytest.raises(ValueError, match="all zeros"):
        StreamScaler().fit(dx, sample_weight=np.zeros(N))
    bad = data.copy()
    bad[123, 2] = np.inf
    dbad = da.from_array(bad, chunks=(100, 3))
    kept = StreamScaler().fit(data)
    with pytest.raises(ValueError, match="infinity"):
        kept.partial_fit(dbad)
    assert_scaler_close(kept, StreamScaler().fit(data))  # a failed fit changes nothing
    # an inf with zero weight: NumPy raises unless NaNs are omitted, and so does dask
    w0 = (np.arange(N) != 123).astype(float)
    with pytest.raises(ValueError, match="infinity"):
        StreamScaler(nan_policy="propagate").fit(dbad, sample_weight=w0)
    assert_scaler_close(StreamScaler().fit(dbad, sample_weight=w0), StreamScaler().fit(bad, sample_weight=w0))
    with pytest.raises(ValueError, match="infinity"):
        kept.transform(dbad).compute()
    with pytest.raises(ValueError, match="features"):
        kept.transform(da.from_array(data[:, :3], chunks=50))
    with pytest.raises(ValueError, match="2D"):
        StreamScaler().fit(da.from_array(data[:, 0], chunks=50))


def test_scaler_without_mean_or_std(client, data):
    dx = da.from_array(data, chunks=(128, 3))
    for kw in ({"with_mean": False}, {"with_std": False}):
        sc, ref = StreamScaler(**kw).fit(dx), StreamScaler(**kw).fit(data)
        np.testing.assert_allclose(sc.transform(dx).compute(), ref.transform(data), rtol=REL, atol=1e-12)


# ---------------------------------------------------------------------------
# Pickling: fitted objects cross process boundaries
# ---------------------------------------------------------------------------


def test_pickle_round_trip_and_across_processes(client, data):
    dx = da.from_array(data, chunks=(100, 3))
    rs = RunningStats(nan_policy="omit").update(dx)
    sc = StreamScaler().fit(dx)
    rs2 = pickle.loads(pickle.dumps(rs))
    sc2 = pickle.loads(pickle.dumps(sc))
    assert_state_close(rs2, rs, rel=0)
    assert_scaler_close(sc2, sc)
    np.testing.assert_array_equal(sc2.transform(data), sc.transform(data))

    # to a worker process and back: the worker uses and updates the objects
    remote_y = client.submit(StreamScaler.transform, sc, data[:50], pure=False).result()
    np.testing.assert_array_equal(remote_y, sc.transform(data[:50]))
    more = data[:40] * 2
    remote_rs = client.submit(RunningStats.update, rs.copy(), more, pure=False).result()
    assert_state_close(remote_rs, rs.copy().update(more), rel=0)
    remote_sc = client.submit(StreamScaler.partial_fit, pickle.loads(pickle.dumps(sc)), more, pure=False).result()
    assert_scaler_close(remote_sc, pickle.loads(pickle.dumps(sc)).partial_fit(more))


def test_threaded_scheduler_without_a_cluster(data):
    # dask's local scheduler runs several blocks' kernels at once on threads of this process
    dx = da.from_array(data, chunks=(50, 3))
    with dask.config.set(scheduler="threads", num_workers=4):
        assert_state_close(RunningStats().update(dx), RunningStats().update(data))
        sc = StreamScaler().fit(dx)
        np.testing.assert_allclose(sc.transform(dx).compute(), sc.transform(data), rtol=0, atol=0)
