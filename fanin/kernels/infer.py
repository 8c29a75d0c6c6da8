"""Inference kernels: the whole forward of a chain of linear layers in one compiled call.

The runtime (``fanin.runtime.engine``) lays a network's linear layers out once, at build time, in a few flat
arrays (``Layout``) -- a layer table (int64, one row of ``NF`` fields per layer), the indices (int16 and
int32), the float32 values, scales and biases, the int8 values, the packed 4-bit values
(``fanin.kernels.lowbit``), CSC column pointers -- and calls one of the drivers below, which walk the table
with every branch (index dtype, value kind, dense or condensed, activation) taken per layer or per row,
outside the inner loops. Nothing here validates: the plan was validated when it was loaded, ``x`` by
``Network.predict``.

Layout (the engine's, not the plan's): a condensed row of ``k`` slots is stored in ``kp`` = ``k`` rounded up
to a multiple of 8 slots; the extra slots have weight 0 and read input ``n_in``, a *sentinel* that every
activation buffer keeps at 0 (so a padded slot adds exactly 0, whatever the other inputs hold). A dense row
is stored the same way, ``k = n_in``, with no indices. Ablated neurons (SPEC.md §1) read only the sentinel:
they output their bias. Every flat array starts on 64 bytes and has ``PAD`` readable elements past its end.

Two forms of the forward:

- *rows* (batch < ``SMALL_BATCH``): each output is a gathered dot product of its row (``gdot``, an LLVM IR
  kernel: 8 lanes, two accumulators, the gather done as scalar loads inserted into a vector, four int16
  indices per 64-bit load). Measured on the 2-core AMD EPYC (Zen 5), 784x1024 layer at fan-in 80: 11.9 us
  this way, 19.3 us with the zmm hardware gathers LLVM emits for AVX-512, 19.8 us with ymm hardware gathers
  (Intel parts with the GDS microcode fix lose their fast gathers too); on an Intel Xeon with AVX-512 FP16 the
  ymm gather wins (22.5 against 26.5 us), and is used there (``HW_GATHER``: the same lanes). Rows of 8 slots
  (fan-in <= 8) go eight at a time (``gdot8``: straight-line, the eight lane sums in one shuffle tree; the same
  sums bitwise): per row, the loop, branches and reduction cost more than their eight products. Int8 and 4-bit
  weights are widened and multiplied by their scale in registers: the weight used is exactly ``scale * q``.
  Activations are rows of ``S`` floats (the sentinel and padding after ``n``). A layer that follows a ReLU
  also has a transposed copy (``Layout(scatter=True)``): when at most ``SCATTER_DENSITY`` of its inputs are
  non-zero, it adds the columns of the non-zero inputs instead (``scol``: work ~ non-zeros; per weight ~1.9x a
  gathered one, so it pays from ~half zeros on -- a trained ReLU MLP has 50-55 %).
- *panels* (larger batches): activations in blocks of ``TB`` samples, batch innermost: the block of one panel
  is ``(n + 1) x TB`` floats (row ``n`` the sentinel, zero), so the inner step of a row is
  ``acc[0:TB] += w * block[idx, 0:TB]``: two FMAs (zmm, ``TB`` = 32 with AVX-512; ymm, ``TB`` = 16 with
  AVX2) on one contiguous run of the block. Four rows at a time, each with its accumulators in registers;
  the output of one layer is the next layer's block (no unpacking between layers); the input is packed and
  the result unpacked with 8x8 register transposes (``transpose8``). Quantized rows are dequantized
  (exactly, vectorized) ``JB`` rows at a time into a float buffer that stays in L1. A float32 condensed
  layer whose block overflows L1 (~350 inputs with AVX-512) also has an *input-tiled* copy (``Layout._tiled``):
  its inputs in chunks whose share of the block fits L1, its rows in quads of alike rows, each quad's slots
  chunk by chunk; every panel driver runs it chunk after chunk (``_tiled_rows``, ``qchunk``), the partial
  sums kept in the output block: the same products in the same order, the same bits. SRigL-90 % MLP on the
  Intel Xeon, 2 threads: batch 256 0.82 -> 0.68 ms; half panels (chunks sized for full ones) 4-8 % faster.

Drivers (each compiled twice from one Python body, ``parallel=True`` and serial, by ``_jit.twins``):

- ``rows_forward``: layer after layer; the rows of a layer in ``prange`` blocks of ``rb`` (the scatter, when
  taken, runs on the calling thread, so the engine allows it only for work too small to split: there the
  two threads gathering beat one scattering);
- ``panels_forward``: ``prange`` over panels, each panel taken through all the layers (one parallel
  region per call, no barrier between layers, each panel's blocks private to its thread);
- ``panels_layerwise``: layer after layer, ``prange`` over (panel, block of ``JB`` rows) -- for batches
  with fewer panels than threads and layers big enough to split;
- ``half_panels_serial``, ``half_layerwise``: the two above compiled again with panels of ``TBH`` = TB / 2
  samples (the same bodies, the constant swapped), for batches of at most ``TBH``: a batch of 8 no longer
  pays for 32 lanes. A sample's sums do not depend on the panel width: bitwise the same results.
- ``half_panels``: ``panels_forward`` with half panels, for batches of one panel that fill two half panels
  (17-32 samples with AVX-512) on two threads: each thread takes its half panel through every layer. Splitting
  the rows of the one full panel instead (``panels_layerwise``) gained little on the Intel Xeon: the second
  core reads the block the first one wrote, line by line from the other core's cache (SRigL-90 % MLP at batch
  32: one 784x1024 layer 99 us serial, 97 us layerwise; the network 139 us layerwise, 130 us in half panels).

Each output element is computed by the same code in every driver of a form, so serial and parallel runs
(any thread count) give bitwise identical results. The two forms sum in different orders (to rounding).
"""
from __future__ import annotations

import functools
import math

import numba
import numpy as np
from llvmlite import ir as llvmir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fanin.kernels._intrinsics import load_unchecked as _at
from fanin.kernels._intrinsics import prefer_512_bit_vectors, stack_buffer
from fanin.kernels._jit import clone, njit, twins
from fanin.kernels.lowbit import dequantize_rows_int4, dequantize_rows_int8

__all__ = ["Layout", "forward", "PATHS", "TB", "SMALL_BATCH", "PAD", "NF", "rows_forward", "rows_forward_serial",
           "panels_forward", "panels_forward_serial", "panels_layerwise", "gdot", "cdot", "gdot8", "scol",
           "transpose8", "aligned_zeros", "panel_block", "row_stride", "all_finite", "TBH",
           "half_panels_serial", "half_layerwise", "half_panels", "HW_GATHER", "gdot_insert", "gdot_hardware",
           "qchunk", "cache_bytes", "l1d_bytes", "l2_bytes", "tile_chunks", "TILE_L1", "TILE_MIN_SLOTS"]

@functools.cache
def target_features() -> frozenset:
    """The CPU features the code Numba generates here may use: the host's, or what NUMBA_CPU_FEATURES says
    (read once: LLVM's host query costs ~0.3 ms, and both kernel modules ask at import)."""
    from numba.core import config

    feats = config.CPU_FEATURES
    if feats is None:
        import llvmlite.binding as ll

        feats = ll.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in feats.split(",") if f.startswith("+"))


def cache_bytes(level: int, fallback: int) -> int:
    """The size of CPU 0's level-``level`` data (or unified) cache from Linux sysfs, else ``fallback``."""
    import glob

    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(d + "/level") as f:
                lv = f.read().strip()
            with open(d + "/type") as f:
                kind = f.read().strip()
            with open(d + "/size") as f:
                size = f.read().strip().upper()
        except OSError:
            continue
        if lv == str(level) and kind in ("Unified", "Data") and size[:-1].isdigit():
            return int(size[:-1]) << {"K": 10, "M": 20}.get(size[-1], 0)
    return fallback


@functools.cache
def l1d_bytes() -> int:
    """The L1 data cache of CPU 0 (sysfs), else 32 KiB."""
    return cache_bytes(1, 32 << 10)


@functools.cache
def l2_bytes() -> int:
    """The L2 cache of CPU 0 (sysfs), else 1 MiB."""
    return cache_bytes(2, 1 << 20)


def _vector_bits() -> int:
    """512 when the code Numba generates here may use AVX-512, else 256 (AVX2 machines, or a Numba told
    to target less than the host)."""
    return 512 if "avx512f" in target_features() else 256


def _hardware_gathers_pay() -> bool:
    """Whether ``gdot`` gathers its 8 lanes with one AVX2 ``vgatherdps`` instead of 8 scalar loads inserted
    into a vector (the same lanes, the same sums: bitwise the same result). Measured, 784x1024 layer at fan-in
    80, batch 1: on the AMD EPYC (Zen 5) the inserts win, 11.9 us against 19.8 us; on the Intel Xeon with
    AVX-512 FP16 (Sapphire Rapids and later) the gather wins, 22.5 us against 26.5 us (the whole SRigL-90 %
    MLP at batch 1: 52.5 against 60.6 us). Intel parts before those run the Downfall (GDS) microcode fix,
    which makes gathers several times slower. So: hardware gathers on Intel CPUs with AVX-512 FP16 only.
    Decided from the CPU name and features Numba compiles for, which are part of its cache key: a kernel
    cached on one machine is never run with the other choice on another."""
    from numba.core import config

    feats = target_features()
    if "avx2" not in feats or "avx512fp16" not in feats:
        return False
    name = config.CPU_NAME
    if not name or name == "host":
        import llvmlite.binding as ll

        name = ll.get_host_cpu_name()
    return not name.startswith("znver")


HW_GATHER = _hardware_gathers_pay()

# samples per panel: two 512-bit vectors per row with AVX-512; with 256-bit vectors 16 (four rows of four
# ymm accumulators would take all 16 registers and spill: 1.4x slower, measured)
TB = 32 if _vector_bits() >= 512 else 16
JB = 32          # rows per dequantized block (and per task of panels_layerwise)
RB = 64          # rows per task of the parallel rows driver
SMALL_BATCH = 4  # below this batch the rows form runs, from it the panels
PAD = 32         # readable elements past the end of every flat array
TILE_L1 = 0.92   # share of the L1 data cache one chunk of an input-tiled layer's block may fill (tile_chunks)
TILE_MIN_SLOTS = 8  # slots a row per chunk, at least, for a layer to be tiled (tile_chunks)

