"""``python -m streamnorm demo``: normalization layers in a NumPy training loop, then
test-time adaptation under covariate shift, on scikit-learn's handwritten digits.

1. Train the same small MLP three times (no normalization, BatchNorm, OnlineNorm) and
   report the test accuracy per epoch and the epochs needed to reach 90 % and 95 %.
2. Shift the test images (lower contrast, higher brightness, pixel noise; severity 0 to
   5) and evaluate the BatchNorm network with no adaptation, with every adaptation mode
   of :meth:`streamnorm.BatchNorm.adapt`, with TENT, and the OnlineNorm network with
   frozen and with streaming statistics.
3. Print the accuracy table and write PNG plots to ``--out``.

Seeded and deterministic for a given thread count.  Needs scikit-learn (the data ships
inside it; nothing is downloaded) and matplotlib for the plots: ``pip install
streamnorm[demo]``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_softmax

import streamnorm as sn
from streamnorm.tta import Tent, entropy

SEVERITIES = (0, 1, 2, 3, 4, 5)


# --------------------------------------------------------------------- a tiny MLP


class Linear:
    """y = x W + b, He-initialized; ``backward`` returns dx and stores grads."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator):
        self.params = {"weight": rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in), "bias": np.zeros(n_out)}
        self.grads: dict[str, np.ndarray] = {}

    def __call__(self, x):
        self.x = x
        return x @ self.params["weight"] + self.params["bias"]

    def backward(self, dy):
        self.grads = {"weight": self.x.T @ dy, "bias": dy.sum(0)}
        return dy @ self.params["weight"].T


class ReLU:
    params: dict = {}
    grads: dict = {}

    def __call__(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


class MLP:
    """64 → 64 → [norm] → ReLU → 64 → [norm] → ReLU → 10."""

    def __init__(self, norm: str | None, seed: int):
        rng = np.random.default_rng(seed)
        self.layers: list = []
        self.norms: list = []
        for n_in, n_out in ((64, 64), (64, 64)):
            self.layers.append(Linear(n_in, n_out, rng))
            if norm == "batch":
                self.norms.append(sn.BatchNorm1d(n_out))
                self.layers.append(self.norms[-1])
            elif norm == "online":
                self.norms.append(sn.OnlineNorm(n_out, alpha_fwd=0.99, alpha_bkw=0.99))
                self.layers.append(self.norms[-1])
            self.layers.append(ReLU())
        self.layers.append(Linear(64, 10, rng))

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dz):
        for layer in reversed(self.layers):
            dz = layer.backward(dz)
        return dz

    def train(self, mode: bool = True):
        for n in self.norms:
            n.train(mode)
        return self

    def parameters(self):
        return [(layer, k) for layer in self.layers for k in layer.params]


def cross_entropy(z, y):
    """Mean cross-entropy and its gradient with respect to the logits."""
    logp = log_softmax(z, axis=1)
    B = z.shape[0]
    loss = -logp[np.arange(B), y].mean()
    g = np.exp(logp)
    g[np.arange(B), y] -= 1.0
    return float(loss), g / B


# ------------------------------------------------------------------------- data


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.data / 16.0).astype(np.float64)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    X, y = X[perm], y[perm]
    n_train = 1200
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def shift(X: np.ndarray, severity: int, seed: int = 1) -> np.ndarray:
    """Lower contrast, raise brightness and add pixel noise, more with each severity."""
    if severity == 0:
        return X
    rng = np.random.default_rng(seed + severity)
    contrast = 1.0 - 0.13 * severity
    brightness = 0.12 * severity
    noise = 0.06 * severity
    mean = X.mean(axis=1, keepdims=True)
    return mean + contrast * (X - mean) + brightness + noise * rng.standard_normal(X.shape)


# ---------------------------------------------------------------------- training


@dataclass
class Curve:
    name: str
    loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)

    def epochs_to(self, acc: float) -> int | None:
        for i, a in enumerate(self.test_acc):
            if a >= acc:
                return i + 1
        return None


