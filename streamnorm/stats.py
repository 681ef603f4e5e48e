"""RunningStats: the mergeable per-feature moments (count, mean, M2) of docs/math.rst."""

from __future__ import annotations

import math
import sys
from typing import Any, Literal

import numpy as np

from . import _kernels_cpu as K
from . import _moments
from ._backend import is_device
from ._validation import as_float_array, canonical_view, check_axis

NanPolicy = Literal["propagate", "omit", "raise"]
_NAN_POLICIES = ("propagate", "omit", "raise")


class RunningStats:
    """Streaming per-feature mean and variance that can be updated chunk by chunk and merged.

    The state is ``(count, mean, M2)`` per feature, always float64, whatever the input
    dtype.  Chunks are reduced by a parallel numba kernel (blocks of rows, one shifted
    sweep per block and a second where it cancels, Chan merge); states combine with
    Chan's formula, so any split of the data into chunks, and any merge order, gives
    the same result to ~1e-12 relative.  The variance is never formed as an unshifted
    ``E[x²] - E[x]²``.

    Parameters
    ----------
    decay : float in (0, 1], optional
        Exponential forgetting: the weight of each new chunk (Finch 2009).  An empty
        state takes its first chunk whole; every later chunk enters with weight
        ``decay``: ``mean ← (1-a)·mean + a·mean_b`` and
        ``var ← (1-a)·var + a·var_b + a(1-a)(mean_b - mean)²``.  ``None`` (default)
        keeps exact, equal-weight statistics.
    nan_policy : {'propagate', 'omit', 'raise'}
        ``'propagate'`` lets a NaN turn its feature's statistics into NaN;
        ``'omit'`` skips NaNs, with a count per feature (as scikit-learn does);
        ``'raise'`` raises ``ValueError`` on a chunk with a NaN and keeps the state.

    Attributes
    ----------
    count : ndarray of float64, shape (*features)
        Number of values (or sum of weights) seen per feature.
    mean, var, std : ndarray of float64, shape (*features)
        Mean, population variance ``M2 / count`` and its square root.  NaN for a
        feature that has seen no value.

    Notes
    -----
    A call that raises leaves the state exactly as it was: the chunk's moments are
    computed first and committed only when everything has succeeded.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import RunningStats
    >>> x = np.arange(12.0).reshape(6, 2)
    >>> rs = RunningStats().update(x[:4]).update(x[4:])
    >>> rs.mean
    array([5., 6.])
    >>> rs.var
    array([11.66666667, 11.66666667])

    States built apart merge exactly, with Chan's formula:

    >>> a, b = RunningStats().update(x[:2]), RunningStats().update(x[2:])
    >>> (a + b).mean
    array([5., 6.])

    With ``decay`` the statistics forget: the second chunk weighs ``decay`` and the
    variance includes the distance between the two chunks' means.

    >>> ew = RunningStats(decay=0.5).update(np.zeros((3, 1))).update(np.full((3, 1), 2.0))
    >>> ew.mean, ew.var
    (array([1.]), array([1.]))
    """

    def __init__(self, *, decay: float | None = None, nan_policy: NanPolicy = "propagate"):
        if nan_policy not in _NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {_NAN_POLICIES}, got {nan_policy!r}")
        if decay is not None:
            decay = float(decay)
            if not (0.0 < decay <= 1.0):
                raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.decay = decay
        self.nan_policy: NanPolicy = nan_policy
        self._shape: tuple[int, ...] | None = None
        self._n: np.ndarray | None = None
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    # ------------------------------------------------------------------ state
    @property
    def shape(self) -> tuple[int, ...] | None:
        """Feature shape, fixed by the first update (``None`` before it)."""
        return self._shape

    def _require(self) -> None:
        if self._shape is None:
            raise RuntimeError("RunningStats has seen no data yet: call update() first")

    @property
    def count(self) -> np.ndarray:
        self._require()
        return self._n.reshape(self._shape).copy()

    @property
    def mean(self) -> np.ndarray:
        self._require()
        with np.errstate(invalid="ignore"):
            m = np.where(self._n > 0, self._mean, np.nan)
        return m.reshape(self._shape)

    def variance(self, ddof: int = 0) -> np.ndarray:
        """``M2 / (count - ddof)``; NaN where ``count <= ddof``.  float64, shape (*features).

        Examples
        --------
        >>> import numpy as np
        >>> rs = RunningStats().update(np.array([[1.0], [2.0], [3.0], [4.0]]))
        >>> rs.variance(), rs.variance(ddof=1)
        (array([1.25]), array([1.66666667]))
        """
        self._require()
        if ddof < 0:
            raise ValueError(f"ddof must be >= 0, got {ddof}")
        d = self._n - ddof
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(d > 0, self._m2 / np.where(d > 0, d, 1.0), np.nan)
        # a guard against -0.0 only; M2 is a sum of squares and never cancels
        v = np.where(v == 0.0, 0.0, v)
        return v.reshape(self._shape)

    @property
    def var(self) -> np.ndarray:
        return self.variance(0)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def reset(self) -> "RunningStats":
        """Forget everything, the feature shape included."""
        self._shape = None
        self._n = self._mean = self._m2 = None
        return self

    def copy(self) -> "RunningStats":
        new = RunningStats(decay=self.decay, nan_policy=self.nan_policy)
        if self._shape is not None:
            new._set(self._shape, self._n.copy(), self._mean.copy(), self._m2.copy())
        return new

    def _set(self, shape, n, mean, m2) -> None:
        self._shape = tuple(shape)
        self._n, self._mean, self._m2 = n, mean, m2

    # ----------------------------------------------------------------- update
    def chunk_moments(self, x, axis: int | None = 0, weights=None):
        """Moments of one chunk, without touching the state.

        Returns ``(feature_shape, n, mean, M2)`` with flat float64 arrays.  Used by
        :meth:`update`; exposed for code that wants per-chunk statistics.  A dask array
        is reduced where its blocks live (see :mod:`streamnorm.dask`) and computed once.

        Examples
        --------
        >>> import numpy as np
        >>> RunningStats().chunk_moments(np.arange(12.0).reshape(6, 2))
        ((2,), array([6., 6.]), array([5., 6.]), array([70., 70.]))
        """
        if _is_dask_array(x):
            from .dask import chunk_moments

            return chunk_moments(x, axis=axis, weights=weights, nan_policy=self.nan_policy)
        if is_device(x):
            from ._gpu import chunk_moments as gpu_chunk_moments

            return gpu_chunk_moments(x, axis, weights, self.nan_policy)
        x = as_float_array(x)
        if axis is None:
            x3 = canonical_view(x, (1, x.size, 1))
            fshape: tuple[int, ...] = ()
            m = x.size
        else:
            ax = check_axis(x.ndim, axis)
            m = x.shape[ax]
            a = math.prod(x.shape[:ax])
            b = math.prod(x.shape[ax + 1 :])
            fshape = x.shape[:ax] + x.shape[ax + 1 :]
            x3 = canonical_view(x, (a, m, b))
        w = None
        if weights is not None:
            w = np.asarray(weights)
            if w.dtype.kind not in "iufb":
                raise TypeError(f"weights has dtype {w.dtype}; expected real numbers")
            w = np.ascontiguousarray(w, dtype=np.float64)
            if w.shape != (m,):
                raise ValueError(
                    f"weights has shape {w.shape}; expected ({m},), one weight per sample along the axis"
                )
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError("weights must be finite and non-negative")
        omit = self.nan_policy == "omit"
        n, mean, m2 = _moments.col_moments(x3, w, omit)
        if self.nan_policy == "raise" and not (np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))):
            if np.isnan(x).any():
                raise ValueError("x contains NaN and nan_policy='raise'")
        return fshape, n, mean, m2

    def update(self, x, axis: int | None = 0, weights=None) -> "RunningStats":
        """Fold a chunk in.

        Parameters
        ----------
        x : array_like or dask array, float32 or float64 (integers are cast to float64)
            The chunk.  Samples run along ``axis``; the remaining axes are features.
            Any memory layout; a C-contiguous chunk is never copied.  A dask array
            (chunked along any axes) is one chunk: its moments are a tree reduction
            over its blocks, computed once, then merged in as for a NumPy chunk.  A
            C-contiguous float32/float64 GPU array (CuPy, PyTorch CUDA, numba) is
            reduced on the GPU; only its (F,) moments come back to the host state.
        axis : int or None
            The sample axis.  ``None`` pools every value into one scalar feature.
        weights : array_like of shape (x.shape[axis],), optional
            Non-negative per-sample weights (frequency or reliability weights); a 1-D
            dask array too when x is one.

        Returns
        -------
        self

        Examples
        --------
        >>> import numpy as np
        >>> x = np.arange(12.0).reshape(6, 2)
        >>> RunningStats().update(x, weights=[1, 1, 1, 1, 2, 2]).mean
        array([6., 7.])
        >>> RunningStats().update(x, axis=None).mean     # every value, one feature
        array(5.5)
        >>> omit = RunningStats(nan_policy="omit").update(np.array([[1.0, np.nan], [3.0, 4.0]]))
        >>> omit.count, omit.mean
        (array([2., 1.]), array([2., 4.]))
        """
        return self._fold(*self.chunk_moments(x, axis=axis, weights=weights))

    def _fold(self, fshape, n, mean, m2) -> "RunningStats":
        """Merge one chunk's moments (from :meth:`chunk_moments`) into the state."""
        if self._shape is None:
            self._set(fshape, n, mean, m2)
            return self
        if fshape != self._shape:
            raise ValueError(f"chunk has feature shape {fshape}, but the state has {self._shape}")
        if self.decay is None:
            self._set(self._shape, *K.merge_states(self._n, self._mean, self._m2, n, mean, m2))
        else:
            self._set(self._shape, *_decay_arrays(self._n, self._mean, self._m2, n, mean, m2, self.decay))
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold another state in place (Chan's merge, exact and order independent).

        Both states must have the same feature shape.  An empty ``other`` changes
        nothing.  Returns self.

        Examples
        --------
        >>> import numpy as np
        >>> x = np.arange(12.0).reshape(6, 2)
        >>> left = RunningStats().update(x[:2])
        >>> left.merge(RunningStats().update(x[2:])).variance(ddof=1)
        array([14., 14.])
        >>> left.count
        array([6., 6.])
        """
        if not isinstance(other, RunningStats):
            raise TypeError(f"can only merge a RunningStats, not {type(other).__name__}")
        if other._shape is None:
            return self
        if self._shape is None:
            self._set(other._shape, other._n.copy(), other._mean.copy(), other._m2.copy())
            return self
        if other._shape != self._shape:
            raise ValueError(f"cannot merge feature shape {other._shape} into {self._shape}")
        self._set(self._shape, *K.merge_states(self._n, self._mean, self._m2, other._n, other._mean, other._m2))
        return self

    def __add__(self, other: "RunningStats") -> "RunningStats":
        if not isinstance(other, RunningStats):
            return NotImplemented
        return self.copy().merge(other)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Copies of the state as plain NumPy arrays and scalars (round-trips exactly).

        Examples
        --------
        >>> import numpy as np
        >>> rs = RunningStats().update(np.arange(12.0).reshape(6, 2))
        >>> sorted(rs.state_dict())
        ['count', 'decay', 'm2', 'mean', 'nan_policy', 'shape']
        >>> RunningStats.from_state_dict(rs.state_dict()).mean
        array([5., 6.])
        """
        d: dict[str, Any] = {
            "decay": np.float64(np.nan if self.decay is None else self.decay),
            "nan_policy": np.str_(self.nan_policy),
        }
        if self._shape is not None:
            d["shape"] = np.array(self._shape, dtype=np.int64)
            d["count"] = self._n.copy()
            d["mean"] = self._mean.copy()
            d["m2"] = self._m2.copy()
        return d

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "RunningStats":
        """Rebuild a RunningStats from :meth:`state_dict` output, checking every key."""
        try:
            decay = float(state["decay"])
            policy = str(state["nan_policy"])
        except KeyError as e:
            raise KeyError(f"state dict is missing key {e.args[0]!r}") from None
        obj = cls(decay=None if np.isnan(decay) else decay, nan_policy=policy)  # type: ignore[arg-type]
        if "shape" not in state:
            return obj
        shape = tuple(int(s) for s in np.asarray(state["shape"]).ravel())
        size = int(np.prod(shape, dtype=np.int64))
        arrs = []
        for key in ("count", "mean", "m2"):
            if key not in state:
                raise KeyError(f"state dict is missing key {key!r}")
            a = np.array(state[key], dtype=np.float64).ravel()
            if a.shape != (size,):
                raise ValueError(f"state dict entry {key!r} has {a.size} values, expected {size}")
            arrs.append(a)
        if np.any(arrs[0] < 0) or np.any(arrs[2] < 0):
            raise ValueError("state dict has a negative count or M2")
        obj._set(shape, *arrs)
        return obj

    def __repr__(self) -> str:
        if self._shape is None:
            return "RunningStats(empty)"
        return f"RunningStats(shape={self._shape}, count={self._n.max() if self._n.size else 0:g})"


def _is_dask_array(x) -> bool:
    """True for a dask array.  Never imports dask: a dask array means it is loaded."""
    dask_array = sys.modules.get("dask.array")
    return dask_array is not None and isinstance(x, dask_array.Array)


def _decay_arrays(na, ma, m2a, nb, mb, m2b, a):
    """Exponential forgetting (docs/math.rst); M2 is kept as ``var * count``."""
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        va = np.where(na > 0, m2a / np.where(na > 0, na, 1.0), 0.0)
        vb = np.where(nb > 0, m2b / np.where(nb > 0, nb, 1.0), 0.0)
        d = mb - ma
        mean = (1 - a) * ma + a * mb
        var = (1 - a) * va + a * vb + a * (1 - a) * d * d
    mean = np.where(nb == 0, ma, np.where(na == 0, mb, mean))
    var = np.where(nb == 0, va, np.where(na == 0, vb, var))
    return n, mean, var * n