# layer table: one row of NF int64 fields per layer
NF = 23
(F_NIN, F_NOUT, F_K, F_KP, F_DENSE, F_IK, F_IOFF, F_VK, F_VOFF, F_SOFF, F_BOFF, F_ACT,
 F_CSC, F_CIK, F_CPOFF, F_CROFF, F_CVK, F_CVOFF,
 F_TNC, F_TQOFF, F_TPOFF, F_TIOFF, F_TWOFF) = range(NF)  # F_T*: the input-tiled copy (0 chunks: none)
VK_F32, VK_I8, VK_I4 = 0, 1, 2
CSC_NONE, CSC_SPARSE, CSC_DENSE = 0, 1, 2  # F_CSC: no transposed copy, columns (CSC), or W^T (dense)
SCATTER_DENSITY = 0.5  # rows form: a layer with a transposed copy scatters when <= this share of inputs is non-zero
SCATTER_MIN_DENSE_OUT = 64  # a dense layer narrower than this gathers (a column of W^T is too short to pay)
ACT_NONE, ACT_RELU, ACT_GELU = 0, 1, 2

_FAST = dict(cache=True, nogil=True, fastmath={"contract", "nsz", "arcp"})  # FMA contraction, no reassociation


def aligned_zeros(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
    """Zeros whose data starts on an ``align``-byte boundary (NumPy's large arrays start 16 bytes past a
    page: a 128-byte panel row would then span three cache lines instead of two)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def row_stride(width: int) -> int:
    """Floats per sample row of a rows-form activation buffer of ``width`` values: the sentinel and the
    padding a padded row may read (``kp`` slots from the row start) fit."""
    return (width + 1 + 15) // 16 * 16


def panel_block(width: int) -> int:
    """Floats in one panel block of ``width`` values (the sentinel row included)."""
    return (width + 1) * TB


# ------------------------------------------------------------------ the gathered dot (LLVM IR)
_W = 8
_F32 = llvmir.FloatType()
_I32 = llvmir.IntType(32)
_I64 = llvmir.IntType(64)
_VF = llvmir.VectorType(_F32, _W)


def _vconst(ty, vals):
    return llvmir.Constant(llvmir.VectorType(ty, len(vals)), [llvmir.Constant(ty, v) for v in vals])


def _splat(builder, value, n=_W):
    """``value`` (a scalar IR value) in all ``n`` lanes of a vector (eight by default)."""
    v = llvmir.Constant(llvmir.VectorType(value.type, n), None)
    for i in range(n):
        v = builder.insert_element(v, value, _I32(i))
    return v


def _dot_row(context, builder, sig, args, gather, kind, ioff, voff, scale, kk, hw=False):
    """IR of one row's dot before its lane sum: the 8-lane vector a0 + a1 (``gdot``'s order). ``args``/``sig``
    are the intrinsic's (x, xoff first; idx at 2 when gathering; vals at 4 or 2); ``ioff``, ``voff``, ``kk``
    (intp: the row's first index and value, its slot count kp) and ``scale`` (float) are this row's; ``hw``:
    gather with ``vgatherdps`` (AVX2) instead of scalar loads and inserts (``HW_GATHER``; the same vector)."""
    xt, xot = sig.args[0], sig.args[1]
    xb = builder.gep(context.make_array(xt)(context, builder, args[0]).data,
                     [context.cast(builder, args[1], xot, types.intp)], inbounds=True)
    vpos = 4 if gather else 2
    vt = sig.args[vpos]
    vb = builder.gep(context.make_array(vt)(context, builder, args[vpos]).data, [voff], inbounds=True)
    if gather:
        it = sig.args[2]
        ib = builder.gep(context.make_array(it)(context, builder, args[2]).data, [ioff], inbounds=True)
        ity = it.dtype
        iw = llvmir.IntType(ity.bitwidth)
        per = 64 // ity.bitwidth
    scv = _splat(builder, scale)
    fmt = llvmir.FunctionType(_VF, [_VF, _VF, _VF])
    fmuladd = cgutils.get_or_insert_function(builder.module, fmt, "llvm.fmuladd.v8f32")

    def xvec(t):
        if not gather:
            p = builder.bitcast(builder.gep(xb, [t], inbounds=True), _VF.as_pointer())
            return builder.load(p, align=4)
        if hw:  # the same 8 lanes in one vgatherdps
            iv = llvmir.VectorType(iw, _W)
            ivec = builder.load(builder.bitcast(builder.gep(ib, [t], inbounds=True), iv.as_pointer()),
                                align=ity.bitwidth // 8)
            ivec = (builder.sext if ity.signed else builder.zext)(ivec, llvmir.VectorType(_I32, _W))
            i8p = llvmir.IntType(8).as_pointer()
            gt = llvmir.FunctionType(_VF, [_VF, i8p, llvmir.VectorType(_I32, _W), _VF, llvmir.IntType(8)])
            gfn = cgutils.get_or_insert_function(builder.module, gt, "llvm.x86.avx2.gather.d.ps.256")
            allset = builder.bitcast(llvmir.Constant(llvmir.VectorType(_I32, _W), [-1] * _W), _VF)
            return builder.call(gfn, [llvmir.Constant(_VF, None), builder.bitcast(xb, i8p), ivec, allset,
                                      llvmir.IntType(8)(4)])
        v = llvmir.Constant(_VF, None)
        lane = 0
        for g in range(_W // per):  # `per` indices per 64-bit load, split with shifts (ALU, not loads)
            p = builder.bitcast(builder.gep(ib, [builder.add(t, _I64(g * per))], inbounds=True),
                                _I64.as_pointer())
            word = builder.load(p, align=ity.bitwidth // 8)
            for i in range(per):
                ix = builder.trunc(builder.lshr(word, _I64(i * ity.bitwidth)) if i else word, iw)
                ix = builder.sext(ix, _I64) if ity.signed else builder.zext(ix, _I64)
                e = builder.load(builder.gep(xb, [ix], inbounds=True), align=4)
                v = builder.insert_element(v, e, _I32(lane))
                lane += 1
        return v

    def wvec(t):
        if kind == "f32":
            return builder.load(builder.bitcast(builder.gep(vb, [t], inbounds=True), _VF.as_pointer()), align=4)
        if kind == "i8":
            vi8 = llvmir.VectorType(llvmir.IntType(8), _W)
            q = builder.load(builder.bitcast(builder.gep(vb, [t], inbounds=True), vi8.as_pointer()), align=1)
            return builder.fmul(builder.sitofp(q, _VF), scv)
        vi8 = llvmir.VectorType(llvmir.IntType(8), _W // 2)
        p = builder.bitcast(builder.gep(vb, [builder.lshr(t, _I64(1))], inbounds=True), vi8.as_pointer())
        b = builder.load(p, align=1)
        dup = builder.shuffle_vector(b, b, _vconst(_I32, [i // 2 for i in range(_W)]))
        w = builder.sext(dup, llvmir.VectorType(_I32, _W))
        w = builder.shl(w, _vconst(_I32, [28 if i % 2 == 0 else 24 for i in range(_W)]))
        w = builder.ashr(w, _vconst(_I32, [28] * _W))
        return builder.fmul(builder.sitofp(w, _VF), scv)

    zero = llvmir.Constant(_VF, [_F32(0)] * _W)
    n16 = builder.and_(kk, _I64(-16))
    pre = builder.basic_block
    loop = builder.append_basic_block("dot.loop")
    after = builder.append_basic_block("dot.after")
    builder.cbranch(builder.icmp_signed(">", n16, _I64(0)), loop, after)
    builder.position_at_end(loop)
    t = builder.phi(_I64)
    a0 = builder.phi(_VF)
    a1 = builder.phi(_VF)
    t.add_incoming(_I64(0), pre)
    a0.add_incoming(zero, pre)
    a1.add_incoming(zero, pre)
    t8 = builder.add(t, _I64(8))
    n0 = builder.call(fmuladd, [xvec(t), wvec(t), a0])
    n1 = builder.call(fmuladd, [xvec(t8), wvec(t8), a1])
    tn = builder.add(t, _I64(16))
    t.add_incoming(tn, loop)
    a0.add_incoming(n0, loop)
    a1.add_incoming(n1, loop)
    builder.cbranch(builder.icmp_signed("<", tn, n16), loop, after)
    builder.position_at_end(after)
    c0 = builder.phi(_VF)
    c1 = builder.phi(_VF)
    c0.add_incoming(zero, pre)
    c1.add_incoming(zero, pre)
    c0.add_incoming(n0, loop)
    c1.add_incoming(n1, loop)
    acc = cgutils.alloca_once_value(builder, c0)
    with builder.if_then(builder.icmp_signed(">", kk, n16)):  # kp is a multiple of 8: one step is left
        builder.store(builder.call(fmuladd, [xvec(n16), wvec(n16), builder.load(acc)]), acc)
    return builder.fadd(builder.load(acc), c1)


def _halves(builder, a, b, n):
    """The lanes of a and b (n each) pairwise: (first halves of a, b), (second halves of a, b)."""
    h = n // 2
    lo = [i for i in range(h)] + [n + i for i in range(h)]
    return (builder.shuffle_vector(a, b, _vconst(_I32, lo)),
            builder.shuffle_vector(a, b, _vconst(_I32, [i + h for i in lo])))


def _lane_sum(builder, s):
    """sum of the 8 lanes of s in gdot's fixed pairing: ((s0+s4)+(s2+s6)) + ((s1+s5)+(s3+s7))."""
    s = builder.fadd(builder.shuffle_vector(s, s, _vconst(_I32, [0, 1, 2, 3])),
                     builder.shuffle_vector(s, s, _vconst(_I32, [4, 5, 6, 7])))
    s = builder.fadd(builder.shuffle_vector(s, s, _vconst(_I32, [0, 1])),
                     builder.shuffle_vector(s, s, _vconst(_I32, [2, 3])))
    return builder.fadd(builder.extract_element(s, _I32(0)), builder.extract_element(s, _I32(1)))


def _lane_sums8(builder, rows):
    """The lane sums of eight 8-lane vectors as one vector, each in ``_lane_sum``'s pairing (so bitwise equal
    to it): three levels of two shuffles and an add for two vectors, instead of a reduction per vector."""
    def level(vs, pick):
        out = []
        for a, b in zip(vs[0::2], vs[1::2]):
            p, q = pick(a, b)
            out.append(builder.fadd(p, q))
        return out

    # level 1: [a0..3 b0..3] + [a4..7 b4..7] -> the 4-lane halves of two rows side by side
    v = level(rows, lambda a, b: _halves(builder, a, b, 8))
    # level 2: per row, lanes (0, 1) + (2, 3)
    v = level(v, lambda a, b: (builder.shuffle_vector(a, b, _vconst(_I32, [0, 1, 4, 5, 8, 9, 12, 13])),
                               builder.shuffle_vector(a, b, _vconst(_I32, [2, 3, 6, 7, 10, 11, 14, 15]))))
    # level 3: per row, lane 0 + lane 1
    v = level(v, lambda a, b: (builder.shuffle_vector(a, b, _vconst(_I32, [0, 2, 4, 6, 8, 10, 12, 14])),
                               builder.shuffle_vector(a, b, _vconst(_I32, [1, 3, 5, 7, 9, 11, 13, 15]))))
    return v[0]


def _dot_codegen(gather, kind, hw=False):
    """Codegen of sum_{t < kp} w[t] * x[xoff + idx[ioff + t]] (gather) or w[t] * x[xoff + t] (contiguous)."""

    def codegen(context, builder, sig, args):
        vo = 5 if gather else 3
        voff = context.cast(builder, args[vo], sig.args[vo], types.intp)
        ioff = context.cast(builder, args[3], sig.args[3], types.intp) if gather else None
        kk = context.cast(builder, args[vo + 2], sig.args[vo + 2], types.intp)
        return _lane_sum(builder, _dot_row(context, builder, sig, args, gather, kind, ioff, voff, args[vo + 1], kk,
                                           hw))

    return codegen


def _dot8_codegen(kind, hw=False):
    """Codegen of eight rows of eight slots: row r (indices from ioff + 8 r, values from voff + r * vstride,
    scale and bias at soff + r) -> dst[doff + r] = bias + dot (ReLU'd when act is ACT_RELU), each row's
    arithmetic exactly ``gdot``'s followed by ``_activate``'s. With kp the constant 8, LLVM drops each row's
    loop and branches: they cost more than the arithmetic of so short a row."""

    def codegen(context, builder, sig, args):
        def arg(i):
            return context.cast(builder, args[i], sig.args[i], types.intp)

        def at(i, off):  # pointer to element `off` of the array argument i
            return builder.gep(context.make_array(sig.args[i])(context, builder, args[i]).data, [off], inbounds=True)

        ioff, voff, vstride, soff = arg(3), arg(5), arg(6), arg(8)
        sp, bp = at(7, soff), at(9, soff)
        rows = []
        for r in range(_W):
            sc = builder.load(builder.gep(sp, [_I64(r)], inbounds=True), align=4)
            io = builder.add(ioff, _I64(8 * r))
            vo = builder.add(voff, builder.mul(vstride, _I64(r)))
            rows.append(_dot_row(context, builder, sig, args, True, kind, io, vo, sc, _I64(8), hw))
        y = builder.fadd(builder.load(builder.bitcast(bp, _VF.as_pointer()), align=4), _lane_sums8(builder, rows))
        zero = llvmir.Constant(_VF, [_F32(0)] * _W)
        relu = builder.icmp_signed("==", arg(10), _I64(ACT_RELU))
        neg = builder.fcmp_ordered("<", y, zero)  # max(y, 0) as Numba compiles it: NaN and -0.0 pass
        y = builder.select(builder.and_(neg, _splat(builder, relu)), zero, y)
        builder.store(y, builder.bitcast(at(11, arg(12)), _VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


_KINDS = {"float32": "f32", "int8": "i8", "uint8": "i4"}


def _dot_args_ok(x, vals):
    return (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 1
            and isinstance(vals, types.Array) and vals.ndim == 1 and str(vals.dtype) in _KINDS)


def _make_gdot(hw):
    @intrinsic
    def gdot(typingctx, x, xoff, idx, ioff, vals, voff, scale, kp):
        """sum_{t < kp} w_t * x[xoff + idx[ioff + t]] in float32, ``kp`` a multiple of 8; ``w_t`` is
        ``vals[voff + t]`` (float32 vals), ``scale * vals[voff + t]`` (int8) or ``scale *`` nibble ``t`` of the
        packed row starting at byte ``voff`` (uint8). Fixed order: lanes t mod 8 in two accumulators (t mod 16
        below 8 / from 8), then a pairwise sum of the lanes. No bounds checks: the caller guarantees them."""
        if not (_dot_args_ok(x, vals) and isinstance(idx, types.Array) and idx.ndim == 1
                and idx.dtype in (types.int16, types.int32)):
            return None
        return (types.float32(x, xoff, idx, ioff, vals, voff, scale, kp),
                _dot_codegen(True, _KINDS[str(vals.dtype)], hw))

    return gdot


gdot = _make_gdot(HW_GATHER)
# both forms of the gather, whatever this CPU uses (tests compare them bit for bit)
gdot_insert = _make_gdot(False)
gdot_hardware = _make_gdot(True)


@intrinsic
def cdot(typingctx, x, xoff, vals, voff, scale, kp):
    """``gdot`` over contiguous inputs: sum_{t < kp} w_t * x[xoff + t] (a dense row)."""
    if not _dot_args_ok(x, vals):
        return None
    return types.float32(x, xoff, vals, voff, scale, kp), _dot_codegen(False, _KINDS[str(vals.dtype)])


def _dot8_args_ok(*arrays):
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32 for a in arrays)


@intrinsic
def gdot8(typingctx, x, xoff, idx, ioff, vals, voff, vstride, scale, soff, bias, act, dst, doff):
    """Eight rows of eight slots (fan-in <= 8, kp = 8) at once, with their bias and ReLU: dst[doff + r] =
    relu?(bias[soff + r] + gdot(x, xoff, idx, ioff + 8 r, vals, voff + r * vstride, scale[soff + r], 8)) for
    r < 8, bitwise (ReLU when ``act`` is ACT_RELU; any other activation is the caller's). Straight-line code,
    and the eight lane sums done together (14 shuffles and 7 adds, in gdot's pairing): 3072 such rows
    7.7 -> 5.4 us (measured, 2-core AMD EPYC)."""
    if not (_dot_args_ok(x, vals) and isinstance(idx, types.Array) and idx.ndim == 1
            and idx.dtype in (types.int16, types.int32) and _dot8_args_ok(scale, bias, dst)):
        return None
    return (types.none(x, xoff, idx, ioff, vals, voff, vstride, scale, soff, bias, act, dst, doff),
            _dot8_codegen(_KINDS[str(vals.dtype)], HW_GATHER))


@intrinsic
def transpose8(typingctx, src, soff, sstride, dst, doff, dstride):
    """dst[doff + c * dstride + r] = src[soff + r * sstride + c] for r, c < 8 (float32, one 8x8 tile in
    registers: eight vector loads, 24 shuffles, eight vector stores). No bounds checks."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == types.float32
            and dst.dtype == types.float32 and src.ndim == 1 and dst.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        sa, so, ss, da, do, ds = args
        st, sot, sst, dt, dot, dst_ = sig.args
        sp = context.make_array(st)(context, builder, sa).data
        dp = context.make_array(dt)(context, builder, da).data
        so = context.cast(builder, so, sot, types.intp)
        ss = context.cast(builder, ss, sst, types.intp)
        do = context.cast(builder, do, dot, types.intp)
        ds = context.cast(builder, ds, dst_, types.intp)
        r = []
        for i in range(8):
            p = builder.gep(sp, [builder.add(so, builder.mul(ss, _I64(i)))], inbounds=True)
            r.append(builder.load(builder.bitcast(p, _VF.as_pointer()), align=4))

        def sh(a, b, m):
            return builder.shuffle_vector(a, b, _vconst(_I32, m))

        lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
        t = [sh(r[i], r[i + 1], m) for i in (0, 2, 4, 6) for m in (lo, hi)]  # lo01, hi01, lo23, hi23, ...
        a, b = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
        u = [sh(t[0], t[2], a), sh(t[0], t[2], b), sh(t[1], t[3], a), sh(t[1], t[3], b),
             sh(t[4], t[6], a), sh(t[4], t[6], b), sh(t[5], t[7], a), sh(t[5], t[7], b)]
        first, second = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
        cols = [sh(u[c], u[c + 4], first) for c in range(4)] + [sh(u[c], u[c + 4], second) for c in range(4)]
        for c in range(8):
            p = builder.gep(dp, [builder.add(do, builder.mul(ds, _I64(c)))], inbounds=True)
            builder.store(cols[c], builder.bitcast(p, _VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(src, soff, sstride, dst, doff, dstride), codegen


@intrinsic
def scol(typingctx, y, rows, ro, vals, vo, n, xi):
    """y[rows[ro + e]] += w_e * xi for e < n (one column of a transposed layer; its rows are distinct), with
    w_e = vals[vo + e] (float32) or its integer (int8). Eight lanes at a time: the y values gathered by
    scalar loads into a vector, one FMA, stored back lane by lane; the last n % 8 one by one."""
    if not (isinstance(y, types.Array) and y.dtype == types.float32 and isinstance(rows, types.Array)
            and rows.dtype in (types.int16, types.int32) and isinstance(vals, types.Array)
            and str(vals.dtype) in ("float32", "int8")):
        return None
    quant = str(vals.dtype) == "int8"

    def codegen(context, builder, sig, args):
        ya, ra, ro_, va, vo_, n_, xi_ = args
        yt, rt, rot, vt, vot, nt, _ = sig.args
        yp = context.make_array(yt)(context, builder, ya).data
        rb = builder.gep(context.make_array(rt)(context, builder, ra).data,
                         [context.cast(builder, ro_, rot, types.intp)], inbounds=True)
        vb = builder.gep(context.make_array(vt)(context, builder, va).data,
                         [context.cast(builder, vo_, vot, types.intp)], inbounds=True)
        nn = context.cast(builder, n_, nt, types.intp)
        ity = rt.dtype
        iw = llvmir.IntType(ity.bitwidth)
        per = 64 // ity.bitwidth
        xv = _splat(builder, xi_)
        fmt = llvmir.FunctionType(_VF, [_VF, _VF, _VF])
        fmuladd = cgutils.get_or_insert_function(builder.module, fmt, "llvm.fmuladd.v8f32")

        def row_of(ix):
            return builder.sext(ix, _I64) if ity.signed else builder.zext(ix, _I64)

        n8 = builder.and_(nn, _I64(-8))
        pre = builder.basic_block
        loop = builder.append_basic_block("scol.loop")
        after = builder.append_basic_block("scol.after")
        builder.cbranch(builder.icmp_signed(">", n8, _I64(0)), loop, after)
        builder.position_at_end(loop)
        t = builder.phi(_I64)
        t.add_incoming(_I64(0), pre)
        ptrs = []
        yv = llvmir.Constant(_VF, None)
        for g in range(_W // per):
            p = builder.bitcast(builder.gep(rb, [builder.add(t, _I64(g * per))], inbounds=True), _I64.as_pointer())
            word = builder.load(p, align=ity.bitwidth // 8)
            for i in range(per):
                ix = builder.trunc(builder.lshr(word, _I64(i * ity.bitwidth)) if i else word, iw)
                ptrs.append(builder.gep(yp, [row_of(ix)], inbounds=True))
                yv = builder.insert_element(yv, builder.load(ptrs[-1], align=4), _I32(len(ptrs) - 1))
        if quant:
            vi8 = llvmir.VectorType(llvmir.IntType(8), _W)
            wv = builder.sitofp(builder.load(builder.bitcast(builder.gep(vb, [t], inbounds=True), vi8.as_pointer()),
                                             align=1), _VF)
        else:
            wv = builder.load(builder.bitcast(builder.gep(vb, [t], inbounds=True), _VF.as_pointer()), align=4)
        yv = builder.call(fmuladd, [wv, xv, yv])
        for i in range(_W):
            builder.store(builder.extract_element(yv, _I32(i)), ptrs[i], align=4)
        tn = builder.add(t, _I64(8))
        t.add_incoming(tn, loop)
        builder.cbranch(builder.icmp_signed("<", tn, n8), loop, after)
        builder.position_at_end(after)
        # the tail, one by one
        tail = builder.append_basic_block("scol.tail")
        done = builder.append_basic_block("scol.done")
        builder.cbranch(builder.icmp_signed("<", n8, nn), tail, done)
        builder.position_at_end(tail)
        u = builder.phi(_I64)
        u.add_incoming(n8, after)
        ix = builder.load(builder.gep(rb, [u], inbounds=True), align=ity.bitwidth // 8)
        yp_u = builder.gep(yp, [row_of(ix)], inbounds=True)
        w = builder.load(builder.gep(vb, [u], inbounds=True))
        w = builder.sitofp(w, _F32) if quant else w
        fm1 = cgutils.get_or_insert_function(builder.module, llvmir.FunctionType(_F32, [_F32, _F32, _F32]),
                                             "llvm.fmuladd.f32")
        builder.store(builder.call(fm1, [w, xi_, builder.load(yp_u, align=4)]), yp_u, align=4)
        un = builder.add(u, _I64(1))
        u.add_incoming(un, tail)
        builder.cbranch(builder.icmp_signed("<", un, nn), tail, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.none(y, rows, ro, vals, vo, n, xi), codegen


@intrinsic
def qchunk(typingctx, src, dst, d0, d1, d2, d3, idx, ie, w, we, n, first, fin, c0, c1, c2, c3, tb):
    """One quad of an input-tiled layer over one chunk (``_tiled_rows``): for lanes q < 4,
    ``dst[d_q : d_q + tb] = (0 if first else dst[d_q : d_q + tb]) + sum_t w[we + 4t + q] * src[idx[ie + 4t + q] * tb
    : ... + tb]`` for t < n, each lane's sum in one ``tb``-float vector register set from the first slot to the
    last. (Written in Numba, the accumulators went through the stack at every chunk: the 784x1024 layer at batch
    32 took 71-75 us on one thread and gained nothing on two; this kernel 70.5 us, and 1.2x on two; C intrinsics
    66.) Every FMA adds to the sum before it in
    slot order, as ``_panel_rows`` does: bitwise the same sums. ``fin`` 1 adds the bias ``c_q`` to lane q before
    the store, 2 also applies ReLU (``_panel_rows``'s ``max(c + a, 0)``); 0 stores the partial sums. ``first``
    (0 or 1), ``fin`` and ``tb`` are compile-time constants: each call site compiles its own loop."""
    if not (isinstance(src, types.Array) and src.dtype == types.float32 and isinstance(dst, types.Array)
            and dst.dtype == types.float32 and isinstance(idx, types.Array) and idx.dtype in (types.int16, types.int32)
            and isinstance(w, types.Array) and w.dtype == types.float32 and isinstance(tb, types.IntegerLiteral)
            and isinstance(first, types.IntegerLiteral) and isinstance(fin, types.IntegerLiteral)):
        return None
    lanes, first_chunk, finish = tb.literal_value, bool(first.literal_value), fin.literal_value

    def codegen(context, builder, sig, args):
        prefer_512_bit_vectors(builder.function)
        sa, da, d0_, d1_, d2_, d3_, ia, ie_, wa, we_, n_, first_, fin_, c0_, c1_, c2_, c3_, _ = args
        st, dt_, t0, t1, t2, t3, it, iet, wt, wet, nt, ft, fint, ct0, ct1, ct2, ct3, _ = sig.args
        vt = llvmir.VectorType(_F32, lanes)
        sp = context.make_array(st)(context, builder, sa).data
        dp = context.make_array(dt_)(context, builder, da).data
        ib = builder.gep(context.make_array(it)(context, builder, ia).data,
                         [context.cast(builder, ie_, iet, types.intp)], inbounds=True)
        wb = builder.gep(context.make_array(wt)(context, builder, wa).data,
                         [context.cast(builder, we_, wet, types.intp)], inbounds=True)
        nn = context.cast(builder, n_, nt, types.intp)
        fmuladd = cgutils.get_or_insert_function(builder.module, llvmir.FunctionType(vt, [vt, vt, vt]),
                                                 f"llvm.fmuladd.v{lanes}f32")

        rows = []
        for d, t in ((d0_, t0), (d1_, t1), (d2_, t2), (d3_, t3)):
            p = builder.bitcast(builder.gep(dp, [context.cast(builder, d, t, types.intp)], inbounds=True),
                                vt.as_pointer())
            rows.append(p)
        init = [llvmir.Constant(vt, None) if first_chunk else builder.load(p, align=4) for p in rows]
        pre = builder.basic_block
        loop = builder.append_basic_block("qchunk.loop")
        done = builder.append_basic_block("qchunk.done")
        builder.cbranch(builder.icmp_signed(">", nn, _I64(0)), loop, done)
        builder.position_at_end(loop)
        t = builder.phi(_I64)
        t.add_incoming(_I64(0), pre)
        acc = []
        for q in range(4):
            a = builder.phi(vt)
            a.add_incoming(init[q], pre)
            acc.append(a)
        new = []
        for q in range(4):
            e = builder.add(builder.mul(t, _I64(4)), _I64(q))
            ix = builder.load(builder.gep(ib, [e], inbounds=True))
            ix = builder.mul(builder.sext(ix, _I64), _I64(lanes))
            xv = builder.load(builder.bitcast(builder.gep(sp, [ix], inbounds=True), vt.as_pointer()), align=4)
            wv = builder.load(builder.gep(wb, [e], inbounds=True), align=4)
            new.append(builder.call(fmuladd, [_splat(builder, wv, lanes), xv, acc[q]]))
        tn = builder.add(t, _I64(1))
        t.add_incoming(tn, loop)
        for q in range(4):
            acc[q].add_incoming(new[q], loop)
        builder.cbranch(builder.icmp_signed("<", tn, nn), loop, done)
        builder.position_at_end(done)
        outs = [builder.phi(vt) for _ in range(4)]
        for q in range(4):
            outs[q].add_incoming(init[q], pre)
            outs[q].add_incoming(new[q], loop)
        zv = llvmir.Constant(vt, None)
        for q, (c_, ct) in enumerate(((c0_, ct0), (c1_, ct1), (c2_, ct2), (c3_, ct3))):
            y = outs[q]
            if finish:
                y = builder.fadd(_splat(builder, context.cast(builder, c_, ct, types.float32), lanes), y)
            if finish == 2:  # max(y, 0) as Numba computes it: NaN stays NaN
                y = builder.select(builder.fcmp_ordered("<", y, zv), zv, y)
            builder.store(y, rows[q], align=4)
        return context.get_dummy_value()

    return types.none(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, first, fin, c0, c1, c2, c3, tb), codegen


# ------------------------------------------------------------------ shared pieces
@njit(inline="always")
def _activate(y, act):
    if act == ACT_RELU:
        return max(y, np.float32(0))
    if act == ACT_GELU:
        return np.float32(0.5 * y * (1.0 + math.erf(y * 0.7071067811865476)))
    return y


def _make_rows_block(dense):
    """_rows_block for dense or condensed rows (a constant of the compiled loop)."""

    def _rows_block(src, S, dst, DS, B, j0, j1, idx, ioff, vals, voff, vstride, scale, bias, act, kp):
        """dst[b * DS + j] = act(bias[j] + dot_j(src[b * S:])) for rows j0 <= j < j1 and samples b < B (rows of
        8 slots eight at a time by ``gdot8``, the same sums as ``gdot``; the rest one by one)."""
        j8 = j0 if dense or kp != 8 else j0 + (j1 - j0) // 8 * 8
        for jg in range(j0, j8, 8):
            for b in range(B):
                o = b * DS + jg
                gdot8(src, b * S, idx, ioff + jg * 8, vals, voff + jg * vstride, vstride, scale, jg, bias, act, dst, o)
                if act == ACT_GELU:
                    for r in range(8):
                        dst[np.uint64(o + r)] = _activate(dst[np.uint64(o + r)], act)
        if B == 1:  # the latency case without the loop over samples (~7 % of a fan-in-80 layer, measured)
            for j in range(j8, j1):
                if dense:
                    s = cdot(src, 0, vals, voff + j * vstride, _at(scale, j), kp)
                else:
                    s = gdot(src, 0, idx, ioff + j * kp, vals, voff + j * vstride, _at(scale, j), kp)
                dst[np.uint64(j)] = _activate(_at(bias, j) + s, act)
            return
        for j in range(j8, j1):
            sc = _at(scale, j)
            bj = _at(bias, j)
            r = voff + j * vstride
            for b in range(B):
                if dense:
                    s = cdot(src, b * S, vals, r, sc, kp)
                else:
                    s = gdot(src, b * S, idx, ioff + j * kp, vals, r, sc, kp)
                dst[np.uint64(b * DS + j)] = _activate(bj + s, act)

    return njit(**_FAST)(_rows_block)


_rows_block_sparse = _make_rows_block(False)
_rows_block_dense = _make_rows_block(True)


@njit(**_FAST)
def _layer_rows(tab, l, src, S, dst, DS, B, j0, j1, i16, i32, f32, q8, q4):
    """Rows j0..j1 of layer l in the rows form: the branches on index and value kinds, then _rows_block."""
    kp = tab[l, F_KP]
    dense = tab[l, F_DENSE] != 0
    ioff = tab[l, F_IOFF]
    voff = tab[l, F_VOFF]
    vk = tab[l, F_VK]
    act = tab[l, F_ACT]
    so = tab[l, F_SOFF]
    scale = f32[so:so + tab[l, F_NOUT]]
    bo = tab[l, F_BOFF]
    bias = f32[bo:bo + tab[l, F_NOUT]]
    if dense:
        if vk == VK_F32:
            _rows_block_dense(src, S, dst, DS, B, j0, j1, i16, ioff, f32, voff, kp, scale, bias, act, kp)
        elif vk == VK_I8:
            _rows_block_dense(src, S, dst, DS, B, j0, j1, i16, ioff, q8, voff, kp, scale, bias, act, kp)
        else:
            _rows_block_dense(src, S, dst, DS, B, j0, j1, i16, ioff, q4, voff, kp >> 1, scale, bias, act, kp)
    elif tab[l, F_IK] == 0:
        if vk == VK_F32:
            _rows_block_sparse(src, S, dst, DS, B, j0, j1, i16, ioff, f32, voff, kp, scale, bias, act, kp)
        elif vk == VK_I8:
            _rows_block_sparse(src, S, dst, DS, B, j0, j1, i16, ioff, q8, voff, kp, scale, bias, act, kp)
        else:
            _rows_block_sparse(src, S, dst, DS, B, j0, j1, i16, ioff, q4, voff, kp >> 1, scale, bias, act, kp)
    else:
        if vk == VK_F32:
            _rows_block_sparse(src, S, dst, DS, B, j0, j1, i32, ioff, f32, voff, kp, scale, bias, act, kp)
        elif vk == VK_I8:
            _rows_block_sparse(src, S, dst, DS, B, j0, j1, i32, ioff, q8, voff, kp, scale, bias, act, kp)
        else:
            _rows_block_sparse(src, S, dst, DS, B, j0, j1, i32, ioff, q4, voff, kp >> 1, scale, bias, act, kp)


def _make_scatter(dense):
    """_scatter for a layer's transposed copy: CSC columns (condensed) or W^T (dense)."""

    def _scatter(src, xo, y, nz, no, m, rows, ro, cptr, po, vals, vo, n_out):
        """y[0:n_out] = sum over the m non-zero inputs i = nz[no + q] of column i times src[xo + i]."""
        for j in range(n_out):
            y[np.uint64(j)] = 0
        for q in range(m):
            i = np.intp(_at(nz, no + q))
            xi = _at(src, xo + i)
            if dense:
                c = vo + i * n_out
                for j in range(n_out):
                    y[np.uint64(j)] = _at(y, j) + np.float32(_at(vals, c + j)) * xi
            else:
                e0 = _at(cptr, po + i)
                scol(y, rows, ro + e0, vals, vo + e0, _at(cptr, po + i + 1) - e0, xi)

    return njit(**_FAST)(_scatter)


_scatter_sparse = _make_scatter(False)
_scatter_dense = _make_scatter(True)


@njit(**_FAST)
def _layer_scatter(tab, l, src, S, dst, DS, B, nz, counts, i16, i32, f32, q8, cptr):
    """Layer l in the rows form by columns: each sample's non-zero inputs (nz, counts) scatter their
    column of the transposed copy into the sample's outputs, then bias, scale (quantized layers: the
    integers were summed) and activation. Same result as the gather to rounding, work ~ non-zeros."""
    n_out = tab[l, F_NOUT]
    kind = tab[l, F_CSC]
    cvk = tab[l, F_CVK]
    cvo = tab[l, F_CVOFF]
    cro = tab[l, F_CROFF]
    cpo = tab[l, F_CPOFF]
    act = tab[l, F_ACT]
    so = tab[l, F_SOFF]
    bo = tab[l, F_BOFF]
    for b in range(B):
        y = dst[b * DS:b * DS + n_out]
        m = counts[b]
        if kind == CSC_DENSE:
            if cvk == VK_F32:
                _scatter_dense(src, b * S, y, nz, b * S, m, i16, cro, cptr, cpo, f32, cvo, n_out)
            else:
                _scatter_dense(src, b * S, y, nz, b * S, m, i16, cro, cptr, cpo, q8, cvo, n_out)
        elif tab[l, F_CIK] == 0:
            if cvk == VK_F32:
                _scatter_sparse(src, b * S, y, nz, b * S, m, i16, cro, cptr, cpo, f32, cvo, n_out)
            else:
                _scatter_sparse(src, b * S, y, nz, b * S, m, i16, cro, cptr, cpo, q8, cvo, n_out)
        else:
            if cvk == VK_F32:
                _scatter_sparse(src, b * S, y, nz, b * S, m, i32, cro, cptr, cpo, f32, cvo, n_out)
            else:
                _scatter_sparse(src, b * S, y, nz, b * S, m, i32, cro, cptr, cpo, q8, cvo, n_out)
        for j in range(n_out):
            y[np.uint64(j)] = _activate(_at(f32, bo + j) + _at(f32, so + j) * _at(y, j), act)


def _rows_forward(x, out, wa, wb, nz, S, rb, sd, tab, i16, i32, f32, q8, q4, cptr):
    """The forward in the rows form: x (B, n_in) -> out (B, n_out); wa, wb (B * S) activation buffers, nz
    (B * S + B) int32 scratch; the rows of a layer in blocks of ``rb`` (one task each). A layer with a
    transposed copy whose inputs are mostly zero (ReLU) runs as a scatter of its non-zero inputs instead, on the
    calling thread: a dense layer's (W^T) from ``SCATTER_DENSITY`` non-zero inputs down, a condensed layer's
    (CSC columns, ~1.9x a gathered weight) from ``sd`` down (< 0: never). The caller passes the same ``sd`` to
    the serial and the parallel twin, so that both compute the same sums."""
    B = x.shape[0]
    L = tab.shape[0]
    n0 = tab[0, F_NIN]
    xf = x.reshape(-1)
    for b in range(B):  # x into rows of S floats, the sentinel and padding zero
        for i in range(n0):
            wa[np.uint64(b * S + i)] = _at(xf, b * n0 + i)
        for i in range(n0, S):
            wa[np.uint64(b * S + i)] = 0
    outf = out.reshape(-1)
    counts = nz[B * S:]
    for l in range(L):
        src = wa if l % 2 == 0 else wb
        dst = wb if l % 2 == 0 else wa
        n_in = tab[l, F_NIN]
        n_out = tab[l, F_NOUT]
        last = l == L - 1
        scatter = False
        if tab[l, F_CSC] != CSC_NONE:
            total = 0
            for b in range(B):  # the non-zero inputs of each sample, branch-free
                m = 0
                for i in range(n_in):
                    nz[np.uint64(b * S + m)] = i
                    m += _at(src, b * S + i) != 0
                counts[np.uint64(b)] = m
                total += m
            # the columns of a dense W^T are contiguous runs (vectorized): they always pay from half zeros on
            lim = SCATTER_DENSITY if tab[l, F_CSC] == CSC_DENSE else sd
            scatter = total <= lim * B * n_in
        if scatter:
            if last:
                _layer_scatter(tab, l, src, S, outf, n_out, B, nz, counts, i16, i32, f32, q8, cptr)
            else:
                _layer_scatter(tab, l, src, S, dst, S, B, nz, counts, i16, i32, f32, q8, cptr)
        else:
            nblk = (n_out + rb - 1) // rb
            for blk in prange(nblk):
                j0 = blk * rb
                j1 = min(n_out, j0 + rb)
                if last:
                    _layer_rows(tab, l, src, S, outf, n_out, B, j0, j1, i16, i32, f32, q8, q4)
                else:
                    _layer_rows(tab, l, src, S, dst, S, B, j0, j1, i16, i32, f32, q8, q4)
        if not last:
            for b in range(B):  # sentinel and padding of the new activations
                for i in range(n_out, min(S, n_out + 16)):
                    dst[np.uint64(b * S + i)] = 0


def _make_panel_rows(dense):
    """_panel_rows for dense or condensed rows (a constant of the compiled loop: no branch inside it)."""

    def _panel_rows(src, dst, j0, j1, idx, ioff, kp, k, w, wb, bias, act):
        """Rows j0..j1 of one panel: dst[j * TB + s] = act(bias[j] + sum_t w_jt * src[idx_jt * TB + s]) with
        row j's weights at w[wb + (j - j0) * kp + t], t < k."""
        a0 = numba.carray(stack_buffer(TB, src.dtype), (TB,))
        a1 = numba.carray(stack_buffer(TB, src.dtype), (TB,))
        a2 = numba.carray(stack_buffer(TB, src.dtype), (TB,))
        a3 = numba.carray(stack_buffer(TB, src.dtype), (TB,))
        for jq in range(j0, j1, 4):
            q0 = jq
            q1 = min(jq + 1, j1 - 1)  # past the end: repeat the last row (same result, written twice)
            q2 = min(jq + 2, j1 - 1)
            q3 = min(jq + 3, j1 - 1)
            e0 = ioff + q0 * kp
            e1 = ioff + q1 * kp
            e2 = ioff + q2 * kp
            e3 = ioff + q3 * kp
            w0 = wb + (q0 - j0) * kp
            w1 = wb + (q1 - j0) * kp
            w2 = wb + (q2 - j0) * kp
            w3 = wb + (q3 - j0) * kp
            # slot 0 peeled: it sets the accumulators (zeroing them through memory cost a store-forwarding stall)
            v0 = _at(w, w0)
            v1 = _at(w, w1)
            v2 = _at(w, w2)
            v3 = _at(w, w3)
            if dense:
                r0 = 0
                r1 = 0
                r2 = 0
                r3 = 0
            else:
                r0 = np.intp(_at(idx, e0)) * TB
                r1 = np.intp(_at(idx, e1)) * TB
                r2 = np.intp(_at(idx, e2)) * TB
                r3 = np.intp(_at(idx, e3)) * TB
            for s in range(TB):
                a0[s] = v0 * _at(src, r0 + s)
                a1[s] = v1 * _at(src, r1 + s)
                a2[s] = v2 * _at(src, r2 + s)
                a3[s] = v3 * _at(src, r3 + s)
            for t in range(1, k):
                v0 = _at(w, w0 + t)
                v1 = _at(w, w1 + t)
                v2 = _at(w, w2 + t)
                v3 = _at(w, w3 + t)
                if dense:
                    r0 = t * TB
                    r1 = r0
                    r2 = r0
                    r3 = r0
                else:
                    r0 = np.intp(_at(idx, e0 + t)) * TB
                    r1 = np.intp(_at(idx, e1 + t)) * TB
                    r2 = np.intp(_at(idx, e2 + t)) * TB
                    r3 = np.intp(_at(idx, e3 + t)) * TB
                for s in range(TB):
                    a0[s] += v0 * _at(src, r0 + s)
                    a1[s] += v1 * _at(src, r1 + s)
                    a2[s] += v2 * _at(src, r2 + s)
                    a3[s] += v3 * _at(src, r3 + s)
            c0 = _at(bias, q0)
            c1 = _at(bias, q1)
            c2 = _at(bias, q2)
            c3 = _at(bias, q3)
            if act == ACT_RELU:  # one branch per quad, then straight vector code
                for s in range(TB):
                    dst[np.uint64(q0 * TB + s)] = max(c0 + a0[s], np.float32(0))
                    dst[np.uint64(q1 * TB + s)] = max(c1 + a1[s], np.float32(0))
                    dst[np.uint64(q2 * TB + s)] = max(c2 + a2[s], np.float32(0))
                    dst[np.uint64(q3 * TB + s)] = max(c3 + a3[s], np.float32(0))
            elif act == ACT_NONE:
                for s in range(TB):
                    dst[np.uint64(q0 * TB + s)] = c0 + a0[s]
                    dst[np.uint64(q1 * TB + s)] = c1 + a1[s]
                    dst[np.uint64(q2 * TB + s)] = c2 + a2[s]
                    dst[np.uint64(q3 * TB + s)] = c3 + a3[s]
            else:
                for s in range(TB):
                    dst[np.uint64(q0 * TB + s)] = _activate(c0 + a0[s], act)
                    dst[np.uint64(q1 * TB + s)] = _activate(c1 + a1[s], act)
                    dst[np.uint64(q2 * TB + s)] = _activate(c2 + a2[s], act)
                    dst[np.uint64(q3 * TB + s)] = _activate(c3 + a3[s], act)

    return njit(**_FAST)(_panel_rows)


_panel_rows_sparse = _make_panel_rows(False)
_panel_rows_dense = _make_panel_rows(True)


@njit(**_FAST)
def _tiled_rows(src, dst, g0, g1, nc, qs, qoff, perm, poff, idx, ioff, w, woff, bias, act):
    """Quads g0..g1 of an input-tiled layer (``Layout._tiled``) for one panel, chunk after chunk of its inputs,
    so that the chunk's part of the block stays in L1 while every quad reads it. Quad g's slots in chunk c are
    ``qs[qoff + g * nc + c]`` up to the next entry, four lanes each (rows ``perm[poff + 4 g + lane]``; the
    last quad repeats its last row); a lane with fewer slots there reads the sentinel with weight 0. The
    partial sums wait in ``dst`` between chunks (``qchunk``); bias and activation follow the last chunk. Each
    row adds the same products in the same order as ``_panel_rows``: bitwise the same outputs."""
    for c in range(nc):
        for g in range(g0, g1):
            q0 = np.intp(_at(perm, poff + 4 * g))
            q1 = np.intp(_at(perm, poff + 4 * g + 1))
            q2 = np.intp(_at(perm, poff + 4 * g + 2))
            q3 = np.intp(_at(perm, poff + 4 * g + 3))
            t0 = np.intp(_at(qs, qoff + g * nc + c))
            t1 = np.intp(_at(qs, qoff + g * nc + c + 1))
            d0, d1, d2, d3, ie, we, n = q0 * TB, q1 * TB, q2 * TB, q3 * TB, ioff + 4 * t0, woff + 4 * t0, t1 - t0
            b0, b1, b2, b3 = _at(bias, q0), _at(bias, q1), _at(bias, q2), _at(bias, q3)
            last = c == nc - 1
            if c == 0:  # (nc >= 2: the first chunk is never the last)
                qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 1, 0, b0, b1, b2, b3, TB)
            elif not last:
                qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 0, 0, b0, b1, b2, b3, TB)
            elif act == ACT_RELU:
                qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 0, 2, b0, b1, b2, b3, TB)
            else:
                qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 0, 1, b0, b1, b2, b3, TB)
            if not last or act == ACT_RELU or act == ACT_NONE:
                continue
            for lane in range(4):  # another activation, after the bias
                q = np.intp(_at(perm, poff + 4 * g + lane))
                if lane > 0 and q == np.intp(_at(perm, poff + 4 * g + lane - 1)):
                    break  # the padding of the last quad: its row is done
                for s in range(TB):
                    dst[np.uint64(q * TB + s)] = _activate(dst[np.uint64(q * TB + s)], act)


