"""Direct (no-im2col) condensed convolution kernels (SPEC.md §1), CPU / Numba.

A condensed convolution has ``indices (C_out, k)`` into the flattened receptive field, tap
``i = (c*kh + dy)*kw + dx``, and ``values (C_out, k)``. These kernels never build the
``(B*Ho*Wo, C*kh*kw)`` im2col matrix (9x the input for 3x3) nor densify the weights.

Layout trick shared by all kernels: the input is copied once into a zero-padded buffer
``xp (B, C, Hp, Wp)`` that holds the convolution padding *and* enough slack rows/columns that
every output tile of ``R`` rows x ``L`` columns reads in bounds. Inner loops then have no
branches and no border cases: a tap of output channel j at tile (oy0, ox0) reads
``xp[b].flat[off[j, t] + oy*sh*Wp + ox*sw]`` with ``off[j, t] = (c*Hp + dy)*Wp + dx``.

- forward: one task per (b, j); an R x L tile of outputs lives in registers
  (R*L = 64 float32 = four zmm) while the k taps stream through:
  ``acc[r, 0:L] += v_t * xp_row(r, t)[0:L]``, R independent FMA chains per tap.
- backward to the values: one task per j; T taps at a time share each (zero-padded) dy row.
- backward to the input: one task per input plane (b, c); it loops over the channel's kh*kw
  taps and, through the transposed (CSC) structure, over the (j, slot) pairs that read each
  tap, scattering ``v * dy[b, j]`` into its own padded plane. No atomics, no races.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir as llvmir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = dict(parallel=True, cache=True, fastmath=True, nogil=True)
_JIT_SERIAL = dict(cache=True, fastmath=True, nogil=True)

R = 4   # output rows per register tile
L = 16  # output columns per register tile (one zmm of float32)
T = 4   # taps per task step in backward_values
RL = R * L
TL = T * L


@intrinsic
def _scratch(typingctx, size, dtype):
    """``size`` (a compile-time constant) elements of ``dtype`` on the stack, in the entry block
    (promoted to registers when every access has a constant index)."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = size.literal_value

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype),
                                   size=context.get_constant(types.intp, n))

    return types.CPointer(dtype.dtype)(size, dtype), codegen


