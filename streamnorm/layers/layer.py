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
    ``weight``, ``bias`` and their gradients are float64 of shape D.

    Examples
    --------
    Each row of D values is normalized on its own, whatever the batch:

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> ln = sn.LayerNorm(4)
    >>> ln(np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 10.0]])).round(4)
    array([[-1.3416, -0.4472,  0.4472,  1.3416],
           [-0.5774, -0.5774, -0.5774,  1.7321]])

    A batch of sequences (batch, time, features), with a training step's gradients:

    >>> rng = np.random.default_rng(0)
    >>> ln = sn.LayerNorm(8)
    >>> x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    >>> y = ln(x)
    >>> dx = ln.backward(np.ones_like(y))
    >>> y.dtype, dx.shape, {k: g.shape for k, g in ln.grads.items()}
    (dtype('float32'), (2, 5, 8), {'weight': (8,), 'bias': (8,)})
    >>> np.array_equal(ln.eval()(x), y)                 # eval mode: the same computation
    True
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
        """Normalize each row of D values; returns y of x's shape and dtype.

        Parameters
        ----------
        x : ndarray, shape (*B, *normalized_shape)
            float32 or float64; integers are cast to float64.

        Returns
        -------
        y : ndarray, the shape and dtype of ``x``

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> ln = sn.LayerNorm((2, 3))                       # the last two axes together
        >>> y = ln(np.arange(12.0).reshape(2, 2, 3))
        >>> y.shape, np.allclose(y.reshape(2, 6).mean(axis=1), 0)
        ((2, 2, 3), True)
        """
        x = self._input(x)
        y, self._cache = F.layer_norm_forward(
            x, self.normalized_shape, self.params.get("weight"), self.params.get("bias"), self.eps,
            out=self._spare_out(x),
        )
        self._keep_out(y)
        return y

    def backward(self, dy):
        """Input gradient; fills ``grads`` (overwriting).

        Parameters
        ----------
        dy : ndarray, the shape of the last forward's input
            float32 or float64.

        Returns
        -------
        dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
            ``grads['weight']`` and ``grads['bias']`` are set to float64 arrays of shape D.

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> rng = np.random.default_rng(0)
        >>> ln = sn.LayerNorm(6)
        >>> x, dy = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
        >>> y = ln(x)
        >>> dx = ln.backward(dy)
        >>> np.allclose(dx.sum(axis=1), 0), np.allclose(ln.grads["weight"], (dy * y).sum(axis=0))
        (True, True)
        """
        return self._backward(F.layer_norm_backward, dy)

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
        D, the trailing dimensions normalized together.
    eps : float or None
        None means ``np.finfo(x.dtype).eps`` of each input, as PyTorch does.
    elementwise_affine : bool
        Learnable ``weight`` (γ, ones, shape D).

    Notes
    -----
    Input (*B, *D), float32 or float64; output of the same shape and dtype.  No running
    statistics: train and eval mode compute the same thing.  ``weight`` and its
    gradient are float64 of shape D.

    Examples
    --------
    >>> import numpy as np
    >>> import streamnorm as sn
    >>> rms = sn.RMSNorm(4, eps=1e-6)
    >>> rms(np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 10.0]])).round(4)
    array([[0.3651, 0.7303, 1.0954, 1.4606],
           [0.378 , 0.378 , 0.378 , 1.8898]])
    >>> rms = sn.RMSNorm(16)                            # (batch, time, features)
    >>> x = np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32)
    >>> y = rms(x)
    >>> dx = rms.backward(np.ones_like(y))
    >>> y.dtype, dx.shape, rms.grads["weight"].shape, rms.grads["weight"].dtype
    (dtype('float32'), (3, 7, 16), (16,), dtype('float64'))
    >>> np.allclose(np.sqrt((y ** 2).mean(axis=-1)), 1, atol=1e-5)     # unit root mean square
    True
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
        """Normalize each row of D values by its root mean square.

        Parameters
        ----------
        x : ndarray, shape (*B, *normalized_shape)
            float32 or float64; integers are cast to float64.

        Returns
        -------
        y : ndarray, the shape and dtype of ``x``

        Examples
        --------
        With ``eps=None`` the epsilon is the machine epsilon of each input's dtype:

        >>> import numpy as np
        >>> import streamnorm as sn
        >>> rms = sn.RMSNorm(2)
        >>> y = rms(np.array([[3.0, 4.0]], dtype=np.float32))
        >>> y.dtype, y.round(4)
        (dtype('float32'), array([[0.8485, 1.1314]], dtype=float32))
        """
        x = self._input(x)
        y, self._cache = F.rms_norm_forward(
            x, self.normalized_shape, self.params.get("weight"), self.eps, out=self._spare_out(x)
        )
        self._keep_out(y)
        return y

    def backward(self, dy):
        """Input gradient; fills ``grads`` (overwriting).

        Parameters
        ----------
        dy : ndarray, the shape of the last forward's input
            float32 or float64.

        Returns
        -------
        dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
            ``grads['weight']`` is set to a float64 array of shape D.

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> rng = np.random.default_rng(0)
        >>> rms = sn.RMSNorm(5)
        >>> x, dy = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
        >>> y = rms(x)
        >>> dx = rms.backward(dy)
        >>> dx.shape, np.allclose(rms.grads["weight"], (dy * y).sum(axis=0))
        ((3, 5), True)
        """
        return self._backward(F.rms_norm_backward, dy)

    def __repr__(self) -> str:
        return f"RMSNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine})"
