"""StreamScaler and normalize_stream: standardizing a stream of chunks (docs/streams.rst).

A stream of ``N_CHUNKS`` chunks of rows, the views of one seeded array.  The data is
drawn once per run in ``setup_cache`` and read back from an ``.npy`` file by every
``setup`` (see :func:`common.save_normal`), so the ``peakmem_`` benchmarks see the
stream and what the operation allocates, not the drawing of the data.
"""

from __future__ import annotations

import abc

import numpy as np

from streamnorm import StreamScaler, normalize_stream

from .common import DTYPES, fraction_of_bound, save_normal, sized

# (rows, features) of the whole stream: few features and many.  32 MiB in float32,
# 64 MiB in float64, as the large streams of bench_stats.py; on the small grid
# 128 KiB in float32.
SHAPES = sized([(1 << 20, 8), (1 << 14, 512)], [(1 << 12, 8), (64, 512)])
N_CHUNKS = 8


class _ScalerStream(abc.ABC):
    params = [SHAPES, DTYPES]
    param_names = ["shape", "dtype"]
    timeout = 180

    def setup_cache(self):
        """Every (shape, dtype) stream to a file; returns their paths by case."""
        return {
            (shape, dtype): save_normal(f"stream_{i}_{dtype}.npy", shape, dtype, loc=3.0, scale=2.0)
            for i, shape in enumerate(SHAPES)
            for dtype in DTYPES
        }

    def setup(self, files, shape, dtype):
        self.data = np.load(files[shape, dtype])
        # Views, not copies: every chunk is C-contiguous, as a reader would hand it over.
        self.chunks = np.array_split(self.data, N_CHUNKS, axis=0)
        self.nbytes = self.data.nbytes
        # Compile (or load from numba's cache) and warm up before anything is timed.
        self.warm_up()

    @abc.abstractmethod
    def warm_up(self):
        """Call what the class measures once, and only that: a ``peakmem_`` benchmark
        reports the peak of the whole process, setup included."""

    def fit(self):
        """A fresh scaler takes in every chunk with ``partial_fit``."""
        sc = StreamScaler()
        for chunk in self.chunks:
            sc.partial_fit(chunk)
        return sc

    def transform(self):
        """The whole array with the fitted statistics, into a new array."""
        return self.scaler.transform(self.data)

    def stream(self):
        """Prequential ``normalize_stream`` from a fresh scaler; every output is dropped
        as soon as the next chunk comes, as a consumer of the stream would."""
        for _ in normalize_stream(self.chunks, mode="prequential"):
            pass


class StreamScalerPartialFit(_ScalerStream):
    """``partial_fit`` of every chunk: the RunningStats update and the refresh of the
    fitted attributes after each chunk."""

    def warm_up(self):
        self.fit()

    def time_partial_fit(self, files, shape, dtype):
        self.fit()

    def peakmem_partial_fit(self, files, shape, dtype):
        self.fit()


class StreamScalerTransform(_ScalerStream):
    """``transform`` of the whole array (it allocates its output)."""

    def warm_up(self):
        self.scaler = self.fit()
        self.transform()

    def time_transform(self, files, shape, dtype):
        self.transform()

    def peakmem_transform(self, files, shape, dtype):
        self.transform()


class NormalizeStream(_ScalerStream):
    """``normalize_stream(chunks, mode="prequential")``: each chunk is normalized with
    the statistics of the chunks before it, then folded in."""

    def warm_up(self):
        self.stream()

    def time_prequential(self, files, shape, dtype):
        self.stream()

    def peakmem_prequential(self, files, shape, dtype):
        self.stream()


class StreamScalerBound(_ScalerStream):
    """Fraction of the memory-traffic bound over the whole stream (docs/math.rst):
    ``partial_fit`` 1 pass, ``transform`` 2, prequential ``normalize_stream`` 3 (2 for
    the transform of each chunk, 1 for its update)."""

    unit = "fraction of bound"

    def warm_up(self):
        self.scaler = self.fit()
        self.transform()
        self.stream()

    def track_partial_fit(self, files, shape, dtype):
        return fraction_of_bound(self.fit, self.nbytes, "scaler_partial_fit")

    def track_transform(self, files, shape, dtype):
        return fraction_of_bound(self.transform, self.nbytes, "scaler_transform")

    def track_normalize_stream(self, files, shape, dtype):
        return fraction_of_bound(self.stream, self.nbytes, "normalize_stream_prequential")
