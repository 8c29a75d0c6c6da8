"""Self-compression's quantizer (SPEC.md §3) as two fused passes: forward and straight-through backward.

Per output channel ``i`` (a row of ``w2d``), with ``s_i = 2**e_i`` and ``t_i = 2**-e_i``:

    lo = -2**(b-1),  hi = 2**(b-1) - 1,  y = t * w,  q = s * rint(clamp(y, lo, hi))   (b > 0)
    q = 0                                                                             (b <= 0)

``rint`` rounds half to even (as NumPy and PyTorch's ``round``). Gradients, with the straight-through
estimator (the derivative of ``rint`` taken as 1; ``fanin.compress`` derives them):

    inside  (lo <= y <= hi):  dq/dw = 1,  dq/db = 0,                       dq/de = ln2 * (q - w)
    above   (y > hi):         dq/dw = 0,  dq/db = +ln2 * s * 2**(b-1),     dq/de = ln2 * q
    below   (y < lo):         dq/dw = 0,  dq/db = -ln2 * s * 2**(b-1),     dq/de = ln2 * q
    b <= 0:                   all zero

The scales ``s`` and ``t`` are computed once per channel by the caller (``scales``) so that the
deployed network can reproduce ``q = s * r`` bit for bit from the stored integers ``r``. Pure
functions on arrays; float32 or float64 throughout (``w``, ``s``, ``t``, ``b`` of one dtype).
"""
import math

import numba as nb
import numpy as np
from numba import prange

from fanin.kernels._jit import pjit

LN2 = math.log(2.0)
# Reassociation only (so the per-row sums vectorise): every q is one rint, one clamp and one product,
# which no flag changes; no 'nnan'/'ninf' (a NaN weight must stay NaN, not be assumed away).
_JIT = dict(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "nsz"})


def scales(e: np.ndarray, dtype):
    """(s, t) = (2**e, 2**-e) per channel, rounded once to ``dtype`` (the values export stores)."""
    e64 = np.asarray(e, np.float64)
    return np.exp2(e64).astype(dtype), np.exp2(-e64).astype(dtype)


def bounds(b: np.ndarray, dtype):
    """(lo, hi) = (-2**(b-1), 2**(b-1) - 1) per channel, in ``dtype``."""
    half = np.exp2(np.asarray(b, np.float64) - 1.0)
    return (-half).astype(dtype), (half - 1.0).astype(dtype)


@pjit(**_JIT)
def quantize_rows(w, b, s, t, lo, hi, out):
    """out[i, :] = q(w[i, :]; b[i], e[i]) for a 2-D ``w`` (one channel per row)."""
    for i in prange(w.shape[0]):
        if b[i] <= 0:
            for j in range(w.shape[1]):
                out[i, j] = 0
            continue
        si, ti, l, h = s[i], t[i], lo[i], hi[i]
        for j in range(w.shape[1]):
            out[i, j] = si * np.rint(min(max(w[i, j] * ti, l), h))


@pjit(**_JIT)
def quantize_rows_backward(g, w, b, s, t, lo, hi, dw, db, de):
    """The straight-through gradients of ``quantize_rows`` for the output gradient ``g``: ``dw`` (like w),
    ``db`` and ``de`` (one per row), in one pass. ``dw`` may be ``g`` itself (written in place), but then the
    loop runs scalar (LLVM's runtime overlap check fails: ~7x slower, measured); give it a buffer of its own."""
    ln2 = LN2
    for i in prange(w.shape[0]):
        if b[i] <= 0:
            for j in range(w.shape[1]):
                dw[i, j] = 0
            db[i] = 0
            de[i] = 0
            continue
        si, ti, l, h = s[i], t[i], lo[i], hi[i]
        zero = w.dtype.type(0)
        one = w.dtype.type(1)
        acc_b = zero
        acc_e = zero
        for j in range(w.shape[1]):  # branch-free (selects), so it vectorises
            gj = g[i, j]
            wj = w[i, j]
            y = wj * ti
            above = y > h
            below = y < l
            q = si * np.rint(min(max(y, l), h))
            inside = not (above or below)
            acc_b += gj * ((one if above else zero) - (one if below else zero))
            acc_e += gj * (q - (wj if inside else zero))
            dw[i, j] = gj if inside else zero
        db[i] = ln2 * si * (h + 1.0) * acc_b  # d hi/db = -d lo/db = ln2 * 2**(b-1); times s
        de[i] = ln2 * acc_e
