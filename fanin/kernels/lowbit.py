"""Fixed-point weights for inference: int8 and 4-bit (two per byte) values with a per-neuron float32 scale.

The deployed weight of slot ``t`` of neuron ``j`` is exactly the float32 product ``scale[j] * q[j, t]`` (the
plan's contract, SPEC.md §3: what training used). Every kernel forms that product per weight -- in a vector
register at batch 1 (``fanin.kernels.infer``), into a small float buffer per block of rows for the batched
panels -- and never accumulates ``q * x`` to scale once (bitwise equal only for power-of-two scales).

Layout of a packed 4-bit row (built once by the runtime from the plan's int8 array): the row's ``kp`` slots
(``k`` rounded up to a multiple of 8, the extra slots 0) in ``kp // 2`` bytes, slot ``2m`` in the low nibble
of byte ``m`` and slot ``2m + 1`` in its high nibble, each a two's-complement 4-bit integer in [-8, 7].
"""
from __future__ import annotations

import numpy as np
from fanin.kernels._jit import njit

from fanin.kernels._intrinsics import load_unchecked as _at

__all__ = ["pack_nibbles", "unpack_nibbles", "dequantize_rows_int8", "dequantize_rows_int4"]

_JIT = dict(cache=True, nogil=True)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, kp) int8 values in [-8, 7], kp even -> (n, kp // 2) uint8, two per byte (low nibble first)."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_nibbles: expected a 2-D array with an even number of columns, got {q.shape}.")
    if q.size and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_nibbles: values must lie in [-8, 7].")
    u = (q.astype(np.int16) & 15).astype(np.uint8)
    return np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_nibbles(p: np.ndarray, k: int | None = None) -> np.ndarray:
    """The inverse of ``pack_nibbles``: (n, 2 * bytes) int8 (the first ``k`` columns if given)."""
    p = np.asarray(p, np.uint8)
    lo = (p & 15).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    out = np.empty((p.shape[0], 2 * p.shape[1]), np.int8)
    out[:, 0::2] = np.where(lo > 7, lo - 16, lo)
    out[:, 1::2] = np.where(hi > 7, hi - 16, hi)
    return out if k is None else out[:, :k]


@njit(**_JIT)
def dequantize_rows_int8(q, qoff, scale, soff, j0, j1, kp, out):
    """out[(j - j0) * kp + t] = scale[soff + j] * q[qoff + j * kp + t] (float32, exact) for rows j0 <= j < j1
    and t < kp (a straight loop LLVM vectorizes: widen, convert, multiply)."""
    for j in range(j0, j1):
        s = _at(scale, soff + j)
        o = (j - j0) * kp
        r = qoff + j * kp
        for t in range(kp):
            out[np.uint64(o + t)] = s * np.float32(_at(q, r + t))


@njit(**_JIT)
def dequantize_rows_int4(q4, qoff, scale, soff, j0, j1, kp, out):
    """The same for packed nibbles: row j's kp slots in kp // 2 bytes from byte qoff + j * (kp // 2)."""
    half = kp >> 1
    for j in range(j0, j1):
        s = _at(scale, soff + j)
        o = (j - j0) * kp
        r = qoff + j * half
        for m in range(half):
            b = np.int32(_at(q4, r + m))
            lo = ((b & 15) ^ 8) - 8
            hi = ((b >> 4) ^ 8) - 8
            out[np.uint64(o + 2 * m)] = s * np.float32(lo)
            out[np.uint64(o + 2 * m + 1)] = s * np.float32(hi)
