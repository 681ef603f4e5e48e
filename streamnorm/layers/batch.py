"""BatchNorm and its dimension-checking aliases."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .._validation import as_float_array, check_positive_float
from .base import Layer


class BatchNorm(Layer):
    """Batch normalization (SPEC §3) with PyTorch's module semantics.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance under the square root.
    momentum : float or None
        Weight of the new batch in the running statistics (PyTorch's convention:
        ``running ← (1 − momentum)·running + momentum·batch``).  ``None`` gives the
        cumulative average ``1 / num_batches_tracked``.
    affine : bool
        Learnable ``weight`` (γ, ones) and ``bias`` (β, zeros) of shape (C,).
    track_running_stats : bool
        Keep ``running_mean``, ``running_var`` (unbiased, as PyTorch stores it) and
        ``num_batches_tracked``.  Without them eval mode uses batch statistics too.
    axis : int
        The channel axis: 1 for (N, C, *S) input, -1 for channels-last (N, *S, C).

    Notes
    -----
    Input: float32 or float64 (integers are cast to float64), any memory layout.  The
    output has the input's dtype; statistics, parameters and gradients are float64.
    C-contiguous input is never copied; other layouts are read in place where the
    channel axis is last (the (M, C) kernels take any strides) and copied once into the
    contiguous (N, C, L) view otherwise.

    Train mode needs more than one value per channel and says so otherwise.  A forward
    that raises leaves the running statistics untouched.
    """

    _ndims: tuple[int, ...] | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
    ) -> None:
        super().__init__()
        if int(num_features) != num_features or num_features <= 0:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if momentum is not None and not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features = int(num_features)
        self.eps = check_positive_float(eps, "eps")
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        C = self.num_features
        if self.affine:
            self.params = {"weight": np.ones(C), "bias": np.zeros(C)}
            self.zero_grad()
        if self.track_running_stats:
            self.buffers = {
                "running_mean": np.zeros(C),
                "running_var": np.ones(C),
                "num_batches_tracked": np.array(0, dtype=np.int64),
            }

    # ------------------------------------------------------------------ checks
    def _check_input(self, x) -> np.ndarray:
        x = as_float_array(x)
        if self._ndims is not None and x.ndim not in self._ndims:
            want = " or ".join(str(d) for d in self._ndims)
            raise ValueError(f"{type(self).__name__} expects {want}-dimensional input, got shape {x.shape}")
        if x.ndim < 2:
            raise ValueError(f"{type(self).__name__} expects input of shape (N, C, ...), got {x.shape}")
        if not -x.ndim <= self.axis < x.ndim or self.axis % x.ndim == 0:
            raise ValueError(f"channel axis {self.axis} is not valid for input of shape {x.shape}")
        if x.shape[self.axis] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} has {self.num_features} channels, but the input has "
                f"{x.shape[self.axis]} along axis {self.axis} (shape {x.shape})"
            )
        return x

    @property
    def running_mean(self) -> np.ndarray | None:
        return self.buffers.get("running_mean")

    @property
    def running_var(self) -> np.ndarray | None:
        return self.buffers.get("running_var")

    @property
    def num_batches_tracked(self) -> int:
        return int(self.buffers["num_batches_tracked"]) if "num_batches_tracked" in self.buffers else 0

    def _wb(self):
        return self.params.get("weight"), self.params.get("bias")

    # ----------------------------------------------------------------- forward
    def forward(self, x):
        """Normalize ``x`` (N, C, *S) (or channels-last); returns y of x's shape and dtype."""
        x = self._check_input(x)
        w, b = self._wb()
        if self.training or not self.track_running_stats:
            y, cache = F.batch_norm_forward(x, w, b, eps=self.eps, axis=self.axis)
            if self.training and self.track_running_stats:
                self._update_running(cache.mean, cache.var, cache.count)
        else:
            y, cache = F.batch_norm_forward(
                x, w, b, mean=self.running_mean, var=self.running_var, eps=self.eps, axis=self.axis
            )
        self._cache = cache
        return y

    def _update_running(self, mean: np.ndarray, var: np.ndarray, count: int) -> None:
        """PyTorch's running-statistics rule; the unbiased batch variance is stored."""
        nbt = self.num_batches_tracked + 1
        f = 1.0 / nbt if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1))
        rm = (1.0 - f) * self.buffers["running_mean"] + f * mean
        rv = (1.0 - f) * self.buffers["running_var"] + f * unbiased
        self.buffers["running_mean"] = rm
        self.buffers["running_var"] = rv
        self.buffers["num_batches_tracked"] = np.array(nbt, dtype=np.int64)

    # ---------------------------------------------------------------- backward
    def backward(self, dy):
        """Gradient of the loss with respect to the input; fills ``grads`` (overwriting).

        The mode is the one of the last forward: train-mode batch statistics give the
        full backward of SPEC §3, running statistics give ``dx = γ·r·dy``.
        """
        cache = self._require_cache()
        dx, dw, db = F.batch_norm_backward(dy, cache)
        self._set_grads(weight=dw, bias=db)
        return dx

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, axis={self.axis})"
        )


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for (N, C) or (N, C, L) input."""

    _ndims = (2, 3)


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for (N, C, H, W) input."""

    _ndims = (4,)


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for (N, C, D, H, W) input."""

    _ndims = (5,)
