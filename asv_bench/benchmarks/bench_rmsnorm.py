"""RMSNorm over the last axis: forward, forward + backward (docs/layers)."""

from __future__ import annotations

from streamnorm import RMSNorm
from streamnorm import functional as F

from .common import DTYPES, Bound, Forward, ForwardBackward, LayerBench, set_affine, sized

# The shapes of bench_layernorm.py, so the two row-wise layers compare directly:
# a transformer activation, many short rows, few long rows.
# Sizes in float32: 24, 16 and 32 MiB (twice that in float64); on the small grid 384 KiB.
SHAPES = sized([(16, 512, 768), (65536, 64), (1024, 8192)], [(8, 16, 768)])


class _RMSNormData(LayerBench):
    params = [SHAPES, DTYPES]
    x_loc, x_scale = -1.0, 3.0

    def new_layer(self, shape):
        return set_affine(RMSNorm(shape[-1]), seed=7)  # weight only: RMSNorm has no bias


class RMSNormForward(_RMSNormData, Forward):
    pass


class RMSNormForwardBackward(_RMSNormData, ForwardBackward):
    pass


class RMSNormBound(_RMSNormData, Bound):
    """Fraction of the memory-traffic bound (docs/math.rst): forward 2 passes, backward 3.

    RMSNorm skips the mean, but its traffic is LayerNorm's: read the row, write the
    output; in the backward read ``dy`` and ``x``, write ``dx``.
    """

    forward_op, backward_op = "rms_forward", "rms_backward"

    def setup(self, shape, dtype):
        self.d = shape[-1]
        super().setup(shape, dtype)

    def forward(self):
        return F.rms_norm_forward(self.x, self.d, self.w)

    def backward(self):
        return F.rms_norm_backward(self.dy, self.cache)
