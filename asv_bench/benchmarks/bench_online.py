"""OnlineNorm: train forward, train forward + backward, eval forward (SPEC §5).

The batch axis is time: the kernels walk the samples in order and go parallel over
channels.  (N, C) input runs the channel-vectorized kernels (L = 1), (N, C, L) input
the ones that reduce each sample's L values of a channel in cache.
"""

from __future__ import annotations

import numpy as np

from streamnorm import OnlineNorm
from streamnorm import functional as F

from .common import DTYPES, fraction_of_bound, median_time, normal

# Sizes in float32: 4, 32, 16 and 32 MiB (twice that in float64).
SHAPES = [(4096, 256), (32768, 256), (256, 64, 256), (64, 128, 1024)]


class _OnlineNormData:
    params = [SHAPES, DTYPES]
    param_names = ["shape", "dtype"]

    def make(self, shape, dtype):
        c = shape[1]
        self.x = normal(shape, dtype, loc=0.5, scale=2.0, stream=0)
        self.dy = normal(shape, dtype, stream=1)
        g = np.random.default_rng(17)
        self.layer = OnlineNorm(c)
        self.layer.params["weight"][:] = g.uniform(0.5, 1.5, c)
        self.layer.params["bias"][:] = g.normal(size=c)


class OnlineNormForwardTrain(_OnlineNormData):
    """Normalization with the carried statistics and their update, sample by sample.

    Every call advances the carried state; its values do not change the cost.
    """

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)

    def time_forward(self, shape, dtype):
        self.layer.forward(self.x)

    def peakmem_forward(self, shape, dtype):
        self.layer.forward(self.x)


class OnlineNormForwardBackwardTrain(_OnlineNormData):
    """One training step: forward, then the backward with the u, v control process."""

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.step()

    def step(self):
        self.layer.forward(self.x)
        return self.layer.backward(self.dy)

    def time_forward_backward(self, shape, dtype):
        self.step()

    def peakmem_forward_backward(self, shape, dtype):
        self.step()


class OnlineNormForwardEval(_OnlineNormData):
    """Normalization with the carried statistics, which stay as they are."""

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)  # gives the carried statistics non-default values
        self.layer.eval()
        self.layer.forward(self.x)

    def time_forward(self, shape, dtype):
        self.layer.forward(self.x)


class OnlineNormThroughput(_OnlineNormData):
    """Training steps (forward + backward) as channel-samples per second.

    One channel-sample is one step of the per-channel recurrences of SPEC §5: one
    sample of one channel, that is one value for (N, C) input and L values at once for
    (N, C, L) input.  A step of forward and backward processes N·C of them.  Higher is
    better.
    """

    unit = "channel-samples/s"

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.steps = shape[0] * shape[1]
        self.step()

    def step(self):
        self.layer.forward(self.x)
        return self.layer.backward(self.dy)

    def track_channel_samples_per_second(self, shape, dtype):
        return self.steps / median_time(self.step)


class OnlineNormBound(_OnlineNormData):
    """Fraction of the memory-traffic bound (SPEC §7): forward 2 passes, backward 3.

    Timed through :mod:`streamnorm.functional` from a fixed state, so that only the
    kernels and their checks are measured.  The forward reads ``x`` and writes ``y``;
    the backward reads ``dy`` and ``x`` and writes ``dx``: it replays the forward's
    statistics from the state before the call instead of storing them.
    """

    unit = "fraction of bound"

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        c = shape[1]
        self.w = self.layer.params["weight"]
        self.b = self.layer.params["bias"]
        self.mu = np.zeros(c)
        self.var = np.ones(c)
        self.u = np.zeros(c)
        self.v = np.zeros(c)
        *_, self.cache = self.forward()
        self.backward()

    def forward(self):
        return F.online_norm_forward(self.x, self.mu, self.var, self.w, self.b)

    def backward(self):
        return F.online_norm_backward(self.dy, self.cache, self.u, self.v)

    def track_forward(self, shape, dtype):
        return fraction_of_bound(self.forward, self.x.nbytes, "online_forward")

    def track_backward(self, shape, dtype):
        return fraction_of_bound(self.backward, self.x.nbytes, "online_backward")
