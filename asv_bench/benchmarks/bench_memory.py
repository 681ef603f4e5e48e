"""Memory of each layer's forward beyond its input and its output.

A forward allocates its output and, apart from it, only statistics (per channel, per
group, per row, or per sample and channel) and per-block partial sums, so its peak is
at most input + output + the size of those statistics.  The ``peakmem_`` benchmarks of the other files report the peak of the
whole process (interpreter, numba, the data of ``setup``), in which that last term is
lost; :class:`ForwardExtraMemory` measures it on its own:

    extra = peak resident memory during ``forward(x)``
            - resident memory just before the call (which holds ``x``)
            - ``y.nbytes``

in bytes, for 16 MiB of float32 input (32 MiB in float64; 1 MiB on the small grid of
common.py).  Anything the forward copied or allocated in the size of its input would
show here as megabytes; a healthy forward stays at a few pages beyond its statistics.

How it is measured
------------------
One child process (``sys.executable``) measures every case in ``setup_cache``.  For
each case it builds the input and the layer (with ``reuse_output = False``, so that
every call allocates a new output) and calls ``forward`` once (compiling or
loading the kernels and starting numba's threads); then, for each of a few measured
calls, it drops the previous output, collects garbage, hands freed heap memory back
to the operating system (``malloc_trim``), resets the kernel's high-water mark of
resident memory (``/proc/self/clear_refs``), reads ``VmRSS``, calls ``forward`` and
reads ``VmHWM``.  The median over the calls is reported.  The child runs with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so that every larger block, the kernels'
scratch included (numba allocates it with ``malloc``), is a mapping of its own that
shows in the high-water mark instead of reusing memory already resident.  tracemalloc
would not do: it sees NumPy's allocations, not numba's.

The high-water mark is Linux's (elsewhere the benchmark is skipped), recorded from
per-CPU counters read approximately: its resolution is about 100 KiB, not a page.
"""

from __future__ import annotations

import json
import os

from .common import DTYPES, SMALL, run_python

# Case name -> (layer class, constructor arguments, mode, input shape).  Full shapes
# hold 4 Mi values (16 MiB in float32); the small grid divides the first axis by 16.
# "eval" makes a train-mode forward first, so the running or carried statistics are
# not the initial ones.
_CASES = {
    "BatchNorm train (N, C)": ("BatchNorm", [64], {}, "train", (65536, 64)),
    "BatchNorm train (N, C, H, W)": ("BatchNorm", [64], {}, "train", (16, 64, 64, 64)),
    "BatchNorm eval (N, C, H, W)": ("BatchNorm", [64], {}, "eval", (16, 64, 64, 64)),
    "LayerNorm (N, D)": ("LayerNorm", [1024], {}, "train", (4096, 1024)),
    "RMSNorm (N, D)": ("RMSNorm", [1024], {}, "train", (4096, 1024)),
    "GroupNorm (N, C, H, W)": ("GroupNorm", [32, 64], {}, "train", (16, 64, 64, 64)),
    "InstanceNorm (N, C, H, W)": ("InstanceNorm", [64], {"affine": True}, "train", (16, 64, 64, 64)),
    "OnlineNorm train (N, C)": ("OnlineNorm", [256], {}, "train", (16384, 256)),
    "OnlineNorm train (N, C, L)": ("OnlineNorm", [128], {}, "train", (128, 128, 256)),
    "OnlineNorm eval (N, C)": ("OnlineNorm", [256], {}, "eval", (16384, 256)),
}
if SMALL:
    _CASES = {
        name: (cls, args, kwargs, mode, (shape[0] // 16, *shape[1:]))
        for name, (cls, args, kwargs, mode, shape) in _CASES.items()
    }

CASES = list(_CASES)

# Measured calls per case, of which the median is reported.
CALLS = 3

# Seconds the child may take: with an empty numba cache it compiles every forward.
CHILD_TIMEOUT = 240

# The child: argv[1] is a JSON list of [name, class, args, kwargs, mode, shape, dtype];
# it prints one JSON line, {name: {dtype: extra bytes}}, or null where the
# high-water mark cannot be read or reset.
_CHILD = r"""
import ctypes
import gc
import json
import statistics
import sys

import numpy as np
import streamnorm as sn

PAGE = 4096


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


try:
    reset_peak()
    status("VmHWM")
except OSError:
    print(json.dumps(None))
    raise SystemExit(0)

try:
    trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    trim = lambda pad: 0

cases = json.loads(sys.argv[1])
calls = int(sys.argv[2])
result = {}
for name, cls, args, kwargs, mode, shape, dtype in cases:
    g = np.random.default_rng(20240601)
    x = g.normal(0.5, 2.0, size=shape).astype(dtype)
    layer = getattr(sn, cls)(*args, **kwargs)
    layer.reuse_output = False  # a new output each call: the one term subtracted below
    y = layer.forward(x)
    if mode == "eval":
        layer.eval()
        y = layer.forward(x)
    extras = []
    for _ in range(calls):
        del y
        gc.collect()
        trim(0)
        reset_peak()
        before = status("VmRSS")
        y = layer.forward(x)
        extras.append(status("VmHWM") - before - y.nbytes)
    del x, y, layer
    result.setdefault(name, {})[dtype] = statistics.median(extras)
print(json.dumps(result))
"""


def measure() -> dict | None:
    """Run the child on every case and dtype; its result, or None off Linux."""
    cases = [[name, *spec, dtype] for name, spec in _CASES.items() for dtype in DTYPES]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    return run_python(_CHILD, [json.dumps(cases), CALLS], env, CHILD_TIMEOUT, "the measuring process")[0]


class ForwardExtraMemory:
    """Bytes a forward holds at its peak beyond its input and its output (module notes).

    Lower is better; the expected value is a few KiB whatever the input size.
    """

    params = [CASES, DTYPES]
    param_names = ["case", "dtype"]
    unit = "bytes"
    timeout = CHILD_TIMEOUT + 60

    def setup_cache(self):
        return measure()

    def setup(self, result, case, dtype):
        if result is None:
            raise NotImplementedError("needs Linux's /proc/self/clear_refs")

    def track_forward_extra(self, result, case, dtype):
        return result[case][dtype]
