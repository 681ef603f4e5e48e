"""The vector-width hint of the CPU kernels reaches the compiled function, and only
the functions that ask for it (tests/test_threads.py checks the kernels' bits)."""

import numpy as np
from numba import njit

from streamnorm import _kernels_cpu as K


def test_wide_vectors_sets_the_function_attribute():
    @njit
    def total(v):
        K._wide_vectors()
        s = 0.0
        for j in range(v.shape[0]):
            s += v[j]
        return s

    v = np.arange(100.0)
    assert total(v) == v.sum()
    ir = total.inspect_llvm(total.signatures[0])
    assert '"prefer-vector-width"="512"' in ir


def test_without_the_hint_no_attribute():
    @njit
    def total(v):
        s = 0.0
        for j in range(v.shape[0]):
            s += v[j]
        return s

    total(np.arange(4.0))
    assert "prefer-vector-width" not in total.inspect_llvm(total.signatures[0])