@njit(**_FAST)
def _layer_panel(tab, l, src, dst, j0, j1, i16, i32, f32, q8, q4, wbuf):
    """Rows j0..j1 of layer l for one panel (quantized rows dequantized JB at a time into wbuf)."""
    n_out = tab[l, F_NOUT]
    k = tab[l, F_K]
    kp = tab[l, F_KP]
    dense = tab[l, F_DENSE] != 0
    ioff = tab[l, F_IOFF]
    vk = tab[l, F_VK]
    voff = tab[l, F_VOFF]
    act = tab[l, F_ACT]
    bo = tab[l, F_BOFF]
    bias = f32[bo:bo + n_out]
    nc = tab[l, F_TNC]
    if nc > 0:  # j0 is a multiple of JB: whole quads
        g0, g1 = j0 // 4, (j1 + 3) // 4
        qo, po, to, wo = tab[l, F_TQOFF], tab[l, F_TPOFF], tab[l, F_TIOFF], tab[l, F_TWOFF]
        if tab[l, F_IK] == 0:
            _tiled_rows(src, dst, g0, g1, nc, i32, qo, i32, po, i16, to, f32, wo, bias, act)
        else:
            _tiled_rows(src, dst, g0, g1, nc, i32, qo, i32, po, i32, to, f32, wo, bias, act)
        return
    for c0 in range(j0, j1, JB):
        c1 = min(j1, c0 + JB)
        if vk == VK_F32:
            w = f32
            wb = voff + c0 * kp
        else:
            if vk == VK_I8:
                dequantize_rows_int8(q8, voff, f32, tab[l, F_SOFF], c0, c1, kp, wbuf)
            else:
                dequantize_rows_int4(q4, voff, f32, tab[l, F_SOFF], c0, c1, kp, wbuf)
            w = wbuf
            wb = 0
        if dense:
            _panel_rows_dense(src, dst, c0, c1, i16, ioff, kp, k, w, wb, bias, act)
        elif tab[l, F_IK] == 0:
            _panel_rows_sparse(src, dst, c0, c1, i16, ioff, kp, k, w, wb, bias, act)
        else:
            _panel_rows_sparse(src, dst, c0, c1, i32, ioff, kp, k, w, wb, bias, act)


