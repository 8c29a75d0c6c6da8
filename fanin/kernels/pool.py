"""Pooling kernels: parallel over (batch, channel) planes, so every thread owns its outputs.

Pure functions on float arrays (B, C, H, W); the NumPy twins are in tests/test_pool.py.
"""
import numba as nb
import numpy as np
from numba import prange

from fanin.kernels._jit import twins


def _max_pool_forward(x, kh, kw, sh, sw, ph, pw, ho, wo):
    """Window maxima (B, C, Ho, Wo) and the flat input position of each (the first maximum wins)."""
    b, c, h, w = x.shape
    out = np.empty((b, c, ho, wo), dtype=x.dtype)
    arg = np.empty((b, c, ho, wo), dtype=np.int32)
    for p in prange(b * c):
        n, ch = p // c, p % c
        for i in range(ho):
            for j in range(wo):
                best = -np.inf
                where = -1
                for di in range(kh):
                    r = i * sh - ph + di
                    if r < 0 or r >= h:
                        continue
                    for dj in range(kw):
                        q = j * sw - pw + dj
                        if q < 0 or q >= w:
                            continue
                        v = x[n, ch, r, q]
                        if v > best or where < 0:
                            best = v
                            where = r * w + q
                out[n, ch, i, j] = best
                arg[n, ch, i, j] = where
    return out, arg


# max_pool_forward_serial: the same body without a parallel region (the runtime's small batches, forked children)
max_pool_forward, max_pool_forward_serial = twins(_max_pool_forward, dict(cache=True))


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
