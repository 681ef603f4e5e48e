"""Start-up costs: ``import streamnorm`` and the first call of a kernel (docs/guide.rst).

Every other benchmark warms its kernels up in ``setup``, so they measure the steady
state only.  What a user waits for before that, numba compiling each kernel on its
first call (or loading it from numba's on-disk cache), is measured here, in fresh
Python processes started with ``sys.executable``:

* :class:`FirstCallColdCache`: the first call in a process whose ``NUMBA_CACHE_DIR``
  is a new, empty directory, so every kernel it needs is compiled (and written to
  the cache);
* :class:`FirstCallWarmCache`: the first call in a second process on the cache the
  first one filled, so every kernel is loaded from it;
* :func:`track_import_seconds`: ``import streamnorm``, which compiles nothing.

The child process times the call itself with ``time.perf_counter`` (after its imports
and after building its small input), so interpreter start-up and imports are not part
of the first-call numbers.  These benchmarks take seconds each; exclude them from a
quick run with ``-b '^(?!bench_startup)'``, or run them on the small grid of
common.py, which keeps one operation and one process per median (docs/benchmarks.rst).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile

from .common import SMALL, run_python

# Seconds a child process may take before it is killed and the benchmark fails.  A
# cold first training step of BatchNorm compiles a dozen kernels (several seconds on
# a small machine).
CHILD_TIMEOUT = 300

# What the child runs: build a small seeded input and the object, then time the first
# call of the operation named by argv[1].  Small inputs, so that the time is the
# compilation (or the loading from the cache), not the arithmetic.  It prints one
# JSON line: {"seconds": ...}.
_FIRST_CALL = r"""
import json
import sys
import time

import numpy as np
import streamnorm as sn

op = sys.argv[1]
g = np.random.default_rng(20240601)


def data(*shape):
    return g.normal(0.5, 2.0, size=shape).astype(np.float32)


if op == "running_stats_update":
    x = data(4096, 16)
    rs = sn.RunningStats()
    call = lambda: rs.update(x)
elif op == "batchnorm_forward_backward":
    x, dy = data(8, 16, 8, 8), data(8, 16, 8, 8)
    layer = sn.BatchNorm(16)
    call = lambda: (layer.forward(x), layer.backward(dy))
elif op == "layernorm_forward":
    x = data(64, 256)
    layer = sn.LayerNorm(256)
    call = lambda: layer.forward(x)
elif op == "onlinenorm_forward":
    x = data(256, 32)
    layer = sn.OnlineNorm(32)
    call = lambda: layer.forward(x)
else:
    raise SystemExit(f"unknown operation {op!r}")

t0 = time.perf_counter()
call()
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds}))
"""

_IMPORT = r"""
import json
import time

t0 = time.perf_counter()
import streamnorm
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds}))
"""

# One representative operation per kind of kernel: the streaming moments, a layer
# over the batch axis (forward and backward), a layer over the last axis, and the
# sample-by-sample recurrences of OnlineNorm.  The small grid (common.py) keeps only
# the first.
OPERATIONS = [
    "running_stats_update",
    "batchnorm_forward_backward",
    "layernorm_forward",
    "onlinenorm_forward",
]
if SMALL:
    OPERATIONS = OPERATIONS[:1]

# Processes whose median a warm-cache first call or an import reports; one on the
# small grid, which only checks that the benchmarks run.
REPEATS = 1 if SMALL else 3


def run_child(code: str, args=(), cache_dir: str | None = None) -> float:
    """Run ``code`` in a fresh interpreter and return the seconds it reports.

    ``cache_dir`` becomes the child's ``NUMBA_CACHE_DIR``.  A child that fails, prints
    no result or outlives :data:`CHILD_TIMEOUT` raises, with its stderr in the message.
    """
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    for value in run_python(code, args, env, CHILD_TIMEOUT, f"child {list(args)}"):
        if isinstance(value, dict) and "seconds" in value:
            return float(value["seconds"])
    raise RuntimeError(f"child {list(args)} printed no seconds")


class _FirstCall:
    params = [OPERATIONS]
    param_names = ["operation"]
    unit = "seconds"
    # asv calls a track_ benchmark once per run and parameter whatever these say;
    # they are set so the class keeps to one call if it is ever timed instead.
    repeat = 1
    number = 1
    rounds = 1
    # Setup and the measurement start up to three processes, each of which may
    # compile everything.
    timeout = 3 * CHILD_TIMEOUT + 60

    def setup(self, operation):
        self.cache_dir = tempfile.mkdtemp(prefix="numba-cache-")

    def teardown(self, operation):
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def first_call(self, operation) -> float:
        return run_child(_FIRST_CALL, [operation], cache_dir=self.cache_dir)


class FirstCallColdCache(_FirstCall):
    """Seconds of the first call with an empty numba cache: compilation."""

    def track_first_call(self, operation):
        return self.first_call(operation)


class FirstCallWarmCache(_FirstCall):
    """Seconds of the first call in a new process whose numba cache a previous process
    filled: loading the compiled kernels.  The median of :data:`REPEATS` processes
    (three)."""

    def setup(self, operation):
        super().setup(operation)
        self.first_call(operation)  # compiles and fills the cache

    def track_first_call(self, operation):
        return statistics.median(self.first_call(operation) for _ in range(REPEATS))


def setup_import():
    # One import first, so that the measured ones find the modules' files in the
    # page cache (and their bytecode compiled, where Python writes it), as every
    # import after the first does.
    run_child(_IMPORT)


def track_import_seconds():
    """Seconds of ``import streamnorm`` in a fresh process, the median of
    :data:`REPEATS` (three)."""
    return statistics.median(run_child(_IMPORT) for _ in range(REPEATS))


track_import_seconds.setup = setup_import
track_import_seconds.unit = "seconds"
track_import_seconds.timeout = 4 * CHILD_TIMEOUT