@njit(**_FAST)
def _pack_panel(x, p, nb, blk, n):
    """blk[i * TB + s] = x[p * TB + s, i] for s < nb, 0 for the lanes past the batch and for row n."""
    xf = x.reshape(-1)
    b0 = p * TB
    n8 = n & ~7
    s8 = nb & ~7
    for i0 in range(0, n8, 8):
        for s0 in range(0, s8, 8):
            transpose8(xf, (b0 + s0) * n + i0, n, blk, i0 * TB + s0, TB)
    for s in range(s8, nb):
        for i in range(n8):
            blk[i * TB + s] = xf[(b0 + s) * n + i]
    for s in range(nb):
        for i in range(n8, n):
            blk[i * TB + s] = xf[(b0 + s) * n + i]
    for i in range(n + 1):
        for s in range(nb, TB):
            blk[i * TB + s] = 0
    for s in range(nb):
        blk[n * TB + s] = 0


@njit(**_FAST)
def _unpack_panel(blk, out, p, nb, n):
    """out[p * TB + s, j] = blk[j * TB + s] for s < nb (out flat, rows of n)."""
    b0 = p * TB
    n8 = n & ~7
    s8 = nb & ~7
    for s0 in range(0, s8, 8):
        for j0 in range(0, n8, 8):
            transpose8(blk, j0 * TB + s0, TB, out, (b0 + s0) * n + j0, n)
    for s in range(s8, nb):
        for j in range(n8):
            out[(b0 + s) * n + j] = blk[j * TB + s]
    for s in range(nb):
        for j in range(n8, n):
            out[(b0 + s) * n + j] = blk[j * TB + s]


