"""numba CPU kernels.  Private: the public API lives in ``stats`` and ``functional``.

Conventions
-----------
* Every kernel accumulates in float64, whatever the input dtype, and writes outputs
  into arrays allocated by the caller (so the caller picks the output dtype).
* Parallel kernels split the *leading* axis of C-contiguous data (the channels, for
  OnlineNorm) into contiguous blocks that the threads claim one at a time (see "Work
  dealt in blocks" below), keep one partial state per block, and merge the partial
  states serially in block order with Chan's formula (no two threads write the same
  memory), so that results do not depend on the thread count.  The number of threads
  is passed in by the caller (``numba.get_num_threads()``), never read from a global,
  so ``numba.set_num_threads`` is respected.  The plain-Python dispatchers
  (:func:`affine`, :func:`bn_dx`) read it at each call, which respects it too.
* Reductions along a contiguous row are loops whose accumulating addition alone may
  be reassociated (LLVM's ``reassoc`` flag), so that they vectorize with accumulators
  in registers; the per-element terms are computed without fast-math flags (see the
  row helpers below).  Column reductions vectorize across columns as written.
* The row-norm backward may also fuse a multiply and an add into one FMA (one
  rounding instead of two).  No other fast-math flag: accuracy comes first.
* The OnlineNorm (N, C) kernels fuse chosen multiply-adds explicitly (:func:`_fma`),
  so that the backward's replay of the state rounds exactly as the forward did.
* Per-feature vectors that a loop sweeps beside every row of the data (weights,
  scales, per-column sums and state) start on a 64-byte boundary: the call sites of
  those kernels pass them through ``_memory.lined`` and the kernels allocate their
  own with :func:`_lined_empty`.
"""

from __future__ import annotations

import llvmlite.binding as _llvm
import numpy as np
from llvmlite import ir as _ir
from numba import get_num_threads, njit, prange
from numba.core import cgutils as _cgutils
from numba.core import types as _types
from numba.extending import intrinsic as _intrinsic

from . import _memory
from ._welford import chan_merge as _chan_py
from ._welford import welford_add as _welford_py

_chan = njit(inline="always", cache=True)(_chan_py)
_welford = njit(inline="always", cache=True)(_welford_py)

# error_model="numpy": IEEE semantics for division (inf/nan, no ZeroDivisionError
# branch), which also lets LLVM vectorize loops that divide.
_JIT = dict(cache=True, nogil=True, error_model="numpy")


# ---------------------------------------------------------------------------
# Software prefetch
# ---------------------------------------------------------------------------

# LLVM 15 made pointers opaque and renamed the intrinsic's overload accordingly
_PREFETCH = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"
#: bytes fetched by one prefetch (a cache line on every current x86-64 and ARM64 core)
_LINE = 64