def accuracy(model, X, y, batch: int = 64) -> float:
    hits = 0
    for i in range(0, len(y), batch):
        hits += int((model(X[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return hits / len(y)


def train(model: MLP, name, Xtr, ytr, Xte, yte, epochs, lr, seed, batch=64) -> Curve:
    rng = np.random.default_rng(seed)
    keys = [(layer, k) for layer, k in model.parameters()]
    vel = [np.zeros_like(layer.params[k]) for layer, k in keys]
    curve = Curve(name)
    for _ in range(epochs):
        model.train(True)
        perm = rng.permutation(len(ytr))
        losses = []
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            z = model(Xtr[idx])
            loss, dz = cross_entropy(z, ytr[idx])
            model.backward(dz)
            losses.append(loss)
            for j, (layer, k) in enumerate(keys):  # SGD with momentum 0.9
                vel[j] = 0.9 * vel[j] - lr * layer.grads[k]
                layer.params[k] = layer.params[k] + vel[j]
        model.train(False)
        curve.loss.append(float(np.mean(losses)))
        curve.test_acc.append(accuracy(model, Xte, yte))
    return curve


# ------------------------------------------------------------------- adaptation


def evaluate_methods(bn_model: MLP, on_model: MLP, plain: MLP, Xte, yte, batch: int = 64):
    """Accuracy per method per severity; every method starts from the trained state."""
    bn_state = [n.state_dict() for n in bn_model.norms]
    on_state = [n.state_dict() for n in on_model.norms]

    def restore_bn():
        for n, sd in zip(bn_model.norms, bn_state):
            n.adapt(None)
            n.load_state_dict(sd)
            n.eval()

    def restore_on(training: bool):
        for n, sd in zip(on_model.norms, on_state):
            n.load_state_dict(sd)
            n.train(training)

    results: dict[str, list[float]] = {}

    def run(name, setup, model=bn_model, bs=batch, tent=None):
        accs = []
        for s in SEVERITIES:
            setup()
            X = shift(Xte, s)
            hits = 0
            t = tent() if tent else None
            for i in range(0, len(yte), bs):  # 597 test images: no batch of one
                z = model(X[i : i + bs])
                if t is not None:  # TENT predicts with this forward, then takes its step
                    _, dz = entropy(z)
                    model.backward(dz)
                    t.step()
                hits += int((z.argmax(1) == yte[i : i + bs]).sum())
            accs.append(hits / len(yte))
        results[name] = accs

    run("no normalization", lambda: None, model=plain)
    run("BatchNorm, no adaptation", restore_bn)
    for mode, opts, bs in (
        ("batch", {}, batch),
        ("prior", {"prior_strength": 16}, batch),
        ("ema", {"momentum": 0.1}, batch),
        ("cumulative", {}, batch),
        ("dua", {}, 16),
    ):
        def setup(mode=mode, opts=opts):
            restore_bn()
            for n in bn_model.norms:
                n.adapt(mode, **opts)

        run(f"BatchNorm, adapt '{mode}'" + (" (batches of 16)" if bs != batch else ""), setup, bs=bs)
    run("BatchNorm + TENT", restore_bn, tent=lambda: Tent(bn_model.norms, lr=1e-3))
    run("OnlineNorm, frozen statistics", lambda: restore_on(False), model=on_model)
    run("OnlineNorm, streaming statistics", lambda: restore_on(True), model=on_model)
    restore_bn()
    return results


# ---------------------------------------------------------------------- output


def format_results(curves: list[Curve], results: dict[str, list[float]], seconds: float) -> str:
    lines = ["Training on digits (1200 train / 597 test), SGD momentum 0.9, lr 0.05, batches of 64:", ""]
    lines.append("| network | epochs to 90 % | epochs to 95 % | final test accuracy |")
    lines.append("|---|---|---|---|")
    for c in curves:
        e90, e95 = c.epochs_to(0.90), c.epochs_to(0.95)
        lines.append(
            f"| {c.name} | {e90 if e90 else 'not reached'} | {e95 if e95 else 'not reached'} | {c.test_acc[-1]:.1%} |"
        )
    lines += ["", "Test accuracy under covariate shift (severity 0 = clean):", ""]
    lines.append("| method | " + " | ".join(f"sev {s}" for s in SEVERITIES) + " | mean |")
    lines.append("|---|" + "---|" * (len(SEVERITIES) + 1))
    for name, accs in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.1%}" for a in accs) + f" | {np.mean(accs):.1%} |")
    lines += ["", f"({seconds:.1f} s)"]
    return "\n".join(lines)


def write_plots(curves: list[Curve], results: dict[str, list[float]], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    paths = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for c in curves:
        epochs = np.arange(1, len(c.loss) + 1)
        a1.plot(epochs, c.loss, label=c.name)
        a2.plot(epochs, np.array(c.test_acc) * 100, label=c.name)
    a1.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Convergence")
    a2.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy", ylim=(50, 100))
    a1.legend()
    a2.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "convergence.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, accs in results.items():
        ax.plot(SEVERITIES, np.array(accs) * 100, marker="o", label=name)
    ax.set(xlabel="shift severity", ylabel="test accuracy (%)", title="Accuracy under covariate shift")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "shift.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamnorm demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="folder for the PNG plots (default: demo-out)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip matplotlib")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte = load_data(args.seed)
    nets = {
        "no normalization": MLP(None, args.seed),
        "BatchNorm": MLP("batch", args.seed),
        "OnlineNorm": MLP("online", args.seed),
    }
    curves = [train(m, name, Xtr, ytr, Xte, yte, args.epochs, 0.05, args.seed) for name, m in nets.items()]
    results = evaluate_methods(nets["BatchNorm"], nets["OnlineNorm"], nets["no normalization"], Xte, yte)
    print(format_results(curves, results, time.perf_counter() - t0))
    if not args.no_plots:
        for path in write_plots(curves, results, args.out):
            print(f"wrote {path}")
    return 0
