"""streamnorm: exact, fast, streaming normalization layers for NumPy.

Public names only; see the documentation for the guide and the mathematics.
"""

from typing import TYPE_CHECKING

from . import comm, functional
from .layers import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm,
    Layer,
    LayerNorm,
    OnlineNorm,
    RMSNorm,
    SyncBatchNorm,
)
from .stats import RunningStats

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from . import dask, tta
    from .scaler import StreamScaler, normalize_stream

# StreamScaler mixes in scikit-learn's estimator base classes when scikit-learn is
# installed, and importing scikit-learn costs most of a second: load it on first use.
_LAZY = {"StreamScaler": "scaler", "normalize_stream": "scaler", "tta": None, "dask": None}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        value = mod if _LAZY[name] is None else getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'streamnorm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm",
    "Layer",
    "LayerNorm",
    "OnlineNorm",
    "RMSNorm",
    "RunningStats",
    "StreamScaler",
    "SyncBatchNorm",
    "normalize_stream",
    "comm",
    "dask",
    "functional",
    "tta",
    "__version__",
]
