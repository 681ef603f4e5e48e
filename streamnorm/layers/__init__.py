"""Layers: thin objects over :mod:`streamnorm.functional`."""

from .base import Layer
from .batch import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .group import GroupNorm, InstanceNorm
from .layer import LayerNorm, RMSNorm
from .online import OnlineNorm
from .sync import SyncBatchNorm

__all__ = [
    "Layer",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "OnlineNorm",
    "RMSNorm",
    "SyncBatchNorm",
]