@njit(**_FAST)
def _nonfinite(blk, n):
    """1 if blk[:n] holds NaN or Inf, else 0 (``all_finite``'s test on a packed input block, hot in cache: the
    panel drivers scan their input as they pack it, in parallel, instead of ``predict`` scanning x first --
    SRigL-90 % MLP at batch 256 on the Intel Xeon: ~37 us on one thread before the call)."""
    return 0 if all_finite(blk[:n]) else 1


def _panels_forward(x, out, ws, wq, tab, i16, i32, f32, q8, q4, cptr):
    """The forward in panels, each panel through all the layers: ws (n_panels, 2, block) activation blocks,
    wq (n_panels, JB * max kp) dequantization buffers. Returns the number of panels whose input holds NaN or Inf
    (computed through all the same)."""
    B = x.shape[0]
    L = tab.shape[0]
    outf = out.reshape(-1)
    n_panels = (B + TB - 1) // TB
    bad = 0
    for p in prange(n_panels):
        nb = min(TB, B - p * TB)
        a = ws[p, 0]
        c = ws[p, 1]
        wbuf = wq[p]
        _pack_panel(x, p, nb, a, tab[0, F_NIN])
        bad += _nonfinite(a, tab[0, F_NIN] * TB)
        for l in range(L):
            n_out = tab[l, F_NOUT]
            if l % 2 == 0:
                _layer_panel(tab, l, a, c, 0, n_out, i16, i32, f32, q8, q4, wbuf)
                for s in range(TB):
                    c[n_out * TB + s] = 0
            else:
                _layer_panel(tab, l, c, a, 0, n_out, i16, i32, f32, q8, q4, wbuf)
                for s in range(TB):
                    a[n_out * TB + s] = 0
        _unpack_panel(ws[p, L % 2], outf, p, nb, tab[L - 1, F_NOUT])
    return bad


