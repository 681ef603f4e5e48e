"""StreamScaler and normalize_stream."""

from __future__ import annotations

import sys
import tracemalloc

import numpy as np
import pytest

from streamnorm import StreamScaler, normalize_stream

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402


@parametrize_with_checks([StreamScaler(), StreamScaler(with_mean=False), StreamScaler(half_life=3.0)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_partial_fit_agrees_with_sklearn(rng, dtype):
    X = (rng.standard_normal((3000, 7)) * [1, 2, 3, 4, 5, 6, 1e3] + [0, 1, -5, 1e4, 3, 2, 7]).astype(dtype)
    ours, theirs = StreamScaler(), StandardScaler()
    for chunk in np.array_split(X, 17):
        ours.partial_fit(chunk)
        theirs.partial_fit(chunk)
    assert ours.n_samples_seen_ == theirs.n_samples_seen_ == 3000
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-10)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-10)
    np.testing.assert_allclose(ours.scale_, theirs.scale_, rtol=1e-10)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    # float64 arithmetic inside: as accurate as the float32 output allows (scikit-learn
    # computes in float32 and loses ~eps32·|mean|/scale on the offset feature)
    exact = (X.astype(np.float64) - theirs.mean_) / theirs.scale_
    np.testing.assert_allclose(ours.transform(X), exact, rtol=tol, atol=tol)
    np.testing.assert_allclose(ours.transform(X), theirs.transform(X), rtol=tol, atol=1e-3 if dtype == np.float32 else tol)
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(X)), X, rtol=tol, atol=tol * 1e3)
    assert ours.transform(X).dtype == dtype


def test_chunks_equal_whole_and_merge_is_exact(rng):
    X = rng.standard_normal((500, 4)) * 3 + 1
    whole = StreamScaler().fit(X)
    parts = StreamScaler().fit(iter(np.array_split(X, 9)))  # any iterable of chunks
    a = StreamScaler().fit(X[:123])
    b = StreamScaler().fit(X[123:])
    merged = a.merge(b)
    for other in (parts, merged):
        assert other.n_samples_seen_ == 500
        np.testing.assert_allclose(other.mean_, whole.mean_, rtol=1e-13)
        np.testing.assert_allclose(other.var_, whole.var_, rtol=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(StreamScaler().fit(X[:, :2]))
    with pytest.raises(NotFittedError):
        a.merge(StreamScaler())


def test_nans_skipped_in_fit_and_kept_in_transform(rng):
    X = rng.standard_normal((40, 3))
    X[[1, 5], 0] = np.nan
    sc = StreamScaler().fit(X)
    np.testing.assert_array_equal(sc.n_samples_seen_, [38, 40, 40])
    np.testing.assert_allclose(sc.mean_, np.nanmean(X, 0), rtol=1e-12)
    np.testing.assert_allclose(sc.var_, np.nanvar(X, 0), rtol=1e-12)
    Y = sc.transform(X)
    assert np.isnan(Y[[1, 5], 0]).all() and np.isfinite(Y[:, 1:]).all()


def test_decay_and_half_life(rng):
    chunks = [rng.standard_normal((50, 2)) + 3 * i for i in range(5)]
    h = StreamScaler(half_life=2.0)
    d = StreamScaler(decay=1 - 0.5**0.5)
    for c in chunks:
        h.partial_fit(c)
        d.partial_fit(c)
    np.testing.assert_allclose(h.mean_, d.mean_, rtol=1e-14)
    exact = StreamScaler().fit(np.concatenate(chunks))
    assert np.all(h.mean_ > exact.mean_)  # recent chunks weigh more
    with pytest.raises(ValueError, match="not both"):
        StreamScaler(decay=0.1, half_life=2.0).partial_fit(chunks[0])


def test_scale_floor_for_constant_features():
    X = np.column_stack([np.full(10, 3.3), np.linspace(0, 1, 10), 1 + np.arange(10) * 1e-12])
    sc = StreamScaler(min_scale=1e-6).fit(X)
    assert sc.scale_[0] == 1e-6 and sc.scale_[2] == 1e-6
    Y = sc.transform(X)
    assert np.all(Y[:, 0] == 0.0)
    assert np.abs(Y[:, 2]).max() < 1e-5  # divided by the floor, not by ~1e-12


def test_fitted_attributes_are_derived_once_per_state_as_fitted():
    """The attributes are derived from the state when first read after a fit step,
    with the parameters the fit ran with; reading them changes no attribute."""
    import pickle

    X = np.column_stack([np.full(6, 2.0), np.arange(6.0)])
    sc = StreamScaler(min_scale=1e-3).partial_fit(X[:4]).partial_fit(X[4:])
    assert not hasattr(StreamScaler(), "mean_")
    with pytest.raises(AttributeError, match="'StreamScaler' object has no attribute 'meen_'"):
        sc.meen_
    sc.set_params(min_scale=0.5, with_std=False)  # after the fit: applies from the next one
    before = dict(vars(sc))
    revived = pickle.loads(pickle.dumps(sc))
    assert sc.scale_[0] == 1e-3 and sc.scale_[1] == np.sqrt(np.var(np.arange(6.0)))
    assert vars(sc) == before and sc.mean_ is sc.mean_
    assert sc.n_samples_seen_ == 6 and sc.var_[1] == np.var(np.arange(6.0))
    np.testing.assert_array_equal(revived.scale_, sc.scale_)
    sc.mean_ = np.zeros(2)  # set by hand: replaced by the next fit step
    sc.partial_fit(X)
    assert sc.scale_ is None and sc.var_ is None
    assert sc.mean_[1] == 2.5 and sc.n_samples_seen_ == 12


def test_save_load_round_trip_and_bad_files(rng, tmp_path):
    sc = StreamScaler(half_life=4.0, min_scale=1e-3).fit(rng.standard_normal((30, 3)))
    p = tmp_path / "s.npz"
    sc.save(p)
    back = StreamScaler.load(p)
    assert back.get_params() == sc.get_params()
    np.testing.assert_array_equal(back.mean_, sc.mean_)
    np.testing.assert_array_equal(back.var_, sc.var_)
    x = rng.standard_normal((4, 3))
    np.testing.assert_array_equal(back.transform(x), sc.transform(x))
    # continued fitting goes on from the same state
    np.testing.assert_array_equal(back.partial_fit(x).mean_, sc.partial_fit(x).mean_)

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable StreamScaler file"):
        StreamScaler.load(corrupt)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.ones(3))
    with pytest.raises(ValueError, match="not a StreamScaler file"):
        StreamScaler.load(foreign)
    data = dict(np.load(p))
    del data["m2"]
    partial = tmp_path / "partial.npz"
    np.savez(partial, **data)
    with pytest.raises(ValueError, match="m2"):
        StreamScaler.load(partial)
    with pytest.raises(NotFittedError):
        StreamScaler().save(tmp_path / "x.npz")


