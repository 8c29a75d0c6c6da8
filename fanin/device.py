"""Devices: tensors, modules, optimizers and compiled networks on an NVIDIA GPU (``numba.cuda``, the ``cuda`` extra).

    t = fanin.Tensor(x, device="cuda")      # or t.to("cuda"); t.device -> "cuda"
    model.to("cuda")                         # parameters move in place; optimizers and SRigL follow them
    loss = fanin.ops.cross_entropy(model(t), y)   # every op of an MLP step runs on the device
    net = fanin.device.to_device(fanin.load("model.fanin"))   # inference on the GPU (float, int8, 4-bit)

Nothing here imports numba-cuda until CUDA is asked for (``import fanin`` never needs it). Asking for CUDA without
numba-cuda, or without a GPU and driver (outside Numba's simulator), raises ``CUDAUnavailableError`` saying what to
do. Device arrays are Numba ``DeviceNDArray``s; arrays of other libraries with ``__cuda_array_interface__``
(CuPy, PyTorch) are taken without a copy.

What runs on the device: the condensed layer (forward, dx, dvalues; at full fan-in, k = n_in, as dense GEMMs like
the host's BLAS path), dense ``Linear``, ReLU, add/sub/mul with broadcasting of a trailing vector or a scalar,
sum/mean, reshape/flatten, cross-entropy, SGD and Adam(W). Other ops raise ``NotImplementedError`` naming the op
(move the tensors to the host with ``.to("cpu")``). A training step copies nothing to the host except what the
caller asks for (``loss.item()``).

SRigL's connectivity update runs on the host (``fanin.sparsity.SRigL`` is unchanged): every ``delta_t`` steps it
reads each sparse layer's captured ``(x, dy)``, values and optimizer state, which come to the host and go back
(per layer ``4 * (B * (n_in + n_out) + n_out * k * (1 + states))`` bytes each way; the growth scores ``dy^T x``
cost ``2 * B * n_out * n_in`` host FLOPs). See ``fanin.kernels.cuda`` for the device growth-candidate kernel.
"""
from __future__ import annotations

import numpy as np

__all__ = ["CUDAUnavailableError", "DEVICES", "backend", "available", "normalize", "device_of", "is_device_array",
           "host", "move", "to_device", "DeviceNetwork", "load", "move_module", "synchronize"]

DEVICES = ("cpu", "cuda")


class CUDAUnavailableError(RuntimeError):
    """CUDA was asked for, but numba-cuda or a GPU with its driver is missing."""


def normalize(device) -> str:
    """'cpu' or 'cuda' ('cuda:0' is 'cuda'); a ValueError for anything else."""
    d = str(device).lower()
    if d.startswith("cuda"):
        if d not in ("cuda", "cuda:0"):
            raise ValueError(f"device {device!r}: fanin uses the current CUDA device only; pass 'cuda' (or 'cuda:0').")
        return "cuda"
    if d == "cpu":
        return "cpu"
    raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'.")


def backend():
    """The CUDA kernel module (imports numba-cuda on first use); CUDAUnavailableError when it cannot work."""
    import importlib
    import sys

    mod = sys.modules.get("fanin.kernels.cuda")
    if mod is None:
        try:
            mod = importlib.import_module("fanin.kernels.cuda")
        except CUDAUnavailableError:
            raise
        except ImportError as exc:
            raise CUDAUnavailableError(f"CUDA was asked for, but its backend cannot be imported ({exc}); install "
                                       "the extra: pip install 'fanin[cuda]'.") from None
    from fanin import tensor

    tensor._CUDA = True
    return mod


def available() -> bool:
    """True when CUDA can be used here (numba-cuda installed and a GPU, or the simulator)."""
    try:
        backend()
        return True
    except CUDAUnavailableError:
        return False


def is_device_array(a) -> bool:
    return bool(getattr(a, "__cuda_ndarray__", False)) or hasattr(a, "__cuda_array_interface__")


def device_of(a) -> str:
    """'cuda' for device arrays (and tensors holding them), else 'cpu'."""
    from fanin.tensor import Tensor

    if isinstance(a, Tensor):
        return a.device
    return "cuda" if is_device_array(a) else "cpu"


def host(a) -> np.ndarray:
    """A NumPy array with a's data (a copy from the device; host arrays as they are)."""
    if is_device_array(a):
        return backend().to_host(backend().wrap(a))
    return np.asarray(a)


