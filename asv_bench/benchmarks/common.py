"""Helpers shared by the benchmark files: seeded data and the memory-traffic bound.

Nothing here is a benchmark (asv collects only names that start with ``time_``,
``peakmem_``, ``track_`` and the like).

The bound (SPEC §7)
-------------------
Normalization is memory bound, so each kernel is reported against the time it would
take to move its bytes at the machine's copy bandwidth::

    bound_time = passes * data_bytes / B

where ``data_bytes`` is the size of the N×C data in the input's dtype, ``passes`` is
the number of reads or writes of that data the operation cannot avoid (the table in
SPEC §7, repeated in :data:`PASSES`), and ``B`` is the copy bandwidth measured in this
very process with ``np.copyto`` of a 256 MiB array (read bytes + write bytes over the
time).  The tracked value is ``bound_time / kernel_time``: 1.0 means the kernel moves
its data as fast as a plain copy does; higher is better.

Two caveats when reading the numbers.  ``np.copyto`` runs on one thread while the
kernels run on all of numba's threads, so on a machine where one core cannot saturate
memory the fraction can exceed 1.  And an input that fits in the last-level cache is
not limited by memory at all; the shapes tracked here are 8 MiB and up for that
reason, but a large cache can still hold the smaller ones.
"""

from __future__ import annotations

import time

import numpy as np

SEED = 20240601

DTYPES = ["float32", "float64"]

# Passes over the N×C data per operation, unfused (SPEC §7).
PASSES = {
    "moments_update": 1,
    "bn_forward_train": 3,
    "bn_forward_eval": 2,
    "bn_backward_train": 5,
    "ln_forward": 2,
    "ln_backward": 3,
    # A (sample, group) block of GroupNorm and InstanceNorm, like a LayerNorm row,
    # stays in cache between its statistics and its output.
    "gn_forward": 2,
    "gn_backward": 3,
    "rms_forward": 2,
    "rms_backward": 3,
    # OnlineNorm reads x and writes y; one sample of one channel (L values) stays in
    # cache between the output and the update of the carried statistics.
    "online_forward": 2,
    "online_backward": 3,
}

# At least 256 MB, as SPEC §7 asks: far larger than any cache.
_COPY_BYTES = 256 * 1024 * 1024
_COPY_REPEATS = 7

_bandwidth: float | None = None


def rng(stream: int = 0) -> np.random.Generator:
    """A fresh seeded generator, so every setup sees the same data.

    Different ``stream`` numbers give independent data (an input and its upstream
    gradient, say).
    """
    return np.random.default_rng([SEED, stream])


def normal(shape, dtype, loc: float = 0.0, scale: float = 1.0, stream: int = 0) -> np.ndarray:
    """Seeded normal data of ``shape`` and ``dtype`` (C-contiguous)."""
    return rng(stream).normal(loc, scale, size=shape).astype(dtype)


def copy_bandwidth() -> float:
    """Copy bandwidth of this process in bytes per second (cached after the first call).

    ``np.copyto`` of a 256 MiB float64 array into another one: one warm-up copy (which
    also faults in the destination's pages), then the median of a few timed copies,
    the same estimate ``python -m streamnorm bench`` makes, so the two reports agree.
    """
    global _bandwidth
    if _bandwidth is None:
        src = np.ones(_COPY_BYTES // 8)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        t = median_time(lambda: np.copyto(dst, src), _COPY_REPEATS)
        _bandwidth = (src.nbytes + dst.nbytes) / t
    return _bandwidth


def median_time(func, repeats: int = 5) -> float:
    """Median wall time of ``func()`` over ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fraction_of_bound(func, data_bytes: int, operation: str, repeats: int = 5) -> float:
    """``bound_time / actual_time`` for ``func``, which moves ``data_bytes`` per pass.

    ``func`` must already have been called once (compiled and warm).
    """
    bound = PASSES[operation] * data_bytes / copy_bandwidth()
    return bound / median_time(func, repeats)