@_intrinsic
def _prefetch(typingctx, arr, a, i, j):
    """Hint that ``arr[a, i, j]`` (a 3-D array) is read soon: a read prefetch into the
    L2 cache (x86 ``prefetcht1``).  A hint only: it never faults and changes no result.
    Indices must be in bounds and non-negative (no wrap-around is applied)."""
    sig = _types.void(arr, a, i, j)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        idx = [context.cast(builder, v, t, _types.intp) for v, t in zip(args[1:], signature.args[1:])]
        ptr = _cgutils.get_item_pointer(context, builder, aty, ary, idx, wraparound=False)
        vp = builder.bitcast(ptr, _ir.IntType(8).as_pointer())
        i32 = _ir.IntType(32)
        fnty = _ir.FunctionType(_ir.VoidType(), [vp.type, i32, i32, i32])
        fn = _cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH)
        # (address, read, locality 2 = keep in L2 and beyond, data cache)
        builder.call(fn, [vp, _ir.Constant(i32, 0), _ir.Constant(i32, 2), _ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------
# Fused multiply-add
# ---------------------------------------------------------------------------


@_intrinsic
def _fma(typingctx, a, b, c):
    """``a·b + c`` on float64 with one rounding (LLVM's ``llvm.fma``, one instruction on
    every x86-64 core since 2013 and on every ARM64 core; a correctly rounded library
    call elsewhere).  Unlike the ``contract`` fast-math flag, which lets the compiler
    fuse or not at each site, it gives the same bits wherever it is written, so a
    recurrence that one kernel runs and another replays stays identical.  LLVM
    vectorizes it like any arithmetic."""
    f64 = _types.float64
    sig = f64(f64, f64, f64)

    def codegen(context, builder, signature, args):
        d = _ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [d], _ir.FunctionType(d, [d, d, d]))
        return builder.call(fn, args)

    return sig, codegen


# ---------------------------------------------------------------------------
# Vector width
# ---------------------------------------------------------------------------


@_intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with 512-bit vectors where the core has
    them (the function attribute ``"prefer-vector-width"="512"``); no code of its own.

    LLVM's tuning for Intel's AVX-512 cores prefers 256-bit vectors, so that code
    with a few vector instructions among scalar ones keeps the core's clock.  A
    kernel that is nothing but vector float64 arithmetic gains from twice the lanes
    and twice the registers: on the Xeon VM the row-norm backward's sums sweep ran
    0.54 ns per value with 256-bit vectors and 0.38 with 512.  On cores without
    AVX-512, and on other architectures, the attribute changes nothing.  It is a hint:
    where llvmlite's attribute set refuses it, nothing is added.
    """
    sig = _types.void()

    def codegen(context, builder, signature, args):
        try:
            # llvmlite's FunctionAttributes only admits the attributes it names; a
            # string attribute goes into the underlying set, which it prints as is
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except Exception:  # pragma: no cover - a hint only
            pass
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------
# Streaming stores
#
# A plain store to a line that is not in cache first reads the line from memory, so a
# pass that reads one array and writes another moves three arrays' worth of bytes.  A
# kernel whose output is far larger than the caches may instead write each row into a
# small buffer (it stays in L1) and copy the buffer out a cache line at a time with
# non-temporal stores, which send the line to memory without reading it.  The caller
# decides (``_memory.streaming``): only when every row starts on a 64-byte boundary,
# and only for outputs too large to be read back from cache anyway.
# ---------------------------------------------------------------------------


@_intrinsic
def _stream_line(typingctx, dst, j, src, k):
    """``dst[j:j + n] = src[k:k + n]`` for the n values of one 64-byte line, as one
    non-temporal store.  ``dst[j]`` must be 64-byte aligned (x86 faults otherwise);
    both arrays 1-D, contiguous, of one dtype."""
    if dst.dtype != src.dtype:
        return None
    sig = _types.void(dst, j, src, k)

    def codegen(context, builder, signature, args):
        dty, jty, sty, kty = signature.args
        d = context.make_array(dty)(context, builder, args[0])
        s = context.make_array(sty)(context, builder, args[2])
        jj = context.cast(builder, args[1], jty, _types.intp)
        kk = context.cast(builder, args[3], kty, _types.intp)
        pd = _cgutils.get_item_pointer(context, builder, dty, d, [jj], wraparound=False)
        ps = _cgutils.get_item_pointer(context, builder, sty, s, [kk], wraparound=False)
        elem = context.get_data_type(dty.dtype)
        vty = _ir.VectorType(elem, _LINE * 8 // dty.dtype.bitwidth)
        v = builder.load(builder.bitcast(ps, vty.as_pointer()), align=dty.dtype.bitwidth // 8)
        st = builder.store(v, builder.bitcast(pd, vty.as_pointer()), align=_LINE)
        st.set_metadata("nontemporal", builder.module.add_metadata([_ir.Constant(_ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@_intrinsic
def _store_fence(typingctx):
    """A full memory fence: the non-temporal stores before it are globally visible
    before any memory access after it."""
    sig = _types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@njit(**_JIT)
def _stream_row(buf, orow):
    """``orow[:] = buf[:len(orow)]``, whole lines with non-temporal stores (``orow``
    must start on a 64-byte boundary), a partial last line with plain stores."""
    n = orow.shape[0]
    per = _LINE // orow.itemsize
    j = 0
    while j + per <= n:
        _stream_line(orow, j, buf, j)
        j += per
    for q in range(j, n):
        orow[q] = buf[q]


#: values per piece when a long row is streamed (a multiple of any line's values)
_STREAM_PIECE = 1024


# ---------------------------------------------------------------------------
# Contiguous-row helpers
#
# A reduction along a contiguous row is a plain loop ``s += term(v[j])`` whose addition
# carries LLVM's ``reassoc`` flag (``_RED``), so that LLVM vectorizes it with several
# vector accumulators held in registers.  The per-element terms are computed in the
# ``_t_*`` helpers, compiled without any fast-math flag: after LLVM inlines them their
# instructions keep no flags, so the only freedom granted is the order in which the
# terms are added (LLVM cannot turn ``Σ (v - k)`` into ``Σ v - n·k``, nor expand
# ``(v - μ)²``).  The order is fixed for a given machine and build.
# ---------------------------------------------------------------------------

_RED = dict(_JIT, fastmath={"reassoc"})

#: one sweep's shifted sums may lose at most this factor of Σ (x - k)² to cancellation
#: (4 bits) before M2 is summed again around the mean (docs/math.rst)
_CANCEL = 16.0


@njit(**_JIT)
def _t_dev(a, k):
    return np.float64(a) - k


@njit(**_JIT)
def _t_sqdev(a, k):
    d = np.float64(a) - k
    return d * d


@njit(**_JIT)
def _t_proddev(g, w, a, k):
    return (np.float64(g) * w) * (np.float64(a) - k)


@njit(**_RED)
def _row_sumsq_dev(v, mu):
    """Σ (v[j] - mu)² in float64."""
    s = 0.0
    for j in range(v.shape[0]):
        s += _t_sqdev(v[j], mu)
    return s


@njit(**_RED)
def _row_sum2(g, x, mu):
    """(Σ g, Σ g·(x - mu)) in float64 over contiguous rows g, x."""
    s1 = 0.0
    s2 = 0.0
    for j in range(g.shape[0]):
        s1 += np.float64(g[j])
        s2 += _t_proddev(g[j], 1.0, x[j], mu)
    return s1, s2


@njit(**_RED)
def _row_sums_shifted(v, k):
    """(Σ (v[j] - k), Σ (v[j] - k)²) in float64, in one sweep."""
    s1 = 0.0
    s2 = 0.0
    for j in range(v.shape[0]):
        s1 += _t_dev(v[j], k)
        s2 += _t_sqdev(v[j], k)
    return s1, s2


@njit(**_JIT)
def _row_moments(v):
    """(mean, M2) of a contiguous row: one shifted sweep, and a second from cache,
    shifted by the mean the first found, where the first one's sums cancel (as
    :func:`_col_block_moments`; docs/math.rst).

    The shift is the row's first value, so a constant row gives mean equal to that
    value and M2 exactly 0.
    """
    n = v.shape[0]
    k = np.float64(v[0])
    s1, s2 = _row_sums_shifted(v, k)
    d = s1 / n
    m2 = s2 - s1 * d
    mu = k + d
    if m2 * _CANCEL < s2:
        s1, s2 = _row_sums_shifted(v, mu)
        d = s1 / n
        m2 = s2 - s1 * d
        mu = mu + d
    return mu, m2


@njit(**_JIT)
def _row_moments_blocked(v, block):
    """(n, mean, M2) of a long row, two-pass per block of ``block`` values, Chan-merged."""
    n = v.shape[0]
    cn = 0.0
    cm = 0.0
    c2 = 0.0
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        mu, m2 = _row_moments(v[b0:b1])
        cn, cm, c2 = _chan(cn, cm, c2, np.float64(b1 - b0), mu, m2)
    return cn, cm, c2


@njit(**_JIT)
def _span(t, n, nthreads):
    """The contiguous range [lo, hi) of n items that part t of nthreads parts owns."""
    return t * n // nthreads, (t + 1) * n // nthreads


# ---------------------------------------------------------------------------
# Work dealt in blocks
#
# A kernel splits its items (rows, samples, channels) into blocks, and each of its
# threads claims the next unclaimed block until none is left.  On a machine whose cores
# run at unequal speeds (a virtual machine's core shared with other work on its host, or
# a processor with cores of two kinds) a fast thread then takes more blocks, where an
# equal split would leave it waiting for the slowest.  A kernel that reduces across
# blocks keeps one partial result per block, never per thread, and combines them in
# block order, so its result depends on neither which thread took a block nor how many
# threads there are.
# ---------------------------------------------------------------------------

#: bytes of input per block, for kernels whose blocks write separate outputs
_DEAL_BYTES = 256 * 1024
#: the most blocks a reducing kernel splits into (each block keeps a partial result)
_REDUCE_BLOCKS = 16


@_intrinsic
def _claim(typingctx, counter):
    """The next unclaimed block: atomically ``counter[0] += 1`` (an int64 array),
    returning the value it had."""
    sig = _types.int64(counter)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        zero = context.get_constant(_types.intp, 0)
        ptr = _cgutils.get_item_pointer(context, builder, aty, ary, [zero], wraparound=False)
        return builder.atomic_rmw("add", ptr, _ir.Constant(_ir.IntType(64), 1), "monotonic")

    return sig, codegen


@njit(**_JIT)
def _deal_blocks(n, nthreads, item_bytes):
    """Blocks for n items of ``item_bytes`` each whose outputs are separate: about
    ``_DEAL_BYTES`` of input per block, at least one per thread, at most n."""
    per = max(1, _DEAL_BYTES // max(1, item_bytes))
    return max(1, min(n, max(nthreads, (n + per - 1) // per)))


@njit(**_JIT)
def _col_blocks(C, nthreads, itemsize):
    """Blocks of the channels of (N, C) data, each taking a slice of every row: at
    least ``nthreads`` (the caller keeps each thread's slice at 1 KiB or more), and up
    to 16 while a slice stays at 32 KiB or more (on ``(4096, 16384)`` float32, four
    slices of 16 KiB took 2 % to 5 % longer than two of 32 KiB)."""
    return max(1, min(C, max(nthreads, min(16, C * itemsize // 32768))))


@njit(**_JIT)
def _reduce_blocks(n, per):
    """Blocks for a reduction over n items: one per ``per`` items, at least two (one
    for n = 1), at most ``_REDUCE_BLOCKS``; independent of the thread count."""
    return max(1, min(n, max(2, min(_REDUCE_BLOCKS, n // max(1, per)))))


@njit(**_JIT)
def _lined_empty(n, dtype):
    """An uninitialized (n,) vector of ``dtype`` that starts on a 64-byte boundary.

    numba's own allocations start 32 bytes past one (numpy's 16).  A vector that a
    kernel sweeps beside every row of the data (per-feature sums, state, weights, the
    row buffer of a streaming store) in vector loads and stores that each straddle two
    cache lines can cost a memory-bound kernel a sixth of its time or more."""
    buf = np.empty(n + _LINE, dtype)
    k = (-buf.ctypes.data) % _LINE // buf.itemsize
    return buf[k : k + n]


@njit(**_JIT)
def _lined(a):
    """A copy of the 1-D ``a`` that starts on a 64-byte boundary (:func:`_lined_empty`)."""
    out = _lined_empty(a.shape[0], a.dtype)
    out[:] = a
    return out


@njit(**_JIT)
def _zero_states(nb, F):
    """Empty partial states of nb blocks: (count, mean, M2), each (nb, F) float64."""
    return np.zeros((nb, F)), np.zeros((nb, F)), np.zeros((nb, F))


@njit(**_JIT)
def merge_states(na, ma, m2a, nb, mb, m2b):
    """Chan-merge two flat state triples elementwise into new arrays."""
    F = na.shape[0]
    n = np.empty(F)
    m = np.empty(F)
    m2 = np.empty(F)
    for j in range(F):
        n[j], m[j], m2[j] = _chan(na[j], ma[j], m2a[j], nb[j], mb[j], m2b[j])
    return n, m, m2


@njit(**_JIT)
def all_finite(a, b):
    """Whether every value of the float arrays a and b is finite."""
    for j in range(a.size):
        if not np.isfinite(a.flat[j]):
            return False
    for j in range(b.size):
        if not np.isfinite(b.flat[j]):
            return False
    return True


@njit(**_JIT)
def scaler_attributes(n, mean, m2, min_scale):
    """StreamScaler's fitted attributes from a flat (F,) state, in one sweep.

    Returns ``(mean, var, scale, uniform)`` as new arrays: ``mean`` with NaN where
    ``n == 0``; the population ``var = M2 / n`` (NaN where ``n == 0``); ``scale =
    max(sqrt(var), min_scale)``, NaN where var is NaN; and whether every feature has
    the same count (False for F = 0).
    """
    F = n.shape[0]
    mo = np.empty(F)
    var = np.empty(F)
    scale = np.empty(F)
    uniform = F > 0
    for j in range(F):
        nj = n[j]
        if nj == 0.0:
            mo[j] = np.nan
            var[j] = np.nan
        else:
            mo[j] = mean[j]
            var[j] = m2[j] / nj
        v = var[j]
        scale[j] = np.nan if np.isnan(v) else max(np.sqrt(v), min_scale)
        uniform = uniform and nj == n[0]
    return mo, var, scale, uniform


@njit(**_JIT)
def _merge_partials(pn, pm, p2):
    """Chan-merge per-block partial states (T, F) into (F,) states, in block order."""
    T, F = pn.shape
    n = np.zeros(F)
    m = np.zeros(F)
    m2 = np.zeros(F)
    for t in range(T):
        for j in range(F):
            n[j], m[j], m2[j] = _chan(n[j], m[j], m2[j], pn[t, j], pm[t, j], p2[t, j])
    return n, m, m2


# ---------------------------------------------------------------------------
# Column moments: x of shape (A, M, B), statistics over M for every (a, b)
# ---------------------------------------------------------------------------


@njit(**_JIT)
def _prefetch_row(x, a, i, B, step):
    for j in range(0, B, step):
        _prefetch(x, a, i, j)


@njit(parallel=True, **_JIT)
def col_moments(x, nthreads, block):
    """Per-column (n, mean, M2) of ``x`` (A, M, B) reduced over M.

    Rows are split into contiguous work blocks (:func:`_reduce_blocks`) that the
    threads claim in turn.  Each work block is processed in cache blocks of ``block``
    rows by one shifted sweep (:func:`_col_block_sums`, docs/math.rst), a second sweep
    only where the first one's sums cancel, and each cache
    block is Chan-merged into its work block's partial state.  The shift is the work
    block's first row, then the mean of the rows before.  Returns three (A*B,) float64
    arrays.
    """
    A, M, B = x.shape
    F = A * B
    # blocks of 16 or more cache blocks: merging the partial states costs about 1 µs per
    # block of 256 columns
    nb = _reduce_blocks(M, 16 * block)
    counter = np.zeros(1, np.int64)
    pn, pm, p2 = _zero_states(nb, F)
    for _t in prange(nthreads):
        k = _lined_empty(B, np.float64)
        s1 = _lined_empty(B, np.float64)
        s2 = _lined_empty(B, np.float64)
        mb = _lined_empty(B, np.float64)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, M, nb)
            _col_moments_range(x, r0, r1, block, k, s1, s2, mb, pn[t], pm[t], p2[t])
            t = _claim(counter)
    return _merge_partials(pn, pm, p2)


@njit(**_JIT)
def _col_moments_range(x, r0, r1, block, k, s1, s2, mb, pn, pm, p2):
    """:func:`col_moments` over rows [r0, r1), merged into the (F,) states pn, pm, p2;
    ``k``, ``s1``, ``s2`` and ``mb`` are (B,) work vectors."""
    A, M, B = x.shape
    for a in range(A):
        off = a * B
        for j in range(B):
            k[j] = x[a, r0, j]
        for b0 in range(r0, r1, block):
            b1 = min(b0 + block, r1)
            n = np.float64(b1 - b0)
            _col_block_sums(x[a], b0, b1, k, s1, s2)
            if _col_block_moments(k, s1, s2, n, mb):
                # some column's sums cancelled: sweep the block (still in cache) again,
                # shifted by the mean just found (a corrected two-pass)
                _col_block_sums(x[a], b0, b1, mb, s1, s2)
                _col_block_moments(mb, s1, s2, n, mb)
            for j in range(B):
                f = off + j
                pn[f], pm[f], p2[f] = _chan(pn[f], pm[f], p2[f], n, mb[j], s2[j])
                k[j] = pm[f]


@njit(**_JIT)
def _col_block_moments(k, s1, s2, n, mean):
    """A block's means into ``mean`` and its M2 into ``s2``, from the sums
    ``s1 = Σ (x - k)`` and ``s2 = Σ (x - k)²`` over its n rows (``mean`` may be ``k``).
    Returns whether some column lost more than a factor ``_CANCEL`` of ``s2`` to
    cancellation (``M2 = s2 - s1²/n``)."""
    again = False
    for j in range(k.shape[0]):
        d = s1[j] / n
        m2 = s2[j] - s1[j] * d
        again |= m2 * _CANCEL < s2[j]
        mean[j] = k[j] + d
        s2[j] = m2
    return again


@njit(**_JIT)
def _col_block_sums(x, b0, b1, k, s1, s2):
    """``s1 = Σ (x - k)`` and ``s2 = Σ (x - k)²`` per column over rows [b0, b1) of
    ``x`` (M, B), in float64.

    The rows are read as eight streams, each an eighth of the block, one row of each
    per step: a core keeps more of memory's latency in flight on eight streams than on
    one (on a 2-core Xeon VM, 13.7 against 11 GB/s per core for a plain sum).
    """
    B = x.shape[1]
    for j in range(B):
        s1[j] = 0.0
        s2[j] = 0.0
    q = (b1 - b0) // 8
    for i in range(b0, b0 + q):
        x0, x1, x2, x3 = x[i], x[i + q], x[i + 2 * q], x[i + 3 * q]
        x4, x5, x6, x7 = x[i + 4 * q], x[i + 5 * q], x[i + 6 * q], x[i + 7 * q]
        for j in range(B):
            kj = k[j]
            d0 = x0[j] - kj
            d1 = x1[j] - kj
            d2 = x2[j] - kj
            d3 = x3[j] - kj
            d4 = x4[j] - kj
            d5 = x5[j] - kj
            d6 = x6[j] - kj
            d7 = x7[j] - kj
            s1[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            s2[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7))
    for i in range(b0 + 8 * q, b1):
        for j in range(B):
            d = x[i, j] - k[j]
            s1[j] += d
            s2[j] += d * d


@njit(parallel=True, **_JIT)
def col_moments_omit(x, nthreads, block):
    """:func:`col_moments` skipping NaNs, with a count per column.

    The shift of every block is the column's first finite value in its work block
    (found by a scan that normally stops at the first row), so a constant column still
    gives its value as the mean and M2 exactly 0.  NaNs are masked with selects, which
    keeps the loops vectorizable.
    """
    A, M, B = x.shape
    F = A * B
    nb = _reduce_blocks(M, 16 * block)
    pn, pm, p2 = _zero_states(nb, F)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        k = _lined_empty(B, np.float64)
        s = _lined_empty(B, np.float64)
        c = _lined_empty(B, np.float64)
        mb = _lined_empty(B, np.float64)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, M, nb)
            for a in range(A):
                xa = x[a]
                for j in range(B):
                    k[j] = 0.0
                    for i in range(r0, r1):
                        v = np.float64(xa[i, j])
                        if np.isfinite(v):
                            k[j] = v
                            break
                for b0 in range(r0, r1, block):
                    b1 = min(b0 + block, r1)
                    s[:] = 0.0
                    c[:] = 0.0
                    for i in range(b0, b1):
                        row = xa[i]
                        for j in range(B):
                            v = row[j]
                            ok = v == v  # the mask is on the value: inf - inf must stay NaN
                            s[j] += (v - k[j]) if ok else 0.0
                            c[j] += 1.0 if ok else 0.0
                    for j in range(B):
                        mb[j] = k[j] + s[j] / c[j] if c[j] > 0 else 0.0
                        s[j] = 0.0
                    for i in range(b0, b1):
                        row = xa[i]
                        for j in range(B):
                            v = row[j]
                            d = v - mb[j]
                            s[j] += d * d if v == v else 0.0
                    off = a * B
                    for j in range(B):
                        f = off + j
                        pn[t, f], pm[t, f], p2[t, f] = _chan(pn[t, f], pm[t, f], p2[t, f], c[j], mb[j], s[j])
            t = _claim(counter)
    return _merge_partials(pn, pm, p2)


@njit(parallel=True, **_JIT)
def col_moments_general(x, w, has_w, omit, nthreads):
    """Like :func:`col_moments` with per-row weights ``w`` (M,) and/or NaN omission.

    Weighted Welford (West 1979) per value: a NaN is skipped when ``omit`` is true, a
    zero weight contributes nothing.  Returns (n, mean, M2) with n the weight sums.
    """
    A, M, B = x.shape
    F = A * B
    nb = _reduce_blocks(M, 64)
    pn, pm, p2 = _zero_states(nb, F)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, M, nb)
            for a in range(A):
                off = a * B
                for i in range(r0, r1):
                    wi = w[i] if has_w else 1.0
                    if wi == 0.0:
                        continue
                    for j in range(B):
                        v = np.float64(x[a, i, j])
                        if omit and v != v:
                            continue
                        f = off + j
                        pn[t, f], pm[t, f], p2[t, f] = _welford(pn[t, f], pm[t, f], p2[t, f], v, wi)
            t = _claim(counter)
    return _merge_partials(pn, pm, p2)


# ---------------------------------------------------------------------------
# (N, C, L) moments: statistics per channel over N and L
# ---------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def ncl_moments(x, nthreads, block):
    """Per-channel (n, mean, M2) of ``x`` (N, C, L) over N and L.

    Samples are split into contiguous work blocks (each a contiguous stretch of
    memory) that the threads claim in turn; each (n, c) row is reduced by a blocked
    two-pass and Chan-merged into its work block's partial state for channel c.
    """
    N, C, L = x.shape
    nb = _reduce_blocks(N, 1)
    pn, pm, p2 = _zero_states(nb, C)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, N, nb)
            for i in range(r0, r1):
                for c in range(C):
                    rn, rm, r2 = _row_moments_blocked(x[i, c], block)
                    pn[t, c], pm[t, c], p2[t, c] = _chan(pn[t, c], pm[t, c], p2[t, c], rn, rm, r2)
            t = _claim(counter)
    return _merge_partials(pn, pm, p2)


# ---------------------------------------------------------------------------
# Per-channel affine application: out = (x - mean) * scale + shift
# ---------------------------------------------------------------------------


@njit(**_JIT)
def _affine_cols(xr, mean, lo, scale, shift, orow):
    """``orow = (xr - mean)·scale + shift`` elementwise over one row; with ``lo`` (not
    None) the mean is the two-term ``mean + lo`` (:func:`affine_coefs`)."""
    if lo is None:
        for j in range(xr.shape[0]):
            orow[j] = (xr[j] - mean[j]) * scale[j] + shift[j]
    else:
        for j in range(xr.shape[0]):
            orow[j] = _t_affine(xr[j], mean[j], lo[j], scale[j], shift[j])


@njit(**_JIT)
def _t_affine(a, m, lo, s, b):
    return ((a - m) - lo) * s + b


@njit(**_JIT)
def _affine1(xr, m, lo, s, b, orow):
    """``orow = (xr - (m + lo))·s + b`` over one row, with scalar coefficients (``lo``
    is 0.0, or the low term of a two-term mean)."""
    for j in range(xr.shape[0]):
        orow[j] = _t_affine(xr[j], m, lo, s, b)


@njit(**_RED)
def _affine1_sum_shifted(xr, m, s, b, orow, k):
    """:func:`_affine1` and, in the same sweep, ``Σ (xr[j] - k)`` in float64 (the sum
    alone reassociated, as :func:`_row_sums_shifted`; ``orow`` the same bits as
    :func:`_affine1`'s)."""
    acc = 0.0
    for j in range(xr.shape[0]):
        orow[j] = _t_affine(xr[j], m, 0.0, s, b)
        acc += _t_dev(xr[j], k)
    return acc


@njit(**_JIT)
def _affine1_streamed(xr, m, lo, s, b, orow, buf):
    """:func:`_affine1` into ``orow`` piece by piece through ``buf`` (``_STREAM_PIECE``
    values) and :func:`_stream_row`."""
    L = xr.shape[0]
    for j0 in range(0, L, _STREAM_PIECE):
        j1 = min(j0 + _STREAM_PIECE, L)
        _affine1(xr[j0:j1], m, lo, s, b, buf)
        _stream_row(buf, orow[j0:j1])


@njit(**_JIT)
def _split32(mu):
    """A float64 mean as two float32 terms ``(hi, lo)``, ``mu ≈ hi + lo`` (as
    :func:`affine_coefs` does for vectors)."""
    hi = np.float32(mu)
    return hi, np.float32(mu - np.float64(hi))


@njit(**_JIT)
def _lo(lo, c):
    """``lo[c]``, or 0.0 when there is no low term (``lo`` None: the branch is pruned
    at compile time, and LLVM folds the subtraction of 0.0 away)."""
    if lo is None:
        return 0.0
    return lo[c]


@njit(parallel=True, **_JIT)
def apply_cols(x, mean, lo, scale, shift, out):
    """``out[i, j] = (x[i, j] - mean[j]) * scale[j] + shift[j]`` for x (M, C) (the mean
    as ``mean + lo`` when ``lo`` is given)."""
    M = x.shape[0]
    for i in prange(M):
        _affine_cols(x[i], mean, lo, scale, shift, out[i])


@njit(parallel=True, **_JIT)
def apply_ncl(x, mean, lo, scale, shift, out):
    """``out[n, c, l] = (x[n, c, l] - mean[c]) * scale[c] + shift[c]`` for x (N, C, L)."""
    N, C, L = x.shape
    for i in prange(N):
        for c in range(C):
            _affine1(x[i, c], mean[c], _lo(lo, c), scale[c], shift[c], out[i, c])


@njit(parallel=True, **_JIT)
def apply_cols_streamed(x, mean, lo, scale, shift, out, nthreads):
    """:func:`apply_cols` with streaming stores: every row of ``out`` must start on a
    64-byte boundary."""
    M, C = x.shape
    nb = _deal_blocks(M, nthreads, C * x.itemsize)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        buf = _lined_empty(C, out.dtype)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, M, nb)
            for i in range(r0, r1):
                _affine_cols(x[i], mean, lo, scale, shift, buf)
                _stream_row(buf, out[i])
            t = _claim(counter)
        _store_fence()


