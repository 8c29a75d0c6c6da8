"""Direct (no-im2col) condensed convolution kernels (SPEC.md §1), CPU / Numba.

A condensed convolution has ``indices (C_out, k)`` into the flattened receptive field, tap
``i = (c*kh + dy)*kw + dx``, and ``values (C_out, k)``. These kernels never build the
``(B*Ho*Wo, C*kh*kw)`` im2col matrix (9x the input for 3x3) nor densify the weights.

Layout trick shared by all kernels: the input is copied once into a zero-padded buffer
``xp (B, C, Hp, Wp)`` that holds the convolution padding *and* enough slack rows/columns that
every output tile of ``R`` rows x ``L`` columns reads in bounds. Inner loops then have no
branches and no border cases: a tap of output channel j at tile (oy0, ox0) reads
``xp[b].flat[off[j, t] + oy*sh*Wp + ox*sw]`` with ``off[j, t] = (c*Hp + dy)*Wp + dx``.

- forward: one task per (b, j); an R x L = 4 x 16 tile of outputs lives in four separate
  accumulators a0..a3 (four zmm for float32) while the k taps stream through:
  ``a_r[0:L] += v_t * xp_row(r, t)[0:L]``: four independent FMA chains per tap. (One
  (R*L) buffer indexed r*L+l did not vectorise: scalar FMAs, 5x slower.)
- backward to the values: one task per j; T = 4 taps at a time share each zero-padded dy row.
- backward to the input: each task owns input planes (b, c) (no atomics). Stride 1: a gather
  over the transposed (CSC) structure into a zero-padded dy, register-tiled like the forward.
  Other strides: a scatter of ``v * dy[b, j]`` into the task's own padded plane.
"""
from __future__ import annotations

import numpy as np
from numba import carray, prange

from fanin.kernels._intrinsics import load_unchecked as _ld
from fanin.kernels._intrinsics import stack_buffer
from fanin.kernels._jit import clone, gate, gated, njit, twins

_JIT_SERIAL = dict(cache=True, fastmath=True, nogil=True)  # also what twins() compiles with (+ parallel=True)
_JIT = dict(parallel=True, **_JIT_SERIAL)

R = 4   # output rows per register tile (four accumulators a0..a3: R is fixed at 4)
L = 16  # output columns per register tile (one zmm of float32)
T = 4   # taps per task step in backward_values (accumulators a0..a3: T is fixed at 4)
L_ = L


@njit(inline="always")
def _store_tile(out, r0, c0, n_rows, n_cols, a0, a1, a2, a3, relu=False):
    """Write a 4-row register tile (rows a0..a3, ``n_cols`` wide) at out[r0:r0+4, c0:], clipped to ``n_rows``
    (``relu``: max(., 0) on the way out)."""
    if relu:
        for l in range(n_cols):
            a0[l] = max(a0[l], 0)
            a1[l] = max(a1[l], 0)
            a2[l] = max(a2[l], 0)
            a3[l] = max(a3[l], 0)
    for l in range(n_cols):
        out[r0, c0 + l] = a0[l]
    if r0 + 1 < n_rows:
        for l in range(n_cols):
            out[r0 + 1, c0 + l] = a1[l]
    if r0 + 2 < n_rows:
        for l in range(n_cols):
            out[r0 + 2, c0 + l] = a2[l]
    if r0 + 3 < n_rows:
        for l in range(n_cols):
            out[r0 + 3, c0 + l] = a3[l]


@njit(**_JIT_SERIAL)
def _geometry(H, W, kh, kw, sh, sw, ph, pw, ho, wo):
    """(nrb, ncb, Hp, Wp): row/column tiles and the padded plane size."""
    nrb = (ho + R - 1) // R
    ncb = (wo + L - 1) // L
    Hp = max(nrb * R * sh + kh, ph + H)
    Wp = max(ncb * L * sw + kw, pw + W)
    return nrb, ncb, Hp, Wp


def _pad_planes(x, ph, pw, Hp, Wp):
    """xp (B, C*Hp*Wp): x copied into zeroed planes at offset (ph, pw)."""
    B, C, H, W = x.shape
    xp = np.empty((B, C * Hp * Wp), x.dtype)
    for task in prange(B * C):
        b = task // C
        c = task % C
        base = c * Hp * Wp
        for q in range(Hp * Wp):
            xp[b, base + q] = 0
        for iy in range(H):
            o = base + (iy + ph) * Wp + pw
            for ix in range(W):
                xp[b, o + ix] = x[b, c, iy, ix]
    return xp


_pad, _pad_serial = twins(_pad_planes, _JIT_SERIAL)


