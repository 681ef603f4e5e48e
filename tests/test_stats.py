"""RunningStats: exactness, chunk invariance, merges, policies, persistence, bad input."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from naive import exact_mean_var, fsum_mean_var
from streamnorm import RunningStats

REL = 1e-12


def assert_state_close(a: RunningStats, b: RunningStats, rel=REL):
    np.testing.assert_array_equal(a.count, b.count)
    # a mean is known relative to the data's magnitude, which includes its spread
    mag = np.abs(b.mean).max() + np.sqrt(b.var).max()
    np.testing.assert_allclose(a.mean, b.mean, rtol=rel, atol=rel * mag)
    np.testing.assert_allclose(a.var, b.var, rtol=rel, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((500, 7), 0), ((4, 300, 5), 1), ((6, 5, 40), -1), ((40, 3, 2), 0)])
def test_matches_numpy(rng, dtype, shape, axis):
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    rs = RunningStats().update(x, axis=axis)
    x64 = x.astype(np.float64)
    assert rs.mean.dtype == np.float64
    np.testing.assert_allclose(rs.mean, x64.mean(axis=axis), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(rs.var, x64.var(axis=axis), rtol=1e-12)
    np.testing.assert_allclose(rs.variance(ddof=1), x64.var(axis=axis, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(rs.std, x64.std(axis=axis), rtol=1e-12)
    assert np.all(rs.count == x.shape[axis])


def test_axis_none_pools_everything(rng):
    x = rng.standard_normal((30, 4, 5))
    rs = RunningStats().update(x, axis=None)
    assert rs.shape == ()
    mu, var = fsum_mean_var(x.ravel())
    assert rs.mean == pytest.approx(mu, rel=1e-13)
    assert rs.var == pytest.approx(var, rel=1e-13)


def test_many_blocks_per_thread_against_fsum(rng):
    # 20000 rows of 64 features: blocks of 256 rows, dozens per thread, a partial last one
    x = rng.standard_normal((20000, 64)) * 0.5 + 10
    rs = RunningStats().update(x)
    for j in (0, 17, 63):
        mu, var = fsum_mean_var(x[:, j])
        assert rs.mean[j] == pytest.approx(mu, rel=1e-14)
        assert rs.var[j] == pytest.approx(var, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [1, 3, 8, 64])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_column_kernel_at_every_block_boundary(rng, dtype, block, nthreads):
    # the column kernel's blocks, and its prefetch of the next block, at their edges:
    # one-row blocks, a partial last block, thread ranges that are not a multiple of
    # the block, more than one leading index
    from streamnorm import _kernels_cpu as K

    x = (rng.standard_normal((3, 101, 37)) * 2 + 5).astype(dtype)
    n, mean, m2 = K.col_moments(x, nthreads, block)
    for a in range(3):
        for j in (0, 18, 36):
            mu, var = fsum_mean_var(x[a, :, j].astype(np.float64))
            assert n[a * 37 + j] == 101
            assert mean[a * 37 + j] == pytest.approx(mu, rel=1e-14)
            assert m2[a * 37 + j] / 101 == pytest.approx(var, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_sums_far_from_their_shift(rng, dtype):
    # the column kernel sums (x - k) and (x - k)² in one sweep, shifted by a block's
    # first row or by the mean of the rows before it: an outlier first row, a level
    # that jumps between blocks and two close levels must still match exact sums
    from streamnorm import _kernels_cpu as K

    x = rng.standard_normal((400, 4))
    x[0, 0] = 1e7
    x[200:, 1] += 1e6
    x[::2, 2] = 3.0
    x[1::2, 2] = 3.0 + 2.0**-20
    x = x.astype(dtype)
    for block in (8, 64, 400):
        n, mean, m2 = K.col_moments(x.reshape(1, 400, 4), 2, block)
        for j in range(4):
            mu, var = fsum_mean_var(x[:, j].astype(np.float64))
            assert mean[j] == pytest.approx(mu, rel=1e-13)
            assert m2[j] / 400 == pytest.approx(var, rel=1e-12)


def test_column_block_moments_flag_cancellation():
    # the one-sweep block moments say when M2 = s2 - s1²/n lost more than a factor
    # _CANCEL of s2, so that the kernel sweeps that block again around its mean
    from streamnorm import _kernels_cpu as K

    n = 10.0
    k = np.array([0.0, 5.0])
    mean = np.empty(2)
    # column 0: deviations about 1 around a shift at the mean; column 1: shifted by 5
    # from a mean of 0 with unit spread, so s2 = n (1 + 25) and M2 = n
    s1 = np.array([0.0, -50.0])
    s2 = np.array([10.0, 260.0])
    assert K._col_block_moments(k, s1, s2, n, mean)
    np.testing.assert_array_equal(mean, [0.0, 0.0])
    np.testing.assert_array_equal(s2, [10.0, 10.0])
    s1 = np.array([0.0, -10.0])
    s2 = np.array([10.0, 20.0])  # mean 4, M2 = 10: half of s2, within the factor
    assert not K._col_block_moments(k, s1, s2, n, mean)
    np.testing.assert_array_equal(mean, [0.0, 4.0])


def test_float32_columns_stay_exact(rng):
    # an offset of 1e4 std and values spread over many orders of magnitude must still
    # match math.fsum
    x = np.empty((3000, 3), dtype=np.float32)
    x[:, 0] = 1e4 + rng.standard_normal(3000)
    x[:, 1] = rng.standard_normal(3000) * np.logspace(-20, 20, 3000)
    x[:, 2] = -7.25
    rs = RunningStats().update(x)
    for j in range(3):
        mu, var = fsum_mean_var(x[:, j].astype(np.float64))
        assert rs.mean[j] == pytest.approx(mu, rel=1e-15)
        assert rs.var[j] == pytest.approx(var, rel=1e-12, abs=0)
    assert rs.mean[2] == -7.25 and rs.var[2] == 0.0


def test_offset_1e8_is_exact_to_1e9(rng):
    x = 1e8 + rng.standard_normal((20000, 2))
    rs = RunningStats()
    for chunk in np.array_split(x, 7):
        rs.update(chunk)
    for j in range(2):
        mu, var = exact_mean_var(x[:, j])
        assert abs(rs.mean[j] - mu) <= 1e-15 * abs(mu)
        assert abs(rs.var[j] - var) <= 1e-9 * var


def test_naive_formula_would_fail_here(rng):
    # guard: the test data really is hard (E[x²] − E[x]² loses every digit)
    x = 1e8 + rng.standard_normal(20000)
    naive = np.mean(x * x) - np.mean(x) ** 2
    _, var = exact_mean_var(x)
    assert abs(naive - var) > 1e-3 * var


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_feature_has_exactly_zero_variance(dtype):
    c = dtype(0.1) * dtype(3)  # not exactly representable sums
    x = np.full((1000, 3), c, dtype=dtype)
    rs = RunningStats()
    for chunk in np.array_split(x, 5):
        rs.update(chunk)
    assert np.all(rs.var == 0.0)
    assert np.all(rs.mean == np.float64(c))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 300),
    f=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    shift=st.sampled_from([0.0, 1e3, -300.0]),
)
def test_chunk_invariance(n, f, cuts, seed, scale, shift):
    # |mean| / std up to 1e3: merging one-value chunks loses about eps·|mean|/std
    # relative in the variance (the means are float64), so 1e-12 holds up to there;
    # large chunks of far worse conditioned data are covered by the 1e8 test.
    x = np.random.default_rng(seed).standard_normal((n, f)) * scale + shift * scale
    whole = RunningStats().update(x)
    parts = RunningStats()
    for chunk in np.split(x, sorted(c % (n + 1) for c in cuts)):
        parts.update(chunk)
    assert_state_close(parts, whole)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=3, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_merge_associative_and_commutative(sizes, seed):
    rng = np.random.default_rng(seed)
    a, b, c = (RunningStats().update(rng.standard_normal((s, 3)) * 2 + 5) for s in sizes)
    left = (a + b) + c
    right = a + (b + c)
    swapped = c + (b + a)
    assert_state_close(left, right)
    assert_state_close(swapped, right)


def test_merge_equals_concatenation_and_leaves_other_alone(rng):
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((70, 4)) + 3
    a, b = RunningStats().update(x), RunningStats().update(y)
    b_before = b.state_dict()
    a.merge(b)
    assert_state_close(a, RunningStats().update(np.concatenate([x, y])))
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, b_before[k])


def test_merge_with_empty_is_identity(rng):
    a = RunningStats().update(rng.standard_normal((10, 2)))
    before = a.state_dict()
    a.merge(RunningStats())
    for k in ("count", "mean", "m2"):
        np.testing.assert_array_equal(a.state_dict()[k], before[k])
    e = RunningStats().merge(a)
    np.testing.assert_array_equal(e.mean, a.mean)


def test_integer_weights_equal_repetition(rng):
    x = rng.standard_normal((40, 3))
    w = rng.integers(0, 4, size=40)
    rs = RunningStats().update(x, weights=w)
    rep = RunningStats().update(np.repeat(x, w, axis=0))
    np.testing.assert_allclose(rs.count, rep.count)
    np.testing.assert_allclose(rs.mean, rep.mean, rtol=1e-12)
    np.testing.assert_allclose(rs.var, rep.var, rtol=1e-12)


def test_real_weights_match_weighted_formula(rng):
    x = rng.standard_normal((60, 2))
    w = rng.random(60)
    rs = RunningStats()
    rs.update(x[:25], weights=w[:25]).update(x[25:], weights=w[25:])
    mu = (w[:, None] * x).sum(0) / w.sum()
    var = (w[:, None] * (x - mu) ** 2).sum(0) / w.sum()
    np.testing.assert_allclose(rs.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(rs.var, var, rtol=1e-12)


def test_nan_policies(rng):
    x = rng.standard_normal((30, 3))
    x[[2, 7, 9], 1] = np.nan
    omit = RunningStats(nan_policy="omit").update(x[:10]).update(x[10:])
    np.testing.assert_array_equal(omit.count, [30, 27, 30])
    np.testing.assert_allclose(omit.mean, np.nanmean(x, axis=0), rtol=1e-12)
    np.testing.assert_allclose(omit.var, np.nanvar(x, axis=0), rtol=1e-12)

    prop = RunningStats().update(x)
    assert np.isnan(prop.mean[1]) and np.isnan(prop.var[1])
    assert np.isfinite(prop.mean[[0, 2]]).all()

    rs = RunningStats(nan_policy="raise").update(x[10:20, [0, 2]])
    before = rs.state_dict()
    with pytest.raises(ValueError, match="NaN"):
        rs.update(x[:10])
    for k in ("count", "mean", "m2"):
        np.testing.assert_array_equal(rs.state_dict()[k], before[k])


def test_decay_follows_spec(rng):
    a = 0.25
    chunks = [rng.standard_normal((20, 2)) + i for i in range(4)]
    rs = RunningStats(decay=a)
    mu = var = None
    for c in chunks:
        rs.update(c)
        mb, vb = c.mean(0), c.var(0)
        if mu is None:
            mu, var = mb, vb
        else:
            var = (1 - a) * var + a * vb + a * (1 - a) * (mb - mu) ** 2
            mu = (1 - a) * mu + a * mb
        np.testing.assert_allclose(rs.mean, mu, rtol=1e-12)
        np.testing.assert_allclose(rs.var, var, rtol=1e-12)


def test_state_dict_round_trip_is_exact(rng):
    rs = RunningStats(decay=0.3, nan_policy="omit").update(rng.standard_normal((9, 2, 3)))
    back = RunningStats.from_state_dict(rs.state_dict())
    assert back.decay == 0.3 and back.nan_policy == "omit" and back.shape == (2, 3)
    for k, v in rs.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
    empty = RunningStats.from_state_dict(RunningStats().state_dict())
    assert empty.shape is None


def test_state_dict_errors(rng):
    sd = RunningStats().update(rng.standard_normal((5, 3))).state_dict()
    bad = dict(sd)
    del bad["m2"]
    with pytest.raises(KeyError, match="m2"):
        RunningStats.from_state_dict(bad)
    bad = dict(sd, mean=np.zeros(4))
    with pytest.raises(ValueError, match="mean"):
        RunningStats.from_state_dict(bad)


@pytest.mark.parametrize("make", [np.asfortranarray, lambda a: a[::2], lambda a: a.T.copy().T])
def test_layouts_and_read_only(rng, make):
    base = rng.standard_normal((64, 5))
    x = make(base)
    x.flags.writeable = False
    rs = RunningStats().update(x)
    np.testing.assert_allclose(rs.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(rs.var, x.var(0), rtol=1e-12)


def test_integer_input_is_cast():
    x = np.arange(12).reshape(6, 2)
    rs = RunningStats().update(x)
    np.testing.assert_array_equal(rs.mean, [5.0, 6.0])


def test_thread_count_does_not_change_results(rng):
    x = rng.standard_normal((5001, 33)) + 7
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = RunningStats().update(x)
    finally:
        numba.set_num_threads(old)
    assert_state_close(RunningStats().update(x), one)


def test_bad_input_leaves_state_alone(rng):
    rs = RunningStats().update(rng.standard_normal((5, 3)))
    before = rs.state_dict()
    with pytest.raises(ValueError, match="feature shape"):
        rs.update(rng.standard_normal((5, 4)))
    with pytest.raises(TypeError, match="complex"):
        rs.update(np.ones((2, 3), dtype=complex))
    with pytest.raises(TypeError, match="not numeric"):
        rs.update(np.array([["a", "b", "c"]]))
    with pytest.raises(ValueError, match="weights"):
        rs.update(np.ones((2, 3)), weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        rs.update(np.ones((2, 3)), weights=[1.0])
    with pytest.raises(ValueError, match="axis"):
        rs.update(np.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match="cannot merge"):
        rs.merge(RunningStats().update(np.ones((3, 2))))
    for k, v in before.items():
        np.testing.assert_array_equal(rs.state_dict()[k], v)


def test_empty_state_and_empty_chunk():
    rs = RunningStats()
    with pytest.raises(RuntimeError, match="no data"):
        rs.mean
    rs.update(np.empty((0, 3)))
    assert rs.shape == (3,)
    assert np.all(rs.count == 0) and np.all(np.isnan(rs.mean)) and np.all(np.isnan(rs.var))
    rs.update(np.ones((2, 3)))
    np.testing.assert_array_equal(rs.mean, np.ones(3))


def test_constructor_errors():
    with pytest.raises(ValueError, match="nan_policy"):
        RunningStats(nan_policy="ignore")
    with pytest.raises(ValueError, match="decay"):
        RunningStats(decay=0.0)


@pytest.mark.parametrize("policy", ["omit", "propagate"])
def test_inf_makes_the_statistics_non_finite(policy):
    x = np.array([[np.inf, 1.0], [2.0, 1.0], [3.0, np.nan if policy == "omit" else 1.0]])
    rs = RunningStats(nan_policy=policy).update(x)
    assert not np.isfinite(rs.mean[0]) and not np.isfinite(rs.var[0])  # never silently dropped
    assert rs.mean[1] == 1.0 and rs.var[1] == 0.0


def test_omit_with_constant_column_and_leading_nans():
    x = np.full((3000, 2), 0.1 * 3)
    x[:5, 0] = np.nan
    rs = RunningStats(nan_policy="omit")
    for chunk in np.array_split(x, 3):
        rs.update(chunk)
    np.testing.assert_array_equal(rs.count, [2995, 3000])
    assert np.all(rs.mean == 0.1 * 3) and np.all(rs.var == 0.0)


def test_import_does_not_load_scikit_learn():
    import subprocess
    import sys

    code = "import sys, streamnorm; print('sklearn' in sys.modules); streamnorm.StreamScaler; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    pytest.importorskip("sklearn")
    assert out == ["False", "True"]
