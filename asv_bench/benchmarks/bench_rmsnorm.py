"""RMSNorm over the last axis: forward, forward + backward (SPEC §4)."""

from __future__ import annotations

import numpy as np

from streamnorm import RMSNorm
from streamnorm import functional as F

from .common import DTYPES, fraction_of_bound, normal

# The shapes of bench_layernorm.py, so the two row-wise layers compare directly:
# a transformer activation, many short rows, few long rows.
# Sizes in float32: 24, 16 and 32 MiB (twice that in float64).
SHAPES = [(16, 512, 768), (65536, 64), (1024, 8192)]


class _RMSNormData:
    params = [SHAPES, DTYPES]
    param_names = ["shape", "dtype"]

    def make(self, shape, dtype):
        d = shape[-1]
        self.x = normal(shape, dtype, loc=-1.0, scale=3.0, stream=0)
        self.dy = normal(shape, dtype, stream=1)
        g = np.random.default_rng(7)
        self.layer = RMSNorm(d)
        self.layer.params["weight"][:] = g.uniform(0.5, 1.5, d)


class RMSNormForward(_RMSNormData):
    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)

    def time_forward(self, shape, dtype):
        self.layer.forward(self.x)

    def peakmem_forward(self, shape, dtype):
        self.layer.forward(self.x)


class RMSNormForwardBackward(_RMSNormData):
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


class RMSNormBound(_RMSNormData):
    """Fraction of the memory-traffic bound (SPEC §7): forward 2 passes, backward 3.

    RMSNorm skips the mean, but its traffic is LayerNorm's: read the row, write the
    output; in the backward read ``dy`` and ``x``, write ``dx``.
    """

    unit = "fraction of bound"

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.d = shape[-1]
        self.w = self.layer.params["weight"]
        _, self.cache = self.forward()
        self.backward()

    def forward(self):
        return F.rms_norm_forward(self.x, self.d, self.w)

    def backward(self):
        return F.rms_norm_backward(self.dy, self.cache)

    def track_forward(self, shape, dtype):
        return fraction_of_bound(self.forward, self.x.nbytes, "rms_forward")

    def track_backward(self, shape, dtype):
        return fraction_of_bound(self.backward, self.x.nbytes, "rms_backward")