@njit(**_JIT_SERIAL)
def _tap_offsets(indices, kh, kw, Hp, Wp, kpad):
    """off (C_out, kpad) int64: flat offset of each tap in a padded (C, Hp, Wp) sample; 0 beyond k."""
    n_out, k = indices.shape
    off = np.zeros((n_out, kpad), np.int64)
    for j in range(n_out):
        for t in range(k):
            i = np.int64(indices[j, t])
            dx = i % kw
            cy = i // kw
            dy = cy % kh
            c = cy // kh
            off[j, t] = (c * Hp + dy) * Wp + dx
    return off


def _conv_forward(x, indices, values, bias, kh, kw, sh, sw, ph, pw, ho, wo, relu=False):
    """y (B, C_out, ho, wo): y[b,j,oy,ox] = bias[j] + sum_t values[j,t] * x[b, c_t, oy*sh-ph+dy_t, ox*sw-pw+dx_t];
    ``relu``: max(y, 0) as the tiles are stored (inference: a NumPy pass over y cost more than the pooling
    after it -- 2.2 ms for the CNN's 32x28x28 output at batch 256)."""
    B, C, H, W = x.shape
    n_out, k = indices.shape
    nrb, ncb, Hp, Wp = _geometry(H, W, kh, kw, sh, sw, ph, pw, ho, wo)
    xp = _pad(x, ph, pw, Hp, Wp)
    off = _tap_offsets(indices, kh, kw, Hp, Wp, k)
    y = np.empty((B, n_out, ho, wo), x.dtype)
    has_bias = bias.shape[0] == n_out
    rs = sh * Wp  # flat step between output rows
    zero = np.zeros(1, x.dtype)[0]
    for task in prange(B * n_out):
        b = task // n_out
        j = task % n_out
        bj = bias[j] if has_bias else zero
        live = False
        for t in range(k):
            if values[j, t] != 0:
                live = True
                break
        yb = y[b, j]
        if not live:
            fill = max(bj, zero) if relu else bj
            for oy in range(ho):
                for ox in range(wo):
                    yb[oy, ox] = fill
            continue
        xb = xp[b]
        offj = off[j]
        vj = values[j]
        a0 = carray(stack_buffer(L_, x.dtype), (L,))
        a1 = carray(stack_buffer(L_, x.dtype), (L,))
        a2 = carray(stack_buffer(L_, x.dtype), (L,))
        a3 = carray(stack_buffer(L_, x.dtype), (L,))
        for rb in range(nrb):
            oy0 = rb * R
            for cb in range(ncb):
                ox0 = cb * L
                for l in range(L):
                    a0[l] = bj
                    a1[l] = bj
                    a2[l] = bj
                    a3[l] = bj
                base = oy0 * rs + ox0 * sw
                if sw == 1:
                    for t in range(k):
                        v = _ld(vj, t)
                        p = base + _ld(offj, t)
                        for l in range(L):
                            a0[l] += v * _ld(xb, p + l)
                            a1[l] += v * _ld(xb, p + rs + l)
                            a2[l] += v * _ld(xb, p + 2 * rs + l)
                            a3[l] += v * _ld(xb, p + 3 * rs + l)
                else:
                    for t in range(k):
                        v = _ld(vj, t)
                        p = base + _ld(offj, t)
                        for l in range(L):
                            a0[l] += v * _ld(xb, p + l * sw)
                            a1[l] += v * _ld(xb, p + rs + l * sw)
                            a2[l] += v * _ld(xb, p + 2 * rs + l * sw)
                            a3[l] += v * _ld(xb, p + 3 * rs + l * sw)
                _store_tile(yb, oy0, ox0, ho, min(L, wo - ox0), a0, a1, a2, a3, relu)
    return y


# conv_forward_serial: the same body without a parallel region (the runtime's small batches, forked children)
conv_forward, conv_forward_serial = twins(_conv_forward, _JIT_SERIAL, swap={"_pad": _pad_serial})


@njit(**_JIT)
def _pad_dy(dy, WoP):
    """dyp (B, C_out, ho, WoP): dy with zero columns up to WoP."""
    B, n_out, ho, wo = dy.shape
    dyp = np.empty((B, n_out, ho, WoP), dy.dtype)
    for task in prange(B * n_out):
        b = task // n_out
        j = task % n_out
        for oy in range(ho):
            for ox in range(wo):
                dyp[b, j, oy, ox] = dy[b, j, oy, ox]
            for ox in range(wo, WoP):
                dyp[b, j, oy, ox] = 0
    return dyp


