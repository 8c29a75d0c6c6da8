"""Pooling kernels: parallel over (batch, channel) planes, so every thread owns its outputs.

Pure functions on float arrays (B, C, H, W); the NumPy twins are in tests/test_pool.py.
"""
import numba as nb
import numpy as np
from numba import prange

from fanin.kernels._jit import clone, pjit, twins


_ARG = True  # a constant of the compiled body: False in the inference copy (see max_pool_values)


def _max_pool_forward(x, kh, kw, sh, sw, ph, pw, ho, wo):
    """Window maxima (B, C, Ho, Wo) and the flat input position of each (the first maximum wins; a NaN in a
    window's first tap stays, a later one is passed over). Each window's rows and columns are clipped to the
    plane once (no branch per tap); 2x2 windows of stride 2 without padding have straight-line code.

    Compiled again with ``_ARG = False`` as ``max_pool_values``: the maxima alone, for inference and no-grad
    evaluation -- the same comparisons in the same order (the same bits), with the argmax's stores pruned and
    its tracking left dead. Measured on the 2-core reference machine, serial, batch 256 of the CNN's
    32x28x28 -> 32x14x14 pooling: 19.4 ms with the earlier kernel (a bounds test per tap), bench/RESULTS.md
    for these."""
    b, c, h, w = x.shape
    out = np.empty((b, c, ho, wo), dtype=x.dtype)
    arg = np.empty((b, c, ho, wo) if _ARG else (0, 0, 0, 0), dtype=np.int32)
    xf = x.reshape(b * c, h * w)
    of = out.reshape(b * c, ho * wo)
    af = arg.reshape(arg.shape[0] * arg.shape[1], arg.shape[2] * arg.shape[3])
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
                    if _ARG:
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
                if _ARG:
                    af[p, i * wo + j] = where
    if _ARG:
        return out, arg
    return out


# max_pool_forward_serial: the same body without a parallel region (the runtime's small batches, forked children)
max_pool_forward, max_pool_forward_serial = twins(_max_pool_forward, dict(cache=True))
# the maxima alone (inference): the same body with _ARG False, parallel and serial
max_pool_values, max_pool_values_serial = twins(clone(_max_pool_forward, "_values", {"_ARG": False}),
                                                dict(cache=True, nogil=True), swap={"_ARG": False})


@pjit(cache=True)
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
