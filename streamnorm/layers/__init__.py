"""Layers: thin objects over :mod:`streamnorm.functional`."""

from .base import Layer
from .batch import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .layer import LayerNorm

__all__ = ["Layer", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm"]
