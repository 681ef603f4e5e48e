"""SyncBatchNorm: R simulated ranks must behave as one BatchNorm on the concatenated batch.

In-process tests simulate the ranks with threads: one thread per rank, an allgather that
meets at a barrier and hands every rank a pickled copy of every payload (as MPI would),
and a baton lock so that only one rank computes at a time (the numba kernels run on the
default thread pool, which must not be entered from two threads at once).  The last test
runs the same checks in a real 2-process MPI job (tests/mpi_sync_bn_job.py).
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from naive import numerical_grad
import streamnorm as sn
from streamnorm import functional as F
from streamnorm.comm import RankFailure, SelfCommunicator, allgather_checked, as_communicator
from streamnorm.layers import SyncBatchNorm

TIMEOUT = 60.0  # seconds a simulated rank may wait at the barrier before the test fails


class ThreadWorld:
    """R ranks simulated by threads, with a log of every payload exchanged."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: list = [None] * size
        self._barrier = threading.Barrier(size, timeout=TIMEOUT)
        self._baton = threading.Lock()
        self.log: list[tuple[int, object]] = []
        self.comms = [ThreadComm(self, r) for r in range(size)]

    def run(self, fn):
        """``fn(rank, comm)`` on every rank at once; returns (results, errors) in rank order."""
        results: list = [None] * self.size
        errors: list = [None] * self.size

        def target(r):
            with self._baton:
                try:
                    results[r] = fn(r, self.comms[r])
                except BaseException as exc:  # noqa: BLE001 - handed to the test
                    errors[r] = exc

        threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(4 * TIMEOUT)
        assert not any(t.is_alive() for t in threads), "a simulated rank hung"
        return results, errors

    def run_ok(self, fn):
        results, errors = self.run(fn)
        for e in errors:
            if e is not None:
                raise e
        return results


class ThreadComm:
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.size = world.size

    def allgather(self, obj):
        w = self.world
        w._slots[self.rank] = obj
        w.log.append((self.rank, obj))
        w._baton.release()  # let the other ranks compute while this one waits
        try:
            w._barrier.wait()
            out = [pickle.loads(pickle.dumps(o)) for o in w._slots]
            w._barrier.wait()
        finally:
            w._baton.acquire()
        return out


def split(x, counts):
    edges = np.cumsum([0, *counts])
    return [x[a:b] for a, b in zip(edges[:-1], edges[1:])]


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / (1.0 + np.abs(b)), initial=0.0))


CASES = [
    # (global shape without N, axis, per-rank batch sizes)
    ((5,), 1, (4, 7)),
    ((5,), 1, (3, 0, 8)),
    ((4,), 1, (1, 1, 1)),  # one sample per rank: a local BatchNorm could not even run
    ((3, 4, 5), 1, (2, 5, 0)),
    ((3, 4, 5), 1, (0, 3, 1)),
    ((4, 3, 6), -1, (5, 2)),  # channels-last (N, H, W, C)
]


def _ref_and_sync(rng, feat, axis, counts, momentum=0.1, dtype=np.float64, steps=3):
    C = feat[axis if axis < 0 else axis - 1]
    R = len(counts)
    world = ThreadWorld(R)
    ref = sn.BatchNorm(C, momentum=momentum, axis=axis)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    ref.params["weight"], ref.params["bias"] = w.copy(), b.copy()
    layers = [SyncBatchNorm(C, momentum=momentum, axis=axis, comm=world.comms[r]) for r in range(R)]
    for lay in layers:
        lay.params["weight"], lay.params["bias"] = w.copy(), b.copy()
    history = []
    for _ in range(steps):
        N = sum(counts)
        x = (rng.standard_normal((N, *feat)) * 2.0 + 300.0).astype(dtype)
        dy = rng.standard_normal((N, *feat)).astype(dtype)
        y_ref = ref.forward(x)
        dx_ref = ref.backward(dy)
        xs, dys = split(x, counts), split(dy, counts)

        def step(r, comm):
            y = layers[r].forward(xs[r])
            dx = layers[r].backward(dys[r])
            return y, dx, {k: v.copy() for k, v in layers[r].grads.items()}

        out = world.run_ok(step)
        history.append((y_ref, dx_ref, {k: v.copy() for k, v in ref.grads.items()}, out))
    return ref, layers, history, world