def test_failures_are_clear_and_change_nothing(rng):
    sc = StreamScaler()
    with pytest.raises(NotFittedError):
        sc.transform(np.ones((2, 3)))
    sc.fit(rng.standard_normal((10, 3)))
    before = (sc.mean_.copy(), sc.var_.copy(), sc.n_samples_seen_)
    with pytest.raises(ValueError, match="3 features"):
        sc.partial_fit(np.ones((2, 4)))
    with pytest.raises(ValueError, match="infinity"):
        sc.partial_fit(np.array([[1.0, np.inf, 2.0]]))
    with pytest.raises(ValueError, match="2D"):
        sc.partial_fit(np.ones(3))
    with pytest.raises(ValueError, match="weights"):
        sc.partial_fit(np.ones((2, 3)), sample_weight=[1.0, -1.0])
    np.testing.assert_array_equal(sc.mean_, before[0])
    np.testing.assert_array_equal(sc.var_, before[1])
    assert sc.n_samples_seen_ == before[2]


def test_pipeline_and_clone(rng):
    X = rng.standard_normal((20, 3)) * 5 + 2
    pipe = Pipeline([("scale", StreamScaler()), ("id", "passthrough")])
    Y = pipe.fit_transform(X)
    np.testing.assert_allclose(Y.mean(0), 0, atol=1e-12)
    c = clone(StreamScaler(decay=0.2))
    assert c.decay == 0.2 and not hasattr(c, "mean_")


def test_sample_weight(rng):
    X = rng.standard_normal((30, 2))
    w = rng.random(30)
    ours = StreamScaler().partial_fit(X, sample_weight=w)
    theirs = StandardScaler().partial_fit(X, sample_weight=w)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-10)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-10)


