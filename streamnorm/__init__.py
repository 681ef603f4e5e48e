"""streamnorm: exact, fast, streaming normalization layers for NumPy.

Public names only; see the documentation for the guide and the mathematics.
"""

from . import functional
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
)
from .scaler import StreamScaler, normalize_stream
from .stats import RunningStats

__version__ = "0.1.0"

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
    "normalize_stream",
    "functional",
    "__version__",
]
