"""BatchNorm and its dimension-checking aliases."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import _backend
from .._validation import check_positive_float
from .base import Layer, affine_params, check_momentum, check_num_features, running_buffers


class BatchNorm(Layer):
    """Batch normalization (docs/math.rst) with PyTorch's module semantics.

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

    Examples
    --------
    In train mode each channel is normalized with the batch's statistics, and the
    running statistics take the batch in with weight ``momentum``:

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> rng = np.random.default_rng(0)
    >>> bn = sn.BatchNorm(4)
    >>> x = rng.normal(5.0, 2.0, size=(16, 4, 8, 8)).astype(np.float32)   # (N, C, H, W)
    >>> y = bn(x)
    >>> y.shape, y.dtype
    ((16, 4, 8, 8), dtype('float32'))
    >>> np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5), np.allclose(y.var(axis=(0, 2, 3)), 1, atol=1e-3)
    (True, True)
    >>> bn.num_batches_tracked, bn.running_mean.round(1)
    (1, array([0.5, 0.5, 0.5, 0.5]))

    After more batches the running statistics approach the data's, and eval mode
    normalizes with them:

    >>> for _ in range(30):
    ...     _ = bn(rng.normal(5.0, 2.0, size=(16, 4, 8, 8)).astype(np.float32))
    >>> bn.running_mean.round(0), bn.running_var.round(0)
    (array([5., 5., 5., 5.]), array([4., 4., 4., 4.]))
    >>> y = bn.eval()(x)
    >>> bool(np.abs(y.mean(axis=(0, 2, 3))).max() < 0.2), bn.num_batches_tracked   # nothing updated
    (True, 31)

    Channels-last input, (N, H, W, C), takes ``axis=-1``:

    >>> bn_last = sn.BatchNorm(4, axis=-1)
    >>> y_last = bn_last(x.transpose(0, 2, 3, 1))
    >>> np.allclose(y_last, sn.BatchNorm(4)(x).transpose(0, 2, 3, 1), atol=1e-6)
    True
    """

    _ndims: tuple[int, ...] | None = None
    _ADAPT_MODES = ("batch", "prior", "ema", "cumulative", "dua")

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
        self.num_features = check_num_features(num_features)
        self.eps = check_positive_float(eps, "eps")
        self.momentum = check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self._adapt: dict | None = None
        self._source: tuple[np.ndarray, np.ndarray] | None = None
        if self.affine:
            self.params = affine_params(self.num_features)
            self.zero_grad()
        if self.track_running_stats:
            self.buffers = running_buffers(self.num_features)

    # ------------------------------------------------------------------ checks
    def _check_input(self, x) -> np.ndarray:
        x = self._input(x)
        shape = tuple(x.shape)
        ndim = len(shape)
        if self._ndims is not None and ndim not in self._ndims:
            want = " or ".join(str(d) for d in self._ndims)
            raise ValueError(f"{type(self).__name__} expects {want}-dimensional input, got shape {shape}")
        if ndim < 2:
            raise ValueError(f"{type(self).__name__} expects input of shape (N, C, ...), got {shape}")
        if not -ndim <= self.axis < ndim or self.axis % ndim == 0:
            raise ValueError(f"channel axis {self.axis} is not valid for input of shape {shape}")
        if shape[self.axis] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} has {self.num_features} channels, but the input has "
                f"{shape[self.axis]} along axis {self.axis} (shape {shape})"
            )
        return x

    @property
    def running_mean(self) -> np.ndarray | None:
        """``buffers['running_mean']``: float64 of shape (C,), or None without running statistics."""
        return self.buffers.get("running_mean")

    @property
    def running_var(self) -> np.ndarray | None:
        """``buffers['running_var']`` (unbiased): float64 of shape (C,), or None without running statistics."""
        return self.buffers.get("running_var")

    @property
    def num_batches_tracked(self) -> int:
        """The number of train-mode batches taken into the running statistics, an int."""
        return int(self.buffers["num_batches_tracked"]) if "num_batches_tracked" in self.buffers else 0

    def _wb(self):
        return self.params.get("weight"), self.params.get("bias")

    # ----------------------------------------------------------------- forward
    def forward(self, x):
        """Normalize ``x`` (N, C, *S) (or channels-last); returns y of x's shape and dtype.

        Train mode (or ``track_running_stats=False``) uses the batch's statistics and, in
        train mode, updates the running statistics; eval mode uses the running
        statistics, or adapts them when :meth:`adapt` is on.

        Parameters
        ----------
        x : ndarray, shape (N, C, *S), or (N, *S, C) with ``axis=-1``
            float32 or float64; integers are cast to float64.

        Returns
        -------
        y : ndarray, the shape and dtype of ``x``

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> bn = sn.BatchNorm(2, momentum=0.5)
        >>> x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 40.0]])
        >>> bn(x).round(4)
        array([[-1.2247, -0.7071],
               [ 0.    , -0.7071],
               [ 1.2247,  1.4142]])
        >>> bn.running_mean, bn.running_var        # halfway from (0, 1) to the batch's
        (array([ 1.5, 10. ]), array([  2.5, 150.5]))
        >>> bn.eval()(np.array([[1.5, 10.0]]))      # eval mode: the running statistics
        array([[0., 0.]])
        """
        x = self._check_input(x)
        w, b = self._wb()
        out = self._spare_out(x)
        if self.training or not self.track_running_stats:
            y, cache = F.batch_norm_forward(x, w, b, eps=self.eps, axis=self.axis, out=out)
            if self.training and self.track_running_stats:
                self._update_running(cache.batch_mean, cache.batch_var, cache.count)
        elif self._adapt is not None:
            y, cache = self._adapt_forward(x, w, b, out)
        else:
            y, cache = F.batch_norm_forward(
                x, w, b, mean=self.running_mean, var=self.running_var, eps=self.eps, axis=self.axis, out=out
            )
        self._cache = cache
        self._keep_out(y)
        return y

    def _update_running(self, mean: np.ndarray, var: np.ndarray, count: int) -> None:
        """PyTorch's running-statistics rule; the unbiased batch variance is stored."""
        nbt = self.num_batches_tracked + 1
        f = 1.0 / nbt if self.momentum is None else self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        self.buffers["running_mean"] = _backend.lerp(rm, self._own(mean, rm), 1.0 - f, f)
        self.buffers["running_var"] = _backend.lerp(rv, self._own(var, rv), 1.0 - f, f, count / (count - 1))
        self.buffers["num_batches_tracked"] = np.array(nbt, dtype=np.int64)

    # -------------------------------------------------- test-time adaptation
    def adapt(
        self,
        mode: str | None,
        *,
        prior_strength: float = 16.0,
        momentum: float = 0.1,
        m0: float = 0.1,
        omega: float = 0.94,
        m_min: float = 0.005,
    ) -> "BatchNorm":
        """Adapt the statistics of an eval-mode layer to the batches it sees (docs/streams.rst).

        The source statistics are the running statistics when adaptation starts; they
        are kept, and :meth:`reset_adaptation` restores them exactly.

        Parameters
        ----------
        mode : {'batch', 'prior', 'ema', 'cumulative', 'dua'} or None
            ``'batch'``: normalize with each test batch's own statistics, update
            nothing.  ``'prior'``: mix source and batch statistics with
            ``p = N/(N + n)`` (N = ``prior_strength``, n = samples in the batch);
            the source never changes.  ``'ema'``: running statistics, starting from
            the source, take each batch in with ``momentum`` before it is normalized.
            ``'cumulative'``: the equal-weight average of every test batch's
            statistics so far.  ``'dua'``: ``'ema'`` with the decaying momentum
            ``m0·omega**k + m_min`` for the k-th batch (k = 1, 2, ...).  ``None``
            stops adapting and keeps the running statistics as they are.
        prior_strength, momentum, m0, omega, m_min : float
            The options of the modes above.

        Returns
        -------
        self

        Notes
        -----
        Batch variances enter the running statistics unbiased (m/(m - 1)), as in
        training; ``'batch'`` normalizes with the biased one, as train mode does.  The
        backward is exact for every mode (gradients flow through the batch part of the
        statistics), which is what entropy minimization (TENT) needs.

        Examples
        --------
        A layer trained on standard normal data meets shifted data at test time.  With
        the frozen source statistics its output is far off center:

        >>> import numpy as np
        >>> import streamnorm as sn
        >>> rng = np.random.default_rng(0)
        >>> bn = sn.BatchNorm1d(3)
        >>> for _ in range(50):
        ...     _ = bn(rng.standard_normal((64, 3)))
        >>> source = bn.eval().running_mean.copy()
        >>> shifted = rng.normal(4.0, 2.0, size=(64, 3))
        >>> bn(shifted).mean(axis=0).round(0)
        array([4., 4., 4.])

        ``'batch'`` normalizes each test batch with its own statistics:

        >>> bn.adapt("batch").adaptation
        'batch'
        >>> np.allclose(bn(shifted).mean(axis=0), 0)
        True

        ``'ema'`` moves the running statistics towards the test data, batch by batch;
        :meth:`reset_adaptation` restores the source statistics exactly:

        >>> _ = bn.adapt("ema", momentum=0.5)
        >>> for _ in range(10):
        ...     _ = bn(rng.normal(4.0, 2.0, size=(64, 3)))
        >>> bn.running_mean.round(0)
        array([4., 4., 4.])
        >>> np.array_equal(bn.reset_adaptation().running_mean, source)
        True
        >>> bn.adapt(None).adaptation is None
        True
        """
        if mode is None:
            self._adapt = None
            self._source = None
            return self
        if mode not in self._ADAPT_MODES:
            raise ValueError(f"unknown adaptation mode {mode!r}; choose one of {self._ADAPT_MODES} or None")
        if not self.track_running_stats:
            raise ValueError("adaptation needs source statistics: this layer has track_running_stats=False")
        if self.training:
            raise RuntimeError("adapt() works on an eval-mode layer (adaptation happens at test time): call eval() first")
        if prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength!r}")
        for name, val in (("momentum", momentum), ("m0", m0), ("m_min", m_min)):
            if not 0.0 <= val <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {val!r}")
        if not 0.0 < omega <= 1.0 or m0 + m_min > 1.0:
            raise ValueError(f"need 0 < omega <= 1 and m0 + m_min <= 1, got omega={omega!r}, m0 + m_min={m0 + m_min!r}")
        if self._source is None:
            self._source = (_backend.copy(self.buffers["running_mean"]), _backend.copy(self.buffers["running_var"]))
        self._adapt = {
            "mode": mode, "prior_strength": float(prior_strength), "momentum": float(momentum),
            "m0": float(m0), "omega": float(omega), "m_min": float(m_min), "k": 0,
        }
        return self

    def _move_extra(self, move) -> None:
        if self._source is not None:
            self._source = (move(self._source[0]), move(self._source[1]))

    @property
    def adaptation(self) -> str | None:
        """The active adaptation mode (a str, see :meth:`adapt`), or None.

        Examples
        --------
        >>> import streamnorm as sn
        >>> bn = sn.BatchNorm1d(2).eval()
        >>> bn.adaptation is None, bn.adapt("cumulative").adaptation
        (True, 'cumulative')
        """
        return None if self._adapt is None else self._adapt["mode"]

    def reset_adaptation(self) -> "BatchNorm":
        """Restore the source statistics exactly and restart the mode's schedule.

        The source statistics are the running statistics when :meth:`adapt` was first
        called (since the last ``adapt(None)``); the mode stays on.

        Returns
        -------
        self

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> bn = sn.BatchNorm1d(2).eval().adapt("cumulative")
        >>> _ = bn(np.array([[1.0, 5.0], [3.0, 7.0]]))
        >>> bn.running_mean, bn.running_var                      # the test batch's
        (array([2., 6.]), array([2., 2.]))
        >>> bn.reset_adaptation().running_mean, bn.running_var   # the source's
        (array([0., 0.]), array([1., 1.]))
        """
        if self._source is not None:
            self.buffers["running_mean"] = _backend.copy(self._source[0])
            self.buffers["running_var"] = _backend.copy(self._source[1])
        if self._adapt is not None:
            self._adapt["k"] = 0
        return self

    def _adapt_forward(self, x, w, b, out=None):
        a = self._adapt
        mode = a["mode"]
        kw = dict(eps=self.eps, axis=self.axis, out=out)
        if mode == "batch":
            return F.batch_norm_forward(x, w, b, **kw)
        if mode == "prior":
            n = x.shape[0]
            p = a["prior_strength"] / (a["prior_strength"] + n)
            src_mean, src_var = self._source
            return F.batch_norm_forward(
                x, w, b, prior_mean=src_mean, prior_var=src_var, prior_weight=p, unbiased=True, **kw
            )
        k = a["k"] + 1
        if mode == "ema":
            mom = a["momentum"]
        elif mode == "dua":
            mom = a["m0"] * a["omega"] ** k + a["m_min"]
        else:  # cumulative: the k-th batch weighs 1/k
            mom = 1.0 / k
        y, cache = F.batch_norm_forward(
            x, w, b, prior_mean=self.buffers["running_mean"], prior_var=self.buffers["running_var"],
            prior_weight=1.0 - mom, unbiased=True, **kw,
        )
        # the blend just used is the updated running statistics (committed on success)
        self.buffers["running_mean"] = self._own(_backend.copy(cache.mean), self.buffers["running_mean"])
        self.buffers["running_var"] = self._own(_backend.copy(cache.var), self.buffers["running_var"])
        a["k"] = k
        return y, cache

    # ---------------------------------------------------------------- backward
    def backward(self, dy):
        """Gradient of the loss with respect to the input; fills ``grads`` (overwriting).

        The mode is the one of the last forward: train-mode batch statistics give the
        full backward of docs/math.rst, running statistics give ``dx = γ·r·dy``.

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
        >>> bn = sn.BatchNorm1d(3)
        >>> x, dy = rng.standard_normal((32, 3)), rng.standard_normal((32, 3))
        >>> y = bn(x)
        >>> dx = bn.backward(dy)
        >>> dx.shape, bn.grads["bias"].shape
        ((32, 3), (3,))
        >>> np.allclose(bn.grads["bias"], dy.sum(axis=0)), np.allclose(dx.sum(axis=0), 0)
        (True, True)

        In eval mode the running statistics are constants:

        >>> y = bn.eval()(x)
        >>> np.allclose(bn.backward(dy), dy / np.sqrt(bn.running_var + bn.eps))
        True
        """
        return self._backward(F.batch_norm_backward, dy)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, axis={self.axis})"
        )


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for (N, C) or (N, C, L) input.

    Same parameters, dtypes and methods as :class:`BatchNorm`; other input dimensions
    raise ``ValueError``.

    Examples
    --------
    >>> import numpy as np
    >>> import streamnorm as sn
    >>> bn = sn.BatchNorm1d(3)
    >>> bn(np.ones((4, 3), dtype=np.float32)).dtype, bn(np.zeros((4, 3, 10))).shape
    (dtype('float32'), (4, 3, 10))
    >>> bn(np.zeros((4, 3, 2, 2)))
    Traceback (most recent call last):
        ...
    ValueError: BatchNorm1d expects 2 or 3-dimensional input, got shape (4, 3, 2, 2)
    """

    _ndims = (2, 3)


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for (N, C, H, W) input.

    Same parameters, dtypes and methods as :class:`BatchNorm`; other input dimensions
    raise ``ValueError``.

    Examples
    --------
    >>> import numpy as np
    >>> import streamnorm as sn
    >>> rng = np.random.default_rng(0)
    >>> bn = sn.BatchNorm2d(3)
    >>> y = bn(rng.normal(2.0, 1.0, size=(8, 3, 5, 5)))
    >>> y.shape, np.allclose(y.mean(axis=(0, 2, 3)), 0)
    ((8, 3, 5, 5), True)
    >>> bn(np.zeros((8, 3)))
    Traceback (most recent call last):
        ...
    ValueError: BatchNorm2d expects 4-dimensional input, got shape (8, 3)
    """

    _ndims = (4,)


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for (N, C, D, H, W) input.

    Same parameters, dtypes and methods as :class:`BatchNorm`; other input dimensions
    raise ``ValueError``.

    Examples
    --------
    >>> import numpy as np
    >>> import streamnorm as sn
    >>> bn = sn.BatchNorm3d(2)
    >>> y = bn(np.arange(48, dtype=np.float32).reshape(2, 2, 3, 2, 2))
    >>> y.shape, y.dtype, bn.running_mean.round(2)
    ((2, 2, 3, 2, 2), dtype('float32'), array([1.75, 2.95]))
    """

    _ndims = (5,)