@njit(parallel=True, **_JIT)
def apply_ncl_streamed(x, mean, lo, scale, shift, out, nthreads):
    """:func:`apply_ncl` with streaming stores, a row in pieces of ``_STREAM_PIECE``
    values; every row of ``out`` must start on a 64-byte boundary."""
    N, C, L = x.shape
    nb = _deal_blocks(N, nthreads, C * L * x.itemsize)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        buf = _lined_empty(min(L, _STREAM_PIECE), out.dtype)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, N, nb)
            for i in range(r0, r1):
                for c in range(C):
                    _affine1_streamed(x[i, c], mean[c], _lo(lo, c), scale[c], shift[c], out[i, c], buf)
            t = _claim(counter)
        _store_fence()


def affine_coefs(x, mean, scale, shift, out):
    """The coefficients the affine kernels take for ``x`` and ``out``: ``(mean, lo,
    scale, shift)``.

    Where either is float64 they are the float64 vectors themselves and ``lo`` is None.
    For float32 data and output they are float32 vectors, and the mean is split in two terms,
    ``mean ≈ hi + lo`` with ``hi = float32(mean)`` and ``lo = float32(mean - hi)``, so
    that a kernel computes ``((x - hi) - lo)·scale + shift`` in float32 arithmetic:
    ``x - hi`` is exact where ``x`` is within a factor 2 of the mean (data far from zero,
    where one rounded mean would cost digits), and rounded once, relative to itself,
    elsewhere.  The result is within a few float32 ulps of the float64 computation, at a
    third of the instructions; a value equal to the mean gives exactly ``shift``.
    Every vector starts on a cache line (``_memory.lined``).
    """
    if x.dtype != np.float32 or out.dtype != np.float32:
        return _memory.lined(mean), None, _memory.lined(scale), _memory.lined(shift)
    hi = mean.astype(np.float32)
    lo = (mean - hi).astype(np.float32)
    f32 = np.float32
    return (_memory.lined(hi), _memory.lined(lo), _memory.lined(np.asarray(scale, f32)),
            _memory.lined(np.asarray(shift, f32)))


