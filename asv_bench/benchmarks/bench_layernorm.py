"""LayerNorm over the last axis: forward, forward + backward (docs/layers)."""

from __future__ import annotations

from streamnorm import LayerNorm
from streamnorm import functional as F

from .common import DTYPES, Bound, Forward, ForwardBackward, LayerBench, set_affine, sized

# (*B, D): a transformer activation, many short rows, few long rows.
# Sizes in float32: 24, 16 and 32 MiB (twice that in float64).  Every shape runs the
# same kernels on the (rows, D) view: the small grid keeps a small activation, 384 KiB.
SHAPES = sized([(16, 512, 768), (65536, 64), (1024, 8192)], [(8, 16, 768)])


class _LayerNormData(LayerBench):
    params = [SHAPES, DTYPES]
    x_loc, x_scale = -1.0, 3.0

    def new_layer(self, shape):
        return set_affine(LayerNorm(shape[-1]), seed=5)


class LayerNormForward(_LayerNormData, Forward):
    pass


class LayerNormForwardBackward(_LayerNormData, ForwardBackward):
    pass


class LayerNormBound(_LayerNormData, Bound):
    """Fraction of the memory-traffic bound (docs/math.rst): forward 2 passes, backward 3.

    A row is small enough to stay in cache between the statistics and the output, which
    is why the forward needs only two passes over memory where BatchNorm needs three.
    """

    forward_op, backward_op = "ln_forward", "ln_backward"

    def setup(self, shape, dtype):
        self.d = shape[-1]
        super().setup(shape, dtype)

    def forward(self):
        return F.layer_norm_forward(self.x, self.d, self.w, self.b)

    def backward(self):
        return F.layer_norm_backward(self.dy, self.cache)