@intrinsic
def _ld(typingctx, arr, i):
    """arr[i] for a 1-D contiguous array and an index known to be in range (no wraparound)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty, ity = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        ix = args[1]
        if ity.bitwidth < 64:
            ix = builder.sext(ix, llvmir.IntType(64)) if ity.signed else builder.zext(ix, llvmir.IntType(64))
        return builder.load(builder.gep(ary.data, [ix], inbounds=True))

    return arr.dtype(arr, i), codegen


@njit(**_JIT_SERIAL)
def _geometry(H, W, kh, kw, sh, sw, ph, pw, ho, wo):
    """(nrb, ncb, Hp, Wp): row/column tiles and the padded plane size."""
    nrb = (ho + R - 1) // R
    ncb = (wo + L - 1) // L
    Hp = max(nrb * R * sh + kh, ph + H)
    Wp = max(ncb * L * sw + kw, pw + W)
    return nrb, ncb, Hp, Wp


@njit(**_JIT)
def _pad(x, ph, pw, Hp, Wp):
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


@njit(**_JIT)
def conv_forward(x, indices, values, bias, kh, kw, sh, sw, ph, pw, ho, wo):
    """y (B, C_out, ho, wo): y[b,j,oy,ox] = bias[j] + sum_t values[j,t] * x[b, c_t, oy*sh-ph+dy_t, ox*sw-pw+dx_t]."""
    B, C, H, W = x.shape
    n_out, k = indices.shape
    nrb, ncb, Hp, Wp = _geometry(H, W, kh, kw, sh, sw, ph, pw, ho, wo)
    xp = _pad(x, ph, pw, Hp, Wp)
    off = _tap_offsets(indices, kh, kw, Hp, Wp, k)
    y = np.empty((B, n_out, ho, wo), x.dtype)
    has_bias = bias.shape[0] == n_out
    rs = sh * Wp  # flat step between output rows
    for task in prange(B * n_out):
        b = task // n_out
        j = task % n_out
        bj = np.float64(bias[j]) if has_bias else 0.0
        live = False
        for t in range(k):
            if values[j, t] != 0:
                live = True
                break
        yb = y[b, j]
        if not live:
            for oy in range(ho):
                for ox in range(wo):
                    yb[oy, ox] = bj
            continue
        xb = xp[b]
        offj = off[j]
        vj = values[j]
        acc = _scratch(RL, x.dtype)
        for rb in range(nrb):
            oy0 = rb * R
            for cb in range(ncb):
                ox0 = cb * L
                for q in range(R * L):
                    acc[q] = bj
                base = oy0 * rs + ox0 * sw
                if sw == 1:
                    for t in range(k):
                        v = vj[t]
                        p = base + offj[t]
                        for r in range(R):
                            pr = p + r * rs
                            for l in range(L):
                                acc[r * L + l] += v * _ld(xb, pr + l)
                else:
                    for t in range(k):
                        v = vj[t]
                        p = base + offj[t]
                        for r in range(R):
                            pr = p + r * rs
                            for l in range(L):
                                acc[r * L + l] += v * _ld(xb, pr + l * sw)
                nr = min(R, ho - oy0)
                nc = min(L, wo - ox0)
                for r in range(nr):
                    for l in range(nc):
                        yb[oy0 + r, ox0 + l] = acc[r * L + l]
    return y


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
        acc = _scratch(TL, xp.dtype)
        offj = off[j]
        for t0 in range(0, kpad, T):
            for q in range(T * L):
                acc[q] = 0
            for b in range(B):
                xb = xp[b]
                db = dyp[b, j].ravel()
                for oy in range(ho):
                    for cb in range(ncb):
                        dbase = oy * WoP + cb * L
                        xbase = oy * rs + cb * L * sw
                        if sw == 1:
                            for q in range(T):
                                p = xbase + offj[t0 + q]
                                for l in range(L):
                                    acc[q * L + l] += _ld(db, dbase + l) * _ld(xb, p + l)
                        else:
                            for q in range(T):
                                p = xbase + offj[t0 + q]
                                for l in range(L):
                                    acc[q * L + l] += _ld(db, dbase + l) * _ld(xb, p + l * sw)
            for q in range(T):
                if t0 + q < k:
                    s = acc[q * L]
                    for l in range(1, L):
                        s += acc[q * L + l]
                    dv[j, t0 + q] = s
    return dv


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


@njit(**_JIT)
def conv_backward_input(dy, indices, values, transposed, C, H, W, kh, kw, sh, sw, ph, pw):
    """dx (B, C, H, W) = the adjoint of conv_forward (without bias) applied to dy.

    One task per input plane (b, c): for each of the channel's kh*kw taps i, the transposed
    structure lists the (j, slot) pairs reading it; ``v * dy[b, j]`` is scattered into the task's
    own padded plane, which is then cropped into dx.
    """
    colptr, rows, slots = transposed
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


# ================================================================ Python drivers
def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _output_size(h, w, kh, kw, sh, sw, ph, pw):
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _float(a, dt):
    return np.ascontiguousarray(a, dtype=dt)


def fanin_conv2d_forward(x, indices, values, bias, kernel_size, stride, padding):
    """y (B, C_out, Ho, Wo) of the condensed convolution (callers validated the arguments)."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride), _pair(padding)
    dt = np.result_type(x.dtype, values.dtype, np.float32)
    ho, wo = _output_size(x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw)
    b = np.empty(0, dt) if bias is None else _float(bias, dt)
    return conv_forward(_float(x, dt), np.ascontiguousarray(indices), _float(values, dt), b,
                        kh, kw, sh, sw, ph, pw, ho, wo)


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