def affine(x, mean, scale, shift, out):
    """``out = (x - mean)·scale + shift`` per channel, for x (M, C) or (N, C, L), on
    ``numba.get_num_threads()`` threads; through the streaming-store kernel when
    ``_memory.streaming`` allows it for ``out`` (plain Python: it picks the kernel).
    float32 data is computed in float32 from a two-term mean (:func:`affine_coefs`)."""
    stream = _memory.streaming(out, x.shape[-1])
    m, lo, s, b = affine_coefs(x, mean, scale, shift, out)
    if x.ndim == 2:
        if stream:
            return apply_cols_streamed(x, m, lo, s, b, out, get_num_threads())
        return apply_cols(x, m, lo, s, b, out)
    if stream:
        return apply_ncl_streamed(x, m, lo, s, b, out, get_num_threads())
    return apply_ncl(x, m, lo, s, b, out)


# ---------------------------------------------------------------------------
# BatchNorm backward
# ---------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def bn_bwd_sums_cols(dy, x, mean, k1, dx, write_dx, nthreads):
    """Per-channel Σdy and Σdy·(x - mean) for (M, C) data, partial sums per block.

    When ``write_dx`` is true, also writes ``dx = k1 * dy`` in the same pass (the
    eval-mode backward, where the input gradient needs no batch sums).
    """
    M, C = x.shape
    nb = _reduce_blocks(M, 64)
    p1 = np.zeros((nb, C))
    p2 = np.zeros((nb, C))
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        a1 = _lined_empty(C, np.float64)
        a2 = _lined_empty(C, np.float64)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, M, nb)
            a1[:] = 0.0
            a2[:] = 0.0
            if write_dx:
                for i in range(r0, r1):
                    for j in range(C):
                        g = np.float64(dy[i, j])
                        a1[j] += g
                        a2[j] += g * (x[i, j] - mean[j])
                    for j in range(C):
                        dx[i, j] = k1[j] * dy[i, j]
            else:
                _bn_sums_rows(dy, x, mean, r0, r1, a1, a2)
            p1[t] = a1
            p2[t] = a2
            t = _claim(counter)
    return p1.sum(axis=0), p2.sum(axis=0)


@njit(**_JIT)
def _bn_sums_rows(dy, x, mean, r0, r1, a1, a2):
    """``a1 += Σ dy`` and ``a2 += Σ dy·(x - mean)`` per column over rows [r0, r1), in
    float64, the rows read as four streams a quarter of the range each (as
    :func:`_col_block_sums`), which also adds four rows to the sums at a time."""
    C = x.shape[1]
    q = (r1 - r0) // 4
    for i in range(r0, r0 + q):
        g0, g1, g2, g3 = dy[i], dy[i + q], dy[i + 2 * q], dy[i + 3 * q]
        x0, x1, x2, x3 = x[i], x[i + q], x[i + 2 * q], x[i + 3 * q]
        for j in range(C):
            m = mean[j]
            e0 = np.float64(g0[j])
            e1 = np.float64(g1[j])
            e2 = np.float64(g2[j])
            e3 = np.float64(g3[j])
            a1[j] += (e0 + e1) + (e2 + e3)
            a2[j] += (e0 * (x0[j] - m) + e1 * (x1[j] - m)) + (e2 * (x2[j] - m) + e3 * (x3[j] - m))
    for i in range(r0 + 4 * q, r1):
        for j in range(C):
            g = np.float64(dy[i, j])
            a1[j] += g
            a2[j] += g * (x[i, j] - mean[j])


@njit(parallel=True, **_JIT)
def bn_bwd_sums_ncl(dy, x, mean, k1, dx, write_dx, nthreads):
    """(N, C, L) twin of :func:`bn_bwd_sums_cols`; dy, x and dx must be C-contiguous."""
    N, C, L = x.shape
    nb = _reduce_blocks(N, 1)
    p1 = np.zeros((nb, C))
    p2 = np.zeros((nb, C))
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, N, nb)
            for i in range(r0, r1):
                for c in range(C):
                    m = mean[c]
                    gr = dy[i, c]
                    xr = x[i, c]
                    s1, s2 = _row_sum2(gr, xr, m)
                    p1[t, c] += s1
                    p2[t, c] += s2
                    if write_dx:
                        k = k1[c]
                        dr = dx[i, c]
                        for j in range(L):
                            dr[j] = k * gr[j]
            t = _claim(counter)
    return p1.sum(axis=0), p2.sum(axis=0)


def bn_sums(dy, x, mean, k1, dx, write_dx):
    """Per-channel (Σdy, Σdy·(x - mean)) of (M, C) or (N, C, L) data, and ``dx = k1·dy``
    when ``write_dx``, on ``numba.get_num_threads()`` threads (plain Python: it picks
    the kernel)."""
    if x.ndim == 2:
        return bn_bwd_sums_cols(dy, x, _memory.lined(mean), _memory.lined(k1), dx, write_dx, get_num_threads())
    return bn_bwd_sums_ncl(dy, x, mean, k1, dx, write_dx, get_num_threads())


@njit(**_JIT)
def _bn_dx_cols(g, x, mean, lo, k1, k2, k3, d):
    """``d = k1·g + k2·(x - mean) + k3`` elementwise over one row (the mean as
    ``mean + lo`` when ``lo`` is given, as :func:`_affine_cols`)."""
    if lo is None:
        for j in range(g.shape[0]):
            d[j] = k1[j] * g[j] + k2[j] * (x[j] - mean[j]) + k3[j]
    else:
        for j in range(g.shape[0]):
            d[j] = k1[j] * g[j] + k2[j] * ((x[j] - mean[j]) - lo[j]) + k3[j]


@njit(**_JIT)
def _bn_dx1(g, x, m, lo, a, b, c, d):
    """``d = a·g + b·(x - (m + lo)) + c`` over one row, with scalar coefficients."""
    for j in range(g.shape[0]):
        d[j] = a * g[j] + b * ((x[j] - m) - lo) + c