@njit(**_FAST)
def _layerwise_task(tab, l, ws, wq, task, nrb, i16, i32, f32, q8, q4):
    """Task ``task`` of layer l in _panels_layerwise: JB rows of one panel (the panel's sentinel row after the
    last block)."""
    n_out = tab[l, F_NOUT]
    p = task // nrb
    j0 = (task % nrb) * JB
    j1 = min(n_out, j0 + JB)
    dst = ws[p, 1 - l % 2]
    _layer_panel(tab, l, ws[p, l % 2], dst, j0, j1, i16, i32, f32, q8, q4, wq[task])
    if j1 == n_out:
        for s in range(TB):
            dst[n_out * TB + s] = 0


def _panels_layerwise(x, out, ws, wq, tab, i16, i32, f32, q8, q4, cptr):
    """The forward in panels, layer after layer, each layer's (panel, block of JB rows) tasks in parallel;
    wq (n_tasks_max, JB * max kp) dequantization buffers, one per task of a layer. Work of a single task
    (the packing and unpacking of a single panel, a layer of at most JB rows) runs on the calling thread: a
    parallel region costs ~2.6 us to open and close on the 2-core reference machine, and the SRigL-90 % MLP
    at batch 32 would otherwise open three that have nothing to share. Returns what ``_panels_forward`` does."""
    B = x.shape[0]
    L = tab.shape[0]
    outf = out.reshape(-1)
    n_panels = (B + TB - 1) // TB
    n_in = tab[0, F_NIN]
    bad = 0
    if n_panels == 1:
        _pack_panel(x, 0, B, ws[0, 0], n_in)
        bad += _nonfinite(ws[0, 0], n_in * TB)
    else:
        for p in prange(n_panels):
            _pack_panel(x, p, min(TB, B - p * TB), ws[p, 0], n_in)
            bad += _nonfinite(ws[p, 0], n_in * TB)
    for l in range(L):
        nrb = (tab[l, F_NOUT] + JB - 1) // JB
        if n_panels * nrb == 1:
            _layerwise_task(tab, l, ws, wq, 0, 1, i16, i32, f32, q8, q4)
        else:
            for task in prange(n_panels * nrb):
                _layerwise_task(tab, l, ws, wq, task, nrb, i16, i32, f32, q8, q4)
    if n_panels == 1:
        _unpack_panel(ws[0, L % 2], outf, 0, B, tab[L - 1, F_NOUT])
    else:
        for p in prange(n_panels):
            _unpack_panel(ws[p, L % 2], outf, p, min(TB, B - p * TB), tab[L - 1, F_NOUT])
    return bad


