"""GroupNorm and InstanceNorm: forward, forward + backward (docs/layers).

Both run the same kernels on the (N·G, (C/G)·L) view; InstanceNorm is GroupNorm with
G = C, so it has many short blocks where GroupNorm has few long ones.
"""

from __future__ import annotations

from streamnorm import GroupNorm, InstanceNorm
from streamnorm import functional as F

from .common import DTYPES, Bound, Forward, ForwardBackward, LayerBench, set_affine, sized

# (N, C, H, W) feature maps.  Sizes in float32: 8, 24.5 and 32 MiB (twice that in
# float64); on the small grid 128 KiB.
SHAPES = sized([(32, 64, 32, 32), (16, 128, 56, 56), (8, 256, 64, 64)], [(8, 64, 8, 8)])
# The usual choice of the GroupNorm paper: 32 groups whatever C is.
GROUPS = 32


class _GroupNormData(LayerBench):
    params = [SHAPES, DTYPES]
    x_loc, x_scale = 0.5, 2.0

    def new_layer(self, shape):
        return set_affine(GroupNorm(GROUPS, shape[1]), seed=11)


class GroupNormForward(_GroupNormData, Forward):
    pass


class GroupNormForwardBackward(_GroupNormData, ForwardBackward):
    pass


class GroupNormBound(_GroupNormData, Bound):
    """Fraction of the memory-traffic bound (docs/math.rst): forward 2 passes, backward 3.

    A (sample, group) block of (C/G)·L values stays in cache between its statistics
    and its output, as a LayerNorm row does.
    """

    forward_op, backward_op = "gn_forward", "gn_backward"

    def forward(self):
        return F.group_norm_forward(self.x, GROUPS, self.w, self.b)

    def backward(self):
        return F.group_norm_backward(self.dy, self.cache)


class _InstanceNormData(LayerBench):
    params = [SHAPES, DTYPES]
    x_loc, x_scale = 0.5, 2.0

    def new_layer(self, shape):
        # affine is off by default, as in PyTorch; switched on here so that the
        # per-channel scale is part of what is timed.
        return set_affine(InstanceNorm(shape[1], affine=True), seed=13)


class InstanceNormForward(_InstanceNormData, Forward):
    """Instance statistics (train mode, no running statistics)."""


class InstanceNormForwardBackward(_InstanceNormData, ForwardBackward):
    pass


class InstanceNormBound(_InstanceNormData, Bound):
    """Fraction of the memory-traffic bound (docs/math.rst): forward 2 passes, backward 3.

    One block is one channel of one sample (L values), the shortest blocks the
    GroupNorm kernels see.
    """

    forward_op, backward_op = "gn_forward", "gn_backward"

    def forward(self):
        return F.instance_norm_forward(self.x, self.w, self.b)

    def backward(self):
        return F.instance_norm_backward(self.dy, self.cache)
