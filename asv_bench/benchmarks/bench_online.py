"""OnlineNorm: train forward, train forward + backward, eval forward (docs/layers/onlinenorm.rst).

The batch axis is time: the kernels walk the samples in order and go parallel over
channels.  (N, C) input runs the channel-vectorized kernels (L = 1), (N, C, L) input
the ones that reduce each sample's L values of a channel in cache.
"""

from __future__ import annotations

import numpy as np

from streamnorm import OnlineNorm
from streamnorm import functional as F

from .common import (
    DTYPES,
    Bound,
    Forward,
    ForwardBackward,
    ForwardEval,
    LayerBench,
    median_time,
    set_affine,
    sized,
)

# Sizes in float32: 4, 32, 16 and 32 MiB (twice that in float64); on the small grid
# 64 KiB for each layout.
SHAPES = sized(
    [(4096, 256), (32768, 256), (256, 64, 256), (64, 128, 1024)],
    [(256, 64), (16, 16, 64)],
)


class _OnlineNormData(LayerBench):
    params = [SHAPES, DTYPES]
    x_loc, x_scale = 0.5, 2.0

    def new_layer(self, shape):
        return set_affine(OnlineNorm(shape[1]), seed=17)


class OnlineNormForwardTrain(_OnlineNormData, Forward):
    """Normalization with the carried statistics and their update, sample by sample.

    Every call advances the carried state; its values do not change the cost.
    """


class OnlineNormForwardBackwardTrain(_OnlineNormData, ForwardBackward):
    """One training step: forward, then the backward with the u, v control process."""


class OnlineNormForwardEval(_OnlineNormData, ForwardEval):
    """Normalization with the carried statistics, which stay as they are."""

    peakmem_forward = None  # only the time is tracked here


class OnlineNormThroughput(_OnlineNormData):
    """Training steps (forward + backward) as channel-samples per second.

    One channel-sample is one step of the per-channel recurrences of docs/layers/onlinenorm.rst: one
    sample of one channel, that is one value for (N, C) input and L values at once for
    (N, C, L) input.  A step of forward and backward processes N·C of them.  Higher is
    better.
    """

    unit = "channel-samples/s"

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.steps = shape[0] * shape[1]
        self.step()

    def track_channel_samples_per_second(self, shape, dtype):
        return self.steps / median_time(self.step)


class OnlineNormBound(_OnlineNormData, Bound):
    """Fraction of the memory-traffic bound (docs/math.rst): forward 2 passes, backward 3.

    Timed through :mod:`streamnorm.functional` from a fixed state, so that only the
    kernels and their checks are measured.  The forward reads ``x`` and writes ``y``;
    the backward reads ``dy`` and ``x`` and writes ``dx``: it replays the forward's
    statistics from the state before the call instead of storing them.
    """

    forward_op, backward_op = "online_forward", "online_backward"

    def setup(self, shape, dtype):
        c = shape[1]
        self.mu = np.zeros(c)
        self.var = np.ones(c)
        self.u = np.zeros(c)
        self.v = np.zeros(c)
        super().setup(shape, dtype)

    def forward(self):
        return F.online_norm_forward(self.x, self.mu, self.var, self.w, self.b)

    def backward(self):
        return F.online_norm_backward(self.dy, self.cache, self.u, self.v)