@njit(**_JIT)
def _bn_dx1_streamed(g, x, m, lo, a, b, c, d, buf):
    """:func:`_bn_dx1` into ``d`` piece by piece, as :func:`_affine1_streamed`."""
    L = g.shape[0]
    for j0 in range(0, L, _STREAM_PIECE):
        j1 = min(j0 + _STREAM_PIECE, L)
        _bn_dx1(g[j0:j1], x[j0:j1], m, lo, a, b, c, buf)
        _stream_row(buf, d[j0:j1])


@njit(parallel=True, **_JIT)
def bn_bwd_dx_cols(dy, x, mean, lo, k1, k2, k3, dx):
    """``dx = k1·dy + k2·(x - mean) + k3`` per channel, for (M, C) data."""
    M = x.shape[0]
    for i in prange(M):
        _bn_dx_cols(dy[i], x[i], mean, lo, k1, k2, k3, dx[i])


@njit(parallel=True, **_JIT)
def bn_bwd_dx_ncl(dy, x, mean, lo, k1, k2, k3, dx):
    """(N, C, L) twin of :func:`bn_bwd_dx_cols`."""
    N, C, L = x.shape
    for i in prange(N):
        for c in range(C):
            _bn_dx1(dy[i, c], x[i, c], mean[c], _lo(lo, c), k1[c], k2[c], k3[c], dx[i, c])


@njit(parallel=True, **_JIT)
def bn_bwd_dx_cols_streamed(dy, x, mean, lo, k1, k2, k3, dx, nthreads):
    """:func:`bn_bwd_dx_cols` with streaming stores, as :func:`apply_cols_streamed`."""
    M, C = x.shape
    nb = _deal_blocks(M, nthreads, 2 * C * x.itemsize)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        buf = _lined_empty(C, dx.dtype)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, M, nb)
            for i in range(r0, r1):
                _bn_dx_cols(dy[i], x[i], mean, lo, k1, k2, k3, buf)
                _stream_row(buf, dx[i])
            t = _claim(counter)
        _store_fence()


@njit(parallel=True, **_JIT)
def bn_bwd_dx_ncl_streamed(dy, x, mean, lo, k1, k2, k3, dx, nthreads):
    """:func:`bn_bwd_dx_ncl` with streaming stores, as :func:`apply_ncl_streamed`."""
    N, C, L = x.shape
    nb = _deal_blocks(N, nthreads, 2 * C * L * x.itemsize)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        buf = _lined_empty(min(L, _STREAM_PIECE), dx.dtype)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, N, nb)
            for i in range(r0, r1):
                for c in range(C):
                    _bn_dx1_streamed(dy[i, c], x[i, c], mean[c], _lo(lo, c), k1[c], k2[c], k3[c], dx[i, c], buf)
            t = _claim(counter)
        _store_fence()


def bn_dx(dy, x, mean, k1, k2, k3, dx):
    """``dx = k1·dy + k2·(x - mean) + k3`` per channel, for (M, C) or (N, C, L) data;
    threads and kernel chosen as in :func:`affine`.  float32 data, gradient and output
    are computed in float32 arithmetic with the mean in two terms (as
    :func:`affine_coefs`); float64 otherwise."""
    stream = _memory.streaming(dx, x.shape[-1])
    # float32 coefficients only where x, dy and dx are all float32
    m, lo, c1, c2 = affine_coefs(x if dy.dtype == np.float32 else dy, mean, k1, k2, dx)
    c3 = _memory.lined(np.asarray(k3, c1.dtype))
    args = (dy, x, m, lo, c1, c2, c3, dx)
    if x.ndim == 2:
        if stream:
            return bn_bwd_dx_cols_streamed(*args, get_num_threads())
        return bn_bwd_dx_cols(*args)
    if stream:
        return bn_bwd_dx_ncl_streamed(*args, get_num_threads())
    return bn_bwd_dx_ncl(*args)


# ---------------------------------------------------------------------------
# Row-wise normalization (LayerNorm, RMSNorm): x (R, D), statistics per row
# ---------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def rownorm_fwd(x, weight, bias, eps, center, out, mean, rstd, nthreads, stream):
    """LayerNorm (``center``) or RMSNorm forward over the rows of ``x`` (R, D).

    LayerNorm: ``y = (x - μ)·r·w + b`` with ``r = 1/sqrt(var + eps)`` (biased var).
    RMSNorm:   ``y = x·r·w + b`` with ``r = 1/sqrt(mean(x²) + eps)`` (pass b = 0).
    Writes ``mean`` (zeros for RMSNorm) and ``rstd`` (R,) for the backward.  x and out
    must be C-contiguous.  A row is read from memory once and stays in cache for its
    sweeps (the moments, then the output); the next row is prefetched meanwhile, since
    a row of a page or more is where a core's own prefetcher stops.  float32 rows are
    written in float32 arithmetic from a two-term mean (:func:`_row_out`; ``weight``
    and ``bias`` then float32), and with ``stream`` through streaming stores.
    """
    R, D = x.shape
    nb = _deal_blocks(R, nthreads, D * x.itemsize)
    counter = np.zeros(1, np.int64)
    x3 = x.reshape((1, R, D))
    step = max(1, _LINE // x.itemsize)
    for t in prange(nthreads):
        buf = _lined_empty(min(D, _STREAM_PIECE) if stream else 0, out.dtype)
        b = _claim(counter)
        while b < nb:
            r0, r1 = _span(b, R, nb)
            for i in range(r0, r1):
                if i + 1 < r1:
                    _prefetch_row(x3, 0, i + 1, D, step)
                xr = x[i]
                if center:
                    mu, m2 = _row_moments(xr)
                else:
                    mu = 0.0
                    m2 = _row_sumsq_dev(xr, 0.0)
                r = 1.0 / np.sqrt(m2 / D + eps)
                mean[i] = mu
                rstd[i] = r
                if stream:
                    for j0 in range(0, D, _STREAM_PIECE):
                        j1 = min(j0 + _STREAM_PIECE, D)
                        _row_out(xr[j0:j1], mu, r, weight[j0:j1], bias[j0:j1], buf[: j1 - j0])
                        _stream_row(buf[: j1 - j0], out[i, j0:j1])
                else:
                    _row_out(xr, mu, r, weight, bias, out[i])
            b = _claim(counter)
        if stream:
            _store_fence()


@njit(**_JIT)
def _row_out(xr, mu, r, weight, bias, orow):
    """``orow = ((xr - mu)·r)·weight + bias`` over one row.  For float32 rows in float32
    arithmetic, with the mean as two float32 terms and r rounded to float32 (the
    reasoning of ``affine_coefs``); in float64 otherwise."""
    if orow.itemsize == 4 and xr.itemsize == 4:
        h, lo = _split32(mu)
        r32 = np.float32(r)
        for j in range(xr.shape[0]):
            orow[j] = (((xr[j] - h) - lo) * r32) * weight[j] + bias[j]
    else:
        for j in range(xr.shape[0]):
            orow[j] = ((xr[j] - mu) * r) * weight[j] + bias[j]


# The backward's two row sweeps may fuse a multiply and an add into one FMA (a single
# rounding where the written form has two, so never less accurate); with the sums'
# reassociation this takes a third off the instructions of the backward, which is
# bound by them rather than by memory.  Which additions fuse is fixed for a given
# machine and build, like the order of the sums.
_RED_FMA = dict(_JIT, fastmath={"reassoc", "contract"})
_FMA = dict(_JIT, fastmath={"contract"})


@njit(**_RED_FMA)
def _row_sums_grads1(g, x, w, mu, r, aw, ab):
    """Sweep 1 of the row-norm backward for one row.

    Returns ``(Σ g·w, Σ g·w·(x - μ))`` in float64 and adds the row's ``g·x̂`` to ``aw``
    and ``g`` to ``ab`` (the parameter gradients).
    """
    _wide_vectors()
    s1 = 0.0
    s2 = 0.0
    for j in range(g.shape[0]):
        gj = np.float64(g[j])
        p = _t_proddev(g[j], 1.0, x[j], mu)
        s1 += gj * w[j]
        s2 += p * w[j]
        aw[j] += p * r
        ab[j] += gj
    return s1, s2


@njit(**_FMA)
def _row_dx(g, x, w, mu, r, k2, k3, dx):
    """Sweep 2, one row: ``dx = r·(g·w) + (k2·(x - mu) + k3)``.  For float32 rows in
    float32 arithmetic (``w`` then float32), with the mean in two float32 terms and the
    coefficients rounded to float32 (as ``affine_coefs``); in float64 otherwise."""
    if dx.itemsize == 4 and x.itemsize == 4 and g.itemsize == 4:
        h, lo = _split32(mu)
        r32 = np.float32(r)
        a = np.float32(k2)
        c = np.float32(k3)
        for j in range(g.shape[0]):
            dx[j] = (g[j] * w[j]) * r32 + (((x[j] - h) - lo) * a + c)
    else:
        for j in range(g.shape[0]):
            dx[j] = (np.float64(g[j]) * w[j]) * r + ((x[j] - mu) * k2 + k3)


@njit(**_JIT)
def _row_dx_streamed(g, x, w, mu, r, k2, k3, dx, buf):
    """:func:`_row_dx` into ``dx`` piece by piece through ``buf`` (``_STREAM_PIECE``
    values) and :func:`_stream_row`."""
    D = g.shape[0]
    for j0 in range(0, D, _STREAM_PIECE):
        j1 = min(j0 + _STREAM_PIECE, D)
        _row_dx(g[j0:j1], x[j0:j1], w[j0:j1], mu, r, k2, k3, buf[: j1 - j0])
        _stream_row(buf[: j1 - j0], dx[j0:j1])


@njit(**_JIT)
def _row_dx_to(g, x, w, mu, r, k2, k3, dx, buf, stream):
    """:func:`_row_dx`, through :func:`_row_dx_streamed` when ``stream``."""
    if stream:
        _row_dx_streamed(g, x, w, mu, r, k2, k3, dx, buf)
    else:
        _row_dx(g, x, w, mu, r, k2, k3, dx)


@njit(**_JIT)
def _row_dx_coefs(s1, s2, r, D, center):
    """``(k2, k3)`` of :func:`_row_dx` from the row sums ``s1 = Σ g·w`` and
    ``s2 = Σ g·w·(x - μ)``: ``dx = r·(g·w - mean(g·w) - x̂·mean(g·w·x̂))`` with
    ``x̂ = (x - μ)·r`` is ``r·g·w - r³·s2/D·(x - μ) - r·s1/D``."""
    mg = s1 / D if center else 0.0
    return -(r * r) * (s2 * r / D), -r * mg


@njit(parallel=True, **_JIT)
def rownorm_bwd(dy, x, weight, wdx, mean, rstd, center, dx, nthreads, stream):
    """LayerNorm / RMSNorm backward over rows; returns (dweight, dbias) as (D,) float64.

    With ``g = dy·w`` and ``x̂ = (x - μ)·r``:
    LayerNorm ``dx = r·(g - mean(g) - x̂·mean(g·x̂))``;
    RMSNorm   ``dx = r·(g - x̂·mean(g·x̂))``.
    ``dweight = Σ_rows dy·x̂`` and ``dbias = Σ_rows dy`` use per-block partials.  Per
    row, one sweep gives its sums and adds its parameter gradients, a second writes dx
    while the row is still in cache (:func:`_rownorm_bwd_range`), and meanwhile the
    next row is prefetched.  ``wdx`` is the weight in dx's arithmetic (float32 for
    float32 rows, :func:`_row_dx`).  With ``stream`` dx goes out as in
    :func:`bn_bwd_dx_ncl_streamed`.
    dy, x and dx must be C-contiguous.
    """
    R, D = x.shape
    nb = _reduce_blocks(R, 16)
    counter = np.zeros(1, np.int64)
    pw = np.zeros((nb, D))
    pb = np.zeros((nb, D))
    for _t in prange(nthreads):
        aw = _lined_empty(D, np.float64)
        ab = _lined_empty(D, np.float64)
        buf = _lined_empty(min(D, _STREAM_PIECE) if stream else 0, dx.dtype)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, R, nb)
            aw[:] = 0.0
            ab[:] = 0.0
            _rownorm_bwd_range(dy, x, weight, wdx, mean, rstd, center, dx, r0, r1, aw, ab, buf, stream)
            pw[t] = aw
            pb[t] = ab
            t = _claim(counter)
        if stream:
            _store_fence()
    return pw.sum(axis=0), pb.sum(axis=0)