@njit(**_JIT)
def _backward_values_padded(xp, dyp, off, k, sh, sw, Wp):
    B, n_out, ho, WoP = dyp.shape
    ncb = WoP // L
    dv = np.empty((n_out, k), xp.dtype)
    kpad = off.shape[1]
    rs = sh * Wp
    for j in prange(n_out):
        a0 = carray(stack_buffer(L_, xp.dtype), (L,))
        a1 = carray(stack_buffer(L_, xp.dtype), (L,))
        a2 = carray(stack_buffer(L_, xp.dtype), (L,))
        a3 = carray(stack_buffer(L_, xp.dtype), (L,))
        offj = off[j]
        for t0 in range(0, kpad, T):
            for l in range(L):
                a0[l] = 0
                a1[l] = 0
                a2[l] = 0
                a3[l] = 0
            o0 = offj[t0]
            o1 = offj[t0 + 1]
            o2 = offj[t0 + 2]
            o3 = offj[t0 + 3]
            for b in range(B):
                xb = xp[b]
                db = dyp[b, j].ravel()
                for oy in range(ho):
                    for cb in range(ncb):
                        dbase = oy * WoP + cb * L
                        xbase = oy * rs + cb * L * sw
                        if sw == 1:
                            for l in range(L):
                                d = _ld(db, dbase + l)
                                a0[l] += d * _ld(xb, xbase + o0 + l)
                                a1[l] += d * _ld(xb, xbase + o1 + l)
                                a2[l] += d * _ld(xb, xbase + o2 + l)
                                a3[l] += d * _ld(xb, xbase + o3 + l)
                        else:
                            for l in range(L):
                                d = _ld(db, dbase + l)
                                a0[l] += d * _ld(xb, xbase + o0 + l * sw)
                                a1[l] += d * _ld(xb, xbase + o1 + l * sw)
                                a2[l] += d * _ld(xb, xbase + o2 + l * sw)
                                a3[l] += d * _ld(xb, xbase + o3 + l * sw)
            s0 = a0[0]
            s1 = a1[0]
            s2 = a2[0]
            s3 = a3[0]
            for l in range(1, L):
                s0 += a0[l]
                s1 += a1[l]
                s2 += a2[l]
                s3 += a3[l]
            dv[j, t0] = s0
            if t0 + 1 < k:
                dv[j, t0 + 1] = s1
            if t0 + 2 < k:
                dv[j, t0 + 2] = s2
            if t0 + 3 < k:
                dv[j, t0 + 3] = s3
    return dv


# serial copies of the parallel kernels the two drivers below call (their serial twins swap them in)
_pad_dy_serial = njit(**_JIT_SERIAL)(clone(_pad_dy, "_serial"))
_backward_values_padded_serial = njit(**_JIT_SERIAL)(clone(_backward_values_padded, "_serial"))


@njit(**_JIT_SERIAL)  # the padding and the reduction it calls are parallel
def conv_backward_values(x, dy, indices, kh, kw, sh, sw, ph, pw):
    """dvalues (C_out, k): dvalues[j,t] = sum_{b,oy,ox} dy[b,j,oy,ox] * x[b, c_t, oy*sh-ph+dy_t, ox*sw-pw+dx_t]."""
    B, C, H, W = x.shape
    ho, wo = dy.shape[2], dy.shape[3]
    n_out, k = indices.shape
    nrb, ncb, Hp, Wp = _geometry(H, W, kh, kw, sh, sw, ph, pw, ho, wo)
    xp = _pad(x, ph, pw, Hp, Wp)
    kpad = (k + T - 1) // T * T
    off = _tap_offsets(indices, kh, kw, Hp, Wp, kpad)
    dyp = _pad_dy(dy, ncb * L)
    return _backward_values_padded(xp, dyp, off, k, sh, sw, Wp)


@njit(**_JIT_SERIAL)
def _gather_entries(values, colptr, rows, slots, C, khw, kh, kw, ph, pw, Hq, Wq):
    """Per input channel c, the non-zero (offset, value) pairs of its taps for the stride-1 dx gather.

    Entry of tap (c, ddy, ddx) read by neuron j: offset ``j*Hq*Wq + (ph - ddy + kh - 1)*Wq +
    (pw - ddx + kw - 1)`` into a padded dy sample; zero weights (ablated neurons) are dropped.
    """
    vflat = values.ravel()
    nnz = rows.shape[0]
    cptr = np.zeros(C + 1, np.int64)
    eoff = np.empty(nnz, np.int64)
    ev = np.empty(nnz, values.dtype)
    n = 0
    for c in range(C):
        for tap in range(khw):
            i = c * khw + tap
            ddy = tap // kw
            ddx = tap % kw
            for e in range(colptr[i], colptr[i + 1]):
                v = vflat[slots[e]]
                if v != 0:
                    eoff[n] = np.int64(rows[e]) * Hq * Wq + (ph - ddy + kh - 1) * Wq + (pw - ddx + kw - 1)
                    ev[n] = v
                    n += 1
        cptr[c + 1] = n
    return cptr, eoff, ev