@pytest.mark.parametrize("feat,axis,counts", CASES)
def test_matches_one_batchnorm_on_the_concatenated_batch(rng, feat, axis, counts):
    ref, layers, history, _ = _ref_and_sync(rng, feat, axis, counts)
    for y_ref, dx_ref, g_ref, out in history:
        y = np.concatenate([o[0] for o in out])
        dx = np.concatenate([o[1] for o in out])
        assert y.shape == y_ref.shape and dx.shape == dx_ref.shape
        assert rel_err(y, y_ref) < 1e-12
        assert rel_err(dx, dx_ref) < 1e-10
        assert np.abs(dx_ref).max() > 1e-2  # the gradient is not trivially zero
        for _, _, g in out:
            for k in ("weight", "bias"):
                assert rel_err(g[k], g_ref[k]) < 1e-10
                # every rank holds the same bits: the sums run in rank order everywhere
                np.testing.assert_array_equal(g[k], out[0][2][k])
    for lay in layers:
        assert lay.num_batches_tracked == ref.num_batches_tracked == len(history)
        for k in ("running_mean", "running_var"):
            assert rel_err(lay.buffers[k], ref.buffers[k]) < 1e-12
            np.testing.assert_array_equal(lay.buffers[k], layers[0].buffers[k])


def test_momentum_none_is_the_cumulative_average(rng):
    ref, layers, _, _ = _ref_and_sync(rng, (6,), 1, (3, 5), momentum=None, steps=4)
    for lay in layers:
        assert rel_err(lay.running_mean, ref.running_mean) < 1e-12
        assert rel_err(lay.running_var, ref.running_var) < 1e-12


def test_float32_keeps_dtype_and_accuracy(rng):
    _, _, history, _ = _ref_and_sync(rng, (3, 4, 2), 1, (2, 3), dtype=np.float32, steps=1)
    y_ref, dx_ref, g_ref, out = history[0]
    for y, dx, g in out:
        assert y.dtype == np.float32 and dx.dtype == np.float32
        assert g["weight"].dtype == np.float64
    # float32 outputs: the statistics agree to ~1e-16, so at most the last float32 bit
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([o[1] for o in out]), dx_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0][2]["weight"], g_ref["weight"], rtol=1e-10, atol=1e-10)


def test_one_non_empty_rank_is_exactly_batchnorm(rng):
    """Empty ranks contribute nothing: Chan's merge with n = 0 and sums of zeros are exact."""
    C = 3
    world = ThreadWorld(3)
    x = rng.standard_normal((6, C, 4)) + 5
    dy = rng.standard_normal(x.shape)
    ref = sn.BatchNorm(C)
    y_ref, dx_ref = ref.forward(x), ref.backward(dy)
    layers = [SyncBatchNorm(C, comm=c) for c in world.comms]
    xs = [x[:0], x, x[:0]]
    dys = [dy[:0], dy, dy[:0]]
    out = world.run_ok(lambda r, c: (layers[r].forward(xs[r]), layers[r].backward(dys[r])))
    np.testing.assert_array_equal(out[1][0], y_ref)
    assert out[0][0].shape == (0, C, 4) and out[0][1].shape == (0, C, 4)
    np.testing.assert_allclose(out[1][1], dx_ref, rtol=1e-13, atol=1e-15)
    for lay in layers:
        np.testing.assert_array_equal(lay.running_mean, ref.running_mean)
        np.testing.assert_array_equal(lay.running_var, ref.running_var)
        np.testing.assert_allclose(lay.grads["weight"], ref.grads["weight"], rtol=1e-13)
        np.testing.assert_array_equal(lay.grads["bias"], ref.grads["bias"])


def test_gradients_against_finite_differences_across_ranks(rng):
    """The input gradient on each rank is the derivative of the loss over every rank's output."""
    C, counts = 2, (2, 3)
    x = rng.standard_normal((sum(counts), C)) * 1.5 + 0.5
    dy = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    world = ThreadWorld(2)

    def global_forward(xs):
        res = world.run_ok(lambda r, c: F.sync_batch_norm_forward(xs[r], w, b, c, eps=1e-3))
        return res

    def f_of(r):
        def f(xr):
            xs = split(x, counts)
            xs[r] = xr
            return np.concatenate([y for y, _ in global_forward(xs)])

        return f

    xs, dys = split(x, counts), split(dy, counts)
    caches = [c for _, c in global_forward(xs)]
    grads = world.run_ok(lambda r, c: F.sync_batch_norm_backward(dys[r], caches[r], c))
    for r in range(2):
        num = numerical_grad(f_of(r), xs[r].copy(), dy)
        np.testing.assert_allclose(grads[r][0], num, rtol=1e-5, atol=1e-7)
    assert np.abs(grads[0][0]).max() > 1e-3


def test_communication_is_two_collectives_of_order_c(rng):
    C = 7
    world = ThreadWorld(2)
    layers = [SyncBatchNorm(C, comm=c) for c in world.comms]
    xs = [rng.standard_normal((40, C, 9)), rng.standard_normal((3, C, 9))]
    world.run_ok(lambda r, c: layers[r].backward(np.ones_like(layers[r].forward(xs[r]))))
    assert len(world.log) == 4  # one allgather per rank in the forward, one in the backward
    fwd = [p for _, p in world.log if len(p) == 3]
    bwd = [p for _, p in world.log if len(p) == 2]
    assert len(fwd) == len(bwd) == 2
    for count, mean, m2 in fwd:
        assert isinstance(count, int) and mean.shape == m2.shape == (C,)
    for s1, s2 in bwd:
        assert s1.shape == s2.shape == (C,)


