"""The layer contract shared by every streamnorm layer."""

from __future__ import annotations

import sys
from typing import Any, Mapping

import numpy as np

from .. import _backend, _memory
from .._validation import as_param


def check_num_features(num_features) -> int:
    """A positive integer channel count, or ValueError.

    Parameters
    ----------
    num_features : int or integral float
        The number of channels C.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        When ``num_features`` is not a positive integer.

    Examples
    --------
    >>> check_num_features(4.0)
    4
    >>> check_num_features(0)
    Traceback (most recent call last):
        ...
    ValueError: num_features must be a positive integer, got 0
    """
    if int(num_features) != num_features or num_features <= 0:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    return int(num_features)


def check_momentum(momentum) -> float | None:
    """A momentum in [0, 1], or None; ValueError otherwise.

    Parameters
    ----------
    momentum : float or None
        The weight of a new batch in running statistics; None for a cumulative average.

    Returns
    -------
    float or None

    Raises
    ------
    ValueError
        When ``momentum`` is outside [0, 1].

    Examples
    --------
    >>> check_momentum(1), check_momentum(None)
    (1.0, None)
    >>> check_momentum(1.5)
    Traceback (most recent call last):
        ...
    ValueError: momentum must be in [0, 1] or None, got 1.5
    """
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
    return None if momentum is None else float(momentum)


def running_buffers(C: int) -> dict[str, np.ndarray]:
    """PyTorch's initial running statistics for C channels.

    Parameters
    ----------
    C : int
        The number of channels.

    Returns
    -------
    dict[str, ndarray]
        ``'running_mean'`` (zeros) and ``'running_var'`` (ones), float64 of shape (C,),
        and ``'num_batches_tracked'``, an int64 scalar array (0).

    Examples
    --------
    >>> running_buffers(2)
    {'running_mean': array([0., 0.]), 'running_var': array([1., 1.]), 'num_batches_tracked': array(0)}
    """
    return {
        "running_mean": np.zeros(C),
        "running_var": np.ones(C),
        "num_batches_tracked": np.array(0, dtype=np.int64),
    }


def affine_params(C: int) -> dict[str, np.ndarray]:
    """Per-channel weight (ones) and bias (zeros).

    Parameters
    ----------
    C : int
        The number of channels.

    Returns
    -------
    dict[str, ndarray]
        ``'weight'`` (ones) and ``'bias'`` (zeros), float64 of shape (C,).

    Examples
    --------
    >>> affine_params(3)
    {'weight': array([1., 1., 1.]), 'bias': array([0., 0., 0.])}
    """
    return {"weight": np.ones(C), "bias": np.zeros(C)}