# ---------------------------------------------------------------------------- streams


def test_stream_modes_follow_spec(rng):
    chunks = [rng.standard_normal((n, 2)) * (i + 1) + i for i, n in enumerate([5, 1, 7, 3])]
    pre = list(normalize_stream(chunks, mode="prequential"))
    run = list(normalize_stream(chunks, mode="running"))
    for i, c in enumerate(chunks):
        seen_before = np.concatenate(chunks[:i]) if i else c  # the first chunk uses its own statistics
        seen_incl = np.concatenate(chunks[: i + 1])
        ref_pre = (c - seen_before.mean(0)) / np.maximum(seen_before.std(0), 1e-8)
        ref_run = (c - seen_incl.mean(0)) / np.maximum(seen_incl.std(0), 1e-8)
        np.testing.assert_allclose(pre[i], ref_pre, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(run[i], ref_run, rtol=1e-12, atol=1e-12)
    fitted = StreamScaler().fit(chunks[0])
    frozen = list(normalize_stream(chunks, scaler=fitted, mode="frozen"))
    np.testing.assert_allclose(frozen[3], fitted.transform(chunks[3]))
    assert fitted.n_samples_seen_ == 5  # frozen updates nothing


def test_prequential_continues_a_fitted_scaler(rng):
    X = rng.standard_normal((10, 2))
    sc = StreamScaler().fit(X)
    c = rng.standard_normal((3, 2))
    (out,) = list(normalize_stream([c], scaler=sc))
    np.testing.assert_allclose(out, (c - X.mean(0)) / X.std(0), rtol=1e-12)
    assert sc.n_samples_seen_ == 13


def test_stream_errors():
    with pytest.raises(ValueError, match="mode"):
        list(normalize_stream([np.ones((2, 2))], mode="online"))
    with pytest.raises(ValueError, match="frozen"):
        list(normalize_stream([np.ones((2, 2))], mode="frozen"))
    with pytest.raises(TypeError, match="StreamScaler"):
        list(normalize_stream([np.ones((2, 2))], scaler=object()))


def test_progress_fallback_prints(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    list(normalize_stream([np.ones((2, 2)) * i for i in range(3)], progress=True))
    assert "normalize_stream: 3 chunks" in capsys.readouterr().err
    # the outputs are the same with or without a progress bar
    a = list(normalize_stream([np.arange(4.0).reshape(2, 2)] * 2, progress=True))
    b = list(normalize_stream([np.arange(4.0).reshape(2, 2)] * 2))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_stream_memory_is_one_chunk(tmp_path):
    # a 96 MiB stream on disk, read through a memmap in 1.5 MiB slices
    rows, F, step = 200_000, 60, 3_200
    mm = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float64, shape=(rows, F))
    for i in range(0, rows, 20_000):
        mm[i : i + 20_000] = np.random.default_rng(i).standard_normal((20_000, F)) + i / rows
    mm.flush()
    del mm
    data = np.load(tmp_path / "big.npy", mmap_mode="r")
    chunk_bytes = step * F * 8
    list(normalize_stream([data[:step], data[step : 2 * step]]))  # compile outside the measurement
    tracemalloc.start()
    total = 0.0
    for out in normalize_stream((data[i : i + step] for i in range(0, rows, step)), mode="prequential"):
        total += float(out[-1, 0])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.isfinite(total)
    assert peak < 4 * chunk_bytes, f"peak {peak / 2**20:.1f} MiB for {chunk_bytes / 2**20:.1f} MiB chunks"
    assert data.nbytes > 20 * peak


@pytest.mark.parametrize("with_mean", [True, False])
@pytest.mark.parametrize("policy", ["propagate", "omit"])
def test_feature_without_statistics_transforms_to_nan_not_to_a_huge_value(rng, policy, with_mean):
    X = rng.normal(size=(20, 3))
    X[:, 1] = np.nan if policy == "omit" else X[:, 1]
    if policy == "propagate":
        X[4, 1] = np.nan
    sc = StreamScaler(nan_policy=policy, with_mean=with_mean).fit(X)
    assert np.isnan(sc.scale_[1]) and np.isfinite(sc.scale_[[0, 2]]).all()
    Z = sc.transform(np.ones((2, 3)))
    assert np.isnan(Z[:, 1]).all() and np.isfinite(Z[:, [0, 2]]).all()
