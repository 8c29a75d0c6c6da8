"""Pooling kernels: parallel over (batch, channel) planes, so every thread owns its outputs.

Pure functions on float arrays (B, C, H, W); the NumPy twins are in tests/test_pool.py.
"""
import numba as nb
import numpy as np
from numba import prange

from fanin.kernels._jit import twins


def _max_pool_forward(x, kh, kw, sh, sw, ph, pw, ho, wo):
    """Window maxima (B, C, Ho, Wo) and the flat input position of each (the first maximum wins; a NaN in a
    window's first tap stays, a later one is passed over). Each window's rows and columns are clipped to the
    plane once (no branch per tap); 2x2 windows of stride 2 without padding have straight-line code."""
    b, c, h, w = x.shape
    out = np.empty((b, c, ho, wo), dtype=x.dtype)
    arg = np.empty((b, c, ho, wo), dtype=np.int32)
    xf = x.reshape(b * c, h * w)
    of = out.reshape(b * c, ho * wo)
    af = arg.reshape(b * c, ho * wo)
    two = kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    for p in prange(b * c):
        src = xf[p]
        if two:
            for i in range(ho):
                top = 2 * i * w
                for j in range(wo):
                    where = top + 2 * j
                    best = src[where]
                    for t in (top + 2 * j + 1, top + w + 2 * j, top + w + 2 * j + 1):
                        if src[t] > best:
                            best = src[t]
                            where = t
                    of[p, i * wo + j] = best
                    af[p, i * wo + j] = where
            continue
        for i in range(ho):
            r0 = max(0, i * sh - ph)
            r1 = min(h, i * sh - ph + kh)
            for j in range(wo):
                q0 = max(0, j * sw - pw)
                q1 = min(w, j * sw - pw + kw)
                where = r0 * w + q0
                best = src[where]
                for r in range(r0, r1):
                    for q in range(q0, q1):
                        v = src[r * w + q]
                        if v > best:
                            best = v
                            where = r * w + q
                of[p, i * wo + j] = best
                af[p, i * wo + j] = where
    return out, arg


# max_pool_forward_serial: the same body without a parallel region (the runtime's small batches, forked children)
max_pool_forward, max_pool_forward_serial = twins(_max_pool_forward, dict(cache=True))


def _max_pool_values(x, kh, kw, sh, sw, ph, pw, ho, wo):
    """Window maxima (B, C, Ho, Wo) alone, for inference: the values of ``_max_pool_forward`` (same comparisons
    in the same order, so the same result bit for bit, NaN included), without the argmax and without a branch
    per tap -- each window's rows and columns are clipped to the plane once. The common 2x2, stride 2, no
    padding case has straight-line code. Measured on the 2-core reference machine, serial, batch 256 of the
    CNN's 32x28x28 -> 32x14x14 pooling: 19.4 ms with the training kernel, see bench/RESULTS.md for this one."""
    b, c, h, w = x.shape
    out = np.empty((b, c, ho, wo), dtype=x.dtype)
    xf = x.reshape(b * c, h * w)
    of = out.reshape(b * c, ho * wo)
    two = kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    for p in prange(b * c):
        src = xf[p]
        dst = of[p]
        if two:
            for i in range(ho):
                top = 2 * i * w
                bot = top + w
                for j in range(wo):
                    best = src[top + 2 * j]
                    v = src[top + 2 * j + 1]
                    if v > best:
                        best = v
                    v = src[bot + 2 * j]
                    if v > best:
                        best = v
                    v = src[bot + 2 * j + 1]
                    if v > best:
                        best = v
                    dst[i * wo + j] = best
            continue
        for i in range(ho):
            r0 = max(0, i * sh - ph)
            r1 = min(h, i * sh - ph + kh)
            for j in range(wo):
                q0 = max(0, j * sw - pw)
                q1 = min(w, j * sw - pw + kw)
                best = src[r0 * w + q0]
                for r in range(r0, r1):
                    for q in range(q0, q1):
                        v = src[r * w + q]
                        if v > best:
                            best = v
                dst[i * wo + j] = best
    return out


# max_pool_values_serial: the same body without a parallel region (the runtime's small batches, forked children)
max_pool_values, max_pool_values_serial = twins(_max_pool_values, dict(cache=True, nogil=True))


@nb.njit(parallel=True, cache=True)
def max_pool_backward(g, arg, h, w):
    """Route each output gradient to its window's maximum (adds where windows overlap)."""
    b, c, ho, wo = g.shape
    dx = np.zeros((b, c, h * w), dtype=g.dtype)
    for p in prange(b * c):
        n, ch = p // c, p % c
        for i in range(ho):
            for j in range(wo):
                dx[n, ch, arg[n, ch, i, j]] += g[n, ch, i, j]
    return dx.reshape(b, c, h, w)
