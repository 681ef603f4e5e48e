"""Coming from PyTorch: the same semantics, checked against torch itself.

Runs streamnorm and ``torch.nn`` side by side on the same data and prints the largest
difference of every comparison: running statistics under both momentum conventions,
state dicts in both directions, gradients, the other layers, and a small trained
PyTorch model evaluated with NumPy alone::

    python examples/from_pytorch.py
    python examples/from_pytorch.py --quick

Needs PyTorch (the CPU build is enough).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import streamnorm as sn
from training_loop import quick_mode

torch.set_default_dtype(torch.float64)           # compare in float64: differences are rounding


def to_numpy(state: dict) -> dict:
    """A torch state dict as NumPy arrays, for ``load_state_dict`` of a streamnorm layer."""
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def to_torch(state: dict) -> dict:
    """A streamnorm state dict as tensors, for ``load_state_dict`` of a torch module."""
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}


def diff(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return float(np.max(np.abs(a - b)))


def running_statistics(steps: int) -> None:
    """momentum is the weight of the new batch; None is the cumulative average."""
    rng = np.random.default_rng(0)
    for momentum in (0.1, None):
        ours = sn.BatchNorm1d(8, momentum=momentum)
        theirs = torch.nn.BatchNorm1d(8, momentum=momentum)
        for _ in range(steps):
            x = rng.normal(3.0, 2.0, size=(16, 8))
            ours(x)
            theirs(torch.from_numpy(x))
        print(f"momentum={momentum}: running_mean differs by {diff(ours.running_mean, theirs.running_mean):.1e}, "
              f"running_var (unbiased in both) by {diff(ours.running_var, theirs.running_var):.1e}, "
              f"num_batches_tracked {ours.num_batches_tracked} and {int(theirs.num_batches_tracked)}")


def state_dicts() -> None:
    """The same key names: a state dict moves either way, array by array."""
    rng = np.random.default_rng(1)
    theirs = torch.nn.BatchNorm2d(4)
    with torch.no_grad():                        # some trained-looking state
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
        theirs.running_mean.normal_()
        theirs.running_var.uniform_(0.5, 2.0)
        theirs.num_batches_tracked.fill_(100)
    ours = sn.BatchNorm2d(4)
    ours.load_state_dict(to_numpy(theirs.state_dict()))        # torch -> streamnorm
    print("keys:", sorted(ours.state_dict()) == sorted(theirs.state_dict()), sorted(ours.state_dict()))

    x = rng.normal(size=(2, 4, 5, 5))
    y_ours = ours.eval()(x)
    y_theirs = theirs.eval()(torch.from_numpy(x))
    print(f"eval-mode outputs after torch -> streamnorm differ by {diff(y_ours, y_theirs):.1e}")

    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(to_torch(ours.state_dict()))          # streamnorm -> torch
    print(f"round trip torch -> streamnorm -> torch: max difference {max(diff(back.state_dict()[k], v) for k, v in theirs.state_dict().items()):.1e}")

    # float32 models load float64 arrays: load_state_dict copies into the existing dtype
    f32 = torch.nn.BatchNorm2d(4).float()
    f32.load_state_dict(to_torch(ours.state_dict()))
    print("a float32 torch module keeps its dtype:", f32.weight.dtype)


def gradients() -> None:
    """backward() returns dx and overwrites grads; autograd accumulates into .grad."""
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, size=(32, 6, 7))
    dy = rng.normal(size=x.shape)
    ours = sn.BatchNorm1d(6)
    theirs = torch.nn.BatchNorm1d(6)
    ours.load_state_dict(to_numpy(theirs.state_dict()))
    xt = torch.from_numpy(x).requires_grad_()
    theirs(xt).backward(torch.from_numpy(dy))
    ours(x)
    dx = ours.backward(dy)
    print(f"train-mode gradients: dx {diff(dx, xt.grad):.1e}, dweight {diff(ours.grads['weight'], theirs.weight.grad):.1e}, "
          f"dbias {diff(ours.grads['bias'], theirs.bias.grad):.1e}")


def other_layers() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(4, 8, 6, 6))
    pairs = [
        ("LayerNorm", sn.LayerNorm((6, 6)), torch.nn.LayerNorm((6, 6))),
        ("RMSNorm", sn.RMSNorm(6), torch.nn.RMSNorm(6)),
        ("GroupNorm", sn.GroupNorm(4, 8), torch.nn.GroupNorm(4, 8)),
        ("InstanceNorm", sn.InstanceNorm(8, affine=True, track_running_stats=True),
         torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
    ]
    for name, ours, theirs in pairs:
        with torch.no_grad():
            for p in theirs.parameters():
                p.uniform_(0.5, 1.5)
        ours.load_state_dict(to_numpy(theirs.state_dict()))
        keys = sorted(theirs.state_dict())
        print(f"{name}: keys {keys}, outputs differ by {diff(ours(x), theirs(torch.from_numpy(x))):.1e}")


def float32_accuracy() -> None:
    """float32 input, statistics accumulated in float64: only the output is rounded."""
    rng = np.random.default_rng(4)
    for offset in (3.0, 1000.0):
        x = (rng.normal(size=(4096, 64)) + offset).astype(np.float32)
        x64 = x.astype(np.float64)                     # the exact answer, in float64 NumPy
        exact = (x64 - x64.mean(axis=0)) / np.sqrt(x64.var(axis=0) + 1e-5)
        ours = sn.BatchNorm1d(64)(x)
        theirs = torch.nn.BatchNorm1d(64).float()(torch.from_numpy(x)).detach().numpy()
        print(f"float32 input of mean {offset:g}: largest error, streamnorm {diff(ours, exact):.1e}, "
              f"torch {diff(theirs, exact):.1e}")


def trained_model(steps: int) -> None:
    """Train a small model in PyTorch, then evaluate it in NumPy with its checkpoint."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X, y = digits.data / 16.0, digits.target
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    Xt, yt = torch.from_numpy(X[:1500]), torch.from_numpy(y[:1500])
    for step in range(steps):
        idx = torch.randint(0, 1500, (64,))
        loss = torch.nn.functional.cross_entropy(net(Xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    sd = to_numpy(net.state_dict())              # keys "0.weight", "1.running_var", ...
    bn = sn.BatchNorm1d(64).eval()
    bn.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("1.")})
    Xv = X[1500:]
    h = bn(Xv @ sd["0.weight"].T + sd["0.bias"])  # torch's Linear stores (out, in)
    logits = np.maximum(h, 0.0) @ sd["3.weight"].T + sd["3.bias"]
    with torch.no_grad():
        ref = net(torch.from_numpy(Xv)).numpy()
    print(f"a torch model evaluated in NumPy: logits differ by {diff(logits, ref):.1e}, "
          f"accuracy {np.mean(logits.argmax(1) == y[1500:]):.1%} (torch: {np.mean(ref.argmax(1) == y[1500:]):.1%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.parse_args(argv)
    quick = quick_mode(argv)
    running_statistics(steps=5 if quick else 50)
    state_dicts()
    gradients()
    other_layers()
    float32_accuracy()
    trained_model(steps=50 if quick else 500)
    return 0


if __name__ == "__main__":
    sys.exit(main())