@njit(**_JIT)
def _pad_dy_full(dy, kh, kw, Hq, Wq):
    """dyq (B, C_out*Hq*Wq): dy at offset (kh-1, kw-1) in zeroed planes."""
    B, n_out, ho, wo = dy.shape
    dyq = np.empty((B, n_out * Hq * Wq), dy.dtype)
    for task in prange(B * n_out):
        b = task // n_out
        j = task % n_out
        base = j * Hq * Wq
        for q in range(Hq * Wq):
            dyq[b, base + q] = 0
        for oy in range(ho):
            o = base + (oy + kh - 1) * Wq + kw - 1
            for ox in range(wo):
                dyq[b, o + ox] = dy[b, j, oy, ox]
    return dyq


@njit(**_JIT)
def _backward_input_gather(dy, values, colptr, rows, slots, C, H, W, kh, kw, ph, pw):
    """dx for stride 1 as a gather: dx[b,c,iy,ix] = sum v * dy[b, j, iy+ph-ddy, ix+pw-ddx].

    One task per (b, c); R x L tiles of dx in registers, like the forward.
    """
    B, n_out, ho, wo = dy.shape
    nrb = (H + R - 1) // R
    ncb = (W + L - 1) // L
    Hq = max(nrb * R + ph + kh - 1, ho + kh - 1)
    Wq = max(ncb * L + pw + kw - 1, wo + kw - 1)
    cptr, eoff, ev = _gather_entries(values, colptr, rows, slots, C, kh * kw, kh, kw, ph, pw, Hq, Wq)
    dyq = _pad_dy_full(dy, kh, kw, Hq, Wq)
    dx = np.empty((B, C, H, W), dy.dtype)
    zero = np.zeros(1, dy.dtype)[0]
    for task in prange(B * C):
        b = task // C
        c = task % C
        db = dyq[b]
        xb = dx[b, c]
        e0 = cptr[c]
        e1 = cptr[c + 1]
        a0 = carray(stack_buffer(L_, dy.dtype), (L,))
        a1 = carray(stack_buffer(L_, dy.dtype), (L,))
        a2 = carray(stack_buffer(L_, dy.dtype), (L,))
        a3 = carray(stack_buffer(L_, dy.dtype), (L,))
        for rb in range(nrb):
            iy0 = rb * R
            for cb in range(ncb):
                ix0 = cb * L
                for l in range(L):
                    a0[l] = zero
                    a1[l] = zero
                    a2[l] = zero
                    a3[l] = zero
                base = iy0 * Wq + ix0
                for e in range(e0, e1):
                    v = _ld(ev, e)
                    p = base + _ld(eoff, e)
                    for l in range(L):
                        a0[l] += v * _ld(db, p + l)
                        a1[l] += v * _ld(db, p + Wq + l)
                        a2[l] += v * _ld(db, p + 2 * Wq + l)
                        a3[l] += v * _ld(db, p + 3 * Wq + l)
                _store_tile(xb, iy0, ix0, H, min(L, W - ix0), a0, a1, a2, a3)
    return dx


@njit(**_JIT)
def _backward_input_scatter(dy, values, colptr, rows, slots, C, H, W, kh, kw, sh, sw, ph, pw):
    """dx for any stride as a scatter: one task per input plane (b, c); for each of the channel's
    kh*kw taps i the transposed structure lists the (j, slot) pairs reading it, and
    ``v * dy[b, j]`` is added into the task's own padded plane, which is then cropped into dx."""
    B, n_out, ho, wo = dy.shape
    nrb, ncb, Hp, Wp = _geometry(H, W, kh, kw, sh, sw, ph, pw, ho, wo)
    vflat = values.ravel()
    dx = np.empty((B, C, H, W), dy.dtype)
    plane_all = np.empty((B * C, Hp * Wp), dy.dtype)
    khw = kh * kw
    for task in prange(B * C):
        b = task // C
        c = task % C
        plane = plane_all[task]
        for q in range(Hp * Wp):
            plane[q] = 0
        for tap in range(khw):
            i = c * khw + tap
            ddy = tap // kw
            ddx = tap % kw
            for e in range(colptr[i], colptr[i + 1]):
                v = vflat[slots[e]]
                if v == 0:
                    continue
                j = rows[e]
                for oy in range(ho):
                    base = (oy * sh + ddy) * Wp + ddx
                    drow = dy[b, j, oy]
                    if sw == 1:
                        for ox in range(wo):
                            plane[base + ox] += v * drow[ox]
                    else:
                        for ox in range(wo):
                            plane[base + ox * sw] += v * drow[ox]
        for iy in range(H):
            o = (iy + ph) * Wp + pw
            for ix in range(W):
                dx[b, c, iy, ix] = plane[o + ix]
    return dx