def test_eval_mode_is_local_batchnorm_and_communicates_nothing(rng):
    C = 4
    world = ThreadWorld(2)
    layers = [SyncBatchNorm(C, comm=c) for c in world.comms]
    ref = sn.BatchNorm(C)
    x = rng.standard_normal((9, C)) * 3 + 1
    xs = split(x, (4, 5))
    ref.forward(x)
    world.run_ok(lambda r, c: layers[r].forward(xs[r]))
    n_log = len(world.log)
    ref.eval()
    xe = rng.standard_normal((3, C))
    dy = rng.standard_normal(xe.shape)
    y_ref, dx_ref = ref.forward(xe), ref.backward(dy)
    for lay in layers:
        lay.eval()
        y = lay.forward(xe)  # no other rank takes part: this would hang if it communicated
        dx = lay.backward(dy)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lay.grads["weight"], ref.grads["weight"], rtol=1e-12, atol=1e-12)
    assert len(world.log) == n_log


def test_global_count_of_one_is_a_clear_error_on_every_rank_and_changes_nothing(rng):
    C = 3
    for counts in [(1, 0), (0, 0)]:
        world = ThreadWorld(2)
        layers = [SyncBatchNorm(C, comm=c) for c in world.comms]
        before = [lay.state_dict() for lay in layers]
        xs = [rng.standard_normal((n, C)) for n in counts]
        _, errors = world.run(lambda r, c: layers[r].forward(xs[r]))
        for e in errors:
            assert isinstance(e, ValueError)
            assert "more than 1 value per channel over all ranks" in str(e)
            assert f"got {sum(counts)}" in str(e)
        for lay, st in zip(layers, before):
            assert lay.num_batches_tracked == 0
            for k, v in st.items():
                np.testing.assert_array_equal(lay.state_dict()[k], v)


def test_a_bad_input_on_one_rank_stops_every_rank(rng):
    C = 3
    world = ThreadWorld(3)
    layers = [SyncBatchNorm(C, comm=c) for c in world.comms]
    xs = [rng.standard_normal((4, C)), rng.standard_normal((4, C + 1)), rng.standard_normal((2, C))]
    _, errors = world.run(lambda r, c: layers[r].forward(xs[r]))
    assert isinstance(errors[1], ValueError) and "channels" in str(errors[1])
    for r in (0, 2):
        assert isinstance(errors[r], RuntimeError)
        assert "rank 1" in str(errors[r]) and "ValueError" in str(errors[r])
    assert all(lay.num_batches_tracked == 0 for lay in layers)
    np.testing.assert_array_equal(layers[0].running_var, np.ones(C))

    # the ranks are still in step: a good step works, then a bad dy on rank 2 stops all
    xs[1] = rng.standard_normal((4, C))
    world.run_ok(lambda r, c: layers[r].forward(xs[r]))
    dys = [np.ones((4, C)), np.ones((4, C)), np.ones((3, C))]
    _, errors = world.run(lambda r, c: layers[r].backward(dys[r]))
    assert isinstance(errors[2], ValueError) and "dy has shape" in str(errors[2])
    assert all(isinstance(errors[r], RuntimeError) and "rank 2" in str(errors[r]) for r in (0, 1))


def test_ranks_disagreeing_on_channels_in_the_functional_api(rng):
    world = ThreadWorld(2)
    xs = [rng.standard_normal((4, 3)), rng.standard_normal((4, 5))]
    _, errors = world.run(lambda r, c: F.sync_batch_norm_forward(xs[r], comm=c))
    for e in errors:
        assert isinstance(e, ValueError) and "disagree on the number of channels" in str(e)


