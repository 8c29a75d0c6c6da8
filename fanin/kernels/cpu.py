"""CPU kernels (Numba) for condensed constant fan-in layers, growth scores and im2col.

Everything here is pure: arrays in, arrays out, no validation (``fanin.kernels`` validates once).
The ``@njit`` kernels are private (``_k_*``); the public functions of this module are the
*drivers* the dispatcher calls: they choose a path by batch size, prepare layouts and allocate
outputs. A ``cuda.py`` backend provides the same driver names.

Layouts (SPEC.md §1): ``indices (n_out, k)`` int16/int32, ``values (n_out, k)``, ``x (B, n_in)``.

- batch < ``SMALL_BATCH``: each neuron is a gathered dot product of its ``k`` inputs
  (parallel over neurons). Reads indices+values once: bandwidth-bound, the batch-1 path.
- batch >= ``SMALL_BATCH``: x is packed batch-innermost in panels of ``TB`` = 32 samples,
  ``xp (n_panels, n_in, TB)``. For one neuron and one panel the inner step is
  ``acc[0:32] += v * xp[p, idx, 0:32]``: two AVX-512 FMAs on one contiguous 128-byte row;
  the 32 accumulators (four independent chains) stay in registers for the whole row of
  ``k``. A panel of a 4096-input layer is 512 KiB, so it stays in L2 while every neuron
  streams through it; packing per panel (rather than one ``(n_in, B)`` transpose) keeps
  the touched pages few (TLB) and the rows contiguous.
- dx is a scatter; there are no atomics: with a batch, each thread owns a range of batch
  columns of ``dx^T (n_in, B)``; at small batch each thread scatters its neurons into a
  private buffer and the buffers are summed afterwards.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = dict(parallel=True, cache=True, fastmath=True, nogil=True)
_JIT_SERIAL = dict(cache=True, fastmath=True, nogil=True)

TB = 32  # samples per batch panel (two 512-bit vectors of float32)
SMALL_BATCH = 8  # below this batch size the forward uses gathered dots per neuron
JB = 32  # neurons per task in the panel kernels


@intrinsic
def _stack_buffer(typingctx, size, dtype):
    """A pointer to ``size`` elements on the stack (LLVM can keep them in registers)."""

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=args[0])

    return types.CPointer(dtype.dtype)(size, dtype), codegen


def n_threads() -> int:
    return numba.get_num_threads()


# ---------------------------------------------------------------- layouts
@njit(**_JIT)
def _k_pack(x, xp):
    """xp[p, i, s] = x[p*TB + s, i] (zero past the batch): batch-innermost panels."""
    B, n = x.shape
    n_panels = xp.shape[0]
    n_tiles = (n + 127) // 128
    for task in prange(n_panels * n_tiles):
        p = task // n_tiles
        i0 = (task % n_tiles) * 128
        i1 = min(n, i0 + 128)
        for s in range(TB):
            b = p * TB + s
            if b < B:
                for i in range(i0, i1):
                    xp[p, i, s] = x[b, i]
            else:
                for i in range(i0, i1):
                    xp[p, i, s] = 0


@njit(**_JIT)
def _k_transpose(x, xt):
    """xt = x.T for a 2-D array, in cache tiles."""
    n0, n1 = x.shape
    t0 = (n0 + 63) // 64
    t1 = (n1 + 63) // 64
    for task in prange(t0 * t1):
        a0 = (task // t1) * 64
        a1 = (task % t1) * 64
        for i in range(a1, min(n1, a1 + 64)):
            for j in range(a0, min(n0, a0 + 64)):
                xt[i, j] = x[j, i]


# ---------------------------------------------------------------- forward
@njit(**_JIT_SERIAL)
def _forward_row(x, indices, values, scale, bias, out, j):
    """out[:, j] = bias[j] + scale[j] * sum_t values[j, t] * x[:, indices[j, t]] (gathered dots)."""
    ir = indices[j]
    vr = values[j]
    zero = out.dtype.type(0)
    for b in range(x.shape[0]):
        xr = x[b]
        acc = zero
        for t in range(ir.shape[0]):
            acc += vr[t] * xr[np.uint32(ir[t])]
        out[b, j] = bias[j] + scale[j] * acc


@njit(**_JIT)
def _k_forward_rows(x, indices, values, scale, bias, out):
    """Small batch, parallel over neurons: each neuron a contiguous gathered dot of k inputs."""
    for j in prange(indices.shape[0]):
        _forward_row(x, indices, values, scale, bias, out, j)


@njit(**_JIT_SERIAL)
def _k_forward_rows_serial(x, indices, values, scale, bias, out):
    """_k_forward_rows on the calling thread (no thread wake-up)."""
    for j in range(indices.shape[0]):
        _forward_row(x, indices, values, scale, bias, out, j)


def _parallel_launch_is_slow() -> bool:
    """True when OpenMP threads sleep between kernels (OMP_WAIT_POLICY=PASSIVE, no GOMP_SPINCOUNT).

    Waking them costs ~60 us per parallel kernel on the reference VM, more than a small
    batch-1 layer takes on one core.
    """
    import os

    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ


SERIAL_MACS = 1 << 20  # below this many multiply-adds a batch-1 forward runs on one thread if waking is slow


@njit(**_JIT)
def _k_forward_panels(xp, indices, values, scale, bias, out):
    """Batched forward on packed panels xp (n_panels, n_in, TB); out is (B, n_out)."""
    B = out.shape[0]
    n_panels = xp.shape[0]
    n_out, k = indices.shape
    n_jb = (n_out + JB - 1) // JB
    k4 = k - k % 4
    for task in prange(n_panels * n_jb):
        p = task // n_jb
        j0 = (task % n_jb) * JB
        j1 = min(n_out, j0 + JB)
        xc = xp[p]
        a0 = numba.carray(_stack_buffer(TB, xp.dtype), (TB,))
        a1 = numba.carray(_stack_buffer(TB, xp.dtype), (TB,))
        a2 = numba.carray(_stack_buffer(TB, xp.dtype), (TB,))
        a3 = numba.carray(_stack_buffer(TB, xp.dtype), (TB,))
        tile = np.empty((JB, TB), out.dtype)
        for j in range(j0, j1):
            ir = indices[j]
            vr = values[j]
            for s in range(TB):
                a0[s] = 0
                a1[s] = 0
                a2[s] = 0
                a3[s] = 0
            for t in range(0, k4, 4):
                v0 = vr[t]
                v1 = vr[t + 1]
                v2 = vr[t + 2]
                v3 = vr[t + 3]
                r0 = xc[np.uint32(ir[t])]
                r1 = xc[np.uint32(ir[t + 1])]
                r2 = xc[np.uint32(ir[t + 2])]
                r3 = xc[np.uint32(ir[t + 3])]
                for s in range(TB):
                    a0[s] += v0 * r0[s]
                    a1[s] += v1 * r1[s]
                    a2[s] += v2 * r2[s]
                    a3[s] += v3 * r3[s]
            for t in range(k4, k):
                v0 = vr[t]
                r0 = xc[np.uint32(ir[t])]
                for s in range(TB):
                    a0[s] += v0 * r0[s]
            for s in range(TB):
                tile[j - j0, s] = bias[j] + scale[j] * ((a0[s] + a1[s]) + (a2[s] + a3[s]))
        # write the (neurons x samples) tile row by row: whole cache lines, no set thrashing
        for s in range(min(TB, B - p * TB)):
            b = p * TB + s
            for jj in range(j1 - j0):
                out[b, j0 + jj] = tile[jj, s]


# ---------------------------------------------------------------- backward
@njit(**_JIT)
def _k_dvalues(xt, dyt, indices, out):
    """out[j, t] = sum_b dyt[j, b] * xt[indices[j, t], b] (batch-innermost xt, dyt)."""
    n_out, k = indices.shape
    B = xt.shape[1]
    zero = out.dtype.type(0)
    for j in prange(n_out):
        d = dyt[j]
        ir = indices[j]
        for t in range(k):
            r = xt[np.uint32(ir[t])]
            acc = zero
            for b in range(B):
                acc += d[b] * r[b]
            out[j, t] = acc


@njit(**_JIT)
def _k_dvalues_rows(x, dy, indices, out):
    """Small batch: out[j, t] = sum_b dy[b, j] * x[b, indices[j, t]] (gathers per sample)."""
    n_out, k = indices.shape
    B = x.shape[0]
    for j in prange(n_out):
        ir = indices[j]
        o = out[j]
        for t in range(k):
            o[t] = 0
        for b in range(B):
            d = dy[b, j]
            xr = x[b]
            for t in range(k):
                o[t] += d * xr[np.uint32(ir[t])]


@njit(**_JIT)
def _k_dx_rows(dy, indices, values, parts):
    """Small batch scatter: parts[g, b, i] += values[j, t] * dy[b, j] over neuron group g."""
    G, B, n_in = parts.shape
    n_out, k = indices.shape
    per = (n_out + G - 1) // G
    for g in prange(G):
        part = parts[g]
        part[:, :] = 0
        for j in range(g * per, min(n_out, g * per + per)):
            ir = indices[j]
            vr = values[j]
            for b in range(B):
                d = dy[b, j]
                pr = part[b]
                for t in range(k):
                    pr[np.uint32(ir[t])] += vr[t] * d


@njit(**_JIT)
def _k_sum_parts(parts, out):
    """out = parts.sum(axis=0) for parts (G, B, n)."""
    G, B, n = parts.shape
    n_tiles = (n + 1023) // 1024
    for task in prange(B * n_tiles):
        b = task // n_tiles
        i0 = (task % n_tiles) * 1024
        for i in range(i0, min(n, i0 + 1024)):
            acc = parts[0, b, i]
            for g in range(1, G):
                acc += parts[g, b, i]
            out[b, i] = acc


@njit(**_JIT)
def _k_dx_cols(dyt, indices, values, dxt, n_tasks):
    """Batched scatter, batch-innermost: dxt[idx, cols] += values[j, t] * dyt[j, cols].

    Task q owns the batch columns [q*per, (q+1)*per) of dxt, so no two tasks write the same memory.
    """
    n_in, B = dxt.shape
    n_out, k = indices.shape
    per = (B + n_tasks - 1) // n_tasks
    for q in prange(n_tasks):
        c0 = min(B, q * per)
        c1 = min(B, c0 + per)
        dxt[:, c0:c1] = 0
        for j in range(n_out):
            ir = indices[j]
            vr = values[j]
            d = dyt[j, c0:c1]
            for t in range(k):
                v = vr[t]
                r = dxt[np.uint32(ir[t]), c0:c1]
                for s in range(c1 - c0):
                    r[s] += v * d[s]


# ---------------------------------------------------------------- growth scores
@njit(**_JIT)
def _k_topc_free(g, indices, c, cand_idx, cand_score):
    """Per row r of g: the c largest |g[r, i]| over i not in indices[r], descending.

    g is overwritten (scratch). Rows with fewer than c free inputs are padded with -1 / -inf.
    """
    rows, n_in = g.shape
    k = indices.shape[1]
    for r in prange(rows):
        gr = g[r]
        for i in range(n_in):
            gr[i] = abs(gr[i])
        for t in range(k):
            gr[np.uint32(indices[r, t])] = -1.0  # held: never a candidate (scores are >= 0)
        hs = cand_score[r]  # min-heap of the best scores so far
        hi = cand_idx[r]
        m = 0
        for i in range(n_in):
            s = gr[i]
            if s < 0:
                continue
            if m < c:  # push
                pos = m
                m += 1
                while pos > 0:
                    parent = (pos - 1) >> 1
                    if hs[parent] <= s:
                        break
                    hs[pos] = hs[parent]
                    hi[pos] = hi[parent]
                    pos = parent
                hs[pos] = s
                hi[pos] = i
            elif s > hs[0]:  # replace the smallest, sift down
                pos = 0
                while True:
                    child = 2 * pos + 1
                    if child >= m:
                        break
                    if child + 1 < m and hs[child + 1] < hs[child]:
                        child += 1
                    if hs[child] >= s:
                        break
                    hs[pos] = hs[child]
                    hi[pos] = hi[child]
                    pos = child
                hs[pos] = s
                hi[pos] = i
        # heap sort in place: repeatedly move the minimum to the end -> descending order
        end = m
        while end > 1:
            end -= 1
            ms, mi = hs[0], hi[0]
            s, ix = hs[end], hi[end]
            hs[end] = ms
            hi[end] = mi
            pos = 0
            while True:
                child = 2 * pos + 1
                if child >= end:
                    break
                if child + 1 < end and hs[child + 1] < hs[child]:
                    child += 1
                if hs[child] >= s:
                    break
                hs[pos] = hs[child]
                hi[pos] = hi[child]
                pos = child
            hs[pos] = s
            hi[pos] = ix
        for q in range(m, c):
            hs[q] = -np.inf
            hi[q] = -1


# ---------------------------------------------------------------- im2col / col2im
@njit(**_JIT)
def _k_im2col(x, kh, kw, sh, sw, ph, pw, ho, wo, cols):
    """cols[(b*ho + oy)*wo + ox, (c*kh + dy)*kw + dx] = x[b, c, oy*sh - ph + dy, ox*sw - pw + dx] (0 outside)."""
    B, C, H, W = x.shape
    for task in prange(B * ho):
        b = task // ho
        oy = task % ho
        for ox in range(wo):
            row = cols[task * wo + ox]
            q = 0
            for c in range(C):
                for dy in range(kh):
                    iy = oy * sh - ph + dy
                    for dx in range(kw):
                        ix = ox * sw - pw + dx
                        if 0 <= iy < H and 0 <= ix < W:
                            row[q] = x[b, c, iy, ix]
                        else:
                            row[q] = 0
                        q += 1


@njit(**_JIT)
def _k_col2im(cols, kh, kw, sh, sw, ph, pw, ho, wo, dx_out):
    """Adjoint of im2col: each task owns one (b, c) plane of dx_out, so overlaps never race."""
    B, C, H, W = dx_out.shape
    for task in prange(B * C):
        b = task // C
        c = task % C
        plane = dx_out[b, c]
        plane[:, :] = 0
        for oy in range(ho):
            for ox in range(wo):
                row = cols[(b * ho + oy) * wo + ox]
                q = c * kh * kw
                for dy in range(kh):
                    iy = oy * sh - ph + dy
                    for dx in range(kw):
                        ix = ox * sw - pw + dx
                        if 0 <= iy < H and 0 <= ix < W:
                            plane[iy, ix] += row[q]
                        q += 1


# ================================================================ drivers
def _panels(B: int) -> int:
    return (B + TB - 1) // TB


def pack_panels(x: np.ndarray) -> np.ndarray:
    """x (B, n) -> batch-innermost panels (ceil(B/TB), n, TB), zero-padded."""
    xp = np.empty((_panels(x.shape[0]), x.shape[1], TB), x.dtype)
    _k_pack(x, xp)
    return xp


def transpose(x: np.ndarray) -> np.ndarray:
    """A C-contiguous x.T."""
    xt = np.empty((x.shape[1], x.shape[0]), x.dtype)
    _k_transpose(x, xt)
    return xt


def _scale_bias(n_out, dtype, scale, bias):
    scale = np.ones(n_out, dtype) if scale is None else scale
    bias = np.zeros(n_out, dtype) if bias is None else bias
    return scale, bias


def fanin_forward(x, indices, values, bias=None, scale=None):
    """y (B, n_out) = bias + scale * sum_t values * x[:, indices]; path chosen by batch size."""
    B = x.shape[0]
    n_out = indices.shape[0]
    scale, bias = _scale_bias(n_out, x.dtype, scale, bias)
    out = np.empty((B, n_out), x.dtype)
    if B == 0:
        return out
    if B < SMALL_BATCH:
        small = B * indices.shape[0] * indices.shape[1] < SERIAL_MACS and _parallel_launch_is_slow()
        (_k_forward_rows_serial if small else _k_forward_rows)(x, indices, values, scale, bias, out)
    else:
        _k_forward_panels(pack_panels(x), indices, values, scale, bias, out)
    return out


def fixed_point_forward(x, indices, qvalues, scale, bias=None):
    """y = bias + scale[j] * sum_t q[j, t] * x[:, indices[j, t]] with integer q."""
    return fanin_forward(x, indices, qvalues, bias, scale)


def fanin_backward_values(x, indices, dy, xt=None, dyt=None):
    """dvalues[j, t] = sum_b dy[b, j] * x[b, indices[j, t]] (xt, dyt: transposes if already made)."""
    out = np.empty(indices.shape, x.dtype)
    if x.shape[0] < SMALL_BATCH:
        _k_dvalues_rows(x, dy, indices, out)
    else:
        _k_dvalues(transpose(x) if xt is None else xt, transpose(dy) if dyt is None else dyt, indices, out)
    return out


def fanin_backward_input(indices, values, dy, n_in, dyt=None):
    """dx (B, n_in) = dy @ W for the condensed W, as a race-free scatter."""
    B = dy.shape[0]
    out = np.empty((B, n_in), dy.dtype)
    if B == 0:
        return out
    nt = n_threads()
    if B < SMALL_BATCH:
        groups = max(1, min(nt, indices.shape[0]))
        parts = np.empty((groups, B, n_in), dy.dtype)
        _k_dx_rows(dy, indices, values, parts)
        if groups == 1:
            return parts[0]
        _k_sum_parts(parts, out)
        return out
    dxt = np.empty((n_in, B), dy.dtype)
    n_tasks = max(1, min(nt, B // 16))  # at least one 512-bit vector of samples per task
    _k_dx_cols(transpose(dy) if dyt is None else dyt, indices, values, dxt, n_tasks)
    _k_transpose(dxt, out)
    return out


def fanin_backward(x, indices, values, dy):
    """(dx, dvalues) of the condensed forward, sharing the batch-innermost transposes."""
    if x.shape[0] < SMALL_BATCH:
        return fanin_backward_input(indices, values, dy, x.shape[1]), fanin_backward_values(x, indices, dy)
    dyt = transpose(dy)
    return (fanin_backward_input(indices, values, dy, x.shape[1], dyt),
            fanin_backward_values(x, indices, dy, transpose(x), dyt))


def dense_grad(x, dy):
    """G = dy^T x, shape (n_out, n_in)."""
    return np.ascontiguousarray(dy.T @ x)


def growth_candidates(x, dy, indices, c, block=None):
    """Per neuron, the c largest |dy^T x| outside indices[j], descending; blockwise over neurons."""
    n_out = indices.shape[0]
    n_in = x.shape[1]
    cand_idx = np.empty((n_out, c), np.int32)
    cand_score = np.empty((n_out, c), x.dtype)
    if block is None:  # ~4 MiB of scores per block, at least 64 rows
        block = max(64, min(n_out, (1 << 20) // max(1, n_in)))
    dyt = np.ascontiguousarray(dy.T)
    for j0 in range(0, n_out, block):
        j1 = min(n_out, j0 + block)
        g = dyt[j0:j1] @ x  # BLAS, (block, n_in)
        _k_topc_free(g, indices[j0:j1], c, cand_idx[j0:j1], cand_score[j0:j1])
    return cand_idx, cand_score


def im2col(x, kh, kw, stride, padding, ho, wo):
    """Patches of x (B, C, H, W) as rows (B*ho*wo, C*kh*kw), columns ordered (c, dy, dx)."""
    B, C = x.shape[0], x.shape[1]
    cols = np.empty((B * ho * wo, C * kh * kw), x.dtype)
    _k_im2col(x, kh, kw, stride[0], stride[1], padding[0], padding[1], ho, wo, cols)
    return cols


def col2im(cols, x_shape, kh, kw, stride, padding, ho, wo):
    """Adjoint of im2col: sums every patch entry back into its pixel of an x_shape array."""
    out = np.empty(x_shape, cols.dtype)
    _k_col2im(cols, kh, kw, stride[0], stride[1], padding[0], padding[1], ho, wo, out)
    return out


def index_min_max(indices):
    """(min, max) of an index array."""
    return int(indices.min()), int(indices.max())


def rows_strictly_increasing(indices):
    """Index of the first row whose indices are not strictly increasing, or -1."""
    if indices.shape[1] < 2:
        return -1
    bad = np.flatnonzero((np.diff(indices, axis=1) <= 0).any(axis=1))
    return int(bad[0]) if bad.size else -1
