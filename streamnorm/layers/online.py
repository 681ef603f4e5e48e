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
        Added to the variance under the square root.
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
    updates nothing.  Input (N, C, *S), float32 or float64; the output has the input's
    dtype; parameters, gradients and buffers are float64 of shape (C,).

    Examples
    --------
    The batch axis is time, so a stream fed one sample at a time gives what the same
    samples give as one batch:

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> rng = np.random.default_rng(0)
    >>> stream = rng.normal(5.0, 2.0, size=(500, 3))
    >>> one, whole = sn.OnlineNorm(3, alpha_fwd=0.99), sn.OnlineNorm(3, alpha_fwd=0.99)
    >>> y_one = np.concatenate([one(stream[t : t + 1]) for t in range(500)])
    >>> np.allclose(y_one, whole(stream))
    True
    >>> one.buffers["mu"].round(0), np.sqrt(one.buffers["var"]).round(0)
    (array([5., 5., 5.]), array([2., 2., 2.]))

    A training step: ``backward`` fills ``grads`` and carries ``u``, ``v``:

    >>> dx = one.backward(np.ones((1, 3)))
    >>> dx.shape, one.grads["bias"], bool(np.any(one.buffers["u"] != 0))
    ((1, 3), array([1., 1., 1.]), True)
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
        """Restore the initial statistics and control state (``mu=0, var=1, u=v=0``).

        Returns
        -------
        self

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> on = sn.OnlineNorm(2, alpha_fwd=0.5)
        >>> _ = on(np.array([[1.0, 2.0], [3.0, 4.0]]))
        >>> on.buffers["mu"]
        array([1.75, 2.5 ])
        >>> on.reset().buffers
        {'mu': array([0., 0.]), 'var': array([1., 1.]), 'u': array([0., 0.]), 'v': array([0., 0.])}
        """
        C = self.num_features
        self.buffers = {"mu": np.zeros(C), "var": np.ones(C), "u": np.zeros(C), "v": np.zeros(C)}
        if self.device == "cuda":
            self.buffers = {k: _backend.to_device(v, self._like) for k, v in self.buffers.items()}
        self._cache = None
        return self

    def forward(self, x):
        """Normalize the samples of ``x`` in order, each with the statistics carried so far.

        Parameters
        ----------
        x : ndarray, shape (N, C, *S)
            N samples in time order; float32 or float64 (integers are cast to float64).

        Returns
        -------
        y : ndarray, the shape and dtype of ``x``

        Examples
        --------
        Train mode updates ``mu`` and ``var`` (here with a fast decay, 0.5); eval mode
        uses them and updates nothing:

        >>> import numpy as np
        >>> import streamnorm as sn
        >>> on = sn.OnlineNorm(2, alpha_fwd=0.5)
        >>> x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> on(x).round(4)
        array([[1.    , 2.    ],
               [2.8867, 2.4495],
               [2.3349, 2.0207]])
        >>> on.buffers["mu"], on.buffers["var"]
        (array([3.375, 4.25 ]), array([3.609375, 4.5625  ]))
        >>> y = on.eval()(x)
        >>> np.allclose(y, (x - [3.375, 4.25]) / np.sqrt([3.609375 + 1e-5, 4.5625 + 1e-5]))
        True
        >>> on.buffers["mu"]
        array([3.375, 4.25 ])
        """
        x = self._input(x)
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"OnlineNorm has {self.num_features} channels; input of shape {x.shape} does not match")
        y, mu, var, cache = F.online_norm_forward(
            x, self.buffers["mu"], self.buffers["var"], self.params.get("weight"), self.params.get("bias"),
            alpha_fwd=self.alpha_fwd, eps=self.eps, training=self.training, ecm=self.ecm, out=self._spare_out(x),
        )
        self._keep_out(y)
        if self.training:
            self.buffers["mu"] = self._own(mu, self.buffers["mu"])
            self.buffers["var"] = self._own(var, self.buffers["var"])
        self._cache = cache
        return y

    def backward(self, dy):
        """Input gradient; fills ``grads`` (overwriting) and, in train mode, advances u, v.

        Parameters
        ----------
        dy : ndarray, the shape of the last forward's input
            float32 or float64.

        Returns
        -------
        dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
            With ``affine``, ``grads['weight']`` and ``grads['bias']`` are set to
            float64 (C,) arrays.

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> on = sn.OnlineNorm(2, alpha_fwd=0.5, alpha_bkw=0.5)
        >>> y = on(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        >>> on.backward(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])).round(4)
        array([[ 1.    ,  0.    ],
               [-2.1666,  0.8165],
               [ 3.9576, -1.2598]])
        >>> on.grads["bias"], on.buffers["u"].round(4)
        (array([2., 2.]), array([ 2.7909, -0.4433]))
        """
        cache = self._require_cache()
        dx, dw, db, u, v = F.online_norm_backward(
            dy, cache, self.buffers["u"], self.buffers["v"], alpha_bkw=self.alpha_bkw, out=self._spare_grad(dy)
        )
        self._keep_out(dx, "dx")
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
