"""Fused optimizer updates: one parallel pass over a parameter instead of several NumPy temporaries.

Pure functions on flat float arrays (in-place on ``p`` and the state arrays), twins of the
NumPy formulas in ``fanin.optim`` (tests compare the two).
"""
import numba as nb
from numba import prange

from fanin.kernels._jit import pjit


@pjit(cache=True, fastmath=True)
def sgd_update(p, g, buf, lr, momentum, weight_decay, nesterov):
    """SGD with momentum (buf), weight decay and optional Nesterov, in place."""
    for i in prange(p.size):
        gi = g[i] + weight_decay * p[i]
        if momentum != 0.0:
            b = momentum * buf[i] + gi
            buf[i] = b
            gi = gi + momentum * b if nesterov else b
        p[i] -= lr * gi


@pjit(cache=True, fastmath=True)
def adam_update(p, g, m, v, step_size, beta1, beta2, eps, l2, decay):
    """Adam moments and update in place; ``l2`` couples weight decay to the gradient, ``decay``
    multiplies the weights first (AdamW)."""
    for i in prange(p.size):
        gi = g[i] + l2 * p[i]
        mi = beta1 * m[i] + (1.0 - beta1) * gi
        vi = beta2 * v[i] + (1.0 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (v[i] ** 0.5 + eps)
