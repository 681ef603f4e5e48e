"""Scalar Welford and Chan helpers (docs/math.rst).

These are plain Python functions on scalars.  The CPU backend compiles them with
``numba.njit(inline='always')``; a CUDA backend can compile the very same source with
``numba.cuda.jit(device=True)``.  Keeping one source for both is what guarantees that
the CPU and GPU states merge by the same formula.

A state is the triple ``(n, mean, m2)``: the weight sum (a count when unweighted), the
mean, and the sum of squared deviations from the mean.  The empty state is
``(0, 0, 0)``.
"""

from __future__ import annotations


def chan_merge(na, ma, m2a, nb, mb, m2b):
    """Merge state B into state A (Chan, Golub and LeVeque, 1979).

    ``n = na + nb; d = mb - ma; mean = ma + d * nb / n; m2 = m2a + m2b + d² na nb / n``.

    Merging with an empty state returns the other state exactly (``nb / n`` is exactly
    1 or 0), and two states with equal means keep that mean exactly.  Running sums
    ``na * ma + nb * mb`` are never formed, so large counts cannot overflow.
    """
    n = na + nb
    if nb == 0:
        return na, ma, m2a
    if na == 0:
        return nb, mb, m2b
    d = mb - ma
    f = nb / n
    return n, ma + d * f, m2a + m2b + d * d * na * f


def welford_add(n, mean, m2, x, w):
    """Fold one value ``x`` with weight ``w > 0`` into a state (West, 1979)."""
    n = n + w
    d = x - mean
    mean = mean + (w / n) * d
    m2 = m2 + w * d * (x - mean)
    return n, mean, m2
