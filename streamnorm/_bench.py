"""``python -m streamnorm bench``: each kernel next to its peers, in one process.

For every operation the report gives the median time over repeats (after a warm-up
call, so numba compilation is excluded), the effective bandwidth under docs/math.rst's
pass-count model, the fraction of the memory-traffic bound, and the speed-up over each
installed peer (PyTorch CPU, scikit-learn) measured in the same run on the same data.

The bound is ``passes × bytes / B`` with ``B`` the copy bandwidth of ``np.copyto`` on a
large array, measured at the start of the run (read + write bytes over time).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numba
import numpy as np

import streamnorm as sn

MiB = 1 << 20


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: compilation, page faults, allocator
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 256 * MiB, repeat: int = 7) -> float:
    """Bytes per second of ``np.copyto`` (read + write) on arrays of ``nbytes``."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    t = _median_time(lambda: np.copyto(dst, src), repeat)
    return 2 * src.nbytes / t


@dataclass
class Case:
    """One row: our callable, the peers' callables, and the traffic model."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    passes: int
    ours: Callable[[], object]
    peers: dict[str, Callable[[], object]] = field(default_factory=dict)
    per_second: tuple[int, str] | None = None  # (items per call, unit) for a throughput note


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    passes: int
    streamnorm_ms: float
    gbps: float
    bound_fraction: float
    peers_ms: dict[str, float]
    speedup: dict[str, float]
    throughput: str = ""


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _sklearn_scaler():
    try:
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return None
    return StandardScaler


def _layer_cases(label, layer, make_torch, x, dy, dname, torch, *, eval_too=False) -> list[Case]:
    """Forward (train), optionally forward (eval), and forward+backward rows for one layer.

    ``make_torch(dtype)`` builds the PyTorch module measured beside it, on the same data
    (``torch.from_numpy`` shares the memory).
    """

    def ours_fb():
        layer.train()
        layer(x)
        return layer.backward(dy)

    def ours_fwd():
        layer.train()
        return layer(x)

    def ours_eval():
        layer.eval()
        return layer(x)

    peers: dict[str, dict[str, Callable[[], object]]] = {"fwd": {}, "eval": {}, "fb": {}}
    if torch is not None:
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        tmod = make_torch(tx.dtype)

        def t_fwd(train=True):
            tmod.train(train)
            with torch.no_grad():
                return tmod(tx)

        def t_fb():
            tmod.train()
            xg = tx.detach().requires_grad_(True)
            tmod(xg).backward(tdy)
            return xg.grad

        peers = {"fwd": {"PyTorch": t_fwd}, "eval": {"PyTorch": lambda: t_fwd(False)}, "fb": {"PyTorch": t_fb}}
    train = ", train" if eval_too else ""
    cases = [Case(f"{label} forward{train}", x.shape, dname, x.nbytes, 3 if eval_too else 2, ours_fwd, peers["fwd"])]
    if eval_too:
        cases.append(Case(f"{label} forward, eval", x.shape, dname, x.nbytes, 2, ours_eval, peers["eval"]))
    cases.append(
        Case(f"{label} forward+backward{train}", x.shape, dname, x.nbytes, 8 if eval_too else 5, ours_fb, peers["fb"])
    )
    return cases


def build_cases(size_mib: int, dtype=np.float32, seed: int = 0) -> list[Case]:
    """The operations of the report, each on an input of about ``size_mib`` MiB.

    Pass counts (docs/math.rst): BatchNorm train forward 3, eval forward 2, train
    forward+backward 3 + 5; LayerNorm, RMSNorm and GroupNorm forward 2 and
    forward+backward 2 + 3; moments update 1; OnlineNorm forward+backward 2 + 3.
    """
    rng = np.random.default_rng(seed)
    torch = _torch()
    Scaler = _sklearn_scaler()
    itemsize = np.dtype(dtype).itemsize
    dname = np.dtype(dtype).name
    n_values = size_mib * MiB // itemsize
    cases: list[Case] = []

    def data(shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dtype, copy=False)

    # ---- RunningStats.update and StreamScaler.partial_fit over 64 chunks, vs scikit-learn
    C = 256
    N = n_values // C
    x = data((N, C))
    dy = data((N, C))
    chunks = np.array_split(x, 64)

    def rs_update():
        rs = sn.RunningStats()
        for c in chunks:
            rs.update(c)
        return rs

    def ss_fit():
        s = sn.StreamScaler()
        for c in chunks:
            s.partial_fit(c)
        return s

    peers = {}
    if Scaler is not None:

        def sk_fit():
            s = Scaler()
            for c in chunks:
                s.partial_fit(c)
            return s

        peers["scikit-learn"] = sk_fit
    cases.append(Case("RunningStats.update (64 chunks)", x.shape, dname, x.nbytes, 1, rs_update, peers))
    cases.append(Case("StreamScaler.partial_fit (64 chunks)", x.shape, dname, x.nbytes, 1, ss_fit, peers))

    # ---- BatchNorm on (N, C) and on (N, C, H, W) feature maps
    nchw = (n_values // (64 * 128 * 128), 64, 128, 128)
    for shape in ((N, C), nchw):
        if shape[0] < 2:
            continue
        xs, dys = x.reshape(shape), dy.reshape(shape)
        cls = "BatchNorm1d" if len(shape) <= 3 else "BatchNorm2d"
        cases += _layer_cases(
            "BatchNorm", sn.BatchNorm(shape[1]), lambda dt, c=shape[1], cls=cls: getattr(torch.nn, cls)(c).to(dt),
            xs, dys, dname, torch, eval_too=True,
        )

    # ---- row-wise and group normalizations
    D = 1024
    xl, dyl = x.reshape(-1, D), dy.reshape(-1, D)
    cases += _layer_cases("LayerNorm", sn.LayerNorm(D), lambda dt: torch.nn.LayerNorm(D).to(dt), xl, dyl, dname, torch)
    cases += _layer_cases("RMSNorm", sn.RMSNorm(D), lambda dt: torch.nn.RMSNorm(D).to(dt), xl, dyl, dname, torch)
    if nchw[0] >= 1:
        xg, dyg = x.reshape(nchw), dy.reshape(nchw)
        cases += _layer_cases(
            "GroupNorm (32 groups)", sn.GroupNorm(32, 64), lambda dt: torch.nn.GroupNorm(32, 64).to(dt),
            xg, dyg, dname, torch,
        )

    # ---- OnlineNorm on (N, C) = (4096, 256): time is the batch axis
    xo, dyo = data((4096, 256)), data((4096, 256))
    on = sn.OnlineNorm(256)

    def on_fb():
        on(xo)
        return on.backward(dyo)

    cases.append(
        Case("OnlineNorm forward+backward", xo.shape, dname, xo.nbytes, 5, on_fb, {}, per_second=(xo.size, "channel-samples"))
    )
    return cases


def run_case(case: Case, bandwidth: float, repeat: int) -> Row:
    """Time ours and every peer, interleaved repeat by repeat (so that a slow spell of a
    shared machine hits all of them alike), and report medians."""
    fns = {"ours": case.ours, **case.peers}
    for fn in fns.values():
        fn()  # warm-up: compilation, page faults, allocator
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    t = statistics.median(times["ours"])
    traffic = case.passes * case.nbytes
    bound = traffic / bandwidth
    peers_ms, speedup = {}, {}
    for name in case.peers:
        tp = statistics.median(times[name])
        peers_ms[name] = tp * 1e3
        speedup[name] = tp / t
    note = ""
    if case.per_second is not None:
        note = f"{case.per_second[0] / t / 1e6:.0f} M {case.per_second[1]}/s"
    return Row(
        case.op,
        "×".join(str(s) for s in case.shape),
        case.dtype,
        case.passes,
        t * 1e3,
        traffic / t / 1e9,
        bound / t,
        peers_ms,
        speedup,
        note,
    )


def format_table(rows: list[Row], bandwidth: float, threads: int) -> str:
    peer_names = sorted({p for r in rows for p in r.peers_ms})
    head = ["operation", "shape", "dtype", "passes", "streamnorm ms", "GB/s", "of bound"]
    for p in peer_names:
        head += [f"{p} ms", f"vs {p}"]
    lines = [head]
    for r in rows:
        line = [r.op, r.shape, r.dtype, str(r.passes), f"{r.streamnorm_ms:.1f}", f"{r.gbps:.1f}", f"{r.bound_fraction:.0%}"]
        for p in peer_names:
            if p in r.peers_ms:
                line += [f"{r.peers_ms[p]:.1f}", f"{r.speedup[p]:.1f}×"]
            else:
                line += ["–", "–"]
        lines.append(line)
    if any(r.throughput for r in rows):
        lines[0].append("throughput")
        for line, r in zip(lines[1:], rows):
            line.append(r.throughput or "–")
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    out = []
    for k, l in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def machine_line(bandwidth: float, threads: int) -> str:
    torch = _torch()
    peers = []
    if torch is not None:
        peers.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    try:
        import sklearn

        peers.append(f"scikit-learn {sklearn.__version__}")
    except ImportError:
        pass
    return (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}"
        + f", {threads} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s"
        + (f"; peers: {', '.join(peers)}" if peers else "; no peers installed")
    )


def scaler_agreement(size_mib: int, dtype) -> str:
    """How closely StreamScaler's fitted statistics match StandardScaler's, float64 data."""
    Scaler = _sklearn_scaler()
    if Scaler is None:
        return ""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((min(size_mib, 64) * MiB // 8 // 256, 256)) * rng.uniform(0.1, 10, 256) + rng.uniform(-50, 50, 256)
    ours, theirs = sn.StreamScaler(), Scaler()
    for c in np.array_split(x, 64):
        ours.partial_fit(c)
        theirs.partial_fit(c)
    dm = np.max(np.abs(ours.mean_ - theirs.mean_) / np.abs(theirs.mean_))
    dv = np.max(np.abs(ours.var_ - theirs.var_) / theirs.var_)
    return (
        f"StreamScaler vs scikit-learn StandardScaler, same 64 chunks of {x.shape[0]}×256 float64: "
        f"max relative difference mean_ {dm:.1e}, var_ {dv:.1e}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamnorm bench", description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256, help="input size per operation (default 256)")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per operation; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="numba (and PyTorch) threads; default: all")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.threads is not None:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
    bandwidth = copy_bandwidth(max(256, args.size_mib) * MiB)
    print(machine_line(bandwidth, threads))
    print(f"medians of {args.repeat} runs after a warm-up call; 'vs X' is X's time over ours\n", flush=True)
    rows = []
    for case in build_cases(args.size_mib, np.dtype(args.dtype).type):
        rows.append(run_case(case, bandwidth, args.repeat))
        print(f"  measured {case.op}", file=sys.stderr, flush=True)
    print(format_table(rows, bandwidth, threads))
    agreement = scaler_agreement(args.size_mib, np.dtype(args.dtype).type)
    if agreement:
        print(f"\n{agreement}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine_line(bandwidth, threads), "bandwidth_Bps": bandwidth, "threads": threads,
                 "rows": [asdict(r) for r in rows]},
                f,
                indent=2,
            )
    return 0
