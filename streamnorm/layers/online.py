"""Online Normalization (Chiley et al., NeurIPS 2019)."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import _backend
from .._validation import check_positive_float
from .base import Layer, affine_params, check_num_features


class OnlineNorm(Layer):
    """Online Normalization: batch-size-independent normalization with carried statistics.

    The batch axis is time.  Each sample is normalized with per-channel statistics
    ``mu``, ``var`` carried from the samples before it (exponential decay
    ``alpha_fwd``); the backward carries control variables ``u``, ``v`` (decay
    ``alpha_bkw``) that remove the gradient components the normalization would remove
    with exact batch statistics (docs/layers/onlinenorm.rst).  A batch of one sample is fine.

    Parameters
    ----------
    num_features : int
        C.
    alpha_fwd, alpha_bkw : float in [0, 1)
        Forward and backward decay factors (defaults 0.999 and 0.99).
    eps : float
    affine : bool
        Learnable per-channel ``weight`` and ``bias``.
    ecm : {None, 'ac', 'ls'}
        Error compensation: activation clamping at ±5 or layer scaling.

    Attributes
    ----------
    buffers : dict
        ``mu``, ``var`` (start 0 and 1) and ``u``, ``v`` (start 0), float64 (C,).

    Notes
    -----
    Train mode updates ``mu``/``var`` in ``forward`` and ``u``/``v`` in ``backward``,
    sample by sample in order; eval mode normalizes with the carried statistics and
    updates nothing.  Input (N, C, *S), float32 or float64.
    """

    def __init__(
        self,
        num_features: int,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        ecm: str | None = None,
    ):
        super().__init__()
        num_features = check_num_features(num_features)
        for name, a in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not 0.0 <= float(a) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {a!r}")
        if ecm not in (None, "ac", "ls"):
            raise ValueError(f"ecm must be None, 'ac' or 'ls', got {ecm!r}")
        self.num_features = int(num_features)
        self.alpha_fwd = float(alpha_fwd)
        self.alpha_bkw = float(alpha_bkw)
        self.eps = check_positive_float(eps, "eps")
        self.affine = bool(affine)
        self.ecm = ecm
        if self.affine:
            self.params = affine_params(num_features)
        self.zero_grad()
        self.reset()

    def reset(self) -> "OnlineNorm":
        """Restore the initial statistics and control state (``mu=0, var=1, u=v=0``)."""
        C = self.num_features
        self.buffers = {"mu": np.zeros(C), "var": np.ones(C), "u": np.zeros(C), "v": np.zeros(C)}
        if self.device == "cuda":
            self.buffers = {k: _backend.to_device(v, self._like) for k, v in self.buffers.items()}
        self._cache = None
        return self

    def forward(self, x):
        x = self._input(x)
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"OnlineNorm has {self.num_features} channels; input of shape {x.shape} does not match")
        y, mu, var, cache = F.online_norm_forward(
            x, self.buffers["mu"], self.buffers["var"], self.params.get("weight"), self.params.get("bias"),
            alpha_fwd=self.alpha_fwd, eps=self.eps, training=self.training, ecm=self.ecm,
        )
        if self.training:
            self.buffers["mu"] = self._own(mu, self.buffers["mu"])
            self.buffers["var"] = self._own(var, self.buffers["var"])
        self._cache = cache
        return y

    def backward(self, dy):
        """Input gradient; fills ``grads`` (overwriting) and, in train mode, advances u, v."""
        cache = self._require_cache()
        dx, dw, db, u, v = F.online_norm_backward(dy, cache, self.buffers["u"], self.buffers["v"], alpha_bkw=self.alpha_bkw)
        if cache.training:
            self.buffers["u"] = self._own(u, self.buffers["u"])
            self.buffers["v"] = self._own(v, self.buffers["v"])
        self._set_grads(weight=dw, bias=db)
        return dx

    def __repr__(self) -> str:
        return (
            f"OnlineNorm({self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"eps={self.eps}, affine={self.affine}, ecm={self.ecm!r})"
        )
