"""StreamScaler and normalize_stream: standardizing feature streams (docs/math.rst and docs/streams.rst)."""

from __future__ import annotations

import inspect
import os
import sys
import zipfile
from typing import Any, Iterable, Iterator, Literal

import numpy as np

from . import _kernels_cpu as K
from . import _memory
from ._validation import as_float_array
from .stats import RunningStats, _is_dask_array

_FORMAT = "streamnorm.StreamScaler"
_FORMAT_VERSION = 1
#: fitted attributes derived from the statistics when first read after a change
_DERIVED = ("mean_", "var_", "scale_", "n_samples_seen_")


class _EstimatorBase:
    """scikit-learn's estimator conventions without depending on scikit-learn.

    ``get_params`` / ``set_params`` read the constructor's signature, so
    ``sklearn.base.clone`` and ``Pipeline`` work.  When scikit-learn is installed its
    ``BaseEstimator`` is mixed in as well (tags, HTML repr, feature names).
    """

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params):
        valid = self._param_names()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}; valid: {valid}")
            setattr(self, k, v)
        return self


try:  # pragma: no cover - exercised when scikit-learn is installed
    from sklearn.base import BaseEstimator as _SkBase
    from sklearn.base import OneToOneFeatureMixin as _SkOneToOne
    from sklearn.base import TransformerMixin as _SkTransformer

    _BASES: tuple[type, ...] = (_SkOneToOne, _SkTransformer, _SkBase)
except ImportError:  # pragma: no cover
    _BASES = (_EstimatorBase,)


def _not_fitted(est) -> None:
    try:
        from sklearn.exceptions import NotFittedError
    except ImportError:  # pragma: no cover
        NotFittedError = AttributeError  # type: ignore[misc,assignment]
    raise NotFittedError(
        f"This {type(est).__name__} instance is not fitted yet. Call 'fit' or 'partial_fit' with "
        "appropriate arguments before using this estimator."
    )