def to_device(obj, device="cuda"):
    """An array moved to ``device``; a ``runtime.Network`` becomes a ``DeviceNetwork`` (its arrays copied once)."""
    from fanin.runtime.network import Network

    if isinstance(obj, Network):
        return DeviceNetwork(obj) if normalize(device) == "cuda" else obj
    return move(obj, device)


def move(a, device, dtype=None):
    """Array ``a`` on ``device`` (no copy when it is there already and ``dtype`` matches)."""
    device = normalize(device)
    if device == "cpu":
        h = host(a)
        return h if dtype is None else h.astype(dtype, copy=False)
    be = backend()
    if is_device_array(a):
        d = be.wrap(a)
        return d if dtype is None else be.astype(d, dtype)
    h = np.asarray(a)
    return be.to_device(h if dtype is None else h.astype(dtype, copy=False))


def tensor_data(data, dtype, device):
    """The array a ``Tensor(data, dtype=, device=)`` holds."""
    from fanin.tensor import Tensor, as_array

    if isinstance(data, Tensor):
        data = data.data
    if device is None:
        device = "cuda" if is_device_array(data) else "cpu"
    device = normalize(device)
    if device == "cpu":
        return as_array(host(data) if is_device_array(data) else data, dtype)
    be = backend()
    if is_device_array(data):
        d = be.wrap(data)
        if dtype is not None:
            return be.astype(d, dtype)
        if d.dtype.kind in "biu":
            return be.astype(d, np.float32)
        if d.dtype not in (np.float32, np.float64):
            raise TypeError(f"cannot make a Tensor from a device array of dtype {d.dtype}; use float32 (or float64).")
        return d
    return be.to_device(as_array(data, dtype))


def synchronize():
    backend().synchronize()


# =================================================================== autograd on the device
def _dev(t) -> bool:
    from fanin.tensor import Tensor

    if isinstance(t, Tensor):
        return t.device == "cuda"
    return is_device_array(t)


