"""Int8 activations: a chain of linear layers as integer dot products of 8-bit weights and 8-bit inputs.

The float forward of ``fanin.kernels.infer`` at batch 1 is bound by its gather: each slot of a row is one
scalar load and one vector insert (~0.6 cycles a slot on the reference machine), so int8 or 4-bit weights
run no faster than float32 ones. With the inputs of a layer quantized to bytes, a whole layer's input fits in
a few 128-byte tables, and one AVX-512 VBMI byte permute (``vpermi2b``) gathers 64 slots from a table at once;
a VNNI ``vpdpbusd`` then multiplies 64 byte pairs and adds them in fours into 16 int32 lanes. That is what
``qgroups`` does (an LLVM IR kernel), ~4x faster per slot than the float gather. It is the scheme ONNX
Runtime's dynamic quantization uses (8-bit weights, activations quantized per call), so this is the mode to
compare with ONNX Runtime int8.

What it computes, per sample and per layer (``reference`` is the same in NumPy, and equal bitwise):

- the layer's input x (n floats) is quantized with a scale of its own: if min(x) >= 0 (after a ReLU),
  ``q = rint(x * (255 / max))`` in [0, 255] (zero point 0); else ``q = rint(x * (127 / a)) + 128`` in [1, 255]
  with ``a = max|x|`` (zero point 128), the products in float64; the scale ``s = max / 255`` or ``a / 127`` (float64); an all-zero
  input gives q = zero point, s = 0;
- each output r: the exact integer ``acc = sum_t w_t * q[idx_t]`` (int32; w the int8 weights), then
  ``y = float32((acc - zp * sum_t w_t) * (s * scale_r)) + bias_r`` (float64 product, one rounding), then the
  activation. Integer sums do not depend on the order: every driver, thread count and CPU gives the same bits.
- weights: a layer stored as int8 or 4-bit (``fanin export --quantize int8``, self-compression) uses its
  integers and per-neuron scales as they are -- exactly the weights of the float path; a float32 layer is
  quantized per neuron when the layout is built: ``scale = max|w| / 127``, ``w = rint(w / scale)``.
- a sample with a NaN or Inf in some layer's input gives NaN logits.

The error against the float path is that of 8-bit activations: measured on the SRigL-90 % MLP of the
benchmarks, ~1e-2 of the largest logit and the same class for ~all samples (bench/RESULTS.md).

Layout: rows in groups of 4, a row's ``k`` slots padded to ``kp`` = 16 ``T`` (weight 0, index repeated);
per group and step t, 64 bytes: 16 slots of each of the 4 rows (``[g][t][row][16]``), kept as three byte
planes -- the low 7 bits of each index, the rest (the 128-byte chunk of the input it reads), the int8
weight -- and, per step, the range of chunks its 64 slots read (sorted rows: 2-3 of 7 for 784 inputs), so
the permutes run only over chunks that occur. Inputs up to ``MAX_IN`` (the chunk number is a byte).

Without AVX-512 VBMI and VNNI (``FAST`` False: AVX2 machines) ``qgroups_portable`` computes the same integers
with scalar loops -- the same results, slower.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir as llvmir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fanin.kernels._jit import twins
from fanin.kernels.infer import ACT_GELU, ACT_RELU, ACTS, aligned_zeros

__all__ = ["QLayout", "qgroups", "qgroups_portable", "quantize_input", "forward", "forward_serial", "reference",
           "FAST", "MAX_IN", "GROUP", "STEP", "CHUNK_BYTES"]

GROUP = 4          # rows per group (one zmm of int32 lanes: 4 rows x 4 lanes)
STEP = 16          # slots of each row per step (4 rows x 16 = 64 bytes, one zmm)
CHUNK_BYTES = 128  # bytes of input one vpermi2b reads (two zmm tables)
MAX_IN = 255 * CHUNK_BYTES - 1  # inputs of a layer (the sentinel too) within 255 chunks

# layer table fields
NQ = 14
(Q_NIN, Q_NOUT, Q_G, Q_T, Q_OFF, Q_CROFF, Q_NCH, Q_SOFF, Q_BOFF, Q_WOFF, Q_ACT,
 Q_YA, Q_YB, Q_ACC) = range(NQ)  # the last three: byte offsets of a workspace row's parts (the same in every row)

_OPTS = dict(cache=True, nogil=True)


def _host_features() -> set:
    from numba.core import config

    feats = config.CPU_FEATURES
    if feats is None:
        import llvmlite.binding as ll

        feats = ll.get_host_cpu_features().flatten()
    return {f[1:] for f in feats.split(",") if f.startswith("+")}


FAST = {"avx512bw", "avx512vbmi", "avx512vnni"} <= _host_features()

# ------------------------------------------------------------------ the kernel (LLVM IR)
_I8, _I32, _I64 = llvmir.IntType(8), llvmir.IntType(32), llvmir.IntType(64)
_V64 = llvmir.VectorType(_I8, 64)
_V16 = llvmir.VectorType(_I32, 16)


def _vconst(ty, vals):
    return llvmir.Constant(llvmir.VectorType(ty, len(vals)), [llvmir.Constant(ty, v) for v in vals])


def _qgroups_codegen(context, builder, sig, args):
    def data(i):
        return context.make_array(sig.args[i])(context, builder, args[i]).data

    def intp(i):
        return context.cast(builder, args[i], sig.args[i], types.intp)

    xp, qp, crp, accp = data(0), data(1), data(2), data(7)
    off, croff, G, T = intp(3), intp(4), intp(5), intp(6)
    mod = builder.module
    perm = cgutils.get_or_insert_function(mod, llvmir.FunctionType(_V64, [_V64, _V64, _V64]),
                                          "llvm.x86.avx512.vpermi2var.qi.512")
    dpbusd = cgutils.get_or_insert_function(mod, llvmir.FunctionType(_V16, [_V16, _V16, _V16]),
                                            "llvm.x86.avx512.vpdpbusd.512")

    def vload(ptr, at):
        return builder.load(builder.bitcast(builder.gep(ptr, [at], inbounds=True), _V64.as_pointer()), align=1)

    zero = llvmir.Constant(_V16, [_I32(0)] * 16)
    entry = builder.basic_block
    g_head = builder.append_basic_block("q.group")
    t_head = builder.append_basic_block("q.step")
    c_body = builder.append_basic_block("q.chunk")
    t_tail = builder.append_basic_block("q.step.end")
    g_tail = builder.append_basic_block("q.group.end")
    done = builder.append_basic_block("q.done")
    builder.cbranch(builder.icmp_signed(">", G, _I64(0)), g_head, done)

    builder.position_at_end(g_head)
    g = builder.phi(_I64)
    g.add_incoming(_I64(0), entry)
    g_step0 = builder.mul(g, T)  # this group's first step
    builder.branch(t_head)

    builder.position_at_end(t_head)
    t = builder.phi(_I64)
    acc = builder.phi(_V16)
    t.add_incoming(_I64(0), g_head)
    acc.add_incoming(zero, g_head)
    step = builder.add(g_step0, t)
    at = builder.add(off, builder.mul(step, _I64(3 * 64)))  # a step's three planes side by side: one stream
    lo, hi, w = vload(qp, at), vload(qp, builder.add(at, _I64(64))), vload(qp, builder.add(at, _I64(128)))
    cr = builder.add(croff, builder.mul(step, _I64(2)))
    c_first = builder.zext(builder.load(builder.gep(crp, [cr], inbounds=True)), _I64)
    c_end = builder.zext(builder.load(builder.gep(crp, [builder.add(cr, _I64(1))], inbounds=True)), _I64)

    cv0 = builder.insert_element(llvmir.Constant(_V64, None), builder.trunc(c_first, _I8), _I32(0))
    cv0 = builder.shuffle_vector(cv0, cv0, _vconst(_I32, [0] * 64))
    builder.branch(c_body)

    builder.position_at_end(c_body)  # every step reads at least one chunk (c_end > c_first)
    c = builder.phi(_I64)
    cv = builder.phi(_V64)  # c in every byte (an add per chunk, not a broadcast)
    r = builder.phi(_V64)
    c.add_incoming(c_first, t_head)
    cv.add_incoming(cv0, t_head)
    r.add_incoming(llvmir.Constant(_V64, [_I8(0)] * 64), t_head)
    base = builder.mul(c, _I64(CHUNK_BYTES))
    table = builder.call(perm, [vload(xp, base), lo, vload(xp, builder.add(base, _I64(64)))])
    r_next = builder.select(builder.icmp_unsigned("==", hi, cv), table, r)
    c_next = builder.add(c, _I64(1))
    c.add_incoming(c_next, c_body)
    cv.add_incoming(builder.add(cv, _vconst(_I8, [1] * 64)), c_body)
    r.add_incoming(r_next, c_body)
    builder.cbranch(builder.icmp_signed("<", c_next, c_end), c_body, t_tail)

    builder.position_at_end(t_tail)
    acc_next = builder.call(dpbusd, [acc, builder.bitcast(r_next, _V16), builder.bitcast(w, _V16)])
    t_next = builder.add(t, _I64(1))
    t.add_incoming(t_next, t_tail)
    acc.add_incoming(acc_next, t_tail)
    builder.cbranch(builder.icmp_signed("<", t_next, T), t_head, g_tail)

    builder.position_at_end(g_tail)  # the 4 lanes of each row summed: 4 int32 sums
    a = acc_next
    s = builder.add(builder.shuffle_vector(a, a, _vconst(_I32, [0, 1, 4, 5, 8, 9, 12, 13])),
                    builder.shuffle_vector(a, a, _vconst(_I32, [2, 3, 6, 7, 10, 11, 14, 15])))
    s = builder.add(builder.shuffle_vector(s, s, _vconst(_I32, [0, 2, 4, 6])),
                    builder.shuffle_vector(s, s, _vconst(_I32, [1, 3, 5, 7])))
    dst = builder.gep(accp, [builder.mul(g, _I64(GROUP))], inbounds=True)
    builder.store(s, builder.bitcast(dst, llvmir.VectorType(_I32, 4).as_pointer()), align=4)
    g_next = builder.add(g, _I64(1))
    g.add_incoming(g_next, g_tail)
    builder.cbranch(builder.icmp_signed("<", g_next, G), g_head, done)

    builder.position_at_end(done)
    return context.get_dummy_value()


def _u8(a, dtype=types.uint8):
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == dtype


@intrinsic
def qgroups(typingctx, xq, qp, cr, off, croff, G, T, acc):
    """acc[4 g + j] = sum over the T steps of group g of w * xq[128 hi + lo] (int32, exact), for G groups
    starting at byte ``off`` of ``qp`` (per step 192 bytes: the 64 lo, the 64 hi, the 64 int8 weights) and at
    pair ``croff / 2`` of the chunk ranges ``cr``. ``xq`` holds at
    least 128 x (the largest chunk number + 1) bytes; nothing is bounds-checked (``QLayout`` guarantees it).
    Needs AVX-512 VBMI and VNNI (``FAST``); ``qgroups_portable`` is the same on any CPU."""
    if not (_u8(xq) and _u8(qp) and _u8(cr) and _u8(acc, types.int32)
            and all(isinstance(v, types.Integer) for v in (off, croff, G, T))):
        return None
    return types.void(xq, qp, cr, off, croff, G, T, acc), _qgroups_codegen


@njit(**_OPTS)
def qgroups_portable(xq, qp, cr, off, croff, G, T, acc):
    """``qgroups`` in scalar code (CPUs without AVX-512 VBMI/VNNI): the same integers."""
    for g in range(G):
        for j in range(GROUP):
            s = np.int32(0)
            for t in range(T):
                p = off + (g * T + t) * 3 * 64 + j * STEP
                for i in range(STEP):
                    w = np.int32(qp[p + 128 + i])
                    w = w - 256 if w > 127 else w  # the byte of an int8
                    s += w * np.int32(xq[np.int64(qp[p + 64 + i]) * CHUNK_BYTES + qp[p + i]])
            acc[g * GROUP + j] = s


_GROUPS = qgroups if FAST else qgroups_portable


# ------------------------------------------------------------------ quantizing a layer's input
@njit(**_OPTS)
def _quantize_range(x, n, xq, lo, hi):
    """x[:n] as bytes in xq[:n] given lo <= min(x, 0), hi >= max(x, 0): (scale, zero point)."""
    if lo >= 0:
        zp, qmax, a = 0, np.float32(255), hi
    else:
        zp, qmax, a = 128, np.float32(127), max(-lo, hi)
    if a == 0:
        for i in range(n):
            xq[i] = zp
        return 0.0, zp
    inv = np.float64(qmax) / np.float64(a)  # float64: 255 / a overflows float32 for a below ~1e-36
    for i in range(n):
        q = min(max(np.rint(np.float64(x[i]) * inv), -127.0), 255.0)
        xq[i] = np.uint8(np.int32(q) + zp)
    return np.float64(a) / np.float64(qmax), zp


@njit(inline="always")
def _key(v):
    """The int32 bits of a float mapped so that integer order is float order (NaN aside); its own inverse."""
    return v ^ ((v >> np.int32(31)) & np.int32(0x7FFFFFFF))


@njit(inline="always")
def _as_f32(v):
    """The float32 whose bits are the int32 v (no array round trip)."""
    return np.int32(v).view(np.float32)


@njit(**_OPTS)
def quantize_input(x, n, xq):
    """x[:n] as bytes in xq[:n]; returns (scale, zero point), the scale NaN when x holds a NaN or Inf
    (module docstring: zero point 0 and 255 levels when no value is negative, else 128 and +-127).
    The scan is on the bits (order-preserving integer keys): an integer min/max reduction vectorizes, a float
    one does not (0.10 vs 0.39 us for 784 inputs)."""
    bits = x[:n].view(np.int32)
    kmin = np.int32(0)
    kmax = np.int32(0)
    bad = np.int32(0)
    for i in range(n):
        v = bits[i]
        bad |= np.int32((v & np.int32(0x7F800000)) == np.int32(0x7F800000))
        k = _key(v)
        kmin = min(kmin, k)
        kmax = max(kmax, k)
    if bad:
        return np.nan, 0
    return _quantize_range(x, n, xq, _as_f32(_key(kmin)), _as_f32(_key(kmax)))


@njit(**_OPTS)
def _max_nonneg(y, n):
    """max(y[:n], 0) for values that are >= 0 or -0.0 (a ReLU's outputs), on their bit patterns: ordered like
    the floats for non-negative values, and an integer max reduction vectorizes where a float one may not."""
    bits = y[:n].view(np.int32)
    m = np.int32(0)
    for i in range(n):
        m = max(m, bits[i])
    return _as_f32(m)


@njit(inline="always")
def _activate(y, act):
    if act == ACT_RELU:
        return max(y, np.float32(0))
    if act == ACT_GELU:
        return np.float32(0.5 * y * (1.0 + math.erf(y * 0.7071067811865476)))
    return y


@njit(**_OPTS)
def _outputs(acc, zp, wsum, s, sc, bias, act, dst):
    """dst[r] = act(float32((acc[r] - zp wsum[r]) * (s sc[r])) + bias[r]); one loop per activation (a branch
    inside would keep LLVM from vectorizing it: measured 1.4 ns an output that way, ~0.1 ns this way)."""
    n = dst.shape[0]
    if act == ACT_RELU:
        for r in range(n):
            dst[r] = max(np.float32((np.float64(acc[r]) - zp * wsum[r]) * (s * sc[r])) + np.float32(bias[r]),
                         np.float32(0))
    else:
        for r in range(n):
            dst[r] = _activate(np.float32((np.float64(acc[r]) - zp * wsum[r]) * (s * sc[r])) + np.float32(bias[r]), act)


# ------------------------------------------------------------------ the driver
def _forward(x, out, ws, lt, qp, fp):
    """Every sample through every layer; workspace row w (of ``ws.shape[0]``: the input bytes, two activation
    rows, the int32 sums) takes samples w, w + W, ... Returns how many samples held a NaN or Inf (their logits
    are NaN). Few arguments: each costs ~40-70 ns a call, a tenth of a batch-1 call here."""
    B = x.shape[0]
    W = ws.shape[0]
    L = lt.shape[0]
    sc, bias, wsum = fp[0], fp[1], fp[2]  # float64 rows (bias and wsum exact: float32 and int32 values)
    bad = 0
    for w in prange(W):
        xq = ws[w, :lt[0, Q_YA]]
        ya = ws[w, lt[0, Q_YA]:lt[0, Q_YB]].view(np.float32)
        yb = ws[w, lt[0, Q_YB]:lt[0, Q_ACC]].view(np.float32)
        acc = ws[w, lt[0, Q_ACC]:].view(np.int32)
        for b in range(w, B, W):
            s, zp = quantize_input(x[b], lt[0, Q_NIN], xq)
            if np.isnan(s):
                out[b, :] = np.nan
                bad += 1
                continue
            for layer in range(L):
                n_out = lt[layer, Q_NOUT]
                _GROUPS(xq, qp, qp, lt[layer, Q_OFF], lt[layer, Q_CROFF], lt[layer, Q_G], lt[layer, Q_T], acc)
                dst = out[b] if layer == L - 1 else (ya if layer % 2 == 0 else yb)
                so, bo, wo, act = lt[layer, Q_SOFF], lt[layer, Q_BOFF], lt[layer, Q_WOFF], lt[layer, Q_ACT]
                _outputs(acc, zp, wsum[wo:wo + n_out], s, sc[so:so + n_out], bias[bo:bo + n_out], act, dst[:n_out])
                if layer < L - 1:  # the next layer's input (finite: it came from finite values)
                    if act == ACT_RELU:
                        s, zp = _quantize_range(dst, n_out, xq, np.float32(0), _max_nonneg(dst, n_out))
                    else:
                        s, zp = quantize_input(dst, n_out, xq)
    return bad


forward, forward_serial = twins(_forward, _OPTS)


# ------------------------------------------------------------------ layout
def layer_int8(spec) -> tuple[np.ndarray, np.ndarray]:
    """(integers (n_out, k) int8, per-neuron scales float64) of a layer spec (``infer.Layout``'s format): the
    stored integers and scales of an int8/4-bit layer; for float32 values ``scale = max|w| / 127`` per row,
    ``rint(w / scale)``. Inactive rows get zeros."""
    if spec.get("values") is not None:
        w = np.asarray(spec["values"], np.float32)
        a = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
        scale = np.where(a > 0, a / np.float32(127), np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    else:
        q = np.asarray(spec["qvalues"]).astype(np.int8)
        scale = np.asarray(spec["scale"], np.float32)
    active = spec.get("active")
    if active is not None:
        q = q.copy()
        q[~np.asarray(active, bool)] = 0
    return q, scale.astype(np.float64)


class QLayout:
    """A chain of linear layers (``infer.Layout``'s layer dicts) laid out for ``forward`` (module docstring)."""

    def __init__(self, layers):
        rows, planes, crs, scs, biases, wsums = [], [], [], [], [], []
        off = croff = soff = woff = 0
        self.widths = [int(layers[0]["n_in"])]
        nch_max = 1
        at = None  # where the previous layer's outputs are stored: output j at position at[j]
        for li, spec in enumerate(layers):
            n_in, n_out = int(spec["n_in"]), int(spec["n_out"])
            if n_in > MAX_IN:
                raise ValueError(f"int8 activations: a layer has {n_in} inputs; at most {MAX_IN} are supported "
                                 "(use activations='float32').")
            idx = spec.get("indices")
            idx = (np.broadcast_to(np.arange(n_in), (n_out, n_in)) if idx is None else np.asarray(idx)).astype(np.int64)
            q, scale = layer_int8(spec)
            bias = spec.get("bias")
            bias = np.zeros(n_out, np.float32) if bias is None else np.asarray(bias, np.float32)
            if at is not None:  # read the inputs where the previous layer put them; rows stay sorted
                idx = at[idx]
                o = np.argsort(idx, axis=1, kind="stable")
                idx, q = np.take_along_axis(idx, o, 1), np.take_along_axis(q, o, 1)
            k = idx.shape[1]
            T = max(1, -(-k // STEP))
            G = -(-n_out // GROUP)
            if li < len(layers) - 1 and k:
                # Rows whose steps fall into the same chunks go in the same group: fewer chunks per step (the
                # SRigL-90 % MLP: 2.6 -> 2.2). The outputs are then stored in this order, and the next layer
                # reads them there (the last layer keeps its order). Integer sums: the same results.
                kp = T * STEP
                starts = np.minimum(np.arange(0, kp, STEP), k - 1)
                order = np.lexsort((idx[:, starts] // CHUNK_BYTES).T[::-1])
                idx, q, scale, bias = idx[order], q[order], scale[order], bias[order]
                at = np.empty(n_out, np.int64)
                at[order] = np.arange(n_out)
            else:
                at = None
            ix = np.zeros((G * GROUP, T * STEP), np.int64)
            ix[:n_out, :k] = idx
            if k:  # padding slots (weight 0) repeat the row's last index: they widen no step's chunk range
                ix[:n_out, k:] = idx[:, -1:]
            wp = np.zeros((G * GROUP, T * STEP), np.int8)
            wp[:n_out, :k] = q

            def arrange(a):  # (rows, slots) -> [g][t][row][16]
                return a.reshape(G, GROUP, T, STEP).transpose(0, 2, 1, 3).reshape(-1)

            ix = arrange(ix)
            chunk = (ix // CHUNK_BYTES).astype(np.uint8)
            planes.append(np.stack([(ix % CHUNK_BYTES).astype(np.uint8).reshape(-1, 64), chunk.reshape(-1, 64),
                                    arrange(wp).view(np.uint8).reshape(-1, 64)], axis=1).reshape(-1))
            per_step = chunk.reshape(G * T, GROUP * STEP)
            crs.append(np.stack([per_step.min(axis=1), per_step.max(axis=1) + 1], axis=1).astype(np.uint8).reshape(-1))
            nch = n_in // CHUNK_BYTES + 1  # chunks covering inputs 0..n_in
            nch_max = max(nch_max, nch)
            rows.append([n_in, n_out, G, T, off, croff, nch, soff, soff, woff, ACTS[spec["act"]], 0, 0, 0])
            scs.append(scale)
            biases.append(bias)
            wsums.append(q.astype(np.int32).sum(axis=1, dtype=np.int32))
            off += 3 * G * T * GROUP * STEP
            croff += 2 * G * T
            soff += n_out
            woff += n_out
            self.widths.append(n_out)
        self.lt = np.asarray(rows, np.int64)
        cr = np.concatenate(crs)
        self.qp = aligned_zeros(off + 64 + cr.size, np.uint8)  # the planes, then the chunk ranges (Q_CROFF absolute)
        pos = 0
        for plane in planes:
            self.qp[pos:pos + plane.size] = plane
            pos += plane.size
        self.lt[:, Q_CROFF] += off + 64
        self.qp[off + 64:] = cr
        self.fp = np.stack([np.concatenate(scs), np.concatenate(biases).astype(np.float64),
                            np.concatenate(wsums).astype(np.float64)])  # few arguments: each costs ~40 ns a call
        self.n_in, self.n_out = self.widths[0], self.widths[-1]
        self.n_layers = len(rows)
        self.xq_bytes = nch_max * CHUNK_BYTES + 64
        wbytes = -(-4 * max(self.widths[1:]) // 64) * 64
        gbytes = -(-4 * GROUP * int(self.lt[:, Q_G].max()) // 64) * 64
        self.lt[:, Q_YA] = self.xq_bytes
        self.lt[:, Q_YB] = self.xq_bytes + wbytes
        self.lt[:, Q_ACC] = self.xq_bytes + 2 * wbytes
        self.ws_bytes = self.xq_bytes + 2 * wbytes + gbytes
        self.macs = int(sum(int(r[1]) * (int(r[3]) * STEP) for r in rows))
        for a in self.arrays:
            a.setflags(write=False)

    @property
    def arrays(self):
        return self.lt, self.qp, self.fp

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def workspace(self, slots: int) -> np.ndarray:
        """The buffer of ``slots`` samples at a time: (slots, ws_bytes) bytes, rows on 64 bytes."""
        return aligned_zeros((slots, self.ws_bytes), np.uint8)

    def run(self, x: np.ndarray, parallel: bool = False, ws=None) -> np.ndarray:
        """The chain on a C-contiguous float32 (B, n_in) batch: (B, n_out) float32."""
        B = x.shape[0]
        out = np.empty((B, self.n_out), np.float32)
        if ws is None:
            import numba

            ws = self.workspace(min(B, numba.get_num_threads()) if parallel else 1)
        (forward if parallel else forward_serial)(x, out, ws, *self.arrays)
        return out


# ------------------------------------------------------------------ the reference twin (NumPy)
def _quantize_np(x: np.ndarray):
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():
        return None, np.nan, 0
    lo, hi = min(np.float32(0), x.min(initial=0)), max(np.float32(0), x.max(initial=0))
    if lo >= 0:
        zp, qmax, a = 0, np.float32(255), hi
    else:
        zp, qmax, a = 128, np.float32(127), max(-lo, hi)
    if a == 0:
        return np.full(x.shape, zp, np.int64), 0.0, zp
    q = np.clip(np.rint(x.astype(np.float64) * (np.float64(qmax) / np.float64(a))), -127, 255).astype(np.int64) + zp
    return q, float(np.float64(a) / np.float64(qmax)), zp


def reference(layers, x: np.ndarray) -> np.ndarray:
    """``forward`` in NumPy from the layer dicts (dense int64 arithmetic): the same bits."""
    x = np.asarray(x, np.float32)
    out = np.empty((x.shape[0], int(layers[-1]["n_out"])), np.float32)
    for b in range(x.shape[0]):
        h = x[b]
        for spec in layers:
            n_in, n_out = int(spec["n_in"]), int(spec["n_out"])
            q, scale = layer_int8(spec)
            idx = spec.get("indices")
            wd = np.zeros((n_out, n_in), np.int64)
            if idx is None:
                wd[:] = q
            else:
                np.put_along_axis(wd, np.asarray(idx, np.int64), q.astype(np.int64), axis=1)
            xq, s, zp = _quantize_np(h)
            if xq is None:
                h = np.full(n_out, np.nan, np.float32)
                break
            acc = (wd @ xq).astype(np.int32)
            v = (acc.astype(np.int64) - zp * wd.sum(axis=1)).astype(np.float64) * (s * scale)
            bias = spec.get("bias")
            y = v.astype(np.float32) + (np.zeros(n_out, np.float32) if bias is None else np.asarray(bias, np.float32))
            if spec["act"] == "relu":
                y = np.maximum(y, np.float32(0))
            elif spec["act"] == "gelu":
                y = (0.5 * y.astype(np.float64) * (1.0 + np.vectorize(math.erf)(y.astype(np.float64) * 0.7071067811865476))).astype(np.float32)
            h = y
        out[b] = h
    return out
