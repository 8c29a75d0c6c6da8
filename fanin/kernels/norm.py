"""Batch-norm kernels: per-channel statistics and the normalisation in two passes, the gradient in two (pure
functions on (B, C, S) arrays: S = H * W for a 2-D batch norm, 1 for a 1-D one).

NumPy's batch norm made about twenty passes over a CNN activation (mean, var, the centred copy, xhat, the affine,
and in backward five products and three reductions), each with a temporary the size of the activation. In a
compressing CNN step on the Intel Xeon (batch 128, 1 thread) that was 17 of 40 s of an epoch (cProfile). Here:

- ``bn_forward``: per channel, the mean, then the variance as the mean of squared deviations (the order NumPy's
  ``var`` uses; sums in float64), then ``out = xhat * gamma + beta`` with ``xhat = (x - mean) * inv``,
  ``inv = 1 / sqrt(var + eps)`` rounded to x's dtype, as the NumPy form computed it;
- ``bn_backward``: per channel ``sum(g)`` and ``sum(g * xhat)`` (xhat recomputed from x, not stored), then in
  training ``dx = gamma inv (g - mean(g) - xhat mean(g xhat))`` (the NumPy form's
  ``inv / n (n g gamma - sum(g gamma) - xhat sum(g gamma xhat))`` with gamma taken out of the sums), in
  evaluation ``dx = g gamma inv``; ``dgamma = sum(g xhat)``, ``dbeta = sum(g)``.

Parallel over channels (each thread owns its channels: no races, and every sum is added in one fixed order, so
results do not depend on the thread count); serial twins below ``PARALLEL_MIN`` elements (waking threads costs
more than a small pass gains, as for the activations). The reductions allow reassociation (``fastmath`` reassoc:
LLVM may then keep partial sums in vector lanes); the order is still fixed for a given machine and build.
The NumPy twins are in tests/test_norm.py.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from fanin.kernels._jit import gated, twins

PARALLEL_MIN = 1 << 21  # elements (the same line as the elementwise activations)
_OPTS = dict(cache=True, nogil=True, fastmath={"reassoc"})


def _bn_stats(x, mean, var):
    """mean[c], var[c] (population variance) of x[:, c, :], float64."""
    B, C, S = x.shape
    n = B * S
    for c in prange(C):
        s = 0.0
        for b in range(B):
            for i in range(S):
                s += x[b, c, i]
        m = s / n
        q = 0.0
        for b in range(B):
            for i in range(S):
                d = x[b, c, i] - m
                q += d * d
        mean[c] = m
        var[c] = q / n


def _bn_apply(x, mean, inv, gamma, beta, out):
    """out = ((x - mean) * inv) * gamma + beta per channel, in x's dtype (mean rounded to it first)."""
    B, C, S = x.shape
    for c in prange(C):
        m, k, g, t = x.dtype.type(mean[c]), inv[c], gamma[c], beta[c]
        for b in range(B):
            for i in range(S):
                out[b, c, i] = ((x[b, c, i] - m) * k) * g + t


def _bn_grad_sums(x, mean, inv, g, sg, sgx):
    """sg[c] = sum g, sgx[c] = sum g * xhat (xhat = (x - mean) * inv in x's dtype), float64."""
    B, C, S = x.shape
    for c in prange(C):
        m, k = x.dtype.type(mean[c]), inv[c]
        s = 0.0
        t = 0.0
        for b in range(B):
            for i in range(S):
                gv = g[b, c, i]
                s += gv
                t += gv * ((x[b, c, i] - m) * k)
        sg[c] = s
        sgx[c] = t


def _bn_grad_input(x, mean, inv, gamma, g, sg, sgx, training, dx):
    """dx per channel: gamma inv (g - sg / n - xhat sgx / n) in training, gamma inv g in evaluation."""
    B, C, S = x.shape
    n = B * S
    for c in prange(C):
        m, k = x.dtype.type(mean[c]), inv[c]
        a = gamma[c] * k
        if training:
            mg = x.dtype.type(sg[c] / n)
            mgx = x.dtype.type(sgx[c] / n)
            for b in range(B):
                for i in range(S):
                    xh = (x[b, c, i] - m) * k
                    dx[b, c, i] = a * (g[b, c, i] - mg - xh * mgx)
        else:
            for b in range(B):
                for i in range(S):
                    dx[b, c, i] = a * g[b, c, i]


# Features in the last axis (a 1-D batch norm: x (B, C)): the per-channel loops above would stride over rows, so
# these walk the rows with the channels innermost, in blocks of CB channels a thread (sums per block in float64).
CB = 256


