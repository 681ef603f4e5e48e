"""GroupNorm and InstanceNorm."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import _backend
from .._validation import check_positive_float
from .base import Layer, affine_params, check_momentum, check_num_features, running_buffers


def _check_nc(layer: Layer, x, num_channels: int, min_ndim: int) -> np.ndarray:
    x = layer._input(x)
    name = type(layer).__name__
    if x.ndim < min_ndim:
        raise ValueError(f"{name} expects input of shape (N, C{', *S' if min_ndim > 2 else ', ...'}){' with spatial dims' if min_ndim > 2 else ''}, got {x.shape}")
    if x.shape[1] != num_channels:
        raise ValueError(f"{name} has {num_channels} channels, but the input has {x.shape[1]} (shape {x.shape})")
    return x


class GroupNorm(Layer):
    """Group normalization: LayerNorm over each (sample, group of channels) block.

    Parameters
    ----------
    num_groups : int
        G; ``num_channels`` must be divisible by it.
    num_channels : int
        C.
    eps : float
        Added to the variance under the square root.
    affine : bool
        Learnable per-channel ``weight`` (ones) and ``bias`` (zeros) of shape (C,).

    Notes
    -----
    Input (N, C, *S), float32 or float64; output of the same shape and dtype.  No
    running statistics: train and eval mode compute the same thing, at any batch size.
    ``weight``, ``bias`` and their gradients are float64 of shape (C,).

    Examples
    --------
    Four channels in two groups: each sample's group of two channels is normalized
    together, so a sample's output does not depend on the rest of the batch.

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> rng = np.random.default_rng(0)
    >>> gn = sn.GroupNorm(2, 4)
    >>> x = rng.normal(3.0, 2.0, size=(2, 4, 5, 5)).astype(np.float32)
    >>> y = gn(x)
    >>> y.shape, y.dtype, np.allclose(y.reshape(2, 2, -1).mean(axis=-1), 0, atol=1e-6)
    ((2, 4, 5, 5), dtype('float32'), True)
    >>> dx = gn.backward(np.ones_like(y))
    >>> dx.shape, gn.grads["weight"].shape, gn.grads["bias"]
    ((2, 4, 5, 5), (4,), array([50., 50., 50., 50.]))
    >>> np.array_equal(gn(x[:1]), y[:1])                 # a batch of one gives the same
    True
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if int(num_groups) <= 0 or int(num_channels) <= 0 or num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be a positive multiple of num_groups ({num_groups})")
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = check_positive_float(eps, "eps")
        self.affine = bool(affine)
        if self.affine:
            self.params = affine_params(self.num_channels)
        self.zero_grad()

    def forward(self, x):
        """Normalize each (sample, group) block of ``x``.

        Parameters
        ----------
        x : ndarray, shape (N, C, *S)
            float32 or float64; integers are cast to float64.

        Returns
        -------
        y : ndarray, the shape and dtype of ``x``

        Examples
        --------
        With one group per channel GroupNorm is InstanceNorm; with one group for all
        channels it normalizes each sample as a whole:

        >>> import numpy as np
        >>> import streamnorm as sn
        >>> x = np.random.default_rng(0).standard_normal((3, 6, 10))
        >>> np.allclose(sn.GroupNorm(6, 6)(x), sn.InstanceNorm(6)(x))
        True
        >>> y = sn.GroupNorm(1, 6)(x)
        >>> np.allclose(y.reshape(3, -1).mean(axis=1), 0), np.allclose(y.reshape(3, -1).var(axis=1), 1, atol=1e-4)
        (True, True)
        """
        x = _check_nc(self, x, self.num_channels, 2)
        y, self._cache = F.group_norm_forward(
            x, self.num_groups, self.params.get("weight"), self.params.get("bias"), self.eps, out=self._spare_out(x)
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
            ``grads['weight']`` and ``grads['bias']`` are set to float64 (C,) arrays.

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> rng = np.random.default_rng(0)
        >>> gn = sn.GroupNorm(2, 4)
        >>> x, dy = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
        >>> y = gn(x)
        >>> dx = gn.backward(dy)
        >>> np.allclose(dx.reshape(2, 2, -1).sum(axis=-1), 0), np.allclose(gn.grads["bias"], dy.sum(axis=(0, 2)))
        (True, True)
        """
        return self._backward(F.group_norm_backward, dy)

    def __repr__(self) -> str:
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine})"


class InstanceNorm(Layer):
    """Instance normalization with PyTorch's semantics (statistics per sample and channel).

    Parameters
    ----------
    num_features : int
        C.
    eps : float
        Added to the variance under the square root.
    momentum : float or None
        Weight of the new batch in the running statistics.  As in PyTorch, ``None``
        leaves the running statistics unchanged.
    affine : bool
        Learnable per-channel ``weight`` and ``bias`` (off by default, as in PyTorch).
    track_running_stats : bool
        Keep ``running_mean`` and ``running_var``: in train mode they move towards the
        batch average of the instance means and unbiased instance variances; in eval
        mode every instance is normalized with them.

    Notes
    -----
    Input (N, C, *S) with prod(S) > 1 when instance statistics are used, float32 or
    float64; output of the same shape and dtype.  Parameters, gradients and running
    statistics are float64 of shape (C,).

    Examples
    --------
    Each (sample, channel) row is normalized with its own statistics:

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> inorm = sn.InstanceNorm(2, momentum=0.5, track_running_stats=True)
    >>> x = np.array([[[1.0, 3.0], [0.0, 4.0]],
    ...               [[5.0, 7.0], [2.0, 2.0]]])          # (N, C, L) = (2, 2, 2)
    >>> inorm(x).round(4)
    array([[[-1.,  1.],
            [-1.,  1.]],
    <BLANKLINE>
           [[-1.,  1.],
            [ 0.,  0.]]])

    With ``track_running_stats`` train mode moves the running statistics halfway
    (``momentum=0.5``) to the batch average of the instance means and unbiased
    variances, and eval mode normalizes every instance with them:

    >>> inorm.buffers["running_mean"], inorm.buffers["running_var"]
    (array([2., 1.]), array([1.5, 2.5]))
    >>> x_test = np.array([[[3.0, 3.0], [2.0, 4.0]]])
    >>> y = inorm.eval()(x_test)
    >>> np.allclose(y, (x_test - [[[2.0], [1.0]]]) / np.sqrt([[[1.5], [2.5]]]), atol=1e-5)
    True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
    ):
        super().__init__()
        self.num_features = check_num_features(num_features)
        self.eps = check_positive_float(eps, "eps")
        self.momentum = check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        if self.affine:
            self.params = affine_params(self.num_features)
        if self.track_running_stats:
            self.buffers = running_buffers(self.num_features)
        self.zero_grad()

    def forward(self, x):
        """Normalize each (sample, channel) of ``x`` over its spatial values.

        In train mode, or without running statistics, the statistics are each
        instance's own (and train mode updates the running statistics if kept); in eval
        mode with running statistics every instance is normalized with those.

        Parameters
        ----------
        x : ndarray, shape (N, C, *S)
            float32 or float64; integers are cast to float64.

        Returns
        -------
        y : ndarray, the shape and dtype of ``x``

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> x = np.random.default_rng(0).normal(4.0, 3.0, size=(2, 3, 8, 8)).astype(np.float32)
        >>> y = sn.InstanceNorm(3)(x)
        >>> y.dtype, np.allclose(y.mean(axis=(2, 3)), 0, atol=1e-6), np.allclose(y.var(axis=(2, 3)), 1, atol=1e-4)
        (dtype('float32'), True, True)
        >>> sn.InstanceNorm(3)(np.zeros((2, 3)))
        Traceback (most recent call last):
            ...
        ValueError: InstanceNorm expects input of shape (N, C, *S) with spatial dims, got (2, 3)
        """
        x = _check_nc(self, x, self.num_features, 3)
        w, b = self.params.get("weight"), self.params.get("bias")
        out = self._spare_out(x)
        if self.training or not self.track_running_stats:
            y, cache = F.instance_norm_forward(x, w, b, eps=self.eps, out=out)
            if self.training and self.track_running_stats:
                N, C = x.shape[:2]
                L = int(np.prod(tuple(x.shape[2:]), dtype=np.int64))
                f = 0.0 if self.momentum is None else self.momentum
                rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
                if self.device == "cuda":
                    m, v = _backend.gpu().instance_running(cache.mean.reshape(N, C), cache.var.reshape(N, C), L / (L - 1))
                    m, v = self._own(m, rm), self._own(v, rv)
                else:
                    m = cache.mean.reshape(N, C).mean(axis=0)
                    v = (cache.var.reshape(N, C) * (L / (L - 1))).mean(axis=0)
                self.buffers["running_mean"] = _backend.lerp(rm, m, 1 - f, f)
                self.buffers["running_var"] = _backend.lerp(rv, v, 1 - f, f)
        else:
            y, cache = F.instance_norm_forward(
                x, w, b, mean=self.buffers["running_mean"], var=self.buffers["running_var"], eps=self.eps, out=out
            )
        self._cache = cache
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
            With ``affine``, ``grads['weight']`` and ``grads['bias']`` are set to float64
            (C,) arrays.

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> rng = np.random.default_rng(0)
        >>> inorm = sn.InstanceNorm(3, affine=True)
        >>> x, dy = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 6))
        >>> y = inorm(x)
        >>> dx = inorm.backward(dy)
        >>> dx.shape, np.allclose(dx.sum(axis=-1), 0), np.allclose(inorm.grads["bias"], dy.sum(axis=(0, 2)))
        ((2, 3, 6), True, True)
        """
        return self._backward(F.instance_norm_backward, dy)

    def __repr__(self) -> str:
        return (
            f"InstanceNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats})"
        )
