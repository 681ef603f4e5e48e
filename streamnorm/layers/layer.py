"""LayerNorm (and, with the same row-wise kernels, RMSNorm)."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .._validation import check_positive_float
from .base import Layer


class LayerNorm(Layer):
    """Layer normalization over the trailing ``normalized_shape`` dimensions (docs/layers).

    Parameters
    ----------
    normalized_shape : int or tuple of int
        D, the trailing dimensions normalized together.
    eps : float
        Added to the variance under the square root.
    elementwise_affine : bool
        Learnable ``weight`` (γ, ones, shape D).
    bias : bool
        Learnable ``bias`` (β, zeros, shape D), with ``elementwise_affine``.

    Notes
    -----
    Input (*B, *D), float32 or float64; output of the same shape and dtype.  LayerNorm
    has no running statistics, so train and eval mode compute the same thing.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        super().__init__()
        self.normalized_shape = F._norm_shape(normalized_shape)
        self.eps = check_positive_float(eps, "eps")
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.params["weight"] = np.ones(self.normalized_shape)
            if bias:
                self.params["bias"] = np.zeros(self.normalized_shape)
        self.zero_grad()

    def forward(self, x):
        """Normalize each row of D values; returns y of x's shape and dtype."""
        x = self._input(x)
        y, self._cache = F.layer_norm_forward(
            x, self.normalized_shape, self.params.get("weight"), self.params.get("bias"), self.eps,
            out=self._spare_out(x),
        )
        self._keep_out(y)
        return y

    def backward(self, dy):
        """Input gradient; fills ``grads`` (overwriting)."""
        cache = self._require_cache()
        dx, dw, db = F.layer_norm_backward(dy, cache, out=self._spare_grad(dy))
        self._keep_out(dx, "dx")
        self._set_grads(weight=dw, bias=db)
        return dx

    def __repr__(self) -> str:
        return (
            f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={'bias' in self.params})"
        )


class RMSNorm(Layer):
    """RMS normalization over the trailing ``normalized_shape`` dimensions (docs/layers).

    ``y = γ ⊙ x / sqrt(mean(x²) + eps)``: no centering, no bias.

    Parameters
    ----------
    normalized_shape : int or tuple of int
    eps : float or None
        None means ``np.finfo(x.dtype).eps`` of each input, as PyTorch does.
    elementwise_affine : bool
        Learnable ``weight`` (γ, ones, shape D).

    Notes
    -----
    Input (*B, *D), float32 or float64; output of the same shape and dtype.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True):
        super().__init__()
        self.normalized_shape = F._norm_shape(normalized_shape)
        self.eps = None if eps is None else check_positive_float(eps, "eps")
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.params["weight"] = np.ones(self.normalized_shape)
        self.zero_grad()

    def forward(self, x):
        """Normalize each row of D values by its root mean square."""
        x = self._input(x)
        y, self._cache = F.rms_norm_forward(
            x, self.normalized_shape, self.params.get("weight"), self.eps, out=self._spare_out(x)
        )
        self._keep_out(y)
        return y

    def backward(self, dy):
        """Input gradient; fills ``grads`` (overwriting)."""
        cache = self._require_cache()
        dx, dw = F.rms_norm_backward(dy, cache, out=self._spare_grad(dy))
        self._keep_out(dx, "dx")
        self._set_grads(weight=dw)
        return dx

    def __repr__(self) -> str:
        return f"RMSNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine})"
