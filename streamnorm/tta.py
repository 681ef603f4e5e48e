"""Test-time adaptation by entropy minimization (TENT, Wang et al. 2021; docs/streams.rst).

The statistics side of adaptation lives on the layers (:meth:`BatchNorm.adapt`).  This
module adds the objective and the optimizer that update only the affine parameters of
normalization layers:

>>> import numpy as np
>>> from streamnorm.tta import entropy
>>> H, dz = entropy(np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))
>>> round(H, 6)
0.811439
>>> dz.shape
(2, 3)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy.special import log_softmax

from .layers.base import Layer
from .layers.batch import BatchNorm

__all__ = ["entropy", "Adam", "Tent"]


def entropy(logits) -> tuple[float, np.ndarray]:
    """Mean prediction entropy of a batch of logits, and its gradient.

    ``H = mean_i(−Σ_c p_ic log p_ic)`` with ``p = softmax(z)``, computed from a stable
    log-softmax; ``dH/dz_ij = −p_ij (log p_ij + H_i) / B``.

    Parameters
    ----------
    logits : array_like of shape (B, K)
        Real numbers; float64 arithmetic.

    Returns
    -------
    H : float
    dlogits : ndarray of float64, shape (B, K)

    Examples
    --------
    Uniform predictions have the largest entropy, ``log K``, where the gradient is zero:

    >>> import numpy as np
    >>> H, dlogits = entropy(np.zeros((2, 4)))
    >>> round(H, 6), round(float(np.log(4)), 6), float(np.abs(dlogits).max())
    (1.386294, 1.386294, 0.0)

    A confident prediction has little; descending the gradient makes it more confident:

    >>> H, dlogits = entropy(np.array([[3.0, 0.0]]))
    >>> round(H, 4), bool(dlogits[0, 0] < 0 < dlogits[0, 1])
    (0.1909, True)
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"logits must have shape (B, K) with B, K >= 1, got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinity")
    logp = log_softmax(z, axis=1)
    p = np.exp(logp)
    Hi = -np.sum(p * logp, axis=1)
    B = z.shape[0]
    grad = -p * (logp + Hi[:, None]) / B
    return float(Hi.mean()), grad


class Adam:
    """Adam on named parameters of layers, in place (Kingma and Ba, 2015).

    Parameters
    ----------
    layers : iterable of Layer
    names : sequence of str
        Which parameters of each layer to update (those it has), by default
        ``('weight', 'bias')``.
    lr, betas, eps : float

    Examples
    --------
    The first step moves every parameter by about ``lr`` against the sign of its
    gradient (Adam's bias correction):

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> bn = sn.BatchNorm1d(3)
    >>> bn.grads = {"weight": np.array([1.0, -1.0, 0.0]), "bias": np.zeros(3)}
    >>> Adam([bn], lr=0.1).step()
    >>> bn.params["weight"]
    array([0.9, 1.1, 1. ])
    """

    def __init__(
        self,
        layers: Iterable[Layer],
        names: Sequence[str] = ("weight", "bias"),
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.targets = [(layer, n) for layer in layers for n in names if n in layer.params]
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.reset()

    def reset(self) -> None:
        """Forget the moment estimates and the step count."""
        self.t = 0
        self.m = [np.zeros_like(layer.params[n]) for layer, n in self.targets]
        self.v = [np.zeros_like(layer.params[n]) for layer, n in self.targets]

    def step(self) -> None:
        """One update from the layers' current ``grads``."""
        grads = []
        for layer, n in self.targets:
            g = layer.grads.get(n)
            if g is None or g.shape != layer.params[n].shape:
                raise RuntimeError(f"{type(layer).__name__} has no gradient for {n!r}: run backward() first")
            grads.append(g)
        self.t += 1
        b1, b2 = self.betas
        for i, ((layer, n), g) in enumerate(zip(self.targets, grads)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            mhat = self.m[i] / (1 - b1**self.t)
            vhat = self.v[i] / (1 - b2**self.t)
            layer.params[n] = layer.params[n] - self.lr * mhat / (np.sqrt(vhat) + self.eps)


class Tent:
    """TENT: entropy minimization on the affine parameters of BatchNorm layers.

    On construction every given BatchNorm layer is put in eval mode with
    ``adapt('batch')`` (test-batch statistics), and its parameters and statistics are
    saved as the source state.  Per test batch the caller runs its own forward, calls
    :func:`entropy` on the logits, runs its own backward (which fills the layers'
    ``grads``) and then :meth:`step`; only γ and β change.

    Parameters
    ----------
    layers : iterable of BatchNorm
    lr : float
        Adam's learning rate (1e-3 as in the paper).
    episodic : bool
        Restore the source state before every batch (call :meth:`begin` first).

    Examples
    --------
    A BatchNorm layer trained on one distribution, a linear classifier on top, and
    shifted test batches:

    >>> import numpy as np
    >>> import streamnorm as sn
    >>> rng = np.random.default_rng(0)
    >>> bn = sn.BatchNorm1d(3)
    >>> for _ in range(20):
    ...     _ = bn(rng.normal(size=(64, 3)))
    >>> W = rng.normal(size=(3, 4))
    >>> tent = Tent([bn], lr=1e-2)
    >>> bn.training, bn.adaptation
    (False, 'batch')
    >>> x = rng.normal(loc=2.0, size=(32, 3))
    >>> H = []
    >>> for _ in range(10):
    ...     tent.begin()
    ...     logits = bn(x) @ W
    ...     h, dlogits = entropy(logits)
    ...     dx = bn.backward(dlogits @ W.T)      # fills bn.grads
    ...     tent.step()
    ...     H.append(h)
    >>> bool(H[-1] < H[0])
    True
    >>> tent.reset()                              # the source parameters, exactly
    >>> bn.params["weight"]
    array([1., 1., 1.])
    """

    def __init__(self, layers: Iterable[BatchNorm], lr: float = 1e-3, episodic: bool = False):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("Tent needs at least one BatchNorm layer")
        for layer in self.layers:
            if not isinstance(layer, BatchNorm):
                raise TypeError(f"Tent adapts BatchNorm layers, got {type(layer).__name__}")
            if not layer.affine:
                raise ValueError("Tent updates the affine parameters: a layer has affine=False")
        self.episodic = bool(episodic)
        self._source = [layer.state_dict() for layer in self.layers]
        for layer in self.layers:
            layer.eval()
            layer.adapt("batch")
        self.optimizer = Adam(self.layers, lr=lr)

    def begin(self) -> None:
        """Call before each batch: restores the source state when ``episodic``."""
        if self.episodic:
            self.reset()

    def step(self) -> None:
        """Adam step on every layer's weight and bias from their current gradients."""
        self.optimizer.step()

    def reset(self) -> None:
        """Restore the source parameters and statistics exactly and reset Adam."""
        for layer, sd in zip(self.layers, self._source):
            layer.load_state_dict(sd)
        self.optimizer.reset()
