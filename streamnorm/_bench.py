"""``python -m streamnorm bench``: each kernel next to its peers, in one process.

For every operation the report gives the median time over repeats (after a warm-up
call, so numba compilation is excluded), the effective bandwidth under SPEC §7's
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


def build_cases(size_mib: int, dtype=np.float32, seed: int = 0) -> list[Case]:
    """The operations of the report, each on an input of about ``size_mib`` MiB."""
    rng = np.random.default_rng(seed)
    torch = _torch()
    Scaler = _sklearn_scaler()
    itemsize = np.dtype(dtype).itemsize
    dname = np.dtype(dtype).name
    n_values = size_mib * MiB // itemsize
    cases: list[Case] = []

    def data(shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dtype, copy=False)

    # ---- RunningStats.update over 64 chunks, vs StandardScaler.partial_fit
    C = 256
    N = n_values // C
    x = data((N, C))
    chunks = np.array_split(x, 64)

    def rs_update():
        rs = sn.RunningStats()
        for c in chunks:
            rs.update(c)
        return rs

    peers = {}
    if Scaler is not None:

        def sk_update():
            s = Scaler()
            for c in chunks:
                s.partial_fit(c)
            return s

        peers["scikit-learn"] = sk_update
    cases.append(Case("RunningStats.update (64 chunks)", x.shape, dname, x.nbytes, 1, rs_update, peers))

    # ---- BatchNorm on (N, C) and on (N, C, H, W) feature maps
    dy = data((N, C))
    for shape in ((N, C), (n_values // (64 * 128 * 128), 64, 128, 128)):
        if shape[0] < 2:
            continue
        cases += _batchnorm_cases(x.reshape(shape), dy.reshape(shape), dname, torch)

    # ---- LayerNorm rows of 1024
    D = 1024
    xl = x.reshape(-1, D)
    dyl = dy.reshape(-1, D)
    ln = sn.LayerNorm(D)

    def ln_fwd_bwd():
        ln(xl)
        return ln.backward(dyl)

    peers_fwd, peers_fb = {}, {}
    if torch is not None:
        txl = torch.from_numpy(xl)
        tdyl = torch.from_numpy(dyl)
        tln = torch.nn.LayerNorm(D).to(torch.float32 if dtype == np.float32 else torch.float64)

        def tl_fwd():
            with torch.no_grad():
                return tln(txl)

        def tl_fb():
            xg = txl.detach().requires_grad_(True)
            tln(xg).backward(tdyl)
            return xg.grad

        peers_fwd["PyTorch"] = tl_fwd
        peers_fb["PyTorch"] = tl_fb
    cases.append(Case("LayerNorm forward", xl.shape, dname, xl.nbytes, 2, lambda: ln(xl), peers_fwd))
    cases.append(Case("LayerNorm forward+backward", xl.shape, dname, xl.nbytes, 5, ln_fwd_bwd, peers_fb))
    return cases


def _batchnorm_cases(x, dy, dname, torch) -> list[Case]:
    C = x.shape[1]
    bn = sn.BatchNorm(C)
    bn_eval = sn.BatchNorm(C).eval()

    def fwd_bwd():
        bn(x)
        return bn.backward(dy)

    peers_fwd, peers_eval, peers_fb = {}, {}, {}
    if torch is not None:
        tx = torch.from_numpy(x)
        tdy = torch.from_numpy(dy)
        cls = torch.nn.BatchNorm1d if x.ndim <= 3 else torch.nn.BatchNorm2d
        tbn = cls(C).to(tx.dtype)
        tbn_eval = cls(C).to(tx.dtype).eval()

        def t_fwd():
            with torch.no_grad():
                return tbn(tx)

        def t_eval():
            with torch.no_grad():
                return tbn_eval(tx)

        def t_fb():
            xg = tx.detach().requires_grad_(True)
            tbn(xg).backward(tdy)
            return xg.grad

        peers_fwd["PyTorch"] = t_fwd
        peers_eval["PyTorch"] = t_eval
        peers_fb["PyTorch"] = t_fb
    return [
        Case("BatchNorm forward, train", x.shape, dname, x.nbytes, 3, lambda: bn(x), peers_fwd),
        Case("BatchNorm forward, eval", x.shape, dname, x.nbytes, 2, lambda: bn_eval(x), peers_eval),
        Case("BatchNorm forward+backward, train", x.shape, dname, x.nbytes, 8, fwd_bwd, peers_fb),
    ]


def run_case(case: Case, bandwidth: float, repeat: int) -> Row:
    t = _median_time(case.ours, repeat)
    traffic = case.passes * case.nbytes
    bound = traffic / bandwidth
    peers_ms, speedup = {}, {}
    for name, fn in case.peers.items():
        tp = _median_time(fn, repeat)
        peers_ms[name] = tp * 1e3
        speedup[name] = tp / t
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
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine_line(bandwidth, threads), "bandwidth_Bps": bandwidth, "threads": threads,
                 "rows": [asdict(r) for r in rows]},
                f,
                indent=2,
            )
    return 0
