"""Helpers shared by the benchmark files: seeded data, the memory-traffic bound and
the benchmark kinds every layer file is made of.

Nothing here is a benchmark: asv collects only names that start with ``time_``,
``peakmem_``, ``track_`` and the like, and it passes over the abstract classes below
(their measured methods run in the layer files' subclasses).

The layer benchmarks
--------------------
A layer's file describes its layer once, in a subclass of :class:`LayerBench`: its
``params`` (shapes and :data:`DTYPES`), the input's distribution and
:meth:`LayerBench.new_layer`.  Each benchmark class combines that description with a
kind: :class:`Forward`, :class:`ForwardEval`, :class:`ForwardBackward` or
:class:`Bound`, which hold ``setup`` and the measured methods.  Every ``setup`` builds
the data and calls what it measures once, so the kernels are compiled (or loaded
from numba's cache) and warm before anything is timed, even with ``--quick``.

The bound (docs/math.rst)
-------------------
Normalization is memory bound, so each kernel is reported against the time it would
take to move its bytes at the machine's copy bandwidth::

    bound_time = passes * data_bytes / B

where ``data_bytes`` is the size of the N×C data in the input's dtype, ``passes`` is
the number of reads or writes of that data the operation cannot avoid (the table in
docs/math.rst, repeated in :data:`PASSES`), and ``B`` is the copy bandwidth measured in this
very process with ``np.copyto`` of a 256 MiB array (read bytes + write bytes over the
time).  The tracked value is ``bound_time / kernel_time``: 1.0 means the kernel moves
its data as fast as a plain copy does; higher is better.

Two caveats when reading the numbers.  ``np.copyto`` runs on one thread while the
kernels run on all of numba's threads, so on a machine where one core cannot saturate
memory the fraction can exceed 1.  And an input that fits in the last-level cache is
not limited by memory at all; the shapes tracked here are 8 MiB and up for that
reason, but a large cache can still hold the smaller ones.

The small grid
--------------
With the environment variable ``STREAMNORM_ASV_SMALL`` set to anything but ``""``
or ``"0"``, every file swaps its shapes for small ones (:func:`sized`): one small
case of each input layout, both dtypes, every class and every measured method, so
that ``asv run --quick`` executes each benchmark at least once in a minute or two
(docs/benchmarks.rst).  The copy bandwidth is then measured on 16 MiB, and the
start-up benchmarks start fewer processes.  Such a run checks that the suite works;
its numbers are not measurements (the small inputs sit in cache and the call
overhead dominates, so their fractions of the bound mean nothing).  Without the
variable the suite is the full grid, from cache-resident shapes up to 256 MiB.
"""

from __future__ import annotations

import abc
import json
import os
import subprocess
import sys
import time

import numpy as np


SEED = 20240601

#: True when ``STREAMNORM_ASV_SMALL`` asks for the small grid (see the module notes).
SMALL = os.environ.get("STREAMNORM_ASV_SMALL", "").strip() not in ("", "0")

DTYPES = ["float32", "float64"]

# Passes over the N×C data per operation, unfused (docs/math.rst).
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
    # StreamScaler (bench_scaler.py), counted on the whole stream: partial_fit is a
    # moments update (read once); transform reads X and writes the output; prequential
    # normalize_stream transforms each chunk with the statistics so far (2), then
    # folds the chunk in (1).
    "scaler_partial_fit": 1,
    "scaler_transform": 2,
    "normalize_stream_prequential": 3,
}

# At least 256 MB, as docs/math.rst asks: far larger than any cache.  The small grid
# only checks that the benchmarks run, so it spares every process that allocation.
_COPY_BYTES = (16 if SMALL else 256) * 1024 * 1024
_COPY_REPEATS = 7

_bandwidth: float | None = None


