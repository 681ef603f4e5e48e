"""Slow, obviously correct references.  Independent of streamnorm's code."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def exact_mean_var(values) -> tuple[float, float]:
    """Exact population mean and variance of float values, rounded once to float64."""
    fr = [Fraction(float(v)) for v in values]
    n = len(fr)
    mu = sum(fr, Fraction(0)) / n
    var = sum(((v - mu) ** 2 for v in fr), Fraction(0)) / n
    return float(mu), float(var)


def fsum_mean_var(values) -> tuple[float, float]:
    """Mean and variance with math.fsum (correctly rounded sums), two passes."""
    v = [float(a) for a in values]
    n = len(v)
    mu = math.fsum(v) / n
    return mu, math.fsum((a - mu) ** 2 for a in v) / n


def batch_norm_ref(x, weight, bias, eps, axis=1, mean=None, var=None):
    """Plain NumPy BatchNorm forward; returns y, batch mean, biased batch var."""
    x = np.asarray(x, dtype=np.float64)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shp = [1] * x.ndim
    shp[ax] = x.shape[ax]
    if mean is None:
        mean = x.mean(axis=red)
        var = ((x - mean.reshape(shp)) ** 2).mean(axis=red)
    y = (x - mean.reshape(shp)) / np.sqrt(var.reshape(shp) + eps)
    if weight is not None:
        y = y * np.asarray(weight).reshape(shp) + np.asarray(bias).reshape(shp)
    return y, mean, var


def layer_norm_ref(x, ndim, weight, bias, eps, center=True):
    """Plain NumPy LayerNorm (center=True) or RMSNorm (center=False) over the last ndim axes."""
    x = np.asarray(x, dtype=np.float64)
    red = tuple(range(x.ndim - ndim, x.ndim))
    mu = x.mean(axis=red, keepdims=True) if center else 0.0
    var = ((x - mu) ** 2).mean(axis=red, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def numerical_grad(f, x, dy, h=1e-6):
    """Central differences of L(x) = Σ f(x)·dy, one element at a time (x float64, modified in place)."""
    g = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = np.sum(f(x) * dy)
        x[i] = old - h
        fm = np.sum(f(x) * dy)
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g