class Layer:
    """Base class: parameters, gradients, buffers and a train/eval mode.

    A layer is a thin object.  ``forward`` calls a stateless function from
    :mod:`streamnorm.functional` and keeps its cache; ``backward`` hands the cache
    back and stores the parameter gradients.

    Attributes
    ----------
    params : dict[str, ndarray]
        Learnable parameters with PyTorch's names (``'weight'``, ``'bias'``), float64.
        An optimizer updates these arrays in place (or replaces them with arrays of
        the same shape).
    grads : dict[str, ndarray]
        Gradients of the loss with respect to ``params``, same keys and shapes.
        ``backward`` *overwrites* them (it does not accumulate): a training step is
        ``forward``, ``backward``, optimizer update.
    buffers : dict[str, ndarray]
        Non-learnable state (running statistics), float64, plus the int64 scalar
        ``num_batches_tracked`` where the layer has one.
    training : bool
        True in train mode (the default), False after :meth:`eval`.
    device : {'cpu', 'cuda'}
        Where ``params``, ``grads`` and ``buffers`` live (see :meth:`to`).  The input
        of ``forward`` must live there too.
    reuse_output : bool
        True (the default): the layer keeps the memory of its last two host outputs
        (and of its last two ``dx``), and writes a new one of the same shape and dtype
        into one of them once every reference to it is gone, instead of into a fresh
        array.  That saves the operating system's zeroing of new pages, about one pass
        over the data, at the price of keeping that memory between calls.  An array
        you still hold, or any view of it, is never overwritten.  Set it to False to
        always allocate.

    Notes
    -----
    Inputs may be float32 or float64 (integers are cast to float64); outputs and input
    gradients keep the input's dtype (``result_type(x, dy)`` for a backward), while
    ``params``, ``grads`` and the running statistics in ``buffers`` are float64.

    Examples
    --------
    Every layer keeps this contract; here a :class:`~streamnorm.BatchNorm1d` makes one
    training step, plain SGD on its parameters:

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> layer = sn.BatchNorm1d(3)
    >>> isinstance(layer, sn.Layer), sorted(layer.params), sorted(layer.buffers)
    (True, ['bias', 'weight'], ['num_batches_tracked', 'running_mean', 'running_var'])
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((8, 3)).astype(np.float32)
    >>> y = layer(x)                                  # forward, in train mode
    >>> dx = layer.backward(rng.standard_normal((8, 3)).astype(np.float32))
    >>> y.dtype, dx.dtype, layer.grads["weight"].shape, layer.grads["weight"].dtype
    (dtype('float32'), dtype('float32'), (3,), dtype('float64'))
    >>> for name in layer.params:
    ...     layer.params[name] -= 0.1 * layer.grads[name]
    >>> layer.eval().training                         # eval mode: running statistics
    False
    """

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.training: bool = True
        self.device: str = "cpu"
        self.reuse_output: bool = True
        self._like: Any = None
        self._cache: Any = None
        self._spare: dict[str, list[np.ndarray]] = {}

    # -------------------------------------------------------------- contract
    def forward(self, x):  # pragma: no cover - abstract
        """Normalize ``x``; calling the layer, ``layer(x)``, is the same.

        Parameters
        ----------
        x : ndarray, float32 or float64
            The input, of the shape the layer documents; integers are cast to float64.

        Returns
        -------
        y : ndarray, the shape and dtype of ``x``
        """
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        """Input gradient of the last forward; fills ``grads`` (overwriting them).

        Parameters
        ----------
        dy : ndarray, the shape of the last forward's input
            The gradient of the loss with respect to the forward's output.

        Returns
        -------
        dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
        """
        raise NotImplementedError

    def __call__(self, x):
        """``self.forward(x)``."""
        return self.forward(x)

    def _require_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        return self._cache

    def _input(self, x):
        """``x`` checked against the layer's device: GPU input needs :meth:`to` ('cuda')."""
        on_gpu = _backend.is_device(x)
        if on_gpu != (self.device == "cuda"):
            where = "on the GPU" if on_gpu else "in host memory"
            fix = "layer.to('cuda')" if on_gpu else "layer.to('cpu'), or pass a GPU array"
            raise TypeError(
                f"{type(self).__name__}: the input is {where} but the layer's parameters and buffers are "
                f"on '{self.device}'; call {fix} once (streamnorm never copies them on every call)"
            )
        return _backend.as_input(x)

    def _spare_out(self, x, slot: str = "y", dtype=None, avoid=()) -> np.ndarray | None:
        """Memory of an earlier output in ``slot`` ('y' forward, 'dx' backward), shaped
        like ``x``, that nothing references any more and that overlaps none of ``avoid``."""
        if not self.reuse_output or type(x) is not np.ndarray:
            return None
        dtype = x.dtype if dtype is None else dtype
        for buf in self._spare.get(slot, ()):
            # references: the list, the loop variable and getrefcount's argument
            if sys.getrefcount(buf) > 3:
                continue
            out = _memory.reuse(buf, x.shape, dtype, near=x)
            if out is None or any(np.may_share_memory(buf, a) for a in (x, *avoid)):
                continue
            return out
        return None

    def _keep_out(self, y, slot: str = "y") -> None:
        """Remember the memory of a host output for :meth:`_spare_out`.

        The last two outputs are kept: in the usual loop ``h = layer(x)`` the previous
        output is still bound to ``h`` during the call, and the one before it is free.
        """
        if not self.reuse_output or type(y) is not np.ndarray:
            self._spare.pop(slot, None)
            return
        b = _memory.owner(y)
        if b is None or not (b.flags.c_contiguous and b.flags.writeable):
            return
        kept = [k for k in self._spare.get(slot, ()) if k is not b]
        self._spare[slot] = [b, *kept][:2]

    def _spare_grad(self, dy) -> np.ndarray | None:
        """:meth:`_spare_out` for a backward's dx (dtype ``result_type(x, dy)``)."""
        if type(dy) is not np.ndarray or self._cache is None:
            return None
        x = getattr(self._cache, "x3", None)
        if x is None:
            x = getattr(self._cache, "x2", None)
        if type(x) is not np.ndarray:
            return None
        return self._spare_out(dy, "dx", np.result_type(x.dtype, dy.dtype), (x,))

    def _backward(self, backward, dy):
        """Run the functional ``backward`` on the last forward's cache, writing dx into
        reused memory where possible; set ``grads`` from its (dweight[, dbias]); return dx."""
        cache = self._require_cache()
        dx, *g = backward(dy, cache, out=self._spare_grad(dy))
        self._keep_out(dx, "dx")
        self._set_grads(**dict(zip(("weight", "bias"), g)))
        return dx

    def _own(self, a, like):
        """A vector computed on the layer's device, as the kind of array ``like`` is."""
        return _backend.as_kind(a, like) if self.device == "cuda" else a

    def _set_grads(self, **grads) -> None:
        for name, g in grads.items():
            if name in self.params and g is not None:
                shape = tuple(self.params[name].shape)
                if self.device == "cuda":
                    self.grads[name] = _backend.as_kind(g, self.params[name]).reshape(shape)
                else:
                    self.grads[name] = np.asarray(g, dtype=np.float64).reshape(shape)

    def to(self, device: str, *, like=None) -> "Layer":
        """Move parameters, gradients and buffers to ``'cuda'`` or ``'cpu'``; returns self.

        Parameters
        ----------
        device : {'cuda', 'cpu'}
            ``'cuda'`` copies every float64 vector to the current GPU once; from then on
            ``forward`` takes GPU arrays (CuPy, PyTorch CUDA tensors, numba device
            arrays) and refuses host arrays, and the other way round after ``'cpu'``.
        like : GPU array, optional
            With ``'cuda'``, hold the vectors as this kind of array (a CuPy array or a
            PyTorch tensor) instead of numba device arrays, so that an optimizer
            written for that library can update ``params`` in place.

        Returns
        -------
        self

        Notes
        -----
        ``num_batches_tracked`` stays a host integer.  :meth:`state_dict` always
        returns host NumPy arrays, wherever the layer lives.  Moving drops the cache of
        the last forward: call ``forward`` again before ``backward``.

        Examples
        --------
        A new layer lives on the CPU; ``to('cpu')`` is then a no-op that returns the
        layer, so calls chain:

        >>> import streamnorm as sn
        >>> layer = sn.LayerNorm(4).to("cpu")
        >>> layer.device, type(layer.params["weight"]).__name__
        ('cpu', 'ndarray')
        >>> layer.to("tpu")
        Traceback (most recent call last):
            ...
        ValueError: device must be 'cuda' or 'cpu', got 'tpu'
        """
        dev = str(device).lower()
        if dev not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
        if dev == "cuda" and like is not None and not _backend.is_device(like):
            raise TypeError(f"like must be a GPU array (CuPy, PyTorch CUDA, numba), got {type(like).__name__}")
        move = (lambda a: _backend.to_device(a, like)) if dev == "cuda" else _backend.to_host
        self.params, self.grads, self.buffers = (
            {k: (v if k == "num_batches_tracked" else move(v)) for k, v in d.items()}
            for d in (self.params, self.grads, self.buffers)
        )
        self._move_extra(move)
        self.device = dev
        self._like = like if dev == "cuda" else None
        self._cache = None
        return self

    def _move_extra(self, move) -> None:
        """Move any further per-channel state a subclass keeps (hook for :meth:`to`)."""

    def train(self, mode: bool = True) -> "Layer":
        """Set train mode (``mode=True``) or eval mode; returns self.

        Parameters
        ----------
        mode : bool
            True for train mode, False for eval mode.

        Returns
        -------
        self

        Examples
        --------
        In train mode a BatchNorm normalizes with the batch's statistics and updates its
        running statistics; in eval mode it normalizes with the running statistics:

        >>> import numpy as np
        >>> import streamnorm as sn
        >>> bn = sn.BatchNorm1d(2, momentum=None)         # running stats: plain average
        >>> x = np.array([[0.0, 10.0], [2.0, 30.0]])
        >>> bn.train()(x).round(4)
        array([[-1., -1.],
               [ 1.,  1.]])
        >>> bn.running_mean, bn.running_var
        (array([ 1., 20.]), array([  2., 200.]))
        >>> bn.train(False).training
        False
        >>> bn(np.array([[1.0, 20.0]]))
        array([[0., 0.]])
        """
        self.training = bool(mode)
        return self

    def eval(self) -> "Layer":
        """Set eval mode; returns self.  The same as ``train(False)``.

        Returns
        -------
        self

        Examples
        --------
        >>> import streamnorm as sn
        >>> bn = sn.BatchNorm1d(4).eval()
        >>> bn.training, bn.train().training
        (False, True)
        """
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every gradient to zeros (float64 arrays of the parameters' shapes).

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> ln = sn.LayerNorm(3)
        >>> _ = ln(np.array([[1.0, 2.0, 4.0]]))
        >>> _ = ln.backward(np.array([[1.0, 0.0, 0.0]]))
        >>> ln.grads["bias"]
        array([1., 0., 0.])
        >>> ln.zero_grad()
        >>> ln.grads["bias"]
        array([0., 0., 0.])
        """
        if self.device == "cuda":
            self.grads = {k: _backend.to_device(np.zeros(tuple(v.shape)), self._like) for k, v in self.params.items()}
        else:
            self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    # ----------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host NumPy copies of parameters and buffers under PyTorch's key names (on any device).

        Returns
        -------
        dict[str, ndarray]
            ``params`` and ``buffers`` together, as float64 arrays of their shapes, and
            ``'num_batches_tracked'`` as an int64 scalar array where the layer has one.
            The arrays are copies: changing them does not change the layer.

        Examples
        --------
        A trained layer's state goes into a fresh layer, which then computes the same:

        >>> import numpy as np
        >>> import streamnorm as sn
        >>> rng = np.random.default_rng(0)
        >>> bn = sn.BatchNorm1d(3)
        >>> for _ in range(5):
        ...     _ = bn(rng.normal(2.0, 3.0, size=(16, 3)))
        >>> state = bn.state_dict()
        >>> sorted(state), state["running_mean"].dtype, int(state["num_batches_tracked"])
        (['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'], dtype('float64'), 5)
        >>> restored = sn.BatchNorm1d(3)
        >>> restored.load_state_dict(state)
        >>> x = rng.standard_normal((4, 3))
        >>> np.array_equal(restored.eval()(x), bn.eval()(x))
        True

        The keys are PyTorch's, so ``np.savez("bn.npz", **state)`` or
        ``{k: torch.from_numpy(v) for k, v in state.items()}`` carry it to either side.
        """
        out = {k: _backend.to_host(v) for k, v in self.params.items()}
        out.update({k: _backend.to_host(v) for k, v in self.buffers.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load parameters and buffers from a mapping of array-likes.

        Every entry is checked (names, shapes, dtypes) before anything is assigned, so a
        bad state dict raises and leaves the layer unchanged.  With ``strict=False``
        missing and unexpected keys are ignored; misshapen ones still raise.

        Parameters
        ----------
        state : mapping of str to array_like
            Real-valued arrays of the shapes of ``params`` and ``buffers`` (stored as
            float64 copies), and a non-negative integer scalar for
            ``'num_batches_tracked'``: NumPy arrays, lists, PyTorch CPU tensors.
        strict : bool
            Require exactly the layer's keys.

        Returns
        -------
        None

        Raises
        ------
        KeyError
            With ``strict=True``, when keys are missing or unexpected.
        ValueError, TypeError
            When an entry has the wrong shape or is not real-valued.

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> bn = sn.BatchNorm1d(2)
        >>> bn.load_state_dict({"running_mean": [1, 2], "running_var": [4.0, 9.0]}, strict=False)
        >>> bn.running_mean, bn.running_mean.dtype
        (array([1., 2.]), dtype('float64'))
        >>> bn.load_state_dict({"running_mean": np.zeros(3)}, strict=False)
        Traceback (most recent call last):
            ...
        ValueError: running_mean has shape (3,), expected (2,)
        >>> bn.running_mean                               # unchanged
        array([1., 2.])
        """
        expected = {**self.params, **self.buffers}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state dict does not match {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        new: dict[str, np.ndarray] = {}
        for k, ref in expected.items():
            if k not in state:
                continue
            if k == "num_batches_tracked":
                v = np.asarray(state[k])
                if v.size != 1 or v.dtype.kind not in "iuf" or float(v.ravel()[0]) < 0:
                    raise ValueError(f"num_batches_tracked must be a non-negative integer scalar, got {v!r}")
                new[k] = np.array(int(v.ravel()[0]), dtype=np.int64)
            else:
                value = state[k]
                if _backend.is_device(value):
                    value = _backend.to_host(value)
                new[k] = as_param(value, tuple(ref.shape), k)
                if self.device == "cuda":
                    new[k] = _backend.to_device(new[k], self._like)
        for k, v in new.items():
            if k in self.params:
                self.params[k] = v
            else:
                self.buffers[k] = v
