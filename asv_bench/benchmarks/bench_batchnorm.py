"""BatchNorm: train forward, train forward + backward, eval forward (SPEC §3)."""

from __future__ import annotations

import numpy as np

from streamnorm import BatchNorm
from streamnorm import functional as F

from .common import DTYPES, fraction_of_bound, normal

# (N, C) runs the channels-last kernels on an (M, C) view; (N, C, H, W) the (N, C, L)
# kernels.  Sizes in float32: 16, 8 and 25 MiB (twice that in float64).
SHAPES = [(65536, 64), (32, 64, 32, 32), (16, 128, 56, 56)]


class _BatchNormData:
    params = [SHAPES, DTYPES]
    param_names = ["shape", "dtype"]

    def make(self, shape, dtype):
        c = shape[1]
        self.x = normal(shape, dtype, loc=0.5, scale=2.0, stream=0)
        self.dy = normal(shape, dtype, stream=1)
        g = np.random.default_rng(3)
        self.layer = BatchNorm(c)
        # Non-trivial affine parameters, so no multiplication by one is timed.
        self.layer.params["weight"][:] = g.uniform(0.5, 1.5, c)
        self.layer.params["bias"][:] = g.normal(size=c)


class BatchNormForwardTrain(_BatchNormData):
    """Batch statistics, normalization and the running-statistics update."""

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)

    def time_forward(self, shape, dtype):
        self.layer.forward(self.x)

    def peakmem_forward(self, shape, dtype):
        self.layer.forward(self.x)


class BatchNormForwardBackwardTrain(_BatchNormData):
    """One training step's worth of BatchNorm: forward, then the full backward."""

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


class BatchNormForwardEval(_BatchNormData):
    """Normalization with the running statistics: no reduction at all."""

    def setup(self, shape, dtype):
        self.make(shape, dtype)
        self.layer.forward(self.x)  # gives the running statistics non-default values
        self.layer.eval()
        self.layer.forward(self.x)

    def time_forward(self, shape, dtype):
        self.layer.forward(self.x)

    def peakmem_forward(self, shape, dtype):
        self.layer.forward(self.x)


class BatchNormBound(_BatchNormData):
    """Fraction of the memory-traffic bound of each kernel (SPEC §7).

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