@njit(**_JIT)
def _rownorm_bwd_range(dy, x, weight, wdx, mean, rstd, center, dx, r0, r1, aw, ab, buf, stream):
    """:func:`rownorm_bwd` over rows [r0, r1), adding their parameter gradients to
    ``aw`` and ``ab``.  A row at a time: its sums and parameter gradients in one sweep,
    then ``dx`` from cache, while the next row is prefetched.  (Two rows per sweep, which
    passes ``aw`` and ``ab`` through the core half as often, ran 0.46 ns per value in
    cache on the Xeon VM against 0.32 for one: its eight float64 sums do not fit AVX2's
    sixteen registers.)"""
    R, D = x.shape
    x3 = x.reshape((1, R, D))
    g3 = dy.reshape((1, R, D))
    step = max(1, _LINE // x.itemsize)
    for i in range(r0, r1):
        if i + 1 < r1:
            _prefetch_row(x3, 0, i + 1, D, step)
            _prefetch_row(g3, 0, i + 1, D, step)
        s1, s2 = _row_sums_grads1(dy[i], x[i], weight, mean[i], rstd[i], aw, ab)
        k2, k3 = _row_dx_coefs(s1, s2, rstd[i], D, center)
        _row_dx_to(dy[i], x[i], wdx, mean[i], rstd[i], k2, k3, dx[i], buf, stream)


# ---------------------------------------------------------------------------
# GroupNorm / InstanceNorm: x (N*G, Cg, L), statistics per (sample, group) row
# ---------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def groupnorm_fwd(x, weight, bias, G, eps, out, mean, var, rstd, nthreads, stream):
    """GroupNorm forward on the contiguous view x (N*G, Cg, L).

    Each (sample, group) block of Cg·L values is contiguous: its moments come from the
    row helpers (one shifted sweep in cache, :func:`_row_moments`); channel
    ``c = g·Cg + ci`` then gets ``y = (x - μ)·r·w[c] + b[c]``, for float32 blocks in
    float32 arithmetic from a two-term mean (``affine_coefs``), and with ``stream``
    through streaming stores.  Writes ``mean``, biased ``var`` and ``rstd`` (N*G,).
    """
    R, Cg, L = x.shape
    D = Cg * L
    single = x.itemsize == 4 and out.itemsize == 4
    nb = _deal_blocks(R, nthreads, D * x.itemsize)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        buf = _lined_empty(min(L, _STREAM_PIECE) if stream else 0, out.dtype)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, R, nb)
            for i in range(r0, r1):
                blk = x[i].reshape(D)
                mu, m2 = _row_moments(blk)
                r = 1.0 / np.sqrt(m2 / D + eps)
                mean[i] = mu
                var[i] = m2 / D
                rstd[i] = r
                g = i % G
                for ci in range(Cg):
                    c = g * Cg + ci
                    if single:
                        h, lo = _split32(mu)
                        _affine1_to(x[i, ci], h, lo, np.float32(r * weight[c]), np.float32(bias[c]), out[i, ci],
                                    buf, stream)
                    else:
                        _affine1_to(x[i, ci], mu, 0.0, r * weight[c], bias[c], out[i, ci], buf, stream)
            t = _claim(counter)
        if stream:
            _store_fence()


@njit(**_JIT)
def _affine1_to(xr, m, lo, s, b, orow, buf, stream):
    """:func:`_affine1`, through :func:`_affine1_streamed` when ``stream``."""
    if stream:
        _affine1_streamed(xr, m, lo, s, b, orow, buf)
    else:
        _affine1(xr, m, lo, s, b, orow)


@njit(parallel=True, **_JIT)
def groupnorm_bwd(dy, x, weight, G, mean, rstd, dx, nthreads, stream):
    """GroupNorm backward on (N*G, Cg, L) views; returns per-channel (dweight, dbias).

    Per block, with ``g = dy·w[c]`` and ``x̂ = (x - μ)·r`` over its D = Cg·L values:
    ``dx = r·(g - mean(g) - x̂·mean(g·x̂))``, written per channel as BatchNorm's
    ``dx = k1·dy + k2·(x - μ) + k3`` (:func:`_bn_dx1`): for float32 data, gradient and
    output in float32 arithmetic from a two-term mean, and with ``stream`` through
    streaming stores.
    """
    R, Cg, L = x.shape
    C = G * Cg
    D = Cg * L
    nb = _reduce_blocks(R, 16)
    pw = np.zeros((nb, C))
    pb = np.zeros((nb, C))
    counter = np.zeros(1, np.int64)
    single = x.itemsize == 4 and dy.itemsize == 4 and dx.itemsize == 4
    for _t in prange(nthreads):
        buf = _lined_empty(min(L, _STREAM_PIECE) if stream else 0, dx.dtype)
        t = _claim(counter)
        while t < nb:
            r0, r1 = _span(t, R, nb)
            for i in range(r0, r1):
                mu = mean[i]
                r = rstd[i]
                g = i % G
                sg = 0.0
                sgx = 0.0
                for ci in range(Cg):
                    c = g * Cg + ci
                    s1, s2 = _row_sum2(dy[i, ci], x[i, ci], mu)
                    pb[t, c] += s1
                    pw[t, c] += r * s2
                    sg += weight[c] * s1
                    sgx += weight[c] * s2
                mg = sg / D
                mgx = sgx * r / D
                for ci in range(Cg):
                    k1 = r * weight[ci + g * Cg]
                    k2 = -(r * r) * mgx
                    k3 = -r * mg
                    if single:
                        h, lo = _split32(mu)
                        _bn_dx1_to(dy[i, ci], x[i, ci], h, lo, np.float32(k1), np.float32(k2), np.float32(k3),
                                   dx[i, ci], buf, stream)
                    else:
                        _bn_dx1_to(dy[i, ci], x[i, ci], mu, 0.0, k1, k2, k3, dx[i, ci], buf, stream)
            t = _claim(counter)
        if stream:
            _store_fence()
    return pw.sum(axis=0), pb.sum(axis=0)


@njit(**_JIT)
def _bn_dx1_to(g, x, m, lo, a, b, c, d, buf, stream):
    """:func:`_bn_dx1`, through :func:`_bn_dx1_streamed` when ``stream``."""
    if stream:
        _bn_dx1_streamed(g, x, m, lo, a, b, c, d, buf)
    else:
        _bn_dx1(g, x, m, lo, a, b, c, d)


# ---------------------------------------------------------------------------
# Online Normalization (docs/layers/onlinenorm.rst): x (N, C, L), N is time.  Parallel over channels,
# in order over samples.  The state arrays are updated in place: callers pass copies
# and commit them only when the call has succeeded.
# ---------------------------------------------------------------------------


#: the blocks of channels of the (N, C, L) kernels (fewer only with fewer channels):
#: enough that a thread finding its core slow takes fewer of them, few enough that each
#: sample's run of a block stays long (C/16 channels × L values)
_ONLINE_BLOCKS = 16


@njit(inline="always", **_JIT)
def _online_advance(m, v, mt, st, a):
    """The carried (μ, σ²) after a sample of mean ``mt`` and biased variance ``st``:
    ``δ = mt - μ``, ``μ + (1 - α)δ``, ``α σ² + (1 - α) st + α(1 - α) δ²``."""
    d = mt - m
    return m + (1.0 - a) * d, a * v + (1.0 - a) * st + a * (1.0 - a) * d * d


