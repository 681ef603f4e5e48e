"""SyncBatchNorm over real MPI ranks, checked against one BatchNorm on the whole batch.

Run as ``mpiexec -n 2 python tests/mpi_sync_bn_job.py`` (any number of ranks works);
tests/test_sync_batchnorm.py runs it and parses the output.  Every rank builds the same
seeded global batches, takes its own slice (the slices differ in size, and in one case
the last rank's is empty), trains a SyncBatchNorm on it for a few steps and compares its
outputs, input gradients, parameter gradients and running statistics with a BatchNorm
that sees the whole batch.  Each rank prints one line:

    SYNCBN rank=R size=S cases=K fwd=E dx=E grad=E running=E errors=ok digest=HEX status=OK

with E the largest error ``|a - b| / (1 + |b|)`` over every case and step, and the
digest a hash of the running statistics and parameter gradients (equal on every rank
when the ranks agree bit for bit).  A watchdog ends a rank that hangs.
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import sys

import numpy as np

WATCHDOG = float(os.environ.get("SYNCBN_JOB_WATCHDOG", "180"))
faulthandler.dump_traceback_later(WATCHDOG, exit=True)

import streamnorm as sn  # noqa: E402
from streamnorm.comm import MPICommunicator  # noqa: E402
from streamnorm.layers import SyncBatchNorm  # noqa: E402

TOL = {"fwd": 1e-12, "dx": 1e-10, "grad": 1e-10, "running": 1e-12}

# (global shape without N, channel axis, global N, whether the last rank gets no rows)
CASES = [
    ((5,), 1, 11, False),
    ((3, 4, 5), 1, 9, False),  # (N, C, H, W)
    ((4, 3, 6), -1, 7, False),  # channels-last (N, H, W, C)
    ((4,), 1, 6, True),  # the last rank's batch is empty
    ((2, 3), 1, 5, True),
]
STEPS = 3


def counts_for(N: int, size: int, empty_last: bool) -> list[int]:
    """Unequal slices: rank r's share grows with r (the last one is 0 when asked)."""
    w = np.arange(1, size + 1, dtype=np.float64)
    if empty_last and size > 1:
        w[-1] = 0.0
    edges = np.rint(np.concatenate([[0.0], np.cumsum(w)]) / w.sum() * N).astype(int)
    return [int(b - a) for a, b in zip(edges[:-1], edges[1:])]


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / (1.0 + np.abs(b)), initial=0.0))


def run_case(comm, k, feat, axis, N, empty_last, err, digest):
    rank, size = comm.rank, comm.size
    C = feat[axis if axis < 0 else axis - 1]
    counts = counts_for(N, size, empty_last)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    rng = np.random.default_rng(1000 + k)  # the same global data on every rank
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    ref = sn.BatchNorm(C, axis=axis)
    sync = SyncBatchNorm(C, axis=axis, comm=comm)
    for lay in (ref, sync):
        lay.params["weight"], lay.params["bias"] = w.copy(), b.copy()
    for _ in range(STEPS):
        x = rng.standard_normal((N, *feat)) * 2.0 + 300.0
        dy = rng.standard_normal((N, *feat))
        y_ref, dx_ref = ref.forward(x), ref.backward(dy)
        y = sync.forward(x[lo:hi])
        dx = sync.backward(dy[lo:hi])
        err["fwd"] = max(err["fwd"], rel_err(y, y_ref[lo:hi]))
        err["dx"] = max(err["dx"], rel_err(dx, dx_ref[lo:hi]))
        for name in ("weight", "bias"):
            err["grad"] = max(err["grad"], rel_err(sync.grads[name], ref.grads[name]))
            digest.update(sync.grads[name].tobytes())
    for name in ("running_mean", "running_var"):
        err["running"] = max(err["running"], rel_err(sync.buffers[name], ref.buffers[name]))
        digest.update(sync.buffers[name].tobytes())
    if sync.num_batches_tracked != STEPS:
        err["running"] = float("inf")


def check_errors(comm) -> str:
    """A bad input on the last rank must stop every rank, with no change of state."""
    C = 3
    sync = SyncBatchNorm(C, comm=comm)
    bad = comm.rank == comm.size - 1
    x = np.ones((2, C + 1)) if bad else np.arange(2.0 * C).reshape(2, C)
    try:
        sync.forward(x)
    except ValueError:
        ok = bad
    except RuntimeError as exc:
        ok = (not bad) and f"rank {comm.size - 1}" in str(exc)
    else:
        ok = False
    ok = ok and sync.num_batches_tracked == 0
    # a global count of 1: only rank 0 has one row
    try:
        sync.forward(np.ones((1 if comm.rank == 0 else 0, C)))
        ok = False
    except ValueError as exc:
        ok = ok and "over all ranks" in str(exc)
    return "ok" if ok else "FAILED"


def main() -> int:
    comm = MPICommunicator()
    err = {key: 0.0 for key in TOL}
    digest = hashlib.sha256()
    for k, (feat, axis, N, empty_last) in enumerate(CASES):
        run_case(comm, k, feat, axis, N, empty_last, err, digest)
    errors = check_errors(comm)
    good = errors == "ok" and all(err[key] < TOL[key] for key in TOL)
    line = (
        f"SYNCBN rank={comm.rank} size={comm.size} cases={len(CASES)} "
        + " ".join(f"{key}={err[key]:.3e}" for key in TOL)
        + f" errors={errors} digest={digest.hexdigest()[:16]} status={'OK' if good else 'FAIL'}\n"
    )
    # one write call per line: mpiexec merges the ranks' output streams, and a line
    # written in pieces can come out spliced with another rank's
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
