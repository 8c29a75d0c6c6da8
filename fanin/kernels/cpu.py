"""CPU kernels (Numba) for condensed constant fan-in layers, growth scores and im2col.

Everything here is pure: arrays in, arrays out, no validation (``fanin.kernels`` validates once).
The ``@njit`` kernels are private (``_k_*``); the public functions of this module are the
*drivers* the dispatcher calls: they choose a path by batch size, prepare layouts and allocate
outputs. A ``cuda.py`` backend provides the same driver names.

Layouts (SPEC.md §1): ``indices (n_out, k)`` int16/int32, ``values (n_out, k)``, ``x (B, n_in)``.

- batch < ``SMALL_BATCH``: each neuron is a gathered dot product of its ``k`` inputs
  (parallel over neurons). Reads indices+values once: bandwidth-bound, the batch-1 path.
- batch >= ``SMALL_BATCH``: x is packed in panels of ``TB`` = 32 samples, batch innermost. For one
  neuron and one panel the forward's inner step is ``acc[0:32] += v * x[32p:32p+32, idx]``: two
  AVX-512 FMAs on one contiguous 128-byte row; the 32 accumulators (four independent chains) stay
  in registers for the whole row of ``k``. Two layouts: *transposed*, ``xt (n_in, Bp)`` with the
  batch zero-padded (``pack_panels``; training shares it between the forward and the value
  gradient, where each ``dvalues[j, t]`` is one dot product ``dyt[j] . xt[idx]`` over the whole
  batch), and *blocked*, one contiguous ``(n_in, TB)`` block per panel (a forward or dx on its
  own: a task's reads stay in one block, 512 KiB for 4096 inputs, L2-resident; 10-25 % faster).
- dx is a scatter; there are no atomics: with a batch, each thread owns a range of batch
  columns of ``dx^T (n_in, B)``; at small batch each thread scatters its neurons into a
  private buffer and the buffers are summed afterwards.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from fanin.kernels import memory
from fanin.kernels._intrinsics import load_unchecked as _at
from fanin.kernels._intrinsics import stack_buffer
from fanin.kernels._jit import njit, pjit
from fanin.kernels.select import kth_smallest

_JIT = dict(parallel=True, cache=True, fastmath=True, nogil=True)
_JIT_SERIAL = dict(cache=True, fastmath=True, nogil=True)

TB = 32  # samples per batch panel (two 512-bit vectors of float32)
SMALL_BATCH = 8  # below this batch size the forward uses gathered dots per neuron
JB = 32  # neurons per task in the panel kernels


def n_threads() -> int:
    return numba.get_num_threads()


# ---------------------------------------------------------------- layouts
@pjit(**_JIT)
def _k_pack(x, xo, rs, ps):
    """xo[i*rs + p*ps + s] = x[p*TB + s, i], zero for samples past the batch (xo flat).

    Two layouts of batch-innermost panels of TB samples: *transposed* (rs = Bp, ps = TB: x^T with
    the batch padded, ``pack_panels``) and *blocked* (rs = TB, ps = n*TB: one contiguous
    (n, TB) block per panel). Per panel, 16 inputs at a time: read 16 contiguous floats of each
    of the TB rows and store them along the panel rows; the tile stays in L1. Flat unsigned
    offsets keep the stores free of wraparound checks (2-3x faster than 2-D indexing).
    """
    B, n = x.shape
    xf = x.reshape(-1)
    n_panels = (B + TB - 1) // TB
    for p in prange(n_panels):
        nb = min(TB, B - p * TB)
        for i0 in range(0, n, 16):
            w = min(16, n - i0)
            for s in range(TB):
                o = p * ps + s
                if s < nb:
                    base = (p * TB + s) * n + i0
                    for ii in range(w):
                        xo[np.uint64((i0 + ii) * rs + o)] = _at(xf, base + ii)
                else:
                    for ii in range(w):
                        xo[np.uint64((i0 + ii) * rs + o)] = 0


@pjit(**_JIT)
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
            acc += vr[t] * _at(xr, ir[t])
        out[b, j] = bias[j] + scale[j] * acc


@pjit(**_JIT)
def _k_forward_rows(x, indices, values, scale, bias, out):
    """Small batch, parallel over neurons: each neuron a contiguous gathered dot of k inputs."""
    for j in prange(indices.shape[0]):
        _forward_row(x, indices, values, scale, bias, out, j)


def _parallel_launch_is_slow() -> bool:
    """True when OpenMP threads sleep between kernels (OMP_WAIT_POLICY=PASSIVE, no GOMP_SPINCOUNT).

    Waking them costs ~60 us per parallel kernel on the reference VM, more than a small
    batch-1 layer takes on one core.
    """
    import os

    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ


SERIAL_MACS = 1 << 20  # below this many multiply-adds a batch-1 forward runs on one thread if waking is slow


@pjit(**_JIT)
def _k_spmm_panels(xc, rs, ps, ptr, idx, vals, scale, bias, out, B, panel_out):
    """out[b, r] = bias[r] + scale[r] * sum_{e in ptr[r]:ptr[r+1]} vals[e] * x[b, idx[e]] (CSR rows).

    xc (flat) holds x in panels of TB samples: x[p*TB + s, i] at i*rs + p*ps + s (``_k_pack``: the
    transposed layout when shared with the value gradient, the blocked one -- each task's panel
    contiguous, ~10-25 % faster here -- otherwise). out is (B, n_rows) row-major, or with
    ``panel_out`` the transposed layout (n_rows, Bp) itself -- zero past the batch -- which the
    next layer reads as its packed input without a pack pass (training keeps activations so).
    One task = one panel x JB rows. Rows go four at a time: each row keeps TB = 32 accumulators
    (two zmm) and the four rows' loads are independent streams, so the L2 latency of the
    gathered 128-byte x rows overlaps (one row at a time was latency-bound at ~3 cycles/FMA).
    Used for the forward (ptr = j*k) and for dx over the transposed structure.
    """
    n_panels = (B + TB - 1) // TB
    n_rows = ptr.shape[0] - 1
    n_jb = (n_rows + JB - 1) // JB
    vzero = vals.dtype.type(0)
    outf = out.reshape(-1)
    ors = out.shape[1]  # row stride of the panel output (Bp)
    for task in prange(n_panels * n_jb):
        p = task // n_jb
        j0 = (task % n_jb) * JB
        j1 = min(n_rows, j0 + JB)
        col = p * ps  # this panel's samples start here in each input's row
        a0 = numba.carray(stack_buffer(TB, xc.dtype), (TB,))
        a1 = numba.carray(stack_buffer(TB, xc.dtype), (TB,))
        a2 = numba.carray(stack_buffer(TB, xc.dtype), (TB,))
        a3 = numba.carray(stack_buffer(TB, xc.dtype), (TB,))
        tile = np.empty((JB, TB), out.dtype)
        for jq in range(j0, j1, 4):
            q0 = jq
            q1 = min(jq + 1, j1 - 1)  # past the end: repeat the last row (same result, written twice)
            q2 = min(jq + 2, j1 - 1)
            q3 = min(jq + 3, j1 - 1)
            e0 = ptr[q0]
            e1 = ptr[q1]
            e2 = ptr[q2]
            e3 = ptr[q3]
            m = min(min(ptr[q0 + 1] - e0, ptr[q1 + 1] - e1), min(ptr[q2 + 1] - e2, ptr[q3 + 1] - e3))
            for s in range(TB):
                a0[s] = 0
                a1[s] = 0
                a2[s] = 0
                a3[s] = 0
            # offsets into the shared idx/vals (not four slices): fewer live registers, no spills
            for t in range(m):
                v0 = _at(vals, e0 + t)
                v1 = _at(vals, e1 + t)
                v2 = _at(vals, e2 + t)
                v3 = _at(vals, e3 + t)
                b0 = np.intp(_at(idx, e0 + t)) * rs + col
                b1 = np.intp(_at(idx, e1 + t)) * rs + col
                b2 = np.intp(_at(idx, e2 + t)) * rs + col
                b3 = np.intp(_at(idx, e3 + t)) * rs + col
                for s in range(TB):
                    a0[s] += v0 * _at(xc, b0 + s)
                    a1[s] += v1 * _at(xc, b1 + s)
                    a2[s] += v2 * _at(xc, b2 + s)
                    a3[s] += v3 * _at(xc, b3 + s)
            # unequal rows (transposed structure): run on to the longest of the four, with the
            # shorter rows re-reading their last entry at weight 0 (four single-row tail loops
            # were vectorised across entries by LLVM: one gather per sample, 30x slower)
            l0 = ptr[q0 + 1] - e0
            l1 = ptr[q1 + 1] - e1
            l2 = ptr[q2 + 1] - e2
            l3 = ptr[q3 + 1] - e3
            z0 = max(ptr[q0 + 1] - 1, 0)
            z1 = max(ptr[q1 + 1] - 1, 0)
            z2 = max(ptr[q2 + 1] - 1, 0)
            z3 = max(ptr[q3 + 1] - 1, 0)
            for t in range(m, max(max(l0, l1), max(l2, l3))):
                f0 = min(e0 + t, z0)
                f1 = min(e1 + t, z1)
                f2 = min(e2 + t, z2)
                f3 = min(e3 + t, z3)
                v0 = _at(vals, f0) if t < l0 else vzero
                v1 = _at(vals, f1) if t < l1 else vzero
                v2 = _at(vals, f2) if t < l2 else vzero
                v3 = _at(vals, f3) if t < l3 else vzero
                b0 = np.intp(_at(idx, f0)) * rs + col
                b1 = np.intp(_at(idx, f1)) * rs + col
                b2 = np.intp(_at(idx, f2)) * rs + col
                b3 = np.intp(_at(idx, f3)) * rs + col
                for s in range(TB):
                    a0[s] += v0 * _at(xc, b0 + s)
                    a1[s] += v1 * _at(xc, b1 + s)
                    a2[s] += v2 * _at(xc, b2 + s)
                    a3[s] += v3 * _at(xc, b3 + s)
            if panel_out:  # each row's TB samples are one contiguous 128-byte run of the output
                o0 = np.uint64(q0 * ors + p * TB)
                o1 = np.uint64(q1 * ors + p * TB)
                o2 = np.uint64(q2 * ors + p * TB)
                o3 = np.uint64(q3 * ors + p * TB)
                for s in range(TB):
                    outf[o0 + s] = bias[q0] + scale[q0] * a0[s]
                    outf[o1 + s] = bias[q1] + scale[q1] * a1[s]
                    outf[o2 + s] = bias[q2] + scale[q2] * a2[s]
                    outf[o3 + s] = bias[q3] + scale[q3] * a3[s]
            else:
                for s in range(TB):
                    tile[q0 - j0, s] = bias[q0] + scale[q0] * a0[s]
                    tile[q1 - j0, s] = bias[q1] + scale[q1] * a1[s]
                    tile[q2 - j0, s] = bias[q2] + scale[q2] * a2[s]
                    tile[q3 - j0, s] = bias[q3] + scale[q3] * a3[s]
        nb = min(TB, B - p * TB)
        if panel_out:  # samples past the batch are zero in the panel layout
            for jj in range(j0, j1):
                for s in range(nb, TB):
                    outf[np.uint64(jj * ors + p * TB + s)] = 0
        else:  # write the (rows x samples) tile sample by sample: whole cache lines, no set thrashing
            for s in range(nb):
                b = p * TB + s
                for jj in range(j1 - j0):
                    out[b, j0 + jj] = tile[jj, s]


@pjit(**_JIT)
def _k_csr_rows(x, ptr, idx, vals, out):
    """Small batch: out[b, r] = sum_{e in ptr[r]:ptr[r+1]} vals[e] * x[b, idx[e]] (gathered dots)."""
    zero = out.dtype.type(0)
    for r in prange(ptr.shape[0] - 1):
        e0 = ptr[r]
        e1 = ptr[r + 1]
        ir = idx[e0:e1]
        vr = vals[e0:e1]
        for b in range(x.shape[0]):
            xr = x[b]
            acc = zero
            for t in range(ir.shape[0]):
                acc += vr[t] * _at(xr, ir[t])
            out[b, r] = acc


@njit(**_JIT_SERIAL)
def _k_transpose_structure(indices, colptr, rows, slots):
    """Counting sort of the (n_out, k) structure by input: the CSC form of the condensed layer.

    For input i, the entries e in colptr[i]:colptr[i+1] list the neurons ``rows[e]`` that read
    it (increasing) and the flat positions ``slots[e] = j*k + t`` of their weights.
    """
    n_out, k = indices.shape
    n_in = colptr.shape[0] - 1
    for i in range(n_in + 1):
        colptr[i] = 0
    for j in range(n_out):
        for t in range(k):
            colptr[np.intp(np.uint32(indices[j, t])) + 1] += 1
    for i in range(n_in):
        colptr[i + 1] += colptr[i]
    fill = colptr[:n_in].copy()
    for j in range(n_out):
        for t in range(k):
            i = np.intp(np.uint32(indices[j, t]))
            e = fill[i]
            fill[i] = e + 1
            rows[e] = j
            slots[e] = j * k + t


@pjit(**_JIT)
def _k_take(a, slots, out):
    """out[e] = a[slots[e]] (values in transposed order)."""
    for e in prange(slots.shape[0]):
        out[e] = a[slots[e]]


# ---------------------------------------------------------------- backward
@pjit(**_JIT)
def _k_dvalues_transposed(xt, dyt, indices, jb, out):
    """out[j, t] = sum_b dy[b, j] * x[b, indices[j, t]] = dot(dyt[j], xt[indices[j, t]]).

    xt (n_in, Bp), dyt (n_out, Bp): both transposed and zero-padded to the same Bp
    (``pack_panels``). A task owns jb neurons; each output is one dot product over the whole
    padded batch, four at a time (four independent chains sharing the loads of dyt[j]), so there
    is one horizontal sum per output (per-panel dots made one per panel and ran 1.5x slower).
    """
    n_out, k = indices.shape
    Bp = xt.shape[1]
    xf = xt.reshape(-1)
    k4 = k - k % 4
    n_tasks = (n_out + jb - 1) // jb
    zero = out.dtype.type(0)
    for task in prange(n_tasks):
        for j in range(task * jb, min(n_out, task * jb + jb)):
            d = dyt[j]
            ir = indices[j]
            o = out[j]
            for t in range(0, k4, 4):
                b0 = np.intp(ir[t]) * Bp
                b1 = np.intp(ir[t + 1]) * Bp
                b2 = np.intp(ir[t + 2]) * Bp
                b3 = np.intp(ir[t + 3]) * Bp
                s0 = zero
                s1 = zero
                s2 = zero
                s3 = zero
                for s in range(Bp):
                    ds = d[s]
                    s0 += ds * _at(xf, b0 + s)
                    s1 += ds * _at(xf, b1 + s)
                    s2 += ds * _at(xf, b2 + s)
                    s3 += ds * _at(xf, b3 + s)
                o[t] = s0
                o[t + 1] = s1
                o[t + 2] = s2
                o[t + 3] = s3
            for t in range(k4, k):
                b0 = np.intp(ir[t]) * Bp
                s0 = zero
                for s in range(Bp):
                    s0 += d[s] * _at(xf, b0 + s)
                o[t] = s0


@pjit(**_JIT)
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


@pjit(**_JIT)
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


@pjit(**_JIT)
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


# ---------------------------------------------------------------- growth scores
@pjit(**dict(_JIT, fastmath=False))  # NaN marks held inputs: no fastmath (it assumes no NaN)
def _k_topc_free(g, indices, c, sort, cand_idx, cand_score, held_score):
    """Per row r of g: the c largest |g[r, i]| over i not in indices[r] (ties: lower i first),
    by score descending when ``sort``, else in input order; held_score[r, t] = |g[r, indices[r, t]]|.

    g is overwritten (scratch: held positions become NaN, which no comparison selects). Rows with
    fewer than c scored free inputs (NaN scores are never chosen) are padded with -1 / -inf. A
    sample of the row gives a threshold that at least c free scores likely reach; one branch-free
    pass collects the inputs at or above it
    (when fewer than c do, every free input is collected), and a partition of those finds the
    exact c-th largest. O(n_in) per row, plus c log c to sort.
    """
    rows, n_in = g.shape
    k = indices.shape[1]
    step = max(1, n_in // 256)
    nan = g.dtype.type(np.nan)
    for r in prange(rows):
        gr = g[r]
        for t in range(k):
            i = np.uint32(indices[r, t])
            held_score[r, t] = abs(gr[i])
            gr[i] = nan  # held: never a candidate
        free = n_in - k
        m = min(c, free)
        p = 0  # candidates written: fewer than m when free scores are NaN (a NaN gradient is never chosen)
        if m > 0:
            ns_max = (n_in + step - 1) // step
            sample = np.empty(ns_max, g.dtype)
            n_s = 0
            for i in range(0, n_in, step):
                a = abs(gr[i])
                if a == a:
                    sample[n_s] = a
                    n_s += 1
            want = int(n_s * (1.25 * m / free)) + 4
            cut = kth_smallest(sample[:n_s], n_s - want) if 0 < want <= n_s and m < free else g.dtype.type(0)
            sel = np.empty(n_in, np.int32)
            q = 0
            for i in range(n_in):
                sel[q] = i
                q += abs(gr[i]) >= cut
            if q < m:
                q = 0
                for i in range(n_in):
                    sel[q] = i
                    q += gr[i] == gr[i]
            vals = np.empty(q, g.dtype)
            for t in range(q):
                vals[t] = abs(gr[sel[t]])
            # q == m (every free input wanted): all are taken, no partition needed
            exact = kth_smallest(vals.copy(), q - m) if q > m else -np.inf  # vals stays aligned with sel
            above = 0
            for t in range(q):
                above += vals[t] > exact
            ties = m - above
            for t in range(q):
                v = vals[t]
                if v > exact or (v == exact and ties > 0):
                    if v == exact:
                        ties -= 1
                    cand_idx[r, p] = sel[t]
                    cand_score[r, p] = v
                    p += 1
            if sort:
                order = np.argsort(-cand_score[r, :p], kind="mergesort")
                ids = cand_idx[r, :p].copy()
                sc = cand_score[r, :p].copy()
                for t in range(p):
                    cand_idx[r, t] = ids[order[t]]
                    cand_score[r, t] = sc[order[t]]
        for t in range(p, c):
            cand_score[r, t] = -np.inf
            cand_idx[r, t] = -1


# ---------------------------------------------------------------- im2col / col2im
@njit(inline="always")
def _im2col_body(xf, cf, B, C, H, W, kh, kw, sh, sw, ph, pw, ho, wo):
    K = C * kh * kw
    for task in prange(B * ho):
        b = task // ho
        oy = task % ho
        for ox in range(wo):
            r = (task * wo + ox) * K
            ix0 = ox * sw - pw
            inside = ix0 >= 0 and ix0 + kw <= W
            for c in range(C):
                for dy in range(kh):
                    iy = oy * sh - ph + dy
                    q = r + (c * kh + dy) * kw
                    src = ((b * C + c) * H + iy) * W + ix0
                    if iy < 0 or iy >= H:
                        for dx in range(kw):
                            cf[q + dx] = 0
                    elif inside:
                        for dx in range(kw):
                            cf[q + dx] = xf[src + dx]
                    else:
                        for dx in range(kw):
                            ix = ix0 + dx
                            cf[q + dx] = xf[src + dx] if 0 <= ix < W else 0


@pjit(**_JIT)
def _k_im2col(x, kh, kw, sh, sw, ph, pw, ho, wo, cols):
    """cols[(b*ho + oy)*wo + ox, (c*kh + dy)*kw + dx] = x[b, c, oy*sh - ph + dy, ox*sw - pw + dx] (0 outside);
    x and cols C-contiguous.

    Flat indices, the bounds tested once per kernel row (dy) and output column (ox), and 3x3 kernels compiled
    with the size a constant (LLVM then unrolls the taps): the earlier form (a bounds test per tap, array views,
    loops of a run-time length 3) took 9.7-11.9 ms for the CNN's second convolution (batch 128, 22 input
    channels, ~5 M columns) on the Intel Xeon, one thread; with the constant size ~4 ms."""
    B, C, H, W = x.shape
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    if kh == 3 and kw == 3:
        _im2col_body(xf, cf, B, C, H, W, 3, 3, sh, sw, ph, pw, ho, wo)
    else:
        _im2col_body(xf, cf, B, C, H, W, kh, kw, sh, sw, ph, pw, ho, wo)


@njit(inline="always")
def _col2im_body(cf, dx_out, B, C, H, W, kh, kw, sh, sw, ph, pw, ho, wo):
    Hp = max(H + 2 * ph, (ho - 1) * sh + kh)
    Wp = max(W + 2 * pw, (wo - 1) * sw + kw)
    K = C * kh * kw
    for b in prange(B):
        pad = np.zeros(C * Hp * Wp, dx_out.dtype)
        for oy in range(ho):
            for ox in range(wo):
                r = ((b * ho + oy) * wo + ox) * K
                for c in range(C):
                    for dy in range(kh):
                        q = r + (c * kh + dy) * kw
                        d = (c * Hp + oy * sh + dy) * Wp + ox * sw
                        for dx in range(kw):
                            pad[d + dx] += cf[q + dx]
        for c in range(C):
            for iy in range(H):
                for ix in range(W):
                    dx_out[b, c, iy, ix] = pad[(c * Hp + iy + ph) * Wp + ix + pw]


@pjit(**_JIT)
def _k_col2im(cols, kh, kw, sh, sw, ph, pw, ho, wo, dx_out):
    """Adjoint of im2col: each task owns one image b of dx_out (so overlaps never race) and reads its rows of
    cols once, in order, summing into a zero-padded copy of the image (no bounds test per tap) whose interior
    is then copied out; 3x3 kernels compiled with the size a constant (as ``_k_im2col``). The earlier form, one
    task per (b, c) plane, read every row of cols once per channel at a stride: 11.5 ms for the CNN's second
    convolution at batch 128, 22 channels, on the Intel Xeon, one thread."""
    B, C, H, W = dx_out.shape
    cf = cols.reshape(-1)
    if kh == 3 and kw == 3:
        _col2im_body(cf, dx_out, B, C, H, W, 3, 3, sh, sw, ph, pw, ho, wo)
    else:
        _col2im_body(cf, dx_out, B, C, H, W, kh, kw, sh, sw, ph, pw, ho, wo)


@njit(inline="always")
def _x_range(wo, W, sw, pw, dx):
    """The output columns ox whose tap dx reads inside 0..W-1 (ix = ox*sw - pw + dx): [lo, hi)."""
    lo = max(0, (pw - dx + sw - 1) // sw)
    return lo, max(lo, min(wo, (W - 1 + pw - dx) // sw + 1))  # (floor division: empty when the tap never fits)


@pjit(**_JIT)
def _k_im2col_planes(x, kh, kw, sh, sw, ph, pw, ho, wo, cols):
    """cols[b, (c*kh + dy)*kw + dx, oy*wo + ox] = x[b, c, oy*sh - ph + dy, ox*sw - pw + dx] (0 outside): the
    patches of each image as planes, so that ``w (O, C kh kw) @ cols[b]`` is that image's output in (O, Ho Wo)
    order; each output row of a tap is a run of wo inputs (at stride 1 a contiguous copy). One task per
    (image, channel); x and cols C-contiguous, flat indices."""
    B, C, H, W = x.shape
    L = ho * wo
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    for task in prange(B * C):
        b = task // C
        c = task % C
        base = task * H * W
        for dy in range(kh):
            for dx in range(kw):
                d0 = (b * C * kh * kw + (c * kh + dy) * kw + dx) * L
                lo, hi = _x_range(wo, W, sw, pw, dx)
                for oy in range(ho):
                    iy = oy * sh - ph + dy
                    o = d0 + oy * wo
                    if iy < 0 or iy >= H:
                        for ox in range(wo):
                            cf[o + ox] = 0
                        continue
                    for ox in range(lo):
                        cf[o + ox] = 0
                    s0 = base + iy * W - pw + dx
                    if sw == 1:
                        for ox in range(lo, hi):
                            cf[o + ox] = xf[s0 + ox]
                    else:
                        for ox in range(lo, hi):
                            cf[o + ox] = xf[s0 + ox * sw]
                    for ox in range(hi, wo):
                        cf[o + ox] = 0


@pjit(**_JIT)
def _k_col2im_planes(cols, kh, kw, sh, sw, ph, pw, ho, wo, dx_out):
    """Adjoint of ``_k_im2col_planes``: one task per (image, channel) plane of dx_out, which it alone writes."""
    B, C, H, W = dx_out.shape
    L = ho * wo
    cf = cols.reshape(-1)
    df = dx_out.reshape(-1)
    for task in prange(B * C):
        b = task // C
        c = task % C
        base = task * H * W
        for i in range(H * W):
            df[base + i] = 0
        for dy in range(kh):
            for dx in range(kw):
                s0 = (b * C * kh * kw + (c * kh + dy) * kw + dx) * L
                lo, hi = _x_range(wo, W, sw, pw, dx)
                for oy in range(ho):
                    iy = oy * sh - ph + dy
                    if iy < 0 or iy >= H:
                        continue
                    o = s0 + oy * wo
                    d = base + iy * W - pw + dx
                    if sw == 1:
                        for ox in range(lo, hi):
                            df[d + ox] += cf[o + ox]
                    else:
                        for ox in range(lo, hi):
                            df[d + ox * sw] += cf[o + ox]


# ================================================================ drivers
def _panels(B: int) -> int:
    return (B + TB - 1) // TB


def panels_shape(B: int, n: int) -> tuple:
    """The shape of ``pack_panels`` of a (B, n) array: (n, B rounded up to whole panels of TB)."""
    return (n, _panels(B) * TB)


def pack_panels(x: np.ndarray):
    """x (B, n) -> x transposed, (n, ceil(B/TB)*TB), zero-padded; None below SMALL_BATCH (the
    small-batch kernels read x as it is)."""
    if x.shape[0] < SMALL_BATCH:
        return None
    xp = memory.empty(panels_shape(*x.shape), x.dtype)  # read at random rows: huge pages
    _k_pack(x, xp.reshape(-1), xp.shape[1], TB)
    return xp


def _panel_operand(x, xp):
    """(flat panels, row stride, panel stride) for _k_spmm_panels: the caller's transposed
    ``pack_panels(x)`` if given, else x packed blocked (the faster layout for the forward alone)."""
    if xp is not None:
        return xp.reshape(-1), xp.shape[1], TB
    n = x.shape[1]
    flat = memory.empty(_panels(x.shape[0]) * n * TB, x.dtype)
    _k_pack(x, flat, TB, n * TB)
    return flat, TB, n * TB


def transpose(x: np.ndarray) -> np.ndarray:
    """A C-contiguous x.T."""
    xt = np.empty((x.shape[1], x.shape[0]), x.dtype)
    _k_transpose(x, xt)
    return xt


def _scale_bias(n_out, dtype, scale, bias):
    scale = np.ones(n_out, dtype) if scale is None else scale
    bias = np.zeros(n_out, dtype) if bias is None else bias
    return scale, bias


def _row_ptr(n_rows: int, k: int) -> np.ndarray:
    """CSR row pointers of a constant fan-in layer: ptr[j] = j*k."""
    return np.arange(0, (n_rows + 1) * k, k, dtype=np.int64) if k else np.zeros(n_rows + 1, np.int64)


def fanin_forward(x, indices, values, bias=None, scale=None, xp=None):
    """y (B, n_out) = bias + scale * sum_t values * x[:, indices]; path chosen by batch size.

    ``xp``: ``pack_panels(x)`` if the caller already has it (it is used from batch SMALL_BATCH on).
    """
    B = x.shape[0]
    n_out = indices.shape[0]
    scale, bias = _scale_bias(n_out, x.dtype, scale, bias)
    out = np.empty((B, n_out), x.dtype)
    if B == 0:
        return out
    if B < SMALL_BATCH:
        small = B * indices.shape[0] * indices.shape[1] < SERIAL_MACS and _parallel_launch_is_slow()
        (_k_forward_rows.serial if small else _k_forward_rows)(x, indices, values, scale, bias, out)
    else:
        xc, rs, ps = _panel_operand(x, xp)
        vals = values.reshape(-1) if values.dtype == x.dtype else values.reshape(-1).astype(x.dtype)
        _k_spmm_panels(xc, rs, ps, _row_ptr(n_out, indices.shape[1]), indices.reshape(-1),
                       vals, scale, bias, out, B, False)
    return out


def fixed_point_forward(x, indices, qvalues, scale, bias=None):
    """y = bias + scale[j] * sum_t q[j, t] * x[:, indices[j, t]] with integer q."""
    return fanin_forward(x, indices, qvalues, bias, scale)


def fanin_backward_values(x, indices, dy, xp=None, dyp=None):
    """dvalues[j, t] = sum_b dy[b, j] * x[b, indices[j, t]] (xp, dyp: packed panels if already made)."""
    out = np.empty(indices.shape, x.dtype)
    B = x.shape[0]
    if B < SMALL_BATCH:
        _k_dvalues_rows(x, dy, indices, out)
        return out
    return backward_values_panels(pack_panels(x) if xp is None else xp, indices,
                                  pack_panels(dy) if dyp is None else dyp)


def transpose_structure(indices, n_in):
    """(colptr (n_in+1,) int64, rows (nnz,) int32, slots (nnz,) int32/int64): the CSC form of indices.

    Depends on the topology only, so a layer computes it once per ``indices`` array and passes
    it to ``fanin_backward_input(..., transposed=...)`` on every step.
    """
    n_out, k = indices.shape
    nnz = n_out * k
    colptr = np.empty(int(n_in) + 1, np.int64)
    rows = np.empty(nnz, np.int32)
    slots = np.empty(nnz, np.int32 if nnz < 2**31 else np.int64)
    _k_transpose_structure(indices, colptr, rows, slots)
    return colptr, rows, slots


def _values_transposed(values, slots, dtype):
    """The layer's values in the transposed structure's order (dx reads them as CSR rows)."""
    vals_t = np.empty(slots.shape[0], dtype)
    _k_take(values.reshape(-1), slots, vals_t)
    return vals_t


def fanin_backward_input(indices, values, dy, n_in, dyp=None, transposed=None):
    """dx (B, n_in) = dy @ W for the condensed W, race-free.

    From batch SMALL_BATCH on (or with ``transposed`` given) dx is a forward over the transposed
    structure: each input gathers the dy of the neurons that read it, so no two threads write
    the same dx and there is no scatter. Without ``transposed`` the structure is built here
    (O(nnz)); layers cache it. Below SMALL_BATCH without it: scatter into per-thread buffers.
    """
    B = dy.shape[0]
    out = np.empty((B, n_in), dy.dtype)
    if B == 0:
        return out
    if B < SMALL_BATCH and transposed is None:
        groups = max(1, min(n_threads(), indices.shape[0]))
        parts = np.empty((groups, B, n_in), dy.dtype)
        _k_dx_rows(dy, indices, values, parts)
        if groups == 1:
            return parts[0]
        _k_sum_parts(parts, out)
        return out
    colptr, rows, slots = transpose_structure(indices, n_in) if transposed is None else transposed
    vals_t = _values_transposed(values, slots, dy.dtype)
    if B < SMALL_BATCH:
        _k_csr_rows(dy, colptr, rows, vals_t, out)
        return out
    dc, rs, ps = _panel_operand(dy, dyp)
    _k_spmm_panels(dc, rs, ps, colptr, rows, vals_t, np.ones(n_in, dy.dtype),
                   np.zeros(n_in, dy.dtype), out, B, False)
    return out


# ------------------------------------------------ panel-layout drivers (training)
# Activations and their gradients kept in the transposed panel layout from one layer to the next:
# the forward writes the next layer's packed input, dx writes the previous layer's packed dy, so a
# training step packs only the network's input (and unpacks only what is read as rows).
def unpack_panels(xp, B):
    """(B, n) rows of a transposed panel array xp (n, Bp)."""
    return transpose(xp)[:B]


def forward_panels(xp, B, indices, values, bias=None, row_ptr=None):
    """fanin_forward on a packed input xp (n_in, Bp) of batch B; the output packed, (n_out, Bp).

    ``row_ptr``: ``_row_ptr(n_out, k)`` if the caller keeps it (a Topology does)."""
    n_out = indices.shape[0]
    out = memory.empty((n_out, xp.shape[1]), xp.dtype)  # the next layer gathers its rows
    scale, bias = _scale_bias(n_out, xp.dtype, None, bias)
    ptr = _row_ptr(n_out, indices.shape[1]) if row_ptr is None else row_ptr
    _k_spmm_panels(xp.reshape(-1), xp.shape[1], TB, ptr, indices.reshape(-1),
                   values.reshape(-1), scale, bias, out, B, True)
    return out


def backward_input_panels(indices, values, dyp, B, n_in, transposed=None):
    """fanin_backward_input on a packed dy (n_out, Bp); dx packed, (n_in, Bp)."""
    colptr, rows, slots = transpose_structure(indices, n_in) if transposed is None else transposed
    vals_t = _values_transposed(values, slots, dyp.dtype)
    out = memory.empty((n_in, dyp.shape[1]), dyp.dtype)
    _k_spmm_panels(dyp.reshape(-1), dyp.shape[1], TB, colptr, rows, vals_t, np.ones(n_in, dyp.dtype),
                   np.zeros(n_in, dyp.dtype), out, B, True)
    return out


def backward_values_panels(xp, indices, dyp):
    """fanin_backward_values from packed x (n_in, Bp) and dy (n_out, Bp)."""
    out = np.empty(indices.shape, xp.dtype)
    n_out = indices.shape[0]
    jb = max(8, -(-n_out // (4 * n_threads())))  # ~4 tasks per thread
    _k_dvalues_transposed(xp, dyp, indices, jb, out)
    return out


def fanin_backward(x, indices, values, dy, transposed=None, xp=None, dyp=None):
    """(dx, dvalues) of the condensed forward, sharing the packed dy panels."""
    if x.shape[0] < SMALL_BATCH:
        return (fanin_backward_input(indices, values, dy, x.shape[1], transposed=transposed),
                fanin_backward_values(x, indices, dy))
    dyp = pack_panels(dy) if dyp is None else dyp
    return (fanin_backward_input(indices, values, dy, x.shape[1], dyp, transposed),
            fanin_backward_values(x, indices, dy, pack_panels(x) if xp is None else xp, dyp))


def dense_grad(x, dy):
    """G = dy^T x, shape (n_out, n_in)."""
    return np.ascontiguousarray(dy.T @ x)


def growth_candidates(x, dy, indices, c, block=None, sort=True, held=False):
    """Per neuron, the c largest |dy^T x| outside indices[j], descending; blockwise over neurons
    (and |dy^T x| at indices[j] when ``held``)."""
    n_out = indices.shape[0]
    n_in = x.shape[1]
    cand_idx = np.empty((n_out, c), np.int32)
    cand_score = np.empty((n_out, c), x.dtype)
    held_score = np.empty(indices.shape, x.dtype)
    if block is None:  # ~4 MiB of scores per block, at least 64 rows
        block = max(64, min(n_out, (1 << 20) // max(1, n_in)))
    dyt = np.ascontiguousarray(dy.T)
    for j0 in range(0, n_out, block):
        j1 = min(n_out, j0 + block)
        g = dyt[j0:j1] @ x  # BLAS, (block, n_in)
        _k_topc_free(g, indices[j0:j1], c, sort, cand_idx[j0:j1], cand_score[j0:j1], held_score[j0:j1])
    return (cand_idx, cand_score, held_score) if held else (cand_idx, cand_score)


def im2col(x, kh, kw, stride, padding, ho, wo):
    """Patches of x (B, C, H, W) as rows (B*ho*wo, C*kh*kw), columns ordered (c, dy, dx)."""
    B, C = x.shape[0], x.shape[1]
    # from the huge-page pool: a fresh 20 MB np.empty per call paid ~5,000 page faults each time it was written
    cols = memory.empty((B * ho * wo, C * kh * kw), x.dtype)
    _k_im2col(x, kh, kw, stride[0], stride[1], padding[0], padding[1], ho, wo, cols)
    return cols


# A convolution with at most this many patch entries (C * kh * kw) runs as per-image products on planes
# (``im2col_planes``): its one big product would be (B*Ho*Wo, K) @ (K, O) with a tiny K, which BLAS runs poorly,
# and the output then needs a transpose to NCHW. Measured, batch 128, forward + backward, one thread (Intel
# Xeon): K = 9 (1 -> 22 channels, 28x28) 7.4 -> 2.0 ms; K = 27 (3 -> 32, 32x32) 41.6 -> 18.3 ms; K = 36 16.8 ->
# 12.7 ms; K = 72 6.6 vs 6.3 ms (even); K = 144 17.7 vs 20.2 and K = 198 22.3 vs 26.3 ms (rows win).
PLANES_MAX_K = 64


def im2col_layout(c, kh, kw) -> str:
    """'planes' or 'rows': how a dense convolution of c input channels and a kh x kw kernel runs best."""
    return "planes" if c * kh * kw <= PLANES_MAX_K else "rows"


def im2col_planes(x, kh, kw, stride, padding, ho, wo):
    """Patches of x (B, C, H, W) as planes (B, C*kh*kw, ho*wo), rows ordered (c, dy, dx)."""
    B, C = x.shape[0], x.shape[1]
    cols = memory.empty((B, C * kh * kw, ho * wo), x.dtype)
    _k_im2col_planes(x, kh, kw, stride[0], stride[1], padding[0], padding[1], ho, wo, cols)
    return cols


def col2im_planes(cols, x_shape, kh, kw, stride, padding, ho, wo):
    """Adjoint of im2col_planes."""
    out = memory.empty(x_shape, cols.dtype)
    _k_col2im_planes(cols, kh, kw, stride[0], stride[1], padding[0], padding[1], ho, wo, out)
    return out


def col2im(cols, x_shape, kh, kw, stride, padding, ho, wo):
    """Adjoint of im2col: sums every patch entry back into its pixel of an x_shape array."""
    out = memory.empty(x_shape, cols.dtype)  # (see im2col)
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