def _bn_stats_rows(x, mean, var):
    B, C = x.shape
    for blk in prange((C + CB - 1) // CB):
        c0 = blk * CB
        c1 = min(C, c0 + CB)
        s = np.zeros(c1 - c0)
        for b in range(B):
            for c in range(c0, c1):
                s[c - c0] += x[b, c]
        for c in range(c0, c1):
            mean[c] = s[c - c0] / B
        s[:] = 0
        for b in range(B):
            for c in range(c0, c1):
                d = x[b, c] - mean[c]
                s[c - c0] += d * d
        for c in range(c0, c1):
            var[c] = s[c - c0] / B


def _bn_apply_rows(x, mean, inv, gamma, beta, out):
    B, C = x.shape
    m = mean.astype(x.dtype)
    for blk in prange((C + CB - 1) // CB):
        c0 = blk * CB
        c1 = min(C, c0 + CB)
        for b in range(B):
            for c in range(c0, c1):
                out[b, c] = ((x[b, c] - m[c]) * inv[c]) * gamma[c] + beta[c]


def _bn_grad_sums_rows(x, mean, inv, g, sg, sgx):
    B, C = x.shape
    m = mean.astype(x.dtype)
    for blk in prange((C + CB - 1) // CB):
        c0 = blk * CB
        c1 = min(C, c0 + CB)
        s = np.zeros(c1 - c0)
        t = np.zeros(c1 - c0)
        for b in range(B):
            for c in range(c0, c1):
                gv = g[b, c]
                s[c - c0] += gv
                t[c - c0] += gv * ((x[b, c] - m[c]) * inv[c])
        for c in range(c0, c1):
            sg[c] = s[c - c0]
            sgx[c] = t[c - c0]


def _bn_grad_input_rows(x, mean, inv, gamma, g, sg, sgx, training, dx):
    B, C = x.shape
    m = mean.astype(x.dtype)
    a = gamma * inv
    mg = (sg / B).astype(x.dtype)
    mgx = (sgx / B).astype(x.dtype)
    for blk in prange((C + CB - 1) // CB):
        c0 = blk * CB
        c1 = min(C, c0 + CB)
        for b in range(B):
            if training:
                for c in range(c0, c1):
                    dx[b, c] = a[c] * (g[b, c] - mg[c] - ((x[b, c] - m[c]) * inv[c]) * mgx[c])
            else:
                for c in range(c0, c1):
                    dx[b, c] = a[c] * g[b, c]


_stats = twins(_bn_stats, _OPTS)
_apply = twins(_bn_apply, _OPTS)
_sums = twins(_bn_grad_sums, _OPTS)
_grad_input = twins(_bn_grad_input, _OPTS)
_stats_rows = twins(_bn_stats_rows, _OPTS)
_apply_rows = twins(_bn_apply_rows, _OPTS)
_sums_rows = twins(_bn_grad_sums_rows, _OPTS)
_grad_input_rows = twins(_bn_grad_input_rows, _OPTS)


def _pick(pair, rows_pair, x3):
    """The parallel (through the gate, ``gated``) or serial twin by size; the rows form for (B, C, 1), called
    with (B, C) views."""
    par = x3.size >= PARALLEL_MIN
    if x3.shape[2] == 1:
        pr, sr = rows_pair
        return lambda *a: _run(par, pr, sr, *(v[:, :, 0] if isinstance(v, np.ndarray) and v.ndim == 3 else v
                                              for v in a))
    return lambda *a: _run(par, pair[0], pair[1], *a)


def _run(par, p, s, *args):
    return gated(p, s, *args) if par else s(*args)


def _as3(a: np.ndarray) -> np.ndarray:
    """(B, C, ...) -> a C-contiguous (B, C, S) view (a copy only if a is not C-contiguous)."""
    a = np.ascontiguousarray(a)
    return a.reshape(a.shape[0], a.shape[1], int(np.prod(a.shape[2:], dtype=np.int64)))  # (-1 fails at batch 0)


def batch_stats(x: np.ndarray):
    """Per channel (axis 1) mean and population variance of x (B, C, ...) over every other axis: float64 (C,)."""
    x3 = _as3(x)
    mean, var = np.empty(x3.shape[1]), np.empty(x3.shape[1])
    _pick(_stats, _stats_rows, x3)(x3, mean, var)
    return mean, var


def bn_forward(x: np.ndarray, mean: np.ndarray, inv: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """((x - mean) * inv) * gamma + beta per channel (axis 1) of x (B, C, ...), in x's dtype; ``mean`` float64,
    ``inv``, ``gamma``, ``beta`` (C,) arrays cast to x's dtype."""
    x3 = _as3(x)
    dt = x3.dtype
    out = np.empty_like(x3)
    _pick(_apply, _apply_rows, x3)(x3, np.asarray(mean, np.float64), np.asarray(inv, dt), np.asarray(gamma, dt),
                                   np.asarray(beta, dt), out)
    return out.reshape(x.shape)


def bn_backward(x: np.ndarray, mean: np.ndarray, inv: np.ndarray, gamma: np.ndarray, g: np.ndarray,
                training: bool):
    """(dx, dgamma, dbeta) of ``bn_forward``'s output with gradient g, the statistics being the batch's own
    (training: their gradients included) or constants (evaluation). dgamma and dbeta in x's dtype."""
    x3 = _as3(x)
    dt = x3.dtype
    g3 = _as3(np.asarray(g, dt))
    C = x3.shape[1]
    mean, inv, gamma = np.asarray(mean, np.float64), np.asarray(inv, dt), np.asarray(gamma, dt)
    sg, sgx = np.empty(C), np.empty(C)
    _pick(_sums, _sums_rows, x3)(x3, mean, inv, g3, sg, sgx)
    dx = np.empty_like(x3)
    _pick(_grad_input, _grad_input_rows, x3)(x3, mean, inv, gamma, g3, sg, sgx, bool(training), dx)
    return dx.reshape(x.shape), sgx.astype(dt), sg.astype(dt)
