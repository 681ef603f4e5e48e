"""RunningStats: folding a stream of chunks into the (count, mean, M2) state."""

from __future__ import annotations

import numpy as np

from streamnorm import RunningStats

from .common import DTYPES, fraction_of_bound, normal, sized

# (rows, features) of the whole stream; it arrives in N_CHUNKS chunks of rows.  The
# first is small (call overhead); the others are 32 MiB in float32, 64 MiB in float64,
# one with few wide-apart features and one with many.
STREAM_SHAPES = [(4096, 64), (1 << 20, 8), (1 << 14, 512)]
# The small grid: few features and many, 128 KiB in float32.
SMALL_STREAM_SHAPES = [(1 << 12, 8), (64, 512)]
N_CHUNKS = 4


class _Stream:
    params = [sized(STREAM_SHAPES, SMALL_STREAM_SHAPES), DTYPES]
    param_names = ["shape", "dtype"]

    def setup(self, shape, dtype):
        data = normal(shape, dtype, loc=3.0)
        # Views, not copies: RunningStats reads a C-contiguous chunk in place.
        self.chunks = np.array_split(data, N_CHUNKS, axis=0)
        self.nbytes = data.nbytes
        # Compile (or load from numba's cache) and warm up before anything is timed.
        self.feed()

    def feed(self):
        rs = RunningStats()
        for chunk in self.chunks:
            rs.update(chunk)
        return rs


class RunningStatsUpdate(_Stream):
    """A fresh state takes in every chunk; the first chunk sets the feature shape."""

    def time_update(self, shape, dtype):
        self.feed()

    def peakmem_update(self, shape, dtype):
        self.feed()


class RunningStatsUpdateDecay(_Stream):
    """The same stream with exponential forgetting (docs/math.rst)."""

    def feed(self):
        rs = RunningStats(decay=0.1)
        for chunk in self.chunks:
            rs.update(chunk)
        return rs

    def time_update(self, shape, dtype):
        self.feed()


class RunningStatsMerge:
    """Chan merge of two states, the cost of combining partial results."""

    params = [sized([8, 4096, 1 << 18], [8])]
    param_names = ["features"]

    def setup(self, features):
        g = np.random.default_rng(7)
        self.a = RunningStats().update(g.normal(size=(16, features)))
        self.b = RunningStats().update(g.normal(size=(16, features)))
        self.a + self.b

    def time_merge(self, features):
        self.a + self.b


class RunningStatsBound(_Stream):
    """Fraction of the memory-traffic bound: one read of the stream (docs/math.rst).

    The small stream is left out: it fits in cache, where memory is not the limit.
    """

    params = [sized(STREAM_SHAPES[1:], SMALL_STREAM_SHAPES), DTYPES]
    unit = "fraction of bound"

    def track_update(self, shape, dtype):
        return fraction_of_bound(self.feed, self.nbytes, "moments_update")
