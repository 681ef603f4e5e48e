"""BatchNorm: train forward, train forward + backward, eval forward (docs/math.rst)."""

from __future__ import annotations

from streamnorm import BatchNorm
from streamnorm import functional as F

from .common import (
    DTYPES,
    Forward,
    ForwardBackward,
    ForwardEval,
    LayerBench,
    fraction_of_bound,
    set_affine,
    sized,
)

# (N, C) runs the channels-last kernels on an (M, C) view; (N, C, H, W) the (N, C, L)
# kernels.  Sizes in float32: 16, 8 and 25 MiB (twice that in float64); on the small
# grid 256 and 128 KiB.
SHAPES = sized(
    [(65536, 64), (32, 64, 32, 32), (16, 128, 56, 56)],
    [(1024, 64), (8, 64, 8, 8)],
)


class _BatchNormData(LayerBench):
    params = [SHAPES, DTYPES]
    x_loc, x_scale = 0.5, 2.0

    def new_layer(self, shape):
        return set_affine(BatchNorm(shape[1]), seed=3)


class BatchNormForwardTrain(_BatchNormData, Forward):
    """Batch statistics, normalization and the running-statistics update."""


class BatchNormForwardBackwardTrain(_BatchNormData, ForwardBackward):
    """One training step's worth of BatchNorm: forward, then the full backward."""


class BatchNormForwardEval(_BatchNormData, ForwardEval):
    """Normalization with the running statistics: no reduction at all."""


class BatchNormBound(_BatchNormData):
    """Fraction of the memory-traffic bound of each kernel (docs/math.rst).

    Timed through :mod:`streamnorm.functional`, so that only the kernels and their
    shape checks are measured.  Passes over the data: train forward 3, eval forward 2,
    train backward 5.
    """

    unit = "fraction of bound"

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.w = self.layer.params["weight"]
        self.b = self.layer.params["bias"]
        _, self.cache = F.batch_norm_forward(self.x, self.w, self.b)
        self.mean = self.cache.mean
        self.var = self.cache.var * 1.1
        self.forward_train()
        self.forward_eval()
        self.backward_train()

    def forward_train(self):
        return F.batch_norm_forward(self.x, self.w, self.b)

    def forward_eval(self):
        return F.batch_norm_forward(self.x, self.w, self.b, mean=self.mean, var=self.var)

    def backward_train(self):
        return F.batch_norm_backward(self.dy, self.cache)

    def track_forward_train(self, shape, dtype):
        return fraction_of_bound(self.forward_train, self.x.nbytes, "bn_forward_train")

    def track_forward_eval(self, shape, dtype):
        return fraction_of_bound(self.forward_eval, self.x.nbytes, "bn_forward_eval")

    def track_backward_train(self, shape, dtype):
        return fraction_of_bound(self.backward_train, self.x.nbytes, "bn_backward_train")
