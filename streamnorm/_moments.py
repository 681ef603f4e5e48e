"""Kernel dispatch for moment computations (docs/math.rst).  Private.

Picks the kernel for a canonical view and the block sizes that keep a block in cache.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _kernels_cpu as K

# A block of about this many values is reduced by a two-pass while it sits in cache
# (16k values: 128 KiB in float64, so that it and the next block, prefetched
# during its second sweep, sit in any current L2).
_BLOCK_VALUES = 16384
# The column kernel sweeps a block once (a second time only where its sums cancel,
# from cache), so its blocks can be larger: 128k values, whose Chan merges then cost
# little beside the sweep.
_COL_BLOCK_VALUES = 131072


def nthreads() -> int:
    """The number of threads the kernels split work into (``numba.get_num_threads()``)."""
    return int(numba.get_num_threads())


def col_moments(x3: np.ndarray, weights: np.ndarray | None = None, omit: bool = False):
    """(n, mean, M2), each (A*B,) float64, of ``x3`` (A, M, B) over its middle axis."""
    A, M, B = x3.shape
    if M == 0 or A * B == 0:
        z = np.zeros(A * B)
        return z, z.copy(), z.copy()
    if weights is None:
        block = max(8, _COL_BLOCK_VALUES // max(B, 1))
        n, mean, m2 = K.col_moments(x3, nthreads(), block)
        if omit and not K.all_finite(mean, m2):
            # NaN-free data (the common case) needs no NaN-skipping: the plain kernel is
            # faster, and its statistics are finite exactly when there is no NaN or inf
            n, mean, m2 = K.col_moments_omit(x3, nthreads(), block)
        return n, mean, m2
    w = np.empty(0) if weights is None else weights
    return K.col_moments_general(x3, w, weights is not None, omit, nthreads())


def ncl_moments(x3: np.ndarray):
    """(n, mean, M2), each (C,) float64, of ``x3`` (N, C, L) over N and L."""
    N, C, L = x3.shape
    if L == 1:
        n, m, m2 = col_moments(x3.reshape(1, N, C))
        return n, m, m2
    return K.ncl_moments(np.ascontiguousarray(x3), nthreads(), _BLOCK_VALUES)
