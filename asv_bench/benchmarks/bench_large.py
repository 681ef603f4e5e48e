"""Inputs of 256 MiB: BatchNorm train forward, LayerNorm forward and OnlineNorm train
forward (float32).

The sizes of ``python -m streamnorm bench`` and of the measured table in
docs/benchmarks.rst, far larger than any cache.  Each case takes a few seconds to set
up and about half a GiB of memory per process, so every class name here ends in
``Large``: ``asv run -b '^(?!.*Large)'`` runs the suite without them (see
docs/benchmarks.rst).

The input is drawn once per run in ``setup_cache`` and read back from an ``.npy`` file
by each ``setup`` (:func:`common.save_normal`), so that the ``peakmem_`` benchmarks
show the input, the output and what the layer keeps, not the drawing of the data.
"""

from __future__ import annotations

import numpy as np

from streamnorm import BatchNorm, LayerNorm, OnlineNorm

from .common import SMALL, save_normal, set_affine

DTYPE = "float32"
# 64·64·128·128 and 65536·1024 values: 256 MiB each in float32.  The small grid
# (common.py) keeps the layouts at 256 KiB and 1 MiB, so that a quick run still goes
# through this file's setup_cache and .npy round trip.
BN_SHAPE = (4, 64, 16, 16) if SMALL else (64, 64, 128, 128)
LN_SHAPE = (256, 1024) if SMALL else (65536, 1024)


class _Large:
    param_names = ["shape"]
    # One call takes tens of milliseconds: a few samples in a single round are
    # enough, and setup has already made the warm-up call.
    number = 1
    repeat = 7
    rounds = 1
    warmup_time = 0
    timeout = 300

    def setup(self, path, shape):
        self.x = np.load(path)
        self.layer = self.new_layer(shape)
        self.layer.forward(self.x)

    def time_forward(self, path, shape):
        self.layer.forward(self.x)

    def peakmem_forward(self, path, shape):
        self.layer.forward(self.x)


class BatchNormForwardTrainLarge(_Large):
    """Batch statistics, normalization and the running-statistics update of an
    ``(N, C, H, W)`` feature map (as bench_batchnorm.py, 256 MiB)."""

    params = [[BN_SHAPE]]

    def setup_cache(self):
        return save_normal("batchnorm_large.npy", BN_SHAPE, DTYPE, loc=0.5, scale=2.0)

    def new_layer(self, shape):
        return set_affine(BatchNorm(shape[1]), seed=3)


class LayerNormForwardLarge(_Large):
    """LayerNorm over rows of 1024 (as bench_layernorm.py, 256 MiB)."""

    params = [[LN_SHAPE]]

    def setup_cache(self):
        return save_normal("layernorm_large.npy", LN_SHAPE, DTYPE, loc=-1.0, scale=3.0)

    def new_layer(self, shape):
        return set_affine(LayerNorm(shape[-1]), seed=5)


class OnlineNormForwardTrainLarge(_Large):
    """OnlineNorm train forward of an ``(N, C, H, W)`` feature map, sample after sample
    (as bench_online.py, 256 MiB)."""

    params = [[BN_SHAPE]]

    def setup_cache(self):
        return save_normal("onlinenorm_large.npy", BN_SHAPE, DTYPE, loc=0.5, scale=2.0)

    def new_layer(self, shape):
        return set_affine(OnlineNorm(shape[1]), seed=7)
