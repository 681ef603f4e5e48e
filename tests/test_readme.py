"""The README's training-loop example runs and learns."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_batchnorm_training_loop_example_learns():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    loop = next(b for b in blocks if "bn.backward" in b)
    ns: dict = {}
    exec(compile(loop, "README.md", "exec"), ns)
    bn, X, y, W1, W2 = ns["bn"], ns["X"], ns["y"], ns["W1"], ns["W2"]
    assert not bn.training and bn.num_batches_tracked == 50
    acc = ((np.maximum(bn(X @ W1), 0) @ W2).argmax(1) == y).mean()
    assert acc > 0.5  # three random classes: chance is 1/3; the loop fits the training set