rows_forward, rows_forward_serial = twins(_rows_forward, _FAST)
panels_forward, panels_forward_serial = twins(_panels_forward, _FAST)
panels_layerwise = twins(_panels_layerwise, _FAST, serial=False)  # its serial twin is panels_forward_serial


def _half_family():
    """The panel drivers again with panels of ``TBH`` = TB / 2 samples: the same bodies compiled with the
    constant TB swapped (``_jit.clone``), so a batch of 4-16 does not pay for a 32-sample panel (SRigL-90 % MLP
    784-1024-1024-10, serial: batch 8 123 -> 78 us, measured). Each sample's output is computed by the same
    arithmetic as in a full panel (a lane's sums do not depend on the panel width): bitwise the same results."""
    swap = {"TB": TBH}
    for name in ("_panel_rows_sparse", "_panel_rows_dense", "_tiled_rows", "_pack_panel", "_unpack_panel"):
        swap[name] = njit(**_FAST)(clone(globals()[name], "_half", swap))
    swap["_layer_panel"] = njit(**_FAST)(clone(_layer_panel, "_half", swap))
    swap["_layerwise_task"] = njit(**_FAST)(clone(_layerwise_task, "_half", swap))
    return (njit(**_FAST)(clone(_panels_forward, "_half_serial", swap)),
            njit(parallel=True, **_FAST)(clone(_panels_layerwise, "_half", swap)),
            njit(parallel=True, **_FAST)(clone(_panels_forward, "_half", swap)))


TBH = TB // 2  # samples per panel of the half-width drivers
half_panels_serial, half_layerwise, half_panels = _half_family()


# ------------------------------------------------------------------ layout and drivers
ACTS = {"none": ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU}


