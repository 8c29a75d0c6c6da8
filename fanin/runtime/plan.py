"""A network lowered to a plan: a short list of ops over plain arrays, what a ``Network`` runs and a
``.fanin`` file stores.

``lower(model)`` walks a ``Sequential`` chain once:

- weight layers (``Linear``, ``Conv2d``, ``FanInLinear``, ``FanInConv2d``) become ``linear``/``conv`` ops,
  dense or condensed (``indices``), with float32 ``values`` or, for a self-compressed layer, the
  integers ``qvalues`` (int8, or two 4-bit values per byte when every channel has at most 4 bits)
  and a per-channel ``scale`` such that ``scale * qvalues`` are exactly the weights training used;
- a batch norm (eval mode) after a weight layer is folded into it (weights and scales times
  ``gamma / sqrt(var + eps)``, bias shifted), an activation after it is fused into the op (``act``);
- dropout disappears; pooling and flatten stay as ops;
- neurons SRigL ablated output a constant (their bias through the activation): they are dropped and
  the constant is folded into the next layer's bias where that layer reads them linearly.

``check(plan)`` validates a plan completely (kinds, shapes, dtypes, every index in range and each
row strictly increasing, scales finite, shapes chained from the input to the output) and raises
``FormatError`` with what is wrong; ``fanin.load`` runs it before any kernel sees the arrays.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["FormatError", "lower", "check", "quantize", "OPS", "ACTS"]

OPS = ("linear", "conv", "maxpool", "avgpool", "flatten")
ACTS = ("none", "relu", "gelu")
MAX_DIM = 1 << 24  # no layer of a real network is wider; a hostile file must not make us allocate terabytes


class FormatError(ValueError):
    """A model file or plan is malformed, corrupted or unsupported (the message says what and where)."""


# ------------------------------------------------------------------ lowering
def lower(model, input_shape=None) -> dict:
    """The plan of ``model`` (a ``Sequential`` of fanin layers), in eval-mode semantics.

    ``input_shape``: one sample's shape; needed for convolutional models, e.g. ``(1, 28, 28)``.
    """
    from fanin import nn
    from fanin.compress import _leaves

    if not isinstance(model, nn.Module):
        raise TypeError(f"fanin.compile: expected a fanin model (an nn.Sequential of fanin layers, e.g. "
                        f"fanin.models.mlp(...)) or a Network, got {type(model).__name__}; a saved model file is "
                        "opened with fanin.load(path).")
    leaves = _leaves(model)
    if leaves is None:
        raise TypeError("fanin.compile: the model must be a Sequential (nested Sequentials are fine) of fanin layers; "
                        f"got a {type(model).__name__} whose forward fanin cannot see.")
    ops, shape = [], _input_shape(leaves, input_shape)
    for m in leaves:
        if isinstance(m, (nn.Linear, nn.FanInLinear, nn.Conv2d, nn.FanInConv2d)):
            ops.append(_weight_op(m))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            _fold_batch_norm(ops, m)
        elif isinstance(m, (nn.ReLU, nn.GELU)):
            act = "relu" if isinstance(m, nn.ReLU) else "gelu"
            if ops and ops[-1]["op"] in ("linear", "conv") and ops[-1]["act"] == "none":
                ops[-1]["act"] = act
            else:
                raise TypeError(f"fanin.compile: a {type(m).__name__} must follow a weight layer (or its batch norm).")
        elif isinstance(m, nn.Dropout):
            continue
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k = _pair(m.kernel_size)
            ops.append({"op": "avgpool" if isinstance(m, nn.AvgPool2d) else "maxpool", "kernel": k,  # (a subclass)
                        "stride": _pair(m.stride if m.stride is not None else m.kernel_size),
                        "padding": _pair(m.padding)})
        elif isinstance(m, nn.Flatten):
            ops.append({"op": "flatten"})
        else:
            raise TypeError(f"fanin.compile: {type(m).__name__} layers are not supported by the runtime.")
    plan = {"input_shape": list(shape), "ops": ops}
    _drop_ablated(plan)
    check(plan)
    return plan


def _pair(v):
    return [int(v), int(v)] if isinstance(v, (int, np.integer)) else [int(v[0]), int(v[1])]


def _input_shape(leaves, given):
    from fanin import nn

    first = next((m for m in leaves if isinstance(m, (nn.Linear, nn.FanInLinear, nn.Conv2d, nn.FanInConv2d))), None)
    if first is None:
        raise ValueError("fanin.compile: the model has no weight layer.")
    if isinstance(first, (nn.Linear, nn.FanInLinear)):
        width = first.in_features if isinstance(first, nn.Linear) else first.n_in
        if given is not None and tuple(given) != (width,):
            raise ValueError(f"fanin.compile: input_shape {tuple(given)} does not fit the first layer's {width} inputs.")
        return (width,)
    c_in = first.in_channels if isinstance(first, nn.Conv2d) else first.c_in
    if given is None:
        raise ValueError("fanin.compile: a convolutional model needs input_shape=(channels, height, width), e.g. "
                         "(1, 28, 28) for Fashion-MNIST.")
    given = tuple(int(s) for s in given)
    if len(given) != 3 or given[0] != c_in:
        raise ValueError(f"fanin.compile: input_shape {given} must be ({c_in}, height, width) for this model.")
    return given


def _weight_op(m) -> dict:
    from fanin import compress, nn

    conv = isinstance(m, (nn.Conv2d, nn.FanInConv2d))
    sparse = isinstance(m, (nn.FanInLinear, nn.FanInConv2d))
    w = m.weight_param.data
    n_out = w.shape[0]
    op = {"op": "conv" if conv else "linear", "sparse": sparse, "act": "none"}
    if conv:
        op.update(kernel=list(m.kernel_size), stride=list(m.stride), padding=list(m.padding),
                  c_in=int(m.in_channels if isinstance(m, nn.Conv2d) else m.c_in))
    n_in = m.n_in if sparse else int(np.prod(w.shape[1:]))
    op.update(n_in=int(n_in), n_out=int(n_out))
    arrays = {}
    if sparse:
        arrays["indices"] = np.ascontiguousarray(m.indices)
        op["active"] = m.active.tolist() if not m.active.all() else None
    w2 = w.reshape(n_out, -1).astype(np.float32)
    if m.bits is not None and not np.all(np.isfinite(m.bits.data)):
        raise ValueError("fanin.compile: a self-compressed layer's bit depths hold NaN or Inf (the run diverged); "
                         "lower the learning rates or the compression's --compress-lr.")
    if m.bits is not None and float(np.max(m.bits.data, initial=0)) > 8:
        # a channel above 8 bits does not fit int8: the layer keeps its fixed-point values as float32 (exact: they
        # are what the quantized training network computed with)
        arrays["values"] = np.ascontiguousarray(compress.quantize(w2, m.bits.data, m.exponent.data), np.float32)
        op["bits"] = 32
    elif m.bits is not None:
        r, s = compress.integer_weights(w2, m.bits.data, m.exponent.data)
        bits = int(max(1, math.ceil(float(np.max(m.bits.data, initial=0)))))
        arrays["qvalues"] = r
        arrays["scale"] = s.astype(np.float32)
        op["bits"] = 4 if bits <= 4 else 8
    else:
        arrays["values"] = np.ascontiguousarray(w2)
        op["bits"] = 32
    bias = getattr(m, "bias", None)
    arrays["bias"] = (bias.data.astype(np.float32).copy() if bias is not None else np.zeros(n_out, np.float32))
    if sparse and op["active"] is not None:  # ablated rows hold nothing
        dead = ~m.active
        for key in ("values", "qvalues"):
            if key in arrays:
                arrays[key][dead] = 0
    op["arrays"] = arrays
    return op


def _fold_batch_norm(ops, bn):
    if not ops or ops[-1]["op"] not in ("linear", "conv") or ops[-1]["act"] != "none":
        raise TypeError("fanin.compile: a batch norm must directly follow a weight layer to be folded into it.")
    scale, shift = bn.eval_affine()
    a = ops[-1]["arrays"]
    if len(scale) != len(a["bias"]):
        raise ValueError(f"fanin.compile: a batch norm over {len(scale)} channels follows a layer with {len(a['bias'])}.")
    if "qvalues" in a:
        a["scale"] = (a["scale"].astype(np.float64) * scale).astype(np.float32)
    else:
        a["values"] = (a["values"].astype(np.float64) * scale[:, None]).astype(np.float32)
    a["bias"] = (a["bias"].astype(np.float64) * scale + shift).astype(np.float32)


def _act(v, act):
    if act == "relu":
        return np.maximum(v, 0.0)
    if act == "gelu":
        from scipy import special
        return v * 0.5 * (1.0 + special.erf(v / math.sqrt(2.0)))
    return v


def _drop_ablated(plan):
    """Remove ablated neurons of a linear op whose consumer is a linear op, folding their constant outputs."""
    ops = plan["ops"]
    for i, op in enumerate(ops):
        if op["op"] != "linear" or not op.get("active"):
            continue
        nxt = ops[i + 1] if i + 1 < len(ops) else None
        if nxt is None or nxt["op"] != "linear":
            continue  # an output layer's neuron is a class: keep it (it outputs its bias)
        active = np.asarray(op.pop("active"), bool)
        const = _act(op["arrays"]["bias"][~active].astype(np.float64), op["act"])
        _remove_inputs(nxt, ~active, const)
        for key in ("indices", "values", "qvalues", "scale", "bias"):
            if key in op["arrays"]:
                op["arrays"][key] = np.ascontiguousarray(op["arrays"][key][active])
        op["n_out"] = int(active.sum())
        op["active"] = None


def _remove_inputs(op, removed, const):
    """Drop the inputs ``removed`` of a linear op whose values there are folded as constants ``const``."""
    a = op["arrays"]
    w = a["values"] if "values" in a else a["qvalues"] * a["scale"][:, None]
    keep = ~removed
    if not op["sparse"]:
        a["bias"] = (a["bias"] + w[:, removed].astype(np.float64) @ const).astype(np.float32)
        for key in ("values", "qvalues"):
            if key in a:
                a[key] = np.ascontiguousarray(a[key][:, keep])
        op["n_in"] = int(keep.sum())
        return
    idx = a["indices"].astype(np.int64)
    c_full = np.zeros(len(removed))
    c_full[removed] = const
    a["bias"] = (a["bias"] + (w * c_full[idx]).sum(axis=1)).astype(np.float32)
    renumber = np.cumsum(keep) - 1
    n_in, k = int(keep.sum()), idx.shape[1]
    if k > n_in:
        raise ValueError("fanin.compile: removing ablated neurons would leave a layer with fewer inputs than its fan-in.")
    new_idx = np.empty_like(idx)
    for j in range(idx.shape[0]):  # slots that read a dropped input move to an unused input at weight 0
        dead = removed[idx[j]]
        held = renumber[idx[j, ~dead]]
        free = np.setdiff1d(np.arange(n_in), held)[: int(dead.sum())]
        row = np.concatenate([held, free])
        order = np.argsort(row, kind="stable")
        new_idx[j] = row[order]
        for key in ("values", "qvalues"):
            if key in a:
                vals = a[key][j].copy()
                vals[dead] = 0
                a[key][j] = np.concatenate([vals[~dead], vals[dead]])[order]
    a["indices"] = new_idx.astype(a["indices"].dtype)
    op["n_in"] = n_in


# ---------------------------------------------------------------- validation
_DT = {"indices": ("int16", "int32"), "values": ("float32",), "qvalues": ("int8",), "scale": ("float32",),
       "bias": ("float32",)}


def _fail(where, msg):
    raise FormatError(f"{where}: {msg}")


def _int(where, name, v, lo=0, hi=MAX_DIM):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        _fail(where, f"'{name}' must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _array(where, arrays, name, shape, required=True):
    a = arrays.get(name)
    if a is None:
        if required:
            _fail(where, f"array '{name}' is missing")
        return None
    if not isinstance(a, np.ndarray) or a.dtype.name not in _DT[name]:
        _fail(where, f"array '{name}' must be {' or '.join(_DT[name])}, got "
                     f"{getattr(a, 'dtype', type(a).__name__)}")
    if tuple(a.shape) != tuple(shape):
        _fail(where, f"array '{name}' must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return a


def check(plan) -> None:
    """Validate a plan completely; raises ``FormatError`` naming the op and the problem."""
    if not isinstance(plan, dict) or not isinstance(plan.get("ops"), list) or not plan["ops"]:
        raise FormatError("the plan must be a dict with a non-empty list of 'ops'.")
    shape = plan.get("input_shape")
    if not isinstance(shape, list) or len(shape) not in (1, 3):
        raise FormatError(f"'input_shape' must be [features] or [channels, height, width], got {shape!r}.")
    shape = [_int("input_shape", "dimension", s, 1) for s in shape]
    for i, op in enumerate(plan["ops"]):
        where = f"op {i}" + (f" ({op.get('op')})" if isinstance(op, dict) else "")
        if not isinstance(op, dict) or op.get("op") not in OPS:
            _fail(where, f"unknown op kind {op.get('op') if isinstance(op, dict) else op!r}; known: {', '.join(OPS)}")
        shape = _check_op(where, op, shape)
    if len(shape) != 1 or plan["ops"][-1]["op"] != "linear":
        raise FormatError("the last op must be a linear layer (the classifier).")


def _check_op(where, op, shape):
    kind = op["op"]
    if kind == "flatten":
        if len(shape) != 3:
            _fail(where, f"flatten needs a (channels, height, width) input, got {shape}")
        return [int(np.prod(shape))]
    if kind in ("maxpool", "avgpool"):
        if len(shape) != 3:
            _fail(where, "pooling needs a (channels, height, width) input")
        kh, kw = (_int(where, "kernel", v, 1, 64) for v in _pair2(where, op, "kernel"))
        sh, sw = (_int(where, "stride", v, 1, 64) for v in _pair2(where, op, "stride"))
        ph, pw = (_int(where, "padding", v, 0, 32) for v in _pair2(where, op, "padding"))
        if kind == "maxpool" and (ph > kh // 2 or pw > kw // 2):
            _fail(where, "max-pool padding must be at most half the window")
        return [shape[0], *_spatial_out(shape, kh, kw, sh, sw, ph, pw, where)]
    if op.get("act") not in ACTS:
        _fail(where, f"'act' must be one of {ACTS}, got {op.get('act')!r}")
    if not isinstance(op.get("sparse"), bool):
        _fail(where, "'sparse' must be true or false")
    arrays = op.get("arrays")
    if not isinstance(arrays, dict):
        _fail(where, "'arrays' is missing")
    n_in, n_out = _int(where, "n_in", op.get("n_in"), 1), _int(where, "n_out", op.get("n_out"), 1)
    bits = op.get("bits")
    if bits not in (32, 8, 4):
        _fail(where, f"'bits' must be 32, 8 or 4, got {bits!r}")
    if kind == "linear":
        if len(shape) != 1:
            _fail(where, f"a linear layer needs a flat input; add a flatten before it (input {shape})")
        if shape[0] != n_in:
            _fail(where, f"n_in={n_in} but the previous op gives {shape[0]} features")
        out = [n_out]
    else:
        if len(shape) != 3:
            _fail(where, f"a convolution needs a (channels, height, width) input, got {shape}")
        kh, kw = (_int(where, "kernel", v, 1, 64) for v in _pair2(where, op, "kernel"))
        sh, sw = (_int(where, "stride", v, 1, 64) for v in _pair2(where, op, "stride"))
        ph, pw = (_int(where, "padding", v, 0, 64) for v in _pair2(where, op, "padding"))
        c_in = _int(where, "c_in", op.get("c_in"), 1)
        if c_in != shape[0] or c_in * kh * kw != n_in:
            _fail(where, f"c_in={c_in} (n_in={n_in}) does not fit a {shape[0]}-channel input with a {kh}x{kw} kernel")
        out = [n_out, *_spatial_out(shape, kh, kw, sh, sw, ph, pw, where)]
    k = n_in
    if op["sparse"]:
        idx = arrays.get("indices")
        if not isinstance(idx, np.ndarray) or idx.ndim != 2 or idx.shape[0] != n_out:
            _fail(where, f"'indices' must be a ({n_out}, k) array")
        k = _int(where, "k", idx.shape[1], 1, n_in)
        _array(where, arrays, "indices", (n_out, k))
        if int(idx.min()) < 0 or int(idx.max()) >= n_in:
            _fail(where, f"an index is outside [0, {n_in})")
        if k > 1 and not np.all(np.diff(idx.astype(np.int64), axis=1) > 0):
            row = int(np.flatnonzero((np.diff(idx.astype(np.int64), axis=1) <= 0).any(axis=1))[0])
            _fail(where, f"row {row} of 'indices' is not strictly increasing")
    elif "indices" in arrays:
        _fail(where, "a dense layer has no 'indices'")
    if op.get("active") is not None:  # dense or condensed: inactive rows output their bias
        act = op["active"]
        if not isinstance(act, list) or len(act) != n_out or not all(isinstance(a, bool) for a in act):
            _fail(where, f"'active' must be a list of {n_out} booleans")
    if bits == 32:
        _array(where, arrays, "values", (n_out, k))
        if "qvalues" in arrays or "scale" in arrays:
            _fail(where, "a 32-bit layer stores 'values', not 'qvalues'/'scale'")
    else:
        q = _array(where, arrays, "qvalues", (n_out, k))
        s = _array(where, arrays, "scale", (n_out,))
        if "values" in arrays:
            _fail(where, "a quantized layer stores 'qvalues' and 'scale', not 'values'")
        lim = 1 << (bits - 1)
        if q.size and (int(q.min()) < -lim or int(q.max()) > lim - 1):
            _fail(where, f"'qvalues' hold values outside the {bits}-bit range [{-lim}, {lim - 1}]")
        if not np.all(np.isfinite(s)):
            _fail(where, "'scale' holds a non-finite value")
    values = arrays.get("values")
    if values is not None and not np.all(np.isfinite(values)):
        _fail(where, "'values' hold a non-finite value")
    b = _array(where, arrays, "bias", (n_out,))
    if not np.all(np.isfinite(b)):
        _fail(where, "'bias' holds a non-finite value")
    extra = set(arrays) - {"indices", "values", "qvalues", "scale", "bias"}
    if extra:
        _fail(where, f"unknown arrays {sorted(extra)}")
    return out


def _pair2(where, op, name):
    v = op.get(name)
    if not isinstance(v, list) or len(v) != 2:
        _fail(where, f"'{name}' must be a pair of integers, got {v!r}")
    return v


def _spatial_out(shape, kh, kw, sh, sw, ph, pw, where):
    _, h, w = shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        _fail(where, f"a {kh}x{kw} window does not fit a {h}x{w} input")
    return [ho, wo]


# ------------------------------------------------------- post-training quantization
def quantize(plan: dict, bits: int = 8) -> dict:
    """A copy of ``plan`` whose float32 weight layers hold ``bits``-bit integers (8 or 4) with a per-neuron
    power-of-two scale ``2**ceil(log2(max|w| / (2**(bits-1) - 1)))``: no retraining (post-training
    quantization). Power-of-two scales make each product ``scale * q * x`` exact in float32. Layers that
    are already integer (self-compressed) keep theirs."""
    if bits not in (8, 4):
        raise ValueError(f"quantize: bits must be 8 or 4, got {bits}.")
    top = (1 << (bits - 1)) - 1
    ops = []
    for op in plan["ops"]:
        op = dict(op)
        if op["op"] in ("linear", "conv") and op["bits"] == 32:
            a = dict(op["arrays"])
            w = a.pop("values").astype(np.float64)
            m = np.abs(w).max(axis=1)
            e = np.where(m > 0, np.ceil(np.log2(np.where(m > 0, m, 1.0) / top)), 0.0)
            s = np.exp2(e)
            a["qvalues"] = np.clip(np.rint(w / s[:, None]), -top, top).astype(np.int8)
            a["scale"] = s.astype(np.float32)
            op["arrays"], op["bits"] = a, bits
        ops.append(op)
    out = {**plan, "ops": ops}
    check(out)
    return out