@njit(inline="always", **_JIT)
def _online_advance1(m, v, xv, a):
    """:func:`_online_advance` for a sample of one value (st = 0, its term left out),
    for the (N, C) kernels: ``μ + (1 - α)δ`` and ``α σ² + (α(1 - α)δ)·δ`` each end in
    one fused multiply-add (:func:`_fma`), one rounding fewer than written out, and
    the same bits in the forward and in the backward that replays it.  A σ² that
    starts at 0 or above stays so."""
    d = xv - m
    return _fma(1.0 - a, d, m), _fma(a * (1.0 - a) * d, d, a * v)


@njit(parallel=True, **_JIT)
def online_fwd(x, mu, var, alpha_f, eps, weight, bias, out, moments, nthreads):
    """Online Normalization forward over time; ``mu`` and ``var`` (C,) carry the state.

    Sample t is normalized with the state from before it:
    ``y_t = (x_t - μ)/sqrt(σ² + eps)``, ``out_t = w·y_t + b``; then
    ``δ = m_t - μ``, ``μ += (1 - α)δ``, ``σ² = α σ² + (1 - α) s²_t + α(1 - α) δ²``.

    Per sample and channel the L values are read twice while they sit in cache: one
    sweep writes ``out_t`` and sums ``x - x_t[0]`` (the shift, as in
    :func:`_row_moments`), the next sums ``(x - m_t)²``.  Each sample's mean m_t and
    M2_t = L·s²_t go to ``moments[t, c]`` (shape (N, C, 2), float64), from which the
    backward replays the state without reading x for them again.
    """
    N, C, L = x.shape
    nb = min(C, max(nthreads, _ONLINE_BLOCKS))
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        t = _claim(counter)
        while t < nb:
            c0, c1 = _span(t, C, nb)
            for n in range(N):
                for c in range(c0, c1):
                    m = mu[c]
                    k = weight[c] / np.sqrt(var[c] + eps)
                    xr = x[n, c]
                    k0 = np.float64(xr[0])
                    mt = k0 + _affine1_sum_shifted(xr, m, k, bias[c], out[n, c], k0) / L
                    m2 = _row_sumsq_dev(xr, mt)
                    moments[n, c, 0] = mt
                    moments[n, c, 1] = m2
                    mu[c], var[c] = _online_advance(m, var[c], mt, m2 / L, alpha_f)
            t = _claim(counter)


@njit(**_JIT)
def _scaled(g, a, dx):
    """``dx = g·a`` over one sample's values of a channel."""
    for j in range(g.shape[0]):
        dx[j] = np.float64(g[j]) * a


@njit(parallel=True, **_JIT)
def online_bwd(dout, x, mu, var, u, v, alpha_f, alpha_b, eps, weight, update, moments, dx, nthreads, stream):
    """Online Normalization backward; replays the forward recurrence from its start state.

    ``mu``/``var`` enter as the forward's state *before* the call and are advanced
    here, sample by sample, from the per-sample ``moments`` (N, C, 2) the forward
    wrote, so exactly as the forward did.  (An empty ``moments`` makes the backward
    recompute them from x, one more sweep per sample.)  With ``g = dout·w`` the gradient at y_t, per channel:
    ``g̃ = g - (1 - α_b)·v·y``, ``v += ⟨g̃·y⟩``; ``ĝ = g̃/scale``;
    ``dx = ĝ - (1 - α_b)·u``, ``u += ⟨dx⟩`` (``⟨·⟩`` the mean over L).  With
    ``update`` false (eval mode) the control terms are skipped: ``dx = g/scale``.
    Returns per-channel (dweight, dbias); ``u`` and ``v`` are updated in place.

    Per sample and channel the L values are read twice while they sit in cache:
    Σ dout and Σ dout·(x - m_t) in one sweep, then dx.  The sums the recurrences need
    follow exactly: with ``e = m_t - μ``, ``Σ(x - μ)² = M2_t + L·e²`` (two non-negative
    terms) and ``Σ dout·(x - μ) = Σ dout·(x - m_t) + e·Σ dout``; ``⟨g̃·y⟩`` and
    ``⟨dx⟩`` are linear in them.  With ``stream`` (train mode) dx goes out as in
    :func:`bn_bwd_dx_ncl_streamed`.
    """
    N, C, L = x.shape
    cb = 1.0 - alpha_b
    dw = np.zeros(C)
    db = np.zeros(C)
    nb = min(C, max(nthreads, _ONLINE_BLOCKS))
    kept = moments.shape[0] > 0
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        t = _claim(counter)
        while t < nb:
            c0, c1 = _span(t, C, nb)
            buf = _lined_empty(min(L, _STREAM_PIECE) if stream else 0, dx.dtype)
            for n in range(N):
                for c in range(c0, c1):
                    m = mu[c]
                    inv = 1.0 / np.sqrt(var[c] + eps)
                    w = weight[c]
                    xr = x[n, c]
                    gr = dout[n, c]
                    dr = dx[n, c]
                    if update:
                        if kept:
                            mt = moments[n, c, 0]
                            m2 = moments[n, c, 1]
                        else:
                            mt, m2 = _row_moments(xr)
                        e = mt - m
                        sg, sgd = _row_sum2(gr, xr, mt)
                        sgy = (sgd + e * sg) * inv  # Σ dout·y
                        syy = (m2 + L * e * e) * (inv * inv)  # Σ y²
                        vc = v[c]
                        uc = u[c]
                        # dx = dout·w·inv - cb·v·inv²·(x - μ) - cb·u
                        k1 = w * inv
                        k2 = cb * vc * inv * inv
                        k3 = cb * uc
                        # with -b and -c: a·g - b·(x - m) - c, bit for bit
                        if stream:
                            _bn_dx1_streamed(gr, xr, m, 0.0, k1, -k2, -k3, dr, buf)
                        else:
                            _bn_dx1(gr, xr, m, 0.0, k1, -k2, -k3, dr)
                        v[c] = vc + (w * sgy - cb * vc * syy) / L
                        u[c] = uc + (k1 * sg - k2 * (L * e) - L * k3) / L
                        mu[c], var[c] = _online_advance(m, var[c], mt, m2 / L, alpha_f)
                    else:  # eval mode froze the state
                        sg, sgm = _row_sum2(gr, xr, m)
                        sgy = sgm * inv
                        _scaled(gr, w * inv, dr)
                    dw[c] += sgy
                    db[c] += sg
            if stream:
                _store_fence()
            t = _claim(counter)
    return dw, db


#: where :func:`_inv_sqrt` may take its float32 start: s, its float32 square root and
#: its reciprocal are all normal float32 numbers
_RSQRT_LO = 1e-30
_RSQRT_HI = 1e30


@njit(inline="always", **_JIT)
def _inv_sqrt(s, approx):
    """``1/sqrt(s)`` for float64 ``s``.

    Exact (``1.0/np.sqrt(s)``, two correctly rounded operations) unless ``approx``;
    then a float32 start, ``1/sqrt(float32(s))`` (relative error below 2^-22), refined
    by one float64 Newton step ``r·(3/2 - s·r²/2)`` (its last multiply-add fused),
    whose relative error is below 1.5·(2^-22)² + a few float64 roundings, about
    2^-42.  That is far below a float32 output's half ulp (2^-24), and float32's square
    root and division run several times faster than float64's.  Valid for s in
    [_RSQRT_LO, _RSQRT_HI]: the kernels take the start only where
    :func:`_rsqrt_start_ok` holds, which keeps s above the low end, check each s
    against the high end (:func:`_above_rsqrt_range`), and recompute exactly past it.
    """
    if approx:
        r = np.float64(np.float32(1.0) / np.sqrt(np.float32(s)))
        return r * _fma(-0.5 * s, r * r, 1.5)
    return 1.0 / np.sqrt(s)


@njit(**_JIT)
def _rsqrt_start_ok(v_, eps):
    """Whether a block whose carried σ² start at ``v_`` keeps every ``σ² + eps`` at or
    above ``_RSQRT_LO``: :func:`_online_advance1` never lowers a σ² below 0, so
    ``eps >= _RSQRT_LO`` and no negative start suffice (a NaN start stays NaN on
    either path)."""
    if eps < _RSQRT_LO:
        return False
    for c in range(v_.shape[0]):
        if v_[c] < 0.0:
            return False
    return True


@njit(inline="always", **_JIT)
def _above_rsqrt_range(s):
    return s > _RSQRT_HI


#: channels a thread must own for the (N, C) kernels to take several samples per sweep:
#: below it the helpers' call and alias checks cost more than the saved state traffic
_ONLINE_WIDE = 1024


@njit(inline="always", **_JIT)
def _online_fwd_step(xv, m, v, w, b, a, eps, approx):
    """One sample of one channel (L = 1): (output, new μ, new σ²)."""
    y = _fma(xv - m, w * _inv_sqrt(v + eps, approx), b)
    m1, v1 = _online_advance1(m, v, xv, a)
    return y, m1, v1


@njit(**_JIT)
def _online_fwd_rows4(x0, x1, x2, x3, o0, o1, o2, o3, m_, v_, w_, b_, a, eps, approx):
    """Four consecutive samples over a block of channels, the state held in registers
    in between: it is read and written once for four samples.  Returns True when some
    ``var + eps`` left the float32 start's range (:func:`_inv_sqrt`)."""
    _wide_vectors()
    bad = False
    for c in range(m_.shape[0]):
        w = w_[c]
        b = b_[c]
        m = m_[c]
        v = v_[c]
        bad |= _above_rsqrt_range(v + eps)
        o0[c], m, v = _online_fwd_step(np.float64(x0[c]), m, v, w, b, a, eps, approx)
        bad |= _above_rsqrt_range(v + eps)
        o1[c], m, v = _online_fwd_step(np.float64(x1[c]), m, v, w, b, a, eps, approx)
        bad |= _above_rsqrt_range(v + eps)
        o2[c], m, v = _online_fwd_step(np.float64(x2[c]), m, v, w, b, a, eps, approx)
        bad |= _above_rsqrt_range(v + eps)
        o3[c], m, v = _online_fwd_step(np.float64(x3[c]), m, v, w, b, a, eps, approx)
        m_[c] = m
        v_[c] = v
    return bad


