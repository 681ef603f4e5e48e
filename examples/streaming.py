"""Standardizing features as they stream in: StreamScaler and normalize_stream.

A simulated sensor stream of three features arrives in chunks of 50 rows.  Feature 0
drifts (its mean climbs from 0 to 10), feature 1 grows noisier (its standard deviation
from 1 to 4), feature 2 stays put.  The script fits a scaler chunk by chunk, merges
scalers, compares the ways of normalizing a drifting stream, handles missing values and
constant features, saves and reloads a scaler, and streams a file larger than the
chunks it is read in::

    python examples/streaming.py
    python examples/streaming.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

import streamnorm as sn
from training_loop import quick_mode


def sensor_stream(n_chunks: int, rows: int = 50, seed: int = 0):
    """Yield chunks of shape (rows, 3); the drift starts a fifth of the way in."""
    rng = np.random.default_rng(seed)
    for i in range(n_chunks):
        t = max(0.0, (i - n_chunks / 5) / (n_chunks * 4 / 5))      # 0 ... 1
        mean = np.array([10.0 * t, 5.0, -2.0])
        std = np.array([1.0, 1.0 + 3.0 * t, 0.5])
        yield rng.normal(mean, std, size=(rows, 3))


def drift_report(outputs: list[np.ndarray], last: int) -> str:
    """How well the last chunks are standardized: mean |chunk mean| and mean |chunk std - 1|."""
    tail = outputs[-last:]
    off_mean = np.mean([np.abs(c.mean(axis=0)) for c in tail], axis=0)
    off_std = np.mean([np.abs(c.std(axis=0) - 1.0) for c in tail], axis=0)
    return " | ".join(f"{m:.2f} / {s:.2f}" for m, s in zip(off_mean, off_std))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter stream")
    parser.parse_args(argv)
    n_chunks = 40 if quick_mode(argv) else 200

    # 1. Fitting chunk by chunk gives the statistics of the whole: no E[x^2] - E[x]^2.
    chunks = list(sensor_stream(n_chunks))
    whole = sn.StreamScaler().fit(np.concatenate(chunks))
    chunked = sn.StreamScaler().fit(iter(chunks))               # any iterable of chunks
    print("1. chunked fit equals the fit on the concatenation: max |difference| of the variances",
          f"{np.max(np.abs(chunked.var_ - whole.var_)):.1e}")

    # 2. Two scalers fitted apart (two files, two processes) merge exactly.
    half = n_chunks // 2
    left = sn.StreamScaler().fit(iter(chunks[:half]))
    right = sn.StreamScaler().fit(iter(chunks[half:]))
    left.merge(right)
    print("2. merged halves equal the whole: max |difference| of the means",
          f"{np.max(np.abs(left.mean_ - whole.mean_)):.1e}")

    # 3. A drifting stream.  'frozen' keeps the statistics of a reference period,
    #    'prequential' normalizes each chunk with what came before it, then learns it;
    #    half_life makes the statistics forget old chunks.
    reference = sn.StreamScaler().fit(iter(chunks[: n_chunks // 5]))
    ways = {
        "frozen (reference period)": (sn.StreamScaler().fit(iter(chunks[: n_chunks // 5])), "frozen"),
        "prequential, exact": (sn.StreamScaler(), "prequential"),
        "prequential, half_life=10": (sn.StreamScaler(half_life=10), "prequential"),
        "running, half_life=10": (sn.StreamScaler(half_life=10), "running"),
    }
    last = n_chunks // 4
    print(f"3. the last {last} chunks after normalization: mean |chunk mean| / mean |chunk std - 1|")
    print("| mode | feature 0 (mean drifts) | feature 1 (spread grows) | feature 2 (stationary) |")
    print("|---|---|---|---|")
    for name, (scaler, mode) in ways.items():
        outputs = list(sn.normalize_stream(iter(chunks), scaler, mode=mode))
        print(f"| {name} | {drift_report(outputs, last)} |")
    print("   the reference scaler learned nothing:", np.array_equal(ways["frozen (reference period)"][0].mean_,
                                                                      reference.mean_))

    # 4. Missing values are skipped when fitting and kept when transforming; a constant
    #    feature maps to exactly 0, a near-constant one is divided by min_scale at most.
    X = np.array([[1.0, 7.0, 1.0], [np.nan, 7.0, 1.0 + 1e-12], [3.0, 7.0, 1.0]])
    sc = sn.StreamScaler(min_scale=1e-8).fit(X)
    print("4. values seen per feature:", sc.n_samples_seen_.tolist(), " scale_:", sc.scale_.tolist())
    print("   transformed:", np.round(sc.transform(X), 6).tolist())

    # 5. Save and load: a plain .npz without pickle; the loaded scaler keeps learning
    #    exactly where the saved one stopped.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scaler.npz")
        whole.save(path)
        loaded = sn.StreamScaler.load(path)
        more = next(sensor_stream(1, seed=1))
        same = np.array_equal(loaded.partial_fit(more).var_, whole.partial_fit(more).var_)
        print("5. reloaded scaler continues bit for bit:", same)

        # 6. A file larger than memory, read one chunk at a time from a memory map.
        big = np.lib.format.open_memmap(os.path.join(tmp, "big.npy"), mode="w+",
                                        dtype=np.float32, shape=(20_000 if n_chunks > 40 else 4_000, 3))
        for i, chunk in enumerate(sensor_stream(len(big) // 50, seed=2)):
            big[i * 50 : (i + 1) * 50] = chunk
        rows = (big[i : i + 1000] for i in range(0, len(big), 1000))
        n_out = sum(len(out) for out in sn.normalize_stream(rows, mode="prequential"))
        print(f"6. normalized {n_out} float32 rows in chunks of 1000")
        del big

    # 7. The same statistics without the estimator: RunningStats, with weights and decay.
    rs = sn.RunningStats(decay=0.1)
    for chunk in chunks:
        rs.update(chunk, weights=np.ones(len(chunk)))
    print("7. exponentially weighted mean of the stream:", rs.mean.round(2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