def tile_chunks(n_in: int, n_out: int, k: int) -> int:
    """Input chunks of a float32 condensed layer's tiled copy (``Layout._tiled``), or 0 for none: as many as
    it takes for one chunk of a panel block to fill at most ``TILE_L1`` of L1, if that is at least 2, the
    layer has at least 4 rows and ``TILE_MIN_SLOTS`` slots a row per chunk (a quad's chunk costs ~40 cycles
    besides its slots), and both blocks (input and output) fit in a third of L2 (the partial sums are read
    and written once per chunk). Measured one thread, batch 32, Intel Xeon (48 KiB L1d, 2 MiB L2), untiled
    over tiled time: 768x3072 at 80-95 % 1.07-1.16x, at 99 % (3.3 slots) 0.88x; 3072x768 and 1024x784 at
    80-95 % 1.15-1.41x; 2048x2048 1.05-1.16x; 4096x1024 at 90-97 % 1.13-1.15x; 1024x4096 at 90 % 1.08x, at
    97 % 0.94x; 4096x4096 (1 MiB of blocks) at 80-97 % 0.71-0.97x."""
    nc = min(n_in, -(-(n_in + 1) * TB * 4 // max(1, int(TILE_L1 * l1d_bytes()))))
    if nc < 2 or n_out < 4 or k < TILE_MIN_SLOTS * nc or (n_in + 1 + n_out) * TB * 4 > l2_bytes() // 3:
        return 0
    return nc


class Layout:
    """A chain of linear layers in the kernels' flat arrays (see the module docstring).

    ``layers``: dicts with ``n_in``, ``n_out``, ``indices`` ((n_out, k) int16/int32 sorted rows, or None for a
    dense layer), either ``values`` ((n_out, k) float32) or ``qvalues`` ((n_out, k) int8) with ``scale``
    ((n_out,) float32) and ``bits`` (8 or 4), ``bias`` ((n_out,) float32 or None), ``act`` ('none', 'relu',
    'gelu') and optionally ``active`` ((n_out,) bool or None: inactive rows output their bias).
    The arrays are copied; nothing is validated here (the runtime validated the plan).

    ``scatter``: also keep a transposed copy (CSC columns, or W^T for a dense layer) of every layer that
    follows a ReLU layer, for the rows form's zero-skipping scatter (float32 weights, or the int8 integers
    of a quantized layer -- 4-bit ones widened to a byte -- summed then scaled once per output).
    """

    def __init__(self, layers, scatter: bool = False):
        rows = []
        sizes = {"i16": 0, "i32": 0, "f32": 0, "q8": 0, "q4": 0, "cptr": 0}
        parts = {name: [] for name in sizes}

        def put(name, a):
            a = np.ascontiguousarray(a).reshape(-1)
            off = sizes[name]
            parts[name].append(a)
            n = a.size + (-a.size) % 16  # every block starts on 64 bytes
            if n > a.size:
                parts[name].append(np.zeros(n - a.size, a.dtype))
            sizes[name] += n
            return off

        self.widths = [int(layers[0]["n_in"])]
        self.macs = 0
        kp_max = 8
        prev_act = None
        for spec in layers:
            n_in, n_out = int(spec["n_in"]), int(spec["n_out"])
            idx = spec.get("indices")
            dense = idx is None
            k = n_in if dense else int(idx.shape[1])
            kp = (k + 7) // 8 * 8
            if spec.get("values") is None:  # quantized: its rows are dequantized into a buffer of JB * kp
                kp_max = max(kp_max, kp)
            active = spec.get("active")
            active = None if active is None else np.asarray(active, bool)
            row = np.zeros(NF, np.int64)
            row[[F_NIN, F_NOUT, F_K, F_KP, F_DENSE, F_ACT]] = n_in, n_out, k, kp, int(dense), ACTS[spec["act"]]
            if not dense:
                wide = n_in > np.iinfo(np.int16).max  # the sentinel n_in must fit too
                ix = np.full((n_out, kp), n_in, np.int32 if wide else np.int16)
                ix[:, :k] = idx
                if active is not None:
                    ix[~active] = n_in
                row[F_IK] = int(wide)
                row[F_IOFF] = put("i32" if wide else "i16", ix)
            if "values" in spec and spec["values"] is not None:
                v = np.zeros((n_out, kp), np.float32)
                v[:, :k] = spec["values"]
                if active is not None:
                    v[~active] = 0
                scale = np.ones(n_out, np.float32)
                row[F_VK] = VK_F32
                row[F_VOFF] = put("f32", v)
            else:
                q = np.zeros((n_out, kp), np.int8)
                q[:, :k] = spec["qvalues"]
                if active is not None:
                    q[~active] = 0
                scale = np.asarray(spec["scale"], np.float32)
                if int(spec["bits"]) == 4:
                    from fanin.kernels.lowbit import pack_nibbles
                    row[F_VK] = VK_I4
                    row[F_VOFF] = put("q4", pack_nibbles(q))
                else:
                    row[F_VK] = VK_I8
                    row[F_VOFF] = put("q8", q)
            if not dense and row[F_VK] == VK_F32:
                self._tiled(row, spec, put, active)
            if scatter and prev_act == "relu" and (not dense or n_out >= SCATTER_MIN_DENSE_OUT):
                self._transposed(row, spec, put, active)
            prev_act = spec["act"]
            row[F_SOFF] = put("f32", scale)
            bias = spec.get("bias")
            row[F_BOFF] = put("f32", np.zeros(n_out, np.float32) if bias is None else np.asarray(bias, np.float32))
            rows.append(row)
            self.widths.append(n_out)
            self.macs += n_out * k
        self.tab = np.ascontiguousarray(np.stack(rows))
        self.n_in, self.n_out = self.widths[0], self.widths[-1]
        self.kp_max = kp_max  # the widest quantized row (8 when there is none)
        self.S = row_stride(max(self.widths))
        self.block = panel_block(max(self.widths))
        self.n_layers = len(rows)

        def flat(name, dtype):
            a = aligned_zeros(sizes[name] + PAD, dtype)
            if sizes[name]:
                a[:sizes[name]] = np.concatenate(parts[name])
            return a

        self.i16, self.i32 = flat("i16", np.int16), flat("i32", np.int32)
        self.f32, self.q8, self.q4 = flat("f32", np.float32), flat("q8", np.int8), flat("q4", np.uint8)
        self.cptr = flat("cptr", np.int64)

    @staticmethod
    def _tiled(row, spec, put, active):
        """The input-tiled copy of a float32 condensed layer for the panel form (``_tiled_rows``), when one
        panel's block of its inputs overflows ``TILE_L1`` of the L1 data cache: the inputs split into ``nc``
        chunks whose part of a block fits there; the rows, in quads, run chunk after chunk. A quad is padded to
        its longest lane in each chunk, so the rows are ordered by their counts per chunk (lexicographically)
        before they are grouped: quads of alike rows pad ~2 % (~15 % in the stored order).
        784x1024 at fan-in 80, batch 32, one thread, Intel Xeon (Emerald Rapids, 48 KiB L1d): 33 -> 41 G
        multiply-adds/s in a C prototype, 32 -> 37 here; 1024x1024 at fan-in 91: 31 -> 39 (C). Which layers:
        ``tile_chunks``."""
        n_in, n_out = int(spec["n_in"]), int(spec["n_out"])
        idx = np.asarray(spec["indices"]).astype(np.int64)
        k = idx.shape[1]
        nc = tile_chunks(n_in, n_out, k)
        if not nc:
            return
        w = np.asarray(spec["values"], np.float32)
        span = -(-n_in // nc)  # inputs per chunk
        ch = idx // span
        if active is not None:
            ch[~active] = nc  # an ablated row has no slots
        cnt = np.stack([(ch == c).sum(1) for c in range(nc)], 1)  # (n_out, nc)
        order = np.lexsort(cnt[:, ::-1][:, 1:].T)  # by the count in chunk 0, then 1, ...
        lanes = np.concatenate([order, np.repeat(order[-1:], -n_out % 4)]).reshape(-1, 4)  # (G, 4) rows
        m = cnt[lanes].max(1)  # (G, nc) quad-slots per chunk
        qs = np.zeros(m.size + 1, np.int64)
        np.cumsum(m.reshape(-1), out=qs[1:])
        ti = np.full((int(qs[-1]), 4), n_in, np.int64)
        tw = np.zeros((int(qs[-1]), 4), np.float32)
        # slot t of row j goes to quad-slot qs[g * nc + c] + (its rank among row j's slots in chunk c)
        first = np.concatenate([np.zeros((n_out, 1), np.int64), np.cumsum(cnt, 1)[:, :-1]], 1)
        srt = np.argsort(ch, axis=1, kind="stable")  # chunk-major, the stored order within a chunk
        chs = np.take_along_axis(ch, srt, 1)
        rank = np.arange(k)[None, :] - np.take_along_axis(first, np.minimum(chs, nc - 1), 1)
        G = lanes.shape[0]
        for q in range(4):
            rows = lanes[:, q]
            c = chs[rows]  # (G, k)
            ok = c < nc
            dest = qs[:-1][np.arange(G)[:, None] * nc + np.minimum(c, nc - 1)] + rank[rows]
            src_slot = srt[rows]
            ti[dest[ok], q] = np.take_along_axis(idx[rows], src_slot, 1)[ok]
            tw[dest[ok], q] = np.take_along_axis(w[rows], src_slot, 1)[ok]
        wide = row[F_IK] != 0
        row[F_TNC] = nc
        row[F_TQOFF] = put("i32", qs.astype(np.int32))
        row[F_TPOFF] = put("i32", lanes.reshape(-1).astype(np.int32))
        row[F_TIOFF] = put("i32" if wide else "i16", ti.astype(np.int32 if wide else np.int16))
        row[F_TWOFF] = put("f32", tw)

    @staticmethod
    def _transposed(row, spec, put, active):
        n_in, n_out = int(spec["n_in"]), int(spec["n_out"])
        quant = spec.get("values") is None
        w = np.asarray(spec["qvalues"] if quant else spec["values"])
        w = w.astype(np.int8 if quant else np.float32)
        if spec.get("indices") is None:
            row[F_CSC] = CSC_DENSE
            row[F_CVK] = VK_I8 if quant else VK_F32
            row[F_CVOFF] = put("q8" if quant else "f32", np.ascontiguousarray(w.T))
            return
        idx = np.asarray(spec["indices"]).astype(np.int64)
        j = np.repeat(np.arange(n_out), idx.shape[1])
        keep = np.ones(idx.size, bool) if active is None else np.repeat(active, idx.shape[1])
        cols, j, vals = idx.reshape(-1)[keep], j[keep], w.reshape(-1)[keep]
        order = np.argsort(cols, kind="stable")  # by input; rows stay increasing within a column
        ptr = np.zeros(n_in + 1, np.int64)
        np.cumsum(np.bincount(cols, minlength=n_in), out=ptr[1:])
        wide = n_out > np.iinfo(np.int16).max
        row[F_CSC] = CSC_SPARSE
        row[F_CIK] = int(wide)
        row[F_CPOFF] = put("cptr", ptr)
        row[F_CROFF] = put("i32" if wide else "i16", j[order].astype(np.int32 if wide else np.int16))
        row[F_CVK] = VK_I8 if quant else VK_F32
        row[F_CVOFF] = put("q8" if quant else "f32", vals[order])

    @property
    def arrays(self):
        return self.tab, self.i16, self.i32, self.f32, self.q8, self.q4, self.cptr

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    # workspaces: what each driver needs besides x and out
    def rows_workspace(self, B):
        return aligned_zeros(B * self.S), aligned_zeros(B * self.S), aligned_zeros(B * self.S + B, np.int32)

    def panels_workspace(self, B, tb=TB):
        """(blocks, dequantization buffers) for B samples in panels of ``tb`` (TB, or TBH for the half drivers;
        a block sized for TB holds a half panel too)."""
        n = (B + tb - 1) // tb
        return aligned_zeros((n, 2, self.block)), aligned_zeros((n, JB * self.kp_max + PAD))

    def layerwise_workspace(self, B, tb=TB):
        n = (B + tb - 1) // tb
        tasks = n * ((max(self.widths[1:]) + JB - 1) // JB)
        return aligned_zeros((n, 2, self.block)), aligned_zeros((tasks, JB * self.kp_max + PAD))


PATHS = ("rows", "rows_serial", "panels", "panels_serial", "layerwise", "half_panels_serial", "half_layerwise",
         "half_panels")


@njit(cache=True, nogil=True)
def all_finite(x):
    """``np.isfinite(x).all()`` for a contiguous float32 array, without the boolean temporary: the largest
    exponent field, an integer reduction that vectorizes (NumPy's two passes and allocation cost ~1.5 us per
    ``predict`` call at batch 1, more than a 3072-row layer of fan-in 8)."""
    u = x.reshape(-1).view(np.uint32)
    m = np.uint32(0)
    for i in range(u.size):
        m = max(m, u[i] & np.uint32(0x7F800000))
    return m != np.uint32(0x7F800000)


def forward(layout: Layout, x: np.ndarray, path: str, ws=None, scatter_density: float = SCATTER_DENSITY) -> np.ndarray:
    """out (B, n_out) = the chain on x (B, n_in) C-contiguous float32, by the driver ``path`` (one of PATHS).
    ``ws``: the path's workspace (``layout.*_workspace(B)``), allocated here if None; ``scatter_density``: the
    rows form's scatter threshold (``_rows_forward``'s ``sd``)."""
    B = x.shape[0]
    out = np.empty((B, layout.n_out), np.float32)
    if path in ("rows", "rows_serial"):
        wa, wb, nz = ws if ws is not None else layout.rows_workspace(B)
        fn = rows_forward if path == "rows" else rows_forward_serial
        fn(x, out, wa, wb, nz, layout.S, RB if path == "rows" else 1 << 30, float(scatter_density), *layout.arrays)
    elif path in ("panels", "panels_serial"):
        w, wq = ws if ws is not None else layout.panels_workspace(B)
        fn = panels_forward if path == "panels" else panels_forward_serial
        fn(x, out, w, wq, *layout.arrays)
    elif path == "layerwise":
        w, wq = ws if ws is not None else layout.layerwise_workspace(B)
        panels_layerwise(x, out, w, wq, *layout.arrays)
    elif path == "half_panels_serial":
        w, wq = ws if ws is not None else layout.panels_workspace(B, TBH)
        half_panels_serial(x, out, w, wq, *layout.arrays)
    elif path == "half_layerwise":
        w, wq = ws if ws is not None else layout.layerwise_workspace(B, TBH)
        half_layerwise(x, out, w, wq, *layout.arrays)
    elif path == "half_panels":
        w, wq = ws if ws is not None else layout.panels_workspace(B, TBH)
        half_panels(x, out, w, wq, *layout.arrays)
    else:
        raise ValueError(f"forward: path must be one of {PATHS}, got {path!r}.")
    return out