_pad_dy_full_serial = njit(**_JIT_SERIAL)(clone(_pad_dy_full, "_serial"))
_backward_input_gather_serial = njit(**_JIT_SERIAL)(clone(_backward_input_gather, "_serial",
                                                          {"_pad_dy_full": _pad_dy_full_serial}))
_backward_input_scatter_serial = njit(**_JIT_SERIAL)(clone(_backward_input_scatter, "_serial"))


@njit(**_JIT_SERIAL)  # dispatches to parallel kernels
def conv_backward_input(dy, indices, values, transposed, C, H, W, kh, kw, sh, sw, ph, pw):
    """dx (B, C, H, W): the adjoint of conv_forward (without bias) applied to dy (B, C_out, Ho, Wo).

    ``transposed`` = ``fanin.kernels.transpose_structure(indices, C*kh*kw)`` = (colptr, rows, slots).
    Each task owns whole input planes (b, c): no atomics. Stride 1 is a register-tiled gather
    (the forward's loop over the transposed structure); other strides scatter.
    """
    colptr, rows, slots = transposed
    if sh == 1 and sw == 1:
        return _backward_input_gather(dy, values, colptr, rows, slots, C, H, W, kh, kw, ph, pw)
    return _backward_input_scatter(dy, values, colptr, rows, slots, C, H, W, kh, kw, sh, sw, ph, pw)


# called from Python through the gate; serially all the way down in a forked child or a second workqueue thread
conv_backward_values = gate(conv_backward_values, _JIT_SERIAL,
                            {"_pad": _pad_serial, "_pad_dy": _pad_dy_serial,
                             "_backward_values_padded": _backward_values_padded_serial})
conv_backward_input = gate(conv_backward_input, _JIT_SERIAL,
                           {"_backward_input_gather": _backward_input_gather_serial,
                            "_backward_input_scatter": _backward_input_scatter_serial})


# ================================================================ Python drivers
def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _output_size(h, w, kh, kw, sh, sw, ph, pw):
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _float(a, dt):
    return np.ascontiguousarray(a, dtype=dt)


def fanin_conv2d_forward(x, indices, values, bias, kernel_size, stride, padding, parallel: bool = True,
                         relu: bool = False):
    """y (B, C_out, Ho, Wo) of the condensed convolution (callers validated the arguments); ``parallel=False``
    runs the serial twin (no thread is woken); ``relu=True`` returns max(y, 0), fused into the stores."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride), _pair(padding)
    dt = np.result_type(x.dtype, values.dtype, np.float32)
    ho, wo = _output_size(x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw)
    b = np.empty(0, dt) if bias is None else _float(bias, dt)
    args = (_float(x, dt), np.ascontiguousarray(indices), _float(values, dt), b, kh, kw, sh, sw, ph, pw, ho, wo,
            bool(relu))
    return gated(conv_forward, conv_forward_serial, *args) if parallel else conv_forward_serial(*args)


def fanin_conv2d_backward(x, indices, values, dy, kernel_size, stride, padding, transposed, need_dx=True):
    """(dx or None, dvalues) of fanin_conv2d_forward for the output gradient dy (B, C_out, Ho, Wo).

    ``transposed`` = ``fanin.kernels.transpose_structure(indices, C*kh*kw)`` (or None: rebuilt here).
    """
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride), _pair(padding)
    dt = np.result_type(x.dtype, values.dtype, dy.dtype, np.float32)
    x = _float(x, dt)
    dy = _float(dy, dt)
    indices = np.ascontiguousarray(indices)
    dv = conv_backward_values(x, dy, indices, kh, kw, sh, sw, ph, pw)
    dx = None
    if need_dx:
        B, C, H, W = x.shape
        if transposed is None:
            from fanin.kernels import transpose_structure
            transposed = transpose_structure(indices, C * kh * kw, check=False)
        dx = conv_backward_input(dy, indices, _float(values, dt), tuple(transposed), C, H, W,
                                 kh, kw, sh, sw, ph, pw)
    return dx, dv
