"""GroupNorm and InstanceNorm: forward, forward + backward (SPEC §4).

Both run the same kernels on the (N·G, (C/G)·L) view; InstanceNorm is GroupNorm with
G = C, so it has many short blocks where GroupNorm has few long ones.
"""

from __future__ import annotations

import numpy as np

from streamnorm import GroupNorm, InstanceNorm
from streamnorm import functional as F

from .common import DTYPES, fraction_of_bound, normal

# (N, C, H, W) feature maps.  Sizes in float32: 8, 24.5 and 32 MiB (twice that in
# float64).
SHAPES = [(32, 64, 32, 32), (16, 128, 56, 56), (8, 256, 64, 64)]
# The usual choice of the GroupNorm paper: 32 groups whatever C is.
GROUPS = 32


def _affine(layer, c, seed):
    """Non-trivial affine parameters, so no multiplication by one is timed."""
    g = np.random.default_rng(seed)
    layer.params["weight"][:] = g.uniform(0.5, 1.5, c)
    layer.params["bias"][:] = g.normal(size=c)


class _GroupNormData:
    params = [SHAPES, DTYPES]
    param_names = ["shape", "dtype"]

    def make(self, shape, dtype):
        c = shape[1]
        self.x = normal(shape, dtype, loc=0.5, scale=2.0, stream=0)
        self.dy = normal(shape, dtype, stream=1)
        self.layer = GroupNorm(GROUPS, c)
        _affine(self.layer, c, 11)


class GroupNormForward(_GroupNormData):
    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)

    def time_forward(self, shape, dtype):
        self.layer.forward(self.x)

    def peakmem_forward(self, shape, dtype):
        self.layer.forward(self.x)


class GroupNormForwardBackward(_GroupNormData):
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


class GroupNormBound(_GroupNormData):
    """Fraction of the memory-traffic bound (SPEC §7): forward 2 passes, backward 3.

    A (sample, group) block of (C/G)·L values stays in cache between its statistics
    and its output, as a LayerNorm row does.
    """

    unit = "fraction of bound"

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.w = self.layer.params["weight"]
        self.b = self.layer.params["bias"]
        _, self.cache = self.forward()
        self.backward()

    def forward(self):
        return F.group_norm_forward(self.x, GROUPS, self.w, self.b)

    def backward(self):
        return F.group_norm_backward(self.dy, self.cache)

    def track_forward(self, shape, dtype):
        return fraction_of_bound(self.forward, self.x.nbytes, "gn_forward")

    def track_backward(self, shape, dtype):
        return fraction_of_bound(self.backward, self.x.nbytes, "gn_backward")


class _InstanceNormData:
    params = [SHAPES, DTYPES]
    param_names = ["shape", "dtype"]

    def make(self, shape, dtype):
        c = shape[1]
        self.x = normal(shape, dtype, loc=0.5, scale=2.0, stream=0)
        self.dy = normal(shape, dtype, stream=1)
        # affine is off by default, as in PyTorch; switched on here so that the
        # per-channel scale is part of what is timed.
        self.layer = InstanceNorm(c, affine=True)
        _affine(self.layer, c, 13)


class InstanceNormForward(_InstanceNormData):
    """Instance statistics (train mode, no running statistics)."""

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)

    def time_forward(self, shape, dtype):
        self.layer.forward(self.x)

    def peakmem_forward(self, shape, dtype):
        self.layer.forward(self.x)


class InstanceNormForwardBackward(_InstanceNormData):
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


class InstanceNormBound(_InstanceNormData):
    """Fraction of the memory-traffic bound (SPEC §7): forward 2 passes, backward 3.

    One block is one channel of one sample (L values), the shortest blocks the
    GroupNorm kernels see.
    """

    unit = "fraction of bound"

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.w = self.layer.params["weight"]
        self.b = self.layer.params["bias"]
        _, self.cache = self.forward()
        self.backward()

    def forward(self):
        return F.instance_norm_forward(self.x, self.w, self.b)

    def backward(self):
        return F.instance_norm_backward(self.dy, self.cache)

    def track_forward(self, shape, dtype):
        return fraction_of_bound(self.forward, self.x.nbytes, "gn_forward")

    def track_backward(self, shape, dtype):
        return fraction_of_bound(self.backward, self.x.nbytes, "gn_backward")