def test_self_communicator_is_exactly_batchnorm(rng):
    C = 5
    ref = sn.BatchNorm(C, momentum=0.2)
    lay = SyncBatchNorm(C, momentum=0.2)
    assert isinstance(lay.comm, SelfCommunicator)
    assert sorted(lay.state_dict()) == sorted(ref.state_dict())
    for _ in range(3):
        x = rng.standard_normal((6, C, 3)) * 4 - 2
        dy = rng.standard_normal(x.shape)
        np.testing.assert_allclose(lay.forward(x), ref.forward(x), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(lay.backward(dy), ref.backward(dy), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(lay.running_var, ref.running_var, rtol=1e-13)
    np.testing.assert_allclose(lay.grads["weight"], ref.grads["weight"], rtol=1e-11)
    with pytest.raises(ValueError, match="more than 1 value"):
        lay.forward(np.ones((1, C)))
    assert lay.num_batches_tracked == 3


def test_state_dict_and_from_batchnorm(rng):
    bn = sn.BatchNorm2d(3, momentum=0.3, eps=1e-3)
    bn.forward(rng.standard_normal((4, 3, 2, 2)))
    bn.params["weight"] = rng.standard_normal(3)
    sync = SyncBatchNorm.from_batchnorm(bn)
    assert (sync.eps, sync.momentum, sync.axis) == (1e-3, 0.3, 1)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(sync.state_dict()[k], v)
    bn.eval()
    sync.eval()
    x = rng.standard_normal((2, 3, 2, 2))
    np.testing.assert_array_equal(sync.forward(x), bn.forward(x))
    back = sn.BatchNorm(3)
    back.load_state_dict(sync.state_dict())
    assert back.num_batches_tracked == 1
    assert "comm=SelfCommunicator()" in repr(sync)
    with pytest.raises(TypeError):
        SyncBatchNorm.from_batchnorm(sn.LayerNorm(3))


def test_no_running_stats_and_no_affine(rng):
    world = ThreadWorld(2)
    ref = sn.BatchNorm(3, affine=False, track_running_stats=False)
    layers = [SyncBatchNorm(3, affine=False, track_running_stats=False, comm=c) for c in world.comms]
    x = rng.standard_normal((7, 3)) + 2
    dy = rng.standard_normal(x.shape)
    y_ref, dx_ref = ref.forward(x), ref.backward(dy)
    xs, dys = split(x, (2, 5)), split(dy, (2, 5))
    out = world.run_ok(lambda r, c: (layers[r].forward(xs[r]), layers[r].backward(dys[r])))
    assert rel_err(np.concatenate([o[0] for o in out]), y_ref) < 1e-12
    assert rel_err(np.concatenate([o[1] for o in out]), dx_ref) < 1e-10
    assert layers[0].buffers == {} and layers[0].params == {}


def test_communicator_protocol():
    assert as_communicator(None).allgather(3) == [3]
    assert isinstance(as_communicator(None), SelfCommunicator)
    world = ThreadWorld(1)
    assert as_communicator(world.comms[0]) is world.comms[0]
    with pytest.raises(TypeError, match="allgather"):
        as_communicator(object())
    with pytest.raises(TypeError):
        SyncBatchNorm(3, comm="world")
    with pytest.raises(KeyError):
        allgather_checked(SelfCommunicator(), None, KeyError("boom"))
    assert pickle.loads(pickle.dumps(RankFailure(1, "x"))) == RankFailure(1, "x")


# ---------------------------------------------------------------------------------------
# A real MPI job
# ---------------------------------------------------------------------------------------

JOB = Path(__file__).with_name("mpi_sync_bn_job.py")
# found anywhere in the output: mpiexec may splice the ranks' lines together
LINE = re.compile(r"SYNCBN rank=(\d+) size=(\d+) cases=(\d+) (.*?status=\w+)")
MPI_TIMEOUT = 240.0


def test_two_process_mpi_job():
    mpiexec = Path(sys.prefix) / "bin" / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"mpiexec is not installed in this environment (looked for {mpiexec}); install streamnorm[mpi]")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed; install streamnorm[mpi]")
    env = dict(os.environ)
    env["NUMBA_NUM_THREADS"] = "1"  # two ranks on a small machine: do not oversubscribe
    env["SYNCBN_JOB_WATCHDOG"] = str(int(MPI_TIMEOUT - 30))
    cmd = [str(mpiexec), "-n", "2", sys.executable, str(JOB)]
    # a new session, so that a timeout can end mpiexec, its proxies and the ranks together
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=str(JOB.parent.parent), start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=MPI_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the MPI job did not finish in {MPI_TIMEOUT} s; its output:\n{out}")
    print(out)
    assert proc.returncode == 0, f"mpiexec exited with {proc.returncode}:\n{out}"
    found = {}
    for m in LINE.finditer(out):
        fields = dict(kv.split("=", 1) for kv in m.group(4).split())
        found[int(m.group(1))] = (int(m.group(2)), int(m.group(3)), fields)
    assert sorted(found) == [0, 1], f"expected a result line from ranks 0 and 1:\n{out}"
    for size, cases, f in found.values():
        assert size == 2 and cases >= 5
        assert float(f["fwd"]) < 1e-12
        assert float(f["dx"]) < 1e-10 and float(f["grad"]) < 1e-10
        assert float(f["running"]) < 1e-12
        assert f["errors"] == "ok" and f["status"] == "OK", f
    # both ranks hold the same bits: running statistics and parameter gradients
    assert found[0][2]["digest"] == found[1][2]["digest"]
