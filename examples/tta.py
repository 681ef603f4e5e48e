"""Test-time adaptation: a BatchNorm network meets shifted digits.

Trains the network of ``training_loop.py``, then shifts the held-out images (lower
contrast, higher brightness, pixel noise, at severities 0 to 5) and measures the
accuracy of every way to adapt its BatchNorm layers without labels: each mode of
``BatchNorm.adapt``, and entropy minimization (TENT) with ``streamnorm.tta.Tent``::

    python examples/tta.py
    python examples/tta.py --quick
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import streamnorm as sn
from streamnorm.tta import Tent, entropy
from training_loop import load_data, make_mlp, quick_mode, train


def shift(X, severity: int, seed: int = 1):
    """Covariate shift: the labels stay, the pixel statistics move."""
    if severity == 0:
        return X
    rng = np.random.default_rng(seed + severity)
    mean = X.mean(axis=1, keepdims=True)
    contrast, brightness, noise = 1.0 - 0.13 * severity, 0.12 * severity, 0.06 * severity
    return mean + contrast * (X - mean) + brightness + noise * rng.standard_normal(X.shape)


def stream_accuracy(model, X, y, batch_size: int, tent: Tent | None = None) -> float:
    """Predict the test batches in order, as a deployed model would see them."""
    hits = 0
    # batches of batch_size or a few more: a trailing batch of one sample would have
    # no variance, and every adaptation mode uses the statistics of the batch
    for idx in np.array_split(np.arange(len(y)), len(y) // batch_size):
        xb, yb = X[idx], y[idx]
        if tent is not None:
            tent.begin()                         # restores the source state if episodic
        logits = model(xb)                       # adapting layers update before normalizing
        if tent is not None:                     # TENT: predict, then step on the entropy
            _, dlogits = entropy(logits)
            model.backward(dlogits)              # fills the BatchNorm layers' grads
            tent.step()                          # Adam on weight and bias only
        hits += int((logits.argmax(axis=1) == yb).sum())
    return hits / len(y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, severities 0 and 4")
    parser.parse_args(argv)
    quick = quick_mode(argv)
    severities = (0, 4) if quick else (0, 1, 2, 3, 4, 5)

    data = load_data()
    Xte, yte = data[2], data[3]              # 597 held-out digits
    model = make_mlp(sn.BatchNorm1d, width=64)
    train(model, data, epochs=2 if quick else 20)
    model.eval()
    norms = model.norms()                        # the two BatchNorm1d layers
    source = [n.state_dict() for n in norms]

    methods = {                                  # name: (adapt mode, options, batch size)
        "no adaptation": (None, {}, 64),
        "adapt('batch')": ("batch", {}, 64),
        "adapt('prior', prior_strength=16)": ("prior", {"prior_strength": 16}, 64),
        "adapt('ema', momentum=0.1)": ("ema", {"momentum": 0.1}, 64),
        "adapt('cumulative')": ("cumulative", {}, 64),
        "adapt('dua'), batches of 16": ("dua", {}, 16),
        "adapt('prior'), batches of 4": ("prior", {"prior_strength": 16}, 4),
        "adapt('batch'), batches of 4": ("batch", {}, 4),
    }
    results = {}
    for name, (mode, options, batch_size) in methods.items():
        accs = []
        for s in severities:
            for n in norms:
                n.adapt(mode, **options)         # None: the training statistics, frozen
            accs.append(stream_accuracy(model, shift(Xte, s), yte, batch_size))
            for n in norms:
                n.reset_adaptation()             # the source statistics, exactly
        results[name] = accs
    for n in norms:
        n.adapt(None)
    exact = all(np.array_equal(n.running_var, sd["running_var"]) for n, sd in zip(norms, source))
    print("reset_adaptation restored the source statistics exactly:", exact)

    for episodic in (False, True):
        accs = []
        for s in severities:
            tent = Tent(norms, lr=1e-3, episodic=episodic)   # eval mode + adapt('batch')
            accs.append(stream_accuracy(model, shift(Xte, s), yte, 64, tent=tent))
            tent.reset()                                     # source weight, bias, statistics
        results["TENT" + (", episodic" if episodic else "")] = accs
    for n in norms:
        n.adapt(None)

    print(f"\naccuracy on the {len(yte)} held-out digits, by shift severity")
    print("| method | " + " | ".join(f"sev {s}" for s in severities) + " | mean |")
    print("|---|" + "---|" * (len(severities) + 1))
    for name, accs in results.items():
        print(f"| {name} | " + " | ".join(f"{a:.1%}" for a in accs) + f" | {np.mean(accs):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
