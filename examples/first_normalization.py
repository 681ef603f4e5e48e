"""A first normalization: features of very different scales through BatchNorm and friends.

::

    python examples/first_normalization.py
"""

import numpy as np

import streamnorm as sn

rng = np.random.default_rng(0)
# 256 samples of 4 features whose means and spreads differ by orders of magnitude
x = rng.normal(loc=[0.0, 5.0, -3.0, 100.0], scale=[1.0, 2.0, 0.5, 10.0], size=(256, 4))

# BatchNorm, train mode: every feature with the mean and variance of this batch
bn = sn.BatchNorm1d(4)
y = bn(x)                                         # same as bn.forward(x)
print("mean per feature:", y.mean(axis=0).round(6) + 0.0)
print("std per feature: ", y.std(axis=0).round(4))

# The backward takes the gradient of a loss with respect to y and returns the one
# with respect to x; it overwrites bn.grads for the learnable weight and bias.
dy = rng.normal(size=y.shape)
dx = bn.backward(dy)
print("dx:", dx.shape, dx.dtype, "| grads:", {k: g.shape for k, g in bn.grads.items()})

# Each train-mode batch moves the running statistics 10 % of the way (momentum=0.1)
# from their start, mean 0 and variance 1, towards the batch's statistics.
print("running_mean after 1 batch:  ", (bn.running_mean.round(2) + 0.0).tolist())
for _ in range(49):
    bn(rng.normal(loc=[0.0, 5.0, -3.0, 100.0], scale=[1.0, 2.0, 0.5, 10.0], size=(256, 4)))
print("running_mean after 50 batches:", (bn.running_mean.round(2) + 0.0).tolist())

# Eval mode normalizes with the running statistics: any batch size, one sample too.
bn.eval()
print("one sample in eval mode:", bn(x[:1]).round(2))

# LayerNorm normalizes each sample over its features instead: no batch needed.
ln = sn.LayerNorm(4)
z = ln(x[:1])
print("LayerNorm of one sample:", z.round(2), "mean", round(float(z.mean()), 6) + 0.0)

# RunningStats keeps the exact mean and variance of data that arrives in pieces.
rs = sn.RunningStats()
for chunk in np.array_split(x, 7):
    rs.update(chunk)
print("streamed equals whole:", np.allclose(rs.mean, x.mean(axis=0)), np.allclose(rs.var, x.var(axis=0)))