@njit(**_JIT)
def _online_fwd_block(x, out, m_, v_, w_, b_, c0, a, eps, approx):
    """All samples of the channels ``c0 + [0, len(m_))``, advancing the block's state
    ``m_``, ``v_`` in place; returns as :func:`_online_fwd_rows4`."""
    N = x.shape[0]
    c1 = c0 + m_.shape[0]
    _wide_vectors()
    bad = False
    n = 0
    while n + 4 <= N and c1 - c0 >= _ONLINE_WIDE:
        bad |= _online_fwd_rows4(
            x[n, c0:c1], x[n + 1, c0:c1], x[n + 2, c0:c1], x[n + 3, c0:c1],
            out[n, c0:c1], out[n + 1, c0:c1], out[n + 2, c0:c1], out[n + 3, c0:c1],
            m_, v_, w_, b_, a, eps, approx,
        )
        n += 4
    for n1 in range(n, N):
        xr = x[n1, c0:c1]
        orow = out[n1, c0:c1]
        for c in range(c1 - c0):
            m = m_[c]
            v = v_[c]
            bad |= _above_rsqrt_range(v + eps)
            y, m, v = _online_fwd_step(np.float64(xr[c]), m, v, w_[c], b_[c], a, eps, approx)
            orow[c] = y
            m_[c] = m
            v_[c] = v
    return bad


@njit(parallel=True, **_JIT)
def online_fwd_cols(x, mu, var, alpha_f, eps, weight, bias, out, nthreads, approx):
    """:func:`online_fwd` for (N, C) input (L = 1: s²_t = 0), vectorized over channels.

    The threads claim contiguous blocks of channels (:func:`_col_blocks`) in turn, and
    each walks time in order over its block, carrying the block's state in arrays of
    its own (written back at the end), so that no cache line of state is written by
    two threads, and taking four samples per sweep of a
    wide block so that the state is read and written once for four.  With ``approx``
    (float32 data) the scale comes from :func:`_inv_sqrt`'s refined float32 start,
    unless :func:`_rsqrt_start_ok` refuses the block's start; a thread whose block met
    a ``var + eps`` above that start's range recomputes the block from its start state
    with the exact scale.  Multiply-adds are fused (:func:`_fma`) in the output and in
    the state's update, here and in the backward alike.  The helpers take row slices
    indexed from 0 (numba's negative-index wraparound check would otherwise stop LLVM
    from vectorizing them).
    """
    C = x.shape[1]
    nb = _col_blocks(C, nthreads, x.itemsize)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        t = _claim(counter)
        while t < nb:
            c0, c1 = _span(t, C, nb)
            m_ = _lined(mu[c0:c1])
            v_ = _lined(var[c0:c1])
            w_ = _lined(weight[c0:c1])
            b_ = _lined(bias[c0:c1])
            ap = approx and _rsqrt_start_ok(v_, eps)
            if _online_fwd_block(x, out, m_, v_, w_, b_, c0, alpha_f, eps, ap) and ap:
                m_[:] = mu[c0:c1]
                v_[:] = var[c0:c1]
                _online_fwd_block(x, out, m_, v_, w_, b_, c0, alpha_f, eps, False)
            mu[c0:c1] = m_
            var[c0:c1] = v_
            t = _claim(counter)


@njit(inline="always", **_JIT)
def _online_bwd_step(xv, go, m, vv, u, vc, w, dw, db, a, cb, eps, approx):
    """One sample of one channel (L = 1, train mode): (dx, μ, σ², u, v, Σdz·y, Σdz) after it."""
    inv = _inv_sqrt(vv + eps, approx)
    y = (xv - m) * inv
    gt = _fma(-cb * vc, y, go * w)
    d = _fma(gt, inv, -cb * u)
    m1, v1 = _online_advance1(m, vv, xv, a)
    return d, m1, v1, u + d, _fma(gt, y, vc), _fma(go, y, dw), db + go


@njit(**_JIT)
def _online_bwd_rows2(x0, x1, g0, g1, d0, d1, m_, v_, u_, vc_, w_, dw_, db_, a, cb, eps, approx):
    """Two consecutive samples over a block of channels, the state held in registers in
    between (with more rows at once LLVM no longer vectorizes the loop)."""
    _wide_vectors()
    bad = False
    for c in range(m_.shape[0]):
        w = w_[c]
        m, vv, u, vc, dw, db = m_[c], v_[c], u_[c], vc_[c], dw_[c], db_[c]
        bad |= _above_rsqrt_range(vv + eps)
        d0[c], m, vv, u, vc, dw, db = _online_bwd_step(
            np.float64(x0[c]), np.float64(g0[c]), m, vv, u, vc, w, dw, db, a, cb, eps, approx
        )
        bad |= _above_rsqrt_range(vv + eps)
        d1[c], m, vv, u, vc, dw, db = _online_bwd_step(
            np.float64(x1[c]), np.float64(g1[c]), m, vv, u, vc, w, dw, db, a, cb, eps, approx
        )
        m_[c], v_[c], u_[c], vc_[c], dw_[c], db_[c] = m, vv, u, vc, dw, db
    return bad


@njit(**_JIT)
def _online_bwd_block(dout, x, dx, m_, v_, u_, vc_, w_, dw_, db_, c0, a, cb, eps, approx):
    """Train-mode backward over all samples of the channels ``c0 + [0, len(m_))``,
    advancing the block's state and sums in place; returns as :func:`_online_fwd_rows4`."""
    N = x.shape[0]
    c1 = c0 + m_.shape[0]
    _wide_vectors()
    bad = False
    n = 0
    while n + 2 <= N and c1 - c0 >= _ONLINE_WIDE:
        bad |= _online_bwd_rows2(
            x[n, c0:c1], x[n + 1, c0:c1], dout[n, c0:c1], dout[n + 1, c0:c1], dx[n, c0:c1], dx[n + 1, c0:c1],
            m_, v_, u_, vc_, w_, dw_, db_, a, cb, eps, approx,
        )
        n += 2
    for n1 in range(n, N):
        xr = x[n1, c0:c1]
        gr = dout[n1, c0:c1]
        dr = dx[n1, c0:c1]
        for c in range(c1 - c0):
            m, vv, uc, vc, sw, sb = m_[c], v_[c], u_[c], vc_[c], dw_[c], db_[c]
            bad |= _above_rsqrt_range(vv + eps)
            d, m, vv, uc, vc, sw, sb = _online_bwd_step(
                np.float64(xr[c]), np.float64(gr[c]), m, vv, uc, vc, w_[c], sw, sb, a, cb, eps, approx
            )
            dr[c] = d
            m_[c], v_[c], u_[c], vc_[c], dw_[c], db_[c] = m, vv, uc, vc, sw, sb
    return bad


@njit(parallel=True, **_JIT)
def online_bwd_cols(dout, x, mu, var, u, v, alpha_f, alpha_b, eps, weight, update, dx, nthreads, approx):
    """:func:`online_bwd` for (N, C) input (L = 1), vectorized over channels, a
    thread carrying its block of channels' state in arrays of its own, two samples per sweep of
    a wide block.  ``approx`` and the exact recomputation as in :func:`online_fwd_cols`."""
    N, C = x.shape
    cb = 1.0 - alpha_b
    dw = np.zeros(C)
    db = np.zeros(C)
    nb = _col_blocks(C, nthreads, x.itemsize)
    counter = np.zeros(1, np.int64)
    for _t in prange(nthreads):
        t = _claim(counter)
        while t < nb:
            c0, c1 = _span(t, C, nb)
            m_ = _lined(mu[c0:c1])
            v_ = _lined(var[c0:c1])
            u_ = _lined(u[c0:c1])
            vc_ = _lined(v[c0:c1])
            w_ = _lined(weight[c0:c1])
            dw_ = _lined(dw[c0:c1])
            db_ = _lined(db[c0:c1])
            if update:
                ap = approx and _rsqrt_start_ok(v_, eps)
                if _online_bwd_block(dout, x, dx, m_, v_, u_, vc_, w_, dw_, db_, c0, alpha_f, cb, eps, ap) and ap:
                    m_[:] = mu[c0:c1]
                    v_[:] = var[c0:c1]
                    u_[:] = u[c0:c1]
                    vc_[:] = v[c0:c1]
                    dw_[:] = 0.0
                    db_[:] = 0.0
                    _online_bwd_block(dout, x, dx, m_, v_, u_, vc_, w_, dw_, db_, c0, alpha_f, cb, eps, False)
            else:
                for n in range(N):
                    xr = x[n, c0:c1]
                    gr = dout[n, c0:c1]
                    dr = dx[n, c0:c1]
                    for c in range(c1 - c0):
                        inv = 1.0 / np.sqrt(v_[c] + eps)
                        y = (xr[c] - m_[c]) * inv
                        go = np.float64(gr[c])
                        dw_[c] += go * y
                        db_[c] += go
                        dr[c] = go * w_[c] * inv
            dw[c0:c1] = dw_
            db[c0:c1] = db_
            if update:
                mu[c0:c1] = m_
                var[c0:c1] = v_
                u[c0:c1] = u_
                v[c0:c1] = vc_
            t = _claim(counter)
    return dw, db