def run_python(code: str, args=(), env: dict | None = None, timeout: float = 300, what: str = "child") -> list:
    """Run ``code`` in a fresh interpreter; the JSON values of the lines it printed, last first.

    A process that fails, outlives ``timeout`` seconds or prints no JSON line raises,
    with the end of its stderr in the message (``what`` names it there).
    """
    cmd = [sys.executable, "-c", code, *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{what} killed after {timeout} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    values = []
    for line in reversed(proc.stdout.splitlines()):
        try:
            values.append(json.loads(line))
        except ValueError:
            continue
    if not values:
        raise RuntimeError(f"{what} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return values


def sized(full, small):
    """A parameter list: ``full`` normally, ``small`` under ``STREAMNORM_ASV_SMALL``.

    ``small`` should keep one case of each input layout of ``full`` (each takes a
    different kernel), only smaller.
    """
    return list(small if SMALL else full)


def rng(stream: int = 0) -> np.random.Generator:
    """A fresh seeded generator, so every setup sees the same data.

    Different ``stream`` numbers give independent data (an input and its upstream
    gradient, say).
    """
    return np.random.default_rng([SEED, stream])


def normal(shape, dtype, loc: float = 0.0, scale: float = 1.0, stream: int = 0) -> np.ndarray:
    """Seeded normal data of ``shape`` and ``dtype`` (C-contiguous)."""
    return rng(stream).normal(loc, scale, size=shape).astype(dtype)


def save_normal(name: str, shape, dtype, loc: float = 0.0, scale: float = 1.0, stream: int = 0) -> str:
    """Write :func:`normal` data to ``name`` (an ``.npy`` file) and return its absolute path.

    For ``setup_cache``, which asv runs once in a directory that its benchmarks share:
    the data is drawn once, and each benchmark's ``setup`` reads it back with
    ``np.load`` straight into the final array, so that neither the time of drawing it
    nor the float64 temporary of :func:`normal` shows in a ``peakmem_`` benchmark.
    """
    if not name.endswith(".npy"):
        name += ".npy"  # what np.save would append
    np.save(name, normal(shape, dtype, loc=loc, scale=scale, stream=stream))
    return os.path.abspath(name)


def copy_bandwidth() -> float:
    """Copy bandwidth of this process in bytes per second (cached after the first call).

    ``np.copyto`` of a 256 MiB float64 array (16 MiB on the small grid) into another
    one: one warm-up copy (which also faults in the destination's pages), then the
    median of a few timed copies, the same estimate ``python -m streamnorm bench``
    makes, so the two reports agree.
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


def set_affine(layer, seed: int):
    """Non-trivial affine parameters, so no multiplication by one is timed.

    ``weight`` uniform in [0.5, 1.5), then ``bias`` (where the layer has one) standard
    normal, both from ``np.random.default_rng(seed)``.  Returns ``layer``.
    """
    g = np.random.default_rng(seed)
    weight = layer.params["weight"]
    weight[:] = g.uniform(0.5, 1.5, weight.shape)
    if "bias" in layer.params:
        bias = layer.params["bias"]
        bias[:] = g.normal(size=bias.shape)
    return layer


class LayerBench(abc.ABC):
    """Seeded data and a layer for one ``(shape, dtype)`` case.

    A subclass describes a layer: ``params`` (its shapes and :data:`DTYPES`), ``x_loc``
    and ``x_scale`` (the normal distribution of the input) and :meth:`new_layer`.
    """

    param_names = ["shape", "dtype"]
    x_loc: float
    x_scale: float

    @abc.abstractmethod
    def new_layer(self, shape):
        """The layer for input of ``shape``, with :func:`set_affine` parameters."""

    def make(self, shape, dtype):
        """The input ``x`` (stream 0), the upstream gradient ``dy`` (stream 1, standard
        normal) and ``layer``."""
        self.x = normal(shape, dtype, loc=self.x_loc, scale=self.x_scale, stream=0)
        self.dy = normal(shape, dtype, stream=1)
        self.layer = self.new_layer(shape)

    def step(self):
        """One training step's worth of the layer: forward, then the full backward."""
        self.layer.forward(self.x)
        return self.layer.backward(self.dy)


class Forward(LayerBench):
    """``layer.forward(x)`` in train mode: time and peak memory."""

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)

    def time_forward(self, shape, dtype):
        self.layer.forward(self.x)

    def peakmem_forward(self, shape, dtype):
        self.layer.forward(self.x)


class ForwardEval(Forward):
    """``layer.forward(x)`` in eval mode: time and peak memory.

    One train-mode forward first gives the running (OnlineNorm: carried) statistics
    non-default values.
    """

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)
        self.layer.eval()
        self.layer.forward(self.x)


class ForwardBackward(LayerBench):
    """:meth:`LayerBench.step`, forward then backward in train mode: time and peak
    memory."""

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.step()

    def time_forward_backward(self, shape, dtype):
        self.step()

    def peakmem_forward_backward(self, shape, dtype):
        self.step()


class Bound(LayerBench):
    """Fraction of the memory-traffic bound of a forward and its backward (docs/math.rst).

    Timed through :mod:`streamnorm.functional`, so that only the kernels and their
    checks are measured: a subclass defines :meth:`forward` and :meth:`backward` with
    the layer's ``w`` and ``b`` (``None`` where it has no bias) and names their rows
    of :data:`PASSES` in ``forward_op`` and ``backward_op``.
    """

    unit = "fraction of bound"
    forward_op: str
    backward_op: str

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.w = self.layer.params["weight"]
        self.b = self.layer.params.get("bias")
        self.cache = self.forward()[-1]
        self.backward()

    @abc.abstractmethod
    def forward(self):
        """The functional forward; its result ends with the cache."""

    @abc.abstractmethod
    def backward(self):
        """The functional backward from ``self.cache``."""

    def track_forward(self, shape, dtype):
        return fraction_of_bound(self.forward, self.x.nbytes, self.forward_op)

    def track_backward(self, shape, dtype):
        return fraction_of_bound(self.backward, self.x.nbytes, self.backward_op)