class StreamScaler(*_BASES):  # type: ignore[misc]
    """Standardize features chunk by chunk: ``(X - mean_) / scale_``.

    Statistics are a :class:`~streamnorm.RunningStats` (float64 Welford/Chan states), so
    fitting on chunks gives the same result as fitting on the concatenation, two
    scalers fitted on different parts of a stream can be merged exactly, and the
    variance never cancels.

    Parameters
    ----------
    with_mean : bool
        Subtract the mean.
    with_std : bool
        Divide by the standard deviation.
    decay : float in (0, 1], optional
        Exponential forgetting for drifting streams: the weight of each new chunk
        (docs/math.rst).  None keeps exact, equal-weight statistics.
    half_life : float, optional
        Alternative to ``decay``, in chunks: a chunk's weight halves after
        ``half_life`` further chunks (``decay = 1 - 0.5 ** (1 / half_life)``).
    nan_policy : {'omit', 'propagate', 'raise'}
        ``'omit'`` (default) skips NaNs in fit with per-feature counts; transform keeps
        NaNs where they are.
    min_scale : float
        The scale floor: ``scale_ = max(std, min_scale)``, so a constant or
        near-constant feature is divided by at most ``1/min_scale`` and never by ~0.
        A constant feature maps to exactly 0.
    copy : bool
        ``transform`` returns a new array (True) or may work in place (False) when the
        input is a writable float array.

    Attributes
    ----------
    mean_ : ndarray of float64, shape (n_features,) or None
    var_ : ndarray of float64, shape (n_features,) or None
        Population variance.
    scale_ : ndarray of float64, shape (n_features,) or None
    n_samples_seen_ : int or ndarray of int, shape (n_features,)
        An array when NaNs made the counts differ between features.
    n_features_in_ : int

    ``mean_``, ``var_``, ``scale_`` and ``n_samples_seen_`` are derived from the
    statistics when first read after a fit step, with the parameters that step ran
    with (a later ``set_params`` applies from the next step), so fitting a stream of
    small chunks does not pay for them chunk by chunk.

    Examples
    --------
    >>> import numpy as np
    >>> from streamnorm import StreamScaler
    >>> X = np.arange(12.0).reshape(6, 2)
    >>> sc = StreamScaler()
    >>> for chunk in np.array_split(X, 3):
    ...     _ = sc.partial_fit(chunk)
    >>> sc.mean_
    array([5., 6.])
    >>> np.round(sc.transform(X[:2]), 3)
    array([[-1.464, -1.464],
           [-0.878, -0.878]])

    ``half_life`` (or ``decay``) makes the statistics follow a drifting stream: here
    every new chunk weighs one half.

    >>> drifting = StreamScaler(half_life=1)
    >>> _ = drifting.partial_fit(np.zeros((2, 1))).partial_fit(np.full((2, 1), 4.0))
    >>> drifting.mean_, drifting.var_
    (array([2.]), array([4.]))
    """

    def __init__(
        self,
        with_mean: bool = True,
        with_std: bool = True,
        decay: float | None = None,
        half_life: float | None = None,
        nan_policy: Literal["omit", "propagate", "raise"] = "omit",
        min_scale: float = 1e-8,
        copy: bool = True,
    ):
        self.with_mean = with_mean
        self.with_std = with_std
        self.decay = decay
        self.half_life = half_life
        self.nan_policy = nan_policy
        self.min_scale = min_scale
        self.copy = copy

    # ------------------------------------------------------------ validation
    def _decay_value(self) -> float | None:
        if self.decay is not None and self.half_life is not None:
            raise ValueError("give decay or half_life, not both")
        if self.half_life is not None:
            h = float(self.half_life)
            if not h > 0:
                raise ValueError(f"half_life must be positive, got {self.half_life!r}")
            return 1.0 - 0.5 ** (1.0 / h)
        return self.decay

    def _check_X(self, X, *, reset: bool) -> np.ndarray:
        _reject_sparse(X)
        if _is_dask_array(X):  # checked lazily, never materialized
            from .dask import check_X

            X = check_X(X)
        else:
            X = np.asarray(X)
            if X.dtype.kind == "c":
                raise ValueError(f"Complex data not supported: X has dtype {X.dtype}")
            if X.dtype.kind == "O":
                try:
                    X = X.astype(np.float64)
                except (TypeError, ValueError) as e:
                    raise TypeError(f"X has dtype object and cannot be converted to float: {e}") from None
            X = as_float_array(X, "X")
        if X.ndim != 2:
            raise ValueError(
                f"Expected 2D array, got {X.ndim}D array instead (shape {X.shape}). Reshape your data either "
                "using X.reshape(-1, 1) if your data has a single feature or X.reshape(1, -1) if it contains "
                "a single sample."
            )
        if reset and X.shape[1] == 0:
            raise ValueError(f"0 feature(s) (shape={X.shape}) while a minimum of 1 is required.")
        if not reset and X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        return X

    def _record_feature_names(self, X, reset: bool) -> None:
        names = getattr(X, "columns", None)
        if names is not None and reset:
            self.feature_names_in_ = np.asarray([str(c) for c in names], dtype=object)

    # --------------------------------------------------------------- fitting
    def partial_fit(self, X, y=None, sample_weight=None):
        """Fold one chunk into the statistics.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features), float32 or float64
            A dask array is fitted where its blocks live, with one ``compute()``
            (see :mod:`streamnorm.dask`).
        y : ignored
        sample_weight : array_like of shape (n_samples,), optional
            Non-negative weights (a 1-D dask array too, when X is one).

        Returns
        -------
        self
        """
        first = not hasattr(self, "_stats")
        Xa = self._check_X(X, reset=first)
        if first and Xa.shape[0] == 0:
            raise ValueError(f"Found array with 0 sample(s) (shape={Xa.shape}) while a minimum of 1 is required.")
        if self.nan_policy not in ("omit", "propagate", "raise"):
            raise ValueError(f"nan_policy must be 'omit', 'propagate' or 'raise', got {self.nan_policy!r}")
        ms = float(self.min_scale)
        if not ms > 0:
            raise ValueError(f"min_scale must be positive, got {self.min_scale!r}")
        stats = RunningStats(decay=self._decay_value(), nan_policy=self.nan_policy) if first else self._stats
        if _is_dask_array(Xa):
            from .dask import scaler_moments

            # one compute; the weight, NaN and inf checks run in the blocks' tasks
            moments = scaler_moments(Xa, sample_weight, self.nan_policy)
        else:
            if sample_weight is not None:
                w = np.asarray(sample_weight, dtype=np.float64)
                if w.size and not np.any(w):
                    raise ValueError("sample_weight is all zeros: at least one sample must have a non-zero weight")
            moments = stats.chunk_moments(Xa, axis=0, weights=sample_weight)
            _raise_on_inf(Xa, moments[2], moments[3])  # finite statistics: no inf, no scan
        # every check has passed: only now is the state changed
        stats._fold(*moments)
        self._stats = stats
        if first:
            self.n_features_in_ = Xa.shape[1]
            self._record_feature_names(X, True)
        self._stale()
        return self

    def fit(self, X, y=None, sample_weight=None):
        """Fit from scratch on an array, or on any iterable of chunks (arrays).

        Returns
        -------
        self

        Examples
        --------
        >>> import numpy as np
        >>> X = np.arange(12.0).reshape(6, 2)
        >>> sc = StreamScaler().fit(iter(np.array_split(X, 3)))   # a generator works too
        >>> sc.mean_, sc.n_samples_seen_
        (array([5., 6.]), 6)
        """
        self._reset()
        _reject_sparse(X)
        if isinstance(X, np.ndarray) or hasattr(X, "__array__") or not _is_chunk_iterable(X):
            return self.partial_fit(X, y, sample_weight=sample_weight)
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported with an iterable of chunks; use partial_fit")
        seen = False
        for chunk in X:
            self.partial_fit(chunk)
            seen = True
        if not seen:
            raise ValueError("fit got an empty iterable of chunks")
        return self

    def _reset(self) -> None:
        for attr in ("_stats", "_derived", *_DERIVED, "n_features_in_", "feature_names_in_"):
            self.__dict__.pop(attr, None)

    def _stale(self) -> None:
        """Mark the fitted attributes out of date after the state changed: they are
        derived again when next read (:meth:`__getattr__`), so a stream of small chunks
        pays for them once, not once per chunk.  The parameters they depend on are
        taken now, so that they describe the scaler as it was fitted."""
        d = self.__dict__
        for attr in _DERIVED:
            d.pop(attr, None)  # an attribute a user set by hand
        d["_derived"] = _Derived((float(self.min_scale), self.with_mean, self.with_std))

    def __getattr__(self, name: str):
        # reached only when normal lookup fails, as for the derived attributes
        derived = self.__dict__.get("_derived")
        if derived is not None and name in _DERIVED:
            return derived.get(self.__dict__["_stats"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def merge(self, other: "StreamScaler") -> "StreamScaler":
        """Fold another fitted scaler's statistics in (exact Chan merge).  Returns self.

        Examples
        --------
        >>> import numpy as np
        >>> X = np.arange(12.0).reshape(6, 2)
        >>> left, right = StreamScaler().fit(X[:2]), StreamScaler().fit(X[2:])
        >>> left.merge(right).mean_, left.n_samples_seen_
        (array([5., 6.]), 6)
        """
        if not isinstance(other, StreamScaler):
            raise TypeError(f"can only merge a StreamScaler, not {type(other).__name__}")
        if not hasattr(other, "_stats"):
            _not_fitted(other)
        if not hasattr(self, "_stats"):
            _not_fitted(self)
        if other.n_features_in_ != self.n_features_in_:
            raise ValueError(f"cannot merge a scaler of {other.n_features_in_} features into one of {self.n_features_in_}")
        self._stats = self._stats.copy().merge(other._stats)
        self._stale()
        return self

    # ------------------------------------------------------------- transform
    def _shift_scale(self) -> tuple[np.ndarray, np.ndarray]:
        F = self.n_features_in_
        shift = self.mean_ if self.with_mean else np.zeros(F)
        scale = self.scale_ if self.with_std else np.ones(F)
        return np.where(np.isnan(shift), 0.0, shift), scale

    def transform(self, X, copy: bool | None = None):
        """Standardize X with the fitted statistics; NaNs stay NaN.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
        copy : bool, optional
            Overrides the ``copy`` parameter.

        Returns
        -------
        ndarray of shape (n_samples, n_features), X's float dtype (float64 for integers)
            A lazy dask array, chunked like X, when X is a dask array (``copy`` has no
            effect there: dask blocks are never modified in place).
        """
        return self._affine(X, copy, inverse=False)

    def inverse_transform(self, X, copy: bool | None = None):
        """Map standardized data back: ``X * scale_ + mean_``.

        Examples
        --------
        >>> import numpy as np
        >>> X = np.arange(12.0).reshape(6, 2)
        >>> sc = StreamScaler().fit(X)
        >>> sc.inverse_transform(sc.transform(X[:1]))
        array([[0., 1.]])
        """
        return self._affine(X, copy, inverse=True)

    def _affine(self, X, copy: bool | None, inverse: bool) -> np.ndarray:
        """``(X - mean_) / scale_`` or its inverse, in one pass of the per-feature kernel."""
        if not hasattr(self, "_stats"):
            _not_fitted(self)
        Xa = self._check_X(X, reset=False)
        mean, scale = self._shift_scale()
        zero = np.zeros_like(mean)
        if _is_dask_array(Xa):  # lazy, block by block; the statistics enter the graph once
            from .dask import affine

            return affine(Xa, zero, scale, mean) if inverse else affine(Xa, mean, 1.0 / scale, zero)
        _raise_on_inf(Xa)
        out = _out_array(Xa, self.copy if copy is None else copy)
        if Xa.size:
            sub, mul, add = (zero, scale, mean) if inverse else (mean, 1.0 / scale, zero)
            K.affine(Xa, sub, mul, add, out)
        return out

    def fit_transform(self, X, y=None, sample_weight=None):
        """``fit`` then ``transform`` on the same array."""
        return self.fit(X, y, sample_weight=sample_weight).transform(X)

    # ----------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Write parameters and statistics to a ``.npz`` file (no pickle).

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> sc = StreamScaler(half_life=10).fit(np.arange(12.0).reshape(6, 2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "scaler.npz")
        ...     sc.save(path)
        ...     loaded = StreamScaler.load(path)
        >>> loaded.mean_, loaded.half_life
        (array([5., 6.]), 10.0)
        """
        if not hasattr(self, "_stats"):
            _not_fitted(self)
        params = self.get_params()
        sd = self._stats.state_dict()
        arrays = {
            "format": np.str_(_FORMAT),
            "format_version": np.int64(_FORMAT_VERSION),
            "with_mean": np.bool_(params["with_mean"]),
            "with_std": np.bool_(params["with_std"]),
            "decay": np.float64(np.nan if params["decay"] is None else params["decay"]),
            "half_life": np.float64(np.nan if params["half_life"] is None else params["half_life"]),
            "nan_policy": np.str_(params["nan_policy"]),
            "min_scale": np.float64(params["min_scale"]),
            "copy": np.bool_(params["copy"]),
            "count": sd["count"],
            "mean": sd["mean"],
            "m2": sd["m2"],
        }
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> "StreamScaler":
        """Read a scaler written by :meth:`save`; a corrupt or foreign file raises ValueError."""
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{os.fspath(path)!r} is not a readable StreamScaler file: {e}") from None
        if str(data.get("format", "")) != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a StreamScaler file (no '{_FORMAT}' format tag)")
        if int(data.get("format_version", -1)) != _FORMAT_VERSION:
            raise ValueError(f"unsupported StreamScaler file version {data.get('format_version')!r}")
        try:
            decay = float(data["decay"])
            half = float(data["half_life"])
            sc = cls(
                with_mean=bool(data["with_mean"]),
                with_std=bool(data["with_std"]),
                decay=None if np.isnan(decay) else decay,
                half_life=None if np.isnan(half) else half,
                nan_policy=str(data["nan_policy"]),  # type: ignore[arg-type]
                min_scale=float(data["min_scale"]),
                copy=bool(data["copy"]),
            )
            count, mean, m2 = (np.asarray(data[k], dtype=np.float64) for k in ("count", "mean", "m2"))
        except KeyError as e:
            raise ValueError(f"{os.fspath(path)!r} is missing the entry {e.args[0]!r}") from None
        if count.ndim != 1 or count.shape != mean.shape or count.shape != m2.shape or count.size == 0:
            raise ValueError(f"{os.fspath(path)!r} has inconsistent statistics arrays")
        sc._stats = RunningStats.from_state_dict(
            {
                "decay": np.float64(np.nan if sc._decay_value() is None else sc._decay_value()),
                "nan_policy": sc.nan_policy,
                "shape": np.array([count.size]),
                "count": count,
                "mean": mean,
                "m2": m2,
            }
        )
        sc.n_features_in_ = int(count.size)
        sc._stale()
        return sc

    def __sklearn_tags__(self):  # pragma: no cover - only with scikit-learn
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.requires_fit = True
        return tags


class _Derived:
    """The fitted attributes of one state of a :class:`StreamScaler`, computed on first
    read.  They live here rather than in the scaler's ``__dict__``, so that reading
    them (``transform`` does) leaves the scaler's attributes as they were."""

    __slots__ = ("params", "values")

    def __init__(self, params: tuple[float, bool, bool]):
        self.params = params
        self.values: dict[str, Any] | None = None

    def get(self, stats: RunningStats, name: str):
        values = self.values
        if values is None:  # two threads may both get here; they compute the same
            values = self.values = self._compute(stats, *self.params)
        return values[name]

    @staticmethod
    def _compute(st: RunningStats, min_scale: float, with_mean: bool, with_std: bool) -> dict[str, Any]:
        n = st._n
        mean, var, scale, uniform = K.scaler_attributes(n, st._mean, st._m2, min_scale)
        n0 = float(n[0]) if n.size else 0.0
        # a feature without statistics (NaN: it has seen only NaN, or NaN propagated)
        # keeps a NaN scale, so its transform is NaN rather than x / min_scale
        return {
            "n_samples_seen_": int(n0) if uniform and n0.is_integer() else n.copy(),
            "mean_": mean if with_mean or with_std else None,
            "var_": var if with_std else None,
            "scale_": scale if with_std else None,
        }


def _reject_sparse(X) -> None:
    if type(X).__module__.startswith("scipy.sparse") or hasattr(X, "tocsr"):
        raise TypeError("StreamScaler does not support sparse input; pass a dense array (X.toarray())")


def _raise_on_inf(X: np.ndarray, mean=None, m2=None) -> None:
    """Raise on ±inf in X.  X's statistics (``mean`` and ``m2``, float64), when given
    and finite, let the common case skip the scan of X."""
    if mean is not None and K.all_finite(mean, m2):
        return
    if np.isinf(X).any():
        raise ValueError("Input X contains infinity or a value too large for dtype('float64').")


def _is_chunk_iterable(X) -> bool:
    return isinstance(X, Iterable) and not isinstance(X, (str, bytes, list, tuple))


def _out_array(X: np.ndarray, copy: bool) -> np.ndarray:
    if not copy and X.flags.writeable and X.dtype in (np.float32, np.float64):
        return X
    return _memory.empty(X.shape, X.dtype, near=X)


# ---------------------------------------------------------------------------
# normalize_stream
# ---------------------------------------------------------------------------

_MODES = ("frozen", "prequential", "running")


def normalize_stream(
    chunks: Iterable,
    scaler: StreamScaler | None = None,
    mode: Literal["frozen", "prequential", "running"] = "prequential",
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """Normalize a stream of chunks, one chunk at a time (docs/streams.rst).

    Parameters
    ----------
    chunks : iterable of array_like, each of shape (n_i, n_features)
        Arrays, slices of a ``np.memmap``, a generator...  A chunk may hold one row.
    scaler : StreamScaler, optional
        The statistics to start from (updated in place in the adaptive modes).  Required
        for ``'frozen'``; a new ``StreamScaler()`` otherwise.
    mode : {'frozen', 'prequential', 'running'}
        ``'frozen'``: every chunk with the scaler's statistics, nothing updated.
        ``'prequential'``: chunk i with the statistics of everything before it, then
        the statistics take chunk i in (no look-ahead); when nothing has been seen at
        all, the first chunk is normalized with its own statistics.
        ``'running'``: the statistics take chunk i in first, then chunk i is
        normalized with them.
    progress : bool
        Show a progress bar (tqdm when installed, else a line on stderr).

    Yields
    ------
    ndarray of shape (n_i, n_features)
        Each chunk normalized, in the chunk's float dtype.  Memory: one chunk plus
        O(n_features).

    Examples
    --------
    >>> import numpy as np
    >>> chunks = [np.array([[0.0], [2.0]]), np.array([[4.0]]), np.array([[1.0], [3.0]])]

    Prequential: the first chunk with its own statistics, every later one with the
    statistics of the chunks before it (here mean 1 and std 1, then mean 2 and
    variance 8/3):

    >>> for out in normalize_stream(chunks):
    ...     print(np.round(out.ravel(), 4))
    [-1.  1.]
    [3.]
    [-0.6124  0.6124]

    Frozen: every chunk with the statistics the scaler was fitted with.

    >>> reference = StreamScaler().fit(np.array([[0.0], [2.0]]))
    >>> [out.ravel().tolist() for out in normalize_stream(chunks, reference, mode="frozen")]
    [[-1.0, 1.0], [3.0], [0.0, 2.0]]
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if scaler is None:
        if mode == "frozen":
            raise ValueError("mode='frozen' needs a fitted scaler")
        scaler = StreamScaler()
    elif not isinstance(scaler, StreamScaler):
        raise TypeError(f"scaler must be a StreamScaler, not {type(scaler).__name__}")
    if mode == "frozen" and not hasattr(scaler, "_stats"):
        _not_fitted(scaler)
    bar = _progress(progress, chunks)
    try:
        for chunk in bar.iterate():
            if mode == "frozen":
                yield scaler.transform(chunk)
            elif mode == "running":
                scaler.partial_fit(chunk)
                yield scaler.transform(chunk)
            else:  # prequential
                if not hasattr(scaler, "_stats"):
                    scaler.partial_fit(chunk)
                    yield scaler.transform(chunk)
                    continue
                out = scaler.transform(chunk)
                scaler.partial_fit(chunk)
                yield out
    finally:
        bar.close()


class _progress:
    """tqdm when installed and asked for, a plain counter on stderr otherwise."""

    def __init__(self, enabled: bool, it: Iterable):
        self.it = it
        self.enabled = enabled
        self.bar = None
        self.count = 0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=len(it) if hasattr(it, "__len__") else None, unit="chunk")
            except ImportError:
                self.bar = None

    def iterate(self):
        for item in self.it:
            yield item
            self.count += 1
            if self.bar is not None:
                self.bar.update(1)
            elif self.enabled:
                print(f"\rnormalize_stream: {self.count} chunks", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
