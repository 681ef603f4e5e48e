"""Choosing a normalization: the measurements behind the advice, on handwritten digits.

Six experiments with the network of ``training_loop.py`` (two hidden layers of 128,
SGD with momentum 0.9, 10 epochs unless said otherwise, validation accuracy in eval
mode, on the 597 held-out digits):

1. how noisy batch statistics are at each batch size (no training);
2. learning rates: no normalization, BatchNorm, LayerNorm;
3. batch sizes: BatchNorm, LayerNorm, GroupNorm and OnlineNorm, down to one sample;
4. the momentum of BatchNorm's running statistics against the learning rate;
5. where the normalization goes;
6. covariate shift at test time: which layers are fragile, and what adapting does.

::

    python examples/choosing.py            # every experiment, several minutes
    python examples/choosing.py --quick    # a smaller grid, one epoch
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import streamnorm as sn
from streamnorm import functional as F
from training_loop import Linear, ReLU, Sequential, accuracy, load_data, make_mlp, quick_mode, train
from tta import shift, stream_accuracy

NORMS = {
    "none": None,
    "BatchNorm": sn.BatchNorm1d,
    "LayerNorm": sn.LayerNorm,
    "GroupNorm(8)": lambda c: sn.GroupNorm(8, c),
    "OnlineNorm": lambda c: sn.OnlineNorm(c, alpha_fwd=0.99, alpha_bkw=0.99),
}


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("s" if n != 1 else "")


def table(header: list[str], rows: list[list]) -> None:
    """Print a Markdown table."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def batch_noise(sizes) -> None:
    """1. Train mode normalizes with the batch's own statistics, which are estimates."""
    print("1. Noise of batch statistics: 4000 batches per size from N(3, 2^2)")
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        # 4000 independent batches at once: one channel per batch
        x = rng.normal(3.0, 2.0, size=(n, 4000))
        y_batch, cache = F.batch_norm_forward(x)                                # train mode
        y_true, _ = F.batch_norm_forward(x, mean=np.full(4000, 3.0), var=np.full(4000, 4.0))
        err_mean = np.std((cache.batch_mean - 3.0) / 2.0)
        err_std = np.std(np.sqrt(cache.batch_var) / 2.0)
        rms = np.sqrt(np.mean((y_batch - y_true) ** 2))
        rows.append([n, f"{err_mean:.3f}", f"{err_std:.3f}", f"{rms:.3f}"])
    table(["batch size", "sd of batch mean / sigma", "sd of batch std / sigma",
           "rms(train-mode output - exact output)"], rows)


def learning_rates(lrs, epochs, data) -> None:
    """2. Normalized layers keep their scale, so larger steps stay stable."""
    print(f"2. Validation accuracy after {_epochs(epochs)}, by learning rate (batches of 64)")
    rows = []
    for name in ("none", "BatchNorm", "LayerNorm"):
        accs = [train(make_mlp(NORMS[name]), data, epochs, lr=lr)["val_acc"][-1] for lr in lrs]
        rows.append([name] + [f"{a:.1%}" for a in accs])
    table(["normalization"] + [f"lr {lr:g}" for lr in lrs], rows)


def batch_sizes(sizes, epochs, data) -> None:
    """3. BatchNorm needs a batch; the others do not."""
    print(f"3. Validation accuracy after {_epochs(epochs)}, by batch size (lr 0.02)")
    rows = []
    for name in ("BatchNorm", "LayerNorm", "GroupNorm(8)", "OnlineNorm"):
        row = [name]
        for bs in sizes:
            try:
                h = train(make_mlp(NORMS[name]), data, epochs, lr=0.02, batch_size=bs)
                row.append(f"{h['val_acc'][-1]:.1%} (loss {h['loss'][-1]:.3f})")
            except ValueError:
                row.append("ValueError")
        rows.append(row)
    table(["normalization"] + [f"batch {bs}" for bs in sizes], rows)
    try:
        sn.BatchNorm1d(4)(np.ones((1, 4)))
    except ValueError as e:
        print("BatchNorm1d in train mode on one sample:", e, "\n")


def recompute_statistics(model: Sequential, X, batch_size: int = 64) -> None:
    """Replace every BatchNorm's running statistics by the average over the training set."""
    norms = model.norms()
    saved = [n.momentum for n in norms]
    for n in norms:
        n.momentum = None                                  # cumulative average ...
        n.buffers["num_batches_tracked"] = np.array(0)     # ... starting afresh
    model.train()
    for i in range(0, len(X) - batch_size + 1, batch_size):
        model(X[i : i + batch_size])                       # forward only: weights unchanged
    for n, m in zip(norms, saved):
        n.momentum = m
    model.eval()