def _operand(fname, name, x, like=None):
    """A device Tensor for an op operand: device tensors as they are, Python numbers as constants; host arrays or
    tensors are refused (mixed devices)."""
    from fanin.tensor import Tensor

    if isinstance(x, Tensor):
        if x.device != "cuda":
            raise TypeError(f"{fname}: {name} is on the cpu but the other operand is on cuda; move it with "
                            f"{name}.to('cuda') (or the other to the cpu).")
        return x
    if is_device_array(x):
        return Tensor(x)
    if isinstance(x, (int, float, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0):
        dt = like.dtype if like is not None else np.float32
        return Tensor(backend().full((1,), dt, float(x)).reshape(()))
    raise TypeError(f"{fname}: {name} is a host {type(x).__name__} but the other operand is on cuda; move it to "
                    "the device first (fanin.Tensor(a, device='cuda')).")


def unsupported(fname):
    raise NotImplementedError(
        f"{fname} is not implemented for CUDA tensors; the device supports condensed and dense linear layers, relu, "
        "add/sub/mul, sum/mean, reshape/flatten and cross_entropy. Move the tensors to the host with .to('cpu')."
    )


def _make(data, parents, backward):
    from fanin.tensor import Tensor

    return Tensor._make(data, parents, backward)


def _unbroadcast(g, shape):
    """Sum a device gradient down to ``shape`` (the shapes binary() accepts)."""
    be = backend()
    if tuple(g.shape) == tuple(shape):
        return g
    size = int(np.prod(shape)) if len(shape) else 1
    if size == 1:
        return be.total(g).reshape(shape)
    g2 = g.reshape((g.size // size, size))
    return be.colsum(g2).reshape(shape)


def _broadcast_ok(fname, a, b):
    sa, sb = tuple(a.shape), tuple(b.shape)
    if sa == sb or a.size == 1 or b.size == 1:
        return
    small, big = (sb, sa) if len(sb) <= len(sa) else (sa, sb)
    if big[len(big) - len(small):] == small:
        return
    raise NotImplementedError(f"{fname}: on cuda, operands must have equal shapes, or one must be a scalar or match the "
                              f"other's trailing axes; got {sa} and {sb}.")


def _binary(fname, op, a, b):
    from fanin.tensor import Tensor

    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    a = _operand(fname, "a", a, like)
    b = _operand(fname, "b", b, like)
    _broadcast_ok(fname, a, b)
    be = backend()
    out = be.binary(a.data, b.data, op)
    shape = tuple(np.broadcast_shapes(a.shape, b.shape))
    out = out.reshape(shape)

    def backward(g):
        ga = gb = None
        if op == 0:
            ga = _unbroadcast(g, a.shape) if a.requires_grad else None
            gb = _unbroadcast(g, b.shape) if b.requires_grad else None
        elif op == 1:
            ga = _unbroadcast(g, a.shape) if a.requires_grad else None
            gb = _unbroadcast(be.binary(g, be.full((1,), g.dtype, -1.0), 2), b.shape) if b.requires_grad else None
        else:
            ga = _unbroadcast(be.binary(g, b.data, 2).reshape(shape), a.shape) if a.requires_grad else None
            gb = _unbroadcast(be.binary(g, a.data, 2).reshape(shape), b.shape) if b.requires_grad else None
        return ga, gb

    return _make(out, (a, b), backward)


def add(a, b):
    return _binary("add", 0, a, b)


def sub(a, b):
    return _binary("sub", 1, a, b)


def mul(a, b):
    return _binary("mul", 2, a, b)


def neg(a):
    return _binary("neg", 2, a, -1.0)


def sum(a, axis=None, keepdims=False):  # noqa: A001
    return _reduce("sum", a, axis, keepdims, 1.0)


def mean(a, axis=None, keepdims=False):
    a = _operand("mean", "a", a)
    if axis is None:
        return _reduce("mean", a, None, keepdims, 1.0 / max(1, a.size))
    n = a.shape[axis]
    return _reduce("mean", a, axis, keepdims, 1.0 / max(1, n))


def _reduce(fname, a, axis, keepdims, factor):
    a = _operand(fname, "a", a)
    be = backend()
    if axis is None or (isinstance(axis, tuple) and len(axis) == a.ndim):
        out = be.total(a.data, factor)
        if keepdims:
            out = out.reshape((1,) * a.ndim)

        def backward(g):
            return (be.scale_scalar(g, a.shape, a.dtype, factor),)

        return _make(out, (a,), backward)
    if a.ndim == 2 and axis in (0, -2, (0,)):
        out = be.colsum(a.data)
        if factor != 1.0:
            out = be.binary(out, be.full((1,), out.dtype, factor), 2)
        if keepdims:
            out = out.reshape((1, a.shape[1]))

        def backward(g):
            gb = be.binary(be.zeros(a.shape, g.dtype), g.reshape(-1), 0)
            if factor != 1.0:
                gb = be.binary(gb, be.full((1,), gb.dtype, factor), 2)
            return (gb,)

        return _make(out, (a,), backward)
    raise NotImplementedError(f"{fname}: on cuda, reduce over every axis or over axis 0 of a 2-D tensor; got axis={axis}.")


def reshape(a, shape):
    a = _operand("reshape", "a", a)
    be = backend()
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1])) or 1
        shape = tuple(a.size // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != a.size:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {a.shape} ({a.size} elements) to {shape}.")
    out = be.flat(a.data).reshape(shape)
    return _make(out, (a,), lambda g: (be.copy(g).reshape(a.shape),))


def relu(a):
    a = _operand("relu", "a", a)
    be = backend()
    out = be.relu(a.data)
    return _make(out, (a,), lambda g: (be.relu_grad(g, out),))


def cross_entropy(logits, labels):
    logits = _operand("cross_entropy", "logits", logits)
    be = backend()
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (batch, classes), got shape {logits.shape}.")
    n, c = logits.shape
    from fanin.tensor import Tensor

    if isinstance(labels, Tensor):
        labels = labels.data
    if is_device_array(labels):
        lab = be.astype(be.wrap(labels), np.int64)
    else:
        lab_h = np.asarray(labels)
        if lab_h.dtype.kind == "f" and np.array_equal(lab_h, np.round(lab_h)):
            lab_h = lab_h.astype(np.int64)
        if lab_h.shape != (n,):
            raise ValueError(f"cross_entropy: labels of shape {lab_h.shape} do not fit logits of shape {logits.shape}; "
                             f"pass one integer label per row, shape ({n},).")
        if lab_h.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: labels must be integers, got dtype {lab_h.dtype}.")
        if n and (lab_h.min() < 0 or lab_h.max() >= c):
            raise ValueError(f"cross_entropy: labels must lie in [0, {c}), got {lab_h.min()}..{lab_h.max()}.")
        lab = be.to_device(lab_h.astype(np.int64))
    if tuple(lab.shape) != (n,):
        raise ValueError(f"cross_entropy: labels of shape {tuple(lab.shape)} do not fit logits of shape {logits.shape}.")
    loss, logp = be.cross_entropy(logits.data, lab)
    return _make(loss, (logits,), lambda g: (be.cross_entropy_backward(logp, lab, g),))


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` on the device (dense layers)."""
    x = _operand("linear", "x", x)
    weight = _operand("linear", "weight", weight)
    if bias is not None:
        bias = _operand("linear", "bias", bias)
    be = backend()
    if x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape}; the input "
                         f"must be (batch, {weight.shape[1]}).")
    B, n_in = x.shape
    n_out = weight.shape[0]
    dt = x.dtype
    xd, wd = be.flat(x.data), be.flat(be.astype(weight.data, dt))
    out = be.empty((B, n_out), dt)
    be.gemm(xd, n_in, 1, wd, 1, n_in, out.reshape(-1), n_out, B, n_out, n_in,
            None if bias is None else be.astype(bias.data, dt))
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        gf = be.flat(g)
        gx = gw = None
        if x.requires_grad:
            gx = be.empty((B, n_in), dt)
            be.gemm(gf, n_out, 1, wd, n_in, 1, gx.reshape(-1), n_in, B, n_in, n_out)
        if weight.requires_grad:
            gw = be.empty((n_out, n_in), dt)
            be.gemm(gf, 1, n_out, xd, n_in, 1, gw.reshape(-1), n_in, n_out, n_in, B)
        if bias is None:
            return gx, gw
        return gx, gw, be.colsum(g)

    return _make(out, parents, backward)


def fanin_linear(x, indices, values, bias=None, active=None, capture=None, dense=None):
    """The condensed layer on the device (``ops.fanin_linear``'s twin; row-major activations, no panels)."""
    from fanin import kernels
    from fanin.ops import _linear_topology

    x = _operand("fanin_linear", "x", x)
    values = _operand("fanin_linear", "values", values)
    if bias is not None:
        bias = _operand("fanin_linear", "bias", bias)
    topo, dense = _linear_topology(x, indices, values, active, dense)
    be = backend()
    n_in = x.shape[1]
    if dense:
        return _full_linear(x, topo, values, bias, capture)
    act = topo.active
    xd = x.data
    w = values.data
    out = kernels.fanin_forward(xd, topo, w, None if bias is None else bias.data)
    parents = (x, values) if bias is None else (x, values, bias)

    def backward(g):
        if capture is not None:
            capture.append((xd, g))
        gx = kernels.fanin_backward_input(topo, w, g, n_in) if x.requires_grad else None
        gv = None
        if values.requires_grad:
            gv = kernels.fanin_backward_values(xd, topo, g)
            if not act.all():
                be.zero_rows(gv, be.mask_of(act))
        if bias is None:
            return gx, gv
        return gx, gv, be.colsum(g)

    return _make(out, parents, backward)


def _full_linear(x, topo, values, bias, capture):
    """A condensed layer at full fan-in (every row reads inputs 0..n_in-1 in order, e.g. the classifier ERK keeps
    dense): ``values`` is the dense (n_out, n_in) weight, so the forward and both gradients are GEMMs, as the CPU's
    BLAS path. The sparse kernels' value gradient parallelises over rows only: a 10-neuron classifier over 4096
    inputs ran it on 3 blocks."""
    be = backend()
    B, n_in = x.shape
    n_out = int(topo.n_out)
    dt = np.dtype(np.float64) if np.float64 in (x.dtype, values.dtype) else np.dtype(np.float32)
    xd = be.flat(be.astype(x.data, dt))
    wd = be.flat(be.astype(values.data, dt))
    out = be.empty((B, n_out), dt)
    be.gemm(xd, n_in, 1, wd, 1, n_in, out.reshape(-1), n_out, B, n_out, n_in,
            None if bias is None else be.astype(bias.data, dt))
    act = topo.active
    parents = (x, values) if bias is None else (x, values, bias)

    def backward(g):
        g = be.astype(be.wrap(g), dt)
        if capture is not None:
            capture.append((xd.reshape((B, n_in)), g))
        gf = be.flat(g)
        gx = gv = None
        if x.requires_grad:  # dx = g @ W
            gx = be.empty((B, n_in), dt)
            be.gemm(gf, n_out, 1, wd, n_in, 1, gx.reshape(-1), n_in, B, n_in, n_out)
        if values.requires_grad:  # dW = g^T x; ablated neurons get none
            gv = be.empty((n_out, n_in), dt)
            be.gemm(gf, 1, n_out, xd, n_in, 1, gv.reshape(-1), n_in, n_out, n_in, B)
            if not act.all():
                be.zero_rows(gv, be.mask_of(act))
        if bias is None:
            return gx, gv
        return gx, gv, be.colsum(g)

    return _make(out, parents, backward)


def backward(root, grad=None):
    """``Tensor.backward`` for a tensor on the device: the same tape walk with device arithmetic.

    Gradient ownership as on the host: a leaf adopts an op's result without a copy only when nothing else in the
    pass holds it; otherwise it gets its own copy, so accumulating into one leaf never changes another."""
    from fanin.tensor import _topological_order

    be = backend()
    if not root.requires_grad:
        raise RuntimeError(
            "backward() called on a tensor that does not require grad; make sure an input "
            "or parameter has requires_grad=True and that you are not inside no_grad()."
        )
    if grad is None:
        if root.size != 1:
            raise RuntimeError(f"backward() without an argument needs a scalar, but this tensor has shape {root.shape}; "
                               "reduce it first (e.g. loss.sum() or loss.mean()) or pass grad= with the same shape.")
        grad = be.full(tuple(root.shape), root.dtype, 1.0)
    else:
        grad = move(grad.data if hasattr(grad, "data") and not is_device_array(grad) else grad, "cuda", root.dtype)
        if tuple(grad.shape) != tuple(root.shape):
            raise ValueError(f"backward(grad) needs grad of shape {root.shape}, got {tuple(grad.shape)}.")
    order = _topological_order(root)
    grads = {id(root): grad}
    holders = {id(grad): 2}  # the caller's grad is never adopted
    keep = [grad]
    adopted = set()
    for node in reversed(order):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        holders[id(g)] -= 1
        if node._backward is None:
            if node.grad is None:
                exclusive = holders[id(g)] == 0 and id(g) not in adopted
                if exclusive and g.dtype == node.data.dtype and tuple(g.shape) == tuple(node.data.shape):
                    node.grad = g
                else:
                    node.grad = be.copy(g, node.data.dtype).reshape(tuple(node.data.shape))
                adopted.add(id(node.grad))
            else:
                if not is_device_array(node.grad):
                    raise TypeError("backward: a leaf on cuda holds a host gradient; call zero_grad() after moving it.")
                be.axpy(node.grad, be.astype(g, node.grad.dtype))
            continue
        parent_grads = node._backward(g)
        for parent, pg in zip(node._parents, parent_grads):
            if pg is None or not parent.requires_grad:
                continue
            key = id(parent)
            if key in grads:
                old = grads[key]
                holders[id(old)] -= 1
                pg = be.binary(old, pg, 0)
            grads[key] = pg
            keep.append(pg)
            holders[id(pg)] = holders.get(id(pg), 0) + 1


# =================================================================== modules and optimizers
_NO_CUDA = ("Conv2d", "FanInConv2d", "BatchNorm1d", "BatchNorm2d", "MaxPool2d", "AvgPool2d", "GELU")


def move_module(module, device):
    """Move every parameter (data and grad) of ``module`` to ``device`` in place; returns the module.

    Optimizers and SRigL hold the same Parameter objects, so they follow (optimizer state moves with the next
    step, or at once with ``move_optimizer``). Layers without CUDA kernels are refused up front, by name."""
    from fanin import nn

    device = normalize(device)
    if device == "cuda":
        for m in module.modules():
            name = type(m).__name__
            if name in _NO_CUDA or (isinstance(m, nn.Dropout) and m.p > 0):
                raise NotImplementedError(
                    f"{name} has no CUDA implementation; on the device fanin runs Linear, FanInLinear, ReLU and "
                    "Flatten layers (MLPs). Keep this model on the cpu."
                )
            if getattr(m, "bits", None) is not None:
                raise NotImplementedError(f"{name} has self-compression attached, whose quantizer has no CUDA "
                                          "implementation; train it on the cpu.")
        backend()
    for p in module.parameters():
        p.data = move(p.data, device)
        if p.grad is not None:
            p.grad = move(p.grad, device)
    return module


def zeros_like(a):
    be = backend()
    a = be.wrap(a)
    return be.zeros(tuple(a.shape), a.dtype)


def move_optimizer(opt, device):
    """Move every state array of ``opt`` to ``device`` (they otherwise follow their parameter on the next step)."""
    for st in opt.state.values():
        for k, v in st.items():
            st[k] = move(v, device)
    return opt


# =================================================================== inference
class DeviceNetwork:
    """A ``runtime.Network`` on the GPU: its plan's arrays copied to the device once; ``predict`` runs the
    condensed, dense, int8 and 4-bit layers with the CUDA kernels (MLP plans: ``linear`` and ``flatten`` ops).

    ``predict(x)`` takes a host or device array and returns the same kind. Results equal the CPU Network's within
    float32 rounding (the same weights ``scale * q``, summed in another order)."""

    def __init__(self, net):
        from fanin import kernels
        from fanin.kernels import lowbit

        be = backend()
        self.network = net
        self.input_shape = tuple(net.input_shape)
        self.n_classes = net.n_classes
        self.steps = []
        for op in net.plan["ops"]:
            kind = op["op"]
            if kind == "flatten":
                continue
            if kind != "linear":
                raise NotImplementedError(f"DeviceNetwork: '{kind}' ops have no CUDA implementation (MLP plans only: "
                                          "linear and flatten); run this network on the cpu.")
            if op["act"] not in ("none", "relu"):
                raise NotImplementedError(f"DeviceNetwork: activation '{op['act']}' has no CUDA implementation.")
            a = op["arrays"]
            step = {"act": op["act"], "bias": be.to_device(np.asarray(a["bias"], np.float32)), "n_out": op["n_out"],
                    "n_in": op["n_in"], "bits": op["bits"]}
            if op["sparse"]:
                idx = np.ascontiguousarray(a["indices"])
                step["topo"] = kernels.Topology(idx, op["n_in"])
                if "qvalues" in a:
                    q = np.ascontiguousarray(a["qvalues"], np.int8)
                    step["scale"] = be.to_device(np.asarray(a["scale"], np.float32))
                    if op["bits"] == 4:
                        k = q.shape[1]
                        qp = np.zeros((q.shape[0], k + (k & 1)), np.int8)
                        qp[:, :k] = q
                        step["q4"] = be.to_device(lowbit.pack_nibbles(qp))
                    else:
                        step["q8"] = be.to_device(q)
                else:
                    step["values"] = be.to_device(np.asarray(a["values"], np.float32))
            else:
                w = a["values"] if "values" in a else a["scale"][:, None] * a["qvalues"].astype(np.float32)
                step["w"] = be.to_device(np.ascontiguousarray(w, np.float32))
            self.steps.append(step)

    def predict(self, x):
        from fanin import kernels

        be = backend()
        on_device = is_device_array(x)
        xd = be.wrap(x) if on_device else be.to_device(np.ascontiguousarray(np.asarray(x, np.float32)))
        single = tuple(xd.shape) == self.input_shape
        B = 1 if single else int(xd.shape[0])
        h = be.astype(be.flat(xd), np.float32).reshape((B, int(np.prod(self.input_shape))))
        for s in self.steps:
            if "topo" in s:
                if "q8" in s:
                    y = kernels.fixed_point_forward(h, s["topo"], s["q8"], s["scale"], s["bias"])
                elif "q4" in s:
                    y = be.fixed_point_forward4(h, s["topo"].indices, s["q4"], s["topo"].k, s["scale"], s["bias"])
                else:
                    y = kernels.fanin_forward(h, s["topo"], s["values"], s["bias"])
            else:
                y = be.empty((B, s["n_out"]), np.float32)
                be.gemm(be.flat(h), s["n_in"], 1, be.flat(s["w"]), 1, s["n_in"], y.reshape(-1), s["n_out"], B,
                        s["n_out"], s["n_in"], s["bias"])
            h = be.relu(y) if s["act"] == "relu" else y
        out = h.reshape((self.n_classes,)) if single else h
        return out if on_device else out.copy_to_host()

    __call__ = predict

    def __repr__(self):
        return f"DeviceNetwork({self.network!r})"


def load(path, device="cuda", **kw):
    """``fanin.load(path)``, on ``device``: a ``DeviceNetwork`` for 'cuda'."""
    from fanin import io

    net = io.load(path, **kw)
    return to_device(net, device)
