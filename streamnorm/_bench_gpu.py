"""``python -m streamnorm bench-gpu``: the CUDA kernels next to PyTorch CUDA, in one process.

Every row runs the same operation on the same device data with streamnorm and with
PyTorch (``torch.nn.functional``, autograd for the backward), interleaved repeat by
repeat, timed with CUDA events after a warm-up call (numba compiles there).  Each
repeat times ``--inner`` back-to-back calls, so launch overheads count as they do in a
training loop; the report gives medians over ``--repeat`` repeats.

The bound is ``passes × bytes / B``, with ``B`` the device-to-device copy bandwidth
measured at the start of the run (read + write bytes over time) and the pass counts of
docs/math.rst (BatchNorm forward 3, forward+backward 8; LayerNorm and RMSNorm forward
2, forward+backward 5).  Inputs are PyTorch CUDA tensors (``--input torch``, what a
PyTorch user hands over) or numba device arrays (``--input numba``).

Under numba's CUDA simulator the command runs with tiny shapes and wall-clock timing,
as a smoke test only: its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import streamnorm.functional as F

MiB = 1 << 20

#: (operation, kind, shape, passes) for the full-size report
ROWS = [
    ("BatchNorm forward, train", "bn", (65536, 256), 3),
    ("BatchNorm forward+backward", "bn_fb", (65536, 256), 8),
    ("BatchNorm forward, train", "bn", (1048576, 256), 3),
    ("BatchNorm forward+backward", "bn_fb", (1048576, 256), 8),
    ("BatchNorm forward, train", "bn", (8192, 4096), 3),
    ("BatchNorm forward+backward", "bn_fb", (8192, 4096), 8),
    ("BatchNorm2d forward, train", "bn", (256, 64, 56, 56), 3),
    ("LayerNorm forward", "ln", (16384, 1024), 2),
    ("LayerNorm forward+backward", "ln_fb", (16384, 1024), 5),
    ("LayerNorm forward", "ln", (65536, 4096), 2),
    ("LayerNorm forward+backward", "ln_fb", (65536, 4096), 5),
    ("RMSNorm forward", "rms", (65536, 4096), 2),
    ("RMSNorm forward+backward", "rms_fb", (65536, 4096), 5),
    ("GroupNorm (32 groups) forward", "gn", (64, 64, 64, 64), 2),
]
TINY = {(65536, 256): (64, 8), (1048576, 256): (128, 8), (8192, 4096): (16, 32), (256, 64, 56, 56): (4, 4, 3, 3),
        (16384, 1024): (16, 32), (65536, 4096): (16, 64), (64, 64, 64, 64): (2, 8, 3, 3)}


class _Timer:
    """CUDA-event timing (PyTorch's events when PyTorch has CUDA, else numba's), or the
    wall clock after a device synchronize under the simulator."""

    def __init__(self, cuda, torch):
        self.cuda, self.torch = cuda, torch

    def __call__(self, fn, inner: int) -> float:
        if self.torch is not None:
            e0, e1 = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(inner):
                fn()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1e3 / inner
        if hasattr(self.cuda, "event_elapsed_time"):  # pragma: no cover - needs a GPU
            e0, e1 = self.cuda.event(), self.cuda.event()
            e0.record()
            for _ in range(inner):
                fn()
            e1.record()
            e1.synchronize()
            return self.cuda.event_elapsed_time(e0, e1) / 1e3 / inner
        self.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        self.cuda.synchronize()
        return (time.perf_counter() - t0) / inner


def _ops(kind, shape, x, dy, w, b):
    """(streamnorm callable, PyTorch callable or None) for one row."""
    C = shape[1]
    D = shape[-1]

    def ours():
        if kind.startswith("bn"):
            y, c = F.batch_norm_forward(x["ours"], w["ours"], b["ours"])
            return F.batch_norm_backward(dy["ours"], c) if kind.endswith("_fb") else y
        if kind.startswith("ln"):
            y, c = F.layer_norm_forward(x["ours"], D, w["ours"], b["ours"])
            return F.layer_norm_backward(dy["ours"], c) if kind.endswith("_fb") else y
        if kind.startswith("rms"):
            y, c = F.rms_norm_forward(x["ours"], D, w["ours"], 1e-6)
            return F.rms_norm_backward(dy["ours"], c) if kind.endswith("_fb") else y
        y, c = F.group_norm_forward(x["ours"], min(32, C), w["ours"], b["ours"])
        return y

    t = x.get("torch")
    if t is None:
        return ours, None
    import torch

    fn = torch.nn.functional

    def theirs():
        xt = t.detach().requires_grad_(kind.endswith("_fb"))
        if kind.startswith("bn"):
            y = fn.batch_norm(xt, None, None, w["torch"], b["torch"], training=True)
        elif kind.startswith("ln"):
            y = fn.layer_norm(xt, (D,), w["torch"], b["torch"])
        elif kind.startswith("rms"):
            y = fn.rms_norm(xt, (D,), w["torch"], 1e-6)
        else:
            y = fn.group_norm(xt, min(32, C), w["torch"], b["torch"])
        if kind.endswith("_fb"):
            y.backward(dy["torch"])
            xt.grad = None
        return y

    return ours, theirs


def _copy_bandwidth(cuda, timer, n: int) -> float:
    """Device-to-device copy bandwidth in bytes per second (read plus write), median of
    five timings of three copies of ``n`` float32 values; the arrays are freed after."""
    src = cuda.to_device(np.ones(n, dtype=np.float32))
    dst = cuda.device_array(n, dtype=np.float32)
    copy_t = statistics.median(timer(lambda: dst.copy_to_device(src), 3) for _ in range(5))
    return 2 * src.nbytes / copy_t


def run(rows, repeat: int, inner: int, input_kind: str, size_mib: int) -> dict:
    from . import _cuda

    cuda = _cuda.cuda

    torch = None
    try:
        import torch as _torch

        if _torch.cuda.is_available() and not _cuda.SIMULATOR:
            torch = _torch
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    if input_kind == "torch" and torch is None:
        input_kind = "numba"
    timer = _Timer(cuda, torch)
    bw = _copy_bandwidth(cuda, timer, size_mib * MiB // 4)
    rng = np.random.default_rng(0)
    out = []
    for op, kind, shape, passes in rows:
        if _cuda.SIMULATOR:
            shape = TINY.get(shape, shape)
        C = shape[-1] if kind.startswith(("ln", "rms")) else shape[1]
        xh = rng.normal(1.0, 2.0, shape).astype(np.float32)
        dyh = rng.normal(size=shape).astype(np.float32)
        wh, bh = rng.normal(size=C).astype(np.float32), rng.normal(size=C).astype(np.float32)
        x, dy, w, b = {}, {}, {}, {}
        for d, a in ((x, xh), (dy, dyh), (w, wh), (b, bh)):
            if torch is not None:
                d["torch"] = torch.from_numpy(a).cuda()
            d["ours"] = d["torch"] if input_kind == "torch" else cuda.to_device(a)
        ours, theirs = _ops(kind, shape, x, dy, w, b)
        ours()
        if theirs is not None:
            theirs()
        t_ours, t_theirs = [], []
        for _ in range(repeat):
            t_ours.append(timer(ours, inner))
            if theirs is not None:
                t_theirs.append(timer(theirs, inner))
        t = statistics.median(t_ours)
        bound = passes * xh.nbytes / bw
        row = {"operation": op, "shape": "×".join(map(str, shape)), "passes": passes, "streamnorm_us": t * 1e6,
               "TB/s": passes * xh.nbytes / t / 1e12, "of_bound": bound / t}
        if t_theirs:
            tt = statistics.median(t_theirs)
            row.update({"pytorch_us": tt * 1e6, "vs_pytorch": tt / t})
        out.append(row)
    dev = "CUDA simulator" if _cuda.SIMULATOR else cuda.get_current_device().name
    dev = dev.decode() if isinstance(dev, bytes) else str(dev)
    return {"device": dev, "copy_TB/s": bw / 1e12, "input": input_kind, "repeat": repeat, "inner": inner,
            "torch": None if torch is None else torch.__version__, "rows": out}


def render(rep: dict) -> str:
    lines = [
        f"device: {rep['device']}; device copy bandwidth {rep['copy_TB/s']:.2f} TB/s; input: {rep['input']} arrays; "
        f"medians of {rep['repeat']} repeats × {rep['inner']} calls; PyTorch {rep['torch'] or 'not available'}",
        "",
        "| operation | shape | passes | streamnorm µs | TB/s | of bound | PyTorch µs | vs PyTorch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        pt = f"{r['pytorch_us']:.1f} | {r['vs_pytorch']:.2f}×" if "pytorch_us" in r else "– | –"
        lines.append(f"| {r['operation']} | {r['shape']} | {r['passes']} | {r['streamnorm_us']:.1f} | "
                     f"{r['TB/s']:.2f} | {100 * r['of_bound']:.0f}% | {pt} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamnorm bench-gpu", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15, help="timed repeats per row (median reported)")
    p.add_argument("--inner", type=int, default=20, help="back-to-back calls per timed repeat")
    p.add_argument("--input", choices=("torch", "numba"), default="torch", help="the array type handed to streamnorm")
    p.add_argument("--ops", default="", help="comma-separated substrings: only rows whose operation matches")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth probe")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    try:
        from . import _cuda
    except ImportError as exc:
        print(f"bench-gpu needs numba-cuda: {exc}", file=sys.stderr)
        return 2
    if not (_cuda.SIMULATOR or _cuda.cuda.is_available()):
        print("bench-gpu needs an NVIDIA GPU (or NUMBA_ENABLE_CUDASIM=1 for a smoke run)", file=sys.stderr)
        return 2
    keys = [k.strip().lower() for k in a.ops.split(",") if k.strip()]
    rows = [r for r in ROWS if not keys or any(k in r[0].lower() for k in keys)]
    copy_mib = min(a.copy_mib, 1) if _cuda.SIMULATOR else a.copy_mib
    rep = run(rows, a.repeat, a.inner, a.input, copy_mib)
    print(json.dumps(rep, indent=1) if a.json else render(rep))
    return 0
