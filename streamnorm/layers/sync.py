"""SyncBatchNorm: BatchNorm whose train-mode statistics span every data-parallel rank."""

from __future__ import annotations

from .. import functional as F
from ..comm import allgather_checked, as_communicator
from .batch import BatchNorm


class SyncBatchNorm(BatchNorm):
    """Batch normalization synchronized across data-parallel ranks (docs/math.rst over all ranks).

    In train mode the ranks exchange per-channel moments, so that each rank normalizes
    its own batch exactly as one :class:`~streamnorm.BatchNorm` would normalize the
    concatenation of every rank's batch (in rank order): same outputs, same input
    gradients for this rank's slice, same running statistics.  Batch sizes may differ
    between ranks, and a rank may pass an empty batch (N = 0).

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance under the square root.
    momentum : float or None
        Weight of the new (global) batch in the running statistics, PyTorch's
        convention; ``None`` gives the cumulative average.
    affine : bool
        Learnable ``weight`` (γ, ones) and ``bias`` (β, zeros) of shape (C,).
    track_running_stats : bool
        Keep ``running_mean``, ``running_var`` (the unbiased variance of the global
        batch, ``M2/(m − 1)``) and ``num_batches_tracked``.
    axis : int
        The channel axis: 1 for (N, C, *S) input, -1 for channels-last (N, *S, C).
    comm : Communicator, optional
        Anything with ``rank``, ``size`` and ``allgather(obj) -> list`` (see
        :mod:`streamnorm.comm`), for instance :class:`~streamnorm.comm.MPICommunicator`.
        None means a :class:`~streamnorm.comm.SelfCommunicator`: a single process, where
        the layer is exactly a :class:`~streamnorm.BatchNorm`.  Pass a communicator
        explicitly to synchronize.

    Notes
    -----
    Input: float32 or float64, any memory layout, as for :class:`~streamnorm.BatchNorm`;
    the output has the input's dtype, statistics and gradients are float64.

    Communication, train mode only: ``forward`` allgathers ``(n, μ, M2)`` per channel
    (2C + 1 numbers per rank) and ``backward`` allgathers ``Σdy`` and ``Σdy·(x − μ)``
    (2C numbers per rank): one collective each, O(C) whatever the batch size.  Every
    rank merges and sums the gathered list in rank order, so the statistics, the
    running statistics and the parameter gradients are bit-for-bit the same on every
    rank.  ``grads['weight']`` and ``grads['bias']`` are the gradients over the global
    batch: do not allreduce them again (the gradients of the other layers still need
    their usual allreduce, averaged or summed to match the loss).

    Every rank must make the same calls in the same order, as in any collective
    program: train-mode ``forward`` and ``backward`` are collective calls, eval-mode
    calls communicate nothing.  Eval mode, including test-time adaptation with
    :meth:`~streamnorm.BatchNorm.adapt`, is the plain, local BatchNorm.

    A global count m of 0 or 1 raises ``ValueError`` on every rank.  When one rank's
    input is invalid, that rank raises its own error and the others raise
    ``RuntimeError`` naming it, instead of waiting for ever.  A forward that raises
    leaves the running statistics untouched.  The state dict has BatchNorm's keys.

    Examples
    --------
    In a data-parallel job every rank builds the layer with the job's communicator and
    runs the same training loop on its own batch (:doc:`/sync_batchnorm` has the whole
    program):

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> from streamnorm.comm import MPICommunicator
    >>> layer = sn.SyncBatchNorm(64, comm=MPICommunicator())   # doctest: +SKIP

    Without a communicator it is a single process's BatchNorm, step for step:

    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.normal(2.0, 3.0, size=(16, 4)), rng.standard_normal((16, 4))
    >>> sync, bn = sn.SyncBatchNorm(4), sn.BatchNorm(4)
    >>> sync.comm
    SelfCommunicator()
    >>> np.allclose(sync(x), bn(x)), np.allclose(sync.backward(dy), bn.backward(dy))
    (True, True)
    >>> np.allclose(sync.grads["weight"], bn.grads["weight"]), np.allclose(sync.running_var, bn.running_var)
    (True, True)
    >>> sorted(sync.state_dict()) == sorted(bn.state_dict())
    True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        comm=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis)
        self.comm = as_communicator(comm)

    @classmethod
    def from_batchnorm(cls, bn: BatchNorm, comm=None) -> "SyncBatchNorm":
        """A SyncBatchNorm with the options, parameters and buffers of ``bn`` (copied).

        Parameters
        ----------
        bn : BatchNorm
            Any BatchNorm, BatchNorm1d/2d/3d included (the dimension check is dropped).
        comm : Communicator, optional
            Anything with ``rank``, ``size`` and ``allgather``; None is a single process.

        Returns
        -------
        SyncBatchNorm
            In ``bn``'s mode (train or eval).

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> bn = sn.BatchNorm2d(3)
        >>> _ = bn(np.random.default_rng(0).normal(1.0, 2.0, size=(4, 3, 5, 5)))
        >>> sync = sn.SyncBatchNorm.from_batchnorm(bn.eval())
        >>> sync.num_batches_tracked, np.array_equal(sync.running_mean, bn.running_mean), sync.training
        (1, True, False)
        >>> sync(np.zeros((2, 3))).shape                   # any number of dimensions now
        (2, 3)
        """
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"from_batchnorm() takes a BatchNorm, not {type(bn).__name__}")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.axis, comm)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new

    def forward(self, x):
        """Normalize this rank's batch ``x`` (N, C, *S) (or channels-last).

        Train mode: with the statistics of every rank's batch (a collective call).  Eval
        mode: as :meth:`BatchNorm.forward <streamnorm.BatchNorm.forward>`, locally.

        Parameters
        ----------
        x : ndarray, shape (N, C, *S), or (N, *S, C) with ``axis=-1``
            This rank's batch (N may be 0); float32 or float64.

        Returns
        -------
        y : ndarray, the shape and dtype of ``x``

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> sync = sn.SyncBatchNorm(2, momentum=None)
        >>> y = sync(np.array([[1.0, 0.0], [3.0, 2.0]], dtype=np.float32))
        >>> y.dtype, sync.running_mean, sync.running_var
        (dtype('float32'), array([2., 1.]), array([2., 2.]))
        >>> y.round(4)
        array([[-1., -1.],
               [ 1.,  1.]], dtype=float32)
        """
        if not self.training:
            return super().forward(x)
        try:
            x = self._check_input(x)
        except Exception as exc:  # noqa: BLE001 - the other ranks are told, then it is re-raised
            allgather_checked(self.comm, None, exc, what="SyncBatchNorm forward")
        w, b = self._wb()
        y, cache = F.sync_batch_norm_forward(x, w, b, self.comm, eps=self.eps, axis=self.axis)
        if self.track_running_stats:
            loc = cache.local
            self._update_running(loc.mean, loc.var, cache.count)
        self._cache = cache
        return y

    def backward(self, dy):
        """Gradient with respect to this rank's input; fills ``grads`` with global sums.

        After a train-mode forward this is a collective call (see the class notes);
        after an eval-mode forward it is :meth:`BatchNorm.backward
        <streamnorm.BatchNorm.backward>`, locally.

        Parameters
        ----------
        dy : ndarray, the shape of this rank's last forward input
            float32 or float64.

        Returns
        -------
        dx : ndarray, the shape of ``dy``, dtype ``result_type(x, dy)``
            ``grads['weight']`` and ``grads['bias']`` are set to float64 (C,) arrays,
            the sums over the global batch.

        Examples
        --------
        >>> import numpy as np
        >>> import streamnorm as sn
        >>> rng = np.random.default_rng(0)
        >>> sync = sn.SyncBatchNorm(3)
        >>> x, dy = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
        >>> y = sync(x)
        >>> dx = sync.backward(dy)
        >>> dx.shape, np.allclose(dx.sum(axis=0), 0), np.allclose(sync.grads["bias"], dy.sum(axis=0))
        ((8, 3), True, True)
        """
        cache = self._require_cache()
        if not isinstance(cache, F.SyncBatchNormCache):
            return super().backward(dy)
        dx, dw, db = F.sync_batch_norm_backward(dy, cache, self.comm)
        self._set_grads(weight=dw, bias=db)
        return dx

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, comm={self.comm!r})"
