"""A complete NumPy training loop: an MLP with BatchNorm on handwritten digits.

Trains the same network twice, without and with BatchNorm, with SGD and momentum written
in NumPy, prints the training loss and the validation accuracy of every epoch, and can
plot both curves::

    python examples/training_loop.py                       # 20 epochs per network
    python examples/training_loop.py --plot curves.png     # and write the plot
    python examples/training_loop.py --quick               # 2 epochs, for a smoke test

Needs scikit-learn for the data (``load_digits`` ships with it, nothing is downloaded)
and matplotlib for ``--plot``.  The other examples import the pieces defined here.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy.special import log_softmax

import streamnorm as sn


def quick_mode(argv: list[str] | None = None) -> bool:
    """True with ``--quick`` on the command line or ``STREAMNORM_EXAMPLES_QUICK=1``."""
    argv = sys.argv[1:] if argv is None else argv
    return "--quick" in argv or os.environ.get("STREAMNORM_EXAMPLES_QUICK", "") not in ("", "0")


# -- the pieces of a network ---------------------------------------------------------
# Every piece follows the contract of streamnorm's layers: ``params`` and ``grads``
# dicts, ``forward`` (also ``__call__``) and ``backward``, which returns the gradient
# with respect to the input and overwrites ``grads``.


class Linear:
    """``y = x W + b``, He-initialized."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator):
        self.params = {"weight": rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, n_out)), "bias": np.zeros(n_out)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.training = True

    def forward(self, x):
        self.x = x
        return x @ self.params["weight"] + self.params["bias"]

    __call__ = forward

    def backward(self, dy):
        self.grads = {"weight": self.x.T @ dy, "bias": dy.sum(axis=0)}
        return dy @ self.params["weight"].T

    def train(self, mode: bool = True):
        self.training = mode
        return self


class ReLU:
    params: dict = {}
    grads: dict = {}

    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    __call__ = forward

    def backward(self, dy):
        return dy * self.mask

    def train(self, mode: bool = True):
        return self


class Sequential:
    """Layers applied in order; the backward runs them in reverse."""

    def __init__(self, *layers):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    __call__ = forward

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode: bool = True):
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        """``(layer, name)`` for every learnable array."""
        return [(layer, name) for layer in self.layers for name in layer.params]

    def norms(self):
        """The normalization layers, in order."""
        return [layer for layer in self.layers if isinstance(layer, sn.Layer)]


def make_mlp(norm=None, width: int = 128, seed: int = 0) -> Sequential:
    """64 -> width -> [norm] -> ReLU -> width -> [norm] -> ReLU -> 10.

    ``norm`` is None or a function of the number of features that returns a layer,
    such as ``sn.BatchNorm1d`` or ``sn.LayerNorm``.  The normalization sits between each
    hidden linear layer and its nonlinearity; the output layer has none.
    """
    rng = np.random.default_rng(seed)
    layers = []
    for n_in in (64, width):
        layers.append(Linear(n_in, width, rng))
        if norm is not None:
            layers.append(norm(width))
        layers.append(ReLU())
    layers.append(Linear(width, 10, rng))
    return Sequential(*layers)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    logp = log_softmax(logits, axis=1)
    B = len(labels)
    loss = -logp[np.arange(B), labels].mean()
    dlogits = np.exp(logp)
    dlogits[np.arange(B), labels] -= 1.0
    return float(loss), dlogits / B


class SGD:
    """Stochastic gradient descent with (heavy-ball) momentum, in place."""

    def __init__(self, model: Sequential, lr: float = 0.05, momentum: float = 0.9):
        self.targets = model.parameters()
        self.lr, self.momentum = lr, momentum
        self.velocity = [np.zeros_like(layer.params[name]) for layer, name in self.targets]

    def step(self):
        for vel, (layer, name) in zip(self.velocity, self.targets):
            vel *= self.momentum
            vel -= self.lr * layer.grads[name]
            layer.params[name] += vel


# -- data, training and evaluation ---------------------------------------------------


def load_data(seed: int = 0, n_train: int = 1200):
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1]: 1200 training images, 597 held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = digits.data / 16.0
    y = digits.target
    perm = np.random.default_rng(seed).permutation(len(y))
    X, y = X[perm], y[perm]
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def accuracy(model: Sequential, X, y, batch_size: int = 256) -> float:
    """Accuracy in eval mode (running statistics), restoring train mode afterwards."""
    model.eval()
    hits = sum(int((model(X[i : i + batch_size]).argmax(axis=1) == y[i : i + batch_size]).sum())
               for i in range(0, len(y), batch_size))
    model.train()
    return hits / len(y)


def train(model, data, epochs: int, lr: float = 0.05, batch_size: int = 64, seed: int = 0, log=None):
    """Train with SGD and momentum 0.9; returns the per-epoch loss and validation accuracy."""
    Xtr, ytr, Xval, yval = data
    rng = np.random.default_rng(seed)
    opt = SGD(model, lr=lr)
    history = {"loss": [], "val_acc": []}
    model.train()
    for epoch in range(1, epochs + 1):
        losses = []
        for idx in np.array_split(rng.permutation(len(ytr)), len(ytr) // batch_size):
            logits = model(Xtr[idx])                 # BatchNorm: batch statistics
            loss, dlogits = cross_entropy(logits, ytr[idx])
            model.backward(dlogits)                  # fills every layer's grads
            opt.step()
            losses.append(loss)
        history["loss"].append(float(np.mean(losses)))
        history["val_acc"].append(accuracy(model, Xval, yval))
        if log is not None:
            log(f"epoch {epoch:2d}  loss {history['loss'][-1]:.4f}  "
                f"validation accuracy {history['val_acc'][-1]:.1%}")
    return history


def plot(histories: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, h in histories.items():
        epochs = np.arange(1, len(h["loss"]) + 1)
        ax1.plot(epochs, h["loss"], marker=".", label=name)
        ax2.plot(epochs, np.array(h["val_acc"]) * 100, marker=".", label=name)
    ax1.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    ax2.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def state_dict(model: Sequential) -> dict:
    """Every parameter and buffer under PyTorch's ``nn.Sequential`` key names ("1.running_var")."""
    out = {}
    for i, layer in enumerate(model.layers):
        sd = layer.state_dict() if isinstance(layer, sn.Layer) else layer.params
        out.update({f"{i}.{name}": np.array(value) for name, value in sd.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs: a smoke test")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--plot", metavar="PATH", help="write the loss and accuracy curves to a PNG")
    args = parser.parse_args(argv)
    epochs = 2 if quick_mode(argv) else args.epochs

    data = load_data()
    histories, models = {}, {}
    for name, norm in (("no normalization", None), ("BatchNorm", sn.BatchNorm1d)):
        print(f"{name}: SGD with momentum 0.9, learning rate {args.lr}, batches of 64")
        models[name] = make_mlp(norm)
        histories[name] = train(models[name], data, epochs, lr=args.lr, log=print)
        print()

    for name, h in histories.items():
        print(f"{name}: loss {h['loss'][0]:.4f} -> {h['loss'][-1]:.4f}, "
              f"final validation accuracy {h['val_acc'][-1]:.1%}")

    # A checkpoint is a flat dict of arrays: np.savez writes it, np.load reads it back.
    sd = state_dict(models["BatchNorm"])
    print("checkpoint keys:", ", ".join(k for k in sd if k.startswith("1.")))
    if args.plot:
        plot(histories, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
