"""Fit a StreamScaler on a dask array of several GB on a local cluster, beside dask's own.

The array is generated lazily on the workers (``da.random.default_rng(0)``), block by
block, so no process ever holds it whole.  Memory: each method runs once alone on
freshly restarted worker processes, then each worker's peak resident memory
(``ru_maxrss``, read on the worker) is that method's.  Time: after a warm-up round,
``--repeat`` rounds run every method in turn, so a change in the machine's load hits
all of them alike; the median and the minimum are reported.

Rows:

* ``streamnorm``: ``StreamScaler().fit(x)``: per-block numba moments, Chan-merged up
  dask's reduction tree, one ``compute()``.
* ``dask``: ``dask.compute(x.mean(axis=0), x.var(axis=0))``, the two together, sharing
  the generated blocks.
* ``dask-ml``: ``dask_ml.preprocessing.StandardScaler().fit(x)``, when installed.
* ``floor``: ``x.sum(axis=0)``: generating the data and one cheap pass over it.  Every
  method pays this; the time above it is the method's own.

Agreement is the largest difference from dask's mean and variance over the features:
``|Δmean| / std`` (the mean of standard normal data is ~0, so a relative error would
measure nothing) and ``|Δvar| / var``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np

GiB = 1 << 30
MiB = 1 << 20


def _peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (run on each worker)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MiB if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB elsewhere


def _methods(x) -> dict[str, Callable[[], tuple | None]]:
    import dask

    from .scaler import StreamScaler

    def ours():
        sc = StreamScaler().fit(x)
        return sc.mean_, sc.var_

    def dask_own():
        m, v = dask.compute(x.mean(axis=0), x.var(axis=0))
        return np.asarray(m), np.asarray(v)

    def floor():
        x.sum(axis=0).compute()
        return None

    methods: dict[str, Callable[[], tuple | None]] = {"streamnorm": ours, "dask": dask_own}
    try:
        from dask_ml.preprocessing import StandardScaler as DaskMLScaler
    except ImportError:
        DaskMLScaler = None
    if DaskMLScaler is not None:

        def dask_ml():
            s = DaskMLScaler().fit(x)
            return np.asarray(s.mean_), np.asarray(s.var_)

        methods["dask-ml"] = dask_ml
    methods["floor"] = floor
    return methods


def _measure(client, methods: dict, repeat: int) -> dict[str, tuple[list[float], list[float], tuple | None]]:
    """{name: (times, peak MiB per worker, result)}.

    Memory: each method alone on freshly restarted workers, so a worker's peak RSS is
    that method's.  Time: a warm-up round, then ``repeat`` interleaved rounds, so a
    change in the machine's load during the run hits every method alike.
    """
    peaks, results = {}, {}
    for name, fn in methods.items():
        client.restart()
        results[name] = fn()
        peaks[name] = [v for _, v in sorted(client.run(_peak_rss_mib).items())]
    for fn in methods.values():  # warm-up: the restarted workers load their code again
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (times[name], peaks[name], results[name]) for name in methods}


def _agreement(res, ref) -> tuple[float, float]:
    if res is None or ref is None:
        return float("nan"), float("nan")
    m, v = (np.asarray(a, dtype=np.float64) for a in res)
    rm, rv = ref
    return float(np.max(np.abs(m - rm) / np.sqrt(rv))), float(np.max(np.abs(v - rv) / rv))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m streamnorm bench-dask",
        description="StreamScaler.fit on a lazily generated dask array (float64, 256 features) on a "
        "local cluster of worker processes, beside dask's mean + var and dask-ml's StandardScaler.",
    )
    p.add_argument("--gb", type=float, default=4.0, help="array size in GiB (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per method, after a warm-up (default 3)")
    p.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (default 2)")
    p.add_argument("--chunk-mb", type=float, default=64.0, help="block size in MiB (default 64)")
    p.add_argument("--features", type=int, default=256, help="columns (default 256)")
    args = p.parse_args(argv)
    if args.gb <= 0 or args.repeat < 1 or args.workers < 1 or args.chunk_mb <= 0 or args.features < 1:
        p.error("--gb, --chunk-mb, --repeat, --workers and --features must be positive")
    try:
        import dask
        import dask.array as da
        import dask.distributed  # noqa: F401

        from .dask import local_client
    except ImportError:
        print("bench-dask needs dask[array,distributed]: pip install 'streamnorm[dask]'", file=sys.stderr)
        return 2

    F = args.features
    N = max(1, int(args.gb * GiB) // (8 * F))
    rows = max(1, min(N, int(args.chunk_mb * MiB) // (8 * F)))
    x = da.random.default_rng(0).standard_normal((N, F), chunks=(rows, F))

    print(
        f"streamnorm bench-dask: x {N} x {F} float64 = {x.nbytes / GiB:.2f} GiB, generated lazily on the workers, "
        f"{x.npartitions} blocks of {rows} rows ({rows * F * 8 / MiB:.0f} MiB)"
    )
    print(
        f"cluster: {args.workers} worker processes x 1 thread, loopback; {os.cpu_count()} CPUs; "
        f"dask {dask.__version__}; {platform.python_implementation()} {platform.python_version()}"
    )
    print(
        f"time: median and min of {args.repeat} interleaved runs after a warm-up; "
        "memory: peak RSS of each worker, on workers restarted for that method alone\n"
    )

    rows_out = []
    ref = None
    with local_client(args.workers) as client:
        methods = _methods(x)
        results = _measure(client, methods, args.repeat)
        ref = results["dask"][2]
        for name, (times, peaks, res) in results.items():
            med = statistics.median(times)
            dm, dv = _agreement(res, ref) if name != "dask" else (0.0, 0.0)
            rows_out.append((name, med, min(times), x.nbytes / GiB / med, max(peaks), sum(peaks), dm, dv, res))

    floor = next((r[1] for r in rows_out if r[0] == "floor"), float("nan"))
    head = ("method", "median s", "min s", "GiB/s", "over floor s", "peak/worker MiB", "all workers MiB",
            "mean |d|/std", "var |d|/var")
    print(f"{head[0]:<11} {head[1]:>9} {head[2]:>8} {head[3]:>7} {head[4]:>13} {head[5]:>16} {head[6]:>16} "
          f"{head[7]:>13} {head[8]:>12}")
    for name, med, mn, gbps, peak, total, dm, dv, res in rows_out:
        agree = ("{:>13} {:>12}".format("-", "-") if res is None
                 else "{:>13} {:>12}".format("(reference)", "(reference)") if name == "dask"
                 else f"{dm:>13.1e} {dv:>12.1e}")
        over = "-" if name == "floor" else f"{med - floor:.2f}"
        print(f"{name:<11} {med:>9.2f} {mn:>8.2f} {gbps:>7.2f} {over:>13} {peak:>16.0f} {total:>16.0f} {agree}")
    if "dask-ml" not in methods:
        print("\ndask-ml is not installed: its row is skipped (pip install dask-ml)")
    ours = next(r for r in rows_out if r[0] == "streamnorm")
    theirs = next(r for r in rows_out if r[0] == "dask")
    print(f"\nstreamnorm / dask median time: {ours[1] / theirs[1]:.2f}; "
          f"peak per worker: {ours[4]:.0f} vs {theirs[4]:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