def running_momentum(momenta, lrs, epochs, data) -> None:
    """4. Running statistics average about 1/momentum recent batches of a moving network."""
    print(f"4. BatchNorm validation accuracy (eval mode) after {_epochs(epochs)}, by running-statistics "
          "momentum; 'recomputed' re-estimates the statistics once after training")
    rows = []
    for lr in lrs:
        for mom in momenta:
            model = make_mlp(lambda c: sn.BatchNorm1d(c, momentum=mom))
            h = train(model, data, epochs, lr=lr)
            recompute_statistics(model, data[0])
            rows.append([lr, mom, f"{h['loss'][-1]:.4f}", f"{h['val_acc'][-1]:.1%}",
                         f"{accuracy(model, data[2], data[3]):.1%}"])
    table(["lr", "momentum", "training loss", "validation accuracy", "recomputed"], rows)


def placement(lrs, epochs, data, seeds) -> None:
    """5. Normalize the hidden layers; not the raw input, not the logits."""
    def mlp(where, seed):
        rng = np.random.default_rng(seed)
        layers = [sn.BatchNorm1d(64)] if "input" in where else []
        layers += [Linear(64, 128, rng)] + ([sn.BatchNorm1d(128)] if "hidden 1" in where else [])
        layers += [ReLU(), Linear(128, 128, rng)] + ([sn.BatchNorm1d(128)] if "hidden 2" in where else [])
        layers += [ReLU(), Linear(128, 10, rng)] + ([sn.BatchNorm1d(10)] if "output" in where else [])
        return Sequential(*layers)

    print(f"5. Where BatchNorm goes: validation accuracy and training loss after {_epochs(epochs)}, "
          f"mean of {len(seeds)} seeds")
    rows = []
    for where in ((), ("hidden 1", "hidden 2"), ("hidden 1",), ("hidden 2",), ("output",), ("input",)):
        row = [" + ".join(where) or "nowhere"]
        for lr in lrs:
            with np.errstate(all="ignore"):  # a diverging run overflows
                hs = [train(mlp(where, s), data, epochs, lr=lr, seed=s) for s in seeds]
            row.append(f"{np.mean([h['val_acc'][-1] for h in hs]):.1%} "
                       f"(loss {np.mean([h['loss'][-1] for h in hs]):.3f})")
        rows.append(row)
    table(["BatchNorm after"] + [f"lr {lr:g}" for lr in lrs], rows)


def covariate_shift(severities, epochs, data) -> None:
    """6. Statistics from training meet test data from elsewhere."""
    print(f"6. Accuracy on shifted held-out digits (networks of width 64, {_epochs(epochs)}), "
          "test batches of 64 in order")
    rows = []
    for name in ("none", "BatchNorm", "LayerNorm", "GroupNorm(8)"):
        model = make_mlp(NORMS[name], width=64)
        train(model, data, epochs)
        model.eval()
        for mode in (None, "batch") if name == "BatchNorm" else (None,):
            batchnorms = [n for n in model.norms() if isinstance(n, sn.BatchNorm)]
            for n in batchnorms:
                n.adapt(mode)                     # None: the training statistics
            accs = [stream_accuracy(model, shift(data[2], s), data[3], 64) for s in severities]
            for n in batchnorms:
                n.reset_adaptation().adapt(None)
            label = name + ("" if name != "BatchNorm" else ", adapt('batch')" if mode else ", frozen")
            rows.append([label] + [f"{a:.1%}" for a in accs] + [f"{np.mean(accs):.1%}"])
    table(["network"] + [f"sev {s}" for s in severities] + ["mean"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid and one epoch")
    parser.parse_args(argv)
    data = load_data()
    if quick_mode(argv):
        data = (data[0][:300], data[1][:300], data[2], data[3])   # a quarter of the training set
        batch_noise([4, 64])
        learning_rates([0.5], 1, data)
        batch_sizes([1, 8], 1, data)
        running_momentum([0.01], [0.05], 1, data)
        placement([0.05], 1, data, seeds=[0])
        covariate_shift([0, 4], 1, data)
    else:
        batch_noise([2, 4, 8, 16, 32, 128, 512])
        learning_rates([0.05, 0.2, 0.5, 1.0], 10, data)
        batch_sizes([1, 2, 4, 8, 32, 128], 10, data)
        running_momentum([0.001, 0.01, 0.1, 0.5], [0.05, 0.5], 10, data)
        placement([0.05, 0.5], 10, data, seeds=[0, 1, 2])
        covariate_shift([0, 1, 2, 3, 4, 5], 20, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
